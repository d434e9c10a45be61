//! Who is calling: SMART Backend Services bearer tokens and the scopes they carry, the grants
//! cache, rate limits, and (in `token`) how a token is issued. The middleware that applies them
//! to every request is `crate::guard`.

pub mod cache;
pub mod client;
pub mod rate;
pub mod scope;
pub mod token;

use crate::error::ApiError;
use axum::http::{HeaderMap, header};
use db::resources::Viewer;
use rate::{Limit, RateLimiter, SharedLimiter};
use scope::{Interaction, Scopes};
use sha2::{Digest, Sha256};
use std::time::Duration;
use time::OffsetDateTime;

/// The API's authorization settings.
#[derive(Debug)]
pub struct Auth {
    /// The token endpoint's URL: the only `aud` a client assertion may carry.
    pub token_url: String,
    pub token_lifetime: Duration,
    pub default_limit: Limit,
    /// Every partner's limits, shared with the other API instances.
    pub limiter: SharedLimiter,
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

/// The caller a request's bearer token names, if it is valid (grants are cached briefly, see
/// `cache`).
pub async fn authenticate(auth: &Auth, pool: &db::Pool, headers: &HeaderMap) -> Result<Caller, ApiError> {
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
    let grant = match auth.grants.get(&hash) {
        Some(grant) => grant,
        None => {
            let generation = auth.grants.generation();
            let grant = db::partners::grant(pool, &hash).await?.ok_or_else(|| invalid("the bearer token is not valid"))?;
            auth.grants.put(hash, grant.clone(), generation);
            grant
        }
    };
    if grant.expires_at <= OffsetDateTime::now_utc() {
        return Err(invalid("the bearer token has expired; get a new one from the token endpoint"));
    }
    let limit = Limit {
        rate: grant.rate_per_second.unwrap_or(auth.default_limit.rate),
        burst: grant.rate_burst.map(f64::from).unwrap_or(auth.default_limit.burst),
    };
    Ok(Caller { partner_id: grant.partner_id, scopes: Scopes::from_strings(&grant.scopes), pmm1_key_ids: grant.pmm1_key_ids, limit })
}
