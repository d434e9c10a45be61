//! What every component of the platform shares: configuration read once from the environment,
//! the one place tracing is set up, topic names, and the domain types that carry meaning
//! past the edges (`MemberId`, `RecordVersion`, …).

pub mod config;
pub mod domain;
pub mod telemetry;
pub mod topics;

pub use config::{CommonConfig, KafkaConfig, LogFormat, Pmm1Config, Secret};
pub use domain::{MemberId, PartnerId, RecordId, RecordVersion, SourceName};
