//! The PostgreSQL store: production and multi-replica. A deadpool pool of
//! connections with cached prepared statements; each write is one short
//! transaction that takes the user's next seq under the `user_streams` row
//! lock, stores the event and issues `pg_notify` — delivered to every
//! replica's listener only if the transaction commits.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime};
use tokio_postgres::{NoTls, Row, error::SqlState};

use super::{
    Store, StoreError, StoreResult,
    group_commit::{GroupCommit, GroupCommitSettings},
};
use crate::{
    listener::{CHANNEL, Payload, pack},
    notification::{
        Delivery, Epoch, EventBody, MarkOutcome, NewNotification, Notification, PageQuery,
        ReadChange, ReadTarget, StreamEvent, StreamHead, StreamRange,
    },
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
    let (mut client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .map_err(pg_error)?;
    let conn = tokio::spawn(connection);
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK_KEY])
        .await
        .map_err(pg_error)?;
    let report = embedded::migrations::runner()
        .run_async(&mut client)
        .await
        .map_err(|e| StoreError::Internal(format!("migration failed: {e}")));
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
        StoreError::Unavailable(e.to_string())
    } else {
        StoreError::Internal(e.to_string())
    }
}

pub(super) fn pool_error(e: PoolError) -> StoreError {
    match e {
        PoolError::Backend(e) => pg_error(e),
        other => StoreError::Unavailable(other.to_string()),
    }
}

pub(super) fn seq(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// A u64 position as a bigint parameter; positions beyond i64 do not exist.
fn pos(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

pub(super) fn micros(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

const NOTIFICATION_COLUMNS: &str = "id, seq, user_id, type, title, body, data::text AS data, created_at, read_at IS NOT NULL AS read";

fn notification(row: &Row) -> Result<Notification, tokio_postgres::Error> {
    Ok(Notification {
        id: row.try_get("id")?,
        seq: seq(row.try_get("seq")?),
        recipient: row.try_get("user_id")?,
        kind: row.try_get("type")?,
        title: row.try_get("title")?,
        body: row.try_get("body")?,
        data: row.try_get("data")?,
        created_at: row.try_get("created_at")?,
        read: row.try_get("read")?,
    })
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
        let ms = timeout.as_millis().max(1); // 0 would mean "no limit"
        tx.batch_execute(&format!("SET LOCAL statement_timeout = {ms}"))
            .await
            .map_err(pg_error)?;
    }
    Ok(())
}

/// Notifications and streams in PostgreSQL.
#[derive(Clone)]
pub struct PgStore {
    pool: Pool,
    sends: GroupCommit,
    statement_timeout: Option<Duration>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("pool", &self.pool.status())
            .finish()
    }
}

impl PgStore {
    /// A store over a pool of at most `pool_size` connections to `url`,
    /// with sends group-committed per `group_commit` (its writers start
    /// now, so call this inside a Tokio runtime). No connection is made
    /// until first use; a checkout waits at most `wait_timeout` before
    /// failing as `Unavailable`. Write statements are bounded by
    /// [`DEFAULT_STATEMENT_TIMEOUT`]; see [`PgStore::with_settings`].
    pub fn new(
        url: &str,
        pool_size: usize,
        wait_timeout: Duration,
        group_commit: GroupCommitSettings,
    ) -> StoreResult<Self> {
        Self::with_settings(
            url,
            PgSettings {
                group_commit,
                ..PgSettings::new(pool_size, wait_timeout)
            },
        )
    }

    /// [`PgStore::new`] with every setting.
    pub fn with_settings(url: &str, settings: PgSettings) -> StoreResult<Self> {
        let PgSettings {
            pool_size,
            wait_timeout,
            group_commit,
            statement_timeout,
        } = settings;
        let mut config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| StoreError::Internal(format!("invalid database URL: {e}")))?;
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
            .map_err(|e| StoreError::Internal(e.to_string()))?;
        let sends = GroupCommit::spawn(pool.clone(), group_commit, statement_timeout);
        Ok(Self {
            pool,
            sends,
            statement_timeout,
        })
    }

    async fn notify(tx: &deadpool_postgres::Transaction<'_>, payload: Payload) -> StoreResult<()> {
        let stmt = tx
            .prepare_cached("SELECT pg_notify($1, p) FROM unnest($2::text[]) AS p")
            .await
            .map_err(pg_error)?;
        tx.execute(&stmt, &[&CHANNEL, &pack([payload])])
            .await
            .map_err(pg_error)?;
        Ok(())
    }
}

/// The result stored under an idempotency key by a committed send:
/// `IdempotencyKeyReused` when it was stored for a different request.
pub(super) async fn replay_idempotent(
    pool: &Pool,
    tenant: &str,
    sender: &str,
    key: &str,
    fingerprint: &str,
) -> StoreResult<Vec<Delivery>> {
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
        response.ok_or_else(|| StoreError::Internal("idempotency key without result".into()))?;
    serde_json::from_str(&response).map_err(|e| StoreError::Internal(e.to_string()))
}

impl Store for PgStore {
    async fn send(
        &self,
        tenant: &str,
        sender: &str,
        n: &NewNotification,
    ) -> StoreResult<Vec<Delivery>> {
        self.sends.send(tenant, sender, n).await
    }

    async fn mark_read(
        &self,
        tenant: &str,
        user: &str,
        target: &ReadTarget,
    ) -> StoreResult<MarkOutcome> {
        let mut client = self.pool.get().await.map_err(pool_error)?;
        let tx = client.transaction().await.map_err(pg_error)?;
        bound_statements(&tx, self.statement_timeout).await?;
        // Take the user's stream lock first (same order as sends); rolled
        // back, so no seq is used, when nothing changes.
        let next = tx
            .prepare_cached(
                "UPDATE user_streams SET last_seq = last_seq + 1 \
                 WHERE tenant = $1 AND user_id = $2 RETURNING last_seq",
            )
            .await
            .map_err(pg_error)?;
        let Some(row) = tx
            .query_opt(&next, &[&tenant, &user])
            .await
            .map_err(pg_error)?
        else {
            return Ok(MarkOutcome::default());
        };
        let event_seq: i64 = row.try_get(0).map_err(pg_error)?;
        let (rows, change) = match target {
            ReadTarget::Ids(ids) => {
                let stmt = tx
                    .prepare_cached(
                        "UPDATE notifications SET read_at = now() \
                         WHERE tenant = $1 AND user_id = $2 AND id = ANY($3) AND read_at IS NULL \
                         RETURNING id",
                    )
                    .await
                    .map_err(pg_error)?;
                let rows = tx
                    .query(&stmt, &[&tenant, &user, ids])
                    .await
                    .map_err(pg_error)?;
                let mut ids = rows
                    .iter()
                    .map(|r| r.try_get::<_, i64>(0))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(pg_error)?;
                ids.sort_unstable();
                (rows.len(), ReadChange { ids, up_to_seq: 0 })
            }
            ReadTarget::UpTo(up_to) => {
                let up_to = pos(*up_to).min(event_seq - 1);
                let stmt = tx
                    .prepare_cached(
                        "UPDATE notifications SET read_at = now() \
                         WHERE tenant = $1 AND user_id = $2 AND seq <= $3 AND read_at IS NULL",
                    )
                    .await
                    .map_err(pg_error)?;
                let n = tx
                    .execute(&stmt, &[&tenant, &user, &up_to])
                    .await
                    .map_err(pg_error)?;
                let n = usize::try_from(n).unwrap_or(usize::MAX);
                (
                    n,
                    ReadChange {
                        ids: Vec::new(),
                        up_to_seq: seq(up_to),
                    },
                )
            }
        };
        if rows == 0 {
            return Ok(MarkOutcome::default()); // dropping `tx` rolls back
        }
        let insert = tx
            .prepare_cached(
                "INSERT INTO read_events (tenant, user_id, seq, notification_ids, up_to_seq) \
                 VALUES ($1, $2, $3, $4, $5)",
            )
            .await
            .map_err(pg_error)?;
        tx.execute(
            &insert,
            &[
                &tenant,
                &user,
                &event_seq,
                &change.ids,
                &pos(change.up_to_seq),
            ],
        )
        .await
        .map_err(pg_error)?;
        let payload = Payload::Read {
            t: tenant.to_owned(),
            u: user.to_owned(),
            s: seq(event_seq),
            ids: change.ids,
            up: change.up_to_seq,
        };
        Self::notify(&tx, payload).await?;
        tx.commit().await.map_err(pg_error)?;
        Ok(MarkOutcome {
            marked: u32::try_from(rows).unwrap_or(u32::MAX),
            seq: seq(event_seq),
        })
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
        let stmt = client
            .prepare_cached(&format!(
                "SELECT m.epoch, e.* FROM herald_meta m LEFT JOIN LATERAL ( \
                   SELECT * FROM ( \
                     SELECT {NOTIFICATION_COLUMNS}, NULL::bigint[] AS ids, 0::bigint AS up_to \
                     FROM notifications WHERE tenant = $1 AND user_id = $2 AND seq > $3 \
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
        // One row per event, or one row of NULLs (but the epoch) when the
        // range is empty.
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
                "SELECT {NOTIFICATION_COLUMNS} FROM notifications \
                 WHERE tenant = $1 AND user_id = $2 AND seq > $3 AND seq <= $4 \
                   AND read_at IS NULL \
                 ORDER BY seq LIMIT $5"
            ))
            .await
            .map_err(pg_error)?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = client
            .query(
                &stmt,
                &[&tenant, &user, &pos(after_seq), &pos(up_to_seq), &limit],
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
                "SELECT {NOTIFICATION_COLUMNS} FROM notifications \
                 WHERE tenant = $1 AND user_id = $2 AND seq < $3 \
                   AND (NOT $4 OR read_at IS NULL) \
                 ORDER BY seq DESC LIMIT $5"
            ))
            .await
            .map_err(pg_error)?;
        let limit = i64::try_from(query.limit).unwrap_or(i64::MAX);
        let rows = client
            .query(
                &stmt,
                &[
                    &tenant,
                    &user,
                    &pos(query.before_seq),
                    &query.unread_only,
                    &limit,
                ],
            )
            .await
            .map_err(pg_error)?;
        rows.iter()
            .map(notification)
            .collect::<Result<_, _>>()
            .map_err(pg_error)
    }

    async fn unread_count(&self, tenant: &str, user: &str) -> StoreResult<(u64, u64)> {
        let client = self.pool.get().await.map_err(pool_error)?;
        // One statement, one snapshot: the count and the head agree.
        let stmt = client
            .prepare_cached(
                "SELECT \
                   (SELECT count(*) FROM notifications \
                    WHERE tenant = $1 AND user_id = $2 AND read_at IS NULL), \
                   COALESCE((SELECT last_seq FROM user_streams \
                             WHERE tenant = $1 AND user_id = $2), 0)",
            )
            .await
            .map_err(pg_error)?;
        let row = client
            .query_one(&stmt, &[&tenant, &user])
            .await
            .map_err(pg_error)?;
        let unread: i64 = row.try_get(0).map_err(pg_error)?;
        let head: i64 = row.try_get(1).map_err(pg_error)?;
        Ok((seq(unread), seq(head)))
    }

    async fn prune(&self, cutoff: SystemTime) -> StoreResult<u64> {
        let client = self.pool.get().await.map_err(pool_error)?;
        // Data-modifying CTEs all run, referenced or not (PostgreSQL docs,
        // "Data-Modifying Statements in WITH").
        let row = client
            .query_one(
                "WITH n AS (DELETE FROM notifications WHERE created_at < $1 \
                            RETURNING tenant, user_id, seq), \
                      r AS (DELETE FROM read_events WHERE created_at < $1 \
                            RETURNING tenant, user_id, seq), \
                      i AS (DELETE FROM idempotency_keys WHERE created_at < $1), \
                      gone AS (SELECT tenant, user_id, max(seq) AS s, count(*) AS c \
                               FROM (SELECT * FROM n UNION ALL SELECT * FROM r) AS x \
                               GROUP BY tenant, user_id), \
                      u AS (UPDATE user_streams AS us \
                            SET pruned_seq = GREATEST(us.pruned_seq, gone.s) FROM gone \
                            WHERE us.tenant = gone.tenant AND us.user_id = gone.user_id) \
                 SELECT COALESCE(sum(c), 0)::bigint FROM gone",
                &[&cutoff],
            )
            .await
            .map_err(pg_error)?;
        let deleted: i64 = row.try_get(0).map_err(pg_error)?;
        Ok(seq(deleted))
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
