//! The stream log in PostgreSQL: the one *append events to streams*
//! primitive every write uses, and the one *read a range of a stream*.
//!
//! Appending takes each stream's next seqs in one statement that bumps
//! `user_streams.last_seq` by the number of events for it, rows locked in
//! (tenant, user) order: the row lock is held until commit, so seqs are
//! gap-free and in commit order, and concurrent appends to overlapping
//! streams cannot deadlock. Then each event kind inserts its rows (one
//! statement per kind present), and the bus stages the committed events in
//! the same transaction, all pipelined: an append costs two round trips
//! whatever it holds. Event kinds and their rows:
//!
//! | kind | row |
//! |---|---|
//! | notification | `notifications` (narrow: ids, seq, state, keys) referencing `contents` |
//! | state (read, seen, archived, deleted...) | `state_events` |
//! | updated (replace or group key) | `update_events` referencing `contents`; the notification's row points at its current content |
//!
//! A send with a replace or group key is a *fold*: after the seqs are
//! taken (so under every recipient's stream lock), one statement looks up
//! each recipient's notification of that key, and the fold becomes an
//! update of it or, when there is none, a new notification; folds of one
//! batch onto the same key apply in order, each to the result of the one
//! before.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    task::Poll,
    time::SystemTime,
};

use deadpool_postgres::GenericClient;
use tokio_postgres::types::ToSql;

use super::{
    StoreError, StoreResult,
    postgres::{pg_error, pos, seq},
};
use crate::{
    bus::{Bus, Committed, Staged},
    notification::{
        Content, Epoch, EventBody, Fold, Group, Notification, NotificationFilter, Presentation,
        Severity, StateAction, StateChange, StreamEvent, StreamKey, StreamRange,
    },
};

/// A send's content, before it is stored.
#[derive(Debug, Clone, Copy)]
pub struct NewContent<'a> {
    /// Event type.
    pub kind: &'a str,
    /// Headline.
    pub title: &'a str,
    /// Body text.
    pub body: &'a str,
    /// JSON object text.
    pub data: &'a str,
    /// Category, severity, actor and links.
    pub presentation: &'a Presentation,
    /// The send's fold, if any.
    pub fold: Option<&'a Fold>,
    /// With a fold that updates a notification: make it unread and unseen
    /// again.
    pub renotify: bool,
    /// When its notifications expire, if they do.
    pub expires_at: Option<SystemTime>,
}

/// An event to append, before it has a seq.
#[derive(Debug, Clone)]
pub enum NewEvent {
    /// A notification of the content at this index of `append`'s
    /// `contents` (the recipients of one send share one). With the
    /// content's fold: an update of the recipient's notification of that
    /// key, or a new one when there is none.
    Notification(usize),
    /// A state change.
    State(StateChange),
}

/// One event for one stream.
#[derive(Debug, Clone)]
pub struct Append<'a> {
    /// The tenant.
    pub tenant: &'a str,
    /// The user whose stream it goes to.
    pub user: &'a str,
    /// The event.
    pub event: NewEvent,
}

// Also adds each stream's new notifications to its unread and unseen
// counters.
// One row: per stream (arrays in key order) the last seq taken; the epoch;
// the transaction's time; and the ids drawn for contents and notifications
// (uncorrelated subqueries, evaluated once).
const TAKE_SEQS: &str = "WITH taken AS ( \
       INSERT INTO user_streams AS s (tenant, user_id, last_seq, unread, unseen) \
       SELECT tenant, user_id, n, unread, unread \
       FROM unnest($1::text[], $2::text[], $3::int8[], $6::int8[]) \
         AS c(tenant, user_id, n, unread) \
       ORDER BY tenant, user_id \
       ON CONFLICT (tenant, user_id) DO UPDATE \
         SET last_seq = s.last_seq + EXCLUDED.last_seq, unread = s.unread + EXCLUDED.unread, \
             unseen = s.unseen + EXCLUDED.unseen \
       RETURNING s.tenant, s.user_id, s.last_seq \
     ) SELECT array_agg(tenant), array_agg(user_id), array_agg(last_seq), \
       (SELECT epoch FROM herald_meta), now(), \
       (SELECT coalesce(array_agg(nextval('contents_id_seq')), '{}') \
        FROM generate_series(1, $4::int8)), \
       (SELECT coalesce(array_agg(nextval('notifications_id_seq')), '{}') \
        FROM generate_series(1, $5::int8)) \
     FROM taken";

/// The first part of both notification inserts: a send's contents, once
/// each, as a data-modifying CTE (`$1`–`$5`, `$11` the store time,
/// `$12`–`$16` the presentation).
macro_rules! insert_contents {
    () => {
        "WITH c AS ( \
       INSERT INTO contents (id, type, title, body, data, created_at, \
                             category, severity, actor, action_url, actions) \
       SELECT id, type, title, body, data::json, $11, \
              category, severity, actor, action_url, actions \
       FROM unnest($1::int8[], $2::text[], $3::text[], $4::text[], $5::text[], \
                   $12::text[], $13::int2[], $14::text[], $15::text[], $16::text[]) \
         AS c(id, type, title, body, data, category, severity, actor, action_url, actions) \
     ) "
    };
}

// Contents and their notifications in one statement (data-modifying CTEs
// always run: PostgreSQL docs, "Data-Modifying Statements in WITH"), for a
// batch whose sends carry no fold key and no expiry (most): their columns
// stay NULL, and 10,000 rows do not ship four arrays of NULLs.
const INSERT_PLAIN_NOTIFICATIONS: &str = concat!(
    insert_contents!(),
    "INSERT INTO notifications (id, tenant, user_id, seq, content_id, created_at) \
     SELECT id, tenant, user_id, seq, content_id, $11 \
     FROM unnest($6::int8[], $7::text[], $8::text[], $9::int8[], $10::int8[]) \
       AS r(id, tenant, user_id, seq, content_id)"
);

// The same for a batch with fold keys or expiries: a notification's keys
// and expiry come from its send; a group opens with its send's actor.
const INSERT_NOTIFICATIONS: &str = concat!(
    insert_contents!(),
    "INSERT INTO notifications (id, tenant, user_id, seq, content_id, created_at, \
                                  replace_key, group_key, group_count, actors, expires_at) \
     SELECT id, tenant, user_id, seq, content_id, $11, rk, gk, \
            CASE WHEN gk IS NULL THEN NULL ELSE 1 END, \
            CASE WHEN gk IS NULL THEN NULL ELSE ARRAY[actor] END, expires \
     FROM unnest($6::int8[], $7::text[], $8::text[], $9::int8[], $10::int8[], \
                 $17::text[], $18::text[], $19::text[], $20::timestamptz[]) \
       AS r(id, tenant, user_id, seq, content_id, rk, gk, actor, expires)"
);

// An update in place of the notification at seq $3 of stream $1/$2: its
// current content and group state, and, with `renotify` ($7), unread and
// unseen again. The stream's counters: the take counted the update as a
// new unread, unseen notification, which it is not (-1 each); renotify
// adds back what it makes unread or unseen again in the inbox.
const UPDATE_NOTIFICATION: &str = "WITH old AS ( \
       SELECT n.read_at IS NOT NULL AS was_read, \
              n.seen_at IS NOT NULL OR n.read_at IS NOT NULL AS was_seen, \
              n.archived_at IS NULL AS inbox \
       FROM notifications n WHERE n.tenant = $1 AND n.user_id = $2 AND n.seq = $3 \
     ), u AS ( \
       UPDATE notifications n SET current_content_id = $4, group_count = $5, actors = $6, \
         expires_at = $8, \
         read_at = CASE WHEN $7 THEN NULL ELSE n.read_at END, \
         seen_at = CASE WHEN $7 THEN NULL ELSE n.seen_at END \
       WHERE n.tenant = $1 AND n.user_id = $2 AND n.seq = $3 \
     ) UPDATE user_streams s SET \
         unread = s.unread - 1 + COALESCE((SELECT ($7 AND was_read AND inbox)::int FROM old), 0), \
         unseen = s.unseen - 1 + COALESCE((SELECT ($7 AND was_seen AND inbox)::int FROM old), 0) \
       WHERE s.tenant = $1 AND s.user_id = $2";

const INSERT_UPDATE_EVENT: &str = "INSERT INTO update_events \
     (tenant, user_id, seq, notification_id, note_seq, content_id, replace_key, group_key, \
      group_count, actors, created_at, read_at, seen_at, archived_at, expires_at) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)";

// Each fold's target: the recipient's live notification of the replace
// key, or its newest group of the key opened within the window (ms),
// as of this statement (which runs after the take locked the streams).
const FIND_FOLD_TARGETS: &str = "SELECT k.i, n.id, n.seq, n.group_count, n.actors, n.read_at, \
       n.seen_at, n.archived_at \
     FROM unnest($1::text[], $2::text[], $3::text[], $4::bool[], $5::int8[]) \
       WITH ORDINALITY AS k(tenant, user_id, key, grp, window_ms, i) \
     CROSS JOIN LATERAL ( \
       SELECT n.id, n.seq, n.group_count, n.actors, n.read_at, \
              COALESCE(n.seen_at, n.read_at) AS seen_at, n.archived_at \
       FROM notifications n \
       WHERE n.tenant = k.tenant AND n.user_id = k.user_id AND n.deleted_at IS NULL \
         AND ((NOT k.grp AND n.replace_key = k.key) \
           OR (k.grp AND n.group_key = k.key \
               AND n.created_at >= now() - k.window_ms * interval '1 millisecond')) \
       ORDER BY n.created_at DESC LIMIT 1 \
     ) n";

/// The join listings, counts and state changes read notifications
/// through: each with its current content (an update's, or its first).
pub const CURRENT: &str =
    "notifications n JOIN contents c ON c.id = COALESCE(n.current_content_id, n.content_id)";

const INSERT_STATE_EVENT: &str = "INSERT INTO state_events \
     (tenant, user_id, seq, notification_ids, up_to_seq, action, \
      types, type_prefixes, categories, min_severity) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)";

/// Statements sent to the server together, in the order pushed, and
/// answered together: one round trip for all of them. [`Pipeline::run`]
/// prepares every statement first (from the connection's cache, normally),
/// then polls the executions in push order; tokio-postgres sends a request
/// when its future is first polled, so the server receives and runs them in
/// that order. Each carries its own Sync: after one fails, the others of
/// its transaction fail too ("current transaction is aborted") and a
/// `COMMIT` among them rolls the transaction back (PostgreSQL docs,
/// "Extended Query" and "COMMIT").
#[derive(Default)]
pub struct Pipeline<'a> {
    statements: Vec<(&'static str, Vec<&'a (dyn ToSql + Sync)>)>,
}

impl<'a> Pipeline<'a> {
    /// Adds `statement` with `params` after the statements already pushed.
    pub fn push(&mut self, statement: &'static str, params: Vec<&'a (dyn ToSql + Sync)>) {
        self.statements.push((statement, params));
    }

    /// Runs the statements on `client`; returns each one's outcome, in push
    /// order. When a statement cannot be prepared, none is sent and every
    /// outcome is that error.
    pub async fn run(self, client: &impl GenericClient) -> Vec<StoreResult<()>> {
        let mut prepared = Vec::with_capacity(self.statements.len());
        for (statement, _) in &self.statements {
            match client.prepare_cached(statement).await {
                Ok(s) => prepared.push(s),
                Err(e) => {
                    let e = pg_error(e);
                    return self.statements.iter().map(|_| Err(e.clone())).collect();
                }
            }
        }
        let mut running: Vec<_> = prepared
            .iter()
            .zip(&self.statements)
            .map(|(statement, (_, params))| Some(client.execute(statement, params)))
            .collect();
        let mut outcomes: Vec<Option<StoreResult<()>>> = running.iter().map(|_| None).collect();
        std::future::poll_fn(|cx| {
            let mut done = true;
            for (slot, outcome) in running.iter_mut().zip(outcomes.iter_mut()) {
                if let Some(execution) = slot {
                    match execution.as_mut().poll(cx) {
                        Poll::Ready(result) => {
                            *outcome = Some(result.map(drop).map_err(pg_error));
                            *slot = None;
                        }
                        Poll::Pending => done = false,
                    }
                }
            }
            if done { Poll::Ready(()) } else { Poll::Pending }
        })
        .await;
        outcomes
            .into_iter()
            .map(|o| {
                o.unwrap_or_else(|| Err(StoreError::internal("a pipelined statement did not run")))
            })
            .collect()
    }
}

/// What taking seqs returned: per stream the next seq to hand out, the
/// epoch, the transaction's time (every row's store time), and the ids
/// drawn for contents and notifications.
struct Taken {
    next: HashMap<(String, String), i64>,
    epoch: Epoch,
    at: SystemTime,
    content_ids: Vec<i64>,
    note_ids: Vec<i64>,
}

/// Takes `counts[stream].0` seqs on each stream, streams locked in key
/// order, adds `counts[stream].1` new notifications to its unread counter,
/// and draws `contents` content ids and `notes` notification ids: one
/// statement, one row.
async fn take_seqs(
    tx: &impl GenericClient,
    counts: &BTreeMap<(&str, &str), (i64, i64)>,
    contents: usize,
    notes: usize,
) -> StoreResult<Taken> {
    let tenants: Vec<&str> = counts.keys().map(|(t, _)| *t).collect();
    let users: Vec<&str> = counts.keys().map(|(_, u)| *u).collect();
    let ns: Vec<i64> = counts.values().map(|(n, _)| *n).collect();
    let unread: Vec<i64> = counts.values().map(|(_, u)| *u).collect();
    let contents = i64::try_from(contents).unwrap_or(i64::MAX);
    let notes = i64::try_from(notes).unwrap_or(i64::MAX);
    let stmt = tx.prepare_cached(TAKE_SEQS).await.map_err(pg_error)?;
    let row = tx
        .query_one(&stmt, &[&tenants, &users, &ns, &contents, &notes, &unread])
        .await
        .map_err(pg_error)?;
    let t: Vec<String> = row.try_get(0).map_err(pg_error)?;
    let u: Vec<String> = row.try_get(1).map_err(pg_error)?;
    let last: Vec<i64> = row.try_get(2).map_err(pg_error)?;
    let mut next = HashMap::with_capacity(t.len());
    for ((tenant, user), last) in t.into_iter().zip(u).zip(last) {
        let (n, _) = counts
            .get(&(tenant.as_str(), user.as_str()))
            .copied()
            .unwrap_or_default();
        next.insert((tenant, user), last - n + 1);
    }
    Ok(Taken {
        next,
        epoch: seq(row.try_get(3).map_err(pg_error)?),
        at: row.try_get(4).map_err(pg_error)?,
        content_ids: row.try_get(5).map_err(pg_error)?,
        note_ids: row.try_get(6).map_err(pg_error)?,
    })
}

/// A state event's row.
struct StateRow<'c> {
    tenant: &'c str,
    user: &'c str,
    seq: i64,
    ids: &'c Vec<i64>,
    up_to: i64,
    action: i16,
    filter: FilterColumns<'c>,
}

/// A filter as the columns that store it (all empty and 0 for none).
pub struct FilterColumns<'a> {
    /// Exact types.
    pub types: &'a [String],
    /// Type prefixes.
    pub prefixes: &'a [String],
    /// Categories.
    pub categories: &'a [String],
    /// Least severity, 0 for all.
    pub min_severity: i16,
}

impl<'a> FilterColumns<'a> {
    /// `filter`'s columns; `None` is the all-filter.
    pub fn of(filter: Option<&'a NotificationFilter>) -> Self {
        match filter {
            Some(f) => Self {
                types: &f.types,
                prefixes: &f.type_prefixes,
                categories: &f.categories,
                min_severity: f.min_severity.map_or(0, Severity::as_i16),
            },
            None => Self {
                types: &[],
                prefixes: &[],
                categories: &[],
                min_severity: 0,
            },
        }
    }
}

/// An append whose seqs are taken ([`take`]): the events it commits, and
/// the rows and bus message it still has to write, in the same
/// transaction, with [`Appending::push_writes`].
pub struct Appending<'c> {
    committed: Vec<Committed>,
    at: SystemTime,
    content_ids: Vec<i64>,
    c_kinds: Vec<&'c str>,
    c_titles: Vec<&'c str>,
    c_bodies: Vec<&'c str>,
    c_data: Vec<&'c str>,
    c_categories: Vec<&'c str>,
    c_severities: Vec<i16>,
    c_actors: Vec<&'c str>,
    c_action_urls: Vec<&'c str>,
    c_actions: Vec<String>,
    note_ids: Vec<i64>,
    n_tenants: Vec<&'c str>,
    n_users: Vec<&'c str>,
    n_seqs: Vec<i64>,
    note_contents: Vec<i64>,
    n_replace_keys: Vec<Option<&'c str>>,
    n_group_keys: Vec<Option<&'c str>>,
    n_actors: Vec<Option<&'c str>>,
    n_expires: Vec<Option<SystemTime>>,
    states: Vec<StateRow<'c>>,
    updates: Vec<UpdateRow<'c>>,
    staged: Option<Staged>,
}

/// An update event's row, and the update of its notification.
struct UpdateRow<'c> {
    tenant: &'c str,
    user: &'c str,
    seq: i64,
    note_id: i64,
    note_seq: i64,
    content_id: i64,
    replace_key: Option<&'c str>,
    group_key: Option<&'c str>,
    group_count: Option<i32>,
    actors: Option<Vec<String>>,
    renotify: bool,
    at: SystemTime,
    read_at: Option<SystemTime>,
    seen_at: Option<SystemTime>,
    archived_at: Option<SystemTime>,
    expires_at: Option<SystemTime>,
}

/// A fold's key as looked up: (tenant, user, is a group, key).
type FoldKey<'c> = (&'c str, &'c str, bool, &'c str);

/// A notification a fold lands on: the one found, or one this append
/// creates.
#[derive(Clone)]
struct FoldTarget {
    id: i64,
    seq: i64,
    group: Option<Group>,
    read_at: Option<SystemTime>,
    seen_at: Option<SystemTime>,
    archived_at: Option<SystemTime>,
}

/// The recipients' notifications the folds of `appends` land on, looked
/// up in one statement (see [`FIND_FOLD_TARGETS`]); keys with none are
/// absent.
async fn find_fold_targets<'c>(
    tx: &impl GenericClient,
    contents: &'c [NewContent<'c>],
    appends: &'c [Append<'c>],
) -> StoreResult<HashMap<FoldKey<'c>, FoldTarget>> {
    let mut wanted: Vec<(FoldKey<'c>, i64)> = Vec::new();
    for a in appends {
        let NewEvent::Notification(c) = a.event else {
            continue;
        };
        let Some(fold) = contents.get(c).and_then(|c| c.fold) else {
            continue;
        };
        let (group, window) = match fold {
            Fold::Replace(_) => (false, 0),
            Fold::Group { window, .. } => {
                (true, i64::try_from(window.as_millis()).unwrap_or(i64::MAX))
            }
        };
        let key = (a.tenant, a.user, group, fold.key());
        if !wanted.iter().any(|(k, _)| *k == key) {
            wanted.push((key, window));
        }
    }
    if wanted.is_empty() {
        return Ok(HashMap::new());
    }
    let tenants: Vec<&str> = wanted.iter().map(|((t, ..), _)| *t).collect();
    let users: Vec<&str> = wanted.iter().map(|((_, u, ..), _)| *u).collect();
    let keys: Vec<&str> = wanted.iter().map(|((.., k), _)| *k).collect();
    let groups: Vec<bool> = wanted.iter().map(|((_, _, g, _), _)| *g).collect();
    let windows: Vec<i64> = wanted.iter().map(|(_, w)| *w).collect();
    let stmt = tx
        .prepare_cached(FIND_FOLD_TARGETS)
        .await
        .map_err(pg_error)?;
    let rows = tx
        .query(&stmt, &[&tenants, &users, &keys, &groups, &windows])
        .await
        .map_err(pg_error)?;
    let mut found = HashMap::with_capacity(rows.len());
    for row in rows {
        let i: i64 = row.try_get(0).map_err(pg_error)?;
        let (key, _) = usize::try_from(i - 1)
            .ok()
            .and_then(|i| wanted.get(i))
            .ok_or_else(|| StoreError::internal("a fold target of no key"))?;
        let count: Option<i32> = row.try_get(3).map_err(pg_error)?;
        let actors: Option<Vec<String>> = row.try_get(4).map_err(pg_error)?;
        found.insert(
            *key,
            FoldTarget {
                id: row.try_get(1).map_err(pg_error)?,
                seq: row.try_get(2).map_err(pg_error)?,
                group: key.2.then(|| Group {
                    count: count.and_then(|c| u32::try_from(c).ok()).unwrap_or(1),
                    actors: actors.unwrap_or_default(),
                }),
                read_at: row.try_get(5).map_err(pg_error)?,
                seen_at: row.try_get(6).map_err(pg_error)?,
                archived_at: row.try_get(7).map_err(pg_error)?,
            },
        );
    }
    Ok(found)
}

impl<'c> Appending<'c> {
    /// An append of nothing: no events, nothing to write.
    fn empty() -> Self {
        Appending {
            committed: Vec::new(),
            at: SystemTime::UNIX_EPOCH,
            content_ids: Vec::new(),
            c_kinds: Vec::new(),
            c_titles: Vec::new(),
            c_bodies: Vec::new(),
            c_data: Vec::new(),
            c_categories: Vec::new(),
            c_severities: Vec::new(),
            c_actors: Vec::new(),
            c_action_urls: Vec::new(),
            c_actions: Vec::new(),
            note_ids: Vec::new(),
            n_tenants: Vec::new(),
            n_users: Vec::new(),
            n_seqs: Vec::new(),
            note_contents: Vec::new(),
            n_replace_keys: Vec::new(),
            n_group_keys: Vec::new(),
            n_actors: Vec::new(),
            n_expires: Vec::new(),
            states: Vec::new(),
            updates: Vec::new(),
            staged: None,
        }
    }

    /// The events, in the order given to [`take`] (per stream, seq order).
    /// They are committed once the transaction is.
    pub fn committed(&self) -> &[Committed] {
        &self.committed
    }

    /// The events, consumed.
    pub fn into_committed(self) -> Vec<Committed> {
        self.committed
    }

    /// Adds the writes still to do to `pipeline`: every kind's rows
    /// (contents and notifications in one statement) and the bus's
    /// statement.
    pub fn push_writes<'a>(&'a self, pipeline: &mut Pipeline<'a>)
    where
        'c: 'a,
    {
        if !self.content_ids.is_empty() {
            let mut params: Vec<&'a (dyn ToSql + Sync)> = vec![
                &self.content_ids,
                &self.c_kinds,
                &self.c_titles,
                &self.c_bodies,
                &self.c_data,
                &self.note_ids,
                &self.n_tenants,
                &self.n_users,
                &self.n_seqs,
                &self.note_contents,
                &self.at,
                &self.c_categories,
                &self.c_severities,
                &self.c_actors,
                &self.c_action_urls,
                &self.c_actions,
            ];
            let plain = self.n_replace_keys.iter().all(Option::is_none)
                && self.n_group_keys.iter().all(Option::is_none)
                && self.n_expires.iter().all(Option::is_none);
            if plain {
                pipeline.push(INSERT_PLAIN_NOTIFICATIONS, params);
            } else {
                params.extend::<[&'a (dyn ToSql + Sync); 4]>([
                    &self.n_replace_keys,
                    &self.n_group_keys,
                    &self.n_actors,
                    &self.n_expires,
                ]);
                pipeline.push(INSERT_NOTIFICATIONS, params);
            }
        }
        // Updates come one per keyed send's recipient with a notification
        // of the key (a handful per transaction, normally), in event order.
        for u in &self.updates {
            pipeline.push(
                UPDATE_NOTIFICATION,
                vec![
                    &u.tenant,
                    &u.user,
                    &u.note_seq,
                    &u.content_id,
                    &u.group_count,
                    &u.actors,
                    &u.renotify,
                    &u.expires_at,
                ],
            );
            pipeline.push(
                INSERT_UPDATE_EVENT,
                vec![
                    &u.tenant,
                    &u.user,
                    &u.seq,
                    &u.note_id,
                    &u.note_seq,
                    &u.content_id,
                    &u.replace_key,
                    &u.group_key,
                    &u.group_count,
                    &u.actors,
                    &u.at,
                    &u.read_at,
                    &u.seen_at,
                    &u.archived_at,
                    &u.expires_at,
                ],
            );
        }
        // State events come one per change (a handful per transaction at
        // most).
        for r in &self.states {
            pipeline.push(
                INSERT_STATE_EVENT,
                vec![
                    &r.tenant,
                    &r.user,
                    &r.seq,
                    r.ids,
                    &r.up_to,
                    &r.action,
                    &r.filter.types,
                    &r.filter.prefixes,
                    &r.filter.categories,
                    &r.filter.min_severity,
                ],
            );
        }
        if let Some(staged) = &self.staged {
            pipeline.push(staged.statement, vec![&staged.texts]);
        }
    }
}

/// Appends `appends` to their streams in `tx`, storing each of `contents`
/// once, and stages them on `bus`; returns the events in the order given
/// (per stream, seq order). Nothing is visible to anyone until `tx`
/// commits; on rollback the seqs are not used.
///
/// Two round trips: [`take`], then the writes as one [`Pipeline`].
pub async fn append(
    tx: &impl GenericClient,
    bus: &dyn Bus,
    contents: &[NewContent<'_>],
    appends: &[Append<'_>],
) -> StoreResult<Vec<Committed>> {
    let appending = take(tx, bus, contents, appends).await?;
    let mut pipeline = Pipeline::default();
    appending.push_writes(&mut pipeline);
    for outcome in pipeline.run(tx).await {
        outcome?;
    }
    Ok(appending.into_committed())
}

/// Step 1 of an append, in `tx`: takes the seqs (one statement: every
/// stream, locked in key order) and draws the row ids; builds the events
/// and stages them on `bus`. The caller then sends
/// [`Appending::push_writes`] in a [`Pipeline`] with whatever else its
/// transaction writes (its `COMMIT` included), so the rest of a write is
/// one more round trip.
pub async fn take<'c>(
    tx: &impl GenericClient,
    bus: &dyn Bus,
    contents: &'c [NewContent<'c>],
    appends: &'c [Append<'c>],
) -> StoreResult<Appending<'c>> {
    // Per stream: events, and new (unread) notifications.
    let mut counts: BTreeMap<(&str, &str), (i64, i64)> = BTreeMap::new();
    for a in appends {
        let c = counts.entry((a.tenant, a.user)).or_default();
        c.0 += 1;
        if matches!(a.event, NewEvent::Notification(_)) {
            c.1 += 1;
        }
    }
    let notes: Vec<usize> = (0..appends.len())
        .filter(|&i| matches!(appends[i].event, NewEvent::Notification(_)))
        .collect();

    if appends.is_empty() {
        return Ok(Appending::empty());
    }

    // 1. Seqs and ids (a fold counts as a new notification here; if it
    //    turns out to be an update, the update's statement corrects the
    //    counters, and its drawn id goes unused).
    let mut taken = take_seqs(tx, &counts, contents.len(), notes.len()).await?;
    let content_ids = std::mem::take(&mut taken.content_ids);
    let note_ids = std::mem::take(&mut taken.note_ids);
    if content_ids.len() != contents.len() || note_ids.len() != notes.len() {
        return Err(StoreError::internal("too few ids drawn"));
    }
    // Per stream, keyed by the caller's strings: one lookup per stream
    // here, so the per-event lookups below (10,000 in a full batch)
    // allocate nothing.
    let mut next: HashMap<(&str, &str), i64> = HashMap::with_capacity(counts.len());
    for &(t, u) in counts.keys() {
        let s = taken
            .next
            .get(&(t.to_owned(), u.to_owned()))
            .ok_or_else(|| StoreError::internal("a stream got no seq"))?;
        next.insert((t, u), *s);
    }
    let mut seqs = Vec::with_capacity(appends.len());
    for a in appends {
        let s = next
            .get_mut(&(a.tenant, a.user))
            .ok_or_else(|| StoreError::internal("a stream got no seq"))?;
        seqs.push(*s);
        *s += 1;
    }
    let shared: Vec<Arc<Content>> = contents
        .iter()
        .map(|c| {
            Arc::new(Content {
                kind: c.kind.to_owned(),
                title: c.title.to_owned(),
                body: c.body.to_owned(),
                data: c.data.to_owned(),
                presentation: c.presentation.clone(),
                created_at: taken.at,
                replace_key: match c.fold {
                    Some(Fold::Replace(k)) => k.clone(),
                    _ => String::new(),
                },
                group_key: match c.fold {
                    Some(Fold::Group { key, .. }) => key.clone(),
                    _ => String::new(),
                },
                expires_at: c.expires_at,
            })
        })
        .collect();
    let content = |c: usize| {
        shared
            .get(c)
            .ok_or_else(|| StoreError::internal("no such content"))
    };
    let mut ids = vec![0i64; appends.len()];
    for (&i, id) in notes.iter().zip(&note_ids) {
        ids[i] = *id;
    }

    // 2. Folds: what each lands on, in append order (a fold onto a key an
    //    earlier one of this append created or updated lands on that).
    let mut targets = find_fold_targets(tx, contents, appends).await?;

    // 3. The committed events; their rows and bus messages, pipelined.
    let mut committed = Vec::with_capacity(appends.len());
    let mut new_notes = Vec::with_capacity(notes.len());
    let mut updates = Vec::new();
    for (i, a) in appends.iter().enumerate() {
        let s = seq(seqs[i]);
        let body = match &a.event {
            NewEvent::Notification(c) => {
                let new = contents
                    .get(*c)
                    .ok_or_else(|| StoreError::internal("no such content"))?;
                let content_id = *content_ids
                    .get(*c)
                    .ok_or_else(|| StoreError::internal("no such content"))?;
                let actor = new.presentation.actor.as_str();
                let fold = new.fold.map(|f| {
                    let group = matches!(f, Fold::Group { .. });
                    (a.tenant, a.user, group, f.key())
                });
                match fold.and_then(|k| targets.get_mut(&k).map(|t| (k, t))) {
                    Some((key, target)) => {
                        let group = target.group.as_ref().map(|g| g.fold(actor));
                        target.group.clone_from(&group);
                        if new.renotify {
                            target.read_at = None;
                            target.seen_at = None;
                        }
                        updates.push(UpdateRow {
                            tenant: a.tenant,
                            user: a.user,
                            seq: seqs[i],
                            note_id: target.id,
                            note_seq: target.seq,
                            content_id,
                            replace_key: (!key.2).then_some(key.3),
                            group_key: key.2.then_some(key.3),
                            group_count: group
                                .as_ref()
                                .map(|g| i32::try_from(g.count).unwrap_or(i32::MAX)),
                            actors: group.as_ref().map(|g| g.actors.clone()),
                            renotify: new.renotify,
                            at: taken.at,
                            read_at: target.read_at,
                            seen_at: target.seen_at,
                            archived_at: target.archived_at,
                            expires_at: new.expires_at,
                        });
                        EventBody::Updated(Notification {
                            id: target.id,
                            seq: seq(target.seq),
                            recipient: a.user.to_owned(),
                            content: content(*c)?.clone(),
                            read_at: target.read_at,
                            seen_at: target.seen_at,
                            archived_at: target.archived_at,
                            group,
                        })
                    }
                    None => {
                        let group = matches!(new.fold, Some(Fold::Group { .. }))
                            .then(|| Group::open(actor));
                        if let Some(key) = fold {
                            targets.insert(
                                key,
                                FoldTarget {
                                    id: ids[i],
                                    seq: seqs[i],
                                    group: group.clone(),
                                    read_at: None,
                                    seen_at: None,
                                    archived_at: None,
                                },
                            );
                        }
                        new_notes.push((i, new, content_id));
                        EventBody::Notification(Notification {
                            id: ids[i],
                            seq: s,
                            recipient: a.user.to_owned(),
                            content: content(*c)?.clone(),
                            read_at: None,
                            seen_at: None,
                            archived_at: None,
                            group,
                        })
                    }
                }
            }
            NewEvent::State(r) => EventBody::State(r.clone()),
        };
        committed.push(Committed {
            key: StreamKey::user(a.tenant, a.user),
            event: Arc::new(StreamEvent::new(s, taken.epoch, body)),
        });
    }
    let states = appends
        .iter()
        .zip(&seqs)
        .filter_map(|(a, s)| match &a.event {
            NewEvent::State(r) => Some(StateRow {
                tenant: a.tenant,
                user: a.user,
                seq: *s,
                ids: &r.ids,
                up_to: pos(r.up_to_seq),
                action: r.action.as_i16(),
                filter: FilterColumns::of(r.filter.as_ref()),
            }),
            NewEvent::Notification(_) => None,
        })
        .collect();
    let staged = bus.stage(&committed);
    Ok(Appending {
        committed,
        at: taken.at,
        content_ids,
        c_kinds: contents.iter().map(|c| c.kind).collect(),
        c_titles: contents.iter().map(|c| c.title).collect(),
        c_bodies: contents.iter().map(|c| c.body).collect(),
        c_data: contents.iter().map(|c| c.data).collect(),
        c_categories: contents
            .iter()
            .map(|c| c.presentation.category.as_str())
            .collect(),
        c_severities: contents
            .iter()
            .map(|c| c.presentation.severity.as_i16())
            .collect(),
        c_actors: contents
            .iter()
            .map(|c| c.presentation.actor.as_str())
            .collect(),
        c_action_urls: contents
            .iter()
            .map(|c| c.presentation.action_url.as_str())
            .collect(),
        c_actions: contents
            .iter()
            .map(|c| c.presentation.actions_json())
            .collect(),
        n_tenants: new_notes.iter().map(|&(i, ..)| appends[i].tenant).collect(),
        n_users: new_notes.iter().map(|&(i, ..)| appends[i].user).collect(),
        n_seqs: new_notes.iter().map(|&(i, ..)| seqs[i]).collect(),
        note_ids: new_notes.iter().map(|&(i, ..)| ids[i]).collect(),
        note_contents: new_notes
            .iter()
            .map(|&(.., content_id)| content_id)
            .collect(),
        n_replace_keys: new_notes
            .iter()
            .map(|(_, new, _)| match new.fold {
                Some(Fold::Replace(k)) => Some(k.as_str()),
                _ => None,
            })
            .collect(),
        n_group_keys: new_notes
            .iter()
            .map(|(_, new, _)| match new.fold {
                Some(Fold::Group { key, .. }) => Some(key.as_str()),
                _ => None,
            })
            .collect(),
        n_expires: new_notes.iter().map(|(_, new, _)| new.expires_at).collect(),
        n_actors: new_notes
            .iter()
            .map(|(_, new, _)| match new.fold {
                Some(Fold::Group { .. }) => Some(new.presentation.actor.as_str()),
                _ => None,
            })
            .collect(),
        states,
        updates,
        staged,
    })
}

/// The columns [`notification`] reads, with the group state's columns
/// `$group` (`group_count`, `actors`).
macro_rules! notification_columns {
    ($group:literal) => {
        concat!(
            "n.id, n.seq, n.user_id, c.type, c.title, c.body, c.data::text AS data, \
             c.created_at, n.read_at, c.category, c.severity, c.actor, c.action_url, c.actions, \
             COALESCE(n.seen_at, n.read_at) AS seen_at, n.archived_at, n.replace_key, \
             n.group_key, n.expires_at, ",
            $group
        )
    };
}

/// Columns of a notification joined with its content, as [`notification`]
/// reads them.
pub const NOTIFICATION_COLUMNS: &str = notification_columns!("n.group_count, n.actors");

/// The columns of a notification as its first event showed it: its group
/// as opened (by its first send's actor).
const FIRST_NOTIFICATION_COLUMNS: &str = notification_columns!(
    "CASE WHEN n.group_key IS NULL THEN NULL ELSE 1 END AS group_count, \
     CASE WHEN n.group_key IS NULL THEN NULL ELSE ARRAY[c.actor] END AS actors"
);

/// A notification row (see [`NOTIFICATION_COLUMNS`]). Content is not
/// shared between rows read this way.
pub fn notification(row: &tokio_postgres::Row) -> Result<Notification, tokio_postgres::Error> {
    Ok(Notification {
        id: row.try_get("id")?,
        seq: seq(row.try_get("seq")?),
        recipient: row.try_get("user_id")?,
        content: Arc::new(Content {
            kind: row.try_get("type")?,
            title: row.try_get("title")?,
            body: row.try_get("body")?,
            data: row.try_get("data")?,
            presentation: Presentation {
                category: row.try_get("category")?,
                severity: Severity::from_i16(row.try_get("severity")?),
                actor: row.try_get("actor")?,
                action_url: row.try_get("action_url")?,
                actions: Presentation::actions_from_json(row.try_get("actions")?),
            },
            created_at: row.try_get("created_at")?,
            replace_key: row
                .try_get::<_, Option<String>>("replace_key")?
                .unwrap_or_default(),
            group_key: row
                .try_get::<_, Option<String>>("group_key")?
                .unwrap_or_default(),
            expires_at: row.try_get("expires_at")?,
        }),
        read_at: row.try_get("read_at")?,
        seen_at: row.try_get("seen_at")?,
        archived_at: row.try_get("archived_at")?,
        group: match row.try_get::<_, Option<i32>>("group_count")? {
            None => None,
            Some(count) => Some(Group {
                count: u32::try_from(count).unwrap_or(1),
                actors: row
                    .try_get::<_, Option<Vec<String>>>("actors")?
                    .unwrap_or_default(),
            }),
        },
    })
}

/// A state event's row as read by [`read_range`]. An action this version
/// does not know (a newer replica wrote it) reads as an empty read change,
/// which changes nothing.
fn state_change(row: &tokio_postgres::Row) -> Result<StateChange, tokio_postgres::Error> {
    let action = StateAction::from_i16(row.try_get("action")?);
    let filter = NotificationFilter {
        types: row.try_get("f_types")?,
        type_prefixes: row.try_get("f_prefixes")?,
        categories: row.try_get("f_categories")?,
        min_severity: match row.try_get::<_, i16>("f_severity")? {
            0 => None,
            s => Some(Severity::from_i16(s)),
        },
    };
    let Some(action) = action else {
        return Ok(StateChange {
            action: StateAction::Read,
            ids: Vec::new(),
            up_to_seq: 0,
            filter: None,
        });
    };
    Ok(StateChange {
        action,
        ids: row.try_get("ids")?,
        up_to_seq: seq(row.try_get("up_to")?),
        filter: (!filter.is_all()).then_some(filter),
    })
}

/// Reads up to `limit` events of `tenant`/`user`'s stream after
/// `after_seq`, in seq order, with the database's epoch (known even when
/// there are none). Each kind's rows are read by one arm of the union.
pub async fn read_range(
    client: &impl GenericClient,
    tenant: &str,
    user: &str,
    after_seq: u64,
    limit: usize,
) -> StoreResult<StreamRange> {
    let stmt = client
        .prepare_cached(&format!(
            "SELECT m.epoch, e.* FROM herald_meta m LEFT JOIN LATERAL ( \
               SELECT * FROM ( \
                 SELECT 0::int2 AS ev, n.seq AS ev_seq, {FIRST_NOTIFICATION_COLUMNS}, \
                        NULL::bigint[] AS ids, 0::bigint AS up_to, \
                        0::int2 AS action, NULL::text[] AS f_types, NULL::text[] AS f_prefixes, \
                        NULL::text[] AS f_categories, 0::int2 AS f_severity \
                 FROM notifications n JOIN contents c ON c.id = n.content_id \
                 WHERE n.tenant = $1 AND n.user_id = $2 AND n.seq > $3 \
                 UNION ALL \
                 SELECT 1::int2, seq, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, \
                        NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, \
                        notification_ids, up_to_seq, \
                        action, types, type_prefixes, categories, min_severity \
                 FROM state_events WHERE tenant = $1 AND user_id = $2 AND seq > $3 \
                 UNION ALL \
                 SELECT 2::int2, u.seq, u.notification_id, u.note_seq, u.user_id, c.type, c.title, \
                        c.body, c.data::text, c.created_at, u.read_at, c.category, c.severity, \
                        c.actor, c.action_url, c.actions, u.seen_at, u.archived_at, u.replace_key, \
                        u.group_key, u.expires_at, u.group_count, u.actors, \
                        NULL, 0::bigint, 0::int2, NULL, NULL, NULL, 0::int2 \
                 FROM update_events u JOIN contents c ON c.id = u.content_id \
                 WHERE u.tenant = $1 AND u.user_id = $2 AND u.seq > $3 \
               ) AS u ORDER BY ev_seq LIMIT $4 \
             ) AS e ON true ORDER BY e.ev_seq"
        ))
        .await
        .map_err(pg_error)?;
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let rows = client
        .query(&stmt, &[&tenant, &user, &pos(after_seq), &limit])
        .await
        .map_err(pg_error)?;
    // One row per event, or one row of NULLs (but the epoch) when the range
    // is empty.
    let mut range = StreamRange::default();
    for row in &rows {
        range.epoch = seq(row.try_get("epoch").map_err(pg_error)?);
        let Some(s) = row.try_get::<_, Option<i64>>("ev_seq").map_err(pg_error)? else {
            continue;
        };
        let kind: i16 = row.try_get("ev").map_err(pg_error)?;
        let body = match kind {
            1 => EventBody::State(state_change(row).map_err(pg_error)?),
            0 => EventBody::Notification(Notification {
                read_at: None,
                seen_at: None,
                archived_at: None,
                ..notification(row).map_err(pg_error)?
            }),
            _ => EventBody::Updated(notification(row).map_err(pg_error)?),
        };
        range
            .events
            .push(StreamEvent::new(seq(s), range.epoch, body));
    }
    Ok(range)
}
