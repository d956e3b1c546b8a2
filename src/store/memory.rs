//! The in-memory store: the embedded default, for trying Herald and for a
//! single replica that may lose its data on restart. One mutex guards
//! everything; a write hands its events to the in-process bus while still
//! holding it, so each user's events reach the hub in seq order.
//!
//! Memory is bounded by retention: [`Store::prune`] drops events older than
//! the cutoff, the logs of users left with nothing, and idempotency keys
//! older than the cutoff; at most [`MAX_IDEMPOTENCY_KEYS`] keys are kept
//! in any case (the oldest go first). Stream tickets are dropped when
//! taken or expired, and at most [`MAX_TICKETS`] are kept (the ones that
//! expire soonest go first). Scheduled sends are kept until due or
//! cancelled (the senders' rate limits bound how many arrive).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    sync::{Arc, Mutex, MutexGuard},
    time::SystemTime,
};

use super::{Store, StoreError, StoreResult, UnreadCounts};
use crate::{
    bus::{Bus, Committed, local::LocalBus},
    clock::Clock,
    hub::Hub,
    notification::{
        Content, Delivery, Epoch, EventBody, Fold, Group, NewNotification, Notification,
        NotificationFilter, PageQuery, Sent, StateAction, StateChange, StateOutcome, StateRequest,
        StateTarget, StreamEvent, StreamHead, StreamKey, StreamRange, new_epoch,
    },
    ticket::{TicketDigest, TicketGrant},
};

/// Most idempotency keys remembered; past it the oldest are forgotten (a
/// retry that late stores its send again).
pub const MAX_IDEMPOTENCY_KEYS: usize = 100_000;

/// Most stream tickets kept; past it the ones that expire soonest are
/// dropped (their holders mint another).
pub const MAX_TICKETS: usize = 100_000;

#[derive(Debug, Default)]
struct UserLog {
    head: StreamHead,
    /// Events with seq pruned_seq+1 ..= last_seq, each with its store time.
    events: VecDeque<(SystemTime, Arc<StreamEvent>)>,
    /// Current notifications by seq, with live state; deleted ones are
    /// removed (their events stay in `events`).
    notifications: BTreeMap<u64, Notification>,
    /// Fold keys ((is a group, key)) → the seq of the notification of that
    /// key and when it was first stored (a group's window starts then).
    /// An entry whose notification is gone (deleted, pruned) is dead.
    folds: HashMap<(bool, String), (u64, SystemTime)>,
}

type UserKey = (String, String);

/// A send stored for later delivery.
#[derive(Debug)]
struct ScheduledSend {
    tenant: String,
    sender: String,
    n: NewNotification,
}
type IdempotencyKey = (String, String, String);

#[derive(Debug, Default)]
struct Inner {
    next_id: i64,
    users: HashMap<UserKey, UserLog>,
    /// The highest seq of any log dropped by retention. A log created later
    /// starts after it (pruned up to it), so that a client still holding a
    /// position of the dropped history gets `resync`, never a position in
    /// the new one that happens to have the same number.
    dropped_seq: u64,
    /// (tenant, sender, key) → (request fingerprint, first result, when).
    idempotency: HashMap<IdempotencyKey, (String, Vec<Delivery>, bool, SystemTime)>,
    /// Sends waiting for their `deliver_at`, by (due, arrival number).
    scheduled: BTreeMap<(SystemTime, u64), ScheduledSend>,
    /// Arrival numbers of scheduled sends, so two due at once keep their
    /// order.
    next_scheduled: u64,
    /// Notifications that expire, by (expiry, user, seq), so the expiry
    /// job finds the expired without scanning. An entry whose notification
    /// is gone, or whose expiry an update moved, is skipped.
    expiring: BTreeSet<(SystemTime, UserKey, u64)>,
    /// Idempotency keys, oldest first.
    idempotency_order: VecDeque<IdempotencyKey>,
    /// Stream tickets by digest, with their expiry.
    tickets: HashMap<TicketDigest, (TicketGrant, SystemTime)>,
    /// The same tickets by (expiry, digest), to drop the expired.
    ticket_expiry: BTreeMap<(SystemTime, TicketDigest), ()>,
}

impl Inner {
    fn log(&mut self, epoch: Epoch, tenant: &str, user: &str) -> &mut UserLog {
        let floor = self.dropped_seq;
        self.users
            .entry(key(tenant, user))
            .or_insert_with(|| UserLog {
                head: StreamHead {
                    last_seq: floor,
                    pruned_seq: floor,
                    epoch,
                },
                ..UserLog::default()
            })
    }

    /// Drops every ticket whose expiry is before `now`.
    fn drop_tickets_expired_by(&mut self, now: SystemTime) {
        while let Some((&(at, digest), ())) = self.ticket_expiry.first_key_value() {
            if at >= now && self.tickets.len() < MAX_TICKETS {
                break;
            }
            self.ticket_expiry.remove(&(at, digest));
            self.tickets.remove(&digest);
        }
    }

    fn remember(
        &mut self,
        key: IdempotencyKey,
        fingerprint: String,
        deliveries: Vec<Delivery>,
        scheduled: bool,
    ) {
        while self.idempotency_order.len() >= MAX_IDEMPOTENCY_KEYS {
            match self.idempotency_order.pop_front() {
                Some(old) => {
                    self.idempotency.remove(&old);
                }
                None => break,
            }
        }
        self.idempotency_order.push_back(key.clone());
        self.idempotency
            .insert(key, (fingerprint, deliveries, scheduled, SystemTime::now()));
    }
}

/// Notifications kept in process memory. Lost on restart; one replica only.
/// Its streams' epoch is drawn at random when the store is created, so a
/// client resuming after a restart gets `resync`, never a position in the
/// lost history.
#[derive(Debug)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
    bus: LocalBus,
    epoch: Epoch,
    clock: Clock,
}

fn key(tenant: &str, user: &str) -> UserKey {
    (tenant.to_owned(), user.to_owned())
}

impl MemoryStore {
    /// An empty store that publishes committed events to `hub`.
    pub fn new(hub: Arc<Hub>) -> Self {
        Self {
            inner: Mutex::default(),
            bus: LocalBus::new(hub),
            epoch: new_epoch(),
            clock: Clock::system(),
        }
    }

    /// This store, going by `clock` for expiry and scheduling.
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// The epoch of every stream of this store.
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    // Every mutation completes before the guard drops and none can panic
    // half-way, so a poisoned lock still guards consistent data.
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The stream log primitive: appends `body` to `tenant`/`user`'s stream
    /// at its next seq (the same for every event kind).
    fn append(
        &self,
        inner: &mut Inner,
        tenant: &str,
        user: &str,
        at: SystemTime,
        body: impl FnOnce(u64) -> EventBody,
    ) -> Committed {
        let log = inner.log(self.epoch, tenant, user);
        log.head.last_seq += 1;
        let seq = log.head.last_seq;
        let body = body(seq);
        if let EventBody::Notification(n) = &body {
            log.notifications.insert(seq, n.clone());
        }
        let event = Arc::new(StreamEvent::new(seq, log.head.epoch, body));
        log.events.push_back((at, event.clone()));
        Committed {
            key: StreamKey::user(tenant, user),
            event,
        }
    }

    /// Appends the send `n` to its recipients' streams now (folds
    /// included) and hands the events to the bus; its deliveries.
    fn send_now(&self, inner: &mut Inner, tenant: &str, n: &NewNotification) -> Vec<Delivery> {
        let now = self.clock.now();
        let content = Arc::new(Content {
            kind: n.kind.as_str().to_owned(),
            title: n.title.clone(),
            body: n.body.clone(),
            data: n.data.clone(),
            presentation: n.presentation.clone(),
            created_at: now,
            replace_key: match &n.fold {
                Some(Fold::Replace(k)) => k.clone(),
                _ => String::new(),
            },
            group_key: match &n.fold {
                Some(Fold::Group { key, .. }) => key.clone(),
                _ => String::new(),
            },
            expires_at: n.expires_at,
        });
        let actor = n.presentation.actor.as_str();
        let mut deliveries = Vec::with_capacity(n.recipients.len());
        let mut committed = Vec::with_capacity(n.recipients.len());
        for recipient in &n.recipients {
            let epoch = self.epoch;
            let log = inner.log(epoch, tenant, recipient.as_str());
            if let Some(updated) = fold_onto(log, n, &content, now) {
                let c = self.append(inner, tenant, recipient.as_str(), now, |_| {
                    EventBody::Updated(updated)
                });
                if let EventBody::Updated(u) = &c.event.body {
                    if let Some(x) = n.expires_at {
                        inner
                            .expiring
                            .insert((x, key(tenant, recipient.as_str()), u.seq));
                    }
                    deliveries.push(Delivery {
                        recipient: recipient.to_string(),
                        notification_id: u.id,
                        seq: c.event.seq,
                        updated: true,
                    });
                }
                committed.push(c);
                continue;
            }
            inner.next_id += 1;
            let id = inner.next_id;
            let group = matches!(n.fold, Some(Fold::Group { .. })).then(|| Group::open(actor));
            let c = self.append(inner, tenant, recipient.as_str(), now, |seq| {
                EventBody::Notification(Notification {
                    id,
                    seq,
                    recipient: recipient.to_string(),
                    content: content.clone(),
                    read_at: None,
                    seen_at: None,
                    archived_at: None,
                    group,
                })
            });
            if let Some(x) = n.expires_at {
                inner
                    .expiring
                    .insert((x, key(tenant, recipient.as_str()), c.event.seq));
            }
            if let Some(fold) = &n.fold {
                let log = inner.log(epoch, tenant, recipient.as_str());
                let is_group = matches!(fold, Fold::Group { .. });
                log.folds
                    .insert((is_group, fold.key().to_owned()), (c.event.seq, now));
            }
            deliveries.push(Delivery {
                recipient: recipient.to_string(),
                notification_id: id,
                seq: c.event.seq,
                updated: false,
            });
            committed.push(c);
        }
        self.bus.stage(&committed);
        deliveries
    }

    /// `update_state` under the lock: applies `request` to `user`'s
    /// notifications and appends its event when anything changed.
    fn change_state(
        &self,
        inner: &mut Inner,
        tenant: &str,
        user: &str,
        request: &StateRequest,
    ) -> StateOutcome {
        let Some(log) = inner.users.get_mut(&key(tenant, user)) else {
            return StateOutcome::default();
        };
        let now = self.clock.now();
        let head = log.head.last_seq;
        let (up_to, filter) = match &request.target {
            StateTarget::Ids(_) => (head, None),
            StateTarget::UpTo(seq) => ((*seq).min(head), None),
            StateTarget::Filter(f) => (head, Some(f)),
        };
        let targeted = |n: &Notification| match &request.target {
            StateTarget::Ids(wanted) => wanted.binary_search(&n.id).is_ok(),
            StateTarget::UpTo(_) => true,
            StateTarget::Filter(f) => f.matches(&n.content),
        };
        let mut changed = Vec::new();
        for (seq, n) in log.notifications.range_mut(..=up_to) {
            if targeted(n) && apply(request.action, n, now) {
                changed.push((*seq, n.id));
            }
        }
        if changed.is_empty() {
            return StateOutcome::default();
        }
        let mut change = StateChange {
            action: request.action,
            ids: Vec::new(),
            up_to_seq: up_to,
            filter: filter.cloned(),
        };
        if let StateTarget::Ids(_) = request.target {
            change.ids = changed.iter().map(|(_, id)| *id).collect();
            change.ids.sort_unstable();
            change.up_to_seq = 0;
        }
        if request.action == StateAction::Delete {
            for (seq, _) in &changed {
                log.notifications.remove(seq);
            }
        }
        let c = self.append(inner, tenant, user, now, |_| EventBody::State(change));
        let seq = c.event.seq;
        self.bus.stage(&[c]);
        StateOutcome {
            changed: u32::try_from(changed.len()).unwrap_or(u32::MAX),
            seq,
        }
    }

    fn empty_range(&self) -> StreamRange {
        StreamRange {
            epoch: self.epoch,
            events: Vec::new(),
        }
    }
}

/// Folds the send `n` (its stored `content`) onto the notification of
/// its key in `log`, if it has a fold and there is one (for a group, opened
/// within the window before `now`): replaces its content, grows its group,
/// and with `renotify` makes it unread and unseen again. Returns the
/// updated notification as its `updated` event carries it.
fn fold_onto(
    log: &mut UserLog,
    n: &NewNotification,
    content: &Arc<Content>,
    now: SystemTime,
) -> Option<Notification> {
    let fold = n.fold.as_ref()?;
    let is_group = matches!(fold, Fold::Group { .. });
    let &(seq, opened) = log.folds.get(&(is_group, fold.key().to_owned()))?;
    if let Fold::Group { window, .. } = fold
        && opened + *window < now
    {
        return None;
    }
    let target = log.notifications.get_mut(&seq)?;
    target.content = content.clone();
    if is_group {
        target.group = Some(match &target.group {
            Some(g) => g.fold(&n.presentation.actor),
            None => Group::open(&n.presentation.actor),
        });
    }
    if n.renotify {
        target.read_at = None;
        target.seen_at = None;
    }
    Some(target.clone())
}

/// Applies `action` to `n` at `now`; whether its state changed (the same
/// rules as the PostgreSQL store's: read implies seen, deleting always
/// changes, the caller removes what it deletes).
fn apply(action: StateAction, n: &mut Notification, now: SystemTime) -> bool {
    match action {
        StateAction::Read if n.read_at.is_none() => {
            n.read_at = Some(now);
            n.seen_at.get_or_insert(now);
            true
        }
        StateAction::Unread if n.read_at.is_some() => {
            n.read_at = None;
            true
        }
        StateAction::Seen if n.seen_at.is_none() => {
            n.seen_at = Some(now);
            true
        }
        StateAction::Archive if n.archived_at.is_none() => {
            n.archived_at = Some(now);
            true
        }
        StateAction::Unarchive if n.archived_at.is_some() => {
            n.archived_at = None;
            true
        }
        StateAction::Delete => true,
        _ => false,
    }
}

/// Whether `n` is in the inbox and unread at `now` (what `unread` counts).
fn counts_unread(n: &Notification, now: SystemTime) -> bool {
    n.read_at.is_none() && n.archived_at.is_none() && live(n, now)
}

/// Whether `n` has not expired by `now`.
fn live(n: &Notification, now: SystemTime) -> bool {
    n.content.expires_at.is_none_or(|x| x > now)
}

impl Store for MemoryStore {
    async fn send(&self, tenant: &str, sender: &str, n: &NewNotification) -> StoreResult<Sent> {
        let mut inner = self.lock();
        let idem = n
            .idempotency_key
            .as_ref()
            .map(|k| (tenant.to_owned(), sender.to_owned(), k.clone()));
        let fingerprint = n.fingerprint(sender);
        if let Some((stored, deliveries, scheduled, _)) =
            idem.as_ref().and_then(|k| inner.idempotency.get(k))
        {
            return if *stored == fingerprint {
                Ok(Sent {
                    deliveries: deliveries.clone(),
                    replayed: true,
                    scheduled: *scheduled,
                })
            } else {
                Err(StoreError::IdempotencyKeyReused)
            };
        }
        if let Some(due) = n.deliver_at {
            inner.next_scheduled += 1;
            let order = inner.next_scheduled;
            inner.scheduled.insert(
                (due, order),
                ScheduledSend {
                    tenant: tenant.to_owned(),
                    sender: sender.to_owned(),
                    n: n.clone(),
                },
            );
            if let Some(k) = idem {
                inner.remember(k, fingerprint, Vec::new(), true);
            }
            return Ok(Sent {
                deliveries: Vec::new(),
                replayed: false,
                scheduled: true,
            });
        }
        let deliveries = self.send_now(&mut inner, tenant, n);
        if let Some(k) = idem {
            inner.remember(k, fingerprint, deliveries.clone(), false);
        }
        Ok(Sent {
            deliveries,
            replayed: false,
            scheduled: false,
        })
    }

    async fn cancel_scheduled(&self, tenant: &str, sender: &str, key: &str) -> StoreResult<bool> {
        let mut inner = self.lock();
        let before = inner.scheduled.len();
        inner.scheduled.retain(|_, s| {
            !(s.tenant == tenant
                && s.sender == sender
                && s.n.idempotency_key.as_deref() == Some(key))
        });
        Ok(inner.scheduled.len() < before)
    }

    async fn deliver_due(&self, now: SystemTime) -> StoreResult<usize> {
        let mut inner = self.lock();
        let waiting = inner.scheduled.split_off(&(now, u64::MAX));
        let due = std::mem::replace(&mut inner.scheduled, waiting);
        let count = due.len();
        for s in due.into_values() {
            if s.n.expires_at.is_some_and(|x| x <= now) {
                continue; // expired before it was due
            }
            let deliveries = self.send_now(&mut inner, &s.tenant, &s.n);
            if let Some(k) = &s.n.idempotency_key {
                let key = (s.tenant.clone(), s.sender.clone(), k.clone());
                if let Some(entry) = inner.idempotency.get_mut(&key) {
                    entry.1 = deliveries;
                    entry.2 = false;
                }
            }
        }
        Ok(count)
    }

    async fn expire(&self, now: SystemTime) -> StoreResult<usize> {
        let mut inner = self.lock();
        let mut expired: BTreeMap<UserKey, Vec<i64>> = BTreeMap::new();
        while let Some(first) = inner.expiring.first()
            && first.0 <= now
        {
            let Some((_, user, seq)) = inner.expiring.pop_first() else {
                break;
            };
            let current = inner
                .users
                .get(&user)
                .and_then(|log| log.notifications.get(&seq))
                .filter(|n| n.content.expires_at.is_some_and(|x| x <= now))
                .map(|n| n.id);
            if let Some(id) = current {
                expired.entry(user).or_default().push(id);
            }
        }
        let mut deleted = 0;
        for ((tenant, user), mut ids) in expired {
            ids.sort_unstable();
            let request = StateRequest {
                action: StateAction::Delete,
                target: StateTarget::Ids(ids),
            };
            deleted += self
                .change_state(&mut inner, &tenant, &user, &request)
                .changed as usize;
        }
        Ok(deleted)
    }

    async fn update_state(
        &self,
        tenant: &str,
        user: &str,
        request: &StateRequest,
    ) -> StoreResult<StateOutcome> {
        let mut inner = self.lock();
        Ok(self.change_state(&mut inner, tenant, user, request))
    }

    async fn head(&self, tenant: &str, user: &str) -> StoreResult<StreamHead> {
        let inner = self.lock();
        Ok(inner.users.get(&key(tenant, user)).map_or_else(
            || StreamHead {
                last_seq: inner.dropped_seq,
                pruned_seq: inner.dropped_seq,
                epoch: self.epoch,
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
            return Ok(self.empty_range());
        };
        // events[i] has seq pruned_seq + 1 + i.
        let skip = after_seq.saturating_sub(log.head.pruned_seq);
        let skip = usize::try_from(skip).unwrap_or(usize::MAX);
        Ok(StreamRange {
            epoch: log.head.epoch,
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
        let now = self.clock.now();
        let inner = self.lock();
        let Some(log) = inner.users.get(&key(tenant, user)) else {
            return Ok(Vec::new());
        };
        Ok(log
            .notifications
            .range(after_seq + 1..=up_to_seq)
            .map(|(_, n)| n)
            .filter(|n| counts_unread(n, now))
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
        let now = self.clock.now();
        let inner = self.lock();
        let Some(log) = inner.users.get(&key(tenant, user)) else {
            return Ok(Vec::new());
        };
        Ok(log
            .notifications
            .range(..query.before_seq)
            .rev()
            .map(|(_, n)| n)
            .filter(|n| n.archived_at.is_some() == query.archived && live(n, now))
            .filter(|n| !query.unread_only || n.read_at.is_none())
            .filter(|n| query.filter.matches(&n.content))
            .take(query.limit)
            .cloned()
            .collect())
    }

    async fn unread_count(
        &self,
        tenant: &str,
        user: &str,
        filters: &[NotificationFilter],
    ) -> StoreResult<UnreadCounts> {
        let now = self.clock.now();
        let inner = self.lock();
        let Some(log) = inner.users.get(&key(tenant, user)) else {
            return Ok(UnreadCounts {
                unread: 0,
                unseen: 0,
                seq: inner.dropped_seq,
                filtered: vec![0; filters.len()],
            });
        };
        let unread: Vec<&Notification> = log
            .notifications
            .values()
            .filter(|n| counts_unread(n, now))
            .collect();
        let unseen = log
            .notifications
            .values()
            .filter(|n| n.seen_at.is_none() && counts_unread(n, now))
            .count();
        Ok(UnreadCounts {
            unread: unread.len() as u64,
            unseen: unseen as u64,
            seq: log.head.last_seq,
            filtered: filters
                .iter()
                .map(|f| unread.iter().filter(|n| f.matches(&n.content)).count() as u64)
                .collect(),
        })
    }

    async fn prune(&self, cutoff: SystemTime) -> StoreResult<u64> {
        let mut inner = self.lock();
        let mut deleted = 0;
        let mut dropped_seq = inner.dropped_seq;
        inner.users.retain(|_, log| {
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
            let notifications = &log.notifications;
            log.folds
                .retain(|_, (seq, _)| notifications.contains_key(seq));
            // A log with nothing left is dropped; its seqs are remembered
            // only as the store-wide floor.
            let empty = log.events.is_empty();
            if empty {
                dropped_seq = dropped_seq.max(log.head.last_seq);
            }
            !empty
        });
        inner.dropped_seq = dropped_seq;
        // Expiry entries of notifications retention took go too.
        let Inner {
            users, expiring, ..
        } = &mut *inner;
        expiring.retain(|(_, user, seq)| {
            users
                .get(user)
                .is_some_and(|log| log.notifications.contains_key(seq))
        });
        inner.drop_tickets_expired_by(SystemTime::now());
        while let Some(oldest) = inner.idempotency_order.front() {
            match inner.idempotency.get(oldest) {
                Some((_, _, _, at)) if *at >= cutoff => break,
                _ => {
                    if let Some(old) = inner.idempotency_order.pop_front() {
                        inner.idempotency.remove(&old);
                    }
                }
            }
        }
        Ok(deleted)
    }

    async fn put_ticket(
        &self,
        digest: TicketDigest,
        grant: &TicketGrant,
        expires_at: SystemTime,
    ) -> StoreResult<()> {
        let mut inner = self.lock();
        inner.drop_tickets_expired_by(SystemTime::now());
        if let Some((_, old)) = inner.tickets.insert(digest, (grant.clone(), expires_at)) {
            inner.ticket_expiry.remove(&(old, digest));
        }
        inner.ticket_expiry.insert((expires_at, digest), ());
        Ok(())
    }

    async fn take_ticket(
        &self,
        digest: TicketDigest,
        now: SystemTime,
    ) -> StoreResult<Option<TicketGrant>> {
        let mut inner = self.lock();
        let Some((grant, expires_at)) = inner.tickets.remove(&digest) else {
            return Ok(None);
        };
        inner.ticket_expiry.remove(&(expires_at, digest));
        Ok((expires_at > now).then_some(grant))
    }

    async fn ping(&self) -> StoreResult<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{hub::StreamLimits, notification::SendLimits, proto, subscription::Start};

    fn store() -> MemoryStore {
        MemoryStore::new(Hub::new(StreamLimits::default()))
    }

    fn new(recipient: &str, key: &str) -> NewNotification {
        let req = proto::SendNotificationRequest {
            recipients: vec![recipient.into()],
            r#type: "t".into(),
            title: "hi".into(),
            idempotency_key: key.into(),
            ..Default::default()
        };
        NewNotification::parse(req, &SendLimits::default()).unwrap()
    }

    fn later() -> SystemTime {
        SystemTime::now() + Duration::from_secs(1)
    }

    #[tokio::test]
    async fn retention_drops_users_left_with_nothing_and_old_positions_resync() {
        let s = store();
        for _ in 0..3 {
            s.send("", "svc", &new("alice", "")).await.unwrap();
        }
        assert_eq!(s.prune(later()).await.unwrap(), 3);
        assert!(s.lock().users.is_empty(), "alice's empty log is gone");
        // A new history for alice starts after every dropped seq, so a
        // client still at seq 2 of the old one gets resync, not seq 3 of
        // the new one.
        for _ in 0..5 {
            s.send("", "svc", &new("alice", "")).await.unwrap();
        }
        let head = s.head("", "alice").await.unwrap();
        assert_eq!((head.pruned_seq, head.last_seq), (3, 8));
        assert!(matches!(
            Start::new(Some(2), head.epoch, head),
            Start::Resync(_, proto::resync::Reason::Pruned)
        ));
    }

    #[tokio::test]
    async fn idempotency_keys_expire_with_retention_and_are_bounded() {
        let s = store();
        let first = s.send("", "svc", &new("alice", "k")).await.unwrap();
        let again = s.send("", "svc", &new("alice", "k")).await.unwrap();
        assert!(again.replayed && !first.replayed);
        assert_eq!(again.deliveries, first.deliveries);
        s.prune(later()).await.unwrap();
        assert!(s.lock().idempotency.is_empty());
        let after = s.send("", "svc", &new("alice", "k")).await.unwrap();
        assert!(!after.replayed, "a key older than retention is forgotten");

        for i in 0..MAX_IDEMPOTENCY_KEYS + 10 {
            s.send("", "svc", &new("bob", &format!("k{i}")))
                .await
                .unwrap();
        }
        let inner = s.lock();
        assert_eq!(inner.idempotency.len(), MAX_IDEMPOTENCY_KEYS);
        assert_eq!(inner.idempotency_order.len(), MAX_IDEMPOTENCY_KEYS);
        assert!(!inner.idempotency.contains_key(&key3("", "svc", "k0")));
    }

    fn key3(t: &str, s: &str, k: &str) -> IdempotencyKey {
        (t.to_owned(), s.to_owned(), k.to_owned())
    }
}
