//! Liveness (`/health`) and readiness (`/ready`: PostgreSQL and Kafka both answer) on the
//! partner-facing port, for load balancers. Operators' metrics are on the operations listener
//! only (`crate::metrics`).

use crate::routes as paths;
use crate::state::AppState;
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::Serialize;
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
    let (postgres, kafka) = tokio::join!(check_postgres(&state.pool, timeout), platform::ops::check_kafka(state.kafka.clone(), timeout));
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

/// This module's routes.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(health)).routes(routes!(ready))
}
