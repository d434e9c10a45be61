//! Configuration from environment variables (or flags), with defaults that match
//! `scripts/services`. Each binary flattens these into its own clap struct and parses once.

use clap::{Args, ValueEnum};

/// Settings every component needs.
#[derive(Debug, Clone, Args)]
pub struct CommonConfig {
    /// PostgreSQL connection URL. The default is the local database over loopback, where TLS
    /// protects nothing and halved the composer's throughput; use `sslmode=require` (or
    /// `verify-full`) for a database on another host.
    #[arg(long, env = "DATABASE_URL", default_value = "postgres://fhir:fhir@127.0.0.1:5432/fhir?sslmode=disable")]
    pub database_url: String,

    /// Maximum connections in the PostgreSQL pool.
    #[arg(long, env = "DATABASE_MAX_CONNECTIONS", default_value_t = 16)]
    pub database_max_connections: u32,

    #[command(flatten)]
    pub kafka: KafkaConfig,

    /// Public base URL of the FHIR API (`fullUrl`s and paging links point there).
    #[arg(long, env = "FHIR_BASE_URL", default_value = "http://127.0.0.1:8080/fhir")]
    pub fhir_base_url: String,

    /// Log filter in `tracing` syntax (e.g. `info`, `composer=debug,info`).
    #[arg(long, env = "LOG_LEVEL", default_value = "info")]
    pub log_level: String,

    /// Log line format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Also append the logs, as JSON lines, to this file.
    #[arg(long, env = "LOG_FILE")]
    pub log_file: Option<std::path::PathBuf>,
}

impl CommonConfig {
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
}

impl KafkaConfig {
    /// The full name of a contract topic in this deployment's namespace.
    pub fn topic(&self, name: &str) -> String {
        format!("{}{}", self.topic_prefix, name)
    }

    /// The contract name of a full topic name, if it belongs to this namespace.
    pub fn contract_name<'a>(&self, topic: &'a str) -> Option<&'a str> {
        topic.strip_prefix(self.topic_prefix.as_str())
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
        let kafka = KafkaConfig { bootstrap_servers: String::new(), topic_prefix: "t1.".into() };
        assert_eq!(kafka.topic("sor.dlq.v1"), "t1.sor.dlq.v1");
        assert_eq!(kafka.contract_name("t1.sor.dlq.v1"), Some("sor.dlq.v1"));
        assert_eq!(kafka.contract_name("sor.dlq.v1"), None);
    }
}
