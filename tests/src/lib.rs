//! The harness of the end-to-end tests (`tests/tests/e2e`): every test gets its own
//! [`TestApp`] — a fresh PostgreSQL database and Kafka topic namespace on the real services
//! started by `scripts/services up` — and starts the components it needs on it, each one way
//! (in [`components`]), with partners and their tokens ([`partners`]), events as the systems of
//! record send them ([`events`]), and one [`Reply`] type for the API's answers ([`http`]).
//!
//! It must not replace a service with a stand-in: everything runs against the real broker and
//! database.

pub mod app;
pub mod cluster;
pub mod components;
pub mod env;
pub mod events;
pub mod http;
pub mod invariants;
pub mod logs;
pub mod partners;
pub mod topics;
pub mod wait;

pub use app::TestApp;
pub use components::{
    Children, Composer, FHIR_BASE_URL, Task, api_topic_prefix, spawn_child, start_api, start_api_lazily, start_composer, start_notifier, start_relay,
};
pub use env::{
    admin_client, create_topic, database_url, free_address, fresh_database, kafka_bootstrap, kafka_config, repo_path, state_dir, unique,
    workspace_binary,
};
pub use events::{attribution, deletion, demographics, medication, native_event, upsert};
pub use http::{Reply, get, post_fhir, send};
pub use invariants::{check_composite_invariants, check_insight_invariants, content};
pub use logs::{COLLECTED_LOG_LEVEL, collect_logs, init_logs, log_file, remember_secret, test_log_dir};
pub use partners::{KeyKind, TestPartner, bearer_client, kafka_subscription, register_partner, register_partner_with_key, rsa_key_file};
pub use topics::{ReadRecord, read_topic};
pub use wait::{applied_messages, eventually, step, wait_applied, wait_relayed};
