//! A user's event stream as Server-Sent Events (WHATWG HTML §9.2,
//! "Server-sent events"): `GET /v1/events` → `text/event-stream`, the same
//! stream `Subscribe` opens (backlog, `caught_up`, live, heartbeats, the
//! same resume rules), for `EventSource` and `curl -N`.
//!
//! **Who.** `Authorization: Bearer <token>` when the client can set it;
//! otherwise `?ticket=<ticket>` from `CreateStreamTicket` (short-lived,
//! single-use: a URL that leaks into a log is useless). `EventSource`
//! reconnects by itself to the same URL, whose ticket is spent by then, so
//! each stream opened also sets a *resume cookie* ([`RESUME_COOKIE`]:
//! `HttpOnly`, `SameSite=Strict`, path `/v1/events`, `Secure` unless the
//! host is a loopback name or address): another single-use ticket, valid
//! until the token expires (at most a day), that the reconnect presents
//! instead. It is honoured only for a request without an `Origin` or with
//! one of the CORS origins. A page on another site than the server gets
//! no cookie back (`SameSite`), so it mints a fresh ticket when its
//! `EventSource` errors and passes `last_event_id`.
//!
//! **Where from.** `Last-Event-ID` (sent by `EventSource` on its
//! reconnects), or the `last_event_id` query parameter, is `<epoch>:<seq>`
//! as the stream's `id:` lines give it, and resumes exactly as
//! `SubscribeRequest.after_seq` and `epoch` do (including `resync`).
//! Absent: a fresh stream (the unread backlog). `types` and `categories`
//! (repeatable) and `min_severity` (`high`, …) filter notifications as
//! `SubscribeRequest`'s fields of those names do.
//!
//! **What.** First a `retry:` hint (1–5 s, random per stream, so the
//! streams of a stopped replica do not all come back in the same
//! instant), then per event `id: <epoch>:<seq>`, `event:` the kind
//! (`notification`, `read`, `state`, `caught_up`, `resync`: the `kind`
//! field set) and `data:` the
//! `herald.v1.Event` in the proto3 JSON mapping. A heartbeat is a comment
//! line (`: heartbeat`), which keeps proxies from closing the idle stream
//! and is not an event. When the server ends the stream (stopping, token
//! expired) it sends `event: error` with `{"code", "message"}` as the
//! Connect error object, then closes; `EventSource` reconnects. Headers
//! keep proxies from buffering (`Cache-Control: no-store`,
//! `X-Accel-Buffering: no`).

use std::{fmt::Write as _, time::SystemTime};

use bytes::Bytes;
use cookie::{Cookie, SameSite};
use futures_util::StreamExt;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::StreamBody;
use hyper::body::Frame;
use tonic::{Status, body::Body};

use super::{DoorSettings, connect::error_response, json::JsonCodec};
use crate::{
    api::NotificationsService,
    notification::InvalidArgument,
    proto,
    store::Store,
    ticket::{MAX_RESUME_LIFETIME, TicketGrant},
    transport::ConnectionHandshake,
};

/// The path of the stream.
pub const EVENTS_PATH: &str = "/v1/events";

/// The resume cookie's name.
pub const RESUME_COOKIE: &str = "herald_resume";

/// Range of the `retry:` hint, milliseconds.
const RETRY_MS: std::ops::Range<u64> = 1_000..5_000;

/// What a request to [`EVENTS_PATH`] asks for.
#[derive(Debug, Default)]
struct Query {
    ticket: Option<String>,
    last_event_id: Option<String>,
    types: Vec<String>,
    categories: Vec<String>,
    min_severity: Option<String>,
}

impl Query {
    fn parse(query: Option<&str>) -> Self {
        let mut q = Self::default();
        for (key, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
            match &*key {
                "ticket" => q.ticket = Some(value.into_owned()),
                "last_event_id" => q.last_event_id = Some(value.into_owned()),
                "types" => q.types.push(value.into_owned()),
                "categories" => q.categories.push(value.into_owned()),
                "min_severity" => q.min_severity = Some(value.into_owned()),
                _ => {}
            }
        }
        q
    }
}

/// A `min_severity` query value: `low`, `normal`, `high`, `critical` (any
/// case, with or without the `SEVERITY_` prefix) or the enum's number.
fn parse_severity(value: &str) -> Result<i32, InvalidArgument> {
    let upper = value.trim().to_ascii_uppercase();
    let name = upper.strip_prefix("SEVERITY_").unwrap_or(&upper);
    proto::Severity::from_str_name(&format!("SEVERITY_{name}"))
        .map(|s| s as i32)
        .or_else(|| value.trim().parse().ok())
        .ok_or_else(|| {
            InvalidArgument::new(
                "min_severity",
                "must be low, normal, high or critical (or the Severity number)",
            )
        })
}

/// Parses an event id, `<epoch>:<seq>`, into `(epoch, seq)`.
pub fn parse_event_id(id: &str) -> Result<(u64, u64), InvalidArgument> {
    let bad = || {
        InvalidArgument::new(
            "last_event_id",
            "must be <epoch>:<seq> as the stream's id lines give it",
        )
    };
    let (epoch, seq) = id.trim().split_once(':').ok_or_else(bad)?;
    Ok((
        epoch.parse().map_err(|_| bad())?,
        seq.parse().map_err(|_| bad())?,
    ))
}

/// Serves `GET /v1/events`.
pub async fn events<S: Store>(
    service: &NotificationsService<S>,
    codec: &JsonCodec,
    settings: &DoorSettings,
    request: Request<Body>,
) -> Response<Body> {
    if request.method() != Method::GET {
        let mut response = error_response(&Status::unimplemented("the event stream is GET only"));
        *response.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET"));
        return response;
    }
    let (parts, _) = request.into_parts();
    match open(service, codec, settings, &parts).await {
        Ok(response) => response,
        Err(status) => error_response(&status),
    }
}

async fn open<S: Store>(
    service: &NotificationsService<S>,
    codec: &JsonCodec,
    settings: &DoorSettings,
    request: &http::request::Parts,
) -> Result<Response<Body>, Status> {
    let headers = &request.headers;
    let mut query = Query::parse(request.uri.query());
    // Everything that can be refused for bad input is checked before a
    // ticket is spent.
    let position = match headers.get("last-event-id") {
        Some(id) => Some(
            id.to_str()
                .map_err(|_| InvalidArgument::new("last_event_id", "must be ASCII"))?
                .to_owned(),
        ),
        None => query.last_event_id.clone(),
    };
    let mut subscribe = proto::SubscribeRequest {
        types: std::mem::take(&mut query.types),
        categories: std::mem::take(&mut query.categories),
        min_severity: match &query.min_severity {
            Some(s) => parse_severity(s)?,
            None => 0,
        },
        ..Default::default()
    };
    if let Some(id) = position.filter(|id| !id.trim().is_empty()) {
        let (epoch, seq) = parse_event_id(&id)?;
        subscribe.after_seq = Some(seq);
        subscribe.epoch = epoch;
    }
    crate::api::parse_filter(&subscribe)?;
    let grant = authenticate(service, settings, headers, &query).await?;
    let stream = service.open_stream_for(&grant, subscribe).await?;
    if let Some(handshake) = request.extensions.get::<ConnectionHandshake>() {
        handshake.authenticated();
    }
    // The cookie for EventSource's own reconnects: a ticket that lives as
    // long as the token (at most a day). A failure to store it costs only
    // the automatic reconnect, so the stream opens anyway.
    let resume_lifetime = grant
        .token_expires_at
        .duration_since(SystemTime::now())
        .unwrap_or_default()
        .min(MAX_RESUME_LIFETIME);
    let cookie = match service.mint_ticket(&grant, resume_lifetime).await {
        Ok((ticket, _)) => Some(resume_cookie(ticket, resume_lifetime, headers)),
        Err(status) => {
            tracing::debug!(error = %status.message(), "no resume cookie for an SSE stream");
            None
        }
    };
    let retry = fastrand::u64(RETRY_MS);
    let codec = codec.clone();
    let first = futures_util::stream::once(async move { Ok(format!("retry: {retry}\n\n")) });
    let events = stream
        .map(move |item| match item {
            Ok(wire) => Ok(render(&codec, &wire.0)),
            Err(status) => Err(status),
        })
        .scan(false, |ended, item| {
            // After the error event the stream is over.
            if *ended {
                return futures_util::future::ready(None);
            }
            let text = match item {
                Ok(text) => text,
                Err(status) => {
                    *ended = true;
                    error_event(&status)
                }
            };
            futures_util::future::ready(Some(Ok::<_, Status>(text)))
        });
    let body = first
        .chain(events)
        .map(|text| text.map(|t| Frame::data(Bytes::from(t))));
    let mut response = Response::new(Body::new(StreamBody::new(body)));
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    if let Some(cookie) = cookie.and_then(|c| HeaderValue::from_str(&c).ok()) {
        h.insert(header::SET_COOKIE, cookie);
    }
    Ok(response)
}

/// Who the request is for: its bearer token, else its `ticket`, else its
/// resume cookie (if its origin may use it). Errors: `UNAUTHENTICATED`.
async fn authenticate<S: Store>(
    service: &NotificationsService<S>,
    settings: &DoorSettings,
    headers: &HeaderMap,
    query: &Query,
) -> Result<TicketGrant, Status> {
    if headers.contains_key(header::AUTHORIZATION) {
        return Ok(TicketGrant::from(&service.identify_headers(headers)?));
    }
    let mut refused = Status::unauthenticated(
        "no credentials: send `authorization: Bearer <token>` or a `ticket` from CreateStreamTicket",
    );
    if let Some(ticket) = &query.ticket {
        match service.redeem_ticket(ticket).await {
            Ok(grant) => return Ok(grant),
            Err(status) => refused = status,
        }
    }
    if let Some(ticket) = resume_ticket(headers)
        && origin_allowed(headers, &settings.cors_origins)
    {
        return service.redeem_ticket(&ticket).await.map_err(|_| refused);
    }
    Err(refused)
}

/// The resume cookie's value, if the request carries one.
fn resume_ticket(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(Cookie::split_parse)
        .filter_map(Result::ok)
        .find(|c| c.name() == RESUME_COOKIE)
        .map(|c| c.value().to_owned())
}

/// Whether a cookie-carrying request may use it: no `Origin` (a same-origin
/// `GET`, or not a browser), or one of the CORS origins.
fn origin_allowed(headers: &HeaderMap, origins: &[String]) -> bool {
    match headers.get(header::ORIGIN) {
        None => true,
        Some(origin) => origins.iter().any(|o| o.as_bytes() == origin.as_bytes()),
    }
}

/// The `Set-Cookie` value of a resume ticket (RFC 6265bis).
fn resume_cookie(ticket: String, lifetime: std::time::Duration, headers: &HeaderMap) -> String {
    let loopback = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(|host| {
            let name = host.rsplit_once(':').map_or(host, |(n, port)| {
                if port.bytes().all(|b| b.is_ascii_digit()) {
                    n
                } else {
                    host
                }
            });
            matches!(name, "localhost" | "127.0.0.1" | "[::1]")
        })
        .unwrap_or(false);
    let max_age =
        cookie::time::Duration::seconds(i64::try_from(lifetime.as_secs()).unwrap_or(i64::MAX));
    Cookie::build((RESUME_COOKIE, ticket))
        .path(EVENTS_PATH)
        .http_only(true)
        .same_site(SameSite::Strict)
        .secure(!loopback)
        .max_age(max_age)
        .build()
        .to_string()
}

/// One event as SSE lines. Heartbeats are comments.
fn render(codec: &JsonCodec, bytes: &[u8]) -> String {
    // Decoded once: the kind, seq and epoch are read from the same message
    // that is written as JSON.
    let Ok(event) = codec
        .descriptor("herald.v1.Event")
        .and_then(|desc| JsonCodec::decode_dynamic(desc, bytes))
    else {
        return String::new();
    };
    // The event's name is the `kind` oneof's field that is set: every
    // kind the proto has, this version's and any added later.
    let kind = prost_reflect::ReflectMessage::descriptor(&event)
        .oneofs()
        .find(|o| o.name() == "kind")
        .and_then(|o| o.fields().find(|f| event.has_field(f)));
    let name = kind.as_ref().map_or("event", |f| f.name());
    if name == "heartbeat" {
        return ": heartbeat\n\n".to_owned();
    }
    let number = |field: &str| {
        event
            .get_field_by_name(field)
            .and_then(|v| v.as_u64())
            .unwrap_or(0)
    };
    let Ok(json) = codec.to_json(&event) else {
        return String::new();
    };
    let json = String::from_utf8(json).unwrap_or_default();
    let mut out = String::with_capacity(json.len() + 64);
    // JSON text has no raw newlines, so one data line holds it.
    let _ = write!(
        out,
        "id: {}:{}\nevent: {name}\ndata: {json}\n\n",
        number("epoch"),
        number("seq")
    );
    out
}

/// The stream's last event when the server ends it.
fn error_event(status: &Status) -> String {
    let object = super::connect::error_object(status);
    format!("event: error\ndata: {object}\n\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_ids_round_trip_and_bad_ones_name_the_field() {
        assert_eq!(parse_event_id("7:42").unwrap(), (7, 42));
        assert_eq!(parse_event_id(" 7:0 ").unwrap(), (7, 0));
        for bad in ["42", "a:1", "1:b", "1:2:3", ":", "-1:2"] {
            let e = parse_event_id(bad).unwrap_err();
            assert_eq!(e.field, "last_event_id", "{bad}");
        }
    }

    #[test]
    fn severities_parse_by_name_or_number() {
        assert_eq!(parse_severity("high").unwrap(), 3);
        assert_eq!(parse_severity("SEVERITY_CRITICAL").unwrap(), 4);
        assert_eq!(parse_severity("1").unwrap(), 1);
        assert_eq!(parse_severity("urgent").unwrap_err().field, "min_severity");
    }

    #[test]
    fn the_resume_cookie_is_secure_except_on_loopback() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("127.0.0.1:8080"));
        let c = resume_cookie("t".into(), std::time::Duration::from_secs(60), &h);
        assert!(
            c.contains("HttpOnly") && c.contains("SameSite=Strict"),
            "{c}"
        );
        assert!(!c.contains("Secure"), "{c}");
        assert!(
            c.contains("Path=/v1/events") && c.contains("Max-Age=60"),
            "{c}"
        );
        h.insert(header::HOST, HeaderValue::from_static("herald.example.com"));
        let c = resume_cookie("t".into(), std::time::Duration::from_secs(60), &h);
        assert!(c.contains("Secure"), "{c}");
    }

    #[test]
    fn a_cookie_counts_only_from_an_allowed_origin() {
        let origins = vec!["https://app.example.com".to_owned()];
        let mut h = HeaderMap::new();
        assert!(origin_allowed(&h, &origins));
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://evil.example"),
        );
        assert!(!origin_allowed(&h, &origins));
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://app.example.com"),
        );
        assert!(origin_allowed(&h, &origins));
    }
}
