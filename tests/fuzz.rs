//! Property-based fuzzing of the two parsers that see untrusted bytes:
//! request validation and the NOTIFY payload codec. They must never panic,
//! and whatever they accept must hold their invariants.
//!
//! `cargo test` runs 256 cases per property (a few seconds). Longer runs:
//! `PROPTEST_CASES=200000 cargo test --release --test fuzz`.

use herald::{
    bus::postgres::{MAX_PAYLOAD_BYTES, Payload, pack, route},
    hub::{Hub, StreamLimits},
    notification::{
        Fold, MAX_GROUP_WINDOW, MAX_NAME_BYTES, MIN_GROUP_WINDOW, NewNotification, PageQuery,
        SendLimits, StateRequest, StateTarget, StreamKey,
    },
    proto,
};
use proptest::prelude::*;

/// Strings biased towards the edges: empty, control characters, NUL,
/// multi-byte characters, JSON-ish fragments, and long runs.
fn nasty() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        "\\PC{0,40}",
        "[\\x00-\\x1f\"\\\\{}\\[\\]:,a0-9 ]{0,60}",
        "[a-z.]{120,140}",
        Just("{\"a\":".repeat(20)),
        any::<String>(),
    ]
}

/// JSON objects with random depth and content, as text.
fn json_object() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        "\\PC{0,10}".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(24, 64, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
            prop::collection::hash_map("[a-z]{1,4}", inner, 0..4)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
    .prop_map(|v| serde_json::json!({ "v": v }).to_string())
}

fn depth(v: &serde_json::Value) -> usize {
    match v {
        serde_json::Value::Object(m) => 1 + m.values().map(depth).max().unwrap_or(0),
        serde_json::Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

proptest! {
    #[test]
    fn send_validation_never_panics_and_accepts_only_valid_requests(
        recipients in prop::collection::vec(nasty(), 0..6),
        kind in nasty(),
        title in nasty(),
        body in nasty(),
        data in prop_oneof![nasty(), json_object()],
        key in nasty(),
        category in nasty(),
        severity in -1i32..6,
        actor in nasty(),
        link in prop_oneof![nasty(), Just("https://example.com/x".to_owned()), Just("/x".to_owned())],
        labels in prop::collection::vec(nasty(), 0..7),
        fold_key in nasty(),
        fold in 0u8..3,
        window_s in prop_oneof![Just(None), (-5i64..700_000).prop_map(Some)],
        renotify in any::<bool>(),
        expires in prop_oneof![Just(None), (any::<i64>(), any::<i32>()).prop_map(Some)],
        deliver in prop_oneof![Just(None), (any::<i64>(), any::<i32>()).prop_map(Some)],
    ) {
        let limits = SendLimits { max_recipients: 4, ..SendLimits::default() };
        let request = proto::SendNotificationRequest {
            recipients: recipients.clone(), r#type: kind, title, body, data,
            idempotency_key: key, category, severity, actor, action_url: link.clone(),
            actions: labels.into_iter().map(|label| proto::Action { label, url: link.clone() }).collect(),
            replace_key: if fold == 1 { fold_key.clone() } else { String::new() },
            group_key: if fold == 2 { fold_key } else { String::new() },
            group_window: window_s.map(|seconds| prost_types::Duration { seconds, nanos: 0 }),
            renotify,
            expires_at: expires.map(|(seconds, nanos)| prost_types::Timestamp { seconds, nanos }),
            deliver_at: deliver.map(|(seconds, nanos)| prost_types::Timestamp { seconds, nanos }),
        };
        match NewNotification::parse(request, &limits) {
            Ok(mut n) => {
                // Times check against any clock without panicking, and a
                // send they accept is due no earlier than a minute ago and
                // expires after it is due.
                let now = std::time::SystemTime::now();
                if n.check_times(now).is_ok() {
                    if let Some(at) = n.deliver_at {
                        prop_assert!(at > now);
                    }
                    if let Some(x) = n.expires_at {
                        prop_assert!(x > n.deliver_at.unwrap_or(now));
                    }
                }
                prop_assert!(!n.recipients.is_empty() && n.recipients.len() <= 4);
                let mut names: Vec<_> = n.recipients.iter().map(|r| r.as_str()).collect();
                for r in &names {
                    prop_assert!(!r.is_empty() && r.len() <= MAX_NAME_BYTES);
                    prop_assert!(!r.chars().any(char::is_control));
                }
                names.sort_unstable();
                names.dedup();
                prop_assert_eq!(names.len(), n.recipients.len(), "recipients are distinct");
                prop_assert!(n.kind.as_str().chars().all(|c| c.is_ascii_alphanumeric() || ".-_:/".contains(c)));
                prop_assert!(!n.title.is_empty() && !n.title.contains('\0') && !n.body.contains('\0'));
                let v: serde_json::Value = serde_json::from_str(&n.data).unwrap();
                prop_assert!(v.is_object());
                prop_assert!(depth(&v) <= limits.max_data_depth);
                match &n.fold {
                    None => prop_assert!(!n.renotify),
                    Some(Fold::Replace(k)) => prop_assert!(!k.is_empty() && k.len() <= MAX_NAME_BYTES),
                    Some(Fold::Group { key, window }) => {
                        prop_assert!(!key.is_empty() && key.len() <= MAX_NAME_BYTES);
                        prop_assert!(*window >= MIN_GROUP_WINDOW && *window <= MAX_GROUP_WINDOW);
                    }
                }
                let p = &n.presentation;
                prop_assert!(p.category.len() <= 64 && p.actions.len() <= 5);
                for url in std::iter::once(&p.action_url).chain(p.actions.iter().map(|a| &a.url)) {
                    prop_assert!(url.is_empty() || url.starts_with('/') || url.starts_with("http"), "{}", url);
                    prop_assert!(!url.chars().any(|c| c.is_control() || c.is_whitespace()));
                }
            }
            Err(e) => {
                let known = ["recipients", "type", "title", "body", "data", "idempotency_key",
                    "category", "severity", "actor", "action_url", "actions"];
                prop_assert!(known.iter().any(|f| e.field.starts_with(f)), "unknown field {}", e.field);
            }
        }
    }

    #[test]
    fn read_and_page_parsing_never_panics(
        ids in prop::collection::vec(any::<i64>(), 0..1_100),
        up_to in any::<u64>(),
        use_ids in any::<bool>(),
        action in any::<i32>(),
        types in prop::collection::vec(nasty(), 0..3),
        severity in any::<i32>(),
        page_size in any::<u32>(),
        page_token in nasty(),
    ) {
        use proto::mark_read_request::Target;
        use proto::update_state_request::Target as StateTargetProto;
        let target = if use_ids {
            Target::Ids(proto::NotificationIds { ids: ids.clone() })
        } else {
            Target::UpToSeq(up_to)
        };
        let parsed = StateRequest::parse_mark_read(proto::MarkReadRequest { target: Some(target) });
        let filter = StateTargetProto::Filter(proto::NotificationFilter { types, categories: vec![], min_severity: severity });
        let ids_target = StateTargetProto::Ids(proto::NotificationIds { ids });
        for request in [
            parsed,
            StateRequest::parse(proto::UpdateStateRequest { action, target: Some(ids_target) }),
            StateRequest::parse(proto::UpdateStateRequest { action, target: Some(filter) }),
        ] {
            match request.map(|r| r.target) {
                Ok(StateTarget::Ids(ids)) => {
                    prop_assert!(!ids.is_empty() && ids.iter().all(|id| *id > 0));
                    prop_assert!(ids.windows(2).all(|w| w[0] < w[1]), "sorted and distinct");
                }
                Ok(StateTarget::Filter(f)) => prop_assert!(!f.is_all()),
                Ok(StateTarget::UpTo(s)) => prop_assert!(s > 0),
                Err(_) => {}
            }
        }
        let request = proto::ListNotificationsRequest { unread_only: false, page_size, page_token, ..Default::default() };
        if let Ok(q) = PageQuery::parse(&request) {
            prop_assert!(q.limit >= 1 && q.limit <= 500);
        }
    }

    #[test]
    fn payload_decoder_never_panics(text in prop_oneof![
        nasty(),
        "\\[?\\{\"k\":\"[nrswup]\"[^\\]]{0,80}\\}\\]?",
    ]) {
        let hub = Hub::new(StreamLimits::default());
        let _sub = hub.subscribe(StreamKey::user("t", "alice")).unwrap();
        route(&hub, 1, &text);
    }

    /// User ids may hold anything but control characters, and `"` and `\`
    /// grow when JSON-escaped: payloads must be sized on the encoded text.
    #[test]
    fn packed_payloads_fit_and_round_trip(
        sends in prop::collection::vec(
            (prop::collection::vec("[a-z0-9\"\\\\\u{e9}]{1,128}", 1..40), 0usize..9_000),
            1..30,
        ),
    ) {
        let payloads: Vec<Payload> = sends
            .iter()
            .enumerate()
            .map(|(i, (users, body))| Payload::Notification {
                t: "te\"nant\\".into(),
                e: 1,
                ty: "t".into(),
                ti: format!("n{i}"),
                b: "\u{e9}".repeat(*body / 2),
                d: "{}".into(),
                at: 0,
                p: Default::default(),
                rk: String::new(),
                gk: String::new(),
                x: None,
                r: users.iter().enumerate().map(|(k, u)| (u.clone(), k as u64 + 1, i as i64)).collect(),
            })
            .collect();
        let texts = pack(payloads);
        let mut got = Vec::new();
        for t in &texts {
            prop_assert!(t.len() <= MAX_PAYLOAD_BYTES, "{} bytes", t.len());
            let decoded: Vec<Payload> = if t.starts_with('[') {
                serde_json::from_str(t).unwrap()
            } else {
                vec![serde_json::from_str(t).unwrap()]
            };
            for p in decoded {
                match p {
                    Payload::Notification { r, .. } => got.extend(r.into_iter().map(|(u, s, _)| (u, s))),
                    Payload::Wake { r, .. } => got.extend(r),
                    other => prop_assert!(false, "unexpected {:?}", other),
                }
            }
        }
        let want: Vec<(String, u64)> = sends
            .iter()
            .flat_map(|(users, _)| users.iter().enumerate().map(|(k, u)| (u.clone(), k as u64 + 1)))
            .collect();
        prop_assert_eq!(got, want, "every recipient, in order");
    }
}
