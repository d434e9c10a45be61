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

    /// The token endpoint's public URL: the `aud` every client assertion must carry. Defaults
    /// to FHIR_BASE_URL with its `/fhir` replaced by `/auth/token`.
    #[arg(long, env = "AUTH_TOKEN_URL")]
    pub auth_token_url: Option<String>,

    /// Lifetime of issued bearer tokens, in seconds.
    #[arg(long, env = "AUTH_TOKEN_LIFETIME_SECS", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub auth_token_lifetime_secs: u64,

    /// Requests per second a partner may make, sustained (unless its registration says otherwise).
    #[arg(long, env = "RATE_LIMIT_PER_SECOND", default_value_t = 50.0)]
    pub rate_limit_per_second: f64,

    /// Requests a partner may make at once after a quiet period (unless its registration says otherwise).
    #[arg(long, env = "RATE_LIMIT_BURST", default_value_t = 100)]
    pub rate_limit_burst: u32,

    /// $hashed-match answers no sooner than this after it arrives, whatever the outcome, so
    /// that a non-match cannot be told from a match by its timing.
    #[arg(long, env = "MATCH_LATENCY_FLOOR_MS", default_value_t = 40)]
    pub match_latency_floor_ms: u64,

    /// $hashed-match requests per second a partner may make, sustained (much lower than reads).
    #[arg(long, env = "MATCH_RATE_LIMIT_PER_SECOND", default_value_t = 1.0)]
    pub match_rate_limit_per_second: f64,

    /// $hashed-match requests a partner may make at once.
    #[arg(long, env = "MATCH_RATE_LIMIT_BURST", default_value_t = 10)]
    pub match_rate_limit_burst: u32,

    /// Audit writer tasks: each writes a group of records per commit; several overlap commits.
    #[arg(long, env = "AUDIT_WRITERS", default_value_t = 2)]
    pub audit_writers: usize,

    /// Tasks reading medication profiles, each with its own connection: a task serves all the
    /// reads waiting with one statement, which also records them on the audit trail and
    /// commits. The first serves every read while its statements take less than
    /// PROFILE_READ_OVERLAP_MS, and the reads that arrive meanwhile share its next statement
    /// (and WAL flush); the second starts on the waiting reads only once the first's statement
    /// has run that long, so a statement that stalls holds back only its own reads.
    #[arg(long, env = "PROFILE_READERS", default_value_t = 2)]
    pub profile_readers: usize,

    /// How long, in milliseconds, a profile statement in flight holds back the reads that
    /// arrive after it before another reader starts on them (0: at once).
    #[arg(long, env = "PROFILE_READ_OVERLAP_MS", default_value_t = 5)]
    pub profile_read_overlap_ms: u64,

    /// Memory, in MiB, for the bodies of medication profiles already served (by member and
    /// version, which never changes; every read still checks the current version and the
    /// attribution in PostgreSQL). 0 turns the cache off.
    #[arg(long, env = "PROFILE_CACHE_MIB", default_value_t = 256)]
    pub profile_cache_mib: u64,

    /// Accept `http://` rest-hook endpoints for Subscriptions (local tests and demos only);
    /// otherwise only `https://`.
    #[arg(long, env = "SUBSCRIPTION_ALLOW_HTTP", default_value_t = false)]
    pub subscription_allow_http: bool,

    /// The API needs only the pepper (partners send tokens, not identities).
    #[command(flatten)]
    pub pmm1: platform::Pmm1Config,
}

impl Config {
    pub fn token_url(&self) -> String {
        match &self.auth_token_url {
            Some(url) => url.clone(),
            None => {
                let base = self.common.fhir_base_url.trim_end_matches('/');
                format!("{}{}", base.strip_suffix("/fhir").unwrap_or(base), crate::auth::token::PATH)
            }
        }
    }
}
