//! What every component of the platform shares: configuration read once from the environment,
//! the one place tracing is set up, topic names and the one place Kafka clients and topics are
//! configured, where the platform may connect for partners, stopping on a signal, instants as
//! written, and the domain types that carry meaning past the edges (`MemberId`,
//! `RecordVersion`, …). Nothing here knows FHIR or PostgreSQL.

pub mod config;
pub mod domain;
pub mod egress;
pub mod kafka;
pub mod ops;
pub mod shutdown;
pub mod telemetry;
pub mod time;
pub mod topics;
pub mod trace;

pub use config::{CommonConfig, KafkaConfig, LogFormat, Pmm1Config, Secret};
pub use domain::{MemberId, PartnerId, RecordId, RecordVersion, SourceName};
