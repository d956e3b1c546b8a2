//! The LISTEN loop: one dedicated PostgreSQL connection per replica that
//! receives every committed event as a NOTIFY and routes it to the hub.
//!
//! A NOTIFY is delivered only if its transaction commits (PostgreSQL docs,
//! "NOTIFY"), so nothing uncommitted reaches a stream. The connection can be
//! lost, or silently deafened by a half-open socket; the loop guards against
//! both: TCP keepalive, plus a periodic NOTIFY to itself that must come back
//! within a timeout. On any failure it reconnects with exponential backoff
//! and, once listening again, tells every local stream to catch up from the
//! store, so events committed while it was deaf are not lost.
//!
//! The payload format ([`Payload`]) is shared with the Postgres store, which
//! writes it. A NOTIFY carries one payload or a JSON array of them (a
//! group-committed batch), and must stay under 8000 bytes (PostgreSQL docs,
//! "NOTIFY"): events that do not fit are sent as a *wake-up* naming only the
//! user and seq, and the user's streams read them from the store.

use std::{
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

use crate::{
    hub::Hub,
    notification::{Epoch, EventBody, Notification, ReadChange, StreamEvent},
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "k")]
pub enum Payload {
    /// One notification stored for several recipients.
    #[serde(rename = "n")]
    Notification {
        /// Tenant.
        t: String,
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
        /// Recipients: (user, seq, notification id).
        r: Vec<(String, u64, i64)>,
    },
    /// A read-state change of one user.
    #[serde(rename = "r")]
    Read {
        /// Tenant.
        t: String,
        /// User.
        u: String,
        /// Seq of the read event.
        s: u64,
        /// Ids marked read.
        ids: Vec<i64>,
        /// Marked read up to this seq (0: none).
        up: u64,
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

impl Payload {
    /// Splits `self` into JSON payloads of at most [`MAX_PAYLOAD_BYTES`]:
    /// recipients are chunked, and what cannot fit even alone becomes
    /// [`Payload::Wake`]s.
    pub fn encode(self) -> Vec<String> {
        let json = |p: &Payload| serde_json::to_string(p).unwrap_or_default();
        let whole = json(&self);
        if whole.len() <= MAX_PAYLOAD_BYTES {
            return vec![whole];
        }
        match self {
            Payload::Notification {
                t,
                ty,
                ti,
                b,
                d,
                at,
                r,
            } => {
                let one = Payload::Notification {
                    t: t.clone(),
                    ty: ty.clone(),
                    ti: ti.clone(),
                    b: b.clone(),
                    d: d.clone(),
                    at,
                    r: Vec::new(),
                };
                let base = json(&one).len();
                // Generous per-recipient estimate, checked below.
                let widest = r.iter().map(|(u, _, _)| u.len() + 48).max().unwrap_or(48);
                if base + widest > MAX_PAYLOAD_BYTES {
                    return wake(t, r.into_iter().map(|(u, s, _)| (u, s)).collect());
                }
                let per = ((MAX_PAYLOAD_BYTES - base) / widest).max(1);
                r.chunks(per)
                    .map(|chunk| {
                        json(&Payload::Notification {
                            t: t.clone(),
                            ty: ty.clone(),
                            ti: ti.clone(),
                            b: b.clone(),
                            d: d.clone(),
                            at,
                            r: chunk.to_vec(),
                        })
                    })
                    .collect()
            }
            Payload::Read { t, u, s, .. } => wake(t, vec![(u, s)]),
            Payload::Wake { t, r } => wake(t, r),
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

/// Wake-up payloads for `r`, chunked to fit.
fn wake(t: String, r: Vec<(String, u64)>) -> Vec<String> {
    // A user id is at most 128 bytes; JSON escaping can grow it up to 6×.
    let per = (MAX_PAYLOAD_BYTES - 64 - t.len() * 6) / (128 * 6 + 24);
    r.chunks(per.max(1))
        .map(|chunk| {
            serde_json::to_string(&Payload::Wake {
                t: t.clone(),
                r: chunk.to_vec(),
            })
            .unwrap_or_default()
        })
        .collect()
}

fn micros_to_time(at: i64) -> std::time::SystemTime {
    let at = Duration::from_micros(u64::try_from(at).unwrap_or(0));
    std::time::UNIX_EPOCH + at
}

/// Routes one NOTIFY text (a payload or an array of them) to the hub,
/// stamping events with `epoch`, the database's current one. Events go only
/// to users with streams on this replica, and are built once per recipient.
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

fn route_one(hub: &Hub, epoch: Epoch, payload: Payload) {
    match payload {
        Payload::Notification {
            t,
            ty,
            ti,
            b,
            d,
            at,
            r,
        } => {
            let created_at = micros_to_time(at);
            // For several recipients, the fields they share are encoded
            // once, here, and only if some recipient has a stream here. A
            // single recipient's event is left to be encoded by the first
            // stream that sends it (`StreamEvent::encoded`): this loop is one
            // task per replica, and encoding in it serialized work that the
            // streams' tasks do in parallel (~15% less throughput measured).
            let share = r.len() > 1;
            let mut shared = None;
            for (user, seq, id) in r {
                if !hub.has_streams(&t, &user) {
                    continue;
                }
                let body = EventBody::Notification(Notification {
                    id,
                    seq,
                    recipient: user.clone(),
                    kind: ty.clone(),
                    title: ti.clone(),
                    body: b.clone(),
                    data: d.clone(),
                    created_at,
                    read: false,
                });
                let event = if share {
                    let shared = shared
                        .get_or_insert_with(|| wire::shared_fields(&ty, &ti, &b, &d, created_at));
                    let encoded = wire::notification_event(seq, epoch, id, &user, shared);
                    StreamEvent::with_encoding(seq, epoch, body, encoded)
                } else {
                    StreamEvent::new(seq, epoch, body)
                };
                hub.publish(&t, &user, &Arc::new(event));
            }
        }
        Payload::Read { t, u, s, ids, up } => {
            let event = Arc::new(StreamEvent::new(
                s,
                epoch,
                EventBody::Read(ReadChange { ids, up_to_seq: up }),
            ));
            hub.publish(&t, &u, &event);
        }
        Payload::Wake { t, r } => {
            for (user, _) in r {
                hub.signal_user(&t, &user);
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
    async fn serve(&self, mut listening: Listening) -> Result<(), ListenError> {
        let mut probes = tokio::time::interval(self.settings.ping_interval);
        probes.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut pending: Option<(u64, Instant)> = None;
        let mut nonce: u64 = std::process::id().into();
        loop {
            let deadline = pending.map(|(_, d)| d);
            tokio::select! {
                () = self.shutdown.cancelled() => return Ok(()),
                n = listening.notifications.recv() => {
                    let n = n.ok_or(ListenError::Closed)?;
                    if let (Some((want, _)), Ok(Payload::Ping { n })) =
                        (pending, serde_json::from_str::<Payload>(n.payload()))
                    {
                        if n == want {
                            pending = None;
                        }
                        continue;
                    }
                    route(&self.hub, self.epoch.load(Ordering::Acquire), n.payload());
                }
                () = sleep_until_opt(deadline) => {
                    return Err(ListenError::Deaf(self.settings.ping_timeout));
                }
                _ = probes.tick(), if pending.is_none() => {
                    nonce = nonce.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    let payload = serde_json::to_string(&Payload::Ping { n: nonce }).unwrap_or_default();
                    pending = Some((nonce, Instant::now() + self.settings.ping_timeout));
                    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&CHANNEL, &payload];
                    let probe = listening.client.execute("SELECT pg_notify($1, $2)", &params);
                    match tokio::time::timeout(self.settings.ping_timeout, probe).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => return Err(e.into()),
                        Err(_) => return Err(ListenError::Deaf(self.settings.ping_timeout)),
                    }
                }
            }
        }
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
            ty: "demo".into(),
            ti: "hi".into(),
            b: "x".repeat(body),
            d: "{}".into(),
            at: 1,
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
        let mut sub = hub.subscribe("acme", "alice").unwrap();
        route(&hub, 1, "not json");
        assert!(matches!(
            futures_util::FutureExt::now_or_never(sub.next()),
            Some(crate::hub::Next::CatchUp)
        ));
    }
}
