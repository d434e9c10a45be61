use clap::Parser;
use std::net::SocketAddr;

/// The API's configuration, read once from the environment (or flags).
#[derive(Debug, Clone, Parser)]
#[command(name = "api", about = "FHIR REST API of the platform")]
pub struct Config {
    #[command(flatten)]
    pub common: platform::CommonConfig,

    /// Address the HTTP server listens on (port 0 picks a free port).
    #[arg(long, env = "HTTP_BIND", default_value = "127.0.0.1:8080")]
    pub http_bind: SocketAddr,

    /// How long a readiness check waits for each dependency, in milliseconds.
    #[arg(long, env = "READY_TIMEOUT_MS", default_value_t = 2000)]
    pub ready_timeout_ms: u64,
}
