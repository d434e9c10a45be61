//! The platform's HTTP API: FHIR REST under `/fhir`, liveness and readiness, and the OpenAPI
//! document generated from these handlers (`openapi()`), served at `/openapi.json`.

pub mod audit;
pub mod auth;
pub mod batch;
pub mod config;
pub mod error;
pub mod http;
pub mod limits;
pub mod rest;
pub mod server;
pub mod startup;

pub use config::Config;
pub use startup::{Application, openapi};
