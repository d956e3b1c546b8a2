//! The one place typed errors become `tonic::Status`. Everything below the
//! service returns its own error enum; the handlers in `api/mod.rs` use `?`
//! and the conversions here pick the code, per the gRPC status-code guide
//! (<https://grpc.github.io/grpc/core/md_doc_statuscodes.html>): what the
//! client must fix (`INVALID_ARGUMENT`, `UNAUTHENTICATED`,
//! `PERMISSION_DENIED`, `FAILED_PRECONDITION`), what it may retry
//! (`UNAVAILABLE`, `RESOURCE_EXHAUSTED` with when), and what is ours
//! (`INTERNAL`, logged here, its details never sent).
//!
//! Matches are exhaustive, without a wildcard: a new error variant does not
//! compile until someone decides its code.

use std::{fmt::Display, time::Duration};

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::{
    auth::AuthError,
    hub::StreamLimitError,
    limits::RateLimitError,
    notification::{Epoch, InvalidArgument},
    store::StoreError,
};

/// When a client refused for a stream limit should retry.
const STREAM_RETRY_AFTER: Duration = Duration::from_secs(1);

impl From<AuthError> for Status {
    /// A token that is missing, malformed, badly signed or expired is
    /// `UNAUTHENTICATED` (the client should get a fresh token); a valid
    /// token without the scope the call needs is `PERMISSION_DENIED` (a
    /// fresh token of the same kind will not help).
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::MissingScope(..) => Status::permission_denied(e.to_string()),
            AuthError::Missing
            | AuthError::TooLarge
            | AuthError::Malformed
            | AuthError::Algorithm(..)
            | AuthError::Expired
            | AuthError::Invalid(..)
            | AuthError::Claim(..) => Status::unauthenticated(e.to_string()),
        }
    }
}

impl From<RateLimitError> for Status {
    /// `RESOURCE_EXHAUSTED` with a `google.rpc.RetryInfo` detail of when the
    /// bucket refills (AIP-193).
    fn from(e: RateLimitError) -> Self {
        resource_exhausted(&e, e.retry_after())
    }
}

impl From<StreamLimitError> for Status {
    /// `RESOURCE_EXHAUSTED`, retry after a second: streams close all the
    /// time, and another replica may have room now.
    fn from(e: StreamLimitError) -> Self {
        resource_exhausted(&e, STREAM_RETRY_AFTER)
    }
}

/// `RESOURCE_EXHAUSTED` with a `google.rpc.RetryInfo` detail of
/// `retry_after` (at least 1 ms: a zero delay reads as "no advice"), also
/// said in the message for clients that do not read details.
fn resource_exhausted(message: &impl Display, retry_after: Duration) -> Status {
    let retry_after = retry_after.max(Duration::from_millis(1));
    Status::with_error_details(
        Code::ResourceExhausted,
        format!("{message}; retry in {} ms", retry_after.as_millis()),
        ErrorDetails::with_retry_info(Some(retry_after)),
    )
}

impl From<InvalidArgument> for Status {
    /// `INVALID_ARGUMENT`, the message naming the field first.
    fn from(e: InvalidArgument) -> Self {
        Status::invalid_argument(e.to_string())
    }
}

impl From<StoreError> for Status {
    /// A database that cannot be reached is `UNAVAILABLE` (retryable), a
    /// reused idempotency key `FAILED_PRECONDITION`, anything else
    /// `INTERNAL`: logged here, and the client sees only "internal error".
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(..) => Status::unavailable(e.to_string()),
            StoreError::IdempotencyKeyReused => Status::failed_precondition(e.to_string()),
            StoreError::Internal(..) => {
                tracing::error!(error = %e, "store error");
                Status::internal("internal error")
            }
        }
    }
}

/// INVALID_ARGUMENT for a request body prost could not decode (truncated,
/// invalid UTF-8 in a string field, a bad wire type): it is the caller's
/// input. prost words its error as `failed to decode Protobuf message:
/// Message.field: problem`; the status keeps the field path and the
/// problem.
pub fn undecodable(error: prost::DecodeError) -> Status {
    let text = error.to_string();
    let detail = text
        .strip_prefix("failed to decode Protobuf message: ")
        .unwrap_or(&text);
    Status::invalid_argument(format!("invalid protobuf message: {detail}"))
}

/// How a stream ends when its token expires: `UNAUTHENTICATED`, telling
/// the client to resume after `last_seq` of `epoch` with a fresh token.
pub fn token_expired(last_seq: u64, epoch: Epoch) -> Status {
    Status::unauthenticated(format!(
        "token expired; reconnect with a fresh token, after_seq {last_seq} and epoch {epoch}"
    ))
}

/// How a stream ends when a store read fails: `UNAVAILABLE` whatever the
/// error, since resuming (here or on another replica) is the remedy. The
/// caller logs `e`; the client sees its text only when the database was
/// unavailable, never an internal error's.
pub fn stream_interrupted(e: &StoreError) -> Status {
    let cause = match e {
        StoreError::Unavailable(..) => e.to_string(),
        StoreError::IdempotencyKeyReused | StoreError::Internal(..) => "internal error".to_owned(),
    };
    Status::unavailable(format!("{cause}; resume from the last seq received"))
}

/// `INTERNAL` for a failure of ours that is not the store's (logged here;
/// the client sees only "internal error").
pub fn internal(e: &dyn std::error::Error) -> Status {
    tracing::error!(error = %e, "internal error");
    Status::internal("internal error")
}

/// `UNAVAILABLE`: this replica is draining, for a new stream and for the
/// ones it ends; the client resumes on another replica.
pub fn shutting_down() -> Status {
    Status::unavailable("server is shutting down; resume on another replica")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::notification::UserId;

    #[test]
    fn limits_are_resource_exhausted_with_retry_info() {
        let recipient = UserId::parse("recipients[0]", "alice").unwrap();
        let rate = Status::from(RateLimitError::Recipient {
            recipient,
            retry_after: Duration::from_millis(250),
        });
        assert_eq!(rate.code(), Code::ResourceExhausted);
        assert_eq!(
            rate.message(),
            "recipients: alice is over its notification rate; retry in 250 ms"
        );
        let retry = rate.get_details_retry_info().expect("a RetryInfo detail");
        assert_eq!(retry.retry_delay, Some(Duration::from_millis(250)));
        let now = Status::from(RateLimitError::Sender {
            sender: "svc".into(),
            retry_after: Duration::ZERO,
        });
        let retry = now.get_details_retry_info().expect("a RetryInfo detail");
        assert_eq!(retry.retry_delay, Some(Duration::from_millis(1)));
        let streams = Status::from(StreamLimitError::PerUser(32));
        assert_eq!(streams.code(), Code::ResourceExhausted);
        assert!(streams.message().ends_with("; retry in 1000 ms"));
        let retry = streams
            .get_details_retry_info()
            .expect("a RetryInfo detail");
        assert_eq!(retry.retry_delay, Some(STREAM_RETRY_AFTER));
    }

    #[test]
    fn auth_errors_are_unauthenticated_but_a_missing_scope() {
        let missing = Status::from(AuthError::Missing);
        assert_eq!(missing.code(), Code::Unauthenticated);
        assert_eq!(missing.message(), "missing authorization metadata");
        let algorithm = Status::from(AuthError::Algorithm(jsonwebtoken::Algorithm::RS256));
        assert_eq!(algorithm.code(), Code::Unauthenticated);
        assert_eq!(
            algorithm.message(),
            "invalid token: algorithm RS256 is not accepted"
        );
        let scope = Status::from(AuthError::MissingScope(crate::auth::SEND_SCOPE));
        assert_eq!(scope.code(), Code::PermissionDenied);
        assert_eq!(scope.message(), "token lacks the notifications:send scope");
    }

    #[test]
    fn streams_end_unauthenticated_or_resumable() {
        let expired = token_expired(7, 3);
        assert_eq!(expired.code(), Code::Unauthenticated);
        assert!(expired.message().ends_with("after_seq 7 and epoch 3"));
        let internal = stream_interrupted(&StoreError::internal("bug"));
        assert_eq!(internal.code(), Code::Unavailable);
        assert_eq!(
            internal.message(),
            "internal error; resume from the last seq received"
        );
        let down = stream_interrupted(&StoreError::unavailable("timeout"));
        assert_eq!(down.code(), Code::Unavailable);
        assert!(down.message().contains("timeout"));
        assert_eq!(shutting_down().code(), Code::Unavailable);
    }

    #[test]
    fn store_errors_hide_internals() {
        let internal = Status::from(StoreError::internal("relation \"x\" does not exist"));
        assert_eq!(internal.code(), Code::Internal);
        assert_eq!(internal.message(), "internal error");
        let down = Status::from(StoreError::unavailable("connection refused"));
        assert_eq!(down.code(), Code::Unavailable);
        let reused = Status::from(StoreError::IdempotencyKeyReused);
        assert_eq!(reused.code(), Code::FailedPrecondition);
        assert!(reused.message().starts_with("idempotency_key:"));
        let invalid = Status::from(InvalidArgument::new("title", "must not be empty"));
        assert_eq!(invalid.code(), Code::InvalidArgument);
        assert_eq!(invalid.message(), "title: must not be empty");
    }
}
