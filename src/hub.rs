//! The hub: this replica's open streams, by stream key ([`StreamKey`]: a
//! tenant's user inbox today), and the routing of committed events to them.
//!
//! Publishing never blocks and never allocates per stream beyond an `Arc`
//! clone: each stream has a bounded queue, and when it is full the event is
//! not queued but the stream is flagged *lagging* and woken. A lagging
//! stream re-reads what it missed from the store, from its last delivered
//! seq (see `subscription.rs`), so a slow client costs only itself and memory
//! per stream stays bounded by the queue length.

use std::{
    collections::HashMap,
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
};

use tokio::sync::{Notify, mpsc};

use crate::{
    notification::{StreamEvent, StreamKey},
    telemetry::names,
};

/// The shared state between the hub and one stream.
#[derive(Debug, Default)]
struct Signal {
    /// Set when the stream may have missed events and must catch up from
    /// the store before trusting its queue again.
    lagging: AtomicBool,
    /// Wakes the stream's task when `lagging` is set.
    wake: Notify,
}

#[derive(Debug)]
struct Slot {
    id: u64,
    tx: mpsc::Sender<Arc<StreamEvent>>,
    signal: Arc<Signal>,
}

impl Slot {
    fn flag_lagging(&self) {
        self.signal.lagging.store(true, Ordering::Release);
        self.signal.wake.notify_one();
    }
}

/// One tenant's streams. Each stream-key kind has its own map, so lookups
/// borrow the key's parts and allocate nothing.
#[derive(Debug, Default)]
struct Streams {
    users: HashMap<String, Vec<Slot>>,
}

impl Streams {
    fn is_empty(&self) -> bool {
        self.users.is_empty()
    }
}

/// Limits on open streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamLimits {
    /// Events queued per stream before it is flagged lagging (min 1).
    pub queue_len: usize,
    /// Open streams per user on this replica.
    pub per_user: usize,
    /// Open streams on this replica.
    pub total: usize,
}

impl Default for StreamLimits {
    fn default() -> Self {
        Self {
            queue_len: 256,
            per_user: 32,
            total: 100_000,
        }
    }
}

/// A stream refused by [`StreamLimits`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamLimitError {
    /// The user already has this many streams here.
    #[error("this user already has {0} open streams on this replica")]
    PerUser(usize),
    /// The replica already has this many streams.
    #[error("this replica already serves {0} streams; reconnect to another")]
    Total(usize),
}

/// This replica's open streams. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct Hub {
    tenants: RwLock<HashMap<String, Streams>>,
    next_id: AtomicU64,
    open: AtomicUsize,
    limits: StreamLimits,
}

impl Hub {
    /// A hub enforcing `limits`.
    pub fn new(limits: StreamLimits) -> Arc<Self> {
        Arc::new(Self {
            tenants: RwLock::default(),
            next_id: AtomicU64::new(1),
            open: AtomicUsize::new(0),
            limits: StreamLimits {
                queue_len: limits.queue_len.max(1),
                ..limits
            },
        })
    }

    /// Registers a stream for `key`. Events published from now on reach it
    /// (or flag it lagging); the stream is removed when the returned
    /// [`Subscription`] is dropped. Refused when the user or the replica is
    /// at its stream limit.
    pub fn subscribe(self: &Arc<Self>, key: StreamKey) -> Result<Subscription, StreamLimitError> {
        let (tx, rx) = mpsc::channel(self.limits.queue_len);
        let signal = Arc::new(Signal::default());
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let slot = Slot {
            id,
            tx,
            signal: signal.clone(),
        };
        {
            let mut tenants = self.write();
            let open = self.open.load(Ordering::Relaxed);
            if open >= self.limits.total {
                return Err(StreamLimitError::Total(open));
            }
            let StreamKey::User { tenant, user } = &key;
            let slots = tenants
                .entry(tenant.clone())
                .or_default()
                .users
                .entry(user.clone())
                .or_default();
            if slots.len() >= self.limits.per_user {
                return Err(StreamLimitError::PerUser(slots.len()));
            }
            slots.push(slot);
            self.open.fetch_add(1, Ordering::Relaxed);
        }
        metrics::gauge!(names::STREAMS_OPEN).increment(1.0);
        Ok(Subscription {
            hub: self.clone(),
            key,
            id,
            rx,
            signal,
        })
    }

    fn slots<'a>(tenants: &'a HashMap<String, Streams>, key: &StreamKey) -> Option<&'a Vec<Slot>> {
        match key {
            StreamKey::User { tenant, user } => tenants.get(tenant)?.users.get(user),
        }
    }

    /// Whether `key` has any stream on this replica.
    pub fn has_streams(&self, key: &StreamKey) -> bool {
        Self::slots(&self.read(), key).is_some()
    }

    /// Whether the inbox of `tenant`/`user` has any stream on this replica
    /// (without building a [`StreamKey`]: the bus asks this for every
    /// recipient of every send).
    pub fn has_user_streams(&self, tenant: &str, user: &str) -> bool {
        self.read()
            .get(tenant)
            .is_some_and(|t| t.users.contains_key(user))
    }

    /// Offers `event` to every stream of `key` on this replica. A stream
    /// whose queue is full is flagged lagging instead.
    pub fn publish(&self, key: &StreamKey, event: &Arc<StreamEvent>) {
        let tenants = self.read();
        let Some(slots) = Self::slots(&tenants, key) else {
            return;
        };
        for slot in slots {
            if slot.tx.try_send(event.clone()).is_err() {
                if !slot.signal.lagging.load(Ordering::Acquire) {
                    metrics::counter!(names::STREAM_LAGS).increment(1);
                }
                slot.flag_lagging();
            }
        }
    }

    /// Tells every stream of `key` that events up to some seq were
    /// committed without their content reaching this replica (e.g. a NOTIFY
    /// too large to carry them): each catches up from the store.
    pub fn signal(&self, key: &StreamKey) {
        if let Some(slots) = Self::slots(&self.read(), key) {
            slots.iter().for_each(Slot::flag_lagging);
        }
    }

    /// Makes every stream on this replica catch up from the store, e.g.
    /// after the LISTEN connection was lost and notifications may have been
    /// missed.
    pub fn signal_all(&self) {
        for streams in self.read().values() {
            streams
                .users
                .values()
                .flatten()
                .for_each(Slot::flag_lagging);
        }
    }

    /// Number of open streams on this replica.
    pub fn stream_count(&self) -> usize {
        self.read()
            .values()
            .flat_map(|t| t.users.values())
            .map(Vec::len)
            .sum()
    }

    fn remove(&self, key: &StreamKey, id: u64) {
        let mut tenants = self.write();
        let StreamKey::User { tenant, user } = key;
        let Some(streams) = tenants.get_mut(tenant) else {
            return;
        };
        if let Some(slots) = streams.users.get_mut(user) {
            let before = slots.len();
            slots.retain(|s| s.id != id);
            self.open.fetch_sub(before - slots.len(), Ordering::Relaxed);
            if slots.is_empty() {
                streams.users.remove(user);
            }
        }
        if streams.is_empty() {
            tenants.remove(tenant);
        }
    }

    // A panic while holding the lock cannot leave the maps half-updated
    // (every mutation is a single insert/retain/remove), so a poisoned lock
    // is safe to keep using.
    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Streams>> {
        self.tenants.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Streams>> {
        self.tenants.write().unwrap_or_else(|e| e.into_inner())
    }
}

/// One stream's registration in the hub: its queue of live events and its
/// lagging signal. Dropping it unregisters the stream.
#[derive(Debug)]
pub struct Subscription {
    hub: Arc<Hub>,
    key: StreamKey,
    id: u64,
    rx: mpsc::Receiver<Arc<StreamEvent>>,
    signal: Arc<Signal>,
}

/// What a stream should do next.
#[derive(Debug)]
pub enum Next {
    /// Deliver this live event (if its seq is the next one expected).
    Event(Arc<StreamEvent>),
    /// Events may have been missed: catch up from the store.
    CatchUp,
}

impl Subscription {
    /// Waits for the next live event or a catch-up signal. The lagging flag
    /// is cleared when `CatchUp` is returned, so a catch-up that starts after
    /// this call sees everything that was not queued. Cancel-safe.
    pub async fn next(&mut self) -> Next {
        loop {
            if self.signal.lagging.swap(false, Ordering::AcqRel) {
                return Next::CatchUp;
            }
            tokio::select! {
                biased;
                () = self.signal.wake.notified() => continue,
                ev = self.rx.recv() => match ev {
                    Some(ev) => return Next::Event(ev),
                    // The hub holds the sender until we unregister, so this
                    // is unreachable; treat it as "re-read the store".
                    None => return Next::CatchUp,
                },
            }
        }
    }

    /// Takes a queued event without waiting, if one is ready.
    pub fn try_next(&mut self) -> Option<Arc<StreamEvent>> {
        self.rx.try_recv().ok()
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        metrics::gauge!(names::STREAMS_OPEN).decrement(1.0);
        self.hub.remove(&self.key, self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::notification::{EventBody, StateAction, StateChange};

    fn event(seq: u64) -> Arc<StreamEvent> {
        Arc::new(StreamEvent::new(
            seq,
            1,
            EventBody::State(StateChange {
                action: StateAction::Read,
                ids: vec![],
                up_to_seq: seq,
                filter: None,
            }),
        ))
    }

    fn hub(queue_len: usize) -> Arc<Hub> {
        Hub::new(StreamLimits {
            queue_len,
            ..StreamLimits::default()
        })
    }

    #[tokio::test]
    async fn routes_by_tenant_and_user_and_unregisters_on_drop() {
        let hub = hub(4);
        let mut a = hub.subscribe(StreamKey::user("t", "alice")).unwrap();
        let mut other_tenant = hub.subscribe(StreamKey::user("u", "alice")).unwrap();
        hub.publish(&StreamKey::user("t", "alice"), &event(1));
        assert!(matches!(a.next().await, Next::Event(e) if e.seq == 1));
        assert!(other_tenant.try_next().is_none());
        drop(a);
        drop(other_tenant);
        assert_eq!(hub.stream_count(), 0);
        assert!(!hub.has_streams(&StreamKey::user("t", "alice")));
    }

    #[test]
    fn stream_limits_per_user_and_per_replica() {
        let hub = Hub::new(StreamLimits {
            queue_len: 1,
            per_user: 2,
            total: 3,
        });
        let a1 = hub.subscribe(StreamKey::user("t", "alice")).unwrap();
        let _a2 = hub.subscribe(StreamKey::user("t", "alice")).unwrap();
        assert_eq!(
            hub.subscribe(StreamKey::user("t", "alice")).unwrap_err(),
            StreamLimitError::PerUser(2)
        );
        let _b = hub.subscribe(StreamKey::user("t", "bob")).unwrap();
        assert_eq!(
            hub.subscribe(StreamKey::user("t", "carol")).unwrap_err(),
            StreamLimitError::Total(3)
        );
        drop(a1);
        assert_eq!(hub.stream_count(), 2);
        hub.subscribe(StreamKey::user("t", "alice")).unwrap();
    }

    #[tokio::test]
    async fn full_queue_flags_lagging_without_blocking() {
        let hub = hub(2);
        let mut s = hub.subscribe(StreamKey::user("t", "alice")).unwrap();
        for seq in 1..=5 {
            hub.publish(&StreamKey::user("t", "alice"), &event(seq));
        }
        // Queue first: the flag is checked before waiting, so CatchUp wins.
        assert!(matches!(s.next().await, Next::CatchUp));
        assert!(matches!(s.next().await, Next::Event(e) if e.seq == 1));
        hub.signal_all();
        assert!(matches!(s.next().await, Next::CatchUp));
    }
}
