use clap::Parser;

/// The composer's configuration, read once from the environment (or flags).
#[derive(Debug, Clone, Parser)]
#[command(name = "composer", about = "Consume the systems-of-record topics and compose FHIR composites")]
pub struct ComposerConfig {
    #[command(flatten)]
    pub common: platform::CommonConfig,

    /// Kafka consumer group of the composer.
    #[arg(long, env = "COMPOSER_GROUP_ID", default_value = "fhir-composer")]
    pub group_id: String,

    /// Most messages applied in one PostgreSQL transaction. Batches only grow this large when
    /// the composer is behind (a bulk load, a backlog), where larger batches coalesce more
    /// versions of a record and more changes of a member into one write. Lowered at start when
    /// the appliers' member locks would not fit in half of PostgreSQL's lock table.
    #[arg(long, env = "COMPOSER_BATCH_SIZE", default_value_t = 10_000)]
    pub batch_size: usize,

    /// The least time between two batches of one applier while changes keep coming, in
    /// milliseconds: a change that finds its applier idle after a quiet spell that long is
    /// applied at once; changes right behind it wait for the rest of the window and go as one
    /// batch (a busy applier's next batch grows meanwhile). Each batch costs a transaction in
    /// every stage behind it, so this trades a few milliseconds for CPU (docs/benchmarks.md).
    #[arg(long, env = "COMPOSER_BATCH_WAIT_MS", default_value_t = 20)]
    pub batch_wait_ms: u64,

    /// Threads applying batches concurrently, each in its own transaction; partition `p` of
    /// every topic goes to applier `p % appliers`. More load a backlog faster, but make more,
    /// smaller transactions at a steady rate (docs/benchmarks.md).
    #[arg(long, env = "COMPOSER_APPLIERS", default_value_t = 1)]
    pub appliers: usize,

    /// The largest system-of-record message the composer reads, in bytes: a larger one is
    /// dead-lettered unread (its payload replaced by a reference when it does not fit the
    /// dead-letter topic). Records of the contract are a few kilobytes.
    #[arg(long, env = "COMPOSER_MAX_MESSAGE_BYTES", default_value_t = 262_144)]
    pub max_message_bytes: usize,

    /// The share of the traces the composer starts (for events sent without a `traceparent`)
    /// that are sampled: their steps are logged by every component (at debug level). An event
    /// sent with a sampled `traceparent` is always logged.
    #[arg(long, env = "TRACE_SAMPLE_RATIO", default_value_t = 0.01)]
    pub trace_sample_ratio: f64,

    #[command(flatten)]
    pub pmm1: platform::Pmm1Config,
}
