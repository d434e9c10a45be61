//! The connection loop: hyper's HTTP/1 server with the limits `axum::serve` does not set.
//! A client that sends half a header, never finishes its body, or opens connections without end
//! holds a bounded share of the server for a bounded time:
//! - headers must arrive within `header_timeout` (also the idle time allowed between requests of
//!   a kept-alive connection) and fit in `max_header_bytes`;
//! - at most `max_connections` connections are served at once, `max_connections_per_address`
//!   of them from one address; past the total the server stops accepting (the kernel's backlog
//!   holds the rest), past an address's share that address's new connections are closed;
//! - a connection serves at most `max_requests_per_connection` requests, then closes.
//!
//! Body and whole-request timeouts are per request, in `crate::limits`.

use axum::Router;
use axum::extract::ConnectInfo;
use axum::http::{HeaderValue, Request, header};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::collections::HashMap;
use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tower::ServiceExt;

/// How much of the server one client may hold, and for how long.
#[derive(Debug, Clone, Copy)]
pub struct ServerLimits {
    pub header_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_connections: usize,
    pub max_connections_per_address: usize,
    pub max_requests_per_connection: u64,
}

/// Connections open per client address (entries leave when their count reaches 0).
#[derive(Default)]
struct PerAddress(Mutex<HashMap<IpAddr, usize>>);

impl PerAddress {
    fn enter(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<AddressSlot> {
        let mut open = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(AddressSlot { table: self.clone(), ip })
    }
}

struct AddressSlot {
    table: Arc<PerAddress>,
    ip: IpAddr,
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut open = self.table.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// Serves `router` on `listener` until `shutdown` completes, then lets the requests in flight
/// finish (at most 30 s) before returning.
pub async fn serve(listener: TcpListener, router: Router, limits: ServerLimits, shutdown: impl Future<Output = ()>) -> std::io::Result<()> {
    let connections = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let per_address = Arc::new(PerAddress::default());
    let (stop, stopping) = watch::channel(false);
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(limits.header_timeout).max_header_size(limits.max_header_bytes.max(1024)).keep_alive(true);
    let builder = Arc::new(builder);
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            permit = connections.clone().acquire_owned() => match permit { Ok(p) => p, Err(_) => break },
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors, or a connection reset before it was accepted:
                    // pause briefly instead of spinning, and go on.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Some(slot) = per_address.enter(peer.ip(), limits.max_connections_per_address.max(1)) else {
            tracing::debug!(address = %peer.ip(), "connection refused: this address holds its share of connections");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (router, builder, mut stopping) = (router.clone(), builder.clone(), stopping.clone());
        let max_requests = limits.max_requests_per_connection.max(1);
        tokio::spawn(async move {
            let served = Arc::new(AtomicU64::new(0));
            let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
                request.extensions_mut().insert(ConnectInfo(peer));
                let last = served.fetch_add(1, Ordering::Relaxed) + 1 >= max_requests;
                let router = router.clone();
                async move {
                    let mut response = router.oneshot(request.map(axum::body::Body::new)).await.unwrap_or_else(|e: Infallible| match e {});
                    if last {
                        response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
                    }
                    Ok::<_, Infallible>(response)
                }
            });
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            let stopped = tokio::select! {
                _ = connection.as_mut() => false,
                stop = stopping.wait_for(|stop| *stop) => stop.is_ok(),
            };
            if stopped {
                connection.as_mut().graceful_shutdown();
                let _ = connection.await;
            }
            drop((slot, permit));
        });
    }
    let _ = stop.send(true);
    let all = u32::try_from(limits.max_connections.max(1)).unwrap_or(u32::MAX);
    let _ = tokio::time::timeout(Duration::from_secs(30), connections.acquire_many(all)).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_holds_at_most_its_share_and_gets_it_back() {
        let table = Arc::new(PerAddress::default());
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let other: IpAddr = "::1".parse().unwrap();
        let a = table.enter(ip, 2);
        let b = table.enter(ip, 2);
        assert!(a.is_some() && b.is_some());
        assert!(table.enter(ip, 2).is_none(), "a third connection from the same address");
        assert!(table.enter(other, 2).is_some(), "another address has its own share");
        drop(a);
        let c = table.enter(ip, 2);
        assert!(c.is_some(), "a closed connection frees its slot");
        drop((b, c));
        assert!(table.0.lock().unwrap().is_empty(), "addresses without connections are forgotten");
    }
}
