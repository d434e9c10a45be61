//! Token buckets. A partner's limits (`SharedLimiter`) hold in total across every API instance:
//! the buckets live in PostgreSQL and each instance spends them in short leases. The limit per
//! client address (`RateLimiter`, checked before a caller is authenticated) is each instance's
//! own: it must cost a flood of bad tokens a hash-map lookup, not a database query. Buckets that
//! have refilled are forgotten once there are many, so that callers from ever new addresses
//! cannot grow the table without bound.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

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
            Err(retry_after(bucket.tokens, limit.rate))
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.buckets.lock().unwrap().len()
    }
}

/// A lease lasts this long; tokens not spent by then lapse (the partner gets less, never more).
const LEASE_FOR: Duration = Duration::from_secs(1);

/// Each lease is this many seconds of the partner's rate (at least one token, at most its burst):
/// an instance asks the database once per tenth of a second of a partner's traffic.
const LEASE_SECONDS: f64 = 0.1;

#[derive(Debug)]
struct Lease {
    tokens: u32,
    until: Instant,
}

/// Buckets shared by every API instance through PostgreSQL (`db::rate_limits`). An instance
/// takes whole tokens in leases and spends them here; the database never grants more than the
/// bucket holds, so across N instances a partner gets its rate, not N times it. While the
/// database does not answer, each instance falls back to a bucket of its own.
#[derive(Debug)]
pub struct SharedLimiter {
    pool: db::Pool,
    leases: Mutex<HashMap<String, Lease>>,
    fallback: RateLimiter,
    degraded: AtomicBool,
}

impl SharedLimiter {
    pub fn new(pool: db::Pool) -> Self {
        SharedLimiter { pool, leases: Mutex::default(), fallback: RateLimiter::default(), degraded: AtomicBool::new(false) }
    }

    /// Takes one request from `key`'s bucket, or says in how many whole seconds one is available.
    pub async fn take(&self, key: &str, limit: Limit) -> Result<(), u64> {
        if self.spend_leased(key) {
            return Ok(());
        }
        match db::rate_limits::take(&self.pool, key, limit.rate, limit.burst, lease_size(limit)).await {
            Ok(taken) => {
                if self.degraded.swap(false, Ordering::Relaxed) {
                    tracing::warn!("rate limits are shared across instances again");
                }
                if taken.granted < 1 {
                    return Err(retry_after(taken.tokens_left, limit.rate));
                }
                if taken.granted > 1 {
                    self.lease(key, taken.granted as u32 - 1);
                }
                Ok(())
            }
            Err(e) => {
                if !self.degraded.swap(true, Ordering::Relaxed) {
                    tracing::warn!(error = %e, "rate limits: the shared buckets are unavailable; this instance limits on its own until they answer");
                }
                self.fallback.take(key, limit)
            }
        }
    }

    fn spend_leased(&self, key: &str) -> bool {
        let mut leases = self.leases.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        match leases.get_mut(key) {
            Some(lease) if lease.tokens > 0 && lease.until > Instant::now() => {
                lease.tokens -= 1;
                true
            }
            _ => false,
        }
    }

    fn lease(&self, key: &str, tokens: u32) {
        let mut leases = self.leases.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let now = Instant::now();
        if leases.len() >= PRUNE_ABOVE {
            leases.retain(|_, l| l.until > now && l.tokens > 0);
        }
        leases.insert(key.to_owned(), Lease { tokens, until: now + LEASE_FOR });
    }
}

fn lease_size(limit: Limit) -> i32 {
    let most = (limit.burst.floor() as i32).max(1);
    ((limit.rate * LEASE_SECONDS).floor() as i32).clamp(1, most)
}

/// Whole seconds until a bucket holding `tokens` has one.
fn retry_after(tokens: f64, rate: f64) -> u64 {
    ((1.0 - tokens) / rate).ceil().max(1.0) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn leases_are_a_tenth_of_a_second_of_the_rate_within_the_burst() {
        assert_eq!(lease_size(Limit { rate: 0.5, burst: 5.0 }), 1);
        assert_eq!(lease_size(Limit { rate: 50.0, burst: 100.0 }), 5);
        assert_eq!(lease_size(Limit { rate: 1000.0, burst: 20.0 }), 20);
        assert_eq!(lease_size(Limit { rate: 1000.0, burst: 0.0 }), 1);
        assert_eq!(retry_after(0.25, 0.5), 2);
        assert_eq!(retry_after(0.9, 100.0), 1);
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
