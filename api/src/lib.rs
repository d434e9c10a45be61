//! The platform's HTTP API: FHIR REST under `/fhir`, SMART Backend Services tokens, attribution,
//! write-back, Subscriptions and `$hashed-match`, every access on the audit trail; liveness,
//! readiness and metrics; the OpenAPI document generated from the handlers (`openapi()`).
//! It reads and writes PostgreSQL through `db`, and FHIR content through `fhir`; it never
//! consumes the systems of record's topics (the composer does).
//!
//! How a request flows: `server` (the connection loop and its limits) → `guard` (who is
//! calling, rates, the audit record) → `limits` (body, time, panics) → a handler in `http`,
//! which shares `state::AppState`. Paths are in `routes`.

pub mod audit;
pub mod auth;
pub mod config;
pub mod doc;
pub mod error;
pub mod group_commit;
pub mod guard;
pub mod http;
pub mod limits;
pub mod matcher;
pub mod metrics;
pub mod profile_reads;
pub mod rest;
pub mod routes;
pub mod server;
pub mod startup;
pub mod state;
pub mod trace;

#[cfg(test)]
mod module_graph;

pub use config::Config;
pub use startup::{Application, openapi};
