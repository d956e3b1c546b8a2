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

use tonic::Status;

use crate::{auth::AuthError, notification::InvalidArgument, store::StoreError};

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

#[cfg(test)]
mod tests {
    use tonic::Code;

    use super::*;

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
    fn store_errors_hide_internals() {
        let internal = Status::from(StoreError::Internal("relation \"x\" does not exist".into()));
        assert_eq!(internal.code(), Code::Internal);
        assert_eq!(internal.message(), "internal error");
        let down = Status::from(StoreError::Unavailable("connection refused".into()));
        assert_eq!(down.code(), Code::Unavailable);
        let reused = Status::from(StoreError::IdempotencyKeyReused);
        assert_eq!(reused.code(), Code::FailedPrecondition);
        assert!(reused.message().starts_with("idempotency_key:"));
        let invalid = Status::from(InvalidArgument::new("title", "must not be empty"));
        assert_eq!(invalid.code(), Code::InvalidArgument);
        assert_eq!(invalid.message(), "title: must not be empty");
    }
}
