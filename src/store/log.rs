//! The stream log in PostgreSQL: the one *append events to streams*
//! primitive every write uses, and the one *read a range of a stream*.
//!
//! Appending takes each stream's next seqs in one statement that bumps
//! `user_streams.last_seq` by the number of events for it, rows locked in
//! (tenant, user) order: the row lock is held until commit, so seqs are
//! gap-free and in commit order, and concurrent appends to overlapping
//! streams cannot deadlock. Then each event kind inserts its rows (one
//! statement per kind present), and the bus stages the committed events in
//! the same transaction. Event kinds and their rows:
//!
//! | kind | row |
//! |---|---|
//! | notification | `notifications` (narrow: ids, seq, read state) referencing `contents` |
//! | read | `read_events` |

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
};

use deadpool_postgres::GenericClient;
use deadpool_postgres::Transaction;

use super::{
    StoreError, StoreResult,
    postgres::{pg_error, pos, seq},
};
use crate::{
    bus::{Bus, Committed},
    notification::{
        Content, Epoch, EventBody, Notification, ReadChange, StreamEvent, StreamKey, StreamRange,
    },
};

/// An event to append, before it has a seq.
#[derive(Debug, Clone)]
pub enum NewEvent {
    /// A notification of stored content `content_id` (see
    /// [`insert_contents`]).
    Notification {
        /// The content's row id.
        content_id: i64,
        /// The content itself, shared with the send's other recipients.
        content: Arc<Content>,
    },
    /// A read-state change.
    Read(ReadChange),
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

const TAKE_SEQS: &str = "WITH taken AS ( \
       INSERT INTO user_streams AS s (tenant, user_id, last_seq) \
       SELECT * FROM unnest($1::text[], $2::text[], $3::int8[]) AS c(tenant, user_id, n) \
       ORDER BY tenant, user_id \
       ON CONFLICT (tenant, user_id) DO UPDATE SET last_seq = s.last_seq + EXCLUDED.last_seq \
       RETURNING s.tenant, s.user_id, s.last_seq \
     ) SELECT taken.*, m.epoch FROM taken CROSS JOIN herald_meta m";

// Ids are drawn in the input CTE (materialized: it is referenced twice and
// calls a volatile function, PostgreSQL docs "WITH Queries"), so they come
// back in input order without a lookup.
const INSERT_NOTIFICATIONS: &str = "WITH input AS ( \
       SELECT nextval('notifications_id_seq') AS id, r.* \
       FROM unnest($1::text[], $2::text[], $3::int8[], $4::int8[]) \
         WITH ORDINALITY AS r(tenant, user_id, seq, content_id, ord) \
     ), ins AS ( \
       INSERT INTO notifications (id, tenant, user_id, seq, content_id) \
       SELECT id, tenant, user_id, seq, content_id FROM input \
     ) SELECT id FROM input ORDER BY ord";

const INSERT_READ_EVENT: &str = "INSERT INTO read_events \
     (tenant, user_id, seq, notification_ids, up_to_seq) VALUES ($1, $2, $3, $4, $5)";

const INSERT_CONTENTS: &str = "WITH input AS ( \
       SELECT nextval('contents_id_seq') AS id, c.* \
       FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]) \
         WITH ORDINALITY AS c(type, title, body, data, ord) \
     ), ins AS ( \
       INSERT INTO contents (id, type, title, body, data) \
       SELECT id, type, title, body, data::json FROM input \
     ) SELECT id, now() AS created_at FROM input ORDER BY ord";

/// Stores the content of sends once each, in `tx`; returns the row ids in
/// the order given and the store time (the transaction's).
pub async fn insert_contents(
    tx: &Transaction<'_>,
    contents: &[(&str, &str, &str, &str)],
) -> StoreResult<(Vec<i64>, std::time::SystemTime)> {
    let kinds: Vec<&str> = contents.iter().map(|c| c.0).collect();
    let titles: Vec<&str> = contents.iter().map(|c| c.1).collect();
    let bodies: Vec<&str> = contents.iter().map(|c| c.2).collect();
    let data: Vec<&str> = contents.iter().map(|c| c.3).collect();
    let stmt = tx.prepare_cached(INSERT_CONTENTS).await.map_err(pg_error)?;
    let rows = tx
        .query(&stmt, &[&kinds, &titles, &bodies, &data])
        .await
        .map_err(pg_error)?;
    let mut at = std::time::SystemTime::now();
    let ids = rows
        .iter()
        .map(|r| {
            at = r.try_get(1)?;
            r.try_get(0)
        })
        .collect::<Result<Vec<i64>, _>>()
        .map_err(pg_error)?;
    if ids.len() != contents.len() {
        return Err(StoreError::internal("content insert returned too few rows"));
    }
    Ok((ids, at))
}

/// Appends `appends` to their streams in `tx` and stages them on `bus`;
/// returns the events in the order given (per stream, seq order). Nothing
/// is visible to anyone until `tx` commits; on rollback the seqs are not
/// used.
pub async fn append(
    tx: &Transaction<'_>,
    bus: &dyn Bus,
    appends: &[Append<'_>],
) -> StoreResult<Vec<Committed>> {
    if appends.is_empty() {
        return Ok(Vec::new());
    }
    // 1. Seqs: one statement for every stream, locked in key order.
    let mut counts: BTreeMap<(&str, &str), i64> = BTreeMap::new();
    for a in appends {
        *counts.entry((a.tenant, a.user)).or_default() += 1;
    }
    let tenants: Vec<&str> = counts.keys().map(|(t, _)| *t).collect();
    let users: Vec<&str> = counts.keys().map(|(_, u)| *u).collect();
    let ns: Vec<i64> = counts.values().copied().collect();
    let stmt = tx.prepare_cached(TAKE_SEQS).await.map_err(pg_error)?;
    let rows = tx
        .query(&stmt, &[&tenants, &users, &ns])
        .await
        .map_err(pg_error)?;
    let mut epoch: Epoch = 0;
    // Per stream: the next seq to hand out.
    let mut next: HashMap<(String, String), i64> = HashMap::with_capacity(rows.len());
    for row in &rows {
        let tenant: String = row.try_get(0).map_err(pg_error)?;
        let user: String = row.try_get(1).map_err(pg_error)?;
        let last: i64 = row.try_get(2).map_err(pg_error)?;
        epoch = seq(row.try_get(3).map_err(pg_error)?);
        let n = counts
            .get(&(tenant.as_str(), user.as_str()))
            .copied()
            .unwrap_or_default();
        next.insert((tenant, user), last - n + 1);
    }
    let mut seqs = Vec::with_capacity(appends.len());
    for a in appends {
        let s = next
            .get_mut(&(a.tenant.to_owned(), a.user.to_owned()))
            .ok_or_else(|| StoreError::internal("a stream got no seq"))?;
        seqs.push(*s);
        *s += 1;
    }

    // 2. Each kind's rows, one statement per kind present.
    let mut ids = vec![0i64; appends.len()];
    let notes: Vec<usize> = (0..appends.len())
        .filter(|&i| matches!(appends[i].event, NewEvent::Notification { .. }))
        .collect();
    if !notes.is_empty() {
        let t: Vec<&str> = notes.iter().map(|&i| appends[i].tenant).collect();
        let u: Vec<&str> = notes.iter().map(|&i| appends[i].user).collect();
        let s: Vec<i64> = notes.iter().map(|&i| seqs[i]).collect();
        let c: Vec<i64> = notes
            .iter()
            .map(|&i| match &appends[i].event {
                NewEvent::Notification { content_id, .. } => *content_id,
                NewEvent::Read(_) => 0,
            })
            .collect();
        let stmt = tx
            .prepare_cached(INSERT_NOTIFICATIONS)
            .await
            .map_err(pg_error)?;
        let rows = tx.query(&stmt, &[&t, &u, &s, &c]).await.map_err(pg_error)?;
        if rows.len() != notes.len() {
            return Err(StoreError::internal(
                "notification insert returned too few rows",
            ));
        }
        for (&i, row) in notes.iter().zip(&rows) {
            ids[i] = row.try_get(0).map_err(pg_error)?;
        }
    }
    // Read events come one per mark (a handful per transaction at most).
    for (i, a) in appends.iter().enumerate() {
        if let NewEvent::Read(r) = &a.event {
            let stmt = tx
                .prepare_cached(INSERT_READ_EVENT)
                .await
                .map_err(pg_error)?;
            tx.execute(
                &stmt,
                &[&a.tenant, &a.user, &seqs[i], &r.ids, &pos(r.up_to_seq)],
            )
            .await
            .map_err(pg_error)?;
        }
    }

    // 3. The committed events, staged on the bus in this transaction.
    let committed: Vec<Committed> = appends
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let s = seq(seqs[i]);
            let body = match &a.event {
                NewEvent::Notification { content, .. } => EventBody::Notification(Notification {
                    id: ids[i],
                    seq: s,
                    recipient: a.user.to_owned(),
                    content: content.clone(),
                    read: false,
                }),
                NewEvent::Read(r) => EventBody::Read(r.clone()),
            };
            Committed {
                key: StreamKey::user(a.tenant, a.user),
                event: Arc::new(StreamEvent::new(s, epoch, body)),
            }
        })
        .collect();
    if let Some(staged) = bus.stage(&committed) {
        let stmt = tx
            .prepare_cached(staged.statement)
            .await
            .map_err(pg_error)?;
        tx.execute(&stmt, &[&staged.texts])
            .await
            .map_err(pg_error)?;
    }
    Ok(committed)
}

/// Columns of a notification joined with its content, as [`notification`]
/// reads them.
pub const NOTIFICATION_COLUMNS: &str = "n.id, n.seq, n.user_id, c.type, c.title, c.body, \
     c.data::text AS data, c.created_at, n.read_at IS NOT NULL AS read";

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
            created_at: row.try_get("created_at")?,
        }),
        read: row.try_get("read")?,
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
                 SELECT {NOTIFICATION_COLUMNS}, NULL::bigint[] AS ids, 0::bigint AS up_to \
                 FROM notifications n JOIN contents c ON c.id = n.content_id \
                 WHERE n.tenant = $1 AND n.user_id = $2 AND n.seq > $3 \
                 UNION ALL \
                 SELECT NULL, seq, user_id, NULL, NULL, NULL, NULL, NULL, NULL, \
                        notification_ids, up_to_seq \
                 FROM read_events WHERE tenant = $1 AND user_id = $2 AND seq > $3 \
               ) AS u ORDER BY seq LIMIT $4 \
             ) AS e ON true ORDER BY e.seq"
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
        let Some(s) = row.try_get::<_, Option<i64>>("seq").map_err(pg_error)? else {
            continue;
        };
        let id: Option<i64> = row.try_get("id").map_err(pg_error)?;
        let body = match id {
            Some(_) => EventBody::Notification(Notification {
                read: false,
                ..notification(row).map_err(pg_error)?
            }),
            None => EventBody::Read(ReadChange {
                ids: row.try_get("ids").map_err(pg_error)?,
                up_to_seq: seq(row.try_get("up_to").map_err(pg_error)?),
            }),
        };
        range
            .events
            .push(StreamEvent::new(seq(s), range.epoch, body));
    }
    Ok(range)
}
