//! Issue 7: hashed-identity matching. Members come from `sor.member.demographics.v1`, tasks
//! from `sor.care.tasks.v1`; a partner tokenizes with the Python reference tokenizer, using
//! the key the operator's command prints, and calls `$hashed-match`.

use serde_json::{Value, json};
use std::collections::HashMap;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;
use tests::*;

const MASTER: &str = "5ecf5ecf5ecf5ecf5ecf5ecf5ecf5ecf5ecf5ecf5ecf5ecf5ecf5ecf5ecf5ecf";
const PEPPER: &str = "9e999e999e999e999e999e999e999e999e999e999e999e999e999e999e999e99";

fn pmm1_flags() -> Vec<&'static str> {
    vec!["--pmm1-master-secret", MASTER, "--pmm1-pepper", PEPPER]
}

fn person(given: &str, family: &str, dob: &str, sex: &str, line: &str, zip: &str, phone: &str) -> Value {
    json!({ "given_name": given, "family_name": family, "birth_date": dob, "sex": sex,
            "address_line": line, "postal_code": zip, "phone": phone })
}

/// The tokenizer's input for a person as a system of record holds it.
fn tokenizer_input(p: &Value) -> Value {
    json!({ "given": p["given_name"], "family": p["family_name"], "birthDate": p["birth_date"], "gender": p["sex"],
            "line1": p["address_line"], "postalCode": p["postal_code"], "phone": p["phone"] })
}

/// The partner key the operator hands over: printed by `partners pmm1-key`.
fn partner_key(key_id: &str) -> anyhow::Result<String> {
    let mut command = Command::new(workspace_binary("partners")?);
    command.args(["pmm1-key", "--key-id", key_id]).env("PMM1_MASTER_SECRET", MASTER).env("LOG_LEVEL", "warn");
    collect_logs(&mut command, "partners");
    let out = command.output()?;
    anyhow::ensure!(out.status.success(), "partners pmm1-key failed: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8(out.stdout)?.trim().to_owned())
}

/// Tokens from the Python reference tokenizer (standard library only), as a partner runs it.
fn tokenize(key_hex: &str, people: &[Value]) -> anyhow::Result<Vec<HashMap<String, String>>> {
    let tool = repo_path("identity/python/pmm1.py");
    let mut child = Command::new("python3").arg(tool).args(["--key-hex", key_hex]).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn()?;
    {
        let mut stdin = child.stdin.take().ok_or_else(|| anyhow::anyhow!("no stdin"))?;
        for p in people {
            writeln!(stdin, "{}", tokenizer_input(p))?;
        }
    }
    let out = child.wait_with_output()?;
    anyhow::ensure!(out.status.success(), "pmm1.py failed");
    String::from_utf8(out.stdout)?.lines().map(|l| Ok(serde_json::from_str(l)?)).collect()
}

fn parameters(key_id: &str, tokens: &[&String]) -> String {
    let mut parameter = vec![json!({ "name": "keyId", "valueString": key_id })];
    parameter.extend(tokens.iter().map(|t| json!({ "name": "token", "valueString": t })));
    json!({ "resourceType": "Parameters", "parameter": parameter }).to_string()
}

fn all(tokens: &HashMap<String, String>) -> Vec<&String> {
    let mut v: Vec<(&String, &String)> = tokens.iter().collect();
    v.sort();
    v.into_iter().map(|(_, t)| t).collect()
}

async fn hashed_match(client: &reqwest::Client, origin: &str, key_id: &str, tokens: &[&String]) -> anyhow::Result<Reply> {
    send(client.post(format!("{origin}/fhir/Patient/$hashed-match")).header("content-type", "application/fhir+json").body(parameters(key_id, tokens)))
        .await
}

async fn matching_partner(pool: &db::Pool, id: &str, key_ids: &[&str]) -> anyhow::Result<TestPartner> {
    let partner = register_partner(pool, id, "system/*.read", KeyKind::Es384, None).await?;
    let key_ids: Vec<String> = key_ids.iter().map(|k| (*k).to_owned()).collect();
    let jwks = api::auth::client::ClientKey::jwks(&[&partner.key]).to_string();
    let scopes = vec!["system/*.read".to_owned()];
    db::partners::register(
        pool,
        &db::partners::Registration {
            partner_id: id,
            name: id,
            jwks: &jwks,
            scopes: &scopes,
            rate_per_second: Some(100_000.0),
            rate_burst: Some(100_000),
            pmm1_key_ids: &key_ids,
        },
    )
    .await?;
    Ok(partner)
}

fn william() -> Value {
    person("William", "Smith", "1980-02-03", "male", "12 Oak Avenue", "02139", "617-555-0134")
}

/// Members MBR-0001 (William Smith, with two open tasks and a completed one) and the twins
/// MBR-0002 / MBR-0003, who share a T2 value (same last name, initial, birth date and sex).
async fn compose(app: &TestApp) -> anyhow::Result<Composer> {
    let mut flags = pmm1_flags();
    flags.extend(["--pmm1-key-ids", "k1,k2"]);
    let composer = app.composer(&flags).await?;
    let task = |record: &str, status: &str| {
        let data =
            json!({ "task_code": "AWV", "description": "Annual wellness visit", "status": status, "priority": "routine", "due_date": "2027-01-15" });
        upsert(platform::topics::CARE_TASKS, "care-mgmt", 1, "MBR-0001", record, data)
    };
    app.apply(&[
        demographics("MBR-0001", william()),
        demographics("MBR-0002", person("Anna", "Jones", "1975-06-07", "female", "4 Elm Street", "60601", "312-555-0101")),
        demographics("MBR-0003", person("Alice", "Jones", "1975-06-07", "female", "4 Elm Street", "60601", "312-555-0102")),
        task("TK-MBR-0001-1", "requested"),
        task("TK-MBR-0001-2", "in-progress"),
        task("TK-MBR-0001-3", "completed"),
    ])
    .await?;
    Ok(composer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partner_matches_a_member_by_tokens_and_learns_nothing_else() -> anyhow::Result<()> {
    let app = TestApp::new("match").await?;
    let pool = &app.pool;
    let composer = compose(&app).await?;
    let mut flags = pmm1_flags();
    flags.extend(["--match-rate-limit-per-second", "1000", "--match-rate-limit-burst", "1000"]);
    let origin = app.api(&flags).await?;
    let pm = matching_partner(pool, "pm", &["k1"]).await?;
    let other = matching_partner(pool, "pm2", &["k1"]).await?;
    let (client, other_client) = (pm.client(&origin).await?, other.client(&origin).await?);

    let k1 = partner_key("k1")?;
    let k2 = partner_key("k2")?;
    assert_eq!(k1.len(), 64);
    assert_ne!(k1, k2);
    let people = [
        william(),
        // a typo in the first name: T2 and T3 still hold
        person("Wiliam", "Smith", "1980-02-03", "male", "", "", ""),
        // not a member at all
        person("Grace", "Hopper", "1906-12-09", "female", "1 Navy Way", "20001", "202-555-0199"),
        // shares only T3 with William Smith (same Soundex codes, birth date and sex)
        person("Willem", "Smyth", "1980-02-03", "male", "99 Pine Court", "94105", "415-555-0142"),
        person("Anna", "Jones", "1975-06-07", "female", "4 Elm Street", "60601", "312-555-0101"),
    ];
    let tokens = tokenize(&k1, &people)?;
    let (exact, typo, stranger, t3_only, anna) = (&tokens[0], &tokens[1], &tokens[2], &tokens[3], &tokens[4]);
    assert_eq!(typo.len(), 2, "only T2 and T3 without ZIP, address and phone: {:?}", typo.keys());

    // A match: the member's open tasks, under handles.
    let reply = hashed_match(&client, &origin, "k1", &all(exact)).await?;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let bundle = &reply.body;
    assert_eq!(bundle["type"], "searchset");
    assert_eq!(bundle["total"], 2, "requested and in-progress, not completed");
    let handle = bundle["entry"][0]["resource"]["for"]["identifier"]["value"].as_str().unwrap_or_default().to_owned();
    assert_eq!(handle.len(), 32);
    for e in bundle["entry"].as_array().into_iter().flatten() {
        let task = &e["resource"];
        assert_eq!(task["resourceType"], "Task");
        assert_eq!(task["description"], "Annual wellness visit");
        assert_eq!(task["for"]["identifier"]["value"], handle.as_str());
        assert!(task["identifier"].is_null());
    }
    assert!(!reply.text.contains("MBR-0001"), "the member id never appears: {}", reply.text);
    for (name, token) in exact {
        assert!(!reply.text.contains(token.as_str()), "{name} is not echoed");
    }
    assert!(reply.elapsed >= Duration::from_millis(40), "answered before the floor: {:?}", reply.elapsed);

    // Stable for this partner, different for another.
    let again = hashed_match(&client, &origin, "k1", &all(exact)).await?.body;
    assert_eq!(again["entry"][0]["resource"]["for"]["identifier"]["value"], handle.as_str());
    assert_eq!(again["entry"][0]["resource"]["id"], bundle["entry"][0]["resource"]["id"]);
    let theirs = hashed_match(&other_client, &origin, "k1", &all(exact)).await?.body;
    assert_ne!(theirs["entry"][0]["resource"]["for"]["identifier"]["value"], handle.as_str());

    // Typos that keep two token types intact still match; T1 alone matches.
    let reply = hashed_match(&client, &origin, "k1", &all(typo)).await?;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.body["entry"][0]["resource"]["for"]["identifier"]["value"], handle.as_str());
    assert_eq!(hashed_match(&client, &origin, "k1", &[&exact["T1"]]).await?.status, 200);
    // Anna's T2 value is shared with her twin and never used; her T1 alone still matches.
    assert_eq!(hashed_match(&client, &origin, "k1", &all(anna)).await?.status, 200);

    // Every other outcome: one and the same answer.
    let k2_tokens = tokenize(&k2, &[william()])?;
    let refusals = [
        ("a non-member", hashed_match(&client, &origin, "k1", &all(stranger)).await?),
        ("a person sharing only T3", hashed_match(&client, &origin, "k1", &all(t3_only)).await?),
        ("a single token type other than T1", hashed_match(&client, &origin, "k1", &[&exact["T4"]]).await?),
        ("a value two members share", hashed_match(&client, &origin, "k1", &[&anna["T2"]]).await?),
        ("an unknown key id", hashed_match(&client, &origin, "k9", &all(exact)).await?),
        ("a key id this partner may not use", hashed_match(&client, &origin, "k2", &all(&k2_tokens[0])).await?),
    ];
    for (what, r) in &refusals {
        assert_eq!(r.status, 422, "{what}: {}", r.body);
        assert_eq!((r.header("content-type"), &r.text), (refusals[0].1.header("content-type"), &refusals[0].1.text), "{what}: not byte-identical");
        assert!(r.elapsed >= Duration::from_millis(40), "{what}: {:?} is under the floor", r.elapsed);
    }
    let outcome = &refusals[0].1.body;
    assert_eq!(outcome["resourceType"], "OperationOutcome");

    // Malformed requests are 400s (they reveal nothing about anyone).
    let r = client
        .post(format!("{origin}/fhir/Patient/$hashed-match"))
        .header("content-type", "application/fhir+json")
        .body("{\"resourceType\":\"Parameters\"}")
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 400);
    let r = client.post(format!("{origin}/fhir/Patient/$hashed-match")).header("content-type", "text/plain").body("x").send().await?;
    assert_eq!(r.status().as_u16(), 415);

    // The index follows demographics: rebuilt by the command, and emptied by a delete.
    sqlx::query("DELETE FROM match_index WHERE key_id = 'k1'").execute(pool).await?;
    assert_eq!(hashed_match(&client, &origin, "k1", &all(exact)).await?.status, 422);
    let mut command = Command::new(workspace_binary("match-index")?);
    command
        .args(["--key-id", "k1"])
        .env("DATABASE_URL", &app.url)
        .env("PMM1_MASTER_SECRET", MASTER)
        .env("PMM1_PEPPER", PEPPER)
        .env("PMM1_KEY_IDS", "k1,k2")
        .env("LOG_LEVEL", "warn");
    collect_logs(&mut command, "match-index");
    let out = command.output()?;
    assert!(out.status.success(), "match-index failed");
    assert!(String::from_utf8_lossy(&out.stdout).contains("3 members"), "{}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(hashed_match(&client, &origin, "k1", &all(exact)).await?.status, 200);
    app.apply(&[deletion(platform::topics::DEMOGRAPHICS, "enrollment", 2, "MBR-0001", "MBR-0001")]).await?;
    composer.stop().await?;
    assert_eq!(hashed_match(&client, &origin, "k1", &all(exact)).await?.status, 422);
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM match_index WHERE member_id = 'MBR-0001'").fetch_one(pool).await?;
    assert_eq!(rows, 0);

    // Audited: partner, key id and decision; never a token.
    let ops = register_partner(pool, "ops", "system/AuditEvent.read", KeyKind::Es384, None).await?;
    let o = bearer_client(&ops.token_with(&origin, "system/AuditEvent.read").await?)?;
    let page: Value = o.get(format!("{origin}/fhir/AuditEvent?agent=pm&subtype=match&_count=100")).send().await?.json().await?;
    let decisions: Vec<String> = page["entry"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["resource"]["entity"].as_array().and_then(|es| es.last()).cloned())
        .map(|request| {
            let detail = |name: &str| {
                request["detail"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|d| d["type"] == name)
                    .and_then(|d| d["valueString"].as_str())
                    .unwrap_or("")
                    .to_owned()
            };
            format!("{}:{}", detail("keyId"), detail("decision"))
        })
        .collect();
    for expected in ["k1:match", "k1:no-match", "k1:too-weak", "k9:unknown-key", "k2:unknown-key"] {
        assert!(decisions.iter().any(|d| d == expected), "{expected} not audited: {decisions:?}");
    }
    let audit: Vec<String> = sqlx::query_scalar("SELECT row_to_json(a)::text FROM audit_events a").fetch_all(pool).await?;
    for token in tokens.iter().flat_map(|t| t.values()) {
        assert!(audit.iter().all(|row| !row.contains(token.as_str())), "a token reached the audit trail");
        remember_secret(token);
    }
    remember_secret(&k1);
    remember_secret(&k2);
    Ok(())
}

/// Largest distance between the empirical distributions of `a` and `b` (two-sample
/// Kolmogorov–Smirnov statistic).
fn ks_statistic(a: &mut [f64], b: &mut [f64]) -> f64 {
    a.sort_by(f64::total_cmp);
    b.sort_by(f64::total_cmp);
    let (mut i, mut j, mut d) = (0, 0, 0.0f64);
    while i < a.len() && j < b.len() {
        let x = a[i].min(b[j]);
        while i < a.len() && a[i] <= x {
            i += 1;
        }
        while j < b.len() && b[j] <= x {
            j += 1;
        }
        d = d.max((i as f64 / a.len() as f64 - j as f64 / b.len() as f64).abs());
    }
    d
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn match_and_no_match_take_the_same_time_and_matching_is_rate_limited() -> anyhow::Result<()> {
    let app = TestApp::new("matchtime").await?;
    let pool = &app.pool;
    compose(&app).await?.stop().await?;
    let mut flags = pmm1_flags();
    flags.extend(["--match-rate-limit-per-second", "100000", "--match-rate-limit-burst", "100000"]);
    let origin = app.api(&flags).await?;
    let partner = matching_partner(pool, "timer", &["k1"]).await?;
    let client = partner.client(&origin).await?;
    let tokens =
        tokenize(&partner_key("k1")?, &[william(), person("Grace", "Hopper", "1906-12-09", "female", "1 Navy Way", "20001", "202-555-0199")])?;
    let (hit, miss) = (all(&tokens[0]).into_iter().cloned().collect::<Vec<_>>(), all(&tokens[1]).into_iter().cloned().collect::<Vec<_>>());

    // 1,000 requests, matches and non-matches interleaved, four at a time.
    let mut matched = Vec::new();
    let mut unmatched = Vec::new();
    for round in 0..250 {
        let requests = (0..4).map(|i| {
            let (client, origin) = (client.clone(), origin.clone());
            let is_match = (round + i) % 2 == 0;
            let tokens = if is_match { hit.clone() } else { miss.clone() };
            async move {
                let r = hashed_match(&client, &origin, "k1", &tokens.iter().collect::<Vec<_>>()).await?;
                anyhow::Ok((is_match, r))
            }
        });
        for result in futures::future::join_all(requests).await {
            let (is_match, r) = result?;
            assert_eq!(r.status, if is_match { 200 } else { 422 });
            let ms = r.elapsed.as_secs_f64() * 1000.0;
            if is_match { matched.push(ms) } else { unmatched.push(ms) }
        }
    }
    let d = ks_statistic(&mut matched, &mut unmatched);
    // The critical value of the two-sample test at α = 0.001 for 500 + 500 samples.
    let critical = 1.95 * (2.0f64 / 500.0).sqrt();
    let median = |v: &[f64]| v[v.len() / 2];
    println!(
        "match: median {:.2} ms, p99 {:.2} ms; no match: median {:.2} ms, p99 {:.2} ms; KS D = {d:.3} (critical {critical:.3})",
        median(&matched),
        matched[matched.len() * 99 / 100],
        median(&unmatched),
        unmatched[unmatched.len() * 99 / 100]
    );
    assert!(matched[0] >= 40.0 && unmatched[0] >= 40.0, "a response came before the floor");
    assert!(d < critical, "match and no-match latencies differ: KS D = {d:.3} ≥ {critical:.3}");

    // The default per-partner match limit (burst 10, 1/s) is far below the read limit, and
    // holds in total across two instances (asked in turn: each alone would allow 10).
    let limited = app.api(&pmm1_flags()).await?;
    let other = app.api(&pmm1_flags()).await?;
    let statuses: Vec<u16> = {
        let mut v = Vec::new();
        for i in 0..11 {
            let origin = if i % 2 == 0 { &limited } else { &other };
            v.push(hashed_match(&client, origin, "k1", &miss.iter().collect::<Vec<_>>()).await?.status);
        }
        v
    };
    assert_eq!(statuses[..10], [422; 10]);
    assert_eq!(statuses[10], 429);
    let r = client.get(format!("{limited}/fhir/Patient/NOBODY")).send().await?;
    assert_eq!(r.status().as_u16(), 404, "reads are not limited by the match limit");
    Ok(())
}
