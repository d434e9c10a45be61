//! Issue 5: after the whole end-to-end suite ran, nothing the platform logged holds a name,
//! birth date, address or phone of the data the suite generated, nor a token, client assertion
//! or key. `scripts/test` collects every component's logs (at debug level for the platform's
//! own crates) in PLATFORM_TEST_LOG_DIR and runs this test last.

use serde_json::Value;
use std::collections::BTreeSet;
use tests::*;

/// The identifying strings of a FHIR Patient: names, birth date, address lines, phone numbers.
fn identifiers(patient: &Value, out: &mut BTreeSet<String>) {
    let mut add = |v: &Value| {
        if let Some(s) = v.as_str().map(str::trim).filter(|s| s.chars().count() >= 3) {
            out.insert(s.to_owned());
        }
    };
    for name in patient["name"].as_array().into_iter().flatten() {
        name["given"].as_array().into_iter().flatten().for_each(&mut add);
        add(&name["family"]);
    }
    add(&patient["birthDate"]);
    for address in patient["address"].as_array().into_iter().flatten() {
        address["line"].as_array().into_iter().flatten().for_each(&mut add);
    }
    for telecom in patient["telecom"].as_array().into_iter().flatten() {
        add(&telecom["value"]);
    }
}

/// Whether `text` holds a JWT or JWS: `eyJ` (a base64url-encoded `{"`) and base64url text, a
/// dot, and more base64url text. A bare `eyJ` inside a random id (a fuzzer's path segment) is
/// not one.
fn has_jwt(text: &str) -> bool {
    let b64 = |c: u8| c.is_ascii_alphanumeric() || c == b'-' || c == b'_';
    text.match_indices("eyJ").any(|(at, _)| {
        let rest = &text.as_bytes()[at..];
        let header = rest.iter().take_while(|c| b64(**c)).count();
        let payload = rest.get(header + 1..).map_or(0, |p| p.iter().take_while(|c| b64(**c)).count());
        header >= 10 && rest.get(header) == Some(&b'.') && payload >= 10
    })
}

/// Occurrences of `needle` in `haystack` that stand as a whole word.
fn whole_word_hits(haystack: &str, needle: &str) -> usize {
    let word = |c: Option<char>| c.is_some_and(char::is_alphanumeric);
    haystack
        .match_indices(needle)
        .filter(|(at, _)| !word(haystack[..*at].chars().next_back()) && !word(haystack[at + needle.len()..].chars().next()))
        .count()
}

#[tokio::test]
#[ignore = "run by scripts/test after the whole suite, over the logs it collected"]
async fn nothing_the_platform_logged_holds_phi_or_secrets() -> anyhow::Result<()> {
    let dir = test_log_dir().ok_or_else(|| anyhow::anyhow!("PLATFORM_TEST_LOG_DIR is not set: run through scripts/test"))?;

    let mut logs = String::new();
    let mut files = 0;
    for entry in std::fs::read_dir(&dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "jsonl") {
            logs.push_str(&std::fs::read_to_string(&path)?);
            files += 1;
        }
    }
    // The scan means something only if the platform did log: requests, tokens, batches.
    for (what, marker) in [
        ("API requests", "\"target\":\"api::guard\""),
        ("issued tokens", "token issued"),
        ("composer batches", "\"target\":\"composer::consumer\""),
        ("dead letters", "dead letter"),
    ] {
        anyhow::ensure!(logs.contains(marker), "no {what} in the {files} collected log files: was the suite run first?");
    }

    // The identities in every test database of this run (scripts/test drops older ones).
    let admin = db::connect(&database_url(), 1).await?;
    let names: Vec<String> = sqlx::query_scalar("SELECT datname FROM pg_database WHERE datname LIKE 't\\_%'").fetch_all(&admin).await?;
    let mut phi = BTreeSet::new();
    for name in &names {
        let url = db::url_with_database(&database_url(), name)?;
        let Ok(pool) = db::connect(&url, 1).await else { continue };
        let bodies: Vec<String> = sqlx::query_scalar("SELECT body::text FROM resource_history WHERE resource_type = 'Patient' AND body IS NOT NULL")
            .fetch_all(&pool)
            .await
            .unwrap_or_default();
        for body in bodies {
            identifiers(&serde_json::from_str(&body)?, &mut phi);
        }
        pool.close().await;
    }
    anyhow::ensure!(phi.len() > 100, "only {} identifying values found in {} test databases", phi.len(), names.len());
    let secrets: Vec<String> =
        std::fs::read_to_string(dir.join("secrets.txt")).unwrap_or_default().lines().map(str::to_owned).filter(|s| !s.is_empty()).collect();
    anyhow::ensure!(!secrets.is_empty(), "the suite recorded no tokens or assertions");

    let mut leaks: Vec<String> = Vec::new();
    for value in &phi {
        if whole_word_hits(&logs, value) > 0 {
            leaks.push(format!("identity value {value:?}"));
        }
    }
    for secret in &secrets {
        if logs.contains(secret.as_str()) {
            leaks.push(format!("secret {}…", &secret[..8.min(secret.len())]));
        }
    }
    if has_jwt(&logs) {
        leaks.push("something shaped like a JWT (eyJ….….)".to_owned());
    }
    for marker in ["Bearer ", "PRIVATE KEY"] {
        if logs.contains(marker) {
            leaks.push(format!("something that looks like a token or key ({marker:?})"));
        }
    }
    println!(
        "scanned {} bytes in {files} log files for {} identity values from {} databases and {} secrets",
        logs.len(),
        phi.len(),
        names.len(),
        secrets.len()
    );
    anyhow::ensure!(leaks.is_empty(), "the logs hold: {}", leaks.join(", "));
    Ok(())
}

#[test]
fn jwt_shapes_only() {
    assert!(has_jwt("token eyJhbGciOiJFUzM4NCJ9.eyJpc3MiOiJwYSJ9.c2ln here"));
    assert!(has_jwt("eyJhbGciOiJFUzM4NCJ9.eyJpc3MiOiJwYSJ9"));
    assert!(!has_jwt("path /fhir/Provenance/gJsghAeyJXKecu9t"), "an id that happens to hold eyJ");
    assert!(!has_jwt("eyJhbGciOiJFUzM4NCJ9 and nothing after"));
}

#[test]
fn whole_words_only() {
    assert_eq!(whole_word_hits("a Pat b Path Pat.", "Pat"), 2);
    assert_eq!(whole_word_hits("María-José", "José"), 1);
    assert_eq!(whole_word_hits("xJosé", "José"), 0);
}
