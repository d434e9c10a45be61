use super::*;

fn now() -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(1_795_000_000).unwrap()
}

fn request() -> Value {
    json!({
        "resourceType": "Subscription",
        "status": "requested",
        "reason": "medication reconciliation at home visits",
        "criteria": TOPIC_URL,
        "_criteria": { "extension": [{ "url": format!("{BACKPORT}backport-filter-criteria"), "valueString": "Bundle?patient=Patient/M1" }] },
        "channel": {
            "type": "rest-hook",
            "endpoint": "https://partner.example/hooks/fhir",
            "payload": "application/fhir+json",
            "_payload": { "extension": [{ "url": format!("{BACKPORT}backport-payload-content"), "valueCode": "full-resource" }] },
            "header": ["Authorization: Bearer abc"],
            "extension": [
                { "url": format!("{BACKPORT}backport-heartbeat-period"), "valueUnsignedInt": 60 },
                { "url": format!("{BACKPORT}backport-max-count"), "valuePositiveInt": 5 },
                { "url": EXT_SIGNING_SECRET, "valueString": "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff" }
            ]
        }
    })
}

#[test]
fn a_rest_hook_subscription_is_accepted_without_keeping_its_secret_in_the_body() {
    let s = accept(request(), "pa", Limits { allow_http: false, min_heartbeat_secs: 1 }, now()).unwrap();
    assert_eq!((s.channel.as_str(), s.content.as_str(), s.member_id.as_deref()), ("rest-hook", "full-resource", Some("M1")));
    assert_eq!((s.heartbeat_secs, s.timeout_secs, s.max_count), (Some(60), 10, 5));
    assert_eq!(s.secret.as_deref().map(<[u8]>::len), Some(32));
    assert!(!s.body.contains("signing-secret") && !s.body.contains("00112233"), "{}", s.body);
    let served = render(&s);
    assert_eq!(served["status"], "requested");
    assert_eq!(served["id"], s.id.as_str());
    serde_json::from_value::<FhirSubscription>(served).unwrap();
}

#[test]
fn refusals_name_the_element() {
    let limits = Limits { allow_http: false, min_heartbeat_secs: 1 };
    let refused = |v: Value| accept(v, "pa", limits, now()).unwrap_err().expression;
    let mut v = request();
    v["criteria"] = json!("Observation?code=1234");
    assert_eq!(refused(v), "Subscription.criteria");
    let mut v = request();
    v["channel"]["endpoint"] = json!("http://partner.example/hooks");
    assert_eq!(refused(v), "Subscription.channel.endpoint");
    let mut v = request();
    v["channel"]["extension"].as_array_mut().unwrap().pop();
    assert_eq!(refused(v), "Subscription.channel.extension");
    let mut v = request();
    v["_criteria"]["extension"][0]["valueString"] = json!("Bundle?code=x");
    assert_eq!(refused(v), "Subscription.criteria.extension");
    let mut v = request();
    v["channel"]["type"] = json!("email");
    assert_eq!(refused(v), "Subscription.channel.type");
    let mut v = request();
    v.as_object_mut().unwrap().remove("reason");
    assert_eq!(refused(v), "Subscription.reason");
    assert!(accept(request(), "pa", Limits { allow_http: true, min_heartbeat_secs: 1 }, now()).is_ok());
}

#[test]
fn headers_that_steer_the_connection_or_forge_the_signature_are_refused() {
    let limits = Limits { allow_http: false, min_heartbeat_secs: 1 };
    for header in [
        "Host: 127.0.0.1:5432",
        "host:x",
        "Connection: close",
        "Transfer-Encoding: chunked",
        "Content-Length: 0",
        "Proxy-Authorization: x",
        "Proxy-Anything: y",
        "X-Fhir-Event-Signature: t=1,v1=00",
        "Upgrade: h2c",
        "Forwarded: for=1.2.3.4",
        "Content-Type: text/plain",
    ] {
        let mut v = request();
        v["channel"]["header"] = json!([header]);
        let refused = accept(v, "pa", limits, now()).unwrap_err();
        assert_eq!(refused.expression, "Subscription.channel.header", "{header}");
    }
    let mut v = request();
    v["channel"]["header"] = json!(["Authorization: Bearer partner-own-secret"]);
    assert!(accept(v, "pa", limits, now()).is_ok(), "a partner's own credentials for its endpoint are its business");
    let mut v = request();
    v["channel"]["header"] = json!(vec!["X-A: b"; 11]);
    assert!(accept(v, "pa", limits, now()).is_err());
}

#[test]
fn a_heartbeat_shorter_than_the_minimum_is_refused() {
    let mut v = request();
    v["channel"]["extension"][0]["valueUnsignedInt"] = json!(5);
    assert!(accept(v.clone(), "pa", Limits { allow_http: false, min_heartbeat_secs: 1 }, now()).is_ok());
    let refused = accept(v, "pa", Limits { allow_http: false, min_heartbeat_secs: 60 }, now()).unwrap_err();
    assert!(refused.message.contains("60 to 86400"), "{}", refused.message);
}

#[test]
fn a_kafka_channel_uses_the_backport_channel_type() {
    let mut v = request();
    v["channel"] = json!({
        "type": "message",
        "_type": { "extension": [{ "url": format!("{BACKPORT}backport-channel-type"), "valueCoding": { "system": CHANNEL_TYPES, "code": "kafka" } }] },
        "payload": "application/fhir+json"
    });
    let s = accept(v, "pa", Limits { allow_http: false, min_heartbeat_secs: 1 }, now()).unwrap();
    assert_eq!((s.channel.as_str(), s.content.as_str(), s.endpoint.as_deref()), ("kafka", "id-only", None));
}

#[test]
fn notifications_parse_as_r4b() {
    let s = accept(request(), "pa", Limits { allow_http: false, min_heartbeat_secs: 1 }, now()).unwrap();
    let events = vec![
        Event {
            event_number: 1,
            member_id: "M1".into(),
            version_id: 1,
            deleted: false,
            occurred_at: now(),
            body: Some(r#"{"resourceType":"Bundle","id":"M1","type":"collection"}"#.into()),
            attributed: true,
            traceparent: None,
            resource_id: None,
        },
        Event {
            event_number: 2,
            member_id: "M1".into(),
            version_id: 2,
            deleted: true,
            occurred_at: now(),
            body: None,
            attributed: true,
            traceparent: None,
            resource_id: None,
        },
    ];
    for kind in [Kind::Handshake, Kind::Heartbeat, Kind::EventNotification, Kind::QueryEvent] {
        let events = if matches!(kind, Kind::EventNotification | Kind::QueryEvent) { &events[..] } else { &[] };
        let bundle = notification("http://h/fhir", &s, kind, events);
        serde_json::from_value::<fhir_sdk::r4b::resources::Bundle>(bundle.clone()).unwrap();
        assert_eq!(bundle["entry"].as_array().map(Vec::len), Some(1 + events.len()));
    }
    let bundle = notification("http://h/fhir", &s, Kind::EventNotification, &events);
    assert_eq!(bundle["entry"][1]["resource"]["id"], "M1");
    assert_eq!(bundle["entry"][2]["request"]["method"], "DELETE");
    assert_eq!(bundle["entry"][0]["resource"]["notificationEvent"][1]["eventNumber"], "2");
    serde_json::from_value::<fhir_sdk::r4b::resources::SubscriptionTopic>(topic_resource()).unwrap();
}

#[test]
fn an_event_of_a_member_no_longer_attributed_keeps_its_number_and_says_nothing_else() {
    let s = accept(request(), "pa", Limits { allow_http: false, min_heartbeat_secs: 1 }, now()).unwrap();
    let gone = Event {
        event_number: 7,
        member_id: "M1".into(),
        version_id: 3,
        deleted: false,
        occurred_at: now(),
        body: None,
        attributed: false,
        traceparent: None,
        resource_id: None,
    };
    let bundle = notification("http://h/fhir", &s, Kind::EventNotification, &[gone]);
    assert_eq!(bundle["entry"].as_array().map(Vec::len), Some(1), "only the SubscriptionStatus");
    let event = &bundle["entry"][0]["resource"]["notificationEvent"][0];
    assert_eq!(event["eventNumber"], "7");
    assert!(event.get("focus").is_none());
    assert!(!bundle.to_string().contains("M1"));
}

#[test]
fn signatures_cover_time_and_body() {
    let a = signature(b"k", 1, b"{}");
    assert!(a.starts_with("t=1,v1=") && a.len() == "t=1,v1=".len() + 64);
    assert_ne!(a, signature(b"k", 2, b"{}"));
    assert_ne!(a, signature(b"k", 1, b"{ }"));
}
