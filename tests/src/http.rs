//! Talking to the API as a partner does: one [`Reply`] type for every answer, and the checks
//! every refusal must pass.

use reqwest::header::HeaderMap;
use serde_json::Value;
use std::time::{Duration, Instant};

/// An answer of the API: status, headers, the body as sent and as JSON (`Null` when empty or
/// when the content type is not JSON), and how long it took.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Value,
    pub text: String,
    pub elapsed: Duration,
}

impl Reply {
    /// A header's value, or "" when absent or not text.
    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default()
    }

    /// Asserts a refusal: `status`, an OperationOutcome with a diagnostic and, for 401/403, a
    /// `WWW-Authenticate` challenge.
    #[track_caller]
    pub fn assert_refused(&self, status: u16, what: &str) {
        let body = &self.body;
        assert_eq!(self.status, status, "{what}: {body}");
        assert_eq!(body["resourceType"], "OperationOutcome", "{what}: {body}");
        assert!(!body["issue"][0]["diagnostics"].as_str().unwrap_or_default().is_empty(), "{what}: {body}");
        if matches!(status, 401 | 403) {
            assert!(self.headers.contains_key("www-authenticate"), "{what}: no WWW-Authenticate");
        }
    }
}

/// Sends a request and reads the whole answer.
pub async fn send(request: reqwest::RequestBuilder) -> anyhow::Result<Reply> {
    let started = Instant::now();
    let r = request.send().await?;
    let (status, headers) = (r.status().as_u16(), r.headers().clone());
    let text = r.text().await?;
    let json = headers.get("content-type").and_then(|v| v.to_str().ok()).is_some_and(|t| t.contains("json"));
    let body = if json && !text.is_empty() {
        serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{status}: a JSON content type with a body that is not JSON ({e}): {text}"))?
    } else {
        Value::Null
    };
    Ok(Reply { status, headers, body, text, elapsed: started.elapsed() })
}

pub async fn get(client: &reqwest::Client, url: &str) -> anyhow::Result<Reply> {
    send(client.get(url)).await
}

/// A POST of a FHIR resource (`application/fhir+json`).
pub fn post_fhir(client: &reqwest::Client, url: &str, body: &Value) -> reqwest::RequestBuilder {
    client.post(url).header("content-type", "application/fhir+json").body(body.to_string())
}
