//! Fault injection: every notification that `SendNotification` acknowledged
//! reaches every stream of its recipient, once, in order — whatever fails.
//!
//! Each test runs two replicas, racing senders and subscribers on both
//! replicas that behave like real clients (`common::follow_goal`: on any
//! stream error, resume from the last seq on the next replica), injects one
//! fault, and at the end checks every user's streams against the database:
//! the stored stream is gap-free, every stream received exactly it (each
//! seq once, in order, same ids), and every delivery a send acknowledged
//! (recipient, seq, id from the response) is stored and was received by
//! every stream of its recipient. A send that returned an error is never
//! counted as acknowledged (it may still have been stored: the database,
//! not the error, decides what the streams must show).
//!
//! Each test prints one line for the fault table:
//! `FAULT <name>: sent=… acknowledged=… delivered=… lost=… duplicated=… recover_ms=…`
//! where `sent` counts deliveries attempted (one per recipient of each send
//! call, retries included), `acknowledged` the distinct deliveries some OK
//! response promised (recipient, seq, id), `delivered` the acknowledged ones
//! that reached every stream of their recipient, `lost` the acknowledged
//! ones that did not (or are not stored), `duplicated` events a stream got
//! more than once; what `recover_ms` measures is said at each test.
//!
//! Tests 1 and 2 stop and kill PostgreSQL itself, so they run their own
//! private cluster (`common::pg_cluster`); the others use a fresh database
//! on the shared server (`HERALD_TEST_DATABASE_URL`) and never touch it.

mod common;

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use common::{pg_cluster::PgCluster, process::ProcessReplica, proxy::TcpProxy, *};
use herald::{
    config::Config,
    proto::{self, notifications_client::NotificationsClient},
    server,
};
use tokio::{sync::watch, task::JoinHandle};
use tokio_util::sync::CancellationToken;
use tonic::{Code, transport::Channel};
use tonic_health::pb::health_check_response::ServingStatus;

// ---------------------------------------------------------------------------
// Senders and what they were told
// ---------------------------------------------------------------------------

/// One acknowledged delivery: what a send's OK response promised.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Ack {
    recipient: String,
    seq: u64,
    id: i64,
    issued: Instant,
    done: Instant,
}

/// A send that returned an error.
#[derive(Debug, Clone)]
struct Failure {
    code: Code,
    message: String,
    /// The call's deadline, if it had one.
    deadline: Option<Duration>,
    issued: Instant,
    done: Instant,
}

/// Every send's outcome, as the callers saw it.
#[derive(Default)]
struct Ledger {
    /// Deliveries attempted (recipients of every send tried, retries too).
    attempted: AtomicU64,
    acks: Mutex<Vec<Ack>>,
    failures: Mutex<Vec<Failure>>,
}

impl Ledger {
    /// Sends `request` as the test sender, with `deadline` (if any) as the
    /// call's gRPC deadline, and records the outcome.
    async fn send(
        &self,
        client: &mut NotificationsClient<Channel>,
        request: proto::SendNotificationRequest,
        deadline: Option<Duration>,
    ) -> Result<Vec<Ack>, Failure> {
        self.attempted
            .fetch_add(request.recipients.len() as u64, Ordering::Relaxed);
        let mut call = authed(request, &sender_token());
        if let Some(deadline) = deadline {
            call.set_timeout(deadline);
        }
        let issued = Instant::now();
        let outcome = client.send_notification(call).await;
        let done = Instant::now();
        match outcome {
            Ok(response) => {
                let acks: Vec<Ack> = response
                    .into_inner()
                    .deliveries
                    .into_iter()
                    .map(|d| Ack {
                        recipient: d.recipient,
                        seq: d.seq,
                        id: d.notification_id,
                        issued,
                        done,
                    })
                    .collect();
                self.acks.lock().unwrap().extend(acks.iter().cloned());
                Ok(acks)
            }
            Err(status) => {
                let failure = Failure {
                    code: status.code(),
                    message: status.message().to_owned(),
                    deadline,
                    issued,
                    done,
                };
                self.failures.lock().unwrap().push(failure.clone());
                Err(failure)
            }
        }
    }

    fn acks(&self) -> Vec<Ack> {
        self.acks.lock().unwrap().clone()
    }

    fn failures(&self) -> Vec<Failure> {
        self.failures.lock().unwrap().clone()
    }

    /// Completion time of the first acknowledged send that finished after
    /// `t`, as milliseconds after `t`.
    fn first_ack_after(&self, t: Instant) -> Option<u128> {
        self.acks
            .lock()
            .unwrap()
            .iter()
            .filter(|a| a.done > t)
            .map(|a| (a.done - t).as_millis())
            .min()
    }
}

/// A client of `addr` that connects on first use and reconnects after
/// failures, like a long-lived service client.
fn lazy_client(addr: SocketAddr) -> NotificationsClient<Channel> {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(1))
        .connect_lazy();
    NotificationsClient::new(channel)
}

/// How racing senders behave.
#[derive(Clone)]
struct SendPlan {
    /// Replicas to send through: sender `i` starts on `addrs[i % n]` and
    /// moves to the next one after a failed send (a client-side load
    /// balancer). A failed send is not retried.
    addrs: Vec<SocketAddr>,
    /// Each send goes to one of these, chosen at random.
    users: Vec<String>,
    /// Pause after each send.
    pause: Duration,
    /// The gRPC deadline of each send.
    deadline: Duration,
    /// While set, senders hold off (between sends).
    paused: Arc<AtomicBool>,
}

/// Starts `n` racing senders following `plan` until `stop`.
fn spawn_senders(
    n: usize,
    plan: &SendPlan,
    ledger: &Arc<Ledger>,
    stop: &CancellationToken,
) -> Vec<JoinHandle<()>> {
    (0..n)
        .map(|i| {
            let plan = plan.clone();
            let ledger = ledger.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut clients: Vec<_> = plan.addrs.iter().map(|a| lazy_client(*a)).collect();
                let mut at = i % clients.len();
                let mut k = 0u64;
                while !stop.is_cancelled() {
                    if plan.paused.load(Ordering::Acquire) {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                    let user = &plan.users[fastrand::usize(..plan.users.len())];
                    let request = note(&[user.as_str()], &format!("s{i}-{k}"));
                    k += 1;
                    if ledger
                        .send(&mut clients[at], request, Some(plan.deadline))
                        .await
                        .is_err()
                    {
                        at = (at + 1) % clients.len();
                    }
                    tokio::select! {
                        () = stop.cancelled() => {}
                        () = tokio::time::sleep(plan.pause) => {}
                    }
                }
            })
        })
        .collect()
}

async fn join_all(handles: Vec<JoinHandle<()>>) {
    for h in handles {
        h.await.expect("sender task");
    }
}

// ---------------------------------------------------------------------------
// Subscribers
// ---------------------------------------------------------------------------

/// Resilient subscribers (several per user, on several replicas), stopped
/// once the database says what each user's last seq is.
struct Followers {
    goals: HashMap<String, watch::Sender<Goal>>,
    streams: Vec<(String, String, JoinHandle<Followed>)>,
}

impl Followers {
    fn new() -> Self {
        Self {
            goals: HashMap::new(),
            streams: Vec::new(),
        }
    }

    /// Adds a stream of `user` starting on `addrs[0]` (resuming on the next
    /// address after any error); `label` names it in reports.
    fn add(&mut self, user: &str, label: &str, addrs: Vec<SocketAddr>) {
        let goal = self
            .goals
            .entry(user.to_owned())
            .or_insert_with(|| watch::channel(Goal::Open).0)
            .subscribe();
        let handle = tokio::spawn(follow_goal(addrs, user.to_owned(), goal));
        self.streams
            .push((user.to_owned(), label.to_owned(), handle));
    }

    /// Tells each stream to stop at its user's last stored seq, waits up to
    /// `within` for all, then stops the rest; returns what each saw.
    async fn finish(self, db: &tokio_postgres::Client, within: Duration) -> Vec<Stream> {
        let heads = last_seqs(db).await;
        for (user, goal) in &self.goals {
            let _ = goal.send(Goal::Until(heads.get(user).copied().unwrap_or(0)));
        }
        let deadline = tokio::time::Instant::now() + within;
        let mut out = Vec::new();
        for (user, label, mut handle) in self.streams {
            let seen = match tokio::time::timeout_at(deadline, &mut handle).await {
                Ok(seen) => seen.expect("subscriber task"),
                Err(_) => {
                    // Late: stop it and report what it has.
                    let _ = self.goals[&user].send(Goal::Stop);
                    handle.await.expect("subscriber task")
                }
            };
            out.push(Stream { user, label, seen });
        }
        out
    }
}

/// What one subscriber saw.
struct Stream {
    user: String,
    label: String,
    seen: Followed,
}

// ---------------------------------------------------------------------------
// The end-of-test check
// ---------------------------------------------------------------------------

/// Each user's stored stream head.
async fn last_seqs(db: &tokio_postgres::Client) -> HashMap<String, u64> {
    db.query("SELECT user_id, last_seq FROM user_streams", &[])
        .await
        .expect("read user_streams")
        .iter()
        .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1) as u64))
        .collect()
}

/// Each user's stored notifications: seq → id.
async fn stored(db: &tokio_postgres::Client) -> HashMap<String, BTreeMap<u64, i64>> {
    let mut by_user: HashMap<String, BTreeMap<u64, i64>> = HashMap::new();
    for r in db
        .query("SELECT user_id, seq, id FROM notifications", &[])
        .await
        .expect("read notifications")
    {
        by_user
            .entry(r.get(0))
            .or_default()
            .insert(r.get::<_, i64>(1) as u64, r.get(2));
    }
    by_user
}

/// The counts of one fault run.
#[derive(Debug, Default)]
struct Tally {
    sent: u64,
    acknowledged: usize,
    delivered: usize,
    lost: usize,
    duplicated: usize,
    stored: usize,
}

/// Checks the run against the database, prints the summary line (before
/// failing, so a failing run still reports), then asserts: every user's
/// stored stream is gap-free, every stream got exactly it, once, in order,
/// with the stored ids, and every acknowledged delivery is stored and
/// reached every stream of its recipient.
async fn verify(
    name: &str,
    db: &tokio_postgres::Client,
    ledger: &Ledger,
    streams: &[Stream],
    recover_ms: Option<u128>,
) -> Tally {
    let store = stored(db).await;
    let heads = last_seqs(db).await;
    // Distinct deliveries: a keyed send answered OK, then retried and
    // answered OK again, acknowledged one delivery twice.
    let mut acks = ledger.acks();
    acks.sort_by(|a, b| (&a.recipient, a.seq, a.id).cmp(&(&b.recipient, b.seq, b.id)));
    acks.dedup_by(|a, b| (&a.recipient, a.seq, a.id) == (&b.recipient, b.seq, b.id));
    let mut problems = Vec::new();
    let mut tally = Tally {
        sent: ledger.attempted.load(Ordering::Relaxed),
        acknowledged: acks.len(),
        stored: store.values().map(BTreeMap::len).sum(),
        ..Tally::default()
    };

    for (user, events) in &store {
        let head = heads.get(user).copied().unwrap_or(0);
        let seqs: Vec<u64> = events.keys().copied().collect();
        if seqs != (1..=head).collect::<Vec<_>>() {
            problems.push(format!(
                "{user}: stored seqs are not 1..={head} (gap or extra): {} rows",
                seqs.len()
            ));
        }
    }
    for s in streams {
        let empty = BTreeMap::new();
        let want = store.get(&s.user).unwrap_or(&empty);
        let mut distinct = s.seen.seqs.clone();
        distinct.sort_unstable();
        distinct.dedup();
        tally.duplicated += s.seen.seqs.len() - distinct.len();
        let got: Vec<(u64, i64)> = s
            .seen
            .seqs
            .iter()
            .copied()
            .zip(s.seen.ids.iter().copied())
            .collect();
        let expected: Vec<(u64, i64)> = want.iter().map(|(s, i)| (*s, *i)).collect();
        if got != expected {
            let first_bad = got
                .iter()
                .zip(&expected)
                .position(|(a, b)| a != b)
                .unwrap_or(got.len().min(expected.len()));
            problems.push(format!(
                "stream {} of {}: got {} events, stored {}; first divergence at index {first_bad}: \
                 got {:?}, stored {:?}; stream ends {:?}",
                s.label,
                s.user,
                got.len(),
                expected.len(),
                got.get(first_bad),
                expected.get(first_bad),
                s.seen.ends
            ));
        }
    }
    let received: Vec<(&str, HashMap<u64, i64>)> = streams
        .iter()
        .map(|s| {
            (
                s.user.as_str(),
                s.seen
                    .seqs
                    .iter()
                    .copied()
                    .zip(s.seen.ids.iter().copied())
                    .collect(),
            )
        })
        .collect();
    for ack in &acks {
        let in_db = store
            .get(&ack.recipient)
            .and_then(|e| e.get(&ack.seq))
            .is_some_and(|id| *id == ack.id);
        let mut everywhere = in_db;
        if !in_db {
            problems.push(format!("acknowledged {ack:?} is not stored"));
        }
        for (user, got) in &received {
            if *user == ack.recipient && got.get(&ack.seq) != Some(&ack.id) {
                everywhere = false;
            }
        }
        if everywhere {
            tally.delivered += 1;
        }
    }
    tally.lost = tally.acknowledged - tally.delivered;

    let recover = recover_ms.map_or_else(|| "n/a".to_owned(), |ms| ms.to_string());
    println!(
        "FAULT {name}: sent={} acknowledged={} delivered={} lost={} duplicated={} recover_ms={recover}",
        tally.sent, tally.acknowledged, tally.delivered, tally.lost, tally.duplicated
    );
    let mut codes: BTreeMap<String, usize> = BTreeMap::new();
    for f in ledger.failures() {
        *codes.entry(format!("{:?}", f.code)).or_default() += 1;
    }
    let resumes: usize = streams
        .iter()
        .map(|s| s.seen.opened_at.len().saturating_sub(1))
        .sum();
    println!(
        "  detail {name}: stored={} (stored but not acknowledged: {}), failed sends by code {codes:?}, \
         streams={} resumes={resumes}",
        tally.stored,
        tally.stored.saturating_sub(tally.acknowledged),
        streams.len()
    );
    assert!(
        problems.is_empty(),
        "{name}: {} problem(s):\n{}",
        problems.len(),
        problems.join("\n")
    );
    assert_eq!((tally.lost, tally.duplicated), (0, 0), "{name}: {tally:?}");
    tally
}

// ---------------------------------------------------------------------------
// Replicas and health
// ---------------------------------------------------------------------------

/// A replica configuration for fault tests: quick to notice a dead
/// database (pool wait 1 s, health every 200 ms, listener probe every
/// 300 ms with a 1 s timeout).
fn fault_config(url: &str) -> Config {
    let mut config = test_config(Some(url.to_owned()));
    config.pool_timeout = Duration::from_secs(1);
    config.health_check_interval = Duration::from_millis(200);
    config.listener.ping_interval = Duration::from_millis(300);
    config.listener.ping_timeout = Duration::from_secs(1);
    config.statement_timeout = Some(FAULT_STATEMENT_TIMEOUT);
    config
}

/// The replicas' statement timeout in these tests: short, so a stall test
/// does not wait out the 10 s default.
const FAULT_STATEMENT_TIMEOUT: Duration = Duration::from_secs(3);

/// `herald serve` flags for process replicas: rate limits off, as in
/// `test_config` (they have their own tests; here they would only throttle
/// the load), then `extra`.
fn process_args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["--rate-per-sender", "0", "--rate-per-recipient", "0"];
    args.extend_from_slice(extra);
    args
}

fn users(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

/// Waits until `probe` is true, polling every 20 ms, for at most `within`.
async fn eventually<F, Fut>(what: &str, within: Duration, mut probe: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !probe().await {
        assert!(start.elapsed() < within, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    start.elapsed()
}

// ---------------------------------------------------------------------------
// 1 and 2: PostgreSQL restarted (fast) and crashed (SIGKILL)
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outage {
    /// `pg_ctl stop -m fast`, later started again.
    FastRestart,
    /// SIGKILL to every server process, later started again (crash
    /// recovery from the WAL).
    Crash,
}

/// PostgreSQL goes away mid-load and comes back. While it is down, sends
/// fail with UNAVAILABLE (no OK for a send issued and answered during the
/// outage, and every OK'd send is stored afterwards), health is
/// NOT_SERVING on both replicas; afterwards the pool and the LISTEN
/// connections come back, health is SERVING, streams catch up, and nothing
/// acknowledged is missing.
///
/// recover_ms: from the moment the server accepts connections again to the
/// first acknowledged send.
async fn postgres_outage(name: &str, outage: Outage) {
    let Some(pg) = PgCluster::start_or_skip(name).await else {
        return;
    };
    let url = pg.url();
    let r0 = server::start(fault_config(&url)).await.expect("replica 0");
    let r1 = server::start(fault_config(&url)).await.expect("replica 1");
    let addrs = vec![r0.addr, r1.addr];
    let users = users("pg", 8);
    let mut followers = Followers::new();
    for u in &users {
        followers.add(u, "r0", vec![r0.addr, r1.addr]);
        followers.add(u, "r1", vec![r1.addr, r0.addr]);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    let ledger = Arc::new(Ledger::default());
    let stop = CancellationToken::new();
    let plan = SendPlan {
        addrs: addrs.clone(),
        users: users.clone(),
        pause: Duration::from_millis(5),
        deadline: Duration::from_secs(5),
        paused: Arc::default(),
    };
    let senders = spawn_senders(4, &plan, &ledger, &stop);
    tokio::time::sleep(Duration::from_secs(1)).await;

    match outage {
        Outage::FastRestart => pg.stop_fast().await,
        Outage::Crash => pg.kill9().await,
    }
    let down = Instant::now();
    for addr in &addrs {
        wait_health(*addr, ServingStatus::NotServing, Duration::from_secs(5)).await;
    }
    // Stay down a while longer, with sends failing all along.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let restarting = Instant::now();
    pg.restart().await;
    let up = Instant::now();
    if outage == Outage::Crash {
        let log = pg.log_text();
        assert!(
            log.contains("not properly shut down; automatic recovery in progress"),
            "the restart after SIGKILL did not run crash recovery:\n{log}"
        );
    }
    let mut serving_ms = 0;
    for addr in &addrs {
        serving_ms = serving_ms.max(
            wait_health(*addr, ServingStatus::Serving, Duration::from_secs(20))
                .await
                .as_millis(),
        );
    }
    let admin = pg.connect().await;
    let a = &admin;
    eventually(
        "both LISTEN connections back",
        Duration::from_secs(5),
        move || async move {
            a.query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'herald-listener'",
                &[],
            )
            .await
            .map(|r| r.get::<_, i64>(0) == 2)
            .unwrap_or(false)
        },
    )
    .await;
    // Keep sending after the recovery, so streams see live events again.
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.cancel();
    join_all(senders).await;

    // During the outage: no send issued after the server was down was
    // answered OK before it started again, and some were refused.
    let acks = ledger.acks();
    let false_oks: Vec<_> = acks
        .iter()
        .filter(|a| a.issued >= down && a.done <= restarting)
        .collect();
    assert!(
        false_oks.is_empty(),
        "OK while the database was down: {false_oks:?}"
    );
    let failures = ledger.failures();
    let refused = failures
        .iter()
        .filter(|f| f.issued >= down && f.done <= restarting)
        .count();
    assert!(refused > 0, "no send failed during the outage");
    let wrong: Vec<_> = failures
        .iter()
        .filter(|f| f.code != Code::Unavailable)
        .collect();
    assert!(
        wrong.is_empty(),
        "failed sends must be UNAVAILABLE: {wrong:?}"
    );

    let streams = followers.finish(&admin, Duration::from_secs(30)).await;
    println!("  detail {name}: health SERVING again {serving_ms} ms after the restart");
    verify(name, &admin, &ledger, &streams, ledger.first_ack_after(up)).await;
    r0.stop(Duration::from_secs(5))
        .await
        .expect("replica 0 stops");
    r1.stop(Duration::from_secs(5))
        .await
        .expect("replica 1 stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_fast_restart_mid_load() {
    bounded(postgres_outage(
        "postgres_fast_restart",
        Outage::FastRestart,
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_sigkill_and_crash_recovery() {
    bounded(postgres_outage("postgres_sigkill", Outage::Crash)).await;
}

// ---------------------------------------------------------------------------
// 3: a replica killed with SIGKILL
// ---------------------------------------------------------------------------

/// A replica process dies with SIGKILL mid-load: its streams end, resume on
/// the other replica from their last seq, and nothing is lost; sends through
/// it fail (not acknowledged) and senders move to the other replica.
///
/// recover_ms: from the kill until the last of the dead replica's streams
/// was open again on the other replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_sigkill_mid_load() {
    bounded(async {
        let name = "replica_sigkill";
        let db = TestDb::create().await;
        let mut a = ProcessReplica::start(Some(&db.url), &process_args(&[]), &[]).await;
        let b = server::start(fault_config(&db.url))
            .await
            .expect("replica b");
        let users = users("rk", 10);
        let mut followers = Followers::new();
        for u in &users {
            followers.add(u, "a", vec![a.addr, b.addr]);
            followers.add(u, "b", vec![b.addr, a.addr]);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;

        let ledger = Arc::new(Ledger::default());
        let stop = CancellationToken::new();
        let plan = SendPlan {
            addrs: vec![a.addr, b.addr],
            users: users.clone(),
            pause: Duration::from_millis(5),
            deadline: Duration::from_secs(5),
            paused: Arc::default(),
        };
        let senders = spawn_senders(4, &plan, &ledger, &stop);
        tokio::time::sleep(Duration::from_secs(1)).await;

        let killed = Instant::now();
        a.kill9().await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        stop.cancel();
        join_all(senders).await;

        let admin = db.connect().await;
        let streams = followers.finish(&admin, Duration::from_secs(30)).await;
        let mut recover = 0;
        for s in streams.iter().filter(|s| s.label == "a") {
            let resumed = s
                .seen
                .opened_at
                .iter()
                .find(|t| **t > killed)
                .unwrap_or_else(|| {
                    panic!("stream a of {} never resumed: {:?}", s.user, s.seen.ends)
                });
            recover = recover.max((*resumed - killed).as_millis());
        }
        verify(name, &admin, &ledger, &streams, Some(recover)).await;
        b.stop(Duration::from_secs(5))
            .await
            .expect("replica b stops");
    })
    .await;
}

// ---------------------------------------------------------------------------
// 4: a half-open LISTEN connection
// ---------------------------------------------------------------------------

/// Only replica A's LISTEN connection goes through a proxy, which then
/// goes silent on it (the socket stays open, nothing passes: a half-open
/// connection that TCP keepalive would take minutes to notice). The
/// listener's liveness probe must notice within its interval + timeout and
/// reconnect (new connections pass), and A's streams must catch up with
/// everything sent while it was deaf — the last sends happen while it is
/// deaf, so only the catch-up after reconnecting can deliver them.
///
/// recover_ms: from silencing until the listener's replacement connection
/// reached the proxy (detection + reconnect).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_listen_connection() {
    bounded(async {
        let name = "half_open_listener";
        const PING_INTERVAL: Duration = Duration::from_millis(200);
        const PING_TIMEOUT: Duration = Duration::from_secs(1);
        let db = TestDb::create().await;
        let proxy = TcpProxy::start(db.server_addr()).await;
        let mut config = fault_config(&db.url);
        config.listener_database_url = Some(db.url_via(proxy.addr));
        config.listener.ping_interval = PING_INTERVAL;
        config.listener.ping_timeout = PING_TIMEOUT;
        let a = server::start(config).await.expect("replica a");
        let b = server::start(fault_config(&db.url))
            .await
            .expect("replica b");
        let users = users("ho", 6);
        let mut followers = Followers::new();
        for u in &users {
            followers.add(u, "a", vec![a.addr, b.addr]);
            followers.add(u, "b", vec![b.addr, a.addr]);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;

        let ledger = Arc::new(Ledger::default());
        let stop = CancellationToken::new();
        let plan = SendPlan {
            addrs: vec![a.addr, b.addr],
            users: users.clone(),
            pause: Duration::from_millis(5),
            deadline: Duration::from_secs(5),
            paused: Arc::default(),
        };
        let senders = spawn_senders(4, &plan, &ledger, &stop);
        tokio::time::sleep(Duration::from_secs(1)).await;

        let connections_before = proxy.accepted();
        proxy.silence_existing();
        let silenced = Instant::now();
        // Sends go on while A is deaf (shorter than the probe timeout, so
        // they all commit before A can notice), then stop.
        tokio::time::sleep(Duration::from_millis(600)).await;
        stop.cancel();
        join_all(senders).await;
        let sent_while_deaf = ledger
            .acks()
            .iter()
            .filter(|a| a.issued >= silenced)
            .count();
        assert!(sent_while_deaf > 0, "nothing was sent while A was deaf");

        let limit = PING_INTERVAL + PING_TIMEOUT + Duration::from_secs(2);
        let p = &proxy;
        eventually("the listener reconnects", limit, move || async move {
            p.accepted() > connections_before
        })
        .await;
        let reconnect_ms = silenced.elapsed().as_millis();

        // The half-open connection's backend must not linger: it still
        // LISTENs, and once its socket buffer is full it stops consuming the
        // NOTIFY queue, which then cannot be truncated for the whole server
        // until the server's TCP gives up (minutes). Only the live LISTEN
        // connections (A's new one, B's) may remain.
        let admin = db.connect().await;
        let (a_db, name_db) = (&admin, &db.name);
        let listeners = || async move {
            a_db.query(
                "SELECT pid, wait_event FROM pg_stat_activity \
                 WHERE datname = $1 AND application_name = 'herald-listener'",
                &[name_db],
            )
            .await
            .map(|rows| {
                rows.iter()
                    .map(|r| (r.get::<_, i32>(0), r.get::<_, Option<String>>(1)))
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
        };
        let start = Instant::now();
        while listeners().await.len() != 2 {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "the half-open LISTEN connection's backend lingers: {:?}",
                listeners().await
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        let streams = followers.finish(&admin, Duration::from_secs(15)).await;
        for s in streams.iter().filter(|s| s.label == "a") {
            assert!(
                s.seen.ends.is_empty(),
                "stream a of {} ended ({:?}): it must catch up in place",
                s.user,
                s.seen.ends
            );
        }
        let caught_up_ms = streams
            .iter()
            .filter(|s| s.label == "a")
            .filter_map(|s| s.seen.received_at.last())
            .map(|t| t.saturating_duration_since(silenced).as_millis())
            .max()
            .unwrap_or(0);
        println!(
            "  detail {name}: {sent_while_deaf} deliveries acknowledged while A was deaf; \
             A's streams complete {caught_up_ms} ms after silencing"
        );
        verify(name, &admin, &ledger, &streams, Some(reconnect_ms)).await;
        a.stop(Duration::from_secs(5))
            .await
            .expect("replica a stops");
        b.stop(Duration::from_secs(5))
            .await
            .expect("replica b stops");
    })
    .await;
}

// ---------------------------------------------------------------------------
// 5: a slow consumer
// ---------------------------------------------------------------------------

/// A subscriber stops reading while 20,000 events of 4 KiB are sent to it.
///
/// Memory bounds (resident memory of the replica process, sampled every
/// 50 ms, against its level after a warm-up): the events' bodies alone are
/// 20,000 × 4 KiB ≈ 78 MiB, so a replica that buffered a non-reading
/// stream's events would exceed both bounds.
/// - While the subscriber does not read, growth stays below
///   [`STALLED_RSS_BOUND_MIB`]: all Herald may hold for the stream is its
///   hub queue (`--stream-queue` 256 events ≈ 1 MiB), the 16-event output
///   buffer and HTTP/2 send buffers (≤ 400 KiB); the rest is slack for the
///   listener's work and the allocator. (Observed: 2–6 MiB.)
/// - Over the whole test, including the drain once it reads again, growth
///   stays below [`SLOW_RSS_BOUND_MIB`]: the backlog is read from the
///   database in pages of 500 events (≈ 2 MiB each); the heap the drain
///   touches is kept by the allocator afterwards. (Observed: ~19 MiB for a
///   20 MiB backlog, 26–33 MiB for this 80 MiB one.)
///
/// Isolation: a second subscriber on the same replica gets each of its own
/// events within [`FAST_LATENCY_BOUND`] of the send being issued,
/// throughout. Then the slow one reads again and gets all 20,300 events,
/// in order, once.
///
/// recover_ms: from the slow subscriber reading again until it had
/// everything.
const SLOW_EVENTS: usize = 20_000;
const SLOW_BODY_BYTES: usize = 4096;
const STALLED_RSS_BOUND_MIB: u64 = 16;
const SLOW_RSS_BOUND_MIB: u64 = 48;
const FAST_LATENCY_BOUND: Duration = Duration::from_secs(2);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_hurts_only_itself() {
    bounded(async {
        let name = "slow_consumer";
        let db = TestDb::create().await;
        let a = ProcessReplica::start(
            Some(&db.url),
            &process_args(&["--stream-queue", "256"]),
            &[],
        )
        .await;
        // B takes the sends; a process of its own, so the load's CPU is not
        // all in the test process.
        let b = ProcessReplica::start(Some(&db.url), &process_args(&[]), &[]).await;
        let ledger = Arc::new(Ledger::default());
        let mut sender = client(b.addr).await;
        let big = |title: String| {
            let mut n = note(&["slow"], &title);
            n.body = "x".repeat(SLOW_BODY_BYTES);
            n
        };

        // The slow subscriber has its own connection (its own device).
        let mut slow_client = client(a.addr).await;
        let mut slow = subscribe(&mut slow_client, "slow", Some(0)).await;
        until_caught_up(&mut slow).await;
        let mut followers = Followers::new();
        followers.add("fast", "a", vec![a.addr]);
        // The fast user's second device, on B (B takes the 20,000 sends;
        // a stream of the slow user there would double its work).
        followers.add("fast", "b", vec![b.addr]);
        tokio::time::sleep(Duration::from_millis(300)).await;

        // Warm-up, read by everyone: allocator and buffers at steady state.
        const WARM: u64 = 300;
        for i in 0..WARM {
            ledger
                .send(&mut sender, big(format!("warm-{i}")), None)
                .await
                .expect("warm-up send");
        }
        let mut slow_seen = Followed::default();
        while slow_seen.seqs.len() < WARM as usize {
            let e = next_event(&mut slow).await;
            slow_seen.seqs.push(e.seq);
            slow_seen.ids.push(notification(&e).id);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (baseline_kib, _) = a.memory_kib();

        // Sample A's memory while the slow subscriber does not read.
        let peak = Arc::new(AtomicU64::new(baseline_kib));
        let sampling = CancellationToken::new();
        let sampler = {
            let (peak, sampling) = (peak.clone(), sampling.clone());
            let pid = a.pid();
            tokio::spawn(async move {
                while !sampling.is_cancelled() {
                    if let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/status"))
                        && let Some(kib) = s
                            .lines()
                            .find_map(|l| l.strip_prefix("VmRSS:"))
                            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                    {
                        peak.fetch_max(kib, Ordering::Relaxed);
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
        };

        // 20,000 events for the slow one (32 concurrent senders), and one
        // every 100 ms for the fast one, timed from issue to arrival.
        let load = CancellationToken::new();
        let fast_sends = {
            let (ledger, load) = (ledger.clone(), load.clone());
            let mut c = lazy_client(b.addr);
            tokio::spawn(async move {
                let mut issued = Vec::new();
                let mut i = 0;
                while !load.is_cancelled() {
                    let at = Instant::now();
                    if let Ok(acks) = ledger.send(&mut c, note(&["fast"], &format!("f{i}")), None).await {
                        issued.push((acks[0].seq, at));
                    }
                    i += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                issued
            })
        };
        let loaded = Instant::now();
        const TASKS: usize = 32;
        const _: () = assert!(SLOW_EVENTS.is_multiple_of(TASKS), "split the load exactly");
        let per_task = SLOW_EVENTS / TASKS;
        let tasks: Vec<_> = (0..TASKS)
            .map(|t| {
                let ledger = ledger.clone();
                let mut c = lazy_client(b.addr);
                tokio::spawn(async move {
                    for i in 0..per_task {
                        let mut n = note(&["slow"], &format!("load-{t}-{i}"));
                        n.body = "x".repeat(SLOW_BODY_BYTES);
                        ledger
                            .send(&mut c, n, Some(Duration::from_secs(10)))
                            .await
                            .expect("load send");
                    }
                })
            })
            .collect();
        join_all(tasks).await;
        let load_secs = loaded.elapsed().as_secs_f64();
        load.cancel();
        let fast_issued = fast_sends.await.expect("fast sender");
        // Let A's listener route everything, still not reading.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let stalled_peak_kib = peak.load(Ordering::Relaxed);

        // The slow subscriber reads again.
        let reading = Instant::now();
        let total = WARM + SLOW_EVENTS as u64;
        loop {
            let last = slow_seen.seqs.last().copied().unwrap_or(0);
            if last >= total {
                break;
            }
            match tokio::time::timeout(EVENT_TIMEOUT, slow.message()).await {
                Ok(Ok(Some(e))) => {
                    if let Some(proto::event::Kind::Notification(n)) = &e.kind {
                        slow_seen.seqs.push(e.seq);
                        slow_seen.ids.push(n.id);
                    }
                }
                // A real client resumes from its last seq (the design allows
                // closing a slow stream with a status to resume from).
                Ok(Ok(None)) | Ok(Err(_)) => {
                    slow_seen.ends.push(Code::Unavailable);
                    slow = subscribe(&mut slow_client, "slow", Some(last)).await;
                }
                Err(_) => panic!("slow subscriber: nothing for {EVENT_TIMEOUT:?} at seq {last}"),
            }
        }
        let drained_ms = reading.elapsed().as_millis();
        sampling.cancel();
        sampler.await.expect("sampler");
        let peak_kib = peak.load(Ordering::Relaxed);
        let (_, hwm_kib) = a.memory_kib();

        let admin = db.connect().await;
        let mut streams = followers.finish(&admin, Duration::from_secs(30)).await;
        streams.push(Stream {
            user: "slow".into(),
            label: "a (slow)".into(),
            seen: slow_seen,
        });

        // Latency of the fast subscriber's own events, issue → arrival.
        let fast = streams
            .iter()
            .find(|s| s.user == "fast" && s.label == "a")
            .expect("fast stream on A");
        let arrived: HashMap<u64, Instant> = fast
            .seen
            .seqs
            .iter()
            .copied()
            .zip(fast.seen.received_at.iter().copied())
            .collect();
        let latencies: Vec<Duration> = fast_issued
            .iter()
            .map(|(seq, at)| {
                arrived
                    .get(seq)
                    .map_or(Duration::MAX, |t| t.saturating_duration_since(*at))
            })
            .collect();
        let late = latencies.iter().filter(|l| **l > FAST_LATENCY_BOUND).count();
        let worst = latencies.iter().max().copied().unwrap_or_default();

        let growth_mib = peak_kib.saturating_sub(baseline_kib) / 1024;
        let stalled_growth_mib = stalled_peak_kib.saturating_sub(baseline_kib) / 1024;
        println!(
            "  detail {name}: {SLOW_EVENTS} × {SLOW_BODY_BYTES} B sent in {load_secs:.1} s; \
             replica RSS {} MiB before; peak {} MiB while stalled (growth {stalled_growth_mib} \
             MiB, bound {STALLED_RSS_BOUND_MIB}), {} MiB overall (growth {growth_mib} MiB, bound \
             {SLOW_RSS_BOUND_MIB}; VmHWM {} MiB); fast subscriber: \
             {} events, worst latency {worst:?}, {late} over {FAST_LATENCY_BOUND:?}",
            baseline_kib / 1024,
            stalled_peak_kib / 1024,
            peak_kib / 1024,
            hwm_kib / 1024,
            latencies.len(),
        );
        verify(name, &admin, &ledger, &streams, Some(drained_ms)).await;
        assert!(
            stalled_growth_mib < STALLED_RSS_BOUND_MIB,
            "replica memory grew by {stalled_growth_mib} MiB while the subscriber did not read \
             (bound {STALLED_RSS_BOUND_MIB} MiB)"
        );
        assert!(
            growth_mib < SLOW_RSS_BOUND_MIB,
            "replica memory grew by {growth_mib} MiB (bound {SLOW_RSS_BOUND_MIB} MiB)"
        );
        assert!(latencies.len() >= 10, "too few fast events: {}", latencies.len());
        assert_eq!(
            late, 0,
            "{late} of the fast subscriber's events took over {FAST_LATENCY_BOUND:?} (worst {worst:?})"
        );
    })
    .await;
}

// ---------------------------------------------------------------------------
// 6: the database stalls
// ---------------------------------------------------------------------------

/// The test holds `LOCK TABLE user_streams IN ACCESS EXCLUSIVE MODE` in an
/// open transaction (as a migration or a stuck admin session would): every
/// send and stream-head read blocks in the database. Calls with a client
/// deadline end, within the deadline plus a small margin, with
/// DEADLINE_EXCEEDED or UNAVAILABLE — or CANCELLED "Timeout expired", which
/// is how a tonic client reports its own deadline passing first (the server
/// answers DEADLINE_EXCEEDED, see `server.rs`); they never hang. A send
/// with no deadline at all is bounded by the server's statement timeout
/// (`--statement-timeout`, [`FAULT_STATEMENT_TIMEOUT`] here) and ends with
/// UNAVAILABLE. When the stall ends, sends succeed and reach the streams.
///
/// recover_ms: from releasing the lock to the first acknowledged send.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_stall() {
    bounded(async {
        let name = "database_stall";
        const DEADLINE: Duration = Duration::from_millis(500);
        const MARGIN: Duration = Duration::from_millis(300);
        let statement_timeout = FAULT_STATEMENT_TIMEOUT;
        let db = TestDb::create().await;
        let r0 = server::start(fault_config(&db.url))
            .await
            .expect("replica 0");
        let r1 = server::start(fault_config(&db.url))
            .await
            .expect("replica 1");
        let users = users("st", 4);
        let mut followers = Followers::new();
        for u in &users {
            followers.add(u, "r0", vec![r0.addr, r1.addr]);
            followers.add(u, "r1", vec![r1.addr, r0.addr]);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;

        let ledger = Arc::new(Ledger::default());
        let stop = CancellationToken::new();
        let plan = SendPlan {
            addrs: vec![r0.addr, r1.addr],
            users: users.clone(),
            pause: Duration::from_millis(20),
            deadline: DEADLINE,
            paused: Arc::default(),
        };
        let senders = spawn_senders(3, &plan, &ledger, &stop);
        tokio::time::sleep(Duration::from_secs(1)).await;

        // The stall. Senders hold off until the no-deadline probe is the
        // first send blocked, so its batch is the one the statement timeout
        // ends (a send queued behind blocked batches waits for them first).
        plan.paused.store(true, Ordering::Release);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let locker = db.connect().await;
        locker
            .batch_execute("BEGIN; LOCK TABLE user_streams IN ACCESS EXCLUSIVE MODE")
            .await
            .expect("take the lock");
        let stalled = Instant::now();
        // For the diagnosis should a send ever get past the lock: the
        // locker's transaction id (rows committed after the lock have a
        // later xmin) and, further down, whether it still holds the lock.
        let locker_txid: i64 = locker
            .query_one("SELECT txid_current()", &[])
            .await
            .expect("the locker's txid")
            .get(0);
        let probe = {
            let ledger = ledger.clone();
            let mut c = lazy_client(r0.addr);
            tokio::spawn(async move {
                ledger
                    .send(&mut c, note(&["st-0"], "no deadline"), None)
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        plan.paused.store(false, Ordering::Release);

        // Reads with a deadline, too (the stream head is behind the lock).
        let mut reader = lazy_client(r1.addr);
        let mut reads = Vec::new();
        for _ in 0..3 {
            let mut request = authed(
                proto::GetUnreadCountRequest::default(),
                &token("st-1", "", ""),
            );
            request.set_timeout(DEADLINE);
            let t = Instant::now();
            let outcome = reader.get_unread_count(request).await;
            reads.push((
                t.elapsed(),
                outcome
                    .map(|_| ())
                    .map_err(|s| (s.code(), s.message().to_owned())),
            ));
        }

        let probed = tokio::time::timeout(statement_timeout + Duration::from_secs(5), probe)
            .await
            .expect("a send without a deadline ends (statement timeout)")
            .expect("probe task");
        let probe_took = stalled.elapsed();
        // Hold the stall a little past the probe's end.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let still_held: i64 = locker
            .query_one(
                "SELECT count(*) FROM pg_locks WHERE pid = pg_backend_pid() \
                 AND relation = 'user_streams'::regclass AND mode = 'AccessExclusiveLock' \
                 AND granted",
                &[],
            )
            .await
            .map_or(-1, |r| r.get(0));
        locker
            .batch_execute("ROLLBACK")
            .await
            .expect("release the lock");
        let released = Instant::now();
        tokio::time::sleep(Duration::from_secs(1)).await;
        stop.cancel();
        join_all(senders).await;

        // Every call with a deadline ended on time, with an allowed code;
        // none succeeded while the lock was held.
        let on_time = |code: Code, message: &str, took: Duration| {
            let allowed = matches!(code, Code::DeadlineExceeded | Code::Unavailable)
                || code == Code::Cancelled && message.contains("Timeout expired");
            allowed && took <= DEADLINE + MARGIN
        };
        let in_stall: Vec<Failure> = ledger
            .failures()
            .into_iter()
            .filter(|f| f.deadline.is_some() && f.issued >= stalled && f.issued < released)
            .collect();
        let bad: Vec<_> = in_stall
            .iter()
            .filter(|f| !on_time(f.code, &f.message, f.done - f.issued))
            .collect();
        assert!(bad.is_empty(), "calls that did not end on time: {bad:?}");
        assert!(
            in_stall.len() >= 5,
            "too few sends ran into the stall: {}",
            in_stall.len()
        );
        let ok_in_stall: Vec<Ack> = ledger
            .acks()
            .into_iter()
            .filter(|a| a.issued >= stalled && a.done < released)
            .collect();
        if !ok_in_stall.is_empty() {
            // What the database says of those rows, to tell a send that got
            // past the lock from a lock that was lost.
            let admin = db.connect().await;
            let mut rows = Vec::new();
            for a in &ok_in_stall {
                let row = admin
                    .query_opt(
                        "SELECT xmin::text, created_at::text FROM notifications WHERE id = $1",
                        &[&a.id],
                    )
                    .await
                    .ok()
                    .flatten()
                    .map(|r| (r.get::<_, String>(0), r.get::<_, String>(1)));
                rows.push((a.id, row));
            }
            panic!(
                "sends succeeded behind the lock: {ok_in_stall:?}; stalled at +0, released at \
                 {:?}; the locker (txid {locker_txid}) still held the lock before release: \
                 {still_held} (1 = yes); the rows (id, xmin, created_at): {rows:?}",
                released - stalled
            );
        }
        assert_eq!(still_held, 1, "the locker lost its lock during the stall");
        for (took, outcome) in &reads {
            match outcome {
                Err((code, message)) => assert!(
                    on_time(*code, message, *took),
                    "read during the stall: {code:?} {message} after {took:?}"
                ),
                Ok(()) => panic!("a read behind the lock succeeded during the stall"),
            }
        }
        match probed {
            Err(f) => {
                assert_eq!(f.code, Code::Unavailable, "{f:?}");
                assert!(
                    probe_took <= statement_timeout + Duration::from_secs(2),
                    "the no-deadline send took {probe_took:?}"
                );
            }
            Ok(acks) => panic!("the no-deadline send succeeded during the stall: {acks:?}"),
        }

        let admin = db.connect().await;
        let streams = followers.finish(&admin, Duration::from_secs(20)).await;
        let slowest = in_stall
            .iter()
            .map(|f| f.done - f.issued)
            .chain(reads.iter().map(|(took, _)| *took))
            .max()
            .unwrap_or_default();
        println!(
            "  detail {name}: {} calls with a {DEADLINE:?} deadline during a {:?} stall all ended \
             within {:?} (slowest {slowest:?}); the no-deadline send ended UNAVAILABLE after \
             {probe_took:?}",
            in_stall.len() + reads.len(),
            released - stalled,
            DEADLINE + MARGIN
        );
        verify(
            name,
            &admin,
            &ledger,
            &streams,
            ledger.first_ack_after(released),
        )
        .await;
        r0.stop(Duration::from_secs(5))
            .await
            .expect("replica 0 stops");
        r1.stop(Duration::from_secs(5))
            .await
            .expect("replica 1 stops");
    })
    .await;
}

// ---------------------------------------------------------------------------
// 7: an idempotent retry on the other replica after the first one died
// ---------------------------------------------------------------------------

/// How the first replica dies during a keyed send.
#[derive(Debug, Clone, Copy)]
enum MidCall {
    /// After it committed, before its reply reached the caller (replies are
    /// held back by a proxy, then the process is killed).
    AfterCommit,
    /// While its transaction waits on a row lock the test holds (nothing
    /// committed); the lock is released after the retry was issued.
    BeforeCommit,
    /// Right after the call was issued, at a random moment.
    Racing,
}

/// A sender's keyed send dies with its replica (SIGKILL) mid-call; the
/// sender retries with the same idempotency key on the other replica. The
/// notification is stored and delivered exactly once, and the retry
/// returns the ids stored (the first call's, when it had answered).
///
/// recover_ms: the longest time from a kill to its retry being
/// acknowledged (the BeforeCommit case includes 300 ms of held lock).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_retry_after_replica_death() {
    bounded(async {
        let name = "idempotent_retry";
        let db = TestDb::create().await;
        let b = server::start(fault_config(&db.url)).await.expect("replica b");
        let admin = db.connect().await;
        let users = users("ik", 4);
        let mut followers = Followers::new();
        for u in &users {
            followers.add(u, "b", vec![b.addr]);
            followers.add(u, "b2", vec![b.addr]);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let ledger = Arc::new(Ledger::default());
        let stop = CancellationToken::new();
        let plan = SendPlan {
            addrs: vec![b.addr],
            users: users.clone(),
            pause: Duration::from_millis(10),
            deadline: Duration::from_secs(5),
            paused: Arc::default(),
        };
        let senders = spawn_senders(2, &plan, &ledger, &stop);
        let mut retry_client = client(b.addr).await;

        let cases = [
            MidCall::AfterCommit,
            MidCall::BeforeCommit,
            MidCall::Racing,
            MidCall::Racing,
            MidCall::Racing,
        ];
        let mut recover = 0;
        for (i, case) in cases.into_iter().enumerate() {
            let key = format!("invoice-{i}");
            let title = format!("keyed-{i}");
            let recipient = users[i % users.len()].clone();
            let request = {
                let mut r = note(&[recipient.as_str()], &title);
                r.idempotency_key = key.clone();
                r
            };
            let mut a = ProcessReplica::start(Some(&db.url), &process_args(&[]), &[]).await;
            // The stream on A fails over to B when A dies.
            followers.add(&recipient, &format!("a{i}"), vec![a.addr, b.addr]);
            let proxy = TcpProxy::start(a.addr).await;
            let mut via_a = client(match case {
                MidCall::AfterCommit => proxy.addr,
                _ => a.addr,
            })
            .await;
            // The connection is up before replies are held back.
            unread(&mut via_a, &recipient).await;

            let mut locker = None;
            if let MidCall::BeforeCommit = case {
                // The recipient's stream row exists (the senders send to
                // every user); hold its lock.
                ledger
                    .send(&mut retry_client, note(&[recipient.as_str()], "row"), None)
                    .await
                    .expect("row");
                let l = db.connect().await;
                l.batch_execute(&format!(
                    "BEGIN; SELECT 1 FROM user_streams WHERE user_id = '{recipient}' FOR UPDATE"
                ))
                .await
                .expect("lock the recipient's row");
                locker = Some(l);
            }
            if let MidCall::AfterCommit = case {
                proxy.silence_replies();
            }
            let first = {
                let (ledger, request) = (ledger.clone(), request.clone());
                tokio::spawn(async move {
                    ledger
                        .send(&mut via_a, request, Some(Duration::from_secs(10)))
                        .await
                })
            };
            match case {
                MidCall::AfterCommit => {
                    let (db, key) = (&admin, &key);
                    eventually("the keyed send commits", Duration::from_secs(5), move || async move {
                        db.query_opt(
                            "SELECT 1 FROM idempotency_keys WHERE key = $1 AND response IS NOT NULL",
                            &[key],
                        )
                        .await
                        .is_ok_and(|r| r.is_some())
                    })
                    .await;
                }
                MidCall::BeforeCommit => {
                    // A's transaction: it claimed the key (the racing senders
                    // send no keys) and now waits for the row lock.
                    let db = &admin;
                    eventually("the keyed send blocks", Duration::from_secs(5), move || async move {
                        db.query_one(
                            "SELECT count(*) FROM pg_stat_activity s \
                             WHERE s.datname = current_database() \
                               AND s.wait_event_type = 'Lock' AND EXISTS ( \
                               SELECT 1 FROM pg_locks l WHERE l.pid = s.pid AND l.granted \
                                 AND l.relation = 'idempotency_keys'::regclass)",
                            &[],
                        )
                        .await
                        .is_ok_and(|r| r.get::<_, i64>(0) > 0)
                    })
                    .await;
                }
                MidCall::Racing => {
                    // Anywhere from before A reads the call to after it
                    // answered (a send takes a few milliseconds here).
                    tokio::time::sleep(Duration::from_micros(fastrand::u64(0..40_000))).await;
                }
            }
            let killed = Instant::now();
            a.kill9().await;
            let first = tokio::time::timeout(Duration::from_secs(15), first)
                .await
                .expect("the first call ends after its replica died")
                .expect("first call task");
            match case {
                MidCall::AfterCommit | MidCall::BeforeCommit => assert!(
                    first.is_err(),
                    "{case:?}: the first call cannot have been answered: {first:?}"
                ),
                MidCall::Racing => {}
            }

            // The retry, like a real client: same key, the other replica.
            let retry = {
                let (ledger, request) = (ledger.clone(), request.clone());
                let mut c = retry_client.clone();
                tokio::spawn(async move {
                    ledger.send(&mut c, request, Some(Duration::from_secs(10))).await
                })
            };
            if let Some(l) = locker.take() {
                tokio::time::sleep(Duration::from_millis(300)).await;
                l.batch_execute("ROLLBACK").await.expect("release the row");
            }
            let retried = retry
                .await
                .expect("retry task")
                .unwrap_or_else(|f| panic!("{case:?}: the retry failed: {f:?}"));
            recover = recover.max(killed.elapsed().as_millis());
            if let Ok(first) = &first {
                let ids = |acks: &[Ack]| acks.iter().map(|a| (a.seq, a.id)).collect::<Vec<_>>();
                assert_eq!(ids(first), ids(&retried), "{case:?}: the retry returned other ids");
            }
            let rows = admin
                .query(
                    "SELECT n.seq, n.id FROM notifications n JOIN contents c ON c.id = n.content_id \
                     WHERE n.user_id = $1 AND c.title = $2",
                    &[&recipient, &title],
                )
                .await
                .expect("read the keyed send's rows");
            let stored: Vec<(u64, i64)> = rows
                .iter()
                .map(|r| (r.get::<_, i64>(0) as u64, r.get(1)))
                .collect();
            assert_eq!(
                stored,
                vec![(retried[0].seq, retried[0].id)],
                "{case:?}: stored exactly once, with the ids the retry returned"
            );
            println!(
                "  detail {name}: {case:?}: first call {}, retry on the other replica returned \
                 seq {} id {}",
                match &first {
                    Ok(_) => "answered OK".to_owned(),
                    Err(f) => format!("failed {:?}", f.code),
                },
                retried[0].seq,
                retried[0].id
            );
            drop(proxy);
        }
        stop.cancel();
        join_all(senders).await;

        let streams = followers.finish(&admin, Duration::from_secs(20)).await;
        verify(name, &admin, &ledger, &streams, Some(recover)).await;
        b.stop(Duration::from_secs(5)).await.expect("replica b stops");
    })
    .await;
}
