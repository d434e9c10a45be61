//! Token buckets, per partner and per client address. Each API instance keeps its own buckets:
//! with N instances behind a load balancer a partner gets up to N times its rate, which the
//! operator sizes for. Buckets that have refilled are forgotten once there are many, so that
//! callers from ever new addresses cannot grow the table without bound.

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

/// Past this many buckets, full ones are dropped (a full bucket is what a new one would be).
const PRUNE_ABOVE: usize = 10_000;

impl RateLimiter {
    /// Takes one request from `key`'s bucket, or says in how many whole seconds one is available.
    pub fn take(&self, key: &str, limit: Limit) -> Result<(), u64> {
        self.take_at(key, limit, Instant::now(), true)
    }

    /// Whether `key` has a request left, without taking it.
    pub fn check(&self, key: &str, limit: Limit) -> Result<(), u64> {
        self.take_at(key, limit, Instant::now(), false)
    }

    fn take_at(&self, key: &str, limit: Limit, now: Instant, take: bool) -> Result<(), u64> {
        let mut buckets = self.buckets.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if !buckets.contains_key(key) {
            if !take {
                return Ok(());
            }
            if buckets.len() >= PRUNE_ABOVE {
                buckets.retain(|_, b| b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * limit.rate < limit.burst);
            }
        }
        let bucket = buckets.entry(key.to_owned()).or_insert(Bucket { tokens: limit.burst, at: now });
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * limit.rate).min(limit.burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            if take {
                bucket.tokens -= 1.0;
            }
            Ok(())
        } else {
            Err(((1.0 - bucket.tokens) / limit.rate).ceil().max(1.0) as u64)
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.buckets.lock().unwrap().len()
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
            assert_eq!(limiter.take_at("p", limit, t0, true), Ok(()));
        }
        assert_eq!(limiter.take_at("p", limit, t0, true), Err(1));
        assert_eq!(limiter.take_at("q", limit, t0, true), Ok(()), "buckets are per partner");
        assert_eq!(limiter.take_at("p", limit, t0 + Duration::from_millis(500), true), Ok(()));
        assert_eq!(limiter.take_at("p", limit, t0 + Duration::from_millis(600), true), Err(1));
        let slow = Limit { rate: 0.1, burst: 1.0 };
        assert_eq!(limiter.take_at("s", slow, t0, true), Ok(()));
        assert_eq!(limiter.take_at("s", slow, t0, true), Err(10));
    }

    #[test]
    fn a_check_takes_nothing() {
        let limiter = RateLimiter::default();
        let limit = Limit { rate: 1.0, burst: 1.0 };
        let t0 = Instant::now();
        assert_eq!(limiter.take_at("a", limit, t0, false), Ok(()));
        assert_eq!(limiter.len(), 0, "a check of an unknown key leaves no bucket");
        assert_eq!(limiter.take_at("a", limit, t0, true), Ok(()));
        assert_eq!(limiter.take_at("a", limit, t0, false), Err(1));
        assert_eq!(limiter.take_at("a", limit, t0 + Duration::from_secs(1), false), Ok(()));
        assert_eq!(limiter.take_at("a", limit, t0 + Duration::from_secs(1), false), Ok(()), "still there: nothing was taken");
    }

    #[test]
    fn refilled_buckets_are_forgotten_when_there_are_many() {
        let limiter = RateLimiter::default();
        let limit = Limit { rate: 10.0, burst: 2.0 };
        let t0 = Instant::now();
        for i in 0..PRUNE_ABOVE {
            let _ = limiter.take_at(&format!("10.0.{}.{}", i / 256, i % 256), limit, t0, true);
        }
        assert_eq!(limiter.len(), PRUNE_ABOVE);
        let t1 = t0 + Duration::from_secs(1);
        let _ = limiter.take_at("busy", limit, t1, true);
        assert_eq!(limiter.len(), 1, "every bucket that refilled went when a new one came");
        let _ = limiter.take_at("new", limit, t1, true);
        assert_eq!(limiter.len(), 2);
    }
}
