//! SMART Backend Services, the protocol: the discovery document and issuing a token for client
//! credentials with a `private_key_jwt` client assertion (RS384 or ES384). The HTTP routes are
//! `crate::http::token`.

use super::Auth;
use super::scope::Scope;
use crate::audit::Audited;
use crate::error::ApiError;
use axum::Json;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::HashMap;
use time::OffsetDateTime;
use utoipa::ToSchema;

pub const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
pub const ALGORITHMS: [Algorithm; 2] = [Algorithm::RS384, Algorithm::ES384];
/// The longest a client assertion may live (`exp` at most this far ahead).
pub const MAX_ASSERTION_LIFETIME_SECS: i64 = 300;
/// Clock difference tolerated between a partner and this server.
const CLOCK_SKEW_SECS: u64 = 30;

/// The SMART configuration: how a backend service gets a token here.
pub fn smart_configuration(token_url: &str) -> Value {
    json!({
        "token_endpoint": token_url,
        "grant_types_supported": ["client_credentials"],
        "token_endpoint_auth_methods_supported": ["private_key_jwt"],
        "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384"],
        "scopes_supported": ["system/*.read", "system/*.rs", "system/Patient.read", "system/MedicationStatement.read",
            "system/AllergyIntolerance.read", "system/Immunization.read", "system/Task.read", "system/AuditEvent.read"],
        "capabilities": ["client-confidential-asymmetric"],
    })
}

/// The form a backend service posts (`application/x-www-form-urlencoded`).
#[derive(Debug, Deserialize, ToSchema)]
#[allow(dead_code)]
pub struct TokenRequest {
    /// `client_credentials`
    #[schema(example = "client_credentials")]
    grant_type: String,
    /// Space-separated scopes, e.g. `system/*.read`.
    #[schema(example = "system/*.read")]
    scope: String,
    /// `urn:ietf:params:oauth:client-assertion-type:jwt-bearer`
    client_assertion_type: String,
    /// A JWT signed with one of the partner's registered keys (RS384 or ES384): `iss` = `sub` =
    /// the partner id, `aud` = the token endpoint's URL, `exp` at most 5 minutes ahead, a `jti`
    /// never used before.
    client_assertion: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TokenResponse {
    /// An opaque bearer token.
    access_token: String,
    #[schema(example = "bearer")]
    token_type: &'static str,
    /// Seconds until the token expires.
    expires_in: i64,
    /// The granted scopes, space-separated.
    scope: String,
}

#[derive(Debug, Deserialize)]
struct Claims {
    iss: String,
    sub: String,
    exp: i64,
    jti: Option<String>,
}

fn refuse(status: StatusCode, error: &'static str, description: impl Into<String>) -> ApiError {
    ApiError::OAuth { status, error, description: description.into() }
}

fn invalid_request(description: impl Into<String>) -> ApiError {
    refuse(StatusCode::BAD_REQUEST, "invalid_request", description)
}

fn invalid_client(description: impl Into<String>) -> ApiError {
    refuse(StatusCode::UNAUTHORIZED, "invalid_client", description)
}

/// Issues a token for a valid request, or says why not; `audited` learns the partner once its
/// signature verified.
pub async fn issue(auth: &Auth, pool: &db::Pool, headers: &HeaderMap, body: &[u8], audited: &mut Audited) -> Result<Response, ApiError> {
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default();
    if !content_type.to_ascii_lowercase().starts_with("application/x-www-form-urlencoded") {
        return Err(ApiError::UnsupportedMediaType("the token request must be application/x-www-form-urlencoded".into()));
    }
    let mut form: HashMap<String, String> = HashMap::new();
    for (k, v) in serde_urlencoded::from_bytes::<Vec<(String, String)>>(body).map_err(|_| invalid_request("the body is not a valid form"))? {
        if form.insert(k.clone(), v).is_some() {
            return Err(invalid_request(format!("parameter '{k}' is repeated")));
        }
    }
    let field = |name: &str| form.get(name).map(String::as_str).filter(|v| !v.is_empty());
    match field("grant_type") {
        Some("client_credentials") => {}
        Some(_) => return Err(refuse(StatusCode::BAD_REQUEST, "unsupported_grant_type", "grant_type must be client_credentials")),
        None => return Err(invalid_request("grant_type is required (client_credentials)")),
    }
    if field("client_assertion_type") != Some(ASSERTION_TYPE) {
        return Err(invalid_request(format!("client_assertion_type must be {ASSERTION_TYPE}")));
    }
    let assertion = field("client_assertion").ok_or_else(|| invalid_request("client_assertion is required"))?;
    let requested = field("scope").ok_or_else(|| refuse(StatusCode::BAD_REQUEST, "invalid_scope", "scope is required, e.g. system/*.read"))?;
    let requested: Vec<Scope> = requested
        .split(' ')
        .filter(|s| !s.is_empty())
        .map(|s| {
            Scope::parse(s)
                .ok_or_else(|| refuse(StatusCode::BAD_REQUEST, "invalid_scope", "scopes are system/<Type or *>.<read, write, * or cruds letters>"))
        })
        .collect::<Result<_, _>>()?;

    let header = jsonwebtoken::decode_header(assertion).map_err(|_| invalid_client("client_assertion is not a JWT"))?;
    if !ALGORITHMS.contains(&header.alg) {
        return Err(invalid_client("client_assertion must be signed with RS384 or ES384"));
    }
    // Read the claimed client before verifying, to find its keys; nothing is trusted yet.
    let claimed = unverified_issuer(assertion).ok_or_else(|| invalid_client("client_assertion has no iss claim"))?;
    let partner = db::partners::get(pool, &claimed).await?.ok_or_else(|| invalid_client("unknown client"))?;
    if partner.disabled_at.is_some() {
        return Err(invalid_client("this client is disabled"));
    }
    let claims = verify(assertion, &header, &partner, &auth.token_url)?;
    // Signed with one of its keys: from here on the partner is known, and recorded.
    audited.partner_id = Some(partner.partner_id.clone());
    let now = OffsetDateTime::now_utc();
    if claims.exp > now.unix_timestamp() + MAX_ASSERTION_LIFETIME_SECS + CLOCK_SKEW_SECS as i64 {
        return Err(invalid_client("client_assertion exp must be at most 5 minutes ahead"));
    }
    if claims.sub != claims.iss {
        return Err(invalid_client("client_assertion sub must equal iss (the client id)"));
    }
    let jti = claims.jti.as_deref().filter(|j| !j.is_empty() && j.len() <= 256);
    let jti = jti.ok_or_else(|| invalid_client("client_assertion needs a jti of 1 to 256 characters"))?;
    let expires = OffsetDateTime::from_unix_timestamp(claims.exp).map_err(|_| invalid_client("client_assertion exp is out of range"))?;
    if !db::partners::use_assertion(pool, &partner.partner_id, jti, expires).await? {
        return Err(invalid_client("this client_assertion jti was already used"));
    }
    let allowed = super::Scopes::from_strings(&partner.scopes);
    let granted = allowed
        .grant(&requested)
        .map_err(|s| refuse(StatusCode::BAD_REQUEST, "invalid_scope", format!("scope {s} is not allowed for this client")))?;
    if granted.is_empty() {
        return Err(refuse(StatusCode::BAD_REQUEST, "invalid_scope", "no scope requested"));
    }

    let token = new_token()?;
    let lifetime = auth.token_lifetime;
    let expires_at = now + lifetime;
    let scopes: Vec<String> = granted.iter().map(|s| s.to_string()).collect();
    db::partners::issue_token(pool, &super::token_hash(&token), &partner.partner_id, &scopes, now, expires_at).await?;
    tracing::info!(partner = %partner.partner_id, scopes = %scopes.join(" "), "token issued");
    let body = TokenResponse { access_token: token, token_type: "bearer", expires_in: lifetime.as_secs() as i64, scope: scopes.join(" ") };
    let mut response = Json(body).into_response();
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response.headers_mut().insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    Ok(response)
}

fn unverified_issuer(assertion: &str) -> Option<String> {
    let payload = assertion.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).ok()?;
    let claims: Value = serde_json::from_slice(&bytes).ok()?;
    claims.get("iss")?.as_str().map(str::to_owned)
}

/// Verifies the signature with the partner's keys (the one named by `kid`, else each key that
/// fits the algorithm), then `iss`, `aud` and `exp`.
fn verify(assertion: &str, header: &jsonwebtoken::Header, partner: &db::partners::Partner, token_url: &str) -> Result<Claims, ApiError> {
    let jwks: JwkSet = serde_json::from_str(&partner.jwks).map_err(|_| invalid_client("the client's registered keys cannot be read"))?;
    let mut validation = Validation::new(header.alg);
    validation.set_audience(&[token_url]);
    validation.set_issuer(&[partner.partner_id.as_str()]);
    validation.set_required_spec_claims(&["exp", "iss", "sub", "aud"]);
    validation.leeway = CLOCK_SKEW_SECS;
    let mut last = invalid_client("no registered key of this client fits the assertion's algorithm");
    for jwk in jwks.keys.iter().filter(|k| header.kid.is_none() || k.common.key_id == header.kid) {
        let Ok(key) = DecodingKey::from_jwk(jwk) else { continue };
        match jsonwebtoken::decode::<Claims>(assertion, &key, &validation) {
            Ok(data) => return Ok(data.claims),
            Err(e) => {
                last = match e.kind() {
                    ErrorKind::InvalidSignature | ErrorKind::InvalidEcdsaKey | ErrorKind::InvalidRsaKey(_) | ErrorKind::InvalidKeyFormat => {
                        invalid_client("the client_assertion signature does not verify with the client's registered keys")
                    }
                    ErrorKind::ExpiredSignature => return Err(invalid_client("client_assertion has expired")),
                    ErrorKind::ImmatureSignature => return Err(invalid_client("client_assertion is not valid yet (nbf)")),
                    ErrorKind::InvalidAudience => return Err(invalid_client(format!("client_assertion aud must be {token_url}"))),
                    ErrorKind::InvalidIssuer => return Err(invalid_client("client_assertion iss must be the client id")),
                    ErrorKind::MissingRequiredClaim(c) => return Err(invalid_client(format!("client_assertion lacks the {c} claim"))),
                    ErrorKind::Json(_) => return Err(invalid_client("client_assertion claims are malformed (iss, sub, aud, exp, jti)")),
                    _ => invalid_client("the client_assertion could not be verified"),
                };
            }
        }
    }
    Err(last)
}

fn new_token() -> Result<String, ApiError> {
    let mut bytes = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| refuse(StatusCode::SERVICE_UNAVAILABLE, "temporarily_unavailable", "no randomness available"))?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}
