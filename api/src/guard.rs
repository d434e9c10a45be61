//! The middleware in front of every route: who is calling (a bearer token, checked by
//! `crate::auth`), within which rates, and the record of every access on the audit trail
//! (`crate::audit`) before its response leaves.

use crate::audit::{self, Audited};
use crate::auth::authenticate;
use crate::error::ApiError;
use crate::routes;
use crate::state::AppState;
use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::net::SocketAddr;

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
    let is_token_endpoint = path == routes::TOKEN;
    if !routes::is_protected(&path) && !is_token_endpoint {
        return next.run(request).await;
    }
    let route = request.extensions().get::<MatchedPath>().map(|m| m.as_str().to_owned());
    let address = request.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip().to_string());
    let address_limit = state.auth.address_limit;
    let mut partner_id = None;
    let response = match address.as_deref().map(|a| state.auth.address_limiter.check(a, address_limit)) {
        Some(Err(retry_after)) => ApiError::TooManyRequests(retry_after).respond_on(&path),
        _ if is_token_endpoint => {
            if let Some(a) = &address {
                let _ = state.auth.address_limiter.take(a, address_limit);
            }
            next.run(request).await
        }
        _ => match authenticate(&state.auth, &state.pool, request.headers()).await {
            Ok(caller) => {
                partner_id = Some(caller.partner_id.clone());
                match state.auth.limiter.take(&caller.partner_id, caller.limit).await {
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
        Err(()) => ApiError::AuditUnavailable.respond_on(&path),
    }
}
