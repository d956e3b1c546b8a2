//! The HTTP door from a real HTTP/1.1 client: Connect unary calls with JSON
//! (and binary) bodies for every unary RPC and every error class, the SSE
//! stream (backlog, caught_up, live, heartbeats, resume by Last-Event-ID on
//! the other replica, tickets and the resume cookie), CORS, and the
//! OpenAPI document.

mod common;

use std::{net::SocketAddr, time::Duration};

use bytes::Bytes;
use common::*;
use herald::{auth::SEND_SCOPE, proto};
use http::{HeaderMap, Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use prost::Message;
use serde_json::{Value, json};

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

fn http() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// A Connect unary call: `POST /herald.v1.Notifications/<method>` with a
/// JSON body. Returns the HTTP status, headers and JSON body.
async fn call(
    addr: SocketAddr,
    method: &str,
    token: Option<&str>,
    body: &str,
) -> (StatusCode, HeaderMap, Value) {
    call_with(
        addr,
        method,
        token,
        body,
        &[("content-type", "application/json")],
    )
    .await
}

async fn call_with(
    addr: SocketAddr,
    method: &str,
    token: Option<&str>,
    body: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, HeaderMap, Value) {
    let mut request = Request::builder()
        .method(Method::POST)
        .uri(format!("http://{addr}/herald.v1.Notifications/{method}"));
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    if let Some(token) = token {
        request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let response = http()
        .request(
            request
                .body(Full::new(Bytes::from(body.to_owned())))
                .unwrap(),
        )
        .await
        .expect("HTTP call");
    let (parts, body) = response.into_parts();
    let bytes = body.collect().await.expect("response body").to_bytes();
    let value = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|e| panic!("JSON body ({e}): {}", String::from_utf8_lossy(&bytes)))
    };
    (parts.status, parts.headers, value)
}

/// A successful call's JSON body.
async fn ok(addr: SocketAddr, method: &str, token: &str, body: &str) -> Value {
    let (status, headers, value) = call(addr, method, Some(token), body).await;
    assert_eq!(status, StatusCode::OK, "{method}: {value}");
    assert_eq!(headers[header::CONTENT_TYPE], "application/json");
    value
}

/// A failed call: asserts the HTTP status and Connect code, returns the
/// message.
async fn refused(
    addr: SocketAddr,
    method: &str,
    token: Option<&str>,
    body: &str,
    http_status: u16,
    code: &str,
) -> String {
    let (status, headers, value) = call(addr, method, token, body).await;
    assert_eq!(status.as_u16(), http_status, "{method} {body}: {value}");
    assert_eq!(headers[header::CONTENT_TYPE], "application/json");
    assert_eq!(value["code"], code, "{method} {body}: {value}");
    value["message"].as_str().unwrap_or_default().to_owned()
}

fn send_body(recipients: &[&str], title: &str) -> String {
    json!({"recipients": recipients, "type": "test.event", "title": title, "data": "{\"k\":1}"})
        .to_string()
}

#[tokio::test]
async fn every_unary_rpc_answers_json_on_both_stores() {
    bounded(async {
        for backend in [Backend::Memory, Backend::Postgres] {
            let d = Deployment::start(backend, 1).await;
            let addr = d.replicas[0].addr;
            let sender = sender_token();
            let alice = token("alice", "", "");

            let sent = ok(
                addr,
                "SendNotification",
                &sender,
                &send_body(&["alice", "bob"], "one"),
            )
            .await;
            let deliveries = sent["deliveries"].as_array().unwrap();
            assert_eq!(deliveries.len(), 2, "{sent}");
            assert_eq!(deliveries[0]["recipient"], "alice");
            // 64-bit integers are strings in the proto3 JSON mapping.
            assert_eq!(deliveries[0]["seq"], "1");
            let first_id = deliveries[0]["notificationId"].as_str().unwrap().to_owned();

            let bulk = ok(
                addr,
                "SendNotifications",
                &sender,
                &json!({"notifications": [
                    {"recipients": ["alice"], "type": "t", "title": "two"},
                    {"recipients": ["alice"], "type": "t", "title": ""},
                ]})
                .to_string(),
            )
            .await;
            let results = bulk["results"].as_array().unwrap();
            assert_eq!(results.len(), 2);
            assert!(
                results[0].get("code").is_none(),
                "OK is the default: {bulk}"
            );
            assert_eq!(results[1]["index"], 1);
            assert_eq!(results[1]["code"], 3);
            assert!(
                results[1]["message"]
                    .as_str()
                    .unwrap()
                    .starts_with("notifications[1].title")
            );

            let count = ok(addr, "GetUnreadCount", &alice, "{}").await;
            assert_eq!(count, json!({"unread": "2", "seq": "2", "unseen": "2"}));

            let page = ok(addr, "ListNotifications", &alice, r#"{"pageSize": 1}"#).await;
            let items = page["notifications"].as_array().unwrap();
            assert_eq!(items.len(), 1);
            assert_eq!(items[0]["title"], "two");
            assert!(items[0]["createdAt"].as_str().unwrap().ends_with('Z'));
            let next = page["nextPageToken"].as_str().unwrap().to_owned();
            let page = ok(
                addr,
                "ListNotifications",
                &alice,
                &json!({"pageSize": 1, "pageToken": next}).to_string(),
            )
            .await;
            assert_eq!(page["notifications"][0]["id"], first_id.as_str());

            let marked = ok(
                addr,
                "MarkRead",
                &alice,
                &json!({"ids": {"ids": [first_id]}}).to_string(),
            )
            .await;
            assert_eq!(marked, json!({"marked": 1, "seq": "3"}));
            let marked = ok(addr, "MarkRead", &alice, r#"{"upToSeq": "3"}"#).await;
            assert_eq!(marked["marked"], 1);
            assert_eq!(
                ok(addr, "GetUnreadCount", &alice, "{}").await["unread"],
                json!(null)
            );

            let ticket = ok(addr, "CreateStreamTicket", &alice, "{}").await;
            assert_eq!(ticket["ticket"].as_str().unwrap().len(), 43);
            assert!(ticket["expiresAt"].as_str().is_some());

            // The proto field names are accepted too.
            let sent = ok(
                addr,
                "SendNotification",
                &sender,
                r#"{"recipients":["carol"],"type":"t","title":"x","idempotency_key":"k1"}"#,
            )
            .await;
            let again = ok(
                addr,
                "SendNotification",
                &sender,
                r#"{"recipients":["carol"],"type":"t","title":"x","idempotencyKey":"k1"}"#,
            )
            .await;
            assert_eq!(sent, again, "an idempotent replay answers the same");
            d.stop().await;
        }
    })
    .await;
}

#[tokio::test]
async fn the_binary_codec_answers_binary() {
    bounded(async {
        let d = Deployment::start(Backend::Memory, 1).await;
        let addr = d.replicas[0].addr;
        let body = note(&["alice"], "bin").encode_to_vec();
        let request = Request::builder()
            .method(Method::POST)
            .uri(format!(
                "http://{addr}/herald.v1.Notifications/SendNotification"
            ))
            .header("content-type", "application/proto")
            .header(header::AUTHORIZATION, format!("Bearer {}", sender_token()))
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        let response = http().request(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            "application/proto"
        );
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let sent = proto::SendNotificationResponse::decode(bytes).unwrap();
        assert_eq!(sent.deliveries[0].seq, 1);
        d.stop().await;
    })
    .await;
}

#[tokio::test]
async fn every_error_class_has_its_code_status_and_field_and_stores_nothing() {
    bounded(async {
        let d = Deployment::start_with(Backend::Memory, 1, |c| {
            c.max_request_bytes = 4096;
        })
        .await;
        let addr = d.replicas[0].addr;
        let sender = sender_token();
        let alice = token("alice", "", "");
        let send = "SendNotification";

        let m = refused(
            addr,
            send,
            Some(&sender),
            r#"{"recipients": ["a""#,
            400,
            "invalid_argument",
        )
        .await;
        assert!(m.starts_with("invalid JSON"), "{m}");
        let m = refused(
            addr,
            send,
            Some(&sender),
            r#"{"recipients": ["a"], "colour": 1}"#,
            400,
            "invalid_argument",
        )
        .await;
        assert!(m.contains("colour"), "unknown field named: {m}");
        let m = refused(
            addr,
            send,
            Some(&sender),
            r#"{"recipients": ["a", 7]}"#,
            400,
            "invalid_argument",
        )
        .await;
        assert!(m.starts_with("recipients[1]"), "wrong type named: {m}");
        let m = refused(
            addr,
            send,
            Some(&sender),
            r#"{"title": ["x"]}"#,
            400,
            "invalid_argument",
        )
        .await;
        assert!(m.starts_with("title"), "{m}");
        let m = refused(
            addr,
            send,
            Some(&sender),
            &send_body(&["a"], ""),
            400,
            "invalid_argument",
        )
        .await;
        assert!(m.starts_with("title"), "validation names the field: {m}");
        let m = refused(
            addr,
            "MarkRead",
            Some(&alice),
            r#"{"upToSeq": "x"}"#,
            400,
            "invalid_argument",
        )
        .await;
        assert!(m.starts_with("upToSeq"), "{m}");

        let m = refused(
            addr,
            send,
            None,
            &send_body(&["a"], "x"),
            401,
            "unauthenticated",
        )
        .await;
        assert!(m.contains("token") || m.contains("authorization"), "{m}");
        refused(
            addr,
            send,
            Some("not-a-jwt"),
            &send_body(&["a"], "x"),
            401,
            "unauthenticated",
        )
        .await;
        refused(
            addr,
            send,
            Some(&alice),
            &send_body(&["a"], "x"),
            403,
            "permission_denied",
        )
        .await;

        let big = send_body(&["a"], &"x".repeat(5000));
        refused(addr, send, Some(&sender), &big, 429, "resource_exhausted").await;
        refused(addr, "Subscribe", Some(&alice), "{}", 501, "unimplemented").await;
        refused(
            addr,
            "NoSuchMethod",
            Some(&alice),
            "{}",
            501,
            "unimplemented",
        )
        .await;

        let (status, headers, _) = call_with(
            addr,
            send,
            Some(&sender),
            &send_body(&["a"], "x"),
            &[("content-type", "text/plain")],
        )
        .await;
        assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
        assert!(
            headers["accept-post"]
                .to_str()
                .unwrap()
                .contains("application/json")
        );
        let (status, _, value) = call_with(
            addr,
            send,
            Some(&sender),
            &send_body(&["a"], "x"),
            &[
                ("content-type", "application/json"),
                ("connect-protocol-version", "2"),
            ],
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{value}");

        // GET is not a unary call.
        let request = Request::builder()
            .uri(format!(
                "http://{addr}/herald.v1.Notifications/GetUnreadCount"
            ))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let response = http().request(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);

        // None of it stored anything.
        let count = ok(addr, "GetUnreadCount", &token("a", "", ""), "{}").await;
        assert_eq!(count, json!({}), "nothing stored for a");
        d.stop().await;
    })
    .await;
}

#[tokio::test]
async fn rate_limits_answer_429_with_retry_info_and_retry_after_and_tickets_are_rated() {
    bounded(async {
        let d = Deployment::start_with(Backend::Memory, 1, |c| {
            c.rates.per_sender = 1;
            c.rates.sender_burst = 1;
            c.rates.tickets_per_minute = 1;
            c.rates.ticket_burst = 1;
        })
        .await;
        let addr = d.replicas[0].addr;
        let sender = sender_token();
        ok(addr, "SendNotification", &sender, &send_body(&["a"], "1")).await;
        let (status, headers, value) = call(
            addr,
            "SendNotification",
            Some(&sender),
            &send_body(&["a"], "2"),
        )
        .await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{value}");
        assert_eq!(value["code"], "resource_exhausted");
        assert_eq!(value["details"][0]["type"], "google.rpc.RetryInfo");
        let after: u64 = headers[header::RETRY_AFTER]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=2).contains(&after), "{after}");
        // Stream tickets are rows until used or expired: rated per user.
        let alice = token("alice", "", "");
        ok(addr, "CreateStreamTicket", &alice, "{}").await;
        let m = refused(
            addr,
            "CreateStreamTicket",
            Some(&alice),
            "{}",
            429,
            "resource_exhausted",
        )
        .await;
        assert!(m.contains("stream ticket rate"), "{m}");
        ok(addr, "CreateStreamTicket", &token("bob", "", ""), "{}").await;
        d.stop().await;
    })
    .await;
}

#[tokio::test]
async fn cors_preflights_allow_connect_and_sse_from_listed_origins_only() {
    bounded(async {
        let d = Deployment::start_with(Backend::Memory, 1, |c| {
            c.cors_origins = vec!["http://app.example".into()];
        })
        .await;
        let addr = d.replicas[0].addr;
        for (origin, allowed) in [("http://app.example", true), ("http://evil.example", false)] {
            for (path, method, headers) in [
                (
                    "/herald.v1.Notifications/SendNotification",
                    "POST",
                    "authorization,content-type,connect-protocol-version",
                ),
                ("/v1/events", "GET", "last-event-id"),
            ] {
                let request = Request::builder()
                    .method(Method::OPTIONS)
                    .uri(format!("http://{addr}{path}"))
                    .header(header::ORIGIN, origin)
                    .header(header::ACCESS_CONTROL_REQUEST_METHOD, method)
                    .header(header::ACCESS_CONTROL_REQUEST_HEADERS, headers)
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                let response = http().request(request).await.unwrap();
                let h = response.headers();
                assert_eq!(
                    h.get(header::ACCESS_CONTROL_ALLOW_ORIGIN)
                        .map(|v| v.to_str().unwrap()),
                    allowed.then_some(origin),
                    "{origin} {path}"
                );
                if allowed {
                    assert_eq!(h[header::ACCESS_CONTROL_ALLOW_CREDENTIALS], "true");
                }
            }
        }
        d.stop().await;
    })
    .await;
}

#[tokio::test]
async fn the_openapi_document_is_served_and_matches_the_checked_in_one() {
    bounded(async {
        let d = Deployment::start(Backend::Memory, 1).await;
        let addr = d.replicas[0].addr;
        let request = Request::builder()
            .uri(format!("http://{addr}/openapi.json"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let response = http().request(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let served = response.into_body().collect().await.unwrap().to_bytes();
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.json");
        if std::env::var_os("HERALD_UPDATE_OPENAPI").is_some() {
            std::fs::write(path, &served).unwrap();
        }
        let checked_in = std::fs::read(path).expect("docs/openapi.json");
        assert!(
            served.as_ref() == checked_in.as_slice(),
            "docs/openapi.json is stale: regenerate it with HERALD_UPDATE_OPENAPI=1 cargo test --test http openapi"
        );
        let doc: Value = serde_json::from_slice(&served).unwrap();
        for method in herald::http::connect::UNARY_METHODS {
            assert!(
                doc["paths"][format!("/herald.v1.Notifications/{method}")]["post"].is_object(),
                "{method}"
            );
        }
        assert!(doc["paths"]["/v1/events"]["get"].is_object());
        d.stop().await;
    })
    .await;
}

/// One Server-Sent Event.
#[derive(Debug, Clone, Default)]
struct Sse {
    id: Option<String>,
    event: String,
    data: String,
}

/// An open SSE response, read event by event.
struct SseStream {
    body: hyper::body::Incoming,
    buffer: String,
    /// Comment lines seen (heartbeats).
    comments: Vec<String>,
    retry: Option<u64>,
    headers: HeaderMap,
}

impl SseStream {
    /// The next event (comments are collected, not returned), within
    /// [`EVENT_TIMEOUT`]; `None` when the stream ends.
    async fn next(&mut self) -> Option<Sse> {
        let deadline = tokio::time::Instant::now() + EVENT_TIMEOUT;
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut event = Sse {
                    event: "message".into(),
                    ..Sse::default()
                };
                let mut any = false;
                for line in block.lines() {
                    if let Some(c) = line.strip_prefix(':') {
                        self.comments.push(c.trim().to_owned());
                    } else if let Some((field, value)) = line.split_once(':') {
                        let value = value.strip_prefix(' ').unwrap_or(value);
                        match field {
                            "id" => event.id = Some(value.to_owned()),
                            "event" => event.event = value.to_owned(),
                            "data" => {
                                event.data.push_str(value);
                                any = true;
                            }
                            "retry" => self.retry = value.parse().ok(),
                            _ => {}
                        }
                    }
                }
                if any {
                    return Some(event);
                }
                continue;
            }
            let frame = tokio::time::timeout_at(deadline, self.body.frame())
                .await
                .expect("an SSE event within the timeout")?
                .expect("SSE body");
            if let Ok(data) = frame.into_data() {
                self.buffer
                    .push_str(std::str::from_utf8(&data).expect("UTF-8"));
            }
        }
    }

    /// Events until one of `kind` (inclusive).
    async fn until(&mut self, kind: &str) -> Vec<Sse> {
        let mut seen = Vec::new();
        loop {
            let e = self.next().await.expect("stream open");
            let done = e.event == kind;
            seen.push(e);
            if done {
                return seen;
            }
        }
    }
}

/// `GET /v1/events?<query>` with `headers`; the response status and, for
/// 200, the open stream.
async fn open_sse(
    addr: SocketAddr,
    query: &str,
    headers: &[(&str, &str)],
) -> Result<SseStream, (StatusCode, Value)> {
    let mut request = Request::builder().uri(format!("http://{addr}/v1/events?{query}"));
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let response = http()
        .request(request.body(Full::new(Bytes::new())).unwrap())
        .await
        .expect("HTTP GET");
    let (parts, body) = response.into_parts();
    if parts.status != StatusCode::OK {
        let bytes = body.collect().await.unwrap().to_bytes();
        return Err((
            parts.status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        ));
    }
    assert_eq!(
        parts.headers[header::CONTENT_TYPE],
        "text/event-stream; charset=utf-8"
    );
    assert_eq!(parts.headers[header::CACHE_CONTROL], "no-store");
    assert_eq!(parts.headers["x-accel-buffering"], "no");
    Ok(SseStream {
        body,
        buffer: String::new(),
        comments: Vec::new(),
        retry: None,
        headers: parts.headers,
    })
}

async fn mint_ticket(addr: SocketAddr, user: &str) -> String {
    ok(addr, "CreateStreamTicket", &token(user, "", ""), "{}").await["ticket"]
        .as_str()
        .unwrap()
        .to_owned()
}

fn title(e: &Sse) -> String {
    let v: Value = serde_json::from_str(&e.data).unwrap();
    v["notification"]["title"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test]
async fn sse_streams_backlog_caught_up_live_and_heartbeats() {
    bounded(async {
        let d = Deployment::start_with(Backend::Memory, 1, |c| {
            c.heartbeat_interval = Duration::from_millis(300);
        })
        .await;
        let addr = d.replicas[0].addr;
        let sender = sender_token();
        ok(
            addr,
            "SendNotification",
            &sender,
            &send_body(&["alice"], "before"),
        )
        .await;
        let bearer = format!("Bearer {}", token("alice", "", ""));
        let mut stream = open_sse(addr, "", &[("authorization", &bearer)])
            .await
            .unwrap();
        let backlog = stream.until("caught_up").await;
        assert_eq!(backlog.len(), 2, "{backlog:?}");
        assert_eq!(backlog[0].event, "notification");
        assert_eq!(title(&backlog[0]), "before");
        let retry = stream.retry.expect("a retry hint");
        assert!((1000..5000).contains(&retry), "{retry}");
        let epoch = {
            let v: Value = serde_json::from_str(&backlog[0].data).unwrap();
            v["epoch"].as_str().unwrap().to_owned()
        };
        assert_eq!(
            backlog[0].id.as_deref(),
            Some(format!("{epoch}:1").as_str())
        );
        let caught: Value = serde_json::from_str(&backlog[1].data).unwrap();
        let interval = caught["caughtUp"]["heartbeatInterval"].as_str().unwrap();
        assert!(
            interval.starts_with("0.3") && interval.ends_with('s'),
            "{interval}"
        );

        ok(
            addr,
            "SendNotification",
            &sender,
            &send_body(&["alice"], "live"),
        )
        .await;
        let live = stream.next().await.unwrap();
        assert_eq!(
            (live.event.as_str(), title(&live)),
            ("notification", "live".into())
        );
        assert_eq!(live.id.as_deref(), Some(format!("{epoch}:2").as_str()));
        ok(
            addr,
            "MarkRead",
            &token("alice", "", ""),
            r#"{"upToSeq": "2"}"#,
        )
        .await;
        let read = stream.next().await.unwrap();
        assert_eq!(read.event, "read");
        assert_eq!(read.id.as_deref(), Some(format!("{epoch}:3").as_str()));
        // Other state changes are `state` events, enums by name.
        let archived = ok(
            addr,
            "UpdateState",
            &token("alice", "", ""),
            r#"{"action": "STATE_ACTION_ARCHIVE", "filter": {"types": ["test.*"]}}"#,
        )
        .await;
        assert_eq!(archived, json!({"changed": 2, "seq": "4"}));
        let state = stream.next().await.unwrap();
        assert_eq!(state.event, "state");
        assert_eq!(state.id.as_deref(), Some(format!("{epoch}:4").as_str()));
        let data: Value = serde_json::from_str(&state.data).unwrap();
        assert_eq!(
            data["state"],
            json!({"action": "STATE_ACTION_ARCHIVE", "upToSeq": "3", "filter": {"types": ["test.*"]}})
        );

        tokio::time::sleep(Duration::from_millis(800)).await;
        ok(
            addr,
            "SendNotification",
            &sender,
            &send_body(&["alice"], "after"),
        )
        .await;
        let after = stream.next().await.unwrap();
        assert_eq!(title(&after), "after");
        assert!(
            stream.comments.iter().any(|c| c == "heartbeat"),
            "heartbeat comments while idle: {:?}",
            stream.comments
        );

        // Filters: only the listed types.
        let mut typed = open_sse(
            addr,
            "types=other.kind&last_event_id=",
            &[("authorization", &bearer)],
        )
        .await
        .unwrap();
        typed.until("caught_up").await;
        ok(
            addr,
            "SendNotification",
            &sender,
            &send_body(&["alice"], "filtered out"),
        )
        .await;
        ok(
            addr,
            "SendNotification",
            &sender,
            &json!({"recipients": ["alice"], "type": "other.kind", "title": "kept"}).to_string(),
        )
        .await;
        let kept = typed.next().await.unwrap();
        assert_eq!(title(&kept), "kept");
        // Category and severity filters too.
        let mut severe = open_sse(
            addr,
            "categories=ops&min_severity=high",
            &[("authorization", &bearer)],
        )
        .await
        .unwrap();
        severe.until("caught_up").await;
        for (category, severity, t) in [("ops", 2, "normal ops"), ("dev", 4, "critical dev"), ("ops", 4, "critical ops")] {
            ok(
                addr,
                "SendNotification",
                &sender,
                &json!({"recipients": ["alice"], "type": "t", "title": t, "category": category, "severity": severity}).to_string(),
            )
            .await;
        }
        assert_eq!(title(&severe.next().await.unwrap()), "critical ops");

        // A position of another epoch, or beyond the head, gets `resync`
        // (as after_seq does), then the stream goes on live.
        for id in [
            format!("{}:1", epoch.parse::<u64>().unwrap() ^ 1),
            format!("{epoch}:999"),
        ] {
            let mut resumed = open_sse(
                addr,
                "",
                &[("authorization", &bearer), ("last-event-id", &id)],
            )
            .await
            .unwrap();
            let first = resumed.next().await.unwrap();
            assert_eq!(first.event, "resync", "{id}: {first:?}");
            let v: Value = serde_json::from_str(&first.data).unwrap();
            assert!(
                v["resync"]["reason"]
                    .as_str()
                    .unwrap()
                    .starts_with("REASON_"),
                "{v}"
            );
            assert_eq!(
                first.id.as_deref(),
                Some(format!("{epoch}:10").as_str()),
                "the head"
            );
        }

        // A malformed position is refused, naming the field.
        let (status, value) = open_sse(
            addr,
            "",
            &[("authorization", &bearer), ("last-event-id", "7")],
        )
        .await
        .err()
        .unwrap();
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(
            value["message"]
                .as_str()
                .unwrap()
                .starts_with("last_event_id"),
            "{value}"
        );
        d.stop().await;
    })
    .await;
}

#[tokio::test]
async fn sse_tickets_are_single_use_and_expire() {
    bounded(async {
        let d = Deployment::start_with(Backend::Postgres, 1, |c| {
            c.stream_ticket_lifetime = Duration::from_millis(500);
            c.prune_interval = Duration::from_millis(200);
        })
        .await;
        let addr = d.replicas[0].addr;
        let ticket = mint_ticket(addr, "alice").await;
        // Bad input is refused before the ticket is spent.
        let (status, _) = open_sse(addr, &format!("ticket={ticket}&last_event_id=x"), &[])
            .await
            .err()
            .unwrap();
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let (status, value) = open_sse(addr, &format!("ticket={ticket}&types=no%20spaces"), &[])
            .await
            .err()
            .unwrap();
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(
            value["message"].as_str().unwrap().starts_with("types[0]"),
            "{value}"
        );
        let mut stream = open_sse(addr, &format!("ticket={ticket}"), &[])
            .await
            .unwrap();
        stream.until("caught_up").await;
        let (status, value) = open_sse(addr, &format!("ticket={ticket}"), &[])
            .await
            .err()
            .unwrap();
        assert_eq!(status, StatusCode::UNAUTHORIZED, "a used ticket: {value}");
        assert_eq!(value["code"], "unauthenticated");

        let late = mint_ticket(addr, "alice").await;
        tokio::time::sleep(Duration::from_millis(700)).await;
        let (status, _) = open_sse(addr, &format!("ticket={late}"), &[])
            .await
            .err()
            .unwrap();
        assert_eq!(status, StatusCode::UNAUTHORIZED, "an expired ticket");
        for bad in [
            "",
            "ticket=short",
            "ticket=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        ] {
            let (status, _) = open_sse(addr, bad, &[]).await.err().unwrap();
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{bad}");
        }
        // Retention deletes expired tickets; the stream's resume cookie
        // (valid as long as its token) stays.
        let db = d.db.as_ref().unwrap().connect().await;
        let counts =
            "SELECT count(*) FILTER (WHERE expires_at < now()), count(*) FROM stream_tickets";
        let mut left = (1, 0);
        for _ in 0..50 {
            let row = db.query_one(counts, &[]).await.unwrap();
            left = (row.get::<_, i64>(0), row.get::<_, i64>(1));
            if left.0 == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(left, (0, 1), "(expired, all) tickets left");
        drop(stream);
        d.stop().await;
    })
    .await;
}

/// `EventSource` reconnects by itself to the same URL (its ticket spent)
/// with `Last-Event-ID` and the resume cookie; here on the other replica,
/// with sends in between: nothing lost, nothing twice.
#[tokio::test]
async fn sse_resumes_by_last_event_id_and_cookie_on_the_other_replica() {
    bounded(async {
        let d = Deployment::start_with(Backend::Postgres, 2, |c| {
            c.cors_origins = vec!["http://app.example".into()];
        })
        .await;
        let (a, b) = (d.replicas[0].addr, d.replicas[1].addr);
        let sender = sender_token();
        let ticket = mint_ticket(a, "alice").await;
        let query = format!("ticket={ticket}");
        let mut first = open_sse(a, &query, &[]).await.unwrap();
        let cookie = first.headers[header::SET_COOKIE]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(cookie.starts_with("herald_resume="), "{cookie}");
        assert!(
            cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
            "{cookie}"
        );
        let cookie = cookie.split(';').next().unwrap().to_owned();
        first.until("caught_up").await;
        let mut last_id = None;
        for i in 0..5 {
            ok(
                a,
                "SendNotification",
                &sender,
                &send_body(&["alice"], &format!("n{i}")),
            )
            .await;
            let e = first.next().await.unwrap();
            assert_eq!(title(&e), format!("n{i}"));
            last_id = e.id;
        }
        drop(first);
        for i in 5..10 {
            ok(
                a,
                "SendNotification",
                &sender,
                &send_body(&["alice"], &format!("n{i}")),
            )
            .await;
        }
        let last_id = last_id.unwrap();
        // The spent ticket alone is refused; with the cookie it resumes.
        assert!(
            open_sse(b, &query, &[("last-event-id", &last_id)])
                .await
                .is_err()
        );
        // A cookie sent from an origin that is not allowed is not honoured.
        assert!(
            open_sse(
                b,
                &query,
                &[
                    ("last-event-id", &last_id),
                    ("cookie", &cookie),
                    ("origin", "http://evil.example")
                ]
            )
            .await
            .is_err()
        );
        let mut resumed = open_sse(
            b,
            &query,
            &[("last-event-id", &last_id), ("cookie", &cookie)],
        )
        .await
        .expect("the resume cookie opens the stream");
        let backlog = resumed.until("caught_up").await;
        let titles: Vec<String> = backlog
            .iter()
            .filter(|e| e.event == "notification")
            .map(title)
            .collect();
        assert_eq!(titles, (5..10).map(|i| format!("n{i}")).collect::<Vec<_>>());
        // The cookie was single-use too; the new stream set the next one.
        assert!(open_sse(b, &query, &[("cookie", &cookie)]).await.is_err());
        let next = resumed.headers[header::SET_COOKIE].to_str().unwrap();
        let next = next.split(';').next().unwrap().to_owned();
        assert_ne!(next, cookie);
        ok(
            b,
            "SendNotification",
            &sender,
            &send_body(&["alice"], "n10"),
        )
        .await;
        assert_eq!(title(&resumed.next().await.unwrap()), "n10");
        let with_next = open_sse(
            a,
            "",
            &[("cookie", &next), ("origin", "http://app.example")],
        )
        .await;
        assert!(with_next.is_ok(), "an allowed origin may use the cookie");
        d.stop().await;
    })
    .await;
}

#[tokio::test]
async fn sse_ends_with_an_error_event_when_the_replica_stops() {
    bounded(async {
        let d = Deployment::start(Backend::Memory, 1).await;
        let addr = d.replicas[0].addr;
        let bearer = format!("Bearer {}", token("alice", "", SEND_SCOPE));
        let mut stream = open_sse(addr, "", &[("authorization", &bearer)])
            .await
            .unwrap();
        stream.until("caught_up").await;
        let stopping = tokio::spawn(d.stop());
        let end = stream.next().await.expect("an error event");
        assert_eq!(end.event, "error");
        let v: Value = serde_json::from_str(&end.data).unwrap();
        assert_eq!(v["code"], "unavailable");
        assert!(stream.next().await.is_none(), "then the stream ends");
        stopping.await.unwrap();
    })
    .await;
}
