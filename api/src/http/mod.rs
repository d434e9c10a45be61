//! One module per resource or concern.

pub mod health;
