//! Events as the systems of record publish them (native envelope), for the `sor.*` topics.

use devtools::generator::SorMessage;
use uuid::Uuid;

/// An attribution event: `member` is served by `partner` from 2026-01-01, open-ended.
pub fn attribution(member: &str, partner: &str) -> SorMessage {
    SorMessage {
        topic: platform::topics::ATTRIBUTION,
        key: member.to_owned(),
        value: Some(native_event(
            "upsert",
            "attribution",
            1,
            member,
            &format!("AT-{member}-{partner}"),
            Some(serde_json::json!({ "partner_id": partner, "relationship": "pcp", "period_start": "2026-01-01" })),
        )),
    }
}

/// A native envelope event, as a system of record would publish it.
pub fn native_event(op: &str, source: &str, version: i64, member: &str, record: &str, data: Option<serde_json::Value>) -> Vec<u8> {
    let mut v = serde_json::json!({ "event_id": Uuid::new_v4().to_string(), "op": op, "source": source,
        "occurred_at": "2026-11-20T10:15:00Z", "version": version, "member_id": member, "record_id": record });
    if let Some(d) = data {
        v["data"] = d;
    }
    serde_json::to_vec(&v).unwrap_or_default()
}

/// An upsert by a system of record (native envelope) as a message on its topic, keyed by member.
pub fn upsert(topic: &'static str, source: &str, version: i64, member: &str, record: &str, data: serde_json::Value) -> SorMessage {
    SorMessage { topic, key: member.to_owned(), value: Some(native_event("upsert", source, version, member, record, Some(data))) }
}

/// A member's demographics from `enrollment`, version 1 (the record id is the member id).
pub fn demographics(member: &str, data: serde_json::Value) -> SorMessage {
    upsert(platform::topics::DEMOGRAPHICS, "enrollment", 1, member, member, data)
}

/// A pharmacy claim (`rx-claims`) for `record` of the member.
pub fn medication(member: &str, record: &str, version: i64, rxnorm_code: &str, status: &str) -> SorMessage {
    upsert(platform::topics::MEDICATIONS, "rx-claims", version, member, record, serde_json::json!({ "rxnorm_code": rxnorm_code, "status": status }))
}

/// A deletion by a system of record (native envelope) of `record` of the member.
pub fn deletion(topic: &'static str, source: &str, version: i64, member: &str, record: &str) -> SorMessage {
    SorMessage { topic, key: member.to_owned(), value: Some(native_event("delete", source, version, member, record, None)) }
}
