//! `rate_buckets`: the token buckets every API instance shares, so that a partner's limits hold
//! in total rather than per instance.

use sqlx::PgPool;

/// What a take from a shared bucket gave.
#[derive(Debug, Clone, Copy, PartialEq, sqlx::FromRow)]
pub struct Taken {
    /// Whole tokens granted (0 to the number asked for).
    pub granted: i32,
    /// Tokens left in the bucket after the take (a fraction while it refills).
    pub tokens_left: f64,
}

/// Takes up to `want` tokens from `key`'s bucket, which refills at `rate` per second up to
/// `burst` and starts full.
pub async fn take(pool: &PgPool, key: &str, rate: f64, burst: f64, want: i32) -> crate::Result<Taken> {
    Ok(sqlx::query_as("SELECT granted, tokens_left FROM take_rate_tokens($1, $2, $3, $4)")
        .bind(key)
        .bind(rate)
        .bind(burst)
        .bind(want)
        .fetch_one(pool)
        .await?)
}
