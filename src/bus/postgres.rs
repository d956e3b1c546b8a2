//! The PostgreSQL LISTEN/NOTIFY bus, the default: [`NotifyBus`] stages a
//! write's events as `pg_notify` payloads in its transaction, and each
//! replica's [`Listener`] (one dedicated connection) receives every
//! committed payload and routes it to the hub.
//!
//! A NOTIFY is delivered only if its transaction commits (PostgreSQL docs,
//! "NOTIFY"), so nothing uncommitted reaches a stream. The connection can be
//! lost, or silently deafened by a half-open socket; the listener guards
//! against both: TCP keepalive, plus a periodic NOTIFY to itself that must
//! come back within a timeout. The probe runs beside routing, never inside
//! it, and any notification received proves the connection hears, so a
//! slow probe under load neither stalls routing nor triggers reconnects. On
//! any failure it reconnects with exponential backoff and, once listening
//! again, tells every local stream to catch up from the store, so events
//! committed while it was deaf are not lost.
//!
//! The payload codec ([`Payload`], [`pack`]) lives here and only here. A
//! NOTIFY carries one payload or a JSON array of them (a group-committed
//! batch), and must stay under 8000 bytes (PostgreSQL docs, "NOTIFY"):
//! payloads are sized on their encoded JSON, and events that do not fit are
//! sent as a *wake-up* naming only the stream, whose subscribers read them
//! from the store.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use backon::{BackoffBuilder, ExponentialBuilder};
use futures_util::{StreamExt, stream};
use serde::{Deserialize, Serialize};
use tokio::{sync::mpsc, time::Instant};
use tokio_postgres::{AsyncMessage, NoTls, SimpleQueryMessage};
use tokio_util::sync::CancellationToken;

use super::{Bus, Committed, Staged};
use crate::{
    hub::Hub,
    notification::{
        Content, Epoch, EventBody, Group, Notification, NotificationFilter, Presentation, Severity,
        StateAction, StateChange, StreamEvent, StreamKey,
    },
    store::{StoreError, postgres},
    telemetry::names,
    wire,
};

/// The channel every replica LISTENs on.
pub const CHANNEL: &str = "herald";

/// Largest payload written, in bytes: below PostgreSQL's 8000-byte limit
/// with room for the channel name.
pub const MAX_PAYLOAD_BYTES: usize = 7_900;

/// A NOTIFY payload (JSON). Field names are short: they are paid per NOTIFY.
/// `e` (the epoch the events were written in) is 0 in payloads of replicas
/// that predate epochs; the listener then stamps its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "k")]
pub enum Payload {
    /// One notification stored for several recipients.
    #[serde(rename = "n")]
    Notification {
        /// Tenant.
        t: String,
        /// Epoch.
        #[serde(default)]
        e: Epoch,
        /// Type.
        ty: String,
        /// Title.
        ti: String,
        /// Body.
        b: String,
        /// Data (JSON object text).
        d: String,
        /// Stored at, microseconds since the Unix epoch.
        at: i64,
        /// Category, severity, actor and links; left out when all default
        /// (and by replicas that predate them).
        #[serde(default, skip_serializing_if = "Presentation::is_default")]
        p: Presentation,
        /// The send's replace key; left out when none.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        rk: String,
        /// The send's group key (each recipient's group opens with the
        /// send's actor); left out when none.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        gk: String,
        /// Expires at, microseconds since the Unix epoch; left out when
        /// it does not expire.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        x: Option<i64>,
        /// Recipients: (user, seq, notification id).
        r: Vec<(String, u64, i64)>,
    },
    /// A notification of one user updated in place (replace or group
    /// key); replicas that predate it catch their streams up from the
    /// store instead.
    #[serde(rename = "u")]
    Updated {
        /// Tenant.
        t: String,
        /// Epoch.
        e: Epoch,
        /// User.
        u: String,
        /// Seq of the update event.
        s: u64,
        /// The notification's id.
        id: i64,
        /// The notification's seq.
        ns: u64,
        /// Type.
        ty: String,
        /// Title.
        ti: String,
        /// Body.
        b: String,
        /// Data (JSON object text).
        d: String,
        /// Stored at, microseconds since the Unix epoch.
        at: i64,
        /// Category, severity, actor and links.
        #[serde(default, skip_serializing_if = "Presentation::is_default")]
        p: Presentation,
        /// The replace key; left out when none.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        rk: String,
        /// The group key; left out when none.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        gk: String,
        /// With a group key: the group's count and actors.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        g: Option<(u32, Vec<String>)>,
        /// Expires at, microseconds since the Unix epoch; left out when
        /// it does not expire.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        x: Option<i64>,
        /// Read at after the update, microseconds since the Unix epoch;
        /// left out when not read (so seen and archived at).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ra: Option<i64>,
        /// Seen at.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sa: Option<i64>,
        /// Archived at.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        aa: Option<i64>,
    },
    /// A read-state change of one user.
    #[serde(rename = "r")]
    Read {
        /// Tenant.
        t: String,
        /// Epoch.
        #[serde(default)]
        e: Epoch,
        /// User.
        u: String,
        /// Seq of the read event.
        s: u64,
        /// Ids marked read.
        ids: Vec<i64>,
        /// Marked read up to this seq (0: none).
        up: u64,
    },
    /// Any other state change of one user (archive, delete, a change by
    /// filter...); replicas that predate it catch their streams up from
    /// the store instead.
    #[serde(rename = "s")]
    State {
        /// Tenant.
        t: String,
        /// Epoch.
        e: Epoch,
        /// User.
        u: String,
        /// Seq of the state event.
        s: u64,
        /// The action (`herald.v1.StateAction` number).
        a: i16,
        /// Ids that changed.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        ids: Vec<i64>,
        /// Changed up to this seq (0: none), with the filter below.
        #[serde(default)]
        up: u64,
        /// The filter's exact types.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        ft: Vec<String>,
        /// The filter's type prefixes.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        fp: Vec<String>,
        /// The filter's categories.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        fc: Vec<String>,
        /// The filter's least severity (0: any).
        #[serde(default)]
        fs: i16,
    },
    /// Events too large to carry: these users have new events up to these
    /// seqs; their streams read them from the store.
    #[serde(rename = "w")]
    Wake {
        /// Tenant.
        t: String,
        /// (user, seq).
        r: Vec<(String, u64)>,
    },
    /// The listener's liveness probe to itself.
    #[serde(rename = "p")]
    Ping {
        /// Random-enough nonce of this probe.
        n: u64,
    },
}

fn json<T: Serialize>(value: &T) -> String {
    // Serializing these types (strings, integers, tuples, vecs) cannot fail.
    serde_json::to_string(value).unwrap_or_default()
}

/// Splits `items` into chunks whose encoded size, on top of `base` bytes,
/// stays within [`MAX_PAYLOAD_BYTES`]: each item costs its encoded length
/// plus a separating comma. `None` when some item does not fit even alone.
fn chunk_by_encoded_size<T: Serialize + Clone>(base: usize, items: &[T]) -> Option<Vec<Vec<T>>> {
    let mut chunks = Vec::new();
    let mut current = Vec::new();
    let mut size = base;
    for item in items {
        let cost = json(item).len() + 1;
        if base + cost > MAX_PAYLOAD_BYTES {
            return None;
        }
        if size + cost > MAX_PAYLOAD_BYTES {
            chunks.push(std::mem::take(&mut current));
            size = base;
        }
        size += cost;
        current.push(item.clone());
    }
    if !current.is_empty() {
        chunks.push(current);
    }
    Some(chunks)
}

impl Payload {
    /// Splits `self` into JSON payloads of at most [`MAX_PAYLOAD_BYTES`],
    /// measured on the encoded JSON (escaping included): recipients are
    /// chunked, and what cannot fit even alone becomes [`Payload::Wake`]s.
    pub fn encode(self) -> Vec<String> {
        let whole = json(&self);
        if whole.len() <= MAX_PAYLOAD_BYTES {
            return vec![whole];
        }
        match self {
            Payload::Notification {
                t,
                e,
                ty,
                ti,
                b,
                d,
                at,
                p,
                rk,
                gk,
                x,
                r,
            } => {
                let shell = |r: Vec<(String, u64, i64)>| Payload::Notification {
                    t: t.clone(),
                    e,
                    ty: ty.clone(),
                    ti: ti.clone(),
                    b: b.clone(),
                    d: d.clone(),
                    at,
                    p: p.clone(),
                    rk: rk.clone(),
                    gk: gk.clone(),
                    x,
                    r,
                };
                let base = json(&shell(Vec::new())).len();
                match chunk_by_encoded_size(base, &r) {
                    Some(chunks) => chunks.into_iter().map(|c| json(&shell(c))).collect(),
                    None => wake(&t, r.into_iter().map(|(u, s, _)| (u, s)).collect()),
                }
            }
            Payload::Read { t, u, s, .. }
            | Payload::State { t, u, s, .. }
            | Payload::Updated { t, u, s, .. } => wake(&t, vec![(u, s)]),
            Payload::Wake { t, r } => wake(&t, r),
            Payload::Ping { .. } => vec![whole],
        }
    }
}

/// Packs payloads into as few NOTIFY texts as fit: each payload is split to
/// fit alone (see [`Payload::encode`]), then consecutive pieces are joined
/// into JSON arrays of at most [`MAX_PAYLOAD_BYTES`]. Order is kept.
pub fn pack(payloads: impl IntoIterator<Item = Payload>) -> Vec<String> {
    let mut texts = Vec::new();
    let mut current = String::new();
    let mut count = 0;
    let flush = |current: &mut String, count: &mut usize, texts: &mut Vec<String>| {
        match *count {
            0 => {}
            1 => texts.push(current[1..].to_owned()),
            _ => {
                current.push(']');
                texts.push(std::mem::take(current));
            }
        }
        current.clear();
        *count = 0;
    };
    for piece in payloads.into_iter().flat_map(Payload::encode) {
        // "[" + pieces joined by "," + "]"
        if count > 0 && current.len() + 1 + piece.len() + 1 > MAX_PAYLOAD_BYTES {
            flush(&mut current, &mut count, &mut texts);
        }
        current.push(if count == 0 { '[' } else { ',' });
        current.push_str(&piece);
        count += 1;
    }
    flush(&mut current, &mut count, &mut texts);
    texts
}

/// Wake-up payloads for `r`, chunked on their encoded size. A tenant and a
/// user id are at most 128 bytes each, so even escaped six-fold (`\u0001`)
/// one recipient always fits.
fn wake(t: &str, r: Vec<(String, u64)>) -> Vec<String> {
    let shell = |r: Vec<(String, u64)>| Payload::Wake { t: t.to_owned(), r };
    let base = json(&shell(Vec::new())).len();
    chunk_by_encoded_size(base, &r)
        .unwrap_or_else(|| r.into_iter().map(|one| vec![one]).collect())
        .into_iter()
        .map(|chunk| json(&shell(chunk)))
        .collect()
}

/// The payloads of `events`: consecutive notifications sharing one content
/// (one send's recipients) become one [`Payload::Notification`] carrying the
/// content once; read changes one [`Payload::Read`] each.
pub fn payloads(events: &[Committed]) -> Vec<Payload> {
    let mut out: Vec<Payload> = Vec::new();
    let mut last_content: Option<&Arc<Content>> = None;
    for c in events {
        let StreamKey::User { tenant, user } = &c.key;
        match &c.event.body {
            EventBody::Notification(n) => {
                let recipient = (user.clone(), c.event.seq, n.id);
                if let (Some(prev), Some(Payload::Notification { t, r, .. })) =
                    (last_content, out.last_mut())
                    && Arc::ptr_eq(prev, &n.content)
                    && t == tenant
                {
                    r.push(recipient);
                    continue;
                }
                out.push(Payload::Notification {
                    t: tenant.clone(),
                    e: c.event.epoch,
                    ty: n.content.kind.clone(),
                    ti: n.content.title.clone(),
                    b: n.content.body.clone(),
                    d: n.content.data.clone(),
                    at: crate::store::postgres::micros(n.content.created_at),
                    p: n.content.presentation.clone(),
                    rk: n.content.replace_key.clone(),
                    gk: n.content.group_key.clone(),
                    x: n.content.expires_at.map(crate::store::postgres::micros),
                    r: vec![recipient],
                });
                last_content = Some(&n.content);
            }
            EventBody::Updated(n) => {
                out.push(Payload::Updated {
                    t: tenant.clone(),
                    e: c.event.epoch,
                    u: user.clone(),
                    s: c.event.seq,
                    id: n.id,
                    ns: n.seq,
                    ty: n.content.kind.clone(),
                    ti: n.content.title.clone(),
                    b: n.content.body.clone(),
                    d: n.content.data.clone(),
                    at: crate::store::postgres::micros(n.content.created_at),
                    p: n.content.presentation.clone(),
                    rk: n.content.replace_key.clone(),
                    gk: n.content.group_key.clone(),
                    g: n.group.as_ref().map(|g| (g.count, g.actors.clone())),
                    x: n.content.expires_at.map(crate::store::postgres::micros),
                    ra: n.read_at.map(crate::store::postgres::micros),
                    sa: n.seen_at.map(crate::store::postgres::micros),
                    aa: n.archived_at.map(crate::store::postgres::micros),
                });
                last_content = None;
            }
            EventBody::State(change) if change.is_plain_read() => {
                out.push(Payload::Read {
                    t: tenant.clone(),
                    e: c.event.epoch,
                    u: user.clone(),
                    s: c.event.seq,
                    ids: change.ids.clone(),
                    up: change.up_to_seq,
                });
                last_content = None;
            }
            EventBody::State(change) => {
                let f = change.filter.clone().unwrap_or_default();
                out.push(Payload::State {
                    t: tenant.clone(),
                    e: c.event.epoch,
                    u: user.clone(),
                    s: c.event.seq,
                    a: change.action.as_i16(),
                    ids: change.ids.clone(),
                    up: change.up_to_seq,
                    ft: f.types,
                    fp: f.type_prefixes,
                    fc: f.categories,
                    fs: f.min_severity.map_or(0, Severity::as_i16),
                });
                last_content = None;
            }
        }
    }
    out
}

/// The LISTEN/NOTIFY bus's writing side: events become `pg_notify`
/// payloads on [`CHANNEL`], run in the writing transaction, so PostgreSQL
/// delivers them to every listener at commit and never otherwise.
#[derive(Debug, Clone, Copy, Default)]
pub struct NotifyBus;

/// The statement [`NotifyBus`] stages: one round trip for every payload.
pub const NOTIFY_STATEMENT: &str = "SELECT pg_notify('herald', p) FROM unnest($1::text[]) AS p";

impl Bus for NotifyBus {
    fn stage(&self, events: &[Committed]) -> Option<Staged> {
        Some(Staged {
            statement: NOTIFY_STATEMENT,
            texts: pack(payloads(events)),
        })
    }
}

fn micros_to_time(at: i64) -> std::time::SystemTime {
    let at = Duration::from_micros(u64::try_from(at).unwrap_or(0));
    std::time::UNIX_EPOCH + at
}

/// Routes one NOTIFY text (a payload or an array of them) to the hub.
/// Events are stamped with the epoch they were written in, or `epoch` (the
/// listener's) for payloads without one. Events go only to users with
/// streams on this replica, and are built once per recipient.
pub fn route(hub: &Hub, epoch: Epoch, text: &str) {
    let payloads = if text.starts_with('[') {
        serde_json::from_str::<Vec<Payload>>(text)
    } else {
        serde_json::from_str::<Payload>(text).map(|p| vec![p])
    };
    match payloads {
        Ok(payloads) => payloads.into_iter().for_each(|p| route_one(hub, epoch, p)),
        Err(e) => {
            // Unknown sender or format: we cannot tell whom it concerns, so
            // every stream re-checks the store.
            tracing::warn!(error = %e, "unreadable NOTIFY payload; all streams catch up");
            hub.signal_all();
        }
    }
}

fn route_one(hub: &Hub, listener_epoch: Epoch, payload: Payload) {
    let stamp = |e: Epoch| if e == 0 { listener_epoch } else { e };
    match payload {
        Payload::Notification {
            t,
            e,
            ty,
            ti,
            b,
            d,
            at,
            p,
            rk,
            gk,
            x,
            r,
        } => {
            let epoch = stamp(e);
            // Built only if some recipient has a stream here.
            let mut content: Option<Arc<Content>> = None;
            // For several recipients, the fields they share are encoded
            // once, here. A single recipient's event is left to be encoded
            // by the first stream that sends it (`StreamEvent::encoded`):
            // this loop is one task per replica, and encoding in it
            // serialized work that the streams' tasks do in parallel (~15%
            // less throughput measured).
            let share = r.len() > 1;
            let mut shared = None;
            for (user, seq, id) in r {
                if !hub.has_user_streams(&t, &user) {
                    continue;
                }
                let content = content.get_or_insert_with(|| {
                    Arc::new(Content {
                        kind: ty.clone(),
                        title: ti.clone(),
                        body: b.clone(),
                        data: d.clone(),
                        presentation: p.clone(),
                        created_at: micros_to_time(at),
                        replace_key: rk.clone(),
                        group_key: gk.clone(),
                        expires_at: x.map(micros_to_time),
                    })
                });
                let body = EventBody::Notification(Notification {
                    id,
                    seq,
                    recipient: user.clone(),
                    content: content.clone(),
                    read_at: None,
                    seen_at: None,
                    archived_at: None,
                    group: (!gk.is_empty()).then(|| Group::open(&p.actor)),
                });
                let event = if share {
                    let shared = shared.get_or_insert_with(|| wire::shared_fields(content));
                    let encoded = wire::notification_event(seq, epoch, id, &user, shared);
                    StreamEvent::with_encoding(seq, epoch, body, encoded)
                } else {
                    StreamEvent::new(seq, epoch, body)
                };
                hub.publish(
                    &StreamKey::User {
                        tenant: t.clone(),
                        user,
                    },
                    &Arc::new(event),
                );
            }
        }
        Payload::Read {
            t,
            e,
            u,
            s,
            ids,
            up,
        } => {
            let change = StateChange {
                action: StateAction::Read,
                ids,
                up_to_seq: up,
                filter: None,
            };
            let event = Arc::new(StreamEvent::new(s, stamp(e), EventBody::State(change)));
            hub.publish(&StreamKey::User { tenant: t, user: u }, &event);
        }
        Payload::State {
            t,
            e,
            u,
            s,
            a,
            ids,
            up,
            ft,
            fp,
            fc,
            fs,
        } => {
            let key = StreamKey::User { tenant: t, user: u };
            let Some(action) = StateAction::from_i16(a) else {
                // A newer replica's action: the stream reads the event from
                // the store (as that version stored it).
                hub.signal(&key);
                return;
            };
            let filter = NotificationFilter {
                types: ft,
                type_prefixes: fp,
                categories: fc,
                min_severity: (fs != 0).then(|| Severity::from_i16(fs)),
            };
            let change = StateChange {
                action,
                ids,
                up_to_seq: up,
                filter: (!filter.is_all()).then_some(filter),
            };
            let event = Arc::new(StreamEvent::new(s, stamp(e), EventBody::State(change)));
            hub.publish(&key, &event);
        }
        Payload::Updated {
            t,
            e,
            u,
            s,
            id,
            ns,
            ty,
            ti,
            b,
            d,
            at,
            p,
            rk,
            gk,
            g,
            x,
            ra,
            sa,
            aa,
        } => {
            let key = StreamKey::User {
                tenant: t,
                user: u.clone(),
            };
            let body = EventBody::Updated(Notification {
                id,
                seq: ns,
                recipient: u,
                content: Arc::new(Content {
                    kind: ty,
                    title: ti,
                    body: b,
                    data: d,
                    presentation: p,
                    created_at: micros_to_time(at),
                    replace_key: rk,
                    group_key: gk,
                    expires_at: x.map(micros_to_time),
                }),
                read_at: ra.map(micros_to_time),
                seen_at: sa.map(micros_to_time),
                archived_at: aa.map(micros_to_time),
                group: g.map(|(count, actors)| Group { count, actors }),
            });
            hub.publish(&key, &Arc::new(StreamEvent::new(s, stamp(e), body)));
        }
        Payload::Wake { t, r } => {
            for (user, _) in r {
                hub.signal(&StreamKey::User {
                    tenant: t.clone(),
                    user,
                });
            }
        }
        Payload::Ping { .. } => {}
    }
}

/// How the listener checks that it still hears.
#[derive(Debug, Clone, Copy)]
pub struct ListenerSettings {
    /// Time between liveness probes.
    pub ping_interval: Duration,
    /// How long a probe may take to come back before the connection is
    /// declared dead.
    pub ping_timeout: Duration,
}

/// Why one listening session ended.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    /// The connection failed or was closed.
    #[error("postgres: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    /// The connection ended.
    #[error("the LISTEN connection closed")]
    Closed,
    /// A liveness probe did not come back in time.
    #[error("liveness probe not echoed within {0:?}")]
    Deaf(Duration),
    /// The database's epoch could not be read.
    #[error("cannot read the stream epoch: {0}")]
    Epoch(#[from] StoreError),
}

/// A connection-level config for the listener: keepalive on, and bounded
/// connect time.
pub fn listener_config(url: &str) -> Result<tokio_postgres::Config, tokio_postgres::Error> {
    let mut config: tokio_postgres::Config = url.parse()?;
    config
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(15))
        .keepalives_interval(Duration::from_secs(5))
        .keepalives_retries(3)
        .connect_timeout(Duration::from_secs(5))
        .application_name("herald-listener");
    Ok(config)
}

/// The listener task. Call [`Listener::listen`] once to establish LISTEN
/// (so start-up fails fast on a bad URL), then [`Listener::run`] forever.
pub struct Listener {
    config: tokio_postgres::Config,
    hub: Arc<Hub>,
    settings: ListenerSettings,
    shutdown: CancellationToken,
    listening: Arc<AtomicBool>,
    /// The database's epoch, read on every (re)connect.
    epoch: AtomicU64,
}

/// A live LISTEN session: the client (for probes) and its notifications.
pub struct Listening {
    client: tokio_postgres::Client,
    notifications: mpsc::UnboundedReceiver<tokio_postgres::Notification>,
    /// The server backend of this session, if the server said.
    backend: Option<Backend>,
}

/// A server backend, identified by pid and start time (microseconds since
/// the Unix epoch), so that a pid the server reused is never mistaken for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Backend {
    pid: i32,
    started: i64,
}

/// This session's backend, in the form [`Backend`] reads it.
const WHO_AM_I: &str = "SELECT pid, (extract(epoch FROM backend_start) * 1000000)::int8 \
     FROM pg_stat_activity WHERE pid = pg_backend_pid()";

/// Ends the server backend of a LISTEN session this listener abandoned
/// (declared deaf, or lost), over the new session's connection.
///
/// Why: a half-open connection's backend lives on until the server's own
/// TCP gives up on it — minutes — still LISTENing. Once its socket buffer
/// is full it stops reading the NOTIFY queue, and PostgreSQL cannot
/// truncate the queue past the slowest listener, so the queue grows for the
/// whole server; when it is full (8 GB) every `pg_notify`, hence every send,
/// fails (PostgreSQL docs, "NOTIFY"). A backend that is already gone (the
/// usual case after a plain disconnect or a server restart) matches nothing.
/// Ending a backend of one's own role needs no privilege (PostgreSQL docs,
/// "Server Signaling Functions").
async fn end_abandoned(client: &tokio_postgres::Client, old: Backend, limit: Duration) {
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&old.pid, &old.started];
    let end = client.query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE pid = $1 AND (extract(epoch FROM backend_start) * 1000000)::int8 = $2",
        &params,
    );
    match tokio::time::timeout(limit, end).await {
        Ok(Ok(rows)) if !rows.is_empty() => {
            tracing::info!(
                pid = old.pid,
                "ended the abandoned LISTEN connection's server backend"
            );
        }
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            tracing::warn!(error = %e, pid = old.pid, "cannot end the abandoned LISTEN backend");
        }
        Err(_) => tracing::warn!(
            pid = old.pid,
            "ending the abandoned LISTEN backend timed out"
        ),
    }
}

impl Listener {
    /// Builds the listener; nothing connects yet. `listening` is kept true
    /// while LISTEN is established (for health checks).
    pub fn new(
        config: tokio_postgres::Config,
        hub: Arc<Hub>,
        settings: ListenerSettings,
        shutdown: CancellationToken,
        listening: Arc<AtomicBool>,
    ) -> Self {
        Self {
            config,
            hub,
            settings,
            shutdown,
            listening,
            epoch: AtomicU64::new(0),
        }
    }

    /// Connects and issues `LISTEN`.
    pub async fn listen(&self) -> Result<Listening, ListenError> {
        let (client, mut connection) = self.config.connect(NoTls).await?;
        let (tx, notifications) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut messages = stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(message) = messages.next().await {
                match message {
                    Ok(AsyncMessage::Notification(n)) => {
                        if tx.send(n).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "LISTEN connection failed");
                        return;
                    }
                }
            }
        });
        // LISTEN, and learn which server backend serves this session (to
        // end it if the session is ever abandoned), in one round trip.
        let replies = client
            .simple_query(&format!("LISTEN {CHANNEL}; {WHO_AM_I}"))
            .await?;
        // The epoch is read after LISTEN is established: whatever a stream
        // reads from the store from now on is stamped with it, and so is
        // every NOTIFY this session routes.
        self.epoch
            .store(postgres::epoch(&client).await?, Ordering::Release);
        let backend = replies.iter().find_map(|m| match m {
            SimpleQueryMessage::Row(row) => Some(Backend {
                pid: row.get(0)?.parse().ok()?,
                started: row.get(1)?.parse().ok()?,
            }),
            _ => None,
        });
        Ok(Listening {
            client,
            notifications,
            backend,
        })
    }

    /// Serves `first` (an established session), then reconnects on every
    /// failure with exponential backoff and jitter, until shutdown.
    pub async fn run(self, first: Listening) {
        let mut session = Some(first);
        let mut attempt = None;
        let mut abandoned: Option<Backend> = None;
        loop {
            if let Some(listening) = session.take() {
                if let Some(old) = abandoned.take() {
                    end_abandoned(&listening.client, old, self.settings.ping_timeout).await;
                }
                self.listening.store(true, Ordering::Release);
                // Whatever committed while we were not listening (or before
                // streams registered) is read from the store.
                self.hub.signal_all();
                attempt = None;
                let backend = listening.backend;
                let result = self.serve(listening).await;
                self.listening.store(false, Ordering::Release);
                match result {
                    Ok(()) => return,
                    Err(e) => {
                        tracing::warn!(error = %e, "LISTEN connection lost; reconnecting");
                        abandoned = backend;
                    }
                }
            }
            let delay = attempt
                .get_or_insert_with(|| {
                    ExponentialBuilder::default()
                        .with_min_delay(Duration::from_millis(50))
                        .with_max_delay(Duration::from_secs(5))
                        .with_jitter()
                        .without_max_times()
                        .build()
                })
                .next()
                .unwrap_or(Duration::from_secs(5));
            tokio::select! {
                () = self.shutdown.cancelled() => return,
                () = tokio::time::sleep(delay) => {}
            }
            match self.listen().await {
                Ok(listening) => {
                    metrics::counter!(names::LISTENER_RECONNECTS).increment(1);
                    tracing::info!("LISTEN connection re-established; streams catch up");
                    session = Some(listening);
                }
                Err(e) => tracing::warn!(error = %e, ?delay, "LISTEN reconnect failed"),
            }
        }
    }

    /// Routes notifications until the connection fails or shutdown.
    async fn serve(&self, listening: Listening) -> Result<(), ListenError> {
        let Listening {
            client,
            mut notifications,
            ..
        } = listening;
        let timeout = self.settings.ping_timeout;
        let mut probes = tokio::time::interval(self.settings.ping_interval);
        probes.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The probe in flight: its nonce and when the connection counts as
        // deaf if nothing at all arrives before.
        let mut pending: Option<(u64, Instant)> = None;
        // Sending the probe runs beside routing: under load its NOTIFY
        // waits for the commit lock like any other, and routing must go on.
        let mut sending: Option<ProbeSend<'_>> = None;
        let mut nonce: u64 = std::process::id().into();
        loop {
            let deadline = pending.map(|(_, d)| d);
            tokio::select! {
                () = self.shutdown.cancelled() => return Ok(()),
                n = notifications.recv() => {
                    let n = n.ok_or(ListenError::Closed)?;
                    // Anything heard proves the connection hears.
                    if let Some((_, deadline)) = &mut pending {
                        *deadline = Instant::now() + timeout;
                    }
                    if let Ok(Payload::Ping { n }) = serde_json::from_str::<Payload>(n.payload()) {
                        if pending.is_some_and(|(want, _)| want == n) {
                            pending = None;
                        }
                        continue;
                    }
                    route(&self.hub, self.epoch.load(Ordering::Acquire), n.payload());
                }
                () = sleep_until_opt(deadline) => return Err(ListenError::Deaf(timeout)),
                sent = poll_opt(&mut sending) => {
                    sending = None;
                    sent?;
                }
                _ = probes.tick(), if pending.is_none() && sending.is_none() => {
                    nonce = nonce.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    let payload = serde_json::to_string(&Payload::Ping { n: nonce }).unwrap_or_default();
                    pending = Some((nonce, Instant::now() + timeout));
                    let client = &client;
                    sending = Some(Box::pin(async move {
                        client.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &payload]).await
                    }));
                }
            }
        }
    }
}

/// A liveness probe's `pg_notify` in flight.
type ProbeSend<'a> = Pin<Box<dyn Future<Output = Result<u64, tokio_postgres::Error>> + Send + 'a>>;

/// Awaits the future in `slot`, or forever when there is none.
async fn poll_opt<F: Future + Unpin>(slot: &mut Option<F>) -> F::Output {
    match slot {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn notification(recipients: usize, body: usize) -> Payload {
        Payload::Notification {
            t: "acme".into(),
            e: 1,
            ty: "demo".into(),
            ti: "hi".into(),
            b: "x".repeat(body),
            d: "{}".into(),
            at: 1,
            p: Presentation::default(),
            rk: String::new(),
            gk: String::new(),
            x: None,
            r: (0..recipients)
                .map(|i| (format!("user-{i}"), i as u64 + 1, i as i64 + 1))
                .collect(),
        }
    }

    fn recipients_of(payloads: &[String]) -> Vec<(String, u64)> {
        payloads
            .iter()
            .flat_map(|p| match serde_json::from_str::<Payload>(p).unwrap() {
                Payload::Notification { r, .. } => r.into_iter().map(|(u, s, _)| (u, s)).collect(),
                Payload::Wake { r, .. } => r,
                other => panic!("unexpected {other:?}"),
            })
            .collect()
    }

    #[test]
    fn payloads_fit_and_keep_every_recipient() {
        for (recipients, body) in [
            (1, 10),
            (1_000, 10),
            (3, 7_000),
            (1, 20_000),
            (2_000, 5_000),
        ] {
            let payloads = notification(recipients, body).encode();
            assert!(payloads.iter().all(|p| p.len() <= MAX_PAYLOAD_BYTES));
            let got = recipients_of(&payloads);
            let want: Vec<_> = (0..recipients)
                .map(|i| (format!("user-{i}"), i as u64 + 1))
                .collect();
            assert_eq!(got, want, "recipients={recipients} body={body}");
        }
    }

    #[test]
    fn pack_joins_small_payloads_and_keeps_order() {
        let many: Vec<Payload> = (0..500).map(|_| notification(1, 50)).collect();
        let texts = pack(many);
        assert!(texts.len() > 1 && texts.len() < 50, "{} texts", texts.len());
        assert!(texts.iter().all(|t| t.len() <= MAX_PAYLOAD_BYTES));
        let decoded: Vec<Payload> = texts
            .iter()
            .flat_map(|t| match serde_json::from_str::<Vec<Payload>>(t) {
                Ok(v) => v,
                Err(_) => vec![serde_json::from_str::<Payload>(t).unwrap()],
            })
            .collect();
        assert_eq!(decoded.len(), 500);
        assert_eq!(pack([notification(1, 10)]).len(), 1);
        assert!(!pack([notification(1, 10)])[0].starts_with('['));
        assert!(pack([]).is_empty());
    }

    #[test]
    fn unreadable_payload_makes_every_stream_catch_up() {
        let hub = Hub::new(crate::hub::StreamLimits::default());
        let mut sub = hub.subscribe(StreamKey::user("acme", "alice")).unwrap();
        route(&hub, 1, "not json");
        assert!(matches!(
            futures_util::FutureExt::now_or_never(sub.next()),
            Some(crate::hub::Next::CatchUp)
        ));
    }
}
