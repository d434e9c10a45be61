//! One module per resource or concern.

pub mod audit_events;
pub mod health;
pub mod matching;
pub mod metadata;
pub mod profile;
pub mod resources;
pub mod subscriptions;
pub mod writeback;
