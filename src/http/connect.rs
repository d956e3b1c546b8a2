//! The Connect protocol's unary calls (<https://connectrpc.com/docs/protocol>)
//! for every unary RPC of `herald.v1.Notifications`: `POST
//! /herald.v1.Notifications/<Method>` with `Content-Type: application/json`
//! (the proto3 JSON mapping, [`super::json`]) or `application/proto`
//! (binary), the token in `Authorization: Bearer`, answered `200` with the
//! response message in the same codec. Each call goes to the same handler
//! as its gRPC twin, so validation, limits, metrics and errors are the
//! same.
//!
//! Errors are the protocol's JSON error object, `{"code":
//! "invalid_argument", "message": "title: must not be empty", "details":
//! [...]}`, with the HTTP status the protocol maps each code to
//! ([`http_status`]); a rate-limit refusal also carries its
//! `google.rpc.RetryInfo` as a detail and says when in `Retry-After` (RFC
//! 9110 §10.2.3). The request body must arrive within the request-body
//! timeout and fit the request size limit; the call must answer within the
//! call timeout, or the client's `Connect-Timeout-Ms` if sooner
//! (`deadline_exceeded`). Streaming calls are not served here: events are
//! on the SSE door ([`super::sse`]) or gRPC.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use prost::Message;
use tonic::{Code, Status, body::Body, metadata::MetadataMap};
use tonic_types::StatusExt;

use super::{DoorSettings, json::JsonCodec};
use crate::{
    api::NotificationsService,
    proto::{self, notifications_server::Notifications},
    store::Store,
    telemetry::names,
};

/// The path prefix of the service's procedures.
pub const SERVICE_PREFIX: &str = "/herald.v1.Notifications/";

/// The unary procedures served, by method name (what follows
/// [`SERVICE_PREFIX`]).
pub const UNARY_METHODS: &[&str] = &[
    "SendNotification",
    "SendNotifications",
    "CancelScheduledNotification",
    "MarkRead",
    "UpdateState",
    "ListNotifications",
    "GetUnreadCount",
    "CreateStreamTicket",
];

/// How a request body is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Codec {
    Json,
    Proto,
}

impl Codec {
    /// From `Content-Type` (media type, case-insensitive; parameters such
    /// as `charset=utf-8` allowed).
    fn of(headers: &HeaderMap) -> Option<Self> {
        let value = headers.get(header::CONTENT_TYPE)?.to_str().ok()?;
        let media = value.split(';').next()?.trim();
        if media.eq_ignore_ascii_case("application/json") {
            Some(Self::Json)
        } else if media.eq_ignore_ascii_case("application/proto") {
            Some(Self::Proto)
        } else {
            None
        }
    }

    fn content_type(self) -> HeaderValue {
        HeaderValue::from_static(match self {
            Self::Json => "application/json",
            Self::Proto => "application/proto",
        })
    }
}

/// Serves one Connect unary call to `method` (a name after
/// [`SERVICE_PREFIX`]).
pub async fn call<S: Store>(
    service: &NotificationsService<S>,
    codec: &JsonCodec,
    settings: &DoorSettings,
    method: &str,
    request: Request<Body>,
) -> Response<Body> {
    if !UNARY_METHODS.contains(&method) {
        return error_response(&Status::unimplemented(format!(
            "no unary procedure {SERVICE_PREFIX}{method} (Subscribe is served over gRPC and at /v1/events)"
        )));
    }
    if request.method() != Method::POST {
        let mut response = error_response(&Status::unimplemented(
            "Connect unary calls are POST requests",
        ));
        *response.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("POST"));
        return response;
    }
    let Some(format) = Codec::of(request.headers()) else {
        let mut response = Response::new(Body::empty());
        *response.status_mut() = StatusCode::UNSUPPORTED_MEDIA_TYPE;
        response.headers_mut().insert(
            "accept-post",
            HeaderValue::from_static("application/json, application/proto"),
        );
        return response;
    };
    match prepare(request.headers()) {
        Ok(()) => {}
        Err(status) => return error_response(&status),
    }
    let deadline = settings
        .call_timeout
        .min(connect_timeout(request.headers()).unwrap_or(Duration::MAX));
    let (parts, body) = request.into_parts();
    let metadata = MetadataMap::from_headers(parts.headers);
    let answered = tokio::time::timeout(deadline, async {
        let body = read_body(body, settings).await?;
        dispatch(service, codec, method, format, metadata, &body).await
    })
    .await;
    match answered {
        Ok(Ok(bytes)) => {
            let mut response = Response::new(Body::new(Full::new(Bytes::from(bytes))));
            response
                .headers_mut()
                .insert(header::CONTENT_TYPE, format.content_type());
            response
        }
        Ok(Err(status)) => error_response(&status),
        Err(_) => {
            metrics::counter!(names::CALLS_TIMED_OUT, "bound" => "call_timeout").increment(1);
            error_response(&Status::deadline_exceeded(format!(
                "the call took longer than its deadline ({})",
                humantime::format_duration(deadline)
            )))
        }
    }
}

/// Checks the protocol headers: `Connect-Protocol-Version` is `1` when
/// given; the body is not compressed (no codec is offered).
fn prepare(headers: &HeaderMap) -> Result<(), Status> {
    if let Some(version) = headers.get("connect-protocol-version")
        && version.as_bytes() != b"1"
    {
        return Err(Status::invalid_argument(
            "connect-protocol-version: must be 1",
        ));
    }
    if let Some(encoding) = headers.get(header::CONTENT_ENCODING)
        && !encoding.as_bytes().eq_ignore_ascii_case(b"identity")
    {
        return Err(Status::unimplemented(
            "content-encoding: only identity is supported",
        ));
    }
    Ok(())
}

/// `Connect-Timeout-Ms`: 1 to 10 ASCII digits; `None` when absent or not
/// that (ignored, as a malformed `grpc-timeout` is).
fn connect_timeout(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get("connect-timeout-ms")?.as_bytes();
    if value.is_empty() || value.len() > 10 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(value)
        .ok()?
        .parse()
        .ok()
        .map(Duration::from_millis)
}

/// The whole request body, at most the request size limit
/// (`resource_exhausted`, as gRPC answers an oversized message), within
/// the request-body timeout (`deadline_exceeded`).
async fn read_body(body: Body, settings: &DoorSettings) -> Result<Bytes, Status> {
    let limit = settings.max_request_bytes;
    let read = tokio::time::timeout(
        settings.request_body_timeout,
        Limited::new(body, limit).collect(),
    )
    .await
    .map_err(|_| {
        metrics::counter!(names::CALLS_TIMED_OUT, "bound" => "request_body_timeout").increment(1);
        Status::deadline_exceeded(format!(
            "the request body took longer than the server's limit ({})",
            humantime::format_duration(settings.request_body_timeout)
        ))
    })?;
    match read {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(Status::resource_exhausted(
            format!("the request body is larger than the server's limit ({limit} bytes)"),
        )),
        Err(e) => match e.downcast::<Status>() {
            Ok(status) => Err(*status),
            Err(e) => Err(Status::invalid_argument(format!(
                "the request body could not be read: {e}"
            ))),
        },
    }
}

/// Decodes the request, calls the handler, encodes the response.
async fn dispatch<S: Store>(
    service: &NotificationsService<S>,
    codec: &JsonCodec,
    method: &str,
    format: Codec,
    metadata: MetadataMap,
    body: &[u8],
) -> Result<Vec<u8>, Status> {
    let unimplemented =
        || Status::unimplemented(format!("no unary procedure {SERVICE_PREFIX}{method}"));
    // The method's message types, from the proto's own descriptors.
    let (input, output) = codec.method(method).ok_or_else(unimplemented)?;
    /// One arm: the generated request type and the handler.
    macro_rules! unary {
        ($request:ty, $handler:ident) => {{
            let message: $request = match format {
                Codec::Json => codec.decode_as(input, body)?,
                Codec::Proto => {
                    <$request>::decode(body).map_err(crate::api::status::undecodable)?
                }
            };
            let request =
                tonic::Request::from_parts(metadata, http::Extensions::default(), message);
            let response = service
                .$handler(request)
                .await?
                .into_inner()
                .encode_to_vec();
            match format {
                Codec::Json => codec.encode_bytes_as(output, &response),
                Codec::Proto => Ok(response),
            }
        }};
    }
    match method {
        "SendNotification" => unary!(proto::SendNotificationRequest, send_notification),
        "SendNotifications" => unary!(proto::SendNotificationsRequest, send_notifications),
        "CancelScheduledNotification" => unary!(
            proto::CancelScheduledNotificationRequest,
            cancel_scheduled_notification
        ),
        "MarkRead" => unary!(proto::MarkReadRequest, mark_read),
        "UpdateState" => unary!(proto::UpdateStateRequest, update_state),
        "ListNotifications" => unary!(proto::ListNotificationsRequest, list_notifications),
        "GetUnreadCount" => unary!(proto::GetUnreadCountRequest, get_unread_count),
        "CreateStreamTicket" => unary!(proto::CreateStreamTicketRequest, create_stream_ticket),
        _ => Err(unimplemented()),
    }
}

/// The Connect code name of a gRPC code (the gRPC names in snake case;
/// `CANCELLED` is spelled `canceled`).
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "ok",
        Code::Cancelled => "canceled",
        Code::Unknown => "unknown",
        Code::InvalidArgument => "invalid_argument",
        Code::DeadlineExceeded => "deadline_exceeded",
        Code::NotFound => "not_found",
        Code::AlreadyExists => "already_exists",
        Code::PermissionDenied => "permission_denied",
        Code::ResourceExhausted => "resource_exhausted",
        Code::FailedPrecondition => "failed_precondition",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out_of_range",
        Code::Unimplemented => "unimplemented",
        Code::Internal => "internal",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data_loss",
        Code::Unauthenticated => "unauthenticated",
    }
}

/// The HTTP status the Connect protocol gives each code ("Error Codes").
pub fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::Cancelled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
        Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
            StatusCode::BAD_REQUEST
        }
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
    }
}

/// The Connect error object of `status`: `{"code", "message"}`, and a
/// `google.rpc.RetryInfo` detail when the status carries one (base64
/// protobuf, as the protocol carries details).
pub fn error_object(status: &Status) -> serde_json::Value {
    let mut object = serde_json::json!({
        "code": code_name(status.code()),
        "message": status.message(),
    });
    if let Some(delay) = retry_delay(status)
        && let Ok(d) = prost_types::Duration::try_from(delay)
    {
        use base64::Engine;
        let info = tonic_types::pb::RetryInfo {
            retry_delay: Some(d),
        };
        object["details"] = serde_json::json!([{
            "type": "google.rpc.RetryInfo",
            "value": base64::engine::general_purpose::STANDARD_NO_PAD.encode(info.encode_to_vec()),
            "debug": {"retryDelay": format!("{}s", delay.as_secs_f64())},
        }]);
    }
    object
}

/// The retry delay a status advises (`google.rpc.RetryInfo`), if any.
fn retry_delay(status: &Status) -> Option<Duration> {
    status.get_details_retry_info()?.retry_delay
}

/// [`error_object`] as a response with the mapped HTTP status; a retry
/// delay is also said in `Retry-After` (whole seconds, rounded up).
pub fn error_response(status: &Status) -> Response<Body> {
    let object = error_object(status);
    let retry_after =
        retry_delay(status).map(|delay| delay.as_secs() + u64::from(delay.subsec_nanos() > 0));
    let mut response = Response::new(Body::new(Full::new(Bytes::from(object.to_string()))));
    *response.status_mut() = http_status(status.code());
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Some(secs) = retry_after {
        headers.insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_has_a_name_and_a_status() {
        assert_eq!(http_status(Code::Cancelled).as_u16(), 499);
        assert_eq!(http_status(Code::Unauthenticated), StatusCode::UNAUTHORIZED);
        assert_eq!(code_name(Code::Cancelled), "canceled");
    }

    #[test]
    fn a_connect_timeout_is_ten_digits_at_most() {
        let mut h = HeaderMap::new();
        h.insert("connect-timeout-ms", HeaderValue::from_static("1500"));
        assert_eq!(connect_timeout(&h), Some(Duration::from_millis(1500)));
        for bad in ["", "12345678901", "1.5", "-1", "1s"] {
            h.insert("connect-timeout-ms", HeaderValue::from_static(bad));
            assert_eq!(connect_timeout(&h), None, "{bad}");
        }
    }
}
