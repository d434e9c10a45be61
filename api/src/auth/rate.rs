//! Per-partner token buckets. Each API instance keeps its own buckets: with N instances behind
//! a load balancer a partner gets up to N times its rate, which the operator sizes for.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limit {
    /// Sustained requests per second.
    pub rate: f64,
    /// Requests that may come at once after a quiet period.
    pub burst: f64,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

#[derive(Debug, Default)]
pub struct RateLimiter {
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl RateLimiter {
    /// Takes one request from `key`'s bucket, or says in how many whole seconds one is available.
    pub fn take(&self, key: &str, limit: Limit) -> Result<(), u64> {
        self.take_at(key, limit, Instant::now())
    }

    fn take_at(&self, key: &str, limit: Limit, now: Instant) -> Result<(), u64> {
        let mut buckets = self.buckets.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let bucket = buckets.entry(key.to_owned()).or_insert(Bucket { tokens: limit.burst, at: now });
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * limit.rate).min(limit.burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - bucket.tokens) / limit.rate).ceil().max(1.0) as u64)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_burst_then_the_sustained_rate() {
        let limiter = RateLimiter::default();
        let limit = Limit { rate: 2.0, burst: 3.0 };
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(limiter.take_at("p", limit, t0), Ok(()));
        }
        assert_eq!(limiter.take_at("p", limit, t0), Err(1));
        assert_eq!(limiter.take_at("q", limit, t0), Ok(()), "buckets are per partner");
        assert_eq!(limiter.take_at("p", limit, t0 + Duration::from_millis(500)), Ok(()));
        assert_eq!(limiter.take_at("p", limit, t0 + Duration::from_millis(600)), Err(1));
        let slow = Limit { rate: 0.1, burst: 1.0 };
        assert_eq!(limiter.take_at("s", slow, t0), Ok(()));
        assert_eq!(limiter.take_at("s", slow, t0), Err(10));
    }
}
