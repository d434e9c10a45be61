//! The one place tracing is set up. Components log member ids at most: never names, birth
//! dates, addresses, phones, tokens or keys (those never reach a log macro). The end-to-end
//! suite checks this by scanning everything logged during its run (`LOG_FILE`).

use crate::config::LogFormat;
use std::path::Path;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, fmt};

/// Installs the global subscriber, writing to stderr. Safe to call more than once (later calls
/// are ignored), so tests that start several components in one process can all call it.
pub fn init(level: &str, format: LogFormat) {
    init_to(level, format, None);
}

/// As `init`, and also appends JSON lines to `file` with its own filter.
pub fn init_to(level: &str, format: LogFormat, file: Option<(&Path, &str)>) {
    let filter = |level: &str| EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal;
    let stderr = match format {
        LogFormat::Json => fmt::layer().json().flatten_event(true).with_writer(std::io::stderr).boxed(),
        LogFormat::Text => fmt::layer().with_ansi(std::io::stderr().is_terminal()).with_writer(std::io::stderr).boxed(),
    }
    .with_filter(filter(level));
    let file = file.and_then(|(path, level)| {
        let f = std::fs::OpenOptions::new().create(true).append(true).open(path).ok()?;
        Some(fmt::layer().json().flatten_event(true).with_writer(std::sync::Mutex::new(f)).with_filter(filter(level)))
    });
    let _ = tracing_subscriber::registry().with(stderr).with(file).try_init();
}
