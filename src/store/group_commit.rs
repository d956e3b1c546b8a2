//! Group commit for sends: concurrent `SendNotification`s are gathered by a
//! few writer tasks and stored in ONE transaction with ONE `pg_notify` round
//! trip, each caller answered only after that commit.
//!
//! Why: a transaction that has called NOTIFY takes a database-wide lock from
//! its commit until it finishes (PostgreSQL docs, "NOTIFY"), so notifying
//! transactions cannot share a WAL flush; one transaction per send caps a
//! whole database at a few thousand sends per second. Batching amortizes
//! the lock and the flush over every send in the batch.
//!
//! Latency: a writer takes the first waiting send and whatever else is
//! already queued, and commits at once: with no contention a send is
//! committed alone, with no added wait. Batches grow by themselves while a
//! commit is in flight. An optional window lets a writer linger for more
//! sends, but only when it already found others waiting.
//!
//! Correctness: every recipient's `last_seq` is bumped by its number of
//! notifications in the batch in one statement, rows locked in
//! (tenant, user) order, so seqs stay gap-free and in commit order and
//! concurrent batches cannot deadlock; idempotency keys are claimed first, in
//! key order, for the same reason. When a batch fails as a whole, each send
//! in it is retried in halves, so each caller gets its own outcome.

use std::{
    collections::{HashMap, HashSet},
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use deadpool_postgres::Pool;
use tokio::{
    sync::{Mutex, mpsc, oneshot},
    time::{Instant, timeout_at},
};

use super::{
    StoreError, StoreResult,
    log::{self, Append, NewContent, NewEvent, Pipeline},
    postgres::{pg_error, pool_error, replay_idempotent, set_statement_timeout},
};
use crate::{
    bus::{Bus, Committed},
    jobs::Jobs,
    notification::{Delivery, EventBody, NewNotification, SendLimits, Sent},
    proto,
};

/// Most recipient rows in one batch, whatever the number of sends.
pub const MAX_BATCH_ROWS: usize = 10_000;

/// How sends are grouped.
#[derive(Debug, Clone, Copy)]
pub struct GroupCommitSettings {
    /// Writer tasks (each commits one batch at a time, on its own pooled
    /// connection).
    pub writers: usize,
    /// Most sends in one batch.
    pub max_sends: usize,
    /// How long a writer that found several sends waiting lingers for more;
    /// zero: never.
    pub window: Duration,
}

impl Default for GroupCommitSettings {
    fn default() -> Self {
        Self {
            writers: 2,
            max_sends: 256,
            window: Duration::ZERO,
        }
    }
}

struct Job {
    tenant: String,
    sender: String,
    n: NewNotification,
    reply: oneshot::Sender<StoreResult<Sent>>,
}

/// The handle sends go through; writers stop when it is dropped.
#[derive(Debug, Clone)]
pub struct GroupCommit {
    jobs: mpsc::Sender<Job>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("tenant", &self.tenant)
            .finish_non_exhaustive()
    }
}

impl GroupCommit {
    /// Starts `settings.writers` writer tasks on `pool`, tracked as
    /// `background` jobs (each returns once every handle is dropped and
    /// the queue is drained); each statement of a batch's transaction is
    /// bounded by `statement_timeout` (see `PgSettings::statement_timeout`).
    pub fn spawn(
        pool: Pool,
        bus: Arc<dyn Bus>,
        settings: GroupCommitSettings,
        statement_timeout: Option<Duration>,
        background: &Jobs,
    ) -> Self {
        let max_sends = settings.max_sends.max(1);
        let (jobs, rx) = mpsc::channel(max_sends * 8);
        let rx = Arc::new(Mutex::new(rx));
        for _ in 0..settings.writers.max(1) {
            background.spawn(
                "group-commit writer",
                writer(
                    pool.clone(),
                    bus.clone(),
                    rx.clone(),
                    max_sends,
                    settings.window,
                    statement_timeout,
                ),
            );
        }
        Self { jobs }
    }

    /// Stores `n` for its recipients as part of the next batch; returns
    /// once that batch committed (or this send failed on its own).
    pub async fn send(&self, tenant: &str, sender: &str, n: &NewNotification) -> StoreResult<Sent> {
        let (reply, outcome) = oneshot::channel();
        let job = Job {
            tenant: tenant.to_owned(),
            sender: sender.to_owned(),
            n: n.clone(),
            reply,
        };
        self.jobs
            .send(job)
            .await
            .map_err(|_| StoreError::unavailable("the store is shutting down"))?;
        outcome
            .await
            .map_err(|_| StoreError::internal("group commit writer stopped"))?
    }
}

async fn writer(
    pool: Pool,
    bus: Arc<dyn Bus>,
    rx: Arc<Mutex<mpsc::Receiver<Job>>>,
    max_sends: usize,
    window: Duration,
    statement_timeout: Option<Duration>,
) {
    loop {
        let mut batch = {
            let mut rx = rx.lock().await;
            let Some(first) = rx.recv().await else {
                return;
            };
            let mut rows = first.n.recipients.len();
            let mut batch = vec![first];
            let full =
                |batch: &Vec<Job>, rows: usize| batch.len() >= max_sends || rows >= MAX_BATCH_ROWS;
            while !full(&batch, rows) {
                match rx.try_recv() {
                    Ok(job) => {
                        rows += job.n.recipients.len();
                        batch.push(job);
                    }
                    Err(_) => break,
                }
            }
            if batch.len() > 1 && !window.is_zero() {
                let deadline = Instant::now() + window;
                while !full(&batch, rows) {
                    match timeout_at(deadline, rx.recv()).await {
                        Ok(Some(job)) => {
                            rows += job.n.recipients.len();
                            batch.push(job);
                        }
                        _ => break,
                    }
                }
            }
            batch
        };
        // A caller that is gone (its deadline passed or it disconnected
        // while its send waited in the queue, e.g. behind batches stuck in
        // a stalled database) was already answered with an error: storing
        // its send now would deliver a notification the caller believes
        // failed — and will likely send again. Skip it; it costs nothing.
        // (Once its transaction has started, a send is committed or not
        // whatever the caller does; that ambiguity is what idempotency keys
        // are for.)
        batch.retain(|job| !job.reply.is_closed());
        if !batch.is_empty() {
            commit(&pool, bus.as_ref(), batch, statement_timeout).await;
        }
    }
}

/// Commits `batch`, replying to every job. When the batch fails as a whole
/// with anything but `Unavailable`, it is split in halves and each retried
/// the same way, so a send that cannot be stored fails alone while its
/// batch-mates succeed, in O(log n) extra transactions. `Unavailable` (the
/// database is down) is answered to every job at once: the halves would
/// fail too, and callers retry.
fn commit<'a>(
    pool: &'a Pool,
    bus: &'a dyn Bus,
    mut batch: Vec<Job>,
    statement_timeout: Option<Duration>,
) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
    Box::pin(async move {
        match try_commit(pool, bus, &batch, statement_timeout).await {
            Ok(outcomes) => {
                for (job, outcome) in batch.into_iter().zip(outcomes) {
                    let _ = job.reply.send(outcome);
                }
            }
            Err(e) if batch.len() > 1 && !matches!(e, StoreError::Unavailable(_)) => {
                tracing::warn!(error = %e, sends = batch.len(), "batch failed; retrying its halves");
                let second = batch.split_off(batch.len() / 2);
                commit(pool, bus, batch, statement_timeout).await;
                commit(pool, bus, second, statement_timeout).await;
            }
            Err(e) => {
                for job in batch {
                    let _ = job.reply.send(Err(e.clone()));
                }
            }
        }
    })
}

const CLAIM_KEYS: &str = "INSERT INTO idempotency_keys (tenant, sender, key, request) \
     SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]) \
     ON CONFLICT DO NOTHING RETURNING tenant, sender, key";

const SAVE_RESPONSES: &str = "UPDATE idempotency_keys AS i SET response = x.r::jsonb \
     FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]) AS x(t, s, k, r) \
     WHERE i.tenant = x.t AND i.sender = x.s AND i.key = x.k";

type IdemKey<'a> = (&'a str, &'a str, &'a str);

fn idem_key(job: &Job) -> Option<IdemKey<'_>> {
    job.n
        .idempotency_key
        .as_deref()
        .map(|k| (job.tenant.as_str(), job.sender.as_str(), k))
}

/// One transaction for `jobs`. `Ok` holds one outcome per job; `Err` means
/// nothing was committed.
///
/// Two round trips (three when a job has an idempotency key): `BEGIN`
/// (with the statement timeout) goes in one pipeline with the first
/// statement, and `COMMIT` in one with the rows and the bus message (see
/// [`write_batch`]). A transaction begun by hand is
/// not `tokio_postgres::Transaction`, which would roll back on drop, so the
/// connection is guarded by [`Begun`].
async fn try_commit(
    pool: &Pool,
    bus: &dyn Bus,
    jobs: &[Job],
    statement_timeout: Option<Duration>,
) -> StoreResult<Vec<StoreResult<Sent>>> {
    let mut begun = Begun(Some(pool.get().await.map_err(pool_error)?));
    let client = begun.client()?;
    let begin = match statement_timeout {
        Some(t) => format!("BEGIN; {}", set_statement_timeout(t)),
        None => "BEGIN".to_owned(),
    };
    let ended = AtomicBool::new(false);
    // `biased`: BEGIN is polled, so sent, before the batch's first
    // statement. A failed BEGIN fails every statement after it on this
    // connection (only a broken connection makes it fail).
    let (began, written) = tokio::join!(
        biased;
        client.batch_execute(&begin),
        write_batch(client, bus, jobs, &ended),
    );
    // Over once COMMIT was answered; otherwise roll back by hand, and if
    // even that fails, dropping `begun` closes the connection.
    if ended.load(Ordering::Acquire)
        || (began.is_ok() && client.batch_execute("ROLLBACK").await.is_ok())
    {
        begun.release();
    }
    drop(begun);
    began.map_err(pg_error)?;
    let (writes, mut deliveries, fingerprints) = written?;

    // 5. Answer the jobs that wrote nothing from their key's stored result.
    let mut outcomes = Vec::with_capacity(jobs.len());
    for (i, job) in jobs.iter().enumerate() {
        if writes[i] {
            outcomes.push(Ok(Sent {
                deliveries: std::mem::take(&mut deliveries[i]),
                replayed: false,
                scheduled: job.n.deliver_at.is_some(),
            }));
        } else {
            let (t, s, k) = idem_key(job).unwrap_or_default();
            let fingerprint = fingerprints.get(&i).map_or("", String::as_str);
            outcomes.push(replay_idempotent(pool, t, s, k, fingerprint).await);
        }
    }
    Ok(outcomes)
}

/// A pooled connection with a transaction begun on it by hand. Dropped
/// before [`Begun::release`] (the transaction may still be open: an error
/// left it so, or the future was cancelled), it closes the connection
/// instead of returning it to the pool, so no open transaction is handed to
/// another caller; the server then rolls it back.
struct Begun(Option<deadpool_postgres::Client>);

impl Begun {
    fn client(&self) -> StoreResult<&deadpool_postgres::Client> {
        self.0
            .as_ref()
            .ok_or_else(|| StoreError::internal("connection already released"))
    }

    /// The transaction is over: the connection goes back to the pool.
    fn release(&mut self) {
        self.0.take();
    }
}

impl Drop for Begun {
    fn drop(&mut self) {
        if let Some(client) = self.0.take() {
            drop(deadpool_postgres::Object::take(client));
        }
    }
}

/// What [`write_batch`] did: per job, whether it wrote (false: its key was
/// used before), its deliveries, and the fingerprints of keyed jobs.
type Written = (Vec<bool>, Vec<Vec<Delivery>>, HashMap<usize, String>);

/// Steps 1 to 4 of a batch, in the transaction begun on `tx`: claim
/// idempotency keys, append every writing job's notifications, remember the
/// keyed responses, commit. The rows, the bus message, the responses and
/// `COMMIT` go as one pipeline; `ended` is set once `COMMIT` was answered
/// (the transaction is then over: committed, or rolled back if a statement
/// before it failed).
async fn write_batch(
    tx: &deadpool_postgres::Client,
    bus: &dyn Bus,
    jobs: &[Job],
    ended: &AtomicBool,
) -> StoreResult<Written> {
    // 1. Claim idempotency keys, in key order. A job whose key is already
    //    stored (or claimed by an earlier job of this batch) writes nothing
    //    and is answered from the stored result after the commit.
    let mut writes = vec![true; jobs.len()];
    let mut keyed: Vec<usize> = (0..jobs.len())
        .filter(|&i| jobs[i].n.idempotency_key.is_some())
        .collect();
    keyed.sort_by_key(|&i| idem_key(&jobs[i]));
    let fingerprints: HashMap<usize, String> = keyed
        .iter()
        .map(|&i| (i, jobs[i].n.fingerprint(&jobs[i].sender)))
        .collect();
    if !keyed.is_empty() {
        let mut first_of_key = Vec::new();
        for (pos, &i) in keyed.iter().enumerate() {
            if pos > 0 && idem_key(&jobs[keyed[pos - 1]]) == idem_key(&jobs[i]) {
                writes[i] = false;
            } else {
                first_of_key.push(i);
            }
        }
        let column = |f: fn(&Job) -> &str| {
            first_of_key
                .iter()
                .map(|&i| f(&jobs[i]))
                .collect::<Vec<_>>()
        };
        let tenants = column(|j| j.tenant.as_str());
        let senders = column(|j| j.sender.as_str());
        let keys = column(|j| j.n.idempotency_key.as_deref().unwrap_or_default());
        let requests: Vec<&str> = first_of_key
            .iter()
            .map(|i| fingerprints[i].as_str())
            .collect();
        let stmt = tx.prepare_cached(CLAIM_KEYS).await.map_err(pg_error)?;
        let claimed = tx
            .query(&stmt, &[&tenants, &senders, &keys, &requests])
            .await
            .map_err(pg_error)?;
        let claimed: HashSet<(String, String, String)> = claimed
            .iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
            .collect::<Result<_, tokio_postgres::Error>>()
            .map_err(pg_error)?;
        for &i in &first_of_key {
            let (t, s, k) = idem_key(&jobs[i]).unwrap_or_default();
            writes[i] = claimed.contains(&(t.to_owned(), s.to_owned(), k.to_owned()));
        }
    }

    // 2. Each send's content once, then one notification per recipient
    //    appended to the recipients' streams (and staged on the bus);
    //    scheduled sends (`deliver_at`) are stored for the scheduler
    //    instead.
    let (scheduled, writing): (Vec<usize>, Vec<usize>) = (0..jobs.len())
        .filter(|&i| writes[i])
        .partition(|&i| jobs[i].n.deliver_at.is_some());
    let mut deliveries: Vec<Vec<Delivery>> = jobs
        .iter()
        .map(|j| Vec::with_capacity(j.n.recipients.len()))
        .collect();
    let sends: Vec<(&str, &NewNotification)> = writing
        .iter()
        .map(|&i| (jobs[i].tenant.as_str(), &jobs[i].n))
        .collect();
    let (contents, appends) = contents_and_appends(&sends);
    let appending = log::take(tx, bus, &contents, &appends).await?;
    for (&i, d) in writing
        .iter()
        .zip(deliveries_of(&sends, appending.committed())?)
    {
        deliveries[i] = d;
    }
    let schedule = Schedule::of(scheduled.iter().map(|&i| &jobs[i]))?;

    // 3. The responses to remember under their keys.
    let saving: Vec<usize> = writing
        .iter()
        .chain(&scheduled)
        .copied()
        .filter(|&i| jobs[i].n.idempotency_key.is_some())
        .collect();
    let tenants: Vec<&str> = saving.iter().map(|&i| jobs[i].tenant.as_str()).collect();
    let senders: Vec<&str> = saving.iter().map(|&i| jobs[i].sender.as_str()).collect();
    let keys: Vec<&str> = saving
        .iter()
        .map(|&i| jobs[i].n.idempotency_key.as_deref().unwrap_or_default())
        .collect();
    let responses = saving
        .iter()
        .map(|&i| match jobs[i].n.deliver_at {
            Some(_) => Ok(SCHEDULED_RESPONSE.to_owned()),
            None => serde_json::to_string(&deliveries[i]),
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(StoreError::internal)?;

    // 4. The rows, the bus message, the scheduled sends, the responses and
    //    COMMIT: one round trip.
    let mut pipeline = Pipeline::default();
    appending.push_writes(&mut pipeline);
    schedule.push_writes(&mut pipeline);
    if !saving.is_empty() {
        pipeline.push(SAVE_RESPONSES, vec![&tenants, &senders, &keys, &responses]);
    }
    pipeline.push("COMMIT", Vec::new());
    let outcomes = pipeline.run(tx).await;
    if matches!(outcomes.last(), Some(Ok(()))) {
        ended.store(true, Ordering::Release);
    }
    for outcome in outcomes {
        outcome?;
    }

    Ok((writes, deliveries, fingerprints))
}

/// What an idempotency key stores for a scheduled send until it is
/// delivered (then its deliveries, as for any send).
pub(super) const SCHEDULED_RESPONSE: &str = r#"{"scheduled":true}"#;

/// The contents and appends of `sends` ((tenant, send)): each send's content
/// once, then one notification per recipient, in order.
fn contents_and_appends<'a>(
    sends: &'a [(&'a str, &'a NewNotification)],
) -> (Vec<NewContent<'a>>, Vec<Append<'a>>) {
    let contents = sends
        .iter()
        .map(|(_, n)| NewContent {
            kind: n.kind.as_str(),
            title: &n.title,
            body: &n.body,
            data: &n.data,
            presentation: &n.presentation,
            fold: n.fold.as_ref(),
            renotify: n.renotify,
            expires_at: n.expires_at,
        })
        .collect();
    let mut appends = Vec::new();
    for (c, (tenant, n)) in sends.iter().enumerate() {
        appends.extend(n.recipients.iter().map(|user| Append {
            tenant,
            user: user.as_str(),
            event: NewEvent::Notification(c),
        }));
    }
    (contents, appends)
}

/// Each send's deliveries, from the events its append committed (in the
/// order [`contents_and_appends`] gave them).
fn deliveries_of(
    sends: &[(&str, &NewNotification)],
    committed: &[Committed],
) -> StoreResult<Vec<Vec<Delivery>>> {
    let mut committed = committed.iter();
    let mut out = Vec::with_capacity(sends.len());
    for (_, n) in sends {
        let mut deliveries = Vec::with_capacity(n.recipients.len());
        for user in &n.recipients {
            let c = committed
                .next()
                .ok_or_else(|| StoreError::internal("append returned too few events"))?;
            let (id, updated) = match &c.event.body {
                EventBody::Notification(n) => (n.id, false),
                EventBody::Updated(n) => (n.id, true),
                EventBody::State(_) => (0, false),
            };
            deliveries.push(Delivery {
                recipient: user.to_string(),
                notification_id: id,
                seq: c.event.seq,
                updated,
            });
        }
        out.push(deliveries);
    }
    Ok(out)
}

const INSERT_SCHEDULED: &str = "INSERT INTO scheduled_sends \
     (tenant, sender, idempotency_key, request, deliver_at) \
     SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bytea[], $5::timestamptz[])";

/// Scheduled sends of a batch, as the rows [`INSERT_SCHEDULED`] stores.
struct Schedule<'a> {
    tenants: Vec<&'a str>,
    senders: Vec<&'a str>,
    keys: Vec<Option<&'a str>>,
    requests: Vec<Vec<u8>>,
    due: Vec<std::time::SystemTime>,
}

impl<'a> Schedule<'a> {
    fn of(jobs: impl Iterator<Item = &'a Job>) -> StoreResult<Self> {
        let mut s = Schedule {
            tenants: Vec::new(),
            senders: Vec::new(),
            keys: Vec::new(),
            requests: Vec::new(),
            due: Vec::new(),
        };
        for job in jobs {
            let due = job
                .n
                .deliver_at
                .ok_or_else(|| StoreError::internal("a scheduled send without deliver_at"))?;
            s.tenants.push(&job.tenant);
            s.senders.push(&job.sender);
            s.keys.push(job.n.idempotency_key.as_deref());
            s.requests
                .push(prost::Message::encode_to_vec(&job.n.to_scheduled_request()));
            s.due.push(due);
        }
        Ok(s)
    }

    fn push_writes<'p>(&'p self, pipeline: &mut Pipeline<'p>) {
        if !self.tenants.is_empty() {
            pipeline.push(
                INSERT_SCHEDULED,
                vec![
                    &self.tenants,
                    &self.senders,
                    &self.keys,
                    &self.requests,
                    &self.due,
                ],
            );
        }
    }
}

/// Delivers the scheduled sends due by `now` (up to [`MAX_DUE_PER_RUN`]),
/// in one transaction: they are appended to their recipients' streams
/// exactly as a send is (folds included), their rows deleted, and keyed
/// ones' stored responses become their deliveries. Rows another replica
/// is delivering are skipped (`FOR UPDATE SKIP LOCKED`), so each is
/// delivered once. A send whose `expires_at` has passed by then is dropped
/// undelivered. Returns how many sends were delivered or dropped (a run
/// holds at most [`MAX_BATCH_ROWS`] recipients, as a batch of sends does).
pub async fn deliver_due(
    pool: &Pool,
    bus: &dyn Bus,
    now: std::time::SystemTime,
    statement_timeout: Option<Duration>,
) -> StoreResult<usize> {
    let mut client = pool.get().await.map_err(pool_error)?;
    let tx = client.transaction().await.map_err(pg_error)?;
    if let Some(t) = statement_timeout {
        tx.batch_execute(&set_statement_timeout(t))
            .await
            .map_err(pg_error)?;
    }
    let stmt = tx
        .prepare_cached(
            "SELECT id, tenant, sender, idempotency_key, request FROM scheduled_sends \
             WHERE deliver_at <= $1 ORDER BY deliver_at, id LIMIT $2 FOR UPDATE SKIP LOCKED",
        )
        .await
        .map_err(pg_error)?;
    let rows = tx
        .query(&stmt, &[&now, &MAX_DUE_PER_RUN])
        .await
        .map_err(pg_error)?;
    if rows.is_empty() {
        return Ok(0);
    }
    let mut ids = Vec::with_capacity(rows.len());
    let mut due: Vec<(String, String, Option<String>, NewNotification)> = Vec::new();
    let unbounded = SendLimits {
        max_recipients: usize::MAX,
        max_bulk_items: usize::MAX,
        max_body_bytes: usize::MAX,
        max_data_bytes: usize::MAX,
        max_data_depth: usize::MAX,
    };
    let mut recipients = 0;
    for row in &rows {
        let id: i64 = row.try_get(0).map_err(pg_error)?;
        let bytes: Vec<u8> = row.try_get(4).map_err(pg_error)?;
        let parsed = <proto::SendNotificationRequest as prost::Message>::decode(bytes.as_slice())
            .map_err(|e| e.to_string())
            .and_then(|r| NewNotification::parse(r, &unbounded).map_err(|e| e.to_string()));
        match parsed {
            Ok(n) if n.expires_at.is_some_and(|x| x <= now) => {
                tracing::info!(id, "a scheduled send expired before it was due; dropped");
            }
            // A transaction's rows are bounded as a batch's are; the rest
            // wait for the next run (still due, and unlocked at commit).
            Ok(n) if !due.is_empty() && recipients + n.recipients.len() > MAX_BATCH_ROWS => break,
            Ok(n) => {
                recipients += n.recipients.len();
                due.push((
                    row.try_get(1).map_err(pg_error)?,
                    row.try_get(2).map_err(pg_error)?,
                    row.try_get(3).map_err(pg_error)?,
                    n,
                ));
            }
            Err(e) => {
                tracing::warn!(id, error = %e, "a stored scheduled send does not parse; dropped")
            }
        }
        ids.push(id);
    }
    let sends: Vec<(&str, &NewNotification)> =
        due.iter().map(|(t, _, _, n)| (t.as_str(), n)).collect();
    let (contents, appends) = contents_and_appends(&sends);
    let appending = log::take(&tx, bus, &contents, &appends).await?;
    let deliveries = deliveries_of(&sends, appending.committed())?;
    let keyed: Vec<usize> = (0..due.len()).filter(|&i| due[i].2.is_some()).collect();
    let tenants: Vec<&str> = keyed.iter().map(|&i| due[i].0.as_str()).collect();
    let senders: Vec<&str> = keyed.iter().map(|&i| due[i].1.as_str()).collect();
    let keys: Vec<&str> = keyed
        .iter()
        .map(|&i| due[i].2.as_deref().unwrap_or_default())
        .collect();
    let responses = keyed
        .iter()
        .map(|&i| serde_json::to_string(&deliveries[i]))
        .collect::<Result<Vec<_>, _>>()
        .map_err(StoreError::internal)?;
    let mut pipeline = Pipeline::default();
    appending.push_writes(&mut pipeline);
    pipeline.push("DELETE FROM scheduled_sends WHERE id = ANY($1)", vec![&ids]);
    if !keyed.is_empty() {
        pipeline.push(SAVE_RESPONSES, vec![&tenants, &senders, &keys, &responses]);
    }
    for outcome in pipeline.run(&tx).await {
        outcome?;
    }
    tx.commit().await.map_err(pg_error)?;
    Ok(ids.len())
}

/// Most scheduled sends one [`deliver_due`] run delivers (one
/// transaction); the scheduler runs again at once while there are more.
pub const MAX_DUE_PER_RUN: i64 = 256;
