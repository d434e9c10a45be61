//! The operations listener every component serves (loopback by default, never the partner
//! port): `/health` (the process is up), `/ready` (its dependencies answer) and `/metrics`
//! (Prometheus text, OpenMetrics flavour). A component registers its metrics in [`Ops`]'s
//! registry, adds readiness checks, and gauges that are read at scrape time (outbox lag,
//! consumer lag, pool use) as refreshers run before each encoding.
//!
//! Label values are bounded by construction: topics, partitions, partners, route templates,
//! reasons; never member ids or anything a caller chooses freely.

use futures::future::BoxFuture;
use prometheus_client::registry::Registry;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// A readiness check: `Err` says which dependency does not answer, and why.
type Probe = Arc<dyn Fn() -> BoxFuture<'static, Result<(), String>> + Send + Sync>;
/// Updates scrape-time gauges; failures leave the previous values (and are logged by it).
type Refresh = Arc<dyn Fn() -> BoxFuture<'static, ()> + Send + Sync>;

/// What a component's operations listener serves.
pub struct Ops {
    registry: Registry,
    checks: Vec<(&'static str, Probe)>,
    refreshers: Vec<Refresh>,
    ready_timeout: Duration,
}

/// Histogram buckets for latencies in seconds: 0.5 ms to about 16 s.
pub fn latency_buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(0.0005, 2.0, 16)
}

/// Histogram buckets for batch sizes: 1 to 16,384.
pub fn size_buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(1.0, 2.0, 15)
}

impl Ops {
    /// Every metric is named `fhir_<component>_…` (or `fhir_…` for what components share).
    pub fn new(ready_timeout: Duration) -> Self {
        Ops { registry: Registry::with_prefix("fhir"), checks: Vec::new(), refreshers: Vec::new(), ready_timeout }
    }

    pub fn registry(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// A dependency `/ready` checks (each within the ready timeout).
    pub fn check<F, Fut>(&mut self, name: &'static str, probe: F)
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        self.checks.push((name, Arc::new(move || Box::pin(probe()))));
    }

    /// Adds Kafka to `/ready` (its metadata names a broker) and returns the metadata-only client
    /// it asks, for whatever else the component reads from the cluster (watermarks).
    pub fn watch_kafka(&mut self, kafka: &crate::KafkaConfig) -> anyhow::Result<Arc<rdkafka::consumer::BaseConsumer>> {
        let client = Arc::new(crate::kafka::observer(kafka)?);
        let (probe, timeout) = (client.clone(), self.ready_timeout);
        self.check("kafka", move || check_kafka(probe.clone(), timeout));
        Ok(client)
    }

    /// Work done before each scrape to bring gauges up to date.
    pub fn on_scrape<F, Fut>(&mut self, refresh: F)
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.refreshers.push(Arc::new(move || Box::pin(refresh())));
    }

    /// Readiness: every check, concurrently, each within the timeout.
    pub async fn ready(&self) -> Vec<(&'static str, Result<(), String>)> {
        let timeout = self.ready_timeout;
        futures::future::join_all(self.checks.iter().map(|(name, probe)| {
            let probe = probe.clone();
            async move {
                match tokio::time::timeout(timeout, probe()).await {
                    Ok(answer) => (*name, answer),
                    Err(_) => (*name, Err(format!("{name} did not answer within {} ms", timeout.as_millis()))),
                }
            }
        }))
        .await
    }

    /// The metrics, refreshed, in the OpenMetrics text format.
    pub async fn metrics(&self) -> String {
        futures::future::join_all(self.refreshers.iter().map(|r| r())).await;
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Binds `addr` and serves until `stop` is set (then the listener closes and what the
    /// checks and refreshers hold, such as database pools, is released). Returns the bound
    /// address (port 0 picks a free one).
    pub async fn serve(self, addr: SocketAddr, stop: Arc<std::sync::atomic::AtomicBool>) -> anyhow::Result<SocketAddr> {
        use axum::routing::get;
        let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| anyhow::anyhow!("operations listener on {addr}: {e}"))?;
        let bound = listener.local_addr()?;
        let ops = Arc::new(self);
        let app = axum::Router::new()
            .route("/health", get(|| async { axum::Json(serde_json::json!({ "status": "pass" })) }))
            .route("/ready", get(ready))
            .route("/metrics", get(metrics))
            .with_state(ops);
        let stopped = async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(stopped).await {
                tracing::error!(error = %e, "operations listener stopped");
            }
        });
        tracing::info!(address = %bound, "operations listener (health, ready, metrics)");
        Ok(bound)
    }
}

async fn ready(axum::extract::State(ops): axum::extract::State<Arc<Ops>>) -> (axum::http::StatusCode, axum::Json<serde_json::Value>) {
    let answers = ops.ready().await;
    let ok = answers.iter().all(|(_, a)| a.is_ok());
    let checks: serde_json::Map<String, serde_json::Value> = answers
        .into_iter()
        .map(|(name, answer)| {
            let check = match answer {
                Ok(()) => serde_json::json!({ "status": "pass" }),
                Err(reason) => serde_json::json!({ "status": "fail", "reason": reason }),
            };
            (name.to_owned(), check)
        })
        .collect();
    let status = if ok { axum::http::StatusCode::OK } else { axum::http::StatusCode::SERVICE_UNAVAILABLE };
    (status, axum::Json(serde_json::json!({ "status": if ok { "pass" } else { "fail" }, "checks": checks })))
}

async fn metrics(axum::extract::State(ops): axum::extract::State<Arc<Ops>>) -> impl axum::response::IntoResponse {
    ([(axum::http::header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], ops.metrics().await)
}

/// A component started on a task: its stop flag, its task, and where its operations listener
/// answers.
pub struct Running<H> {
    pub stop: Arc<std::sync::atomic::AtomicBool>,
    pub handle: H,
    pub ops_addr: SocketAddr,
}

impl Running<tokio::task::JoinHandle<anyhow::Result<()>>> {
    /// Asks the task to stop and waits for it; its error, if it failed.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.handle.await?
    }

    /// Runs until SIGTERM or ctrl-c (then stops it between steps) or until the task ends.
    pub async fn until_signal(mut self, name: &'static str) -> anyhow::Result<()> {
        tokio::select! {
            _ = crate::shutdown::signal() => {
                tracing::info!("stopping {name}");
                self.stop().await
            }
            ended = &mut self.handle => {
                let ended = ended?;
                // In the log too (a deployment's log file, not only stderr): why it exited.
                if let Err(e) = &ended {
                    tracing::error!(error = %e, "{name} stopped");
                }
                ended
            }
        }
    }
}

/// Readiness of Kafka: the cluster's metadata names at least one broker.
pub async fn check_kafka(client: Arc<rdkafka::consumer::BaseConsumer>, timeout: Duration) -> Result<(), String> {
    use rdkafka::consumer::Consumer;
    let answer = tokio::task::spawn_blocking(move || client.fetch_metadata(None, timeout).map(|m| m.brokers().len())).await;
    match answer {
        Ok(Ok(brokers)) if brokers > 0 => Ok(()),
        Ok(Ok(_)) => Err("Kafka: no broker in metadata".to_owned()),
        Ok(Err(e)) => Err(format!("Kafka: {e}")),
        Err(e) => Err(format!("Kafka check failed: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::gauge::Gauge;

    #[tokio::test]
    async fn metrics_are_refreshed_before_they_are_encoded() {
        let mut ops = Ops::new(Duration::from_millis(100));
        let served = Counter::<u64>::default();
        let depth = Gauge::<i64>::default();
        ops.registry().register("test_served", "Things served", served.clone());
        ops.registry().register("test_depth", "Depth at scrape time", depth.clone());
        let d = depth.clone();
        ops.on_scrape(move || {
            let d = d.clone();
            async move {
                d.set(7);
            }
        });
        served.inc_by(3);
        let text = ops.metrics().await;
        assert!(text.contains("fhir_test_served_total 3"), "{text}");
        assert!(text.contains("fhir_test_depth 7"), "{text}");
    }

    #[tokio::test]
    async fn readiness_fails_on_a_check_that_errs_or_hangs() {
        let mut ops = Ops::new(Duration::from_millis(50));
        ops.check("fine", || async { Ok(()) });
        ops.check("down", || async { Err("refused".to_owned()) });
        ops.check("hangs", std::future::pending);
        let answers = ops.ready().await;
        assert_eq!(answers[0], ("fine", Ok(())));
        assert_eq!(answers[1], ("down", Err("refused".to_owned())));
        assert!(answers[2].1.as_ref().is_err_and(|e| e.contains("within 50 ms")), "{answers:?}");
    }
}
