//! The platform's logs during a test run: to the test's output, and (under `scripts/test`) to
//! files that the PHI scan reads at the end; and the secrets that scan must not find.

use uuid::Uuid;

/// Where `scripts/test` collects everything the platform logs during the run (for the PHI scan).
pub fn test_log_dir() -> Option<std::path::PathBuf> {
    std::env::var_os("PLATFORM_TEST_LOG_DIR").map(std::path::PathBuf::from)
}

/// The filter for logs collected in [`test_log_dir`]: more than an operator's default.
pub const COLLECTED_LOG_LEVEL: &str =
    "info,api=debug,composer=debug,relay=debug,notifier=debug,fhir=debug,db=debug,platform=debug,fhirctl=debug,partners=debug,match_index=debug";

/// A log file in [`test_log_dir`] for one process.
pub fn collected_log_file(label: &str) -> Option<std::path::PathBuf> {
    let dir = test_log_dir()?;
    std::fs::create_dir_all(&dir).ok()?;
    Some(dir.join(format!("{label}-{}-{}.jsonl", std::process::id(), &Uuid::new_v4().simple().to_string()[..8])))
}

/// Logs of in-process components go to the test's output (`TEST_LOG` sets the filter) and,
/// under `scripts/test`, to a collected log file.
pub fn init_logs() {
    let level = std::env::var("TEST_LOG").unwrap_or_else(|_| "warn".to_owned());
    let exe = std::env::current_exe().ok().and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned())).unwrap_or_default();
    let file = collected_log_file(&exe);
    platform::telemetry::init_to(&level, platform::LogFormat::Text, file.as_deref().map(|f| (f, COLLECTED_LOG_LEVEL)));
}

/// Sends a child process's logs, in full, to the collection the PHI scan reads (under
/// `scripts/test`; otherwise the command is left as it is).
pub fn collect_logs(command: &mut std::process::Command, label: &str) {
    if let Some(file) = collected_log_file(label) {
        command.env("LOG_FILE", file).env("LOG_LEVEL", COLLECTED_LOG_LEVEL).stderr(std::process::Stdio::null());
    }
}

/// Remembers a secret the suite handled (a bearer token, a client assertion), so that the log
/// scan can prove the platform never logged it.
pub fn remember_secret(secret: &str) {
    if let Some(dir) = test_log_dir() {
        use std::io::Write;
        let _ = std::fs::create_dir_all(&dir);
        if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("secrets.txt")) {
            let _ = writeln!(f, "{secret}");
        }
    }
}

/// A JSON log file for a child process a test reads the logs of: in the collection the PHI
/// scan reads (under `scripts/test`), else in the state directory. Give it as `LOG_FILE`, with
/// `LOG_LEVEL` [`COLLECTED_LOG_LEVEL`].
pub fn log_file(label: &str) -> std::path::PathBuf {
    collected_log_file(label).unwrap_or_else(|| {
        let dir = crate::env::state_dir().join("test-logs-local");
        let _ = std::fs::create_dir_all(&dir);
        dir.join(format!("{}.jsonl", crate::env::unique(label)))
    })
}
