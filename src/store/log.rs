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
//! | notification | `notifications` (narrow: ids, seq, read state) referencing `contents` |
//! | read | `read_events` |

use std::{
    collections::{BTreeMap, HashMap},
    future::Future,
    pin::Pin,
    sync::Arc,
};

use deadpool_postgres::{GenericClient, Transaction};
use tokio_postgres::types::ToSql;

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
}

/// An event to append, before it has a seq.
#[derive(Debug, Clone)]
pub enum NewEvent {
    /// A notification of the content at this index of `append`'s
    /// `contents` (the recipients of one send share one).
    Notification(usize),
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

// Also adds each stream's new notifications to its unread counter.
// One row: per stream (arrays in key order) the last seq taken; the epoch;
// the transaction's time; and the ids drawn for contents and notifications
// (uncorrelated subqueries, evaluated once).
const TAKE_SEQS: &str = "WITH taken AS ( \
       INSERT INTO user_streams AS s (tenant, user_id, last_seq, unread) \
       SELECT * FROM unnest($1::text[], $2::text[], $3::int8[], $6::int8[]) \
         AS c(tenant, user_id, n, unread) \
       ORDER BY tenant, user_id \
       ON CONFLICT (tenant, user_id) DO UPDATE \
         SET last_seq = s.last_seq + EXCLUDED.last_seq, unread = s.unread + EXCLUDED.unread \
       RETURNING s.tenant, s.user_id, s.last_seq \
     ) SELECT array_agg(tenant), array_agg(user_id), array_agg(last_seq), \
       (SELECT epoch FROM herald_meta), now(), \
       (SELECT coalesce(array_agg(nextval('contents_id_seq')), '{}') \
        FROM generate_series(1, $4::int8)), \
       (SELECT coalesce(array_agg(nextval('notifications_id_seq')), '{}') \
        FROM generate_series(1, $5::int8)) \
     FROM taken";

// Contents and their notifications in one statement (data-modifying CTEs
// always run: PostgreSQL docs, "Data-Modifying Statements in WITH").
const INSERT_NOTIFICATIONS: &str = "WITH c AS ( \
       INSERT INTO contents (id, type, title, body, data, created_at) \
       SELECT id, type, title, body, data::json, $11 \
       FROM unnest($1::int8[], $2::text[], $3::text[], $4::text[], $5::text[]) \
         AS c(id, type, title, body, data) \
     ) INSERT INTO notifications (id, tenant, user_id, seq, content_id, created_at) \
     SELECT id, tenant, user_id, seq, content_id, $11 \
     FROM unnest($6::int8[], $7::text[], $8::text[], $9::int8[], $10::int8[]) \
       AS r(id, tenant, user_id, seq, content_id)";

const INSERT_READ_EVENT: &str = "INSERT INTO read_events \
     (tenant, user_id, seq, notification_ids, up_to_seq) VALUES ($1, $2, $3, $4, $5)";

/// Runs `statement` in `tx`.
async fn execute(
    tx: &Transaction<'_>,
    statement: &str,
    params: &[&(dyn ToSql + Sync)],
) -> StoreResult<()> {
    let stmt = tx.prepare_cached(statement).await.map_err(pg_error)?;
    tx.execute(&stmt, params).await.map_err(pg_error)?;
    Ok(())
}

/// What taking seqs returned: per stream the next seq to hand out, the
/// epoch, the transaction's time (every row's store time), and the ids
/// drawn for contents and notifications.
struct Taken {
    next: HashMap<(String, String), i64>,
    epoch: Epoch,
    at: std::time::SystemTime,
    content_ids: Vec<i64>,
    note_ids: Vec<i64>,
}

/// Takes `counts[stream].0` seqs on each stream, streams locked in key
/// order, adds `counts[stream].1` new notifications to its unread counter,
/// and draws `contents` content ids and `notes` notification ids: one
/// statement, one row.
async fn take_seqs(
    tx: &Transaction<'_>,
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

/// A write of step 2 of [`append`], boxed so writes of any kind pipeline
/// together.
type Write<'a> = Pin<Box<dyn Future<Output = StoreResult<()>> + Send + 'a>>;

/// Appends `appends` to their streams in `tx`, storing each of `contents`
/// once, and stages them on `bus`; returns the events in the order given
/// (per stream, seq order). Nothing is visible to anyone until `tx`
/// commits; on rollback the seqs are not used.
///
/// Two round trips: one statement takes the seqs (every stream, locked in
/// key order) and draws the row ids; then every kind's rows (contents and
/// notifications in one statement) and the bus's statement go as one
/// pipeline (tokio-postgres sends the requests of futures polled together
/// without waiting for each answer).
pub async fn append(
    tx: &Transaction<'_>,
    bus: &dyn Bus,
    contents: &[NewContent<'_>],
    appends: &[Append<'_>],
) -> StoreResult<Vec<Committed>> {
    if appends.is_empty() {
        return Ok(Vec::new());
    }
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

    // 1. Seqs and ids.
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
                created_at: taken.at,
            })
        })
        .collect();
    let mut ids = vec![0i64; appends.len()];
    let mut note_contents = Vec::with_capacity(notes.len());
    for (&i, id) in notes.iter().zip(&note_ids) {
        ids[i] = *id;
        if let NewEvent::Notification(c) = appends[i].event {
            let content_id = content_ids
                .get(c)
                .ok_or_else(|| StoreError::internal("no such content"))?;
            note_contents.push(*content_id);
        }
    }

    // 2. The committed events; their rows and bus messages, pipelined.
    let mut committed = Vec::with_capacity(appends.len());
    for (i, a) in appends.iter().enumerate() {
        let s = seq(seqs[i]);
        let body = match &a.event {
            NewEvent::Notification(c) => EventBody::Notification(Notification {
                id: ids[i],
                seq: s,
                recipient: a.user.to_owned(),
                content: shared
                    .get(*c)
                    .ok_or_else(|| StoreError::internal("no such content"))?
                    .clone(),
                read: false,
            }),
            NewEvent::Read(r) => EventBody::Read(r.clone()),
        };
        committed.push(Committed {
            key: StreamKey::user(a.tenant, a.user),
            event: Arc::new(StreamEvent::new(s, taken.epoch, body)),
        });
    }
    let c_kinds: Vec<&str> = contents.iter().map(|c| c.kind).collect();
    let c_titles: Vec<&str> = contents.iter().map(|c| c.title).collect();
    let c_bodies: Vec<&str> = contents.iter().map(|c| c.body).collect();
    let c_data: Vec<&str> = contents.iter().map(|c| c.data).collect();
    let n_tenants: Vec<&str> = notes.iter().map(|&i| appends[i].tenant).collect();
    let n_users: Vec<&str> = notes.iter().map(|&i| appends[i].user).collect();
    let n_seqs: Vec<i64> = notes.iter().map(|&i| seqs[i]).collect();
    let reads: Vec<(&Append<'_>, i64, &ReadChange, i64)> = appends
        .iter()
        .zip(&seqs)
        .filter_map(|(a, s)| match &a.event {
            NewEvent::Read(r) => Some((a, *s, r, pos(r.up_to_seq))),
            NewEvent::Notification(_) => None,
        })
        .collect();
    let staged = bus.stage(&committed);

    let mut writes: Vec<Write<'_>> = Vec::new();
    if !notes.is_empty() {
        let params: [&(dyn ToSql + Sync); 11] = [
            &content_ids,
            &c_kinds,
            &c_titles,
            &c_bodies,
            &c_data,
            &note_ids,
            &n_tenants,
            &n_users,
            &n_seqs,
            &note_contents,
            &taken.at,
        ];
        writes.push(Box::pin(async move {
            execute(tx, INSERT_NOTIFICATIONS, &params).await
        }));
    }
    // Read events come one per mark (a handful per transaction at most).
    for (a, s, r, up_to) in &reads {
        let params: [&(dyn ToSql + Sync); 5] = [&a.tenant, &a.user, s, &r.ids, up_to];
        writes.push(Box::pin(async move {
            execute(tx, INSERT_READ_EVENT, &params).await
        }));
    }
    if let Some(staged) = &staged {
        let params: [&(dyn ToSql + Sync); 1] = [&staged.texts];
        writes.push(Box::pin(async move {
            execute(tx, staged.statement, &params).await
        }));
    }
    futures_util::future::try_join_all(writes).await?;
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
