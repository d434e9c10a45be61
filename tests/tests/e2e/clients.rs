//! Issue 4: software not written here, against the running API over real data —
//! schemathesis (every response is described by the served OpenAPI document, no 5xx), the
//! Python and TypeScript clients generated from `openapi/openapi.json`, and the Python
//! `fhirclient` FHIR library. `scripts/test` installs the tools and generates the clients.

use devtools::generator::{self, GeneratorConfig};
use std::process::Command;
use tests::*;

fn run(what: &str, command: &mut Command) -> anyhow::Result<()> {
    let out = command.output().map_err(|e| anyhow::anyhow!("{what}: cannot start ({e}); run the tests with scripts/test"))?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let keep = if out.status.success() { 40 } else { 200 };
    let tail: Vec<&str> = text.lines().rev().take(keep).collect();
    println!("== {what}\n{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
    anyhow::ensure!(out.status.success(), "{what} failed");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_not_written_here_work_against_the_api() -> anyhow::Result<()> {
    let app = TestApp::new("clients").await?;
    let composer = app.composer(&[]).await?;
    app.apply(&generator::generate(&GeneratorConfig { members: 25, seed: 3, malformed: 2, ..GeneratorConfig::default() })).await?;
    composer.stop().await?;

    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let origin = format!("http://127.0.0.1:{port}");
    // With a PMM1 pepper, as a deployment that serves $hashed-match has.
    let pepper = "ab".repeat(32);
    let (bind, fhir_base) = (format!("127.0.0.1:{port}"), format!("{origin}/fhir"));
    let base = app.api(&["--http-bind", &bind, "--fhir-base-url", &fhir_base, "--pmm1-pepper", &pepper]).await?;
    assert_eq!(base, origin);
    // The generated data attributes members to partner-1..3; the clients act as partner-1.
    let mut member = None;
    for c in db::composites::all_composites(&app.pool).await?.into_iter().filter(|c| !c.deleted) {
        let viewer = db::resources::Viewer { partner_id: "partner-1", on: time::OffsetDateTime::now_utc().date() };
        if db::resources::is_attributed(&app.pool, viewer, &c.member_id).await? {
            member = Some(c.member_id);
            break;
        }
    }
    let member = member.ok_or_else(|| anyhow::anyhow!("no live composite attributed to partner-1"))?;
    // schemathesis sends many requests at once: this partner's limit is well above them. Its
    // private key is on disk for the OAuth library and the Java client, which sign their own.
    let state = state_dir();
    let key_file = state.join(unique("client-keys")).join("partner-1.pem");
    let key = rsa_key_file("partner-1-key", &key_file)?;
    let scopes = "system/*.read system/MedicationStatement.write system/Subscription.write";
    let partner = register_partner_with_key(&app.pool, "partner-1", scopes, key, Some((10_000.0, 10_000))).await?;
    let token = partner.token(&origin).await?;
    let client_env =
        [("FHIR_ORIGIN", origin.as_str()), ("FHIR_MEMBER", member.as_str()), ("FHIR_CLIENT_ID", "partner-1"), ("FHIR_CLIENT_KID", "partner-1-key")];

    let venv = state.join("venv/bin");
    let here = repo_path("tests");
    run(
        "schemathesis (all checks)",
        Command::new(venv.join("schemathesis"))
            .arg("--config-file")
            .arg(here.join("clients/schemathesis.toml"))
            .args(["run", &format!("{origin}/openapi.json"), "--checks", "all", "--max-examples", "25"])
            .args(["--header", &format!("Authorization: Bearer {token}")])
            .current_dir(&state),
    )?;
    run(
        "pytest: generated Python client and fhirclient",
        Command::new(venv.join("python"))
            .args(["-m", "pytest", "-q", "-p", "no:cacheprovider"])
            .arg(here.join("clients/python/test_clients.py"))
            .envs(client_env)
            .env("FHIR_CLIENT_KEY", &key_file)
            .env("FHIR_TOKEN", &token)
            .env("GENERATED_PYTHON_CLIENT", state.join("clients/python")),
    )?;
    run(
        "node: generated TypeScript client",
        Command::new("npm")
            .args(["test", "--silent"])
            .current_dir(here.join("clients/ts"))
            .env("FHIR_ORIGIN", &origin)
            .env("FHIR_MEMBER", &member)
            .env("FHIR_TOKEN", &token),
    )?;
    // scripts/test compiled it and wrote its Maven classpath (HAPI FHIR, nimbus-jose-jwt).
    let classpath = std::fs::read_to_string(state.join("java/classpath"))
        .map_err(|e| anyhow::anyhow!("no Java classpath ({e}); run the tests with scripts/test"))?;
    let classes = here.join("clients/java/target/classes");
    run(
        "java: HAPI FHIR generic client and validator",
        Command::new("java")
            .arg("-cp")
            .arg(format!("{}:{}", classes.display(), classpath.trim()))
            .arg("platform.PartnerClient")
            .envs(client_env)
            .env("FHIR_CLIENT_KEY", &key_file),
    )?;
    std::fs::remove_dir_all(key_file.parent().unwrap_or(&state))?;
    Ok(())
}
