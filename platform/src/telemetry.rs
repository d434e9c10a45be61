//! The one place tracing is set up. Components log member ids at most: never names, birth
//! dates, addresses, phones, tokens or keys (those never reach a log macro).

use crate::config::LogFormat;
use tracing_subscriber::EnvFilter;

/// Installs the global subscriber, writing to stderr. Safe to call more than once (later calls
/// are ignored), so tests that start several components in one process can all call it.
pub fn init(level: &str, format: LogFormat) {
    let filter = EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}
