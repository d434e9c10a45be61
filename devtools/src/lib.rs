//! Tools for developers and benchmarks, never deployed: the synthetic data generator (the
//! `generate` command, the demo's data and the tests' streams) and the benchmark programs
//! (`bench`, `freshness`, `match-bench`, run by `scripts/bench`). Nothing in the platform's
//! components depends on this crate.

pub mod cpu;
pub mod generator;
pub mod stats;
