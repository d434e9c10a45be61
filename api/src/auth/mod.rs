//! Who is calling: SMART Backend Services bearer tokens, the scopes they carry, per-partner
//! rate limits, and the guard in front of every protected route, which also puts every access
//! on record (see `crate::audit`) before the response leaves.

pub mod cache;
pub mod client;
pub mod rate;
pub mod scope;
pub mod token;

use crate::audit::{self, Audited};
use crate::error::ApiError;
use crate::startup::AppState;
use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::{HeaderMap, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use db::resources::Viewer;
use rate::{Limit, RateLimiter};
use scope::{Interaction, Scopes};
use sha2::{Digest, Sha256};
use std::net::SocketAddr;
use std::time::Duration;
use time::OffsetDateTime;

/// The API's authorization settings.
#[derive(Debug)]
pub struct Auth {
    /// The token endpoint's URL: the only `aud` a client assertion may carry.
    pub token_url: String,
    pub token_lifetime: Duration,
    pub default_limit: Limit,
    pub limiter: RateLimiter,
    pub grants: std::sync::Arc<cache::GrantCache>,
    /// What one client address may send without a valid token (refused attempts, token
    /// requests), checked before authentication.
    pub address_limit: Limit,
    pub address_limiter: RateLimiter,
}

/// An authenticated partner, as the guard hands it to the handlers.
#[derive(Debug, Clone)]
pub struct Caller {
    pub partner_id: String,
    pub scopes: Scopes,
    pub pmm1_key_ids: Vec<String>,
    pub limit: Limit,
}

impl Caller {
    /// Refuses (403) unless a granted scope allows `interaction` on each of `types`.
    pub fn require(&self, types: &[&str], interaction: Interaction) -> Result<(), ApiError> {
        for t in types {
            if !self.scopes.allows(t, interaction) {
                let needed = match interaction {
                    Interaction::Read => format!("system/{t}.read"),
                    Interaction::Search => format!("system/{t}.read"),
                    Interaction::Create | Interaction::Update | Interaction::Delete => format!("system/{t}.write"),
                };
                return Err(ApiError::Forbidden {
                    diagnostics: format!("the token's scopes do not cover this request; it needs {needed}"),
                    scope: needed,
                });
            }
        }
        Ok(())
    }

    /// What this partner may see today (attribution is by calendar day, UTC).
    pub fn viewer(&self) -> Viewer<'_> {
        Viewer { partner_id: &self.partner_id, on: OffsetDateTime::now_utc().date() }
    }
}

pub fn token_hash(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

/// Paths anyone may call: liveness, readiness, discovery, the docs and the token endpoint itself.
fn is_protected(path: &str) -> bool {
    let fhir = (path == "/fhir" || path.starts_with("/fhir/")) && path != "/fhir/metadata" && path != "/fhir/.well-known/smart-configuration";
    fhir || path == crate::http::health::METRICS_PATH
}

async fn authenticate(state: &AppState, headers: &HeaderMap) -> Result<Caller, ApiError> {
    let value = headers.get(header::AUTHORIZATION).map(|v| v.to_str().unwrap_or_default());
    let Some(value) = value else {
        return Err(ApiError::Unauthorized {
            diagnostics: "this request needs a bearer token: get one from the token endpoint (see /.well-known/smart-configuration)".into(),
            error: None,
        });
    };
    let token = match value.split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() => token.trim(),
        _ => {
            return Err(ApiError::Unauthorized {
                diagnostics: "the Authorization header must be 'Bearer <token>'".into(),
                error: Some("invalid_request"),
            });
        }
    };
    let invalid = |why: &str| ApiError::Unauthorized { diagnostics: why.to_owned(), error: Some("invalid_token") };
    let hash = token_hash(token);
    let grant = match state.auth.grants.get(&hash) {
        Some(grant) => grant,
        None => {
            let generation = state.auth.grants.generation();
            let grant = db::partners::grant(&state.pool, &hash).await?.ok_or_else(|| invalid("the bearer token is not valid"))?;
            state.auth.grants.put(hash, grant.clone(), generation);
            grant
        }
    };
    if grant.expires_at <= OffsetDateTime::now_utc() {
        return Err(invalid("the bearer token has expired; get a new one from the token endpoint"));
    }
    let limit = Limit {
        rate: grant.rate_per_second.unwrap_or(state.auth.default_limit.rate),
        burst: grant.rate_burst.map(f64::from).unwrap_or(state.auth.default_limit.burst),
    };
    Ok(Caller { partner_id: grant.partner_id, scopes: Scopes::from_strings(&grant.scopes), pmm1_key_ids: grant.pmm1_key_ids, limit })
}

/// In front of every route: protected routes need a valid token within the partner's rate;
/// every access to a protected route or the token endpoint is audited before its response is
/// returned (if the audit cannot be written, the caller gets 503 and no data).
///
/// Before any of that, a client address that has used up its allowance of unauthenticated
/// requests (token requests, and requests refused for their token) is refused with 429: a
/// flood of bad tokens or assertions costs this server a hash-map lookup, not a database query.
/// Such refusals, and every request that did not authenticate, are recorded without a partner
/// or member: a caller that has not proven who it is cannot write names onto the trail.
pub async fn guard(State(state): State<AppState>, mut request: Request, next: Next) -> Response {
    let path = request.uri().path().to_owned();
    let method = request.method().clone();
    let is_token_endpoint = path == token::PATH;
    if !is_protected(&path) && !is_token_endpoint {
        return next.run(request).await;
    }
    let route = request.extensions().get::<MatchedPath>().map(|m| m.as_str().to_owned());
    let address = request.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip().to_string());
    let address_limit = state.auth.address_limit;
    let mut partner_id = None;
    let response = match address.as_deref().map(|a| state.auth.address_limiter.check(a, address_limit)) {
        Some(Err(retry_after)) => ApiError::TooManyRequests(retry_after).into_response(),
        _ if is_token_endpoint => {
            if let Some(a) = &address {
                let _ = state.auth.address_limiter.take(a, address_limit);
            }
            next.run(request).await
        }
        _ => match authenticate(&state, request.headers()).await {
            Ok(caller) => {
                partner_id = Some(caller.partner_id.clone());
                match state.auth.limiter.take(&caller.partner_id, caller.limit) {
                    Ok(()) => {
                        request.extensions_mut().insert(caller);
                        next.run(request).await
                    }
                    Err(retry_after) => ApiError::TooManyRequests(retry_after).into_response(),
                }
            }
            Err(refused) => {
                if let Some(a) = &address {
                    let _ = state.auth.address_limiter.take(a, address_limit);
                }
                refused.into_response()
            }
        },
    };
    if let Some(audit::Recorded(status)) = response.extensions().get::<audit::Recorded>().copied() {
        if status == response.status() {
            return response;
        }
        tracing::error!(recorded = status.as_u16(), served = response.status().as_u16(), %path, "a response left with another status than recorded; recording it too");
    }
    let audited = response.extensions().get::<Audited>().cloned();
    if is_token_endpoint {
        partner_id = audited.as_ref().and_then(|a| a.partner_id.clone());
    }
    tracing::debug!(partner = partner_id.as_deref().unwrap_or("-"), %method, %path, status = response.status().as_u16(), "request");
    let record = match &partner_id {
        Some(_) => audit::record_for(&method, &path, partner_id, audited, response.status()),
        None => audit::anonymous_record_for(&method, &path, route.as_deref(), audited, response.status()),
    };
    match state.auditor.record(record).await {
        Ok(()) => response,
        Err(()) => ApiError::AuditUnavailable.into_response(),
    }
}
