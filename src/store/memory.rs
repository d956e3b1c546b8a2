//! The in-memory store: the embedded default, for trying Herald and for a
//! single replica that may lose its data on restart. One mutex guards
//! everything; a write publishes to the hub while still holding it, so each
//! user's events reach the hub in seq order.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    sync::{Arc, Mutex, MutexGuard},
    time::SystemTime,
};

use super::{Store, StoreError, StoreResult};
use crate::{
    hub::Hub,
    notification::{
        Delivery, Epoch, EventBody, MarkOutcome, NewNotification, Notification, PageQuery,
        ReadChange, ReadTarget, StreamEvent, StreamHead, StreamRange, new_epoch,
    },
};

#[derive(Debug, Default)]
struct UserLog {
    head: StreamHead,
    /// Events with seq pruned_seq+1 ..= last_seq, each with its store time.
    events: VecDeque<(SystemTime, Arc<StreamEvent>)>,
    /// Current notifications by seq, with live read state.
    notifications: BTreeMap<u64, Notification>,
}

impl UserLog {
    fn append(&mut self, body: EventBody, at: SystemTime) -> Arc<StreamEvent> {
        self.head.last_seq += 1;
        let event = Arc::new(StreamEvent::new(self.head.last_seq, self.head.epoch, body));
        self.events.push_back((at, event.clone()));
        event
    }
}

type UserKey = (String, String);

#[derive(Debug, Default)]
struct Inner {
    next_id: i64,
    users: HashMap<UserKey, UserLog>,
    /// (tenant, sender, key) → (request fingerprint, first result).
    idempotency: HashMap<(String, String, String), (String, Vec<Delivery>)>,
}

/// Notifications kept in process memory. Lost on restart; one replica only.
/// Its streams' epoch is drawn at random when the store is created, so a
/// client resuming after a restart gets `resync`, never a position in the
/// lost history.
#[derive(Debug)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
    hub: Arc<Hub>,
    epoch: Epoch,
}

fn key(tenant: &str, user: &str) -> UserKey {
    (tenant.to_owned(), user.to_owned())
}

impl MemoryStore {
    /// An empty store that publishes committed events to `hub`.
    pub fn new(hub: Arc<Hub>) -> Self {
        Self {
            inner: Mutex::default(),
            hub,
            epoch: new_epoch(),
        }
    }

    /// The epoch of every stream of this store.
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    fn log<'a>(&self, inner: &'a mut Inner, tenant: &str, user: &str) -> &'a mut UserLog {
        let epoch = self.epoch;
        inner
            .users
            .entry(key(tenant, user))
            .or_insert_with(|| UserLog {
                head: StreamHead {
                    epoch,
                    ..StreamHead::default()
                },
                ..UserLog::default()
            })
    }

    // Every mutation completes before the guard drops and none can panic
    // half-way, so a poisoned lock still guards consistent data.
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Store for MemoryStore {
    async fn send(
        &self,
        tenant: &str,
        sender: &str,
        n: &NewNotification,
    ) -> StoreResult<Vec<Delivery>> {
        let mut inner = self.lock();
        let idem = n
            .idempotency_key
            .as_ref()
            .map(|k| (tenant.to_owned(), sender.to_owned(), k.clone()));
        let fingerprint = n.fingerprint();
        if let Some((stored, deliveries)) = idem.as_ref().and_then(|k| inner.idempotency.get(k)) {
            return if *stored == fingerprint {
                Ok(deliveries.clone())
            } else {
                Err(StoreError::IdempotencyKeyReused)
            };
        }
        let now = SystemTime::now();
        let mut deliveries = Vec::with_capacity(n.recipients.len());
        for recipient in &n.recipients {
            inner.next_id += 1;
            let id = inner.next_id;
            let log = self.log(&mut inner, tenant, recipient.as_str());
            let notification = Notification {
                id,
                seq: log.head.last_seq + 1,
                recipient: recipient.to_string(),
                kind: n.kind.as_str().to_owned(),
                title: n.title.clone(),
                body: n.body.clone(),
                data: n.data.clone(),
                created_at: now,
                read: false,
            };
            log.notifications
                .insert(notification.seq, notification.clone());
            let event = log.append(EventBody::Notification(notification), now);
            self.hub.publish(tenant, recipient.as_str(), &event);
            deliveries.push(Delivery {
                recipient: recipient.to_string(),
                notification_id: id,
                seq: event.seq,
            });
        }
        if let Some(k) = idem {
            inner
                .idempotency
                .insert(k, (fingerprint, deliveries.clone()));
        }
        Ok(deliveries)
    }

    async fn mark_read(
        &self,
        tenant: &str,
        user: &str,
        target: &ReadTarget,
    ) -> StoreResult<MarkOutcome> {
        let mut inner = self.lock();
        let Some(log) = inner.users.get_mut(&key(tenant, user)) else {
            return Ok(MarkOutcome::default());
        };
        let mut ids = Vec::new();
        let change = match target {
            ReadTarget::Ids(wanted) => {
                for n in log.notifications.values_mut() {
                    if !n.read && wanted.binary_search(&n.id).is_ok() {
                        n.read = true;
                        ids.push(n.id);
                    }
                }
                ReadChange {
                    ids: ids.clone(),
                    up_to_seq: 0,
                }
            }
            ReadTarget::UpTo(seq) => {
                let up_to = (*seq).min(log.head.last_seq);
                for n in log.notifications.range_mut(..=up_to).map(|(_, n)| n) {
                    if !n.read {
                        n.read = true;
                        ids.push(n.id);
                    }
                }
                ReadChange {
                    ids: Vec::new(),
                    up_to_seq: up_to,
                }
            }
        };
        if ids.is_empty() {
            return Ok(MarkOutcome::default());
        }
        let event = log.append(EventBody::Read(change), SystemTime::now());
        self.hub.publish(tenant, user, &event);
        Ok(MarkOutcome {
            marked: u32::try_from(ids.len()).unwrap_or(u32::MAX),
            seq: event.seq,
        })
    }

    async fn head(&self, tenant: &str, user: &str) -> StoreResult<StreamHead> {
        let inner = self.lock();
        Ok(inner.users.get(&key(tenant, user)).map_or_else(
            || StreamHead {
                epoch: self.epoch,
                ..StreamHead::default()
            },
            |l| l.head,
        ))
    }

    async fn events_after(
        &self,
        tenant: &str,
        user: &str,
        after_seq: u64,
        limit: usize,
    ) -> StoreResult<StreamRange> {
        let inner = self.lock();
        let Some(log) = inner.users.get(&key(tenant, user)) else {
            return Ok(StreamRange {
                epoch: self.epoch,
                events: Vec::new(),
            });
        };
        // events[i] has seq pruned_seq + 1 + i.
        let skip = after_seq.saturating_sub(log.head.pruned_seq);
        let skip = usize::try_from(skip).unwrap_or(usize::MAX);
        Ok(StreamRange {
            epoch: self.epoch,
            events: log
                .events
                .iter()
                .skip(skip)
                .take(limit)
                .map(|(_, e)| StreamEvent::clone(e))
                .collect(),
        })
    }

    async fn unread_after(
        &self,
        tenant: &str,
        user: &str,
        after_seq: u64,
        up_to_seq: u64,
        limit: usize,
    ) -> StoreResult<Vec<Notification>> {
        if after_seq >= up_to_seq {
            return Ok(Vec::new());
        }
        let inner = self.lock();
        let Some(log) = inner.users.get(&key(tenant, user)) else {
            return Ok(Vec::new());
        };
        Ok(log
            .notifications
            .range(after_seq + 1..=up_to_seq)
            .map(|(_, n)| n)
            .filter(|n| !n.read)
            .take(limit)
            .cloned()
            .collect())
    }

    async fn list(
        &self,
        tenant: &str,
        user: &str,
        query: PageQuery,
    ) -> StoreResult<Vec<Notification>> {
        let inner = self.lock();
        let Some(log) = inner.users.get(&key(tenant, user)) else {
            return Ok(Vec::new());
        };
        Ok(log
            .notifications
            .range(..query.before_seq)
            .rev()
            .map(|(_, n)| n)
            .filter(|n| !query.unread_only || !n.read)
            .take(query.limit)
            .cloned()
            .collect())
    }

    async fn unread_count(&self, tenant: &str, user: &str) -> StoreResult<(u64, u64)> {
        let inner = self.lock();
        Ok(inner
            .users
            .get(&key(tenant, user))
            .map(|log| {
                let unread = log.notifications.values().filter(|n| !n.read).count();
                (unread as u64, log.head.last_seq)
            })
            .unwrap_or_default())
    }

    async fn prune(&self, cutoff: SystemTime) -> StoreResult<u64> {
        let mut inner = self.lock();
        let mut deleted = 0;
        for log in inner.users.values_mut() {
            while let Some((at, event)) = log.events.front() {
                if *at >= cutoff {
                    break;
                }
                log.head.pruned_seq = event.seq;
                log.events.pop_front();
                deleted += 1;
            }
            let keep = log.notifications.split_off(&(log.head.pruned_seq + 1));
            log.notifications = keep;
        }
        Ok(deleted)
    }

    async fn ping(&self) -> StoreResult<()> {
        Ok(())
    }
}
