//! Configuration from environment variables (or flags), with defaults that match
//! `scripts/services`. Each binary flattens these into its own clap struct and parses once.

use clap::{Args, ValueEnum};

/// Settings every component needs.
#[derive(Debug, Clone, Args)]
pub struct CommonConfig {
    /// PostgreSQL connection URL. The default is the local database over loopback, where TLS
    /// protects nothing (and costs throughput: docs/benchmarks.md); use `sslmode=verify-full`
    /// for a database on another host.
    #[arg(long, env = "DATABASE_URL", default_value = "postgres://fhir:fhir@127.0.0.1:5432/fhir?sslmode=disable")]
    pub database_url: String,

    /// Maximum connections in the PostgreSQL pool.
    #[arg(long, env = "DATABASE_MAX_CONNECTIONS", default_value_t = 16)]
    pub database_max_connections: u32,

    /// Longest a statement may run, in milliseconds, before PostgreSQL cancels it (0: no limit).
    #[arg(long, env = "DATABASE_STATEMENT_TIMEOUT_MS", default_value_t = 30_000)]
    pub database_statement_timeout_ms: u64,

    #[command(flatten)]
    pub kafka: KafkaConfig,

    /// Public base URL of the FHIR API (`fullUrl`s and paging links point there).
    #[arg(long, env = "FHIR_BASE_URL", default_value = "http://127.0.0.1:8080/fhir")]
    pub fhir_base_url: String,

    /// The largest composite (a member's medication profile, as JSON) the platform keeps, in
    /// bytes: a change that would make one larger is dead-lettered (from a system of record) or
    /// refused (a partner's write-back). Must leave room for headers under
    /// KAFKA_MESSAGE_MAX_BYTES.
    #[arg(long, env = "COMPOSITE_MAX_BYTES", default_value_t = 524_288)]
    pub composite_max_bytes: usize,

    #[command(flatten)]
    pub insights: InsightsConfig,

    /// Log filter in `tracing` syntax (e.g. `info`, `composer=debug,info`).
    #[arg(long, env = "LOG_LEVEL", default_value = "info")]
    pub log_level: String,

    /// Log line format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Also append the logs, as JSON lines, to this file.
    #[arg(long, env = "LOG_FILE")]
    pub log_file: Option<std::path::PathBuf>,

    /// Address of this component's operations listener (`/health`, `/ready`, `/metrics`).
    /// Defaults to loopback on the component's own port: composer 9461, relay 9462, notifier
    /// 9463, api 9464 (docs/operations.md). Port 0 picks a free one.
    #[arg(long, env = "OPS_ADDR")]
    pub ops_addr: Option<std::net::SocketAddr>,

    /// How long `/ready` waits for each dependency, in milliseconds.
    #[arg(long, env = "READY_TIMEOUT_MS", default_value_t = 2000)]
    pub ready_timeout_ms: u64,
}

/// Insights: DetectedIssues derived from each medication profile (docs/insights.md).
#[derive(Debug, Clone, Args)]
pub struct InsightsConfig {
    /// Derive insights (interactions, duplicate therapy, allergy conflicts, refill gaps).
    #[arg(long = "insights", env = "INSIGHTS", default_value_t = true, action = clap::ArgAction::Set)]
    pub enabled: bool,

    /// A knowledge base file to use instead of the one built in (knowledge/medication-insights.json
    /// at build time); validated against schemas/json/knowledge-base.schema.json at start.
    #[arg(long = "insights-knowledge-base", env = "INSIGHTS_KNOWLEDGE_BASE")]
    pub knowledge_base: Option<std::path::PathBuf>,

    /// Days after a maintenance drug's supply runs out before a missing refill is an insight.
    #[arg(long, env = "REFILL_GRACE_DAYS", default_value_t = 7)]
    pub refill_grace_days: u16,

    /// How often the composer looks for members whose refill gaps opened by the passing of time.
    #[arg(long = "insights-recheck-secs", env = "INSIGHTS_RECHECK_SECS", default_value_t = 300)]
    pub recheck_secs: u64,

    /// Days added to today's date when refill gaps are evaluated: tests move time with it.
    #[arg(long = "insights-clock-skew-days", env = "INSIGHTS_CLOCK_SKEW_DAYS", default_value_t = 0, hide = true)]
    pub clock_skew_days: i64,
}

/// Default ports of the operations listeners, on loopback.
pub mod ops_port {
    pub const COMPOSER: u16 = 9461;
    pub const RELAY: u16 = 9462;
    pub const NOTIFIER: u16 = 9463;
    pub const API: u16 = 9464;
}

/// Room a published record needs beyond its composite: key and headers.
pub const RECORD_OVERHEAD_BYTES: usize = 16 * 1024;

impl CommonConfig {
    /// Where this component's operations listener binds (`default_port`: its [`ops_port`]).
    pub fn ops_addr(&self, default_port: u16) -> std::net::SocketAddr {
        self.ops_addr.unwrap_or(std::net::SocketAddr::from(([127, 0, 0, 1], default_port)))
    }

    /// A fresh [`crate::ops::Ops`] with this component's readiness timeout.
    pub fn ops(&self) -> crate::ops::Ops {
        crate::ops::Ops::new(std::time::Duration::from_millis(self.ready_timeout_ms))
    }

    pub fn statement_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.database_statement_timeout_ms)
    }

    /// Refuses limits that cannot hold together: a composite the platform keeps must fit in a
    /// record it can publish.
    pub fn check_limits(&self) -> Result<(), String> {
        let room = self.kafka.message_max_bytes.saturating_sub(RECORD_OVERHEAD_BYTES);
        if self.composite_max_bytes > room {
            return Err(format!(
                "COMPOSITE_MAX_BYTES ({}) must be at most KAFKA_MESSAGE_MAX_BYTES ({}) minus {RECORD_OVERHEAD_BYTES} for headers",
                self.composite_max_bytes, self.kafka.message_max_bytes
            ));
        }
        Ok(())
    }

    /// Sets up logging as configured (stderr, and `LOG_FILE` when given).
    pub fn init_logs(&self) {
        crate::telemetry::init_to(&self.log_level, self.log_format, self.log_file.as_deref().map(|p| (p, self.log_level.as_str())));
    }
}

/// How to reach Kafka, and which topic namespace to use.
#[derive(Debug, Clone, Args)]
pub struct KafkaConfig {
    /// Kafka bootstrap servers.
    #[arg(long = "kafka-bootstrap-servers", env = "KAFKA_BOOTSTRAP_SERVERS", default_value = "127.0.0.1:9092")]
    pub bootstrap_servers: String,

    /// Prefix for every topic name. Empty in production, where the topic names are the
    /// contract; tests set it so that runs on one broker never see each other's messages.
    #[arg(long = "kafka-topic-prefix", env = "KAFKA_TOPIC_PREFIX", default_value = "")]
    pub topic_prefix: String,

    /// The largest record (key, value and headers) the platform produces, in bytes: every
    /// producer's `message.max.bytes`, and (plus batch framing) the `max.message.bytes` of the
    /// topics the platform creates.
    #[arg(long = "kafka-message-max-bytes", env = "KAFKA_MESSAGE_MAX_BYTES", default_value_t = 1_048_576)]
    pub message_max_bytes: usize,

    /// Partitions of the topics the platform creates (those that exist are left as they are).
    #[arg(long = "kafka-topic-partitions", env = "KAFKA_TOPIC_PARTITIONS", default_value_t = 3)]
    pub topic_partitions: i32,

    /// Replicas of each partition of the topics the platform creates (1 for a single broker).
    #[arg(long = "kafka-replication-factor", env = "KAFKA_REPLICATION_FACTOR", default_value_t = 1)]
    pub replication_factor: i32,

    /// `min.insync.replicas` of the topics the platform creates (unset: the broker's default).
    #[arg(long = "kafka-topic-min-insync-replicas", env = "KAFKA_TOPIC_MIN_INSYNC_REPLICAS")]
    pub topic_min_insync_replicas: Option<i32>,

    /// A file of librdkafka properties (`name=value` lines, `#` comments) for every Kafka client
    /// of the process, e.g. `security.protocol`, `sasl.*`, `ssl.*`. `KAFKA_CLIENT_<NAME>`
    /// variables (`KAFKA_CLIENT_SASL_USERNAME`; `…_FILE` to read a secret) add to it and win.
    #[arg(long = "kafka-properties-file", env = "KAFKA_PROPERTIES_FILE")]
    pub properties_file: Option<std::path::PathBuf>,
}

impl KafkaConfig {
    /// `max.message.bytes` of the topics the platform creates: a record of
    /// `message_max_bytes` with its batch's framing.
    pub fn topic_max_message_bytes(&self) -> usize {
        self.message_max_bytes + 1024
    }

    /// The full name of a contract topic in this deployment's namespace.
    pub fn topic(&self, name: &str) -> String {
        format!("{}{}", self.topic_prefix, name)
    }

    /// The contract name of a full topic name, if it belongs to this namespace.
    pub fn contract_name<'a>(&self, topic: &'a str) -> Option<&'a str> {
        topic.strip_prefix(self.topic_prefix.as_str())
    }
}

/// PMM1 secrets (../shared/identity/PMM1.md): the master secret partner keys derive from and
/// the pepper of stored values. Each comes from a file (preferred: not in the environment of
/// every process) or from hex in the environment. Never printed, logged or stored.
#[derive(Debug, Clone, Args)]
pub struct Pmm1Config {
    /// File holding the PMM1 master secret as hex (at least 32 bytes).
    #[arg(long, env = "PMM1_MASTER_SECRET_FILE")]
    pub pmm1_master_secret_file: Option<std::path::PathBuf>,

    /// The PMM1 master secret as hex (prefer the file).
    #[arg(long, env = "PMM1_MASTER_SECRET", hide_env_values = true)]
    pub pmm1_master_secret: Option<Secret>,

    /// File holding the PMM1 pepper as hex (at least 32 bytes).
    #[arg(long, env = "PMM1_PEPPER_FILE")]
    pub pmm1_pepper_file: Option<std::path::PathBuf>,

    /// The PMM1 pepper as hex (prefer the file).
    #[arg(long, env = "PMM1_PEPPER", hide_env_values = true)]
    pub pmm1_pepper: Option<Secret>,

    /// Key ids the match index is kept for (comma-separated).
    #[arg(long, env = "PMM1_KEY_IDS", value_delimiter = ',')]
    pub pmm1_key_ids: Vec<String>,
}

/// Secret bytes, given as hex; `Debug` never shows them.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl Secret {
    pub fn bytes(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(…)")
    }
}

impl std::str::FromStr for Secret {
    type Err = String;
    fn from_str(hex: &str) -> Result<Self, String> {
        let hex = hex.trim();
        if !hex.len().is_multiple_of(2) || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err("a secret is given as hex digits".into());
        }
        let bytes: Vec<u8> = (0..hex.len()).step_by(2).filter_map(|i| u8::from_str_radix(&hex[i..i + 2], 16).ok()).collect();
        if bytes.len() < 32 {
            return Err("a secret must be at least 32 bytes (64 hex digits)".into());
        }
        Ok(Secret(bytes))
    }
}

impl Pmm1Config {
    fn one(file: &Option<std::path::PathBuf>, value: &Option<Secret>, what: &str) -> Result<Option<Secret>, String> {
        match (file, value) {
            (Some(path), _) => {
                let text = std::fs::read_to_string(path).map_err(|e| format!("{what} file {}: {e}", path.display()))?;
                text.parse().map(Some).map_err(|e| format!("{what} file {}: {e}", path.display()))
            }
            (None, v) => Ok(v.clone()),
        }
    }

    /// The master secret, if configured.
    pub fn master(&self) -> Result<Option<Secret>, String> {
        Self::one(&self.pmm1_master_secret_file, &self.pmm1_master_secret, "PMM1 master secret")
    }

    /// The pepper, if configured.
    pub fn pepper(&self) -> Result<Option<Secret>, String> {
        Self::one(&self.pmm1_pepper_file, &self.pmm1_pepper, "PMM1 pepper")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        common: CommonConfig,
    }

    #[test]
    fn defaults_match_the_services_script() {
        let cli = Cli::try_parse_from(["x"]).unwrap();
        assert_eq!(cli.common.database_url, "postgres://fhir:fhir@127.0.0.1:5432/fhir?sslmode=disable");
        assert_eq!(cli.common.kafka.bootstrap_servers, "127.0.0.1:9092");
        assert_eq!(cli.common.kafka.topic("sor.dlq.v1"), "sor.dlq.v1");
    }

    #[test]
    fn prefix_namespaces_topics_both_ways() {
        let kafka = KafkaConfig {
            bootstrap_servers: String::new(),
            topic_prefix: "t1.".into(),
            message_max_bytes: 1_048_576,
            topic_partitions: 3,
            replication_factor: 1,
            topic_min_insync_replicas: None,
            properties_file: None,
        };
        assert_eq!(kafka.topic("sor.dlq.v1"), "t1.sor.dlq.v1");
        assert_eq!(kafka.contract_name("t1.sor.dlq.v1"), Some("sor.dlq.v1"));
        assert_eq!(kafka.contract_name("sor.dlq.v1"), None);
    }
}
