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

    /// How long a client may take to send a request's headers, and to start the next request on
    /// a kept-alive connection, in milliseconds; the connection is closed after that.
    #[arg(long, env = "HTTP_HEADER_TIMEOUT_MS", default_value_t = 10_000)]
    pub http_header_timeout_ms: u64,

    /// How long a request's body may take to arrive once its headers have, in milliseconds (408).
    #[arg(long, env = "HTTP_BODY_TIMEOUT_MS", default_value_t = 10_000)]
    pub http_body_timeout_ms: u64,

    /// How long a whole request may take, in milliseconds (408).
    #[arg(long, env = "HTTP_REQUEST_TIMEOUT_MS", default_value_t = 30_000)]
    pub http_request_timeout_ms: u64,

    /// Connections served at once; past this the server stops accepting until one closes.
    #[arg(long, env = "HTTP_MAX_CONNECTIONS", default_value_t = 1024)]
    pub http_max_connections: usize,

    /// Connections one client address may hold at once; its further connections are closed.
    #[arg(long, env = "HTTP_MAX_CONNECTIONS_PER_ADDRESS", default_value_t = 256)]
    pub http_max_connections_per_address: usize,

    /// Requests one connection may carry before the server closes it.
    #[arg(long, env = "HTTP_MAX_REQUESTS_PER_CONNECTION", default_value_t = 10_000)]
    pub http_max_requests_per_connection: u64,

    /// Largest request head (request line and headers), in bytes (431 beyond).
    #[arg(long, env = "HTTP_MAX_HEADER_BYTES", default_value_t = 32_768)]
    pub http_max_header_bytes: usize,

    /// Largest resource a partner may send (write-back, Subscription), in bytes (413 beyond).
    #[arg(long, env = "REQUEST_BODY_MAX_BYTES", default_value_t = 65_536)]
    pub request_body_max_bytes: usize,

    /// Requests per second one client address may make without a valid token (refused
    /// attempts, and every token request), sustained: checked before authentication.
    #[arg(long, env = "ADDRESS_RATE_LIMIT_PER_SECOND", default_value_t = 20.0)]
    pub address_rate_limit_per_second: f64,

    /// Such requests one address may make at once.
    #[arg(long, env = "ADDRESS_RATE_LIMIT_BURST", default_value_t = 100)]
    pub address_rate_limit_burst: u32,

    /// Subscriptions one partner may hold (other than `off`).
    #[arg(long, env = "SUBSCRIPTION_MAX_PER_PARTNER", default_value_t = 100)]
    pub subscription_max_per_partner: i64,

    /// The shortest heartbeat period a Subscription may ask for, in seconds.
    #[arg(long, env = "SUBSCRIPTION_MIN_HEARTBEAT_SECS", default_value_t = 10)]
    pub subscription_min_heartbeat_secs: i64,

    /// Networks (CIDR, comma-separated) rest-hook endpoints may be in although they are not
    /// public: loopback, private, link-local and unique-local addresses are refused otherwise.
    /// For local tests and demos only.
    #[arg(long, env = "SUBSCRIPTION_ALLOWED_NETWORKS", value_delimiter = ',')]
    pub subscription_allowed_networks: Vec<String>,

    /// The API needs only the pepper (partners send tokens, not identities).
    #[command(flatten)]
    pub pmm1: platform::Pmm1Config,
}

impl Config {
    pub fn server_limits(&self) -> crate::server::ServerLimits {
        crate::server::ServerLimits {
            header_timeout: std::time::Duration::from_millis(self.http_header_timeout_ms),
            max_header_bytes: self.http_max_header_bytes,
            max_connections: self.http_max_connections,
            max_connections_per_address: self.http_max_connections_per_address,
            max_requests_per_connection: self.http_max_requests_per_connection,
        }
    }

    /// The limits a client meets, in words (the CapabilityStatement's `rest.documentation`).
    pub fn limits_text(&self) -> String {
        format!(
            "write-back and Subscription bodies at most {} bytes, token and $hashed-match bodies at most {} (413 beyond); strings in a written resource at most {} characters, {} entries per element, {} levels deep (422); a member's medication profile at most {} bytes (a write that would exceed it: 422, business-rule); headers within {} ms and at most {} bytes, a body within {} ms, a request within {} ms (408); {} subscriptions per partner, heartbeats of {} s or more.",
            self.request_body_max_bytes,
            crate::limits::SMALL_BODY_BYTES,
            fhir::writeback::MAX_STRING_CHARS,
            fhir::writeback::MAX_ARRAY_ITEMS,
            fhir::writeback::MAX_DEPTH,
            self.common.composite_max_bytes,
            self.http_header_timeout_ms,
            self.http_max_header_bytes,
            self.http_body_timeout_ms,
            self.http_request_timeout_ms,
            self.subscription_max_per_partner,
            self.subscription_min_heartbeat_secs,
        )
    }

    pub fn request_limits(&self) -> crate::limits::RequestLimits {
        crate::limits::RequestLimits {
            resource_body_bytes: self.request_body_max_bytes,
            body_timeout: std::time::Duration::from_millis(self.http_body_timeout_ms),
            request_timeout: std::time::Duration::from_millis(self.http_request_timeout_ms),
        }
    }

    pub fn token_url(&self) -> String {
        match &self.auth_token_url {
            Some(url) => url.clone(),
            None => {
                let base = self.common.fhir_base_url.trim_end_matches('/');
                format!("{}{}", base.strip_suffix("/fhir").unwrap_or(base), crate::routes::TOKEN)
            }
        }
    }
}
