//! FHIR topic-based Subscriptions (R4B + Subscriptions R5 Backport): the SubscriptionTopic,
//! a partner's own Subscriptions (create, read, search, delete), `$status` and `$events`.
//! The notifier (the `notifier` crate) delivers; this module only manages and answers.

use crate::audit::with_members;
use crate::auth::Caller;
use crate::auth::scope::Interaction;
use crate::error::{ApiError, OperationOutcome};
use crate::http::resources::{Bundle, FormatOnly, Resource};
use crate::http::writeback::{content_is_json, json_body};
use crate::limits::RequestBody;
use crate::rest;
use crate::routes as paths;
use crate::state::AppState;
use axum::Extension;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use fhir::subscriptions::{self as subs, Kind};
use serde_json::{Value, json};
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

const SUBSCRIPTION: &str = "Subscription";
const TOPIC: &str = "SubscriptionTopic";

fn json_response(status: StatusCode, body: &Value) -> Response {
    let mut r = rest::bundle_response(body.to_string());
    *r.status_mut() = status;
    r
}

fn searchset(base: &str, self_url: &str, entries: Vec<(String, Value)>) -> Value {
    json!({
        "resourceType": "Bundle",
        "type": "searchset",
        "total": entries.len(),
        "link": [{ "relation": "self", "url": self_url }],
        "entry": entries.into_iter().map(|(path, r)| json!({ "fullUrl": format!("{base}/{path}"), "resource": r, "search": { "mode": "match" } })).collect::<Vec<_>>(),
    })
}

/// What a notification carries needs the scopes that reading it would: the composite itself
/// (`full-resource`) those of `$medication-profile`, the reference to it (`id-only`) Patient's;
/// for the insights topic, DetectedIssue's.
fn require_content_scopes(caller: &Caller, topic: &str, content: &str) -> Result<(), ApiError> {
    let insights = topic == subs::INSIGHTS_TOPIC_URL;
    match content {
        "full-resource" if insights => caller.require(&["DetectedIssue"], Interaction::Read),
        "full-resource" => caller.require(&crate::http::profile::PROFILE_TYPES, Interaction::Read),
        "id-only" if insights => caller.require(&["DetectedIssue"], Interaction::Read),
        "id-only" => caller.require(&["Patient"], Interaction::Read),
        _ => Ok(()),
    }
}

async fn own(state: &AppState, caller: &Caller, id: &str) -> Result<db::subscriptions::Subscription, ApiError> {
    let id = rest::parse_id(id)?;
    db::subscriptions::get(&state.pool, &caller.partner_id, id).await?.ok_or_else(|| ApiError::NotFound(format!("Subscription/{id} is not known")))
}

/// The SubscriptionTopics this server supports (one: medication-profile changes).
#[utoipa::path(get, path = paths::SUBSCRIPTION_TOPICS, tag = "Subscription", operation_id = "searchSubscriptionTopic",
    params(FormatOnly),
    responses(
        (status = 200, description = "A searchset Bundle with the SubscriptionTopics (medication-profile, insights)", body = Bundle, content_type = "application/fhir+json"),
        (status = 400, description = "Unknown parameter", body = OperationOutcome, content_type = "application/fhir+json"),
        crate::doc::NotAcceptable,
        crate::doc::NoToken,
        crate::doc::OutOfScope,
        crate::doc::RateLimited),
    security(("smart_backend" = [])))]
pub async fn topics(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    caller.require(&[TOPIC], Interaction::Search)?;
    rest::no_parameters(&rest::query_pairs(&headers, q.as_deref())?)?;
    let self_url = format!("{}/{TOPIC}", s.base_url);
    let topics = subs::topic_resources().into_iter().map(|t| (format!("{TOPIC}/{}", t["id"].as_str().unwrap_or_default()), t)).collect();
    Ok(json_response(StatusCode::OK, &searchset(&s.base_url, &self_url, topics)))
}

/// Read a SubscriptionTopic (`medication-profile` or `insights`).
#[utoipa::path(get, path = paths::SUBSCRIPTION_TOPIC, tag = "Subscription", operation_id = "readSubscriptionTopic",
    params(("id" = String, Path, description = "Logical id", pattern = "^[A-Za-z0-9.-]{1,64}$"), FormatOnly),
    responses(
        (status = 200, description = "The SubscriptionTopic", body = Resource, content_type = "application/fhir+json"),
        (status = 400, description = "Malformed id or parameter", body = OperationOutcome, content_type = "application/fhir+json"),
        (status = 404, description = "Not known", body = OperationOutcome, content_type = "application/fhir+json"),
        crate::doc::NotAcceptable,
        crate::doc::NoToken,
        crate::doc::OutOfScope,
        crate::doc::RateLimited),
    security(("smart_backend" = [])))]
pub async fn topic(
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    caller.require(&[TOPIC], Interaction::Read)?;
    rest::no_parameters(&rest::query_pairs(&headers, q.as_deref())?)?;
    let id = rest::parse_id(&id)?;
    let topic =
        subs::topic_by_id(id).ok_or_else(|| ApiError::NotFound(format!("SubscriptionTopic/{id} is not known; see GET /fhir/SubscriptionTopic")))?;
    Ok(json_response(StatusCode::OK, &topic))
}

/// Subscribe to a SubscriptionTopic. The subscription starts `requested`; the notifier's
/// handshake makes it `active`.
#[utoipa::path(post, path = paths::SUBSCRIPTIONS, tag = "Subscription", operation_id = "createSubscription",
    params(FormatOnly),
    request_body(content = Resource, content_type = "application/fhir+json", description = "A Subscription (Backport profile): criteria = the topic's canonical URL; optional backport-filter-criteria patient=Patient/<id>; channel rest-hook (with the signing-secret extension) or kafka (backport-channel-type)"),
    responses(
        (status = 201, description = "Created (status requested)", body = Resource, content_type = "application/fhir+json"),
        (status = 400, description = "Not JSON, or a malformed parameter", body = OperationOutcome, content_type = "application/fhir+json"),
        crate::doc::NotAcceptable,
        (status = 408, description = "The body did not arrive in time", body = OperationOutcome, content_type = "application/fhir+json"),
        crate::doc::TooLarge,
        crate::doc::NotFhirJson,
        (status = 422, description = "Not an acceptable Subscription (expression names the element: an endpoint that is not a public address, a reserved header, a heartbeat under the minimum), or the partner holds the most subscriptions it may", body = OperationOutcome, content_type = "application/fhir+json"),
        crate::doc::NoToken,
        crate::doc::OutOfScope,
        crate::doc::RateLimited),
    security(("smart_backend" = [])))]
pub async fn create(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
    RequestBody(body): RequestBody,
) -> Result<Response, ApiError> {
    caller.require(&[SUBSCRIPTION], Interaction::Create)?;
    rest::no_parameters(&rest::query_pairs(&headers, q.as_deref())?)?;
    content_is_json(&headers)?;
    let value = json_body(&body)?;
    let subscription = subs::accept(value, &caller.partner_id, s.subscription_limits, time::OffsetDateTime::now_utc())
        .map_err(|i| ApiError::Unprocessable { expression: i.expression, diagnostics: i.message })?;
    require_content_scopes(&caller, &subscription.topic, &subscription.content)?;
    if let Some(endpoint) = subscription.endpoint.as_deref().and_then(|e| reqwest::Url::parse(e).ok()) {
        // Checked again by the notifier at every connection; refused here so the partner knows.
        s.egress
            .check(&endpoint)
            .await
            .map_err(|refusal| ApiError::Unprocessable { expression: "Subscription.channel.endpoint".into(), diagnostics: refusal.to_string() })?;
    }
    if !db::subscriptions::create(&s.pool, &subscription, s.subscription_max_per_partner).await? {
        return Err(ApiError::BusinessRule(format!(
            "this partner holds {} subscriptions, the most it may; delete one it no longer needs first",
            s.subscription_max_per_partner
        )));
    }
    tracing::info!(partner = %caller.partner_id, subscription = %subscription.id, channel = %subscription.channel, "subscription created");
    let mut response = json_response(StatusCode::CREATED, &subs::render(&subscription));
    if let Ok(v) = HeaderValue::from_str(&format!("{}/{SUBSCRIPTION}/{}", s.base_url, subscription.id)) {
        response.headers_mut().insert(header::LOCATION, v);
    }
    Ok(with_members(response, subscription.member_id.into_iter().collect()))
}

#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub struct SubscriptionSearch {
    /// `requested`, `active`, `error` or `off`.
    #[param(pattern = "^(requested|active|error|off)$")]
    pub status: Option<String>,
    /// `json` (the only format served).
    #[param(rename = "_format", pattern = "^(json|application/json|application/fhir\\+json)$")]
    pub format: Option<String>,
}

/// The partner's own Subscriptions.
#[utoipa::path(get, path = paths::SUBSCRIPTIONS, tag = "Subscription", operation_id = "searchSubscription",
    params(SubscriptionSearch),
    responses(
        (status = 200, description = "A searchset Bundle", body = Bundle, content_type = "application/fhir+json"),
        (status = 400, description = "Unknown or malformed parameter", body = OperationOutcome, content_type = "application/fhir+json"),
        crate::doc::NotAcceptable,
        crate::doc::NoToken,
        crate::doc::OutOfScope,
        crate::doc::RateLimited),
    security(("smart_backend" = [])))]
pub async fn search(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    caller.require(&[SUBSCRIPTION], Interaction::Search)?;
    let pairs = rest::query_pairs(&headers, q.as_deref())?;
    let mut status = None;
    for (k, v) in &pairs {
        match (k.as_str(), v.as_str()) {
            ("status", "requested" | "active" | "error" | "off") if status.is_none() => status = Some(v.clone()),
            ("status", _) => return Err(ApiError::BadRequest("status must be one of requested, active, error, off (once)".into())),
            (other, _) => {
                return Err(ApiError::BadRequest(format!("unknown search parameter '{other}' for Subscription; supported: status, _format")));
            }
        }
    }
    let found = db::subscriptions::list(&s.pool, &caller.partner_id, status.as_deref()).await?;
    let self_url = rest::link(&s.base_url, SUBSCRIPTION, &pairs);
    let entries = found.iter().map(|x| (format!("{SUBSCRIPTION}/{}", x.id), subs::render(x))).collect();
    Ok(json_response(StatusCode::OK, &searchset(&s.base_url, &self_url, entries)))
}

/// Read one of the partner's Subscriptions, with its current status.
#[utoipa::path(get, path = paths::SUBSCRIPTION, tag = "Subscription", operation_id = "readSubscription",
    params(("id" = String, Path, description = "Logical id", pattern = "^[A-Za-z0-9.-]{1,64}$"), FormatOnly),
    responses(
        (status = 200, description = "The Subscription", body = Resource, content_type = "application/fhir+json"),
        (status = 400, description = "Malformed id or parameter", body = OperationOutcome, content_type = "application/fhir+json"),
        (status = 404, description = "Not known (or another partner's)", body = OperationOutcome, content_type = "application/fhir+json"),
        crate::doc::NotAcceptable,
        crate::doc::NoToken,
        crate::doc::OutOfScope,
        crate::doc::RateLimited),
    security(("smart_backend" = [])))]
pub async fn read(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    caller.require(&[SUBSCRIPTION], Interaction::Read)?;
    rest::no_parameters(&rest::query_pairs(&headers, q.as_deref())?)?;
    let subscription = own(&s, &caller, &id).await?;
    Ok(json_response(StatusCode::OK, &subs::render(&subscription)))
}

/// Delete one of the partner's Subscriptions, with its queue.
#[utoipa::path(delete, path = paths::SUBSCRIPTION, tag = "Subscription", operation_id = "deleteSubscription",
    params(("id" = String, Path, description = "Logical id", pattern = "^[A-Za-z0-9.-]{1,64}$"), FormatOnly),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, description = "Malformed id or parameter", body = OperationOutcome, content_type = "application/fhir+json"),
        (status = 404, description = "Not known (or another partner's)", body = OperationOutcome, content_type = "application/fhir+json"),
        crate::doc::NotAcceptable,
        crate::doc::NoToken,
        crate::doc::OutOfScope,
        crate::doc::RateLimited),
    security(("smart_backend" = [])))]
pub async fn delete(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    caller.require(&[SUBSCRIPTION], Interaction::Delete)?;
    rest::no_parameters(&rest::query_pairs(&headers, q.as_deref())?)?;
    let id = rest::parse_id(&id)?;
    if !db::subscriptions::delete(&s.pool, &caller.partner_id, id).await? {
        return Err(ApiError::NotFound(format!("Subscription/{id} is not known")));
    }
    tracing::info!(partner = %caller.partner_id, subscription = %id, "subscription deleted");
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `$status`: the subscription's status, its event count and its last error.
#[utoipa::path(get, path = paths::SUBSCRIPTION_STATUS, tag = "Subscription", operation_id = "subscriptionStatus",
    params(("id" = String, Path, description = "Logical id", pattern = "^[A-Za-z0-9.-]{1,64}$"), FormatOnly),
    responses(
        (status = 200, description = "A searchset Bundle with the SubscriptionStatus (type query-status)", body = Bundle, content_type = "application/fhir+json"),
        (status = 400, description = "Malformed id or parameter", body = OperationOutcome, content_type = "application/fhir+json"),
        (status = 404, description = "Not known (or another partner's)", body = OperationOutcome, content_type = "application/fhir+json"),
        crate::doc::NotAcceptable,
        crate::doc::NoToken,
        crate::doc::OutOfScope,
        crate::doc::RateLimited),
    security(("smart_backend" = [])))]
pub async fn status(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    caller.require(&[SUBSCRIPTION], Interaction::Read)?;
    rest::no_parameters(&rest::query_pairs(&headers, q.as_deref())?)?;
    let subscription = own(&s, &caller, &id).await?;
    let status = subs::status_resource(&s.base_url, &subscription, Kind::QueryStatus, &[]);
    let self_url = format!("{}/{SUBSCRIPTION}/{}/$status", s.base_url, subscription.id);
    let id = status["id"].as_str().unwrap_or_default().to_owned();
    Ok(json_response(StatusCode::OK, &searchset(&s.base_url, &self_url, vec![(format!("SubscriptionStatus/{id}"), status)])))
}

#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub struct EventsParams {
    /// The first event number to return (default 1).
    #[param(rename = "eventsSinceNumber", minimum = 1)]
    pub since: Option<i64>,
    /// The last event number to return (default: the latest; at most 100 events are returned).
    #[param(rename = "eventsUntilNumber", minimum = 1)]
    pub until: Option<i64>,
    /// `empty`, `id-only` or `full-resource` (default: the subscription's).
    #[param(pattern = "^(empty|id-only|full-resource)$")]
    pub content: Option<String>,
    /// `json` (the only format served).
    #[param(rename = "_format", pattern = "^(json|application/json|application/fhir\\+json)$")]
    pub format: Option<String>,
}

/// At most this many events per `$events` answer; ask again from the next number.
const EVENTS_PAGE: i64 = 100;

/// `$events`: replay past notifications by event number (delivered or not), e.g. after a
/// subscriber lost some. The answer is a notification Bundle (SubscriptionStatus type query-event).
#[utoipa::path(get, path = paths::SUBSCRIPTION_EVENTS, tag = "Subscription", operation_id = "subscriptionEvents",
    params(("id" = String, Path, description = "Logical id", pattern = "^[A-Za-z0-9.-]{1,64}$"), EventsParams),
    responses(
        (status = 200, description = "A notification Bundle (history) with the events asked for, at most 100", body = Bundle, content_type = "application/fhir+json"),
        (status = 400, description = "Malformed id or parameter", body = OperationOutcome, content_type = "application/fhir+json"),
        (status = 404, description = "Not known (or another partner's)", body = OperationOutcome, content_type = "application/fhir+json"),
        crate::doc::NotAcceptable,
        crate::doc::NoToken,
        crate::doc::OutOfScope,
        crate::doc::RateLimited),
    security(("smart_backend" = [])))]
pub async fn events(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    caller.require(&[SUBSCRIPTION], Interaction::Read)?;
    let pairs = rest::query_pairs(&headers, q.as_deref())?;
    let mut subscription = own(&s, &caller, &id).await?;
    let (mut since, mut until, mut content) = (1i64, None, None);
    let number = |name: &str, v: &str| {
        v.parse::<i64>().ok().filter(|n| *n >= 1).ok_or_else(|| ApiError::BadRequest(format!("{name} must be a positive integer")))
    };
    for (k, v) in &pairs {
        match k.as_str() {
            "eventsSinceNumber" => since = number(k, v)?,
            "eventsUntilNumber" => until = Some(number(k, v)?),
            "content" if matches!(v.as_str(), "empty" | "id-only" | "full-resource") => content = Some(v.clone()),
            "content" => return Err(ApiError::BadRequest("content must be empty, id-only or full-resource".into())),
            other => {
                return Err(ApiError::BadRequest(format!(
                    "unknown parameter '{other}' for $events; supported: eventsSinceNumber, eventsUntilNumber, content, _format"
                )));
            }
        }
    }
    if let Some(c) = content {
        subscription.content = c;
    }
    require_content_scopes(&caller, &subscription.topic, &subscription.content)?;
    let until = until.unwrap_or(i64::MAX).min(since.saturating_add(EVENTS_PAGE - 1));
    let viewer = caller.viewer();
    let with_bodies = subscription.content == "full-resource";
    let found = db::subscriptions::events(&s.pool, &subscription.id, viewer.partner_id, viewer.on, since, until, EVENTS_PAGE, with_bodies).await?;
    let mut members: Vec<String> = found.iter().filter(|e| e.attributed).map(|e| e.member_id.clone()).collect();
    members.sort();
    members.dedup();
    let bundle = subs::notification(&s.base_url, &subscription, Kind::QueryEvent, &found);
    Ok(with_members(json_response(StatusCode::OK, &bundle), members))
}

/// This module's routes.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(topics))
        .routes(routes!(topic))
        .routes(routes!(create))
        .routes(routes!(search))
        .routes(routes!(read))
        .routes(routes!(delete))
        .routes(routes!(status))
        .routes(routes!(events))
}
