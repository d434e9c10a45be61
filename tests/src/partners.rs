//! Partners registered in a test's database, and their way through SMART Backend Services to a
//! bearer token.

use crate::env::unique;
use crate::http::{Reply, send};
use crate::logs::remember_secret;

/// How a test partner signs its client assertions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    Es384,
    Rs384,
}

/// A partner registered in a test's database, with its private key.
pub struct TestPartner {
    pub id: String,
    pub key: api::auth::client::ClientKey,
}

/// A new RSA key from the `openssl` command (ring verifies RSA but does not generate keys).
pub fn rsa_key(kid: &str) -> anyhow::Result<api::auth::client::ClientKey> {
    let dir = std::env::temp_dir().join(unique("rsa"));
    let key = rsa_key_file(kid, &dir.join("key.pem"));
    std::fs::remove_dir_all(&dir)?;
    key
}

/// A new RSA key, its private half kept in `pem_path` (PKCS#8) for a client written elsewhere.
pub fn rsa_key_file(kid: &str, pem_path: &std::path::Path) -> anyhow::Result<api::auth::client::ClientKey> {
    if let Some(dir) = pem_path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let status = std::process::Command::new("openssl")
        .args(["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out"])
        .arg(pem_path)
        .stderr(std::process::Stdio::null())
        .status()?;
    anyhow::ensure!(status.success(), "openssl genpkey failed");
    let out = std::process::Command::new("openssl").args(["rsa", "-noout", "-modulus", "-in"]).arg(pem_path).output()?;
    anyhow::ensure!(out.status.success(), "openssl rsa -modulus failed");
    let hex = String::from_utf8(out.stdout)?.trim().trim_start_matches("Modulus=").to_owned();
    let modulus = (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16)).collect::<Result<Vec<u8>, _>>()?;
    api::auth::client::ClientKey::rs384_from_pem(kid, &std::fs::read(pem_path)?, &modulus)
}

/// Registers a partner with a fresh key of `kind` and the given scopes and rate limit.
pub async fn register_partner(pool: &db::Pool, id: &str, scopes: &str, kind: KeyKind, rate: Option<(f64, i32)>) -> anyhow::Result<TestPartner> {
    let kid = format!("{id}-key");
    let key = match kind {
        KeyKind::Es384 => api::auth::client::ClientKey::generate_es384(&kid)?.0,
        KeyKind::Rs384 => rsa_key(&kid)?,
    };
    register_partner_with_key(pool, id, scopes, key, rate).await
}

/// Registers a partner that signs with `key` (its kid is the key's).
pub async fn register_partner_with_key(
    pool: &db::Pool,
    id: &str,
    scopes: &str,
    key: api::auth::client::ClientKey,
    rate: Option<(f64, i32)>,
) -> anyhow::Result<TestPartner> {
    let jwks = api::auth::client::ClientKey::jwks(&[&key]).to_string();
    let scopes: Vec<String> = scopes.split_whitespace().map(str::to_owned).collect();
    let registration = db::partners::Registration {
        partner_id: id,
        name: id,
        jwks: &jwks,
        scopes: &scopes,
        rate_per_second: rate.map(|r| r.0),
        rate_burst: rate.map(|r| r.1),
        pmm1_key_ids: &[],
    };
    db::partners::register(pool, &registration).await?;
    Ok(TestPartner { id: id.to_owned(), key })
}

impl TestPartner {
    /// The token endpoint, as a SMART client discovers it.
    pub async fn token_url(origin: &str) -> anyhow::Result<String> {
        let config: serde_json::Value = reqwest::get(format!("{origin}/.well-known/smart-configuration")).await?.json().await?;
        config["token_endpoint"].as_str().map(str::to_owned).ok_or_else(|| anyhow::anyhow!("no token_endpoint"))
    }

    /// A client assertion for this partner, `lifetime` seconds long.
    pub async fn assertion(&self, origin: &str, lifetime: i64) -> anyhow::Result<String> {
        let assertion = self.key.assertion(&self.id, &Self::token_url(origin).await?, lifetime, None)?;
        remember_secret(&assertion);
        Ok(assertion)
    }

    /// Posts a token request.
    pub async fn request_token(origin: &str, assertion: &str, scope: &str) -> anyhow::Result<Reply> {
        let request = reqwest::Client::new()
            .post(format!("{origin}{}", api::routes::TOKEN))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(api::auth::client::token_request(assertion, scope));
        let reply = send(request).await?;
        if let Some(t) = reply.body["access_token"].as_str() {
            remember_secret(t);
        }
        Ok(reply)
    }

    /// A bearer token with `scope`, through the whole SMART Backend Services flow.
    pub async fn token_with(&self, origin: &str, scope: &str) -> anyhow::Result<String> {
        let Reply { status, body, .. } = Self::request_token(origin, &self.assertion(origin, 240).await?, scope).await?;
        anyhow::ensure!(status == 200, "token refused ({status}): {body}");
        body["access_token"].as_str().map(str::to_owned).ok_or_else(|| anyhow::anyhow!("no access_token in {body}"))
    }

    pub async fn token(&self, origin: &str) -> anyhow::Result<String> {
        self.token_with(origin, "system/*.read").await
    }

    /// An HTTP client that sends this partner's bearer token.
    pub async fn client(&self, origin: &str) -> anyhow::Result<reqwest::Client> {
        bearer_client(&self.token(origin).await?)
    }
}

/// An HTTP client that sends `token` as its bearer token.
pub fn bearer_client(token: &str) -> anyhow::Result<reqwest::Client> {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(reqwest::header::AUTHORIZATION, format!("Bearer {token}").parse()?);
    Ok(reqwest::Client::builder().default_headers(headers).build()?)
}

/// Creates a Kafka-channel Subscription to the medication-profile topic for the partner whose
/// client `partner` is (it needs `system/Subscription.write`) and waits for its handshake.
/// Returns its id.
pub async fn kafka_subscription(partner: &reqwest::Client, origin: &str, reason: &str) -> anyhow::Result<String> {
    let channel = serde_json::json!({ "type": "message", "payload": "application/fhir+json",
        "_type": { "extension": [{ "url": "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-channel-type",
            "valueCoding": { "system": "urn:fhir-event-platform:subscription-channel-type", "code": "kafka" } }] } });
    let subscription = serde_json::json!({ "resourceType": "Subscription", "status": "requested", "reason": reason,
        "criteria": fhir::subscriptions::TOPIC_URL, "channel": channel });
    let created = crate::http::send(crate::http::post_fhir(partner, &format!("{origin}/fhir/Subscription"), &subscription)).await?;
    anyhow::ensure!(created.status == 201, "{}", created.body);
    let id = created.body["id"].as_str().unwrap_or_default().to_owned();
    crate::wait::eventually(std::time::Duration::from_secs(20), "the subscription's handshake", || async {
        Ok((crate::http::get(partner, &format!("{origin}/fhir/Subscription/{id}")).await?.body["status"] == "active").then_some(()))
    })
    .await?;
    Ok(id)
}
