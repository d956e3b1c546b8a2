//! The store: where notifications and read-state events live, and the only
//! place that knows how. Two implementations pass the same conformance
//! suite (`tests/`): [`postgres::PgStore`] for production and multi-replica
//! runs, [`memory::MemoryStore`] as the embedded single-replica default.
//!
//! Every write that adds to a user's stream goes through one append
//! primitive (`log::append` for PostgreSQL, `MemoryStore::append`), which
//! takes the stream's next seq under a per-stream lock held until commit,
//! so seqs are gap-free and in commit order, and hands the committed events
//! to the bus (`crate::bus`): in process for the memory store, NOTIFY for
//! PostgreSQL.

use std::{future::Future, time::SystemTime};

use crate::notification::{
    NewNotification, Notification, NotificationFilter, PageQuery, Sent, StateOutcome, StateRequest,
    StreamHead, StreamRange,
};
use crate::ticket::{TicketDigest, TicketGrant};

pub mod group_commit;
pub mod log;
pub mod memory;
pub mod postgres;
pub mod retention;
pub mod scheduler;

/// Why a store call failed. Cheap to clone (a batch's failure is answered
/// to each of its sends); the cause is kept, so a log says what the
/// database said.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The database could not be reached or did not answer in time; the
    /// call may be retried. Maps to `UNAVAILABLE`.
    #[error("the database is unavailable: {0}")]
    Unavailable(#[source] Cause),
    /// The idempotency key was already used by this caller for a different
    /// request. Maps to `FAILED_PRECONDITION`.
    #[error("idempotency_key: already used for a different request")]
    IdempotencyKeyReused,
    /// Anything else (a bug or a schema mismatch). Maps to `INTERNAL`.
    #[error("store error: {0}")]
    Internal(#[source] Cause),
}

impl StoreError {
    /// `Unavailable` caused by `cause`.
    pub fn unavailable(cause: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self::Unavailable(Cause(cause.into().into()))
    }

    /// `Internal` caused by `cause`.
    pub fn internal(cause: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self::Internal(Cause(cause.into().into()))
    }
}

/// The error a [`StoreError`] came from, shared. Displays its whole chain
/// of sources: a `tokio_postgres::Error` alone says only "db error"; its
/// source says what PostgreSQL said (e.g. "ERROR: payload string too
/// long").
#[derive(Debug, Clone)]
pub struct Cause(std::sync::Arc<dyn std::error::Error + Send + Sync>);

impl std::fmt::Display for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(s) = source {
            write!(f, ": {s}")?;
            source = s.source();
        }
        Ok(())
    }
}

impl std::error::Error for Cause {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

/// What [`Store::unread_count`] read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnreadCounts {
    /// Unread notifications in the inbox (not archived, not deleted).
    pub unread: u64,
    /// Of those and the read ones, the notifications neither seen nor read.
    pub unseen: u64,
    /// The stream's head seq.
    pub seq: u64,
    /// Unread notifications matching each filter asked for, in order.
    pub filtered: Vec<u64>,
}

/// Result of a store call.
pub type StoreResult<T> = Result<T, StoreError>;

/// Persistence for notifications and users' event streams. `tenant` and
/// `user` are already-validated identities (see `notification.rs`).
pub trait Store: Send + Sync + 'static {
    /// Stores `n` for each recipient in one transaction and hands the events
    /// to the hubs once committed. With an idempotency key already used by
    /// `sender` in `tenant`, stores nothing and returns the first result
    /// (`replayed`).
    fn send(
        &self,
        tenant: &str,
        sender: &str,
        n: &NewNotification,
    ) -> impl Future<Output = StoreResult<Sent>> + Send;

    /// Cancels the send `sender` scheduled in `tenant` with idempotency key
    /// `key`, if it is still waiting: true when it was.
    fn cancel_scheduled(
        &self,
        tenant: &str,
        sender: &str,
        key: &str,
    ) -> impl Future<Output = StoreResult<bool>> + Send;

    /// Delivers scheduled sends due by `now` (appended to their
    /// recipients' streams as any send), each once whichever replica runs
    /// it; a send that expired before it was due is dropped. Returns how
    /// many it took (a run takes a bounded batch: run again while this is
    /// positive).
    fn deliver_due(&self, now: SystemTime) -> impl Future<Output = StoreResult<usize>> + Send;

    /// Deletes the notifications expired by `now` (`expires_at`), with a
    /// `state` delete event on each user's stream and the counters moved,
    /// as `update_state` would. Returns how many (bounded per run, like
    /// `deliver_due`).
    fn expire(&self, now: SystemTime) -> impl Future<Output = StoreResult<usize>> + Send;

    /// Changes the state of `user`'s notifications (`request.action` on
    /// `request.target`) and, when any changed, appends one state event to
    /// the user's stream, in the same transaction. An `UpTo` seq beyond the
    /// stream's head is clamped to the head, and a `Filter` target covers
    /// the notifications up to the head; the event records that seq. Only
    /// notifications whose state changes count and, by ids, are named in
    /// the event; deleted ones never change again. The stream's unread and
    /// unseen counters follow in the same transaction.
    fn update_state(
        &self,
        tenant: &str,
        user: &str,
        request: &StateRequest,
    ) -> impl Future<Output = StoreResult<StateOutcome>> + Send;

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

    /// Up to `limit` unread notifications of `user`'s inbox (not archived,
    /// deleted or expired by the store's clock) with `after_seq` < seq <= `up_to_seq`, in seq order
    /// (the backlog of a fresh connection).
    fn unread_after(
        &self,
        tenant: &str,
        user: &str,
        after_seq: u64,
        up_to_seq: u64,
        limit: usize,
    ) -> impl Future<Output = StoreResult<Vec<Notification>>> + Send;

    /// A page of `user`'s notifications, newest first, with current state:
    /// the inbox, or the archived ones (`query.archived`); never deleted
    /// or expired ones.
    fn list(
        &self,
        tenant: &str,
        user: &str,
        query: PageQuery,
    ) -> impl Future<Output = StoreResult<Vec<Notification>>> + Send;

    /// `user`'s unread and unseen counts and stream head seq, and the
    /// unread count of each of `filters` (in order), all read in one
    /// snapshot: each count is what `list` with `unread_only` and that
    /// filter would list (archived, deleted and expired notifications never
    /// count).
    fn unread_count(
        &self,
        tenant: &str,
        user: &str,
        filters: &[NotificationFilter],
    ) -> impl Future<Output = StoreResult<UnreadCounts>> + Send;

    /// Keeps a stream ticket (its digest) for `grant` until `expires_at`.
    fn put_ticket(
        &self,
        digest: TicketDigest,
        grant: &TicketGrant,
        expires_at: SystemTime,
    ) -> impl Future<Output = StoreResult<()>> + Send;

    /// Takes the ticket with `digest`: deletes it and returns its grant if
    /// it had not expired by `now`. A ticket is taken once, whichever
    /// replica asks first.
    fn take_ticket(
        &self,
        digest: TicketDigest,
        now: SystemTime,
    ) -> impl Future<Output = StoreResult<Option<TicketGrant>>> + Send;

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

#[cfg(test)]
mod tests {
    use super::*;

    /// A database error's own text is only "db error"; what PostgreSQL
    /// said is its source. A store error must carry and show both.
    #[test]
    fn a_store_error_says_what_its_cause_said() {
        #[derive(Debug, thiserror::Error)]
        #[error("db error")]
        struct Outer(#[source] Inner);
        #[derive(Debug, thiserror::Error)]
        #[error("ERROR: payload string too long")]
        struct Inner;

        let e = StoreError::internal(Outer(Inner));
        assert_eq!(
            e.to_string(),
            "store error: db error: ERROR: payload string too long"
        );
        let source = std::error::Error::source(&e).expect("the cause is kept");
        assert!(source.to_string().ends_with("payload string too long"));
    }
}
