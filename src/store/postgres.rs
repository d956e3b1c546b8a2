//! The PostgreSQL store: production and multi-replica. A deadpool pool of
//! connections with cached prepared statements; each write is one short
//! transaction that appends to stream logs (`log.rs`: the user's next seq
//! under the `user_streams` row lock, the event's row) and stages the
//! events on the bus (`pg_notify` by default) — delivered to every
//! replica's hub only if the transaction commits.

use std::{
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime};
use tokio_postgres::{NoTls, error::SqlState};

use super::{
    Store, StoreError, StoreResult, UnreadCounts,
    group_commit::{GroupCommit, GroupCommitSettings},
    log::{self, Append, CURRENT, FilterColumns, NOTIFICATION_COLUMNS, NewEvent, notification},
};
use crate::{
    bus::{Bus, postgres::NotifyBus},
    clock::Clock,
    jobs::Jobs,
    notification::{
        Epoch, MAX_MARK_IDS, NewNotification, Notification, NotificationFilter, PageQuery, Sent,
        StateAction, StateChange, StateOutcome, StateRequest, StateTarget, StreamHead, StreamRange,
    },
    ticket::{TicketDigest, TicketGrant},
};

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// Key of the session advisory lock held while migrating, so replicas that
/// start together apply migrations once (PostgreSQL docs, "Advisory Locks").
pub const MIGRATION_LOCK_KEY: i64 = 0x6865_7261_6c64; // "herald"

/// Applies pending migrations from `migrations/` over a dedicated
/// connection, under [`MIGRATION_LOCK_KEY`]. Returns the names applied.
pub async fn migrate(url: &str) -> StoreResult<Vec<String>> {
    migrate_to(url, None).await
}

/// [`migrate`], stopping after migration `version` when given (`Some(1)`:
/// the v1 schema; for upgrade tests).
pub async fn migrate_to(url: &str, version: Option<i32>) -> StoreResult<Vec<String>> {
    let (mut client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .map_err(pg_error)?;
    let conn = tokio::spawn(connection);
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK_KEY])
        .await
        .map_err(pg_error)?;
    let mut runner = embedded::migrations::runner();
    if let Some(version) = version {
        runner = runner.set_target(refinery::Target::Version(version));
    }
    let report = runner
        .run_async(&mut client)
        .await
        .map_err(|e| StoreError::internal(format!("migration failed: {e}")));
    // The lock is released when the session ends anyway; unlock eagerly.
    let _ = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK_KEY])
        .await;
    drop(client);
    let _ = conn.await;
    Ok(report?
        .applied_migrations()
        .iter()
        .map(ToString::to_string)
        .collect())
}

/// What identifies the history this database holds: its cluster's
/// `system_identifier` (new for a cluster restored from a dump; PostgreSQL
/// docs, "System Information Functions", `pg_control_system`) and its
/// current WAL timeline (new after a point-in-time recovery or a standby's
/// promotion; docs, "Timelines"). NULL on a standby, which cannot write.
const CLUSTER_IDENTITY: &str = "SELECT CASE WHEN pg_is_in_recovery() THEN NULL \
     ELSE system_identifier::text || '/' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8) \
     END FROM pg_control_system()";

/// The database's current [`Epoch`], first making sure it was issued on
/// this cluster and timeline: when the database was restored (from a dump,
/// or to a point in time) or failed over, seqs after the restore point may
/// be issued again for other events, so a new epoch is drawn and every
/// client resuming from the old history gets `resync`. A promotion whose
/// standby had every commit changes the timeline too: clients then resync
/// once, needlessly but safely. Run at start-up and whenever the bus
/// reconnects (a failover drops every connection). Concurrent replicas agree
/// on one new epoch (the update is conditional on the old identity).
pub async fn epoch(client: &tokio_postgres::Client) -> StoreResult<Epoch> {
    let row = client
        .query_one("SELECT epoch, cluster FROM herald_meta", &[])
        .await
        .map_err(pg_error)?;
    let current: i64 = row.try_get(0).map_err(pg_error)?;
    let recorded: Option<String> = row.try_get(1).map_err(pg_error)?;
    let here: Option<String> = match client.query_one(CLUSTER_IDENTITY, &[]).await {
        Ok(row) => row.try_get(0).map_err(pg_error)?,
        Err(e) if e.code().is_some() => {
            // A managed service may refuse these functions: epochs then
            // change only when the memory store restarts.
            tracing::warn!(error = %e, "cannot read the cluster identity; epochs will not follow restores");
            None
        }
        Err(e) => return Err(pg_error(e)),
    };
    let Some(here) = here else {
        return Ok(seq(current));
    };
    if recorded.as_deref() == Some(here.as_str()) {
        return Ok(seq(current));
    }
    let updated = client
        .query_opt(
            "UPDATE herald_meta SET cluster = $1, epoch = CASE WHEN cluster IS NULL THEN epoch \
               ELSE floor(random() * 9007199254740990)::bigint + 1 END \
             WHERE cluster IS NOT DISTINCT FROM $2 RETURNING epoch",
            &[&here, &recorded],
        )
        .await
        .map_err(pg_error)?;
    let epoch = match updated {
        Some(row) => row.try_get(0).map_err(pg_error)?,
        // Another replica recorded this cluster first.
        None => client
            .query_one("SELECT epoch FROM herald_meta", &[])
            .await
            .map_err(pg_error)?
            .try_get(0)
            .map_err(pg_error)?,
    };
    if recorded.is_some() && epoch != current {
        tracing::warn!(
            was = ?recorded, now = %here, epoch,
            "the database was restored or failed over: new stream epoch; resuming clients resync"
        );
    }
    Ok(seq(epoch))
}

/// Classifies a database error: connection-level failures are retryable
/// (`Unavailable`), the rest `Internal`. SQLSTATE classes per the
/// PostgreSQL docs, Appendix A.
pub(super) fn pg_error(e: tokio_postgres::Error) -> StoreError {
    let retryable = e.is_closed()
        || match e.code() {
            None => true, // I/O error, timeout, connection refused
            Some(code) => {
                let c = code.code();
                c.starts_with("08") // connection exception
                    || c.starts_with("57P") // operator intervention (shutdown)
                    || *code == SqlState::TOO_MANY_CONNECTIONS
                    || *code == SqlState::T_R_SERIALIZATION_FAILURE
                    || *code == SqlState::T_R_DEADLOCK_DETECTED
                    // A stalled database: `statement_timeout` (57014, also
                    // an admin's pg_cancel_backend) or `lock_timeout`
                    // (55P03). Nothing was committed; retrying later can
                    // succeed. As `Internal`, a timed-out group-commit batch
                    // would also be retried in halves, each waiting the
                    // whole timeout again.
                    || *code == SqlState::QUERY_CANCELED
                    || *code == SqlState::LOCK_NOT_AVAILABLE
            }
        };
    if retryable {
        StoreError::unavailable(e)
    } else {
        StoreError::internal(e)
    }
}

pub(super) fn pool_error(e: PoolError) -> StoreError {
    match e {
        PoolError::Backend(e) => pg_error(e),
        other => StoreError::unavailable(other),
    }
}

pub(super) fn seq(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// A u64 position as a bigint parameter; positions beyond i64 do not exist.
pub(super) fn pos(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// `t` in microseconds since the Unix epoch (0 before it, saturating far
/// after it).
pub fn micros(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Default [`PgSettings::statement_timeout`]: far above what a write
/// transaction's statement takes (milliseconds, a batch of 10,000 rows
/// well under a second), short enough that a stall surfaces as
/// `UNAVAILABLE` to callers without a deadline instead of a hang.
pub const DEFAULT_STATEMENT_TIMEOUT: Duration = Duration::from_secs(10);

/// How the store uses the database.
#[derive(Debug, Clone, Copy)]
pub struct PgSettings {
    /// Most pooled connections.
    pub pool_size: usize,
    /// Longest wait for a pooled (or new) connection before `Unavailable`.
    pub wait_timeout: Duration,
    /// How sends are batched.
    pub group_commit: GroupCommitSettings,
    /// Longest a statement of a write transaction (a batch of sends, a
    /// mark-read) may run — waiting for a lock included — before it is
    /// cancelled and the call fails with `Unavailable`; `None`: whatever
    /// the server is configured with (often no limit). Without it, a
    /// stalled database (a table lock held by a migration or an admin
    /// session, a hung disk) holds each writer, its pooled connection and
    /// every send queued behind it for as long as the stall lasts, and a
    /// caller without a deadline never gets an answer. Set per transaction
    /// (`SET LOCAL`), so it also holds through a transaction-pooling
    /// PgBouncer.
    pub statement_timeout: Option<Duration>,
}

impl PgSettings {
    /// Defaults but for the pool.
    pub fn new(pool_size: usize, wait_timeout: Duration) -> Self {
        Self {
            pool_size,
            wait_timeout,
            group_commit: GroupCommitSettings::default(),
            statement_timeout: Some(DEFAULT_STATEMENT_TIMEOUT),
        }
    }
}

/// Bounds every statement of `tx` by `timeout` (see
/// [`PgSettings::statement_timeout`]). `SET LOCAL` ends with the
/// transaction, so the pooled connection is left as it was; a session-level
/// `SET` would leak to other clients of a pooler's server connection, and a
/// startup `options` parameter is refused by PgBouncer unless configured.
pub(super) async fn bound_statements(
    tx: &deadpool_postgres::Transaction<'_>,
    timeout: Option<Duration>,
) -> StoreResult<()> {
    if let Some(timeout) = timeout {
        tx.batch_execute(&set_statement_timeout(timeout))
            .await
            .map_err(pg_error)?;
    }
    Ok(())
}

/// The statement that bounds every later statement of its transaction to
/// `timeout` (PostgreSQL `statement_timeout`, in whole milliseconds; at
/// least 1, since 0 would mean "no limit").
pub(super) fn set_statement_timeout(timeout: Duration) -> String {
    format!(
        "SET LOCAL statement_timeout = {}",
        timeout.as_millis().max(1)
    )
}

/// Notifications and streams in PostgreSQL.
#[derive(Clone)]
pub struct PgStore {
    pool: Pool,
    bus: Arc<dyn Bus>,
    sends: GroupCommit,
    statement_timeout: Option<Duration>,
    clock: Clock,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("pool", &self.pool.status())
            .finish()
    }
}

impl PgStore {
    /// A store over a pool of `settings.pool_size` connections to `url`,
    /// publishing through LISTEN/NOTIFY, with sends group-committed by
    /// writers spawned as `jobs` (so call this inside a Tokio runtime). No
    /// connection is made until first use; a checkout waits at most
    /// `settings.wait_timeout` before failing as `Unavailable`.
    pub fn with_settings(url: &str, settings: PgSettings, jobs: &Jobs) -> StoreResult<Self> {
        Self::with_bus(url, settings, Arc::new(NotifyBus), jobs)
    }

    /// [`PgStore::with_settings`], publishing through `bus`.
    pub fn with_bus(
        url: &str,
        settings: PgSettings,
        bus: Arc<dyn Bus>,
        jobs: &Jobs,
    ) -> StoreResult<Self> {
        let PgSettings {
            pool_size,
            wait_timeout,
            group_commit,
            statement_timeout,
        } = settings;
        let mut config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| StoreError::internal(format!("invalid database URL: {e}")))?;
        config
            .connect_timeout(wait_timeout)
            .keepalives(true)
            .application_name("herald");
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(pool_size.max(1))
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(wait_timeout))
            .create_timeout(Some(wait_timeout))
            .build()
            .map_err(StoreError::internal)?;
        let sends = GroupCommit::spawn(
            pool.clone(),
            bus.clone(),
            group_commit,
            statement_timeout,
            jobs,
        );
        Ok(Self {
            pool,
            bus,
            sends,
            statement_timeout,
            clock: Clock::system(),
        })
    }

    /// This store, going by `clock` for expiry (what listings and counts
    /// leave out).
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }
}

/// The result stored under an idempotency key by a committed send (its
/// deliveries, or that it is scheduled), as a replay:
/// `IdempotencyKeyReused` when it was stored for a different request.
pub(super) async fn replay_idempotent(
    pool: &Pool,
    tenant: &str,
    sender: &str,
    key: &str,
    fingerprint: &str,
) -> StoreResult<Sent> {
    let client = pool.get().await.map_err(pool_error)?;
    let row = client
        .query_one(
            "SELECT request, response::text AS response FROM idempotency_keys \
             WHERE tenant = $1 AND sender = $2 AND key = $3",
            &[&tenant, &sender, &key],
        )
        .await
        .map_err(pg_error)?;
    let request: String = row.try_get("request").map_err(pg_error)?;
    if request != fingerprint {
        return Err(StoreError::IdempotencyKeyReused);
    }
    let response: Option<String> = row.try_get("response").map_err(pg_error)?;
    let response =
        response.ok_or_else(|| StoreError::internal("idempotency key without result"))?;
    // jsonb gives its own spacing back: compare parsed.
    let value: serde_json::Value = serde_json::from_str(&response).map_err(StoreError::internal)?;
    if value.get("scheduled") == Some(&serde_json::Value::Bool(true)) {
        return Ok(Sent {
            deliveries: Vec::new(),
            replayed: true,
            scheduled: true,
        });
    }
    Ok(Sent {
        deliveries: serde_json::from_value(value).map_err(StoreError::internal)?,
        replayed: true,
        scheduled: false,
    })
}

/// Key of the transaction advisory lock each retention batch takes, so one
/// replica prunes at a time (PostgreSQL docs, "Advisory Locks").
pub const PRUNE_LOCK_KEY: i64 = 0x6865_7261_6c64_0001;

/// Rows a retention batch looks at.
pub const PRUNE_BATCH_ROWS: i64 = 10_000;

/// One batch of stream events: up to $2 rows older than $1, then, for each
/// of their streams, every event up to the highest of those seqs, so a
/// stream is always pruned up to a seq and never gets a hole (an event can
/// be a few milliseconds younger than the cutoff yet have a lower seq: seq
/// is commit order, `created_at` the transaction's start). `pruned_seq`
/// records how far, and the unread and unseen counters lose what they
/// counted of the notifications deleted. The streams' rows are locked first, in key order like every
/// writer, so retention cannot deadlock with sends or marks. Returns the
/// number of events deleted.
const PRUNE_EVENTS: &str = "WITH sample AS ( \
       (SELECT tenant, user_id, seq FROM notifications WHERE created_at < $1 LIMIT $2) \
       UNION ALL \
       (SELECT tenant, user_id, seq FROM state_events WHERE created_at < $1 LIMIT $2) \
       UNION ALL \
       (SELECT tenant, user_id, seq FROM update_events WHERE created_at < $1 LIMIT $2) \
     ), upto AS ( \
       SELECT tenant, user_id, max(seq) AS seq FROM sample GROUP BY tenant, user_id \
     ), locked AS ( \
       SELECT s.tenant, s.user_id, upto.seq FROM user_streams s JOIN upto USING (tenant, user_id) \
       ORDER BY s.tenant, s.user_id FOR UPDATE OF s \
     ), n AS ( \
       DELETE FROM notifications d USING locked \
       WHERE d.tenant = locked.tenant AND d.user_id = locked.user_id AND d.seq <= locked.seq \
       RETURNING d.tenant, d.user_id, \
         d.read_at IS NULL AND d.archived_at IS NULL AND d.deleted_at IS NULL AS unread, \
         d.read_at IS NULL AND d.seen_at IS NULL AND d.archived_at IS NULL \
           AND d.deleted_at IS NULL AS unseen \
     ), r AS ( \
       DELETE FROM state_events d USING locked \
       WHERE d.tenant = locked.tenant AND d.user_id = locked.user_id AND d.seq <= locked.seq \
       RETURNING 1 \
     ), up AS ( \
       DELETE FROM update_events d USING locked \
       WHERE d.tenant = locked.tenant AND d.user_id = locked.user_id AND d.seq <= locked.seq \
       RETURNING 1 \
     ), gone AS ( \
       SELECT tenant, user_id, count(*) FILTER (WHERE unread) AS unread, \
         count(*) FILTER (WHERE unseen) AS unseen \
       FROM n GROUP BY tenant, user_id \
     ), s AS ( \
       UPDATE user_streams s SET pruned_seq = GREATEST(s.pruned_seq, l.seq), \
         unread = s.unread - COALESCE(g.unread, 0), unseen = s.unseen - COALESCE(g.unseen, 0) \
       FROM locked l LEFT JOIN gone g USING (tenant, user_id) \
       WHERE s.tenant = l.tenant AND s.user_id = l.user_id \
     ) SELECT ((SELECT count(*) FROM n) + (SELECT count(*) FROM r) \
               + (SELECT count(*) FROM up))::int8";

const PRUNE_CONTENTS: &str = "WITH d AS ( \
       DELETE FROM contents WHERE id IN \
         (SELECT id FROM contents WHERE created_at < $1 LIMIT $2) RETURNING 1 \
     ) SELECT count(*)::int8 FROM d";

const PRUNE_IDEMPOTENCY_KEYS: &str = "WITH d AS ( \
       DELETE FROM idempotency_keys WHERE (tenant, sender, key) IN \
         (SELECT tenant, sender, key FROM idempotency_keys WHERE created_at < $1 LIMIT $2) \
       RETURNING 1 \
     ) SELECT count(*)::int8 FROM d";

/// The statement of a state change of `$1`/`$2`'s notifications that
/// `target` selects (SQL on `n`, notifications, and `c`, contents; its
/// parameters from `$4`), by action `$3` (the `herald.v1.StateAction`
/// number). Only notifications the action changes are touched, and never
/// a deleted one. It moves the stream's counters by what changed:
/// `unread` counts the inbox's (not archived, not deleted) unread
/// notifications; `unseen` those of them neither seen nor read (read
/// implies seen: a row read before `seen_at` existed has none). One row:
/// how many changed, and (`with_ids`) their ids, ascending. Run under the stream's row
/// lock, which every writer of these rows takes first, so the rows read
/// are the rows updated.
fn update_state_sql(target: &str, with_ids: bool) -> String {
    let ids = if with_ids {
        "COALESCE(array_agg(id ORDER BY id), '{}')"
    } else {
        "'{}'::int8[]"
    };
    format!(
        "WITH target AS ( \
           SELECT n.seq, n.id, n.read_at IS NULL AS r, \
                  n.seen_at IS NULL AND n.read_at IS NULL AS s, n.archived_at IS NULL AS a \
           FROM {CURRENT} \
           WHERE n.tenant = $1 AND n.user_id = $2 AND n.deleted_at IS NULL AND ({target}) \
             AND CASE $3::int2 \
               WHEN 1 THEN n.read_at IS NULL \
               WHEN 2 THEN n.read_at IS NOT NULL \
               WHEN 3 THEN n.seen_at IS NULL AND n.read_at IS NULL \
               WHEN 4 THEN n.archived_at IS NULL \
               WHEN 5 THEN n.archived_at IS NOT NULL \
               ELSE $3::int2 = 6 END \
         ), changed AS ( \
           UPDATE notifications n SET \
             read_at = CASE $3::int2 WHEN 1 THEN now() WHEN 2 THEN NULL ELSE n.read_at END, \
             seen_at = CASE WHEN $3::int2 IN (1, 2) THEN COALESCE(n.seen_at, n.read_at, now()) \
                            WHEN $3::int2 = 3 THEN now() ELSE n.seen_at END, \
             archived_at = CASE $3::int2 WHEN 4 THEN now() WHEN 5 THEN NULL \
                                ELSE n.archived_at END, \
             deleted_at = CASE $3::int2 WHEN 6 THEN now() ELSE n.deleted_at END \
           FROM target t WHERE n.tenant = $1 AND n.user_id = $2 AND n.seq = t.seq \
         ), delta AS ( \
           SELECT count(*) AS n, \
             CASE $3::int2 \
               WHEN 1 THEN -count(*) FILTER (WHERE a) \
               WHEN 2 THEN count(*) FILTER (WHERE a) \
               WHEN 4 THEN -count(*) FILTER (WHERE r) \
               WHEN 5 THEN count(*) FILTER (WHERE r) \
               WHEN 6 THEN -count(*) FILTER (WHERE r AND a) \
               ELSE 0 END AS unread, \
             CASE $3::int2 \
               WHEN 1 THEN -count(*) FILTER (WHERE s AND a) \
               WHEN 3 THEN -count(*) FILTER (WHERE a) \
               WHEN 4 THEN -count(*) FILTER (WHERE s) \
               WHEN 5 THEN count(*) FILTER (WHERE s) \
               WHEN 6 THEN -count(*) FILTER (WHERE s AND a) \
               ELSE 0 END AS unseen, \
             {ids} AS ids \
           FROM target \
         ), counters AS ( \
           UPDATE user_streams s SET unread = s.unread + d.unread, unseen = s.unseen + d.unseen \
           FROM delta d WHERE s.tenant = $1 AND s.user_id = $2 AND d.n > 0 \
         ) SELECT n, ids FROM delta"
    )
}

/// The SQL of a [`NotificationFilter`] on `c` (contents), its four
/// parameters numbered from `$first`: exact types, type prefixes,
/// categories (each `text[]`, empty for all) and the least severity
/// (`int2`, 0 for all). Prefixes compare with `left()`, not `LIKE`, so
/// `_` in a type is not a wildcard.
fn filter_sql(first: usize) -> String {
    let (types, prefixes, categories, severity) = (first, first + 1, first + 2, first + 3);
    format!(
        "(cardinality(${types}::text[]) = 0 AND cardinality(${prefixes}::text[]) = 0 \
           OR c.type = ANY(${types}::text[]) \
           OR EXISTS (SELECT 1 FROM unnest(${prefixes}::text[]) AS p(prefix) \
                      WHERE left(c.type, length(p.prefix)) = p.prefix)) \
         AND (cardinality(${categories}::text[]) = 0 OR c.category = ANY(${categories}::text[])) \
         AND c.severity >= ${severity}::int2"
    )
}

const PRUNE_TICKETS: &str = "WITH d AS ( \
       DELETE FROM stream_tickets WHERE digest IN \
         (SELECT digest FROM stream_tickets WHERE expires_at < $1 LIMIT $2) \
       RETURNING 1 \
     ) SELECT count(*)::int8 FROM d";

impl PgStore {
    /// Runs one retention `batch` statement in its own transaction, under
    /// the statement timeout and [`PRUNE_LOCK_KEY`]. `None` when another
    /// replica holds the lock.
    async fn prune_batch(
        &self,
        client: &mut deadpool_postgres::Object,
        batch: &str,
        cutoff: SystemTime,
    ) -> StoreResult<Option<u64>> {
        let tx = client.transaction().await.map_err(pg_error)?;
        bound_statements(&tx, self.statement_timeout).await?;
        let locked: bool = tx
            .query_one("SELECT pg_try_advisory_xact_lock($1)", &[&PRUNE_LOCK_KEY])
            .await
            .map_err(pg_error)?
            .try_get(0)
            .map_err(pg_error)?;
        if !locked {
            return Ok(None);
        }
        let stmt = tx.prepare_cached(batch).await.map_err(pg_error)?;
        let n: i64 = tx
            .query_one(&stmt, &[&cutoff, &PRUNE_BATCH_ROWS])
            .await
            .map_err(pg_error)?
            .try_get(0)
            .map_err(pg_error)?;
        tx.commit().await.map_err(pg_error)?;
        Ok(Some(seq(n)))
    }
}

impl Store for PgStore {
    async fn send(&self, tenant: &str, sender: &str, n: &NewNotification) -> StoreResult<Sent> {
        self.sends.send(tenant, sender, n).await
    }

    async fn update_state(
        &self,
        tenant: &str,
        user: &str,
        request: &StateRequest,
    ) -> StoreResult<StateOutcome> {
        let mut client = self.pool.get().await.map_err(pool_error)?;
        let tx = client.transaction().await.map_err(pg_error)?;
        bound_statements(&tx, self.statement_timeout).await?;
        // Lock the user's stream first (same order as sends), so changes
        // and the events they change are serialized, and the counters move
        // with the rows; rolled back, so no seq is used, when nothing
        // changes.
        let lock = tx
            .prepare_cached(
                "SELECT last_seq FROM user_streams \
                 WHERE tenant = $1 AND user_id = $2 FOR UPDATE",
            )
            .await
            .map_err(pg_error)?;
        let Some(row) = tx
            .query_opt(&lock, &[&tenant, &user])
            .await
            .map_err(pg_error)?
        else {
            return Ok(StateOutcome::default());
        };
        let head: i64 = row.try_get(0).map_err(pg_error)?;
        let action = request.action.as_i16();
        // An up-to change covers up to the head at most, a filter the whole
        // stream as of now; the event records which seq it went up to.
        let (up_to, filter) = match &request.target {
            StateTarget::Ids(_) => (head, None),
            StateTarget::UpTo(up_to) => (pos(*up_to).min(head), None),
            StateTarget::Filter(f) => (head, Some(f)),
        };
        let row = match &request.target {
            StateTarget::Ids(ids) => {
                let stmt = tx
                    .prepare_cached(&update_state_sql("n.id = ANY($4::int8[])", true))
                    .await
                    .map_err(pg_error)?;
                tx.query_one(&stmt, &[&tenant, &user, &action, ids])
                    .await
                    .map_err(pg_error)?
            }
            StateTarget::UpTo(_) | StateTarget::Filter(_) => {
                let f = FilterColumns::of(filter);
                let stmt = tx
                    .prepare_cached(&update_state_sql(
                        &format!("n.seq <= $4 AND {}", filter_sql(5)),
                        false,
                    ))
                    .await
                    .map_err(pg_error)?;
                tx.query_one(
                    &stmt,
                    &[
                        &tenant,
                        &user,
                        &action,
                        &up_to,
                        &f.types,
                        &f.prefixes,
                        &f.categories,
                        &f.min_severity,
                    ],
                )
                .await
                .map_err(pg_error)?
            }
        };
        let changed: i64 = row.try_get(0).map_err(pg_error)?;
        if changed == 0 {
            return Ok(StateOutcome::default()); // dropping `tx` rolls back
        }
        let change = match &request.target {
            StateTarget::Ids(_) => StateChange {
                action: request.action,
                ids: row.try_get(1).map_err(pg_error)?,
                up_to_seq: 0,
                filter: None,
            },
            StateTarget::UpTo(_) | StateTarget::Filter(_) => StateChange {
                action: request.action,
                ids: Vec::new(),
                up_to_seq: seq(up_to),
                filter: filter.cloned(),
            },
        };
        let committed = log::append(
            &tx,
            self.bus.as_ref(),
            &[],
            &[Append {
                tenant,
                user,
                event: NewEvent::State(change),
            }],
        )
        .await?;
        tx.commit().await.map_err(pg_error)?;
        Ok(StateOutcome {
            changed: u32::try_from(changed).unwrap_or(u32::MAX),
            seq: committed.first().map_or(0, |c| c.event.seq),
        })
    }

    async fn cancel_scheduled(&self, tenant: &str, sender: &str, key: &str) -> StoreResult<bool> {
        let client = self.pool.get().await.map_err(pool_error)?;
        let stmt = client
            .prepare_cached(
                "DELETE FROM scheduled_sends \
                 WHERE tenant = $1 AND sender = $2 AND idempotency_key = $3",
            )
            .await
            .map_err(pg_error)?;
        let n = client
            .execute(&stmt, &[&tenant, &sender, &key])
            .await
            .map_err(pg_error)?;
        Ok(n > 0)
    }

    async fn deliver_due(&self, now: SystemTime) -> StoreResult<usize> {
        super::group_commit::deliver_due(&self.pool, self.bus.as_ref(), now, self.statement_timeout)
            .await
    }

    async fn expire(&self, now: SystemTime) -> StoreResult<usize> {
        let expired = {
            let client = self.pool.get().await.map_err(pool_error)?;
            let stmt = client
                .prepare_cached(
                    "SELECT tenant, user_id, array_agg(id ORDER BY id) FROM ( \
                       SELECT tenant, user_id, id FROM notifications \
                       WHERE expires_at <= $1 AND deleted_at IS NULL \
                       ORDER BY expires_at LIMIT $2 \
                     ) AS e GROUP BY tenant, user_id",
                )
                .await
                .map_err(pg_error)?;
            let limit = i64::try_from(MAX_MARK_IDS).unwrap_or(i64::MAX);
            client
                .query(&stmt, &[&now, &limit])
                .await
                .map_err(pg_error)?
        };
        let mut deleted = 0;
        for row in expired {
            let tenant: String = row.try_get(0).map_err(pg_error)?;
            let user: String = row.try_get(1).map_err(pg_error)?;
            let ids: Vec<i64> = row.try_get(2).map_err(pg_error)?;
            let request = StateRequest {
                action: StateAction::Delete,
                target: StateTarget::Ids(ids),
            };
            deleted += self.update_state(&tenant, &user, &request).await?.changed as usize;
        }
        Ok(deleted)
    }

    async fn head(&self, tenant: &str, user: &str) -> StoreResult<StreamHead> {
        let client = self.pool.get().await.map_err(pool_error)?;
        let stmt = client
            .prepare_cached(
                "SELECT m.epoch, COALESCE(s.last_seq, 0), COALESCE(s.pruned_seq, 0) \
                 FROM herald_meta m \
                 LEFT JOIN user_streams s ON s.tenant = $1 AND s.user_id = $2",
            )
            .await
            .map_err(pg_error)?;
        let row = client
            .query_one(&stmt, &[&tenant, &user])
            .await
            .map_err(pg_error)?;
        Ok(StreamHead {
            epoch: seq(row.try_get(0).map_err(pg_error)?),
            last_seq: seq(row.try_get(1).map_err(pg_error)?),
            pruned_seq: seq(row.try_get(2).map_err(pg_error)?),
        })
    }

    async fn events_after(
        &self,
        tenant: &str,
        user: &str,
        after_seq: u64,
        limit: usize,
    ) -> StoreResult<StreamRange> {
        let client = self.pool.get().await.map_err(pool_error)?;
        log::read_range(&client, tenant, user, after_seq, limit).await
    }

    async fn unread_after(
        &self,
        tenant: &str,
        user: &str,
        after_seq: u64,
        up_to_seq: u64,
        limit: usize,
    ) -> StoreResult<Vec<Notification>> {
        let client = self.pool.get().await.map_err(pool_error)?;
        let stmt = client
            .prepare_cached(&format!(
                "SELECT {NOTIFICATION_COLUMNS} \
                 FROM {CURRENT} \
                 WHERE n.tenant = $1 AND n.user_id = $2 AND n.seq > $3 AND n.seq <= $4 \
                   AND n.read_at IS NULL AND n.archived_at IS NULL AND n.deleted_at IS NULL \
                   AND (n.expires_at IS NULL OR n.expires_at > $6) \
                 ORDER BY n.seq LIMIT $5"
            ))
            .await
            .map_err(pg_error)?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = client
            .query(
                &stmt,
                &[
                    &tenant,
                    &user,
                    &pos(after_seq),
                    &pos(up_to_seq),
                    &limit,
                    &self.clock.now(),
                ],
            )
            .await
            .map_err(pg_error)?;
        rows.iter()
            .map(notification)
            .collect::<Result<_, _>>()
            .map_err(pg_error)
    }

    async fn list(
        &self,
        tenant: &str,
        user: &str,
        query: PageQuery,
    ) -> StoreResult<Vec<Notification>> {
        let client = self.pool.get().await.map_err(pool_error)?;
        let stmt = client
            .prepare_cached(&format!(
                "SELECT {NOTIFICATION_COLUMNS} \
                 FROM {CURRENT} \
                 WHERE n.tenant = $1 AND n.user_id = $2 AND n.seq < $3 \
                   AND (NOT $4 OR n.read_at IS NULL) AND n.deleted_at IS NULL \
                   AND (n.archived_at IS NOT NULL) = $10 \
                   AND (n.expires_at IS NULL OR n.expires_at > $11) AND {} \
                 ORDER BY n.seq DESC LIMIT $5",
                filter_sql(6)
            ))
            .await
            .map_err(pg_error)?;
        let limit = i64::try_from(query.limit).unwrap_or(i64::MAX);
        let f = FilterColumns::of(Some(&query.filter));
        let rows = client
            .query(
                &stmt,
                &[
                    &tenant,
                    &user,
                    &pos(query.before_seq),
                    &query.unread_only,
                    &limit,
                    &f.types,
                    &f.prefixes,
                    &f.categories,
                    &f.min_severity,
                    &query.archived,
                    &self.clock.now(),
                ],
            )
            .await
            .map_err(pg_error)?;
        rows.iter()
            .map(notification)
            .collect::<Result<_, _>>()
            .map_err(pg_error)
    }

    async fn unread_count(
        &self,
        tenant: &str,
        user: &str,
        filters: &[NotificationFilter],
    ) -> StoreResult<UnreadCounts> {
        let mut client = self.pool.get().await.map_err(pool_error)?;
        // The counters, less what expired and is not yet deleted (the
        // expiry job deletes it, moving the counters, soon after).
        const TOTAL: &str = "SELECT COALESCE(max(s.unread), 0) - e.unread, \
             COALESCE(max(s.last_seq), 0), COALESCE(max(s.unseen), 0) - e.unseen \
             FROM (SELECT \
                 count(*) FILTER (WHERE read_at IS NULL AND archived_at IS NULL) AS unread, \
                 count(*) FILTER (WHERE read_at IS NULL AND seen_at IS NULL \
                                  AND archived_at IS NULL) AS unseen \
               FROM notifications WHERE tenant = $1 AND user_id = $2 AND expires_at <= $3 \
                 AND deleted_at IS NULL) AS e \
             LEFT JOIN user_streams s ON s.tenant = $1 AND s.user_id = $2 \
             GROUP BY e.unread, e.unseen";
        let now = self.clock.now();
        if filters.is_empty() {
            // One row: the count and the head agree (both change in the
            // transactions that change what they count).
            let stmt = client.prepare_cached(TOTAL).await.map_err(pg_error)?;
            let row = client
                .query_one(&stmt, &[&tenant, &user, &now])
                .await
                .map_err(pg_error)?;
            return Ok(UnreadCounts {
                unread: seq(row.try_get(0).map_err(pg_error)?),
                seq: seq(row.try_get(1).map_err(pg_error)?),
                unseen: seq(row.try_get(2).map_err(pg_error)?),
                filtered: Vec::new(),
            });
        }
        // With named counts: one snapshot for the total, the head and every
        // filtered count (PostgreSQL docs, "Repeatable Read Isolation
        // Level").
        let tx = client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(pg_error)?;
        let stmt = tx.prepare_cached(TOTAL).await.map_err(pg_error)?;
        let row = tx
            .query_one(&stmt, &[&tenant, &user, &now])
            .await
            .map_err(pg_error)?;
        let unread: i64 = row.try_get(0).map_err(pg_error)?;
        let head: i64 = row.try_get(1).map_err(pg_error)?;
        let unseen: i64 = row.try_get(2).map_err(pg_error)?;
        let mut filtered = Vec::with_capacity(filters.len());
        let stmt = tx
            .prepare_cached(&format!(
                "SELECT count(*) FROM {CURRENT} \
                 WHERE n.tenant = $1 AND n.user_id = $2 AND n.read_at IS NULL \
                   AND n.archived_at IS NULL AND n.deleted_at IS NULL \
                   AND (n.expires_at IS NULL OR n.expires_at > $7) AND {}",
                filter_sql(3)
            ))
            .await
            .map_err(pg_error)?;
        for filter in filters {
            let f = FilterColumns::of(Some(filter));
            let n: i64 = tx
                .query_one(
                    &stmt,
                    &[
                        &tenant,
                        &user,
                        &f.types,
                        &f.prefixes,
                        &f.categories,
                        &f.min_severity,
                        &now,
                    ],
                )
                .await
                .map_err(pg_error)?
                .try_get(0)
                .map_err(pg_error)?;
            filtered.push(seq(n));
        }
        tx.commit().await.map_err(pg_error)?;
        Ok(UnreadCounts {
            unread: seq(unread),
            seq: seq(head),
            unseen: seq(unseen),
            filtered,
        })
    }

    async fn prune(&self, cutoff: SystemTime) -> StoreResult<u64> {
        let mut client = self.pool.get().await.map_err(pool_error)?;
        let mut deleted = 0;
        // Stream events first, by seq, a batch at a time...
        loop {
            match self.prune_batch(&mut client, PRUNE_EVENTS, cutoff).await? {
                None => return Ok(deleted), // another replica is pruning
                Some(0) => break,
                Some(n) => deleted += n,
            }
        }
        // ...then what only they referenced: contents and idempotency keys
        // of the same age (a content row is as old as its notifications).
        for batch in [PRUNE_CONTENTS, PRUNE_IDEMPOTENCY_KEYS] {
            while let Some(n) = self.prune_batch(&mut client, batch, cutoff).await?
                && n > 0
            {}
        }
        // Stream tickets go when they expire, whatever the retention.
        let now = SystemTime::now();
        while let Some(n) = self.prune_batch(&mut client, PRUNE_TICKETS, now).await?
            && n > 0
        {}
        Ok(deleted)
    }

    async fn put_ticket(
        &self,
        digest: TicketDigest,
        grant: &TicketGrant,
        expires_at: SystemTime,
    ) -> StoreResult<()> {
        let client = self.pool.get().await.map_err(pool_error)?;
        let stmt = client
            .prepare_cached(
                "INSERT INTO stream_tickets \
                 (digest, tenant, user_id, token_expires_at, expires_at) \
                 VALUES ($1, $2, $3, $4, $5)",
            )
            .await
            .map_err(pg_error)?;
        client
            .execute(
                &stmt,
                &[
                    &digest.as_slice(),
                    &grant.tenant,
                    &grant.user,
                    &grant.token_expires_at,
                    &expires_at,
                ],
            )
            .await
            .map_err(pg_error)?;
        Ok(())
    }

    async fn take_ticket(
        &self,
        digest: TicketDigest,
        now: SystemTime,
    ) -> StoreResult<Option<TicketGrant>> {
        let client = self.pool.get().await.map_err(pool_error)?;
        // Deleting is taking: of two replicas redeeming the same ticket at
        // once, one deletes the row and the other finds none.
        let stmt = client
            .prepare_cached(
                "DELETE FROM stream_tickets WHERE digest = $1 \
                 RETURNING tenant, user_id, token_expires_at, expires_at",
            )
            .await
            .map_err(pg_error)?;
        let Some(row) = client
            .query_opt(&stmt, &[&digest.as_slice()])
            .await
            .map_err(pg_error)?
        else {
            return Ok(None);
        };
        let expires_at: SystemTime = row.try_get(3).map_err(pg_error)?;
        if expires_at <= now {
            return Ok(None);
        }
        Ok(Some(TicketGrant {
            tenant: row.try_get(0).map_err(pg_error)?,
            user: row.try_get(1).map_err(pg_error)?,
            token_expires_at: row.try_get(2).map_err(pg_error)?,
        }))
    }

    async fn ping(&self) -> StoreResult<()> {
        let client = self.pool.get().await.map_err(pool_error)?;
        client.simple_query("SELECT 1").await.map_err(pg_error)?;
        Ok(())
    }

    fn pool_status(&self) -> Option<(usize, usize)> {
        let s = self.pool.status();
        Some((s.size.saturating_sub(s.available), s.available))
    }
}
