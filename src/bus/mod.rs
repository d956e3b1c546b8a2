//! The bus: how committed events reach the hub of every replica.
//!
//! A store appends events to stream logs inside a transaction and hands
//! them to the bus ([`Bus::stage`]); the bus makes sure they reach every
//! replica's hub if, and only if, that transaction commits ("persist, then
//! push"). How is the implementation's business:
//!
//! - [`local::LocalBus`]: in-process, for the memory store (one replica):
//!   the store stages under its lock, after its write, and the events go
//!   straight to the hub.
//! - [`postgres::NotifyBus`]: PostgreSQL LISTEN/NOTIFY, the default: the
//!   store runs the staged `pg_notify` statement in its transaction; each
//!   replica's [`postgres::Listener`] receives the payloads on commit and
//!   routes them to its hub. The payload codec lives there, not in the store.
//!
//! Whatever the bus, a replica that may have missed events (connection
//! dropped, listener deaf) must say so with [`crate::hub::Hub::signal_all`],
//! and every local stream catches up from the store.

use std::sync::Arc;

use crate::notification::{StreamEvent, StreamKey};

pub mod local;
pub mod postgres;

/// An event appended to a stream by a write that is committing (or, for the
/// memory store, has committed).
#[derive(Debug, Clone)]
pub struct Committed {
    /// The stream it was appended to.
    pub key: StreamKey,
    /// The event, with its seq and epoch.
    pub event: Arc<StreamEvent>,
}

/// What the writing transaction must run so the bus carries its events:
/// `statement` with one parameter, `texts` (a `text[]`). For LISTEN/NOTIFY
/// it is `pg_notify` over the payloads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Staged {
    /// SQL taking `$1 text[]`.
    pub statement: &'static str,
    /// The encoded messages.
    pub texts: Vec<String>,
}

/// Carries committed events to every replica's hub.
pub trait Bus: Send + Sync + std::fmt::Debug + 'static {
    /// Hands over `events`, in the order they were appended (per stream:
    /// seq order). Returns what the writing transaction must also run for
    /// them to be carried, or `None` when they were delivered already (the
    /// in-process bus, called after the write).
    fn stage(&self, events: &[Committed]) -> Option<Staged>;
}
