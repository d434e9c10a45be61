//! The end-to-end suite: one binary, a module per capability. Each test starts its own
//! [`tests::TestApp`] (database, topic namespace, components) on the real PostgreSQL and Kafka
//! that `scripts/services up` runs, and drives it through the front door: events on the `sor.*`
//! topics, the REST API, the published topics.
//!
//! `scripts/test` runs the `#[ignore]`d ones on their own: `services` and `relay_crash` stop
//! shared services, and `log_scan` reads the logs the rest of the suite wrote.

mod clients;
mod cluster;
mod cluster_faults;
mod composer_crash;
mod composition;
mod foundation;
mod hostile;
mod insights;
mod log_scan;
mod matching;
mod observability;
mod operations;
mod partner_guide;
mod partners;
mod readiness;
mod relay_crash;
mod relay_topics;
mod rest_api;
mod services;
mod subscriptions;
mod writeback;
