//! FHIR REST conventions shared by the handlers: content negotiation, ids, search parameters,
//! `meta` on served resources, ETags and Bundles.

use crate::error::{ApiError, fhir_json};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use db::resources::{Criteria, ResourceVersion};
use std::fmt::Write;
use time::{Duration, OffsetDateTime};

/// The resource types served, and what each can be searched by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResourceType {
    Patient,
    MedicationStatement,
    AllergyIntolerance,
    Immunization,
    Task,
    /// Who wrote each version of a partner's report (partner write-back).
    Provenance,
    /// An insight derived from the medication profile.
    DetectedIssue,
}

impl ResourceType {
    pub const ALL: [ResourceType; 7] = [
        ResourceType::Patient,
        ResourceType::MedicationStatement,
        ResourceType::AllergyIntolerance,
        ResourceType::Immunization,
        ResourceType::Task,
        ResourceType::Provenance,
        ResourceType::DetectedIssue,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ResourceType::Patient => "Patient",
            ResourceType::MedicationStatement => "MedicationStatement",
            ResourceType::AllergyIntolerance => "AllergyIntolerance",
            ResourceType::Immunization => "Immunization",
            ResourceType::Task => "Task",
            ResourceType::Provenance => "Provenance",
            ResourceType::DetectedIssue => "DetectedIssue",
        }
    }

    /// Search parameters beyond `_lastUpdated`, `_count`, `_cursor` and `_format`:
    /// (name, kind) where kind is `reference`, `token` or `id`.
    pub fn search_params(self) -> &'static [(&'static str, &'static str)] {
        match self {
            ResourceType::Patient => &[("_id", "token")],
            ResourceType::MedicationStatement => &[("patient", "reference"), ("code", "token"), ("status", "token")],
            ResourceType::AllergyIntolerance => &[("patient", "reference"), ("code", "token"), ("clinical-status", "token")],
            ResourceType::Immunization => &[("patient", "reference"), ("vaccine-code", "token"), ("status", "token")],
            ResourceType::Task => &[("patient", "reference"), ("code", "token"), ("status", "token")],
            ResourceType::Provenance => &[("patient", "reference")],
            ResourceType::DetectedIssue => &[("patient", "reference"), ("code", "token"), ("status", "token")],
        }
    }
}

/// `Accept` and `_format`: JSON only (`application/fhir+json`, `application/json`, `json`).
pub fn negotiate(headers: &HeaderMap, format: Option<&str>) -> Result<(), ApiError> {
    if let Some(f) = format {
        if !matches!(f, "json" | "application/json" | "application/fhir+json") {
            return Err(ApiError::NotAcceptable(format!("_format={f} is not supported; this server speaks JSON (_format=json)")));
        }
        return Ok(());
    }
    let Some(accept) = headers.get(header::ACCEPT) else {
        return Ok(());
    };
    let accept = accept.to_str().unwrap_or_default();
    let acceptable = accept.split(',').any(|part| {
        let media = part.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
        matches!(media.as_str(), "" | "*/*" | "application/*" | "application/json" | "application/fhir+json")
    });
    if acceptable { Ok(()) } else { Err(ApiError::NotAcceptable("only application/fhir+json (or application/json) can be produced".into())) }
}

/// A FHIR id: `[A-Za-z0-9\-\.]{1,64}`.
pub fn parse_id(raw: &str) -> Result<&str, ApiError> {
    let ok = !raw.is_empty() && raw.len() <= 64 && raw.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    if ok { Ok(raw) } else { Err(ApiError::BadRequest("the id must be 1 to 64 characters of A-Z, a-z, 0-9, '-' or '.'".into())) }
}

pub fn parse_version(raw: &str) -> Result<i64, ApiError> {
    raw.parse::<i64>()
        .ok()
        .filter(|v| *v > 0 && raw.bytes().all(|b| b.is_ascii_digit()))
        .ok_or_else(|| ApiError::BadRequest("the version id must be a positive integer".into()))
}

/// Query parameters as pairs, with `_format` checked and removed.
pub fn query_pairs(headers: &HeaderMap, raw: Option<&str>) -> Result<Vec<(String, String)>, ApiError> {
    let pairs: Vec<(String, String)> = match raw {
        Some(q) => serde_urlencoded::from_str(q).map_err(|_| ApiError::BadRequest("the query string is not well formed".into()))?,
        None => Vec::new(),
    };
    // No FHIR search value contains control characters (and PostgreSQL text cannot hold NUL).
    if let Some((k, _)) = pairs.iter().find(|(k, v)| k.chars().chain(v.chars()).any(char::is_control)) {
        return Err(ApiError::BadRequest(format!("parameter '{}' contains control characters", k.escape_debug())));
    }
    let format = pairs.iter().find(|(k, _)| k == "_format").map(|(_, v)| v.as_str());
    negotiate(headers, format)?;
    Ok(pairs.into_iter().filter(|(k, _)| k != "_format").collect())
}

/// Operations that take no parameters but `_format`.
pub fn no_parameters(pairs: &[(String, String)]) -> Result<(), ApiError> {
    match pairs.first() {
        Some((k, _)) => Err(ApiError::BadRequest(format!("unknown parameter '{k}': this operation takes none but _format"))),
        None => Ok(()),
    }
}

pub const DEFAULT_COUNT: i64 = 50;
pub const MAX_COUNT: i64 = 500;

/// A parsed search request.
#[derive(Debug, Default)]
pub struct Search {
    pub criteria: Criteria,
    pub count: i64,
    pub cursor: Option<String>,
    /// The parameters to repeat in paging links (without `_cursor`).
    pub link_params: Vec<(String, String)>,
}

pub fn parse_search(rt: ResourceType, pairs: Vec<(String, String)>) -> Result<Search, ApiError> {
    let mut s = Search { count: DEFAULT_COUNT, ..Search::default() };
    let mut from: Option<OffsetDateTime> = None;
    let mut to: Option<OffsetDateTime> = None;
    let mut seen = std::collections::HashSet::new();
    for (name, value) in pairs {
        let repeatable = name == "_lastUpdated";
        if !repeatable && !seen.insert(name.clone()) {
            return Err(ApiError::BadRequest(format!("parameter '{name}' given more than once")));
        }
        if name != "_cursor" {
            s.link_params.push((name.clone(), value.clone()));
        }
        if value.is_empty() {
            return Err(ApiError::BadRequest(format!("parameter '{name}' has no value")));
        }
        if value.contains(',') && name != "_cursor" {
            return Err(ApiError::BadRequest(format!("parameter '{name}': several values (',') are not supported")));
        }
        let kind = rt.search_params().iter().find(|(n, _)| *n == name).map(|(_, k)| *k);
        match (name.as_str(), kind) {
            ("_count", _) => {
                s.count = value
                    .parse::<i64>()
                    .ok()
                    .filter(|c| (1..=MAX_COUNT).contains(c))
                    .ok_or_else(|| ApiError::BadRequest(format!("_count must be an integer from 1 to {MAX_COUNT}")))?;
            }
            ("_cursor", _) => s.cursor = Some(parse_id(&value).map_err(|_| ApiError::BadRequest("_cursor is not valid".into()))?.to_owned()),
            ("_lastUpdated", _) => {
                let (lo, hi) = parse_date_param("_lastUpdated", &value)?;
                if let Some(lo) = lo {
                    from = Some(from.map_or(lo, |f| f.max(lo)));
                }
                if let Some(hi) = hi {
                    to = Some(to.map_or(hi, |t| t.min(hi)));
                }
            }
            ("_id", Some(_)) => s.criteria.id = Some(parse_id(&value)?.to_owned()),
            ("patient", Some(_)) => {
                let id = value.strip_prefix("Patient/").unwrap_or(&value);
                s.criteria.member_id =
                    Some(parse_id(id).map_err(|_| ApiError::BadRequest("patient must be an id or Patient/<id>".into()))?.to_owned());
            }
            ("code" | "vaccine-code", Some(_)) => match value.split_once('|') {
                Some((system, code)) => {
                    if !system.is_empty() {
                        s.criteria.code_system = Some(system.to_owned());
                    }
                    if code.is_empty() {
                        return Err(ApiError::BadRequest(format!("{name}: a code is required (system|code or code)")));
                    }
                    s.criteria.code = Some(code.to_owned());
                }
                None => s.criteria.code = Some(value),
            },
            ("status" | "clinical-status", Some(_)) => s.criteria.status = Some(value),
            _ => {
                let known: Vec<&str> = rt.search_params().iter().map(|(n, _)| *n).collect();
                return Err(ApiError::BadRequest(format!(
                    "unknown search parameter '{name}' for {}; supported: {}, _lastUpdated, _count, _format",
                    rt.name(),
                    known.join(", ")
                )));
            }
        }
    }
    s.criteria.updated_from = from;
    s.criteria.updated_to = to;
    Ok(s)
}

/// A date parameter's value (`_lastUpdated`, `date`) with its prefix, as a half-open interval `[lo, hi)`.
pub fn parse_date_param(name: &str, raw: &str) -> Result<(Option<OffsetDateTime>, Option<OffsetDateTime>), ApiError> {
    let (prefix, value) = match raw.get(..2) {
        Some(p @ ("eq" | "gt" | "ge" | "lt" | "le" | "sa" | "eb")) => (p, &raw[2..]),
        Some("ne" | "ap") => {
            return Err(ApiError::BadRequest(format!("{name}: prefix '{}' is not supported", &raw[..2])));
        }
        _ => ("eq", raw),
    };
    let (start, end) =
        date_interval(value).ok_or_else(|| ApiError::BadRequest(format!("{name}: expected [prefix]YYYY, YYYY-MM, YYYY-MM-DD or an instant")))?;
    Ok(match prefix {
        "eq" => (Some(start), Some(end)),
        "gt" | "sa" => (Some(end), None),
        "ge" => (Some(start), None),
        "lt" | "eb" => (None, Some(start)),
        _ => (None, Some(end)), // le
    })
}

/// The interval a FHIR date or dateTime value covers at its precision. An interval that ends
/// past the last instant the `time` crate (and so this server) represents, the end of year
/// 9999, ends at that instant: `gt9999` is a valid search that matches nothing, not an error.
fn date_interval(v: &str) -> Option<(OffsetDateTime, OffsetDateTime)> {
    use time::format_description::well_known::Rfc3339;
    use time::{Date, Month, Time};
    let bytes = v.as_bytes();
    let num = |r: std::ops::Range<usize>| v.get(r).filter(|s| s.bytes().all(|b| b.is_ascii_digit())).and_then(|s| s.parse::<i32>().ok());
    let day = |y, m, d| Date::from_calendar_date(y, Month::try_from(m as u8).ok()?, d as u8).ok().map(|d| d.midnight().assume_utc());
    let end_of_time = Date::MAX.with_time(Time::MAX).assume_utc();
    let (start, end) = match bytes.len() {
        4 => {
            let y = num(0..4)?;
            (day(y, 1, 1)?, day(y + 1, 1, 1))
        }
        7 if bytes[4] == b'-' => {
            let (y, m) = (num(0..4)?, num(5..7)?);
            let start = day(y, m, 1)?;
            (start, if m == 12 { day(y + 1, 1, 1) } else { day(y, m + 1, 1) })
        }
        10 if bytes[4] == b'-' && bytes[7] == b'-' => {
            let start = day(num(0..4)?, num(5..7)?, num(8..10)?)?;
            (start, start.checked_add(Duration::days(1)))
        }
        _ => {
            let t = OffsetDateTime::parse(v, &Rfc3339).ok()?;
            (t, t.checked_add(Duration::milliseconds(1)))
        }
    };
    Some((start, end.unwrap_or(end_of_time)))
}

/// FHIR instant with milliseconds, UTC.
pub use platform::time::instant;

/// HTTP-date (IMF-fixdate) for `Last-Modified`.
pub fn http_date(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    const DAYS: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];
    const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    format!(
        "{}, {:02} {} {:04} {:02}:{:02}:{:02} GMT",
        DAYS[t.weekday().number_days_from_monday() as usize],
        t.day(),
        MONTHS[t.month() as usize - 1],
        t.year(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// The stored resource with `meta.versionId` and `meta.lastUpdated` added. Stored resources
/// are serialized by fhir-sdk with `resourceType`, `id`, then `meta` (always present, holding
/// `meta.source`), so the first `"meta":{` is the resource's own.
pub fn with_meta(body: &str, version_id: i64, last_updated: OffsetDateTime) -> String {
    let meta = format!("\"meta\":{{\"versionId\":\"{version_id}\",\"lastUpdated\":\"{}\",", instant(last_updated));
    match body.find("\"meta\":{") {
        Some(at) => {
            let rest = &body[at + "\"meta\":{".len()..];
            let mut out = String::with_capacity(body.len() + meta.len());
            out.push_str(&body[..at]);
            out.push_str(&meta);
            if rest.starts_with('}') {
                out.pop(); // no trailing comma before an empty meta's brace
            }
            out.push_str(rest);
            out
        }
        None => body.to_owned(),
    }
}

pub fn etag(version_id: i64) -> String {
    format!("W/\"{version_id}\"")
}

pub use db::resources::IfNoneMatch;

/// What `If-None-Match` asks: `*` (any version), or the versions whose ETags it lists (weak
/// `W/"3"` or strong `"3"`; anything else names no version of ours).
pub fn if_none_match(headers: &HeaderMap) -> Option<IfNoneMatch> {
    let value = headers.get(header::IF_NONE_MATCH)?.to_str().ok()?;
    let mut versions = Vec::new();
    for tag in value.split(',').map(str::trim) {
        if tag == "*" {
            return Some(IfNoneMatch::Any);
        }
        let quoted = tag.strip_prefix("W/").unwrap_or(tag);
        let number = quoted.strip_prefix('"').and_then(|q| q.strip_suffix('"'));
        if let Some(v) = number.and_then(|v| v.parse::<i64>().ok().filter(|n| n.to_string() == v)) {
            versions.push(v);
        }
    }
    Some(IfNoneMatch::Versions(versions))
}

/// True when `If-None-Match` names this version.
pub fn not_modified(headers: &HeaderMap, version_id: i64) -> bool {
    if_none_match(headers).is_some_and(|m| m.matches(version_id))
}

/// A resource version as a response: the body with meta, `ETag`, `Last-Modified`; or 304.
pub fn versioned_response(headers: &HeaderMap, version_id: i64, last_updated: OffsetDateTime, body: impl Into<axum::body::Body>) -> Response {
    version_response(not_modified(headers, version_id), version_id, last_updated, body)
}

/// As `versioned_response`, when whether the client's copy is current was decided elsewhere.
pub fn version_response(not_modified: bool, version_id: i64, last_updated: OffsetDateTime, body: impl Into<axum::body::Body>) -> Response {
    let mut response = if not_modified {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        (StatusCode::OK, [(header::CONTENT_TYPE, fhir_json())], body.into()).into_response()
    };
    let h = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&etag(version_id)) {
        h.insert(header::ETAG, v);
    }
    if let Ok(v) = HeaderValue::from_str(&http_date(last_updated)) {
        h.insert(header::LAST_MODIFIED, v);
    }
    response
}

/// Serves one version of a resource, or 410 for a deletion.
pub fn resource_response(headers: &HeaderMap, rt: ResourceType, v: ResourceVersion) -> Result<Response, ApiError> {
    match v.body {
        Some(body) => Ok(versioned_response(headers, v.version_id, v.last_updated, with_meta(&body, v.version_id, v.last_updated))),
        None => Err(ApiError::Gone(format!("{}/{} was deleted (version {})", rt.name(), v.resource_id, v.version_id))),
    }
}

/// A link URL: `base/path?params`.
pub fn link(base: &str, path: &str, params: &[(String, String)]) -> String {
    let mut url = format!("{base}/{path}");
    if !params.is_empty() {
        url.push('?');
        url.push_str(&serde_urlencoded::to_string(params).unwrap_or_default());
    }
    url
}

/// A `searchset` Bundle of current resources, with `self` and (when there may be more) `next`.
pub fn searchset(base: &str, rt: ResourceType, total: i64, page: &[ResourceVersion], self_url: &str, next_url: Option<&str>) -> String {
    let mut out = String::with_capacity(256 + page.iter().map(|v| v.body.as_ref().map_or(0, |b| b.len() + 160)).sum::<usize>());
    let _ = write!(
        out,
        "{{\"resourceType\":\"Bundle\",\"type\":\"searchset\",\"total\":{total},\"link\":[{{\"relation\":\"self\",\"url\":{}}}",
        json_string(self_url)
    );
    if let Some(next) = next_url {
        let _ = write!(out, ",{{\"relation\":\"next\",\"url\":{}}}", json_string(next));
    }
    out.push_str("],\"entry\":[");
    let mut first = true;
    for v in page {
        let Some(body) = &v.body else { continue };
        if !first {
            out.push(',');
        }
        first = false;
        let _ = write!(
            out,
            "{{\"fullUrl\":{},\"resource\":{},\"search\":{{\"mode\":\"match\"}}}}",
            json_string(&format!("{base}/{}/{}", rt.name(), v.resource_id)),
            with_meta(body, v.version_id, v.last_updated)
        );
    }
    out.push_str("]}");
    out
}

/// A `history` Bundle of one resource's versions, newest first.
pub fn history_bundle(base: &str, rt: ResourceType, id: &str, total: i64, versions: &[ResourceVersion], self_url: &str) -> String {
    let mut out = format!(
        "{{\"resourceType\":\"Bundle\",\"type\":\"history\",\"total\":{total},\"link\":[{{\"relation\":\"self\",\"url\":{}}}],\"entry\":[",
        json_string(self_url)
    );
    for (i, v) in versions.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        // fullUrl names the resource (bdl-8: never a version); response.location the version.
        let url = format!("{}/{id}", rt.name());
        let full = json_string(&format!("{base}/{url}"));
        let location = json_string(&format!("{url}/_history/{}", v.version_id));
        match &v.body {
            Some(body) => {
                let method = if v.version_id == 1 { "POST" } else { "PUT" };
                let status = if v.version_id == 1 { "201 Created" } else { "200 OK" };
                let _ = write!(
                    out,
                    "{{\"fullUrl\":{full},\"resource\":{},\"request\":{{\"method\":\"{method}\",\"url\":{}}},\"response\":{{\"status\":\"{status}\",\"location\":{location},\"etag\":{},\"lastModified\":\"{}\"}}}}",
                    with_meta(body, v.version_id, v.last_updated),
                    json_string(&url),
                    json_string(&etag(v.version_id)),
                    instant(v.last_updated)
                );
            }
            None => {
                let _ = write!(
                    out,
                    "{{\"fullUrl\":{full},\"request\":{{\"method\":\"DELETE\",\"url\":{}}},\"response\":{{\"status\":\"204 No Content\",\"location\":{location},\"etag\":{},\"lastModified\":\"{}\"}}}}",
                    json_string(&url),
                    json_string(&etag(v.version_id)),
                    instant(v.last_updated)
                );
            }
        }
    }
    out.push_str("]}");
    out
}

fn json_string(s: &str) -> String {
    serde_json::Value::String(s.to_owned()).to_string()
}

pub fn bundle_response(body: String) -> Response {
    (StatusCode::OK, [(header::CONTENT_TYPE, fhir_json())], body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn meta_is_added_to_the_resource_meta() {
        let t = OffsetDateTime::from_unix_timestamp(1_764_000_000).unwrap();
        let body = r#"{"resourceType":"Patient","id":"M1","meta":{"source":"urn:sor:x"},"gender":"male"}"#;
        let v: serde_json::Value = serde_json::from_str(&with_meta(body, 3, t)).unwrap();
        assert_eq!(v["meta"]["versionId"], "3");
        assert_eq!(v["meta"]["source"], "urn:sor:x");
        assert_eq!(v["meta"]["lastUpdated"], "2025-11-24T16:00:00.000Z");
        let empty = r#"{"resourceType":"Patient","id":"M1","meta":{}}"#;
        let v: serde_json::Value = serde_json::from_str(&with_meta(empty, 1, t)).unwrap();
        assert_eq!(v["meta"]["versionId"], "1");
        assert_eq!(http_date(t), "Mon, 24 Nov 2025 16:00:00 GMT");
    }

    #[test]
    fn last_updated_prefixes() {
        let (lo, hi) = parse_date_param("_lastUpdated", "2026-11-20").unwrap();
        assert_eq!(instant(lo.unwrap()), "2026-11-20T00:00:00.000Z");
        assert_eq!(instant(hi.unwrap()), "2026-11-21T00:00:00.000Z");
        assert_eq!(parse_date_param("_lastUpdated", "gt2026-11").unwrap(), (date_interval("2026-12").map(|d| d.0), None));
        assert_eq!(parse_date_param("_lastUpdated", "lt2026").unwrap().1, date_interval("2026").map(|d| d.0));
        // The last day, month and year this server represents end at its last instant: after
        // them is an empty range (schemathesis sent `gt9999`), up to them is everything.
        let end_of_time = time::Date::MAX.with_time(time::Time::MAX).assume_utc();
        for after in ["gt9999", "sa9999-12", "gt9999-12-31", "gt9999-12-31T23:59:59.999Z"] {
            assert_eq!(parse_date_param("_lastUpdated", after).unwrap(), (Some(end_of_time), None), "{after}");
        }
        for upto in ["le9999", "9999-12-31", "le9999-12-31T23:59:59.999Z"] {
            assert_eq!(parse_date_param("_lastUpdated", upto).unwrap().1, Some(end_of_time), "{upto}");
        }
        for fine in ["9999-12-30", "ge9999-12-31", "lt9999"] {
            assert!(parse_date_param("_lastUpdated", fine).is_ok(), "{fine}");
        }
        assert!(parse_date_param("_lastUpdated", "ge2026-11-20T10:00:00Z").unwrap().0.is_some());
        for bad in ["2026-13-01", "2026-02-30", "yesterday", "ne2026", "gt", "2026-1-1"] {
            assert!(parse_date_param("_lastUpdated", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn search_parameters_are_checked() {
        let p = |q: &[(&str, &str)]| q.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect::<Vec<_>>();
        let s = parse_search(ResourceType::MedicationStatement, p(&[("patient", "Patient/M1"), ("code", "http://x|123"), ("_count", "10")])).unwrap();
        assert_eq!(s.criteria.member_id.as_deref(), Some("M1"));
        assert_eq!(s.criteria.code_system.as_deref(), Some("http://x"));
        assert_eq!(s.count, 10);
        assert!(parse_search(ResourceType::Patient, p(&[("patient", "M1")])).is_err());
        assert!(parse_search(ResourceType::Task, p(&[("_count", "0")])).is_err());
        assert!(parse_search(ResourceType::Task, p(&[("status", "a"), ("status", "b")])).is_err());
        assert!(parse_search(ResourceType::Task, p(&[("_sort", "x")])).is_err());
    }

    fn if_none_match_of(value: &str) -> Option<IfNoneMatch> {
        let mut headers = HeaderMap::new();
        headers.insert(header::IF_NONE_MATCH, HeaderValue::from_str(value).unwrap());
        if_none_match(&headers)
    }

    #[test]
    fn if_none_match_names_our_etags_weak_or_strong_or_any() {
        assert_eq!(if_none_match(&HeaderMap::new()), None);
        assert_eq!(if_none_match_of(r#"W/"3", "5" ,W/"x", W/"07", "+8", 9"#), Some(IfNoneMatch::Versions(vec![3, 5])));
        assert_eq!(if_none_match_of(r#"W/"3", *"#), Some(IfNoneMatch::Any));
        assert_eq!(if_none_match_of(""), Some(IfNoneMatch::Versions(vec![])));
        assert!(!if_none_match_of(r#"W/"07""#).unwrap().matches(7));
    }

    proptest! {
        #[test]
        fn if_none_match_matches_exactly_the_etag_served(v in 0..i64::MAX, other in 0..i64::MAX) {
            for tag in [etag(v), format!("\"{v}\"")] {
                let m = if_none_match_of(&format!("W/\"{other}\", {tag}")).unwrap();
                prop_assert!(m.matches(v));
                prop_assert_eq!(m.matches(other + 1), other + 1 == v);
            }
        }

        #[test]
        fn no_calendar_date_panics(y in 0..=9999i32, m in 0..=13u8, d in 0..=32u8, prefix in "(|eq|gt|ge|lt|le|sa|eb)") {
            for value in [format!("{y:04}"), format!("{y:04}-{m:02}"), format!("{y:04}-{m:02}-{d:02}"), format!("{y:04}-{m:02}-{d:02}T23:59:59.999Z")] {
                let _ = parse_date_param("_lastUpdated", &format!("{prefix}{value}"));
            }
        }

        /// Every value the OpenAPI document allows for a date parameter (the `pattern` of
        /// `_lastUpdated` and `date`) is a range, never a 400 (schemathesis checks the same).
        #[test]
        fn every_documented_date_is_accepted(value in "(eq|gt|ge|lt|le|sa|eb)?[0-9]{4}(-(0[1-9]|1[0-2])(-(0[1-9]|1[0-9]|2[0-8]))?)?") {
            prop_assert!(parse_date_param("_lastUpdated", &value).is_ok(), "{}", value);
        }

        #[test]
        fn parsing_never_panics(name in "[_a-z-]{1,12}", value in ".{0,30}") {
            for rt in ResourceType::ALL {
                let _ = parse_search(rt, vec![(name.clone(), value.clone())]);
            }
            let _ = parse_date_param("_lastUpdated", &value);
            let _ = parse_id(&value);
            let _ = parse_version(&value);
            if let Ok(v) = HeaderValue::from_str(&value) {
                let mut headers = HeaderMap::new();
                headers.insert(header::IF_NONE_MATCH, v);
                let _ = if_none_match(&headers);
            }
        }
    }
}
