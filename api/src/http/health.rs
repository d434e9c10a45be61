//! Liveness (`/health`) and readiness (`/ready`: PostgreSQL and Kafka both answer).

use crate::routes as paths;
use crate::state::AppState;
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use rdkafka::consumer::{BaseConsumer, Consumer};
use serde::Serialize;
use std::sync::Arc;
use std::time::Duration;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// `pass` when the process serves requests.
    #[schema(example = "pass")]
    pub status: &'static str,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Readiness {
    /// `pass` when every dependency answers, `fail` otherwise.
    #[schema(example = "pass")]
    pub status: &'static str,
    pub checks: Checks,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Checks {
    pub postgres: Check,
    pub kafka: Check,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Check {
    #[schema(example = "pass")]
    pub status: &'static str,
    /// Why the dependency is not ready (absent when it is).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl Check {
    fn from_result(result: Result<(), String>) -> Self {
        match result {
            Ok(()) => Check { status: "pass", reason: None },
            Err(reason) => Check { status: "fail", reason: Some(reason) },
        }
    }
}

/// Liveness: the process is up.
#[utoipa::path(get, path = paths::HEALTH, tag = "operations",
    responses((status = 200, description = "The process is up", body = Health)))]
pub async fn health() -> Json<Health> {
    Json(Health { status: "pass" })
}

/// Readiness: PostgreSQL and Kafka both answer within the configured timeout.
#[utoipa::path(get, path = paths::READY, tag = "operations",
    responses(
        (status = 200, description = "Every dependency answers", body = Readiness),
        (status = 503, description = "A dependency does not answer; `reason` says which and why", body = Readiness)))]
pub async fn ready(State(state): State<AppState>) -> (StatusCode, Json<Readiness>) {
    let timeout = state.ready_timeout;
    let (postgres, kafka) = tokio::join!(check_postgres(&state.pool, timeout), check_kafka(state.kafka.clone(), timeout));
    let ok = postgres.is_ok() && kafka.is_ok();
    let body = Readiness {
        status: if ok { "pass" } else { "fail" },
        checks: Checks { postgres: Check::from_result(postgres), kafka: Check::from_result(kafka) },
    };
    (if ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }, Json(body))
}

async fn check_postgres(pool: &db::Pool, timeout: Duration) -> Result<(), String> {
    match tokio::time::timeout(timeout, db::ping(pool)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("PostgreSQL: {e}")),
        Err(_) => Err(format!("PostgreSQL did not answer within {} ms", timeout.as_millis())),
    }
}

async fn check_kafka(client: Arc<BaseConsumer>, timeout: Duration) -> Result<(), String> {
    let answer = tokio::task::spawn_blocking(move || client.fetch_metadata(None, timeout).map(|m| m.brokers().len())).await;
    match answer {
        Ok(Ok(brokers)) if brokers > 0 => Ok(()),
        Ok(Ok(_)) => Err("Kafka: no broker in metadata".to_owned()),
        Ok(Err(e)) => Err(format!("Kafka: {e}")),
        Err(e) => Err(format!("Kafka check failed: {e}")),
    }
}

/// Operators' metrics in the Prometheus text format: the outbox's lag (rows not yet on Kafka,
/// the age of the oldest, composite versions not yet turned into subscription events), and per
/// subscription its queue depth and delivery failures. Needs the operators' scope
/// (`system/AuditEvent.read`), like the audit trail.
#[utoipa::path(get, path = paths::METRICS, tag = "operations",
    responses(
        (status = 200, description = "Prometheus text exposition format", body = String, content_type = "text/plain"),
        (status = 401, description = "No valid bearer token", body = crate::error::OperationOutcome, content_type = "application/fhir+json"),
        (status = 403, description = "The token's scopes do not cover this request", body = crate::error::OperationOutcome, content_type = "application/fhir+json"),
        (status = 429, description = "Rate limit reached; see Retry-After", body = crate::error::OperationOutcome, content_type = "application/fhir+json"),
        (status = 503, description = "The database is not available", body = crate::error::OperationOutcome, content_type = "application/fhir+json")),
    security(("smart_backend" = [])))]
pub async fn metrics(
    State(state): State<AppState>,
    axum::Extension(caller): axum::Extension<crate::auth::Caller>,
) -> Result<axum::response::Response, crate::error::ApiError> {
    use std::fmt::Write;
    caller.require(&[crate::auth::scope::ADMIN_TYPE], crate::auth::scope::Interaction::Read)?;
    let m = db::subscriptions::metrics(&state.pool).await?;
    let label = |v: &str| v.replace('\\', "\\\\").replace('"', "\\\"");
    let mut out = String::new();
    let _ = writeln!(out, "# HELP fhir_outbox_unpublished Outbox rows (composite versions, partner write-backs) not yet acknowledged by Kafka.");
    let _ = writeln!(out, "# TYPE fhir_outbox_unpublished gauge\nfhir_outbox_unpublished {}", m.outbox_unpublished);
    let _ = writeln!(out, "# HELP fhir_outbox_oldest_unpublished_seconds Age of the oldest of them (0 when none).");
    let _ = writeln!(
        out,
        "# TYPE fhir_outbox_oldest_unpublished_seconds gauge\nfhir_outbox_oldest_unpublished_seconds {:.3}",
        m.outbox_oldest_unpublished_secs
    );
    let _ = writeln!(out, "# HELP fhir_outbox_parked Outbox rows the relay could not publish and parked for an operator (fhirctl outbox).");
    let _ = writeln!(out, "# TYPE fhir_outbox_parked gauge\nfhir_outbox_parked {}", m.outbox_parked);
    let _ = writeln!(out, "# HELP fhir_outbox_unnotified Composite versions not yet turned into subscription events.");
    let _ = writeln!(out, "# TYPE fhir_outbox_unnotified gauge\nfhir_outbox_unnotified {}", m.outbox_unnotified);
    let _ = writeln!(out, "# HELP fhir_subscription_queue_depth Events of a subscription not yet delivered.");
    let _ = writeln!(out, "# TYPE fhir_subscription_queue_depth gauge");
    for s in &m.subscriptions {
        let _ = writeln!(
            out,
            "fhir_subscription_queue_depth{{subscription=\"{}\",partner=\"{}\",status=\"{}\"}} {}",
            label(&s.id),
            label(&s.partner_id),
            label(&s.status),
            s.undelivered
        );
    }
    let _ = writeln!(out, "# HELP fhir_subscription_delivery_failures_total Notifications of a subscription that failed (each retry counts).");
    let _ = writeln!(out, "# TYPE fhir_subscription_delivery_failures_total counter");
    for s in &m.subscriptions {
        let _ = writeln!(
            out,
            "fhir_subscription_delivery_failures_total{{subscription=\"{}\",partner=\"{}\"}} {}",
            label(&s.id),
            label(&s.partner_id),
            s.delivery_failures
        );
    }
    Ok(axum::response::IntoResponse::into_response(([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)))
}

/// This module's routes.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(health)).routes(routes!(ready)).routes(routes!(metrics))
}
