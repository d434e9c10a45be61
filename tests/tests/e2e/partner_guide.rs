//! Issue 30: the partner guide cannot rot. Every `sh` and `python` block of `docs/partners.md`
//! runs in order (`tests/clients/python/run_guide.py`) against a platform of its own, as partner
//! `clinic-7` with member `M0000001`; then the platform is asked what the guide should have done.

use serde_json::json;
use std::path::PathBuf;
use std::process::Command;
use tests::*;

const MASTER: &str = "6d617374657273656372657473656372657473656372657473656372657473aa";
const PEPPER: &str = "7065707065727065707065727065707065727065707065727065707065727065";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_of_the_partner_guide_runs() -> anyhow::Result<()> {
    let app = TestApp::new("guide").await?;
    let composer = app.composer(&["--pmm1-master-secret", MASTER, "--pmm1-pepper", PEPPER, "--pmm1-key-ids", "demo"]).await?;
    // The guide's member: attributed to clinic-7, with the identity its match step tokenizes and
    // the medication its write-back reports on.
    app.apply(&[
        attribution("M0000001", "clinic-7"),
        demographics(
            "M0000001",
            json!({ "given_name": "José", "family_name": "García-López Jr.", "birth_date": "1985-03-07", "sex": "male",
                    "address_line": "123 North Main Street, Apt 4B", "postal_code": "02139-4307", "phone": "(617) 555-0123" }),
        ),
        medication("M0000001", "RX-M0000001-1", 1, "197361", "active"),
    ])
    .await?;
    let notifier = app.notifier(&["--allowed-networks", "127.0.0.0/8"]).await?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let origin = format!("http://127.0.0.1:{port}");
    let (bind, fhir_base) = (format!("127.0.0.1:{port}"), format!("{origin}/fhir"));
    let flags = ["--http-bind", &bind, "--fhir-base-url", &fhir_base, "--pmm1-pepper", PEPPER];
    let base = app.api(&[&flags[..], &["--subscription-allow-http", "--subscription-allowed-networks", "127.0.0.0/8"]].concat()).await?;
    assert_eq!(base, origin);

    let state = state_dir();
    let workdir = state.join(unique("guide"));
    let bin = workspace_binary("partners")?.parent().map(PathBuf::from).unwrap_or_default();
    let out = Command::new(state.join("venv/bin/python"))
        .arg(repo_path("tests/clients/python/run_guide.py"))
        .arg(repo_path("docs/partners.md"))
        .arg(&workdir)
        .env("GUIDE_ORIGIN", &origin)
        .env("GUIDE_KAFKA", kafka_bootstrap())
        .env("GUIDE_TOPIC_PREFIX", &app.prefix)
        .env("GUIDE_BIN", &bin)
        .env("GUIDE_REPO", repo_path(""))
        // What the operator's commands and the demo token need: this platform, not the shared one.
        .env("DATABASE_URL", &app.url)
        .env("FHIR_BASE_URL", &fhir_base)
        .env("PMM1_MASTER_SECRET", MASTER)
        .env("PLATFORM_STATE_DIR", &workdir)
        .env("LOG_LEVEL", "warn")
        .output()
        .map_err(|e| anyhow::anyhow!("cannot start the guide's runner ({e}); run the tests with scripts/test"))?;
    println!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    anyhow::ensure!(out.status.success(), "a command of docs/partners.md failed (above)");

    // What the guide did, seen from the platform.
    let written: i64 =
        sqlx::query_scalar("SELECT count(*) FROM components WHERE kind = 'medication' AND source = 'partner:clinic-7'").fetch_one(&app.pool).await?;
    assert_eq!(written, 1, "three conditional creates (two in the shell, one in Python) made one MedicationStatement");
    let active: i64 =
        sqlx::query_scalar("SELECT count(*) FROM subscriptions WHERE partner_id = 'clinic-7' AND status = 'active'").fetch_one(&app.pool).await?;
    assert_eq!(active, 4, "two rest-hook and two Kafka subscriptions, all active");
    let auditor = register_partner(&app.pool, "guide-auditor", "system/AuditEvent.read", KeyKind::Es384, None).await?;
    let audit = get(
        &bearer_client(&auditor.token_with(&origin, "system/AuditEvent.read").await?)?,
        &format!("{fhir_base}/AuditEvent?agent=clinic-7&patient=Patient/M0000001&subtype=operation"),
    )
    .await?;
    assert!(audit.body["total"].as_i64().unwrap_or_default() >= 2, "clinic-7's profile reads are on the audit trail: {}", audit.body["total"]);
    std::fs::remove_dir_all(&workdir)?;
    notifier.stop().await?;
    composer.stop().await?;
    Ok(())
}
