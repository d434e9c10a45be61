//! Token grants cached for a few seconds, so that a request costs no token lookup in
//! PostgreSQL. Any change to a partner (disabled, keys or scopes replaced) is notified by
//! PostgreSQL and clears the cache at once; if the notification connection is lost, the cache
//! is cleared and not used until it listens again, and no entry lives longer than `TTL`.

use db::partners::Grant;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const TTL: Duration = Duration::from_secs(5);
const MAX_ENTRIES: usize = 100_000;

#[derive(Debug, Default)]
pub struct GrantCache {
    entries: Mutex<HashMap<Vec<u8>, (Grant, Instant)>>,
    listening: AtomicBool,
    /// Grows at every clear: a grant read before a clear is not put after it.
    generation: AtomicU64,
}

impl GrantCache {
    pub fn get(&self, token_hash: &[u8]) -> Option<Grant> {
        if !self.listening.load(Ordering::Acquire) {
            return None;
        }
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries.get(token_hash).filter(|(_, at)| at.elapsed() < TTL).map(|(g, _)| g.clone())
    }

    /// Take this before reading a grant from PostgreSQL, and give it to `put`.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub fn put(&self, token_hash: Vec<u8>, grant: Grant, generation: u64) {
        if !self.listening.load(Ordering::Acquire) {
            return;
        }
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if self.generation.load(Ordering::Acquire) != generation {
            return;
        }
        if entries.len() >= MAX_ENTRIES {
            entries.retain(|_, (_, at)| at.elapsed() < TTL);
        }
        entries.insert(token_hash, (grant, Instant::now()));
    }

    fn clear(&self) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        self.generation.fetch_add(1, Ordering::AcqRel);
        entries.clear();
    }

    /// Follows partner changes for as long as the process runs.
    pub fn follow(self: &Arc<Self>, pool: db::Pool) {
        let cache = self.clone();
        tokio::spawn(async move {
            loop {
                match db::partners::listen_changes(&pool).await {
                    Ok(mut listener) => {
                        cache.clear();
                        cache.listening.store(true, Ordering::Release);
                        // Until the connection is lost (then notifications may have been missed).
                        while let Ok(Some(_)) = listener.try_recv().await {
                            cache.clear();
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot listen for partner changes; token grants are not cached"),
                }
                cache.listening.store(false, Ordering::Release);
                cache.clear();
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }
}
