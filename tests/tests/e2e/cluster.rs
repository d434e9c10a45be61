//! Issue 27: the secured cluster profile (`scripts/services up --cluster`: three brokers, TLS,
//! SASL/SCRAM, ACLs). The platform's components run with their own principals and only their
//! grants, and data flows end to end (replication factor 3, min.insync.replicas 2, the relay's
//! Kafka transactions); a partner's principal reads its own topics with its own groups and is
//! refused every other partner's topic, the main topic, a foreign group, and any write; a system
//! of record's principal writes its topic and no other. Ignored by default: `scripts/test`
//! brings the cluster up and runs it.

use rdkafka::error::RDKafkaErrorCode;
use serde_json::json;
use std::time::Duration;
use tests::cluster::{first_record, produce, spawn_as};
use tests::*;

/// The `partners` command, with the cluster profile's principal command: `register` and
/// `enable` grant the partner its principal and ACLs, `disable` revokes them.
fn partners(database_url: &str, args: &[&str]) -> anyhow::Result<()> {
    let hook = format!("bash {} partner-principal", repo_path("scripts/services").display());
    let out = std::process::Command::new(workspace_binary("partners")?)
        .env("DATABASE_URL", database_url)
        .env("PARTNER_KAFKA_PRINCIPAL_COMMAND", hook)
        .env("LOG_LEVEL", "warn")
        .args(args)
        .output()?;
    anyhow::ensure!(out.status.success(), "partners {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

fn register(database_url: &str, id: &str) -> anyhow::Result<()> {
    let key = api::auth::client::ClientKey::generate_es384(&format!("{id}-key"))?.0;
    let jwks = std::env::temp_dir().join(format!("{id}.jwks.json"));
    std::fs::write(&jwks, api::auth::client::ClientKey::jwks(&[&key]).to_string())?;
    let registered = partners(database_url, &["register", "--id", id, "--name", id, "--jwks", &jwks.display().to_string()]);
    let _ = std::fs::remove_file(&jwks);
    registered
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the secured cluster; scripts/test brings it up (scripts/services up --cluster) and runs it"]
async fn each_principal_gets_only_what_it_uses_and_data_flows() -> anyhow::Result<()> {
    let app = TestApp::new("cluster").await?;
    tests::cluster::empty_topics(&platform::topics::SOR_TOPICS).await?;
    tests::cluster::remove_partner_topics_of('r').await?;
    // Topics outlive a run on the cluster: this run's partners and members are its own.
    let run = unique("r").replace('_', "");
    let (pa, pb) = (format!("{run}a"), format!("{run}b"));
    let (ma, mb) = (format!("{run}-MA"), format!("{run}-MB"));
    let group = format!("fhir-composer-{run}");
    let mut children = Children(Vec::new());
    children.0.push(spawn_as("composer", "composer", &app.url, &group, &[])?);
    children.0.push(spawn_as("relay", "relay", &app.url, &group, &[])?);
    let bind = free_address()?;
    children.0.push(spawn_as("api", "api", &app.url, &group, &[("HTTP_BIND", bind.as_str())])?);

    // Systems of record, each with its own principal.
    for (member, partner) in [(&ma, &pa), (&mb, &pb)] {
        let demo = native_event("upsert", "enrollment", 1, member, member, Some(json!({ "given_name": "Ada", "sex": "female" })));
        assert_eq!(produce("sor-demographics", platform::topics::DEMOGRAPHICS, member, &demo).await?, Ok(()));
        let attributed = attribution(member, partner);
        assert_eq!(produce("sor-attribution", platform::topics::ATTRIBUTION, member, attributed.value.as_deref().unwrap_or_default()).await?, Ok(()));
    }
    // A system of record writes its own topic only.
    let forged = attribution(&ma, &pb);
    assert_eq!(
        produce("sor-demographics", platform::topics::ATTRIBUTION, &ma, forged.value.as_deref().unwrap_or_default()).await?,
        Err(RDKafkaErrorCode::TopicAuthorizationFailed),
        "demographics' principal wrote attribution"
    );

    // Partners registered with `partners` get principals of their own, and read their own topic (its records came through
    // the composer and the relay's transactions, each with only its grants).
    register(&app.url, &pa)?;
    register(&app.url, &pb)?;
    let own = platform::topics::partner_profile(&pa);
    assert_eq!(first_record(&format!("partner-{pa}"), &format!("{pa}-reader"), &own, Duration::from_secs(120)).await?, Ok(ma.clone()));
    let theirs = platform::topics::partner_profile(&pb);
    assert_eq!(first_record(&format!("partner-{pb}"), &format!("{pb}-reader"), &theirs, Duration::from_secs(60)).await?, Ok(mb.clone()));

    // Everything else is refused.
    let a = format!("partner-{pa}");
    let refused = |what: &str, got: Result<String, RDKafkaErrorCode>, code: RDKafkaErrorCode| {
        assert_eq!(got, Err(code), "{what}");
    };
    refused(
        "another partner's topic",
        first_record(&a, &format!("{pa}-reader"), &theirs, Duration::from_secs(30)).await?,
        RDKafkaErrorCode::TopicAuthorizationFailed,
    );
    refused(
        "another partner's insights",
        first_record(&a, &format!("{pa}-reader"), &platform::topics::partner_insights(&pb), Duration::from_secs(30)).await?,
        RDKafkaErrorCode::TopicAuthorizationFailed,
    );
    refused(
        "the main topic",
        first_record(&a, &format!("{pa}-reader"), platform::topics::MEDICATION_PROFILE, Duration::from_secs(30)).await?,
        RDKafkaErrorCode::TopicAuthorizationFailed,
    );
    refused(
        "a group without its id",
        first_record(&a, &format!("reader-{pa}"), &own, Duration::from_secs(30)).await?,
        RDKafkaErrorCode::GroupAuthorizationFailed,
    );
    refused(
        "the audit trail",
        first_record(&a, &format!("{pa}-reader"), platform::topics::AUDIT_EVENTS, Duration::from_secs(30)).await?,
        RDKafkaErrorCode::TopicAuthorizationFailed,
    );
    for topic in platform::topics::SOR_TOPICS {
        assert_eq!(produce(&a, topic, &ma, b"{}").await?, Err(RDKafkaErrorCode::TopicAuthorizationFailed), "a partner wrote {topic}");
    }
    assert_eq!(produce(&a, &own, &ma, b"{}").await?, Err(RDKafkaErrorCode::TopicAuthorizationFailed), "a partner wrote its own topic");

    // A partner disabled in the registry loses its principal: it reads nothing more.
    partners(&app.url, &["disable", "--id", &pb])?;
    let b = format!("partner-{pb}");
    let after = first_record(&b, &format!("{pb}-again"), &theirs, Duration::from_secs(30)).await;
    assert!(!matches!(after, Ok(Ok(_))), "a revoked partner still read its topic: {after:?}");

    // The platform's principals have no more than they use.
    refused(
        "the relay reading sor.*",
        first_record("relay", &format!("fhir-relay-{run}"), platform::topics::DEMOGRAPHICS, Duration::from_secs(30)).await?,
        RDKafkaErrorCode::TopicAuthorizationFailed,
    );
    assert_eq!(
        produce("composer", platform::topics::MEDICATION_PROFILE, &ma, b"{}").await?,
        Err(RDKafkaErrorCode::TopicAuthorizationFailed),
        "the composer wrote the main topic"
    );
    assert_eq!(
        produce("api", platform::topics::ATTRIBUTION, &ma, b"{}").await?,
        Err(RDKafkaErrorCode::TopicAuthorizationFailed),
        "the api wrote sor.*"
    );

    // The API is ready on the cluster (its readiness asks the brokers as its principal).
    eventually(Duration::from_secs(60), "the API to be ready on the cluster", || {
        let url = format!("http://{bind}/ready");
        async move { Ok(reqwest::get(&url).await.ok().filter(|r| r.status() == 200).map(|_| ())) }
    })
    .await?;
    drop(children);
    tests::cluster::remove_partner_topics_of('r').await?;
    Ok(())
}
