//! FHIR topic-based Subscriptions (R4B with the Subscriptions R5 Backport): the one
//! SubscriptionTopic (medication-profile changes), what a partner's `Subscription` may ask for,
//! and the notification Bundles the notifier delivers and `$events` replays.

use crate::writeback::{Invalid, invalid_in, parse_strict};
use db::subscriptions::{Event, Subscription};
use fhir_sdk::r4b::resources::Subscription as FhirSubscription;
use serde_json::{Map, Value, json};
use time::OffsetDateTime;
use uuid::Uuid;

/// The canonical URL of the topic: a member's medication profile has a new version.
pub const TOPIC_URL: &str = "https://fhir-event-platform.example/SubscriptionTopic/medication-profile";
pub const TOPIC_ID: &str = "medication-profile";
/// The canonical URL of the insights topic: a member has a new or changed insight.
pub const INSIGHTS_TOPIC_URL: &str = "https://fhir-event-platform.example/SubscriptionTopic/insights";
pub const INSIGHTS_TOPIC_ID: &str = "insights";
/// Both topics, as the notifier fans events out for them.
pub const TOPICS: db::subscriptions::Topics<'static> = db::subscriptions::Topics { profile: TOPIC_URL, insights: INSIGHTS_TOPIC_URL };

const BACKPORT: &str = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/";
/// The channel-type code system of channels that FHIR R4 does not define (`kafka`).
pub const CHANNEL_TYPES: &str = "urn:fhir-event-platform:subscription-channel-type";
/// The extension on `Subscription.channel` carrying the HMAC key for signed rest-hook
/// notifications (hex, at least 32 bytes). Write-only: never served back.
pub const EXT_SIGNING_SECRET: &str = "urn:fhir-event-platform:extension:signing-secret";
/// The header of each rest-hook notification: `t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`.
pub const SIGNATURE_HEADER: &str = "X-Fhir-Event-Signature";

/// The topic's Kafka channel: notification Bundles for a partner's `kafka` subscriptions.
pub fn kafka_topic(partner_id: &str) -> String {
    platform::topics::partner_notifications(partner_id)
}

/// The SubscriptionTopic resource with `id`, if there is one.
pub fn topic_by_id(id: &str) -> Option<Value> {
    topic_resources().into_iter().find(|t| t["id"] == id)
}

/// Every SubscriptionTopic resource.
pub fn topic_resources() -> Vec<Value> {
    vec![topic_resource(), insights_topic_resource()]
}

/// The insights' SubscriptionTopic.
pub fn insights_topic_resource() -> Value {
    let detected_issue = "http://hl7.org/fhir/StructureDefinition/DetectedIssue";
    json!({
        "resourceType": "SubscriptionTopic",
        "id": INSIGHTS_TOPIC_ID,
        "url": INSIGHTS_TOPIC_URL,
        "version": "1",
        "title": "New or changed insights",
        "status": "active",
        "date": "2026-12-07",
        "description": "An insight about a member (a DetectedIssue derived from the medication profile: drug interaction, duplicate therapy, allergy alert, refill gap) appeared, changed, or stopped holding (status cancelled). Each event is one DetectedIssue version. Only members attributed to the subscriber are notified.",
        "resourceTrigger": [{
            "description": "A new version of a DetectedIssue",
            "resource": detected_issue,
            "supportedInteraction": ["create", "update"]
        }],
        "canFilterBy": [
            { "description": "Only this member: patient=Patient/<member id>", "resource": detected_issue, "filterParameter": "patient" },
            { "description": "Only these severities: severity=high (or a comma-separated list of high, moderate, low)", "resource": detected_issue, "filterParameter": "severity" },
            { "description": "Only these codes: code=DRG (or a comma-separated list of DRG, DUPTHPY, ALGY, refill-gap)", "resource": detected_issue, "filterParameter": "code" }
        ],
        "notificationShape": [{ "resource": detected_issue }]
    })
}

/// The profile's SubscriptionTopic resource.
pub fn topic_resource() -> Value {
    json!({
        "resourceType": "SubscriptionTopic",
        "id": TOPIC_ID,
        "url": TOPIC_URL,
        "version": "1",
        "title": "Medication profile changes",
        "status": "active",
        "date": "2026-11-27",
        "description": "A member's medication profile (GET Patient/{id}/$medication-profile) has a new version: it was created, its content changed, or the member was deleted. Only members attributed to the subscriber are notified.",
        "resourceTrigger": [{
            "description": "A new version of the member's composite medication profile Bundle",
            "resource": "http://hl7.org/fhir/StructureDefinition/Bundle",
            "supportedInteraction": ["create", "update", "delete"]
        }],
        "canFilterBy": [{
            "description": "Only this member: patient=Patient/<member id>",
            "resource": "http://hl7.org/fhir/StructureDefinition/Bundle",
            "filterParameter": "patient"
        }],
        "notificationShape": [{ "resource": "http://hl7.org/fhir/StructureDefinition/Bundle" }]
    })
}

/// Defaults and limits of what a subscription may ask for.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Whether rest-hook endpoints may be plain `http://` (tests, local demos); else HTTPS only.
    pub allow_http: bool,
    /// The shortest heartbeat period, in seconds.
    pub min_heartbeat_secs: i64,
}

/// Headers a subscription may not set on its notifications: the request's own framing and
/// routing (which would let a partner aim the notifier at another host or smuggle a request),
/// what the notifier sets itself, and the signature.
const RESERVED_HEADERS: [&str; 14] = [
    "host",
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
    "content-type",
    "expect",
    "forwarded",
];

/// Most headers a subscription may set, and the longest each may be (name and value).
const MAX_HEADERS: usize = 10;
const MAX_HEADER_BYTES: usize = 1024;

fn ext<'a>(extensions: Option<&'a Value>, url: &str) -> Option<&'a Value> {
    extensions.and_then(Value::as_array).into_iter().flatten().find(|e| e["url"] == url)
}

/// A partner's `Subscription`, checked: the topic is ours, the filter is `patient`, the
/// channel is a rest-hook (HTTPS unless allowed, with a signing secret) or `kafka`. Returns
/// the subscription to store (status `requested`: the notifier's handshake makes it active).
pub fn accept(value: Value, partner_id: &str, limits: Limits, now: OffsetDateTime) -> Result<Subscription, Invalid> {
    const T: &str = "Subscription";
    let Value::Object(object) = value else { return Err(invalid_in(T, "", "the body must be a JSON object")) };
    if object.get("resourceType").and_then(Value::as_str) != Some(T) {
        return Err(invalid_in(T, "resourceType", "must be Subscription"));
    }
    let mut elements = parse_strict::<FhirSubscription>(T, &object)?;
    let criteria = elements.get("criteria").and_then(Value::as_str).unwrap_or_default().to_owned();
    if criteria != TOPIC_URL && criteria != INSIGHTS_TOPIC_URL {
        return Err(invalid_in(T, "criteria", format!("must be the canonical URL of a SubscriptionTopic here: {TOPIC_URL} or {INSIGHTS_TOPIC_URL}")));
    }
    let insights = criteria == INSIGHTS_TOPIC_URL;
    let mut member_id = None;
    let (mut severities, mut codes): (Option<Vec<String>>, Option<Vec<String>>) = (None, None);
    let filters: Vec<&str> = elements
        .get("_criteria")
        .and_then(|c| c.get("extension"))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|e| e["url"] == format!("{BACKPORT}backport-filter-criteria"))
        .filter_map(|e| e["valueString"].as_str())
        .collect();
    for filter in filters {
        let query = filter.split_once('?').map_or(filter, |(_, q)| q);
        for (name, value) in serde_urlencoded::from_str::<Vec<(String, String)>>(query).unwrap_or_default() {
            let id = value.strip_prefix("Patient/").unwrap_or(&value);
            match name.as_str() {
                "patient" if platform::MemberId::parse(id).is_ok() && member_id.is_none() => member_id = Some(id.to_owned()),
                "severity" if insights && severities.is_none() => severities = Some(one_of(filter, &value, &["high", "moderate", "low"])?),
                "code" if insights && codes.is_none() => {
                    let bare: Vec<&str> = value.split(',').map(|c| c.rsplit('|').next().unwrap_or(c)).collect();
                    codes = Some(one_of(filter, &bare.join(","), &crate::insights::Kind::ALL.map(|k| k.code()))?);
                }
                _ if insights => {
                    return Err(invalid_in(
                        T,
                        "criteria.extension",
                        format!(
                            "filter '{filter}': supported are one each of patient=Patient/<member id>, severity=<high|moderate|low,…> and code=<DRG|DUPTHPY|ALGY|refill-gap,…>"
                        ),
                    ));
                }
                _ => {
                    return Err(invalid_in(T, "criteria.extension", format!("filter '{filter}': only one patient=Patient/<member id> is supported")));
                }
            }
        }
    }

    let channel = elements.get("channel").cloned().unwrap_or(Value::Null);
    let custom_type = ext(channel.get("_type").and_then(|t| t.get("extension")), &format!("{BACKPORT}backport-channel-type"))
        .and_then(|e| e.get("valueCoding"))
        .cloned();
    let kind = match (channel["type"].as_str(), &custom_type) {
        (_, Some(coding)) if coding["system"] == CHANNEL_TYPES && coding["code"] == "kafka" => "kafka",
        (_, Some(_)) => return Err(invalid_in(T, "channel.type", format!("the only additional channel type is {CHANNEL_TYPES}#kafka"))),
        (Some("rest-hook"), None) => "rest-hook",
        _ => return Err(invalid_in(T, "channel.type", "rest-hook, or kafka through the backport-channel-type extension")),
    };
    let mut endpoint = None;
    let mut secret = None;
    if kind == "rest-hook" {
        let url = channel["endpoint"].as_str().unwrap_or_default();
        let parsed = url::Url::parse(url).map_err(|_| invalid_in(T, "channel.endpoint", "required: the absolute URL of the partner's endpoint"))?;
        if parsed.scheme() != "https" && !(limits.allow_http && parsed.scheme() == "http") {
            return Err(invalid_in(T, "channel.endpoint", "must be an https:// URL"));
        }
        if parsed.host().is_none() || url.len() > 2048 {
            return Err(invalid_in(T, "channel.endpoint", "must name a host, in at most 2048 characters"));
        }
        endpoint = Some(url.to_owned());
        let hex_secret = ext(channel.get("extension"), EXT_SIGNING_SECRET).and_then(|e| e["valueString"].as_str()).unwrap_or_default();
        match hex::decode(hex_secret) {
            Ok(bytes) if bytes.len() >= 32 => secret = Some(bytes),
            _ => {
                return Err(invalid_in(
                    T,
                    "channel.extension",
                    format!("required: {EXT_SIGNING_SECRET} with at least 32 bytes as hex, the key of the {SIGNATURE_HEADER} header"),
                ));
            }
        }
    } else if channel.get("endpoint").is_some() {
        return Err(invalid_in(
            T,
            "channel.endpoint",
            format!("a kafka channel delivers to the partner's topic ({}); leave endpoint out", kafka_topic(partner_id)),
        ));
    }
    match channel["payload"].as_str() {
        Some("application/fhir+json") | Some("application/json") | None => {}
        Some(other) => return Err(invalid_in(T, "channel.payload", format!("'{other}' is not supported; use application/fhir+json"))),
    }
    let content = ext(channel.get("_payload").and_then(|p| p.get("extension")), &format!("{BACKPORT}backport-payload-content"))
        .and_then(|e| e["valueCode"].as_str())
        .unwrap_or("id-only");
    if !["empty", "id-only", "full-resource"].contains(&content) {
        return Err(invalid_in(T, "channel.payload.extension", "payload content must be empty, id-only or full-resource"));
    }
    let number = |name: &str, key: &str| ext(channel.get("extension"), &format!("{BACKPORT}{name}")).and_then(|e| e[key].as_i64());
    let heartbeat = number("backport-heartbeat-period", "valueUnsignedInt");
    let timeout = number("backport-timeout", "valueUnsignedInt").unwrap_or(10);
    let max_count = number("backport-max-count", "valuePositiveInt").unwrap_or(20);
    let min_heartbeat = limits.min_heartbeat_secs.clamp(1, 86_400);
    if heartbeat.is_some_and(|h| !(min_heartbeat..=86_400).contains(&h)) {
        return Err(invalid_in(T, "channel.extension", format!("backport-heartbeat-period must be {min_heartbeat} to 86400 seconds")));
    }
    if !(1..=60).contains(&timeout) {
        return Err(invalid_in(T, "channel.extension", "backport-timeout must be 1 to 60 seconds"));
    }
    if !(1..=100).contains(&max_count) {
        return Err(invalid_in(T, "channel.extension", "backport-max-count must be 1 to 100"));
    }
    let headers: Vec<String> = channel["header"].as_array().into_iter().flatten().filter_map(|h| h.as_str().map(str::to_owned)).collect();
    if headers.len() > MAX_HEADERS {
        return Err(invalid_in(T, "channel.header", format!("at most {MAX_HEADERS} headers")));
    }
    for h in &headers {
        let name = match h.split_once(':') {
            Some((name, value))
                if h.len() <= MAX_HEADER_BYTES
                    && http::header::HeaderName::from_bytes(name.trim().as_bytes()).is_ok()
                    && http::header::HeaderValue::from_str(value.trim()).is_ok() =>
            {
                name.trim().to_ascii_lowercase()
            }
            _ => return Err(invalid_in(T, "channel.header", format!("each header must be 'Name: value', at most {MAX_HEADER_BYTES} bytes"))),
        };
        if RESERVED_HEADERS.contains(&name.as_str()) || name.starts_with("proxy-") || name == SIGNATURE_HEADER.to_ascii_lowercase() {
            return Err(invalid_in(
                T,
                "channel.header",
                format!("'{name}' is set by the notifier (or names the connection itself); it cannot be set here"),
            ));
        }
    }
    let end_at = match elements.get("end").and_then(Value::as_str) {
        Some(end) => Some(
            OffsetDateTime::parse(end, &time::format_description::well_known::Rfc3339)
                .map_err(|_| invalid_in(T, "end", "must be an instant with a time zone"))?,
        ),
        None => None,
    };

    // What is stored and served: the resource as accepted, without the secret.
    let id = Uuid::new_v4().to_string();
    if let Some(Value::Object(channel)) = elements.get_mut("channel")
        && let Some(Value::Array(extensions)) = channel.get_mut("extension")
    {
        extensions.retain(|e| e["url"] != EXT_SIGNING_SECRET);
        if extensions.is_empty() {
            channel.remove("extension");
        }
    }
    elements.insert("id".into(), Value::String(id.clone()));
    elements.remove("meta");
    Ok(Subscription {
        id,
        partner_id: partner_id.to_owned(),
        topic: criteria,
        member_id,
        channel: kind.to_owned(),
        endpoint,
        secret,
        headers,
        content: content.to_owned(),
        heartbeat_secs: heartbeat.map(|h| h as i32),
        timeout_secs: timeout as i32,
        max_count: max_count as i32,
        status: "requested".to_owned(),
        error: None,
        events_since_start: 0,
        body: Value::Object(elements).to_string(),
        created_at: now,
        end_at,
        last_sent_at: None,
        failing_since: None,
        attempts: 0,
        delivery_failures: 0,
        severities,
        codes,
        interrupted_lease: None,
    })
}

/// The values of a comma-separated filter, each one of `allowed`.
fn one_of(filter: &str, value: &str, allowed: &[&str]) -> Result<Vec<String>, Invalid> {
    let values: Vec<String> = value.split(',').map(|v| v.trim().to_owned()).collect();
    match values.iter().find(|v| !allowed.contains(&v.as_str())) {
        Some(bad) => {
            Err(invalid_in("Subscription", "criteria.extension", format!("filter '{filter}': '{bad}' is not one of {}", allowed.join(", "))))
        }
        None => Ok(values),
    }
}

/// The Subscription as served: the accepted resource with its current status (and error).
pub fn render(s: &Subscription) -> Value {
    let mut v: Map<String, Value> = serde_json::from_str(&s.body).unwrap_or_default();
    v.insert("status".into(), Value::String(s.status.clone()));
    match &s.error {
        Some(e) if s.status == "error" => v.insert("error".into(), Value::String(e.clone())),
        _ => v.remove("error"),
    };
    let mut out = Map::new();
    out.insert("resourceType".into(), json!("Subscription"));
    out.insert("id".into(), json!(s.id));
    out.extend(v.into_iter().filter(|(k, _)| k != "resourceType" && k != "id"));
    Value::Object(out)
}

/// What a notification is (SubscriptionStatus.type).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Handshake,
    Heartbeat,
    EventNotification,
    QueryEvent,
    QueryStatus,
}

impl Kind {
    pub fn code(self) -> &'static str {
        match self {
            Kind::Handshake => "handshake",
            Kind::Heartbeat => "heartbeat",
            Kind::EventNotification => "event-notification",
            Kind::QueryEvent => "query-event",
            Kind::QueryStatus => "query-status",
        }
    }
}

/// The reference a notification uses for a member's composite.
pub fn focus(member_id: &str) -> String {
    format!("Patient/{member_id}/$medication-profile")
}

/// What an event is about: the member's composite, or one version of a DetectedIssue.
/// (reference, its resource type, the unversioned URL of the resource).
fn event_focus(e: &Event) -> (String, &'static str, String) {
    match &e.resource_id {
        Some(id) => (format!("DetectedIssue/{id}/_history/{}", e.version_id), "DetectedIssue", format!("DetectedIssue/{id}")),
        None => (focus(&e.member_id), "Bundle", focus(&e.member_id)),
    }
}

/// The SubscriptionStatus of a subscription, for notifications and `$status`.
pub fn status_resource(base_url: &str, s: &Subscription, kind: Kind, events: &[Event]) -> Value {
    let mut status = json!({
        "resourceType": "SubscriptionStatus",
        "id": Uuid::new_v4().to_string(),
        "status": s.status,
        "type": kind.code(),
        "eventsSinceSubscriptionStart": s.events_since_start.to_string(),
        "subscription": { "reference": format!("{base_url}/Subscription/{}", s.id) },
        "topic": s.topic,
    });
    if !events.is_empty() {
        status["notificationEvent"] = events
            .iter()
            .map(|e| {
                let mut n = json!({ "eventNumber": e.event_number.to_string(), "timestamp": platform::time::instant(e.occurred_at) });
                // An event of a member no longer attributed to the partner keeps its number (so
                // the subscriber sees no gap) and says nothing else.
                if s.content != "empty" && e.attributed {
                    let (reference, kind, _) = event_focus(e);
                    n["focus"] = json!({ "reference": format!("{base_url}/{reference}"), "type": kind });
                }
                n
            })
            .collect();
    }
    if let (Some(error), "error") = (&s.error, s.status.as_str()) {
        status["error"] = json!([{ "text": error }]);
    }
    status
}

/// A notification Bundle as the Backport IG defines it for R4B (which has no
/// `subscription-notification` Bundle type): a `history` Bundle whose first entry is the
/// SubscriptionStatus, then one entry per event as the payload content asks (none for `empty`;
/// the reference for `id-only`; also the composite, unless the member was deleted, for
/// `full-resource`). Every entry has `request` and `response`, as history Bundles must. Events
/// of members no longer attributed to the partner have no entry.
pub fn notification(base_url: &str, s: &Subscription, kind: Kind, events: &[Event]) -> Value {
    let status = status_resource(base_url, s, kind, events);
    let mut entries = vec![json!({
        "fullUrl": format!("urn:uuid:{}", status["id"].as_str().unwrap_or_default()),
        "resource": status,
        "request": { "method": "GET", "url": format!("Subscription/{}/$status", s.id) },
        "response": { "status": "200" },
    })];
    if s.content != "empty" {
        for e in events.iter().filter(|e| e.attributed) {
            let (_, _, url) = event_focus(e);
            let (method, outcome) = if e.deleted {
                ("DELETE", "204")
            } else if e.version_id == 1 {
                ("POST", "201")
            } else {
                ("PUT", "200")
            };
            let mut entry = json!({
                "fullUrl": format!("{base_url}/{url}"),
                "request": { "method": method, "url": url },
                "response": { "status": outcome, "etag": format!("W/\"{}\"", e.version_id) },
            });
            if s.content == "full-resource"
                && let Some(body) = e.body.as_deref().filter(|_| !e.deleted)
            {
                entry["resource"] = serde_json::from_str(body).unwrap_or(Value::Null);
            }
            entries.push(entry);
        }
    }
    json!({
        "resourceType": "Bundle",
        "id": Uuid::new_v4().to_string(),
        "type": "history",
        "timestamp": platform::time::instant(OffsetDateTime::now_utc()),
        "entry": entries,
    })
}

/// The signature header value for a rest-hook notification body.
pub fn signature(secret: &[u8], at_unix: i64, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let mut ctx = ring::hmac::Context::with_key(&key);
    ctx.update(at_unix.to_string().as_bytes());
    ctx.update(b".");
    ctx.update(body);
    format!("t={at_unix},v1={}", hex::encode(ctx.sign().as_ref()))
}

#[cfg(test)]
mod tests;
