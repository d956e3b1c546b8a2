//! The store: where notifications and read-state events live, and the only
//! place that knows how. Two implementations pass the same conformance
//! suite (`tests/`): [`postgres::PgStore`] for production and multi-replica
//! runs, [`memory::MemoryStore`] as the embedded single-replica default.
//!
//! Every write that adds to a user's stream takes the next seq of that user
//! under a per-user lock held until commit, so seqs are gap-free and in
//! commit order. A store also hands committed events to the hubs: the
//! memory store directly, the Postgres store through NOTIFY (`listener.rs`).

use std::{future::Future, time::SystemTime};

use crate::notification::{
    Delivery, MarkOutcome, NewNotification, Notification, PageQuery, ReadTarget, StreamHead,
    StreamRange,
};

pub mod group_commit;
pub mod memory;
pub mod postgres;

/// Why a store call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The database could not be reached or did not answer in time; the
    /// call may be retried. Maps to `UNAVAILABLE`.
    #[error("the database is unavailable: {0}")]
    Unavailable(String),
    /// The idempotency key was already used by this caller for a different
    /// request. Maps to `FAILED_PRECONDITION`.
    #[error("idempotency_key: already used for a different request")]
    IdempotencyKeyReused,
    /// Anything else (a bug or a schema mismatch). Maps to `INTERNAL`.
    #[error("store error: {0}")]
    Internal(String),
}

/// Result of a store call.
pub type StoreResult<T> = Result<T, StoreError>;

/// Persistence for notifications and users' event streams. `tenant` and
/// `user` are already-validated identities (see `notification.rs`).
pub trait Store: Send + Sync + 'static {
    /// Stores `n` for each recipient in one transaction and hands the events
    /// to the hubs once committed. With an idempotency key already used by
    /// `sender` in `tenant`, stores nothing and returns the first result.
    fn send(
        &self,
        tenant: &str,
        sender: &str,
        n: &NewNotification,
    ) -> impl Future<Output = StoreResult<Vec<Delivery>>> + Send;

    /// Marks `user`'s notifications read and, when anything changed, appends
    /// a read event to the user's stream. An `UpTo` seq beyond the stream's
    /// head is clamped to the head.
    fn mark_read(
        &self,
        tenant: &str,
        user: &str,
        target: &ReadTarget,
    ) -> impl Future<Output = StoreResult<MarkOutcome>> + Send;

    /// The extent of `user`'s stream.
    fn head(
        &self,
        tenant: &str,
        user: &str,
    ) -> impl Future<Output = StoreResult<StreamHead>> + Send;

    /// Up to `limit` events of `user`'s stream with seq > `after_seq`, in
    /// seq order, with the stream's epoch.
    fn events_after(
        &self,
        tenant: &str,
        user: &str,
        after_seq: u64,
        limit: usize,
    ) -> impl Future<Output = StoreResult<StreamRange>> + Send;

    /// Up to `limit` unread notifications of `user` with `after_seq` < seq
    /// <= `up_to_seq`, in seq order (the backlog of a fresh connection).
    fn unread_after(
        &self,
        tenant: &str,
        user: &str,
        after_seq: u64,
        up_to_seq: u64,
        limit: usize,
    ) -> impl Future<Output = StoreResult<Vec<Notification>>> + Send;

    /// A page of `user`'s notifications, newest first, with current read
    /// state.
    fn list(
        &self,
        tenant: &str,
        user: &str,
        query: PageQuery,
    ) -> impl Future<Output = StoreResult<Vec<Notification>>> + Send;

    /// `user`'s unread notification count and stream head seq, read
    /// together.
    fn unread_count(
        &self,
        tenant: &str,
        user: &str,
    ) -> impl Future<Output = StoreResult<(u64, u64)>> + Send;

    /// Deletes every stream event stored before `cutoff` and records, per
    /// user, the highest seq deleted. Returns how many events were deleted.
    fn prune(&self, cutoff: SystemTime) -> impl Future<Output = StoreResult<u64>> + Send;

    /// `Ok` when the store can serve calls (the database answers).
    fn ping(&self) -> impl Future<Output = StoreResult<()>> + Send;

    /// Connection pool (in use, idle), for stores that pool connections.
    fn pool_status(&self) -> Option<(usize, usize)> {
        None
    }
}
