//! Stopping on SIGTERM or ctrl-c, the same way in every long-running binary.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Completes when the process gets SIGTERM or ctrl-c.
pub async fn signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending::<()>().await } } => {}
    }
}

/// A stop flag that SIGTERM or ctrl-c sets, for loops that look at it between steps.
pub fn flag_on_signal(name: &'static str) -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    tokio::spawn(async move {
        signal().await;
        tracing::info!("stopping {name}");
        flag.store(true, Ordering::Relaxed);
    });
    stop
}
