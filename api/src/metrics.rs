//! What the API exports on its operations listener (never on the partner-facing port): requests
//! by route template, method and status with their latency, `$hashed-match` decisions, audit
//! writes and the audit trail not yet on `audit.events.v1`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The route template (`/fhir/Patient/{id}/$medication-profile`), `unmatched` otherwise:
    /// never a path a caller wrote.
    pub route: String,
    pub method: &'static str,
    pub status: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: String,
    pub method: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabel {
    pub decision: &'static str,
}

#[derive(Debug)]
pub struct Metrics {
    requests: Family<RequestLabels, Counter>,
    request_seconds: Family<RouteLabels, Histogram>,
    matches: Family<DecisionLabel, Counter>,
    audit_write_seconds: Histogram,
    audit_unpublished: Gauge,
}

/// Every decision `$hashed-match` makes (crate::http::matching).
pub const DECISIONS: [&str; 5] = ["match", "no-match", "ambiguous", "too-weak", "unknown-key"];

impl Default for Metrics {
    fn default() -> Self {
        let m = Metrics {
            requests: Family::default(),
            request_seconds: Family::new_with_constructor(|| Histogram::new(platform::ops::latency_buckets())),
            matches: Family::default(),
            audit_write_seconds: Histogram::new(platform::ops::latency_buckets()),
            audit_unpublished: Gauge::default(),
        };
        for decision in DECISIONS {
            let _ = m.matches.get_or_create(&DecisionLabel { decision });
        }
        m
    }
}

impl Metrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register("http_requests", "HTTP requests by route template, method and status", self.requests.clone());
        registry.register("http_request_seconds", "HTTP request latency by route template and method", self.request_seconds.clone());
        let r = registry.sub_registry_with_prefix("api");
        r.register("match_requests", "$hashed-match requests by decision", self.matches.clone());
        r.register("audit_write_seconds", "Time to write one group of audit records (and commit it)", self.audit_write_seconds.clone());
        r.register("audit_unpublished", "Audit events written but not yet on audit.events.v1", self.audit_unpublished.clone());
    }

    pub(crate) fn request(&self, route: &str, method: &axum::http::Method, status: u16, took: std::time::Duration) {
        let method = method_label(method);
        let labels = RouteLabels { route: route.to_owned(), method };
        self.requests.get_or_create(&RequestLabels { route: labels.route.clone(), method, status }).inc();
        self.request_seconds.get_or_create(&labels).observe(took.as_secs_f64());
    }

    pub(crate) fn matched(&self, decision: &'static str) {
        self.matches.get_or_create(&DecisionLabel { decision }).inc();
    }

    pub(crate) fn audit_written(&self, took: std::time::Duration) {
        self.audit_write_seconds.observe(took.as_secs_f64());
    }

    pub async fn refresh(&self, pool: &db::Pool) {
        match db::audit::unpublished(pool).await {
            Ok(n) => {
                self.audit_unpublished.set(n);
            }
            Err(e) => tracing::warn!(error = %e, "audit lag not refreshed"),
        }
    }
}

/// A request method as a label: the standard ones by name, any other as `other` (a caller
/// chooses the method, so it must not add series).
fn method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    [Method::GET, Method::HEAD, Method::POST, Method::PUT, Method::PATCH, Method::DELETE, Method::OPTIONS]
        .iter()
        .zip(["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
        .find_map(|(m, name)| (m == method).then_some(name))
        .unwrap_or("other")
}

/// Outermost middleware: counts and times every request under its route template.
pub async fn track(
    axum::extract::State(metrics): axum::extract::State<std::sync::Arc<Metrics>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let started = std::time::Instant::now();
    let method = request.method().clone();
    let route = request.extensions().get::<axum::extract::MatchedPath>().cloned();
    let response = next.run(request).await;
    metrics.request(route.as_ref().map_or("unmatched", |r| r.as_str()), &method, response.status().as_u16(), started.elapsed());
    response
}

#[cfg(test)]
mod tests {
    use super::method_label;
    use axum::http::Method;

    #[test]
    fn a_caller_chosen_method_adds_no_series() {
        assert_eq!(method_label(&Method::GET), "GET");
        assert_eq!(method_label(&Method::DELETE), "DELETE");
        assert_eq!(method_label(&Method::from_bytes(b"BREW").unwrap_or(Method::TRACE)), "other");
        assert_eq!(method_label(&Method::TRACE), "other");
    }
}
