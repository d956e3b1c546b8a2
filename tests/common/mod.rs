//! Test helpers: real replicas on random ports, a fresh PostgreSQL database
//! per test (dropped afterwards), typed gRPC clients, and token minting.
//!
//! Postgres is reached at `HERALD_TEST_DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`), which must allow
//! `CREATE DATABASE`.
#![allow(dead_code)]

pub mod pg_cluster;
pub mod process;
pub mod proxy;

use std::{
    future::Future,
    net::SocketAddr,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use herald::{
    auth::{AuthConfig, SEND_SCOPE, VerificationKey},
    config::Config,
    proto::{self, event::Kind, notifications_client::NotificationsClient},
    server::{self, RunningServer},
};
use tokio_postgres::NoTls;
use tonic::{Request, Status, Streaming, transport::Channel};

/// The HS256 secret every test replica verifies with.
pub const SECRET: &[u8] = b"test-secret-for-herald-integration-tests-0123456789";

/// Longest a single test may run.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(90);

/// How long to wait for one expected event.
pub const EVENT_TIMEOUT: Duration = Duration::from_secs(10);

/// Which store the replicas use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Memory,
    Postgres,
}

/// Runs `test` with a time bound, failing the test on timeout.
pub async fn bounded<F: Future<Output = ()>>(test: F) {
    if tokio::time::timeout(TEST_TIMEOUT, test).await.is_err() {
        panic!("test did not finish within {TEST_TIMEOUT:?}");
    }
}

fn admin_url() -> String {
    std::env::var("HERALD_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// `url` with its database name replaced by `db`.
fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let (server, _) = base.rsplit_once('/').unwrap_or((base, ""));
    match query {
        Some(q) => format!("{server}/{db}?{q}"),
        None => format!("{server}/{db}"),
    }
}

/// A database created for one test and dropped when this is dropped.
pub struct TestDb {
    pub name: String,
    pub url: String,
}

impl TestDb {
    pub async fn create() -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let name = format!(
            "herald_test_{}_{}_{nanos}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let admin = admin(&admin_url()).await;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("CREATE DATABASE (is Postgres running?)");
        let url = with_database(&admin_url(), &name);
        Self { name, url }
    }

    /// This database's URL with the server address replaced by `addr` (to
    /// go through a [`proxy::TcpProxy`]).
    pub fn url_via(&self, addr: std::net::SocketAddr) -> String {
        let config: tokio_postgres::Config = self.url.parse().unwrap();
        let user = config.get_user().unwrap_or("postgres");
        format!("postgres://{user}@{addr}/{}", self.name)
    }

    /// The PostgreSQL server's address (TCP).
    pub fn server_addr(&self) -> std::net::SocketAddr {
        let config: tokio_postgres::Config = self.url.parse().unwrap();
        let host = match config.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
            _ => "127.0.0.1".to_owned(),
        };
        let port = config.get_ports().first().copied().unwrap_or(5432);
        let host = if host == "localhost" {
            "127.0.0.1".to_owned()
        } else {
            host
        };
        format!("{host}:{port}").parse().unwrap()
    }

    /// A plain connection to this database, for assertions and faults.
    pub async fn connect(&self) -> tokio_postgres::Client {
        admin(&self.url).await
    }
}

async fn admin(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {url}: {e}"));
    tokio::spawn(connection);
    client
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop runs inside the test's runtime; use a thread with its own.
        let dropped = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                let (client, connection) = tokio_postgres::connect(&admin_url(), NoTls).await?;
                tokio::spawn(connection);
                client
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await
            })
            .map_err(std::io::Error::other)
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("warning: could not drop test database {}", self.name);
        }
    }
}

/// One test's deployment: a store (a fresh database, or memory) and its
/// replicas. Replicas stop, and the database is dropped, when it drops.
pub struct Deployment {
    pub backend: Backend,
    pub db: Option<TestDb>,
    pub replicas: Vec<RunningServer>,
}

/// A configuration for a test replica: port 0, the test secret, fast
/// heartbeats and probes.
pub fn test_config(database_url: Option<String>) -> Config {
    let auth = AuthConfig {
        keys: vec![VerificationKey::Secret(SECRET.to_vec())],
        issuer: None,
        audience: None,
        leeway: herald::auth::DEFAULT_LEEWAY,
    };
    let mut config = Config::new(SocketAddr::from(([127, 0, 0, 1], 0)), auth);
    config.database_url = database_url;
    config.heartbeat_interval = Duration::from_secs(5);
    config.listener.ping_interval = Duration::from_millis(500);
    config.listener.ping_timeout = Duration::from_secs(2);
    config.pool_size = 8;
    // Rate limits have their own tests (tests/limits.rs); here they would
    // only throttle the load the other tests generate.
    config.rates = herald::limits::RateSettings {
        per_sender: 0,
        sender_burst: 0,
        per_recipient: 0,
        recipient_burst: 0,
        tickets_per_minute: 0,
        ticket_burst: 0,
    };
    config
}

impl Deployment {
    /// `replicas` replicas on `backend` (the memory store supports one).
    pub async fn start(backend: Backend, replicas: usize) -> Self {
        Self::start_with(backend, replicas, |_| {}).await
    }

    /// Like [`Deployment::start`], with a configuration tweak.
    pub async fn start_with(
        backend: Backend,
        replicas: usize,
        tweak: impl Fn(&mut Config),
    ) -> Self {
        assert!(backend == Backend::Postgres || replicas == 1);
        let db = match backend {
            Backend::Memory => None,
            Backend::Postgres => Some(TestDb::create().await),
        };
        let mut running = Vec::new();
        for _ in 0..replicas {
            let mut config = test_config(db.as_ref().map(|d| d.url.clone()));
            tweak(&mut config);
            running.push(server::start(config).await.expect("replica starts"));
        }
        Self {
            backend,
            db,
            replicas: running,
        }
    }

    /// `replicas` PostgreSQL replicas on an existing database `db` (they
    /// migrate it as they start).
    pub async fn start_on(db: TestDb, replicas: usize) -> Self {
        let mut running = Vec::new();
        for _ in 0..replicas {
            let config = test_config(Some(db.url.clone()));
            running.push(server::start(config).await.expect("replica starts"));
        }
        Self {
            backend: Backend::Postgres,
            db: Some(db),
            replicas: running,
        }
    }

    /// Ends every replica's LISTEN connection (`pg_terminate_backend`), as
    /// a network fault would; returns how many were ended.
    pub async fn kill_listeners(&self) -> usize {
        let db = self.db.as_ref().expect("a PostgreSQL deployment");
        db.connect()
            .await
            .query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE datname = $1 AND application_name = 'herald-listener'",
                &[&db.name],
            )
            .await
            .expect("end the LISTEN connections")
            .len()
    }

    /// A client of replica `i`.
    pub async fn client(&self, i: usize) -> NotificationsClient<Channel> {
        client(self.replicas[i].addr).await
    }

    /// Replica `i` for multi-replica tests, or replica 0 on the memory store.
    pub fn replica(&self, i: usize) -> usize {
        i.min(self.replicas.len() - 1)
    }

    /// Stops every replica, then drops the database.
    pub async fn stop(self) {
        for r in self.replicas {
            r.stop(Duration::from_secs(5))
                .await
                .expect("replica stops cleanly");
        }
    }
}

/// A gRPC client of the replica at `addr`.
pub async fn client(addr: SocketAddr) -> NotificationsClient<Channel> {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("connect to replica");
    NotificationsClient::new(channel)
}

/// A token for `user` in `tenant` with `scope`, valid for an hour.
pub fn token(user: &str, tenant: &str, scope: &str) -> String {
    herald::auth::mint(SECRET, user, tenant, scope, 3600).unwrap()
}

/// A sender's token (default tenant).
pub fn sender_token() -> String {
    token("billing-service", "", SEND_SCOPE)
}

/// `message` with `authorization: Bearer <token>`.
pub fn authed<T>(message: T, token: &str) -> Request<T> {
    herald::auth::bearer(message, token).expect("a valid token")
}

/// A send request to `recipients`.
pub fn note(recipients: &[&str], title: &str) -> proto::SendNotificationRequest {
    proto::SendNotificationRequest {
        recipients: recipients.iter().map(|r| (*r).to_owned()).collect(),
        r#type: "test.event".into(),
        title: title.into(),
        body: "body".into(),
        data: r#"{"k":1}"#.into(),
        ..Default::default()
    }
}

/// Sends `request` as the test sender.
pub async fn send(
    client: &mut NotificationsClient<Channel>,
    request: proto::SendNotificationRequest,
) -> Result<proto::SendNotificationResponse, Status> {
    client
        .send_notification(authed(request, &sender_token()))
        .await
        .map(tonic::Response::into_inner)
}

/// Opens a stream for `user` (default tenant).
pub async fn subscribe(
    client: &mut NotificationsClient<Channel>,
    user: &str,
    after_seq: Option<u64>,
) -> Streaming<proto::Event> {
    let request = proto::SubscribeRequest {
        after_seq,
        types: vec![],
        ..Default::default()
    };
    client
        .subscribe(authed(request, &token(user, "", "")))
        .await
        .expect("subscribe")
        .into_inner()
}

/// The next event other than a heartbeat, within [`EVENT_TIMEOUT`].
pub async fn next_event(stream: &mut Streaming<proto::Event>) -> proto::Event {
    let deadline = tokio::time::Instant::now() + EVENT_TIMEOUT;
    loop {
        let event = tokio::time::timeout_at(deadline, stream.message())
            .await
            .expect("an event other than a heartbeat within the timeout")
            .expect("stream ok")
            .expect("stream open");
        if !matches!(event.kind, Some(Kind::Heartbeat(_))) {
            return event;
        }
    }
}

/// Reads (and drops) events until the stream ends; returns the status it
/// ended with. Fails if it ends cleanly, or does not end within
/// [`EVENT_TIMEOUT`] of the last event.
pub async fn final_status(stream: &mut Streaming<proto::Event>) -> Status {
    loop {
        match tokio::time::timeout(EVENT_TIMEOUT, stream.message())
            .await
            .expect("the stream ends within the timeout")
        {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("stream ended without a status"),
            Err(status) => return status,
        }
    }
}

/// Reads until `caught_up`, returning the events before it.
pub async fn until_caught_up(stream: &mut Streaming<proto::Event>) -> (Vec<proto::Event>, u64) {
    let mut events = Vec::new();
    loop {
        let event = next_event(stream).await;
        if matches!(event.kind, Some(Kind::CaughtUp(_))) {
            return (events, event.seq);
        }
        events.push(event);
    }
}

/// Reads events until one with seq `last` arrives; returns their seqs.
pub async fn seqs_through(stream: &mut Streaming<proto::Event>, last: u64) -> Vec<u64> {
    let mut seqs = Vec::new();
    loop {
        let event = next_event(stream).await;
        if matches!(event.kind, Some(Kind::CaughtUp(_))) {
            continue;
        }
        seqs.push(event.seq);
        if event.seq >= last {
            return seqs;
        }
    }
}

/// The notification in `event`, or a panic naming what came instead.
pub fn notification(event: &proto::Event) -> &proto::Notification {
    match &event.kind {
        Some(Kind::Notification(n)) => n,
        other => panic!("expected a notification, got {other:?}"),
    }
}

/// Marks `user`'s notifications read up to `seq` (`MarkRead` with
/// `up_to_seq`).
pub async fn mark_up_to(
    client: &mut NotificationsClient<Channel>,
    user: &str,
    seq: u64,
) -> proto::MarkReadResponse {
    client
        .mark_read(authed(
            proto::MarkReadRequest {
                target: Some(proto::mark_read_request::Target::UpToSeq(seq)),
            },
            &token(user, "", ""),
        ))
        .await
        .expect("mark read")
        .into_inner()
}

/// The user's unread count.
pub async fn unread(client: &mut NotificationsClient<Channel>, user: &str) -> u64 {
    client
        .get_unread_count(authed(
            proto::GetUnreadCountRequest::default(),
            &token(user, "", ""),
        ))
        .await
        .expect("unread count")
        .into_inner()
        .unread
}

/// The first page (up to `page_size`) of `user`'s notifications, newest
/// first.
pub async fn list(
    client: &mut NotificationsClient<Channel>,
    user: &str,
    unread_only: bool,
    page_size: u32,
) -> Vec<proto::Notification> {
    client
        .list_notifications(authed(
            proto::ListNotificationsRequest {
                unread_only,
                page_size,
                page_token: String::new(),
                ..Default::default()
            },
            &token(user, "", ""),
        ))
        .await
        .expect("list notifications")
        .into_inner()
        .notifications
}

/// How many replicas a multi-replica test runs on `backend`: two on
/// PostgreSQL, one on the in-memory store (which cannot share its state).
pub fn replicas(backend: Backend) -> usize {
    match backend {
        Backend::Memory => 1,
        Backend::Postgres => 2,
    }
}

/// Asserts `outcome` is INVALID_ARGUMENT with a message that starts with
/// `field` (the server names the offending field first).
pub fn assert_refused_naming<T: std::fmt::Debug>(outcome: Result<T, Status>, field: &str) {
    let err = outcome.expect_err("refused");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{field}: {err:?}");
    assert!(
        err.message().starts_with(&format!("{field}:")),
        "expected the message to name {field}: {}",
        err.message()
    );
}

/// Sends `request`, which must be refused INVALID_ARGUMENT naming `field`.
pub async fn refused_naming(
    client: &mut NotificationsClient<Channel>,
    field: &str,
    request: proto::SendNotificationRequest,
) {
    assert_refused_naming(send(client, request).await, field);
}

/// Waits (up to 15 s, polling) until retention has deleted every stream
/// event (notifications, state and update events) of the database `db` is
/// connected to.
pub async fn until_all_pruned(db: &tokio_postgres::Client) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let left: i64 = db
            .query_one(
                "SELECT (SELECT count(*) FROM notifications) + (SELECT count(*) FROM state_events) \
                 + (SELECT count(*) FROM update_events)",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if left == 0 {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "retention stalled");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Asserts `events` carry exactly seqs `1..=n`, in order.
pub fn assert_exactly_once_in_order(seqs: &[u64], n: u64, who: &str) {
    let want: Vec<u64> = (1..=n).collect();
    if seqs != want.as_slice() {
        let dups = seqs.len() as i64 - n as i64;
        let first_bad = seqs
            .iter()
            .zip(&want)
            .position(|(a, b)| a != b)
            .unwrap_or(seqs.len().min(want.len()));
        panic!(
            "{who}: expected seqs 1..={n} once each in order; got {} events \
             ({dups:+} vs expected), first divergence at index {first_bad}",
            seqs.len()
        );
    }
}

/// Generates one `#[tokio::test]` per backend for each named async fn
/// taking a [`Backend`].
#[macro_export]
macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    $crate::common::bounded(super::$name($crate::common::Backend::Memory)).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    $crate::common::bounded(super::$name($crate::common::Backend::Postgres)).await
                }
            )*
        }
    };
}

/// What a resilient subscriber saw.
#[derive(Debug, Default)]
pub struct Followed {
    /// Seqs of notification and read events, in arrival order.
    pub seqs: Vec<u64>,
    /// Notification id of each event in `seqs` (0 for a read event).
    pub ids: Vec<i64>,
    /// When each event in `seqs` arrived.
    pub received_at: Vec<std::time::Instant>,
    /// When each stream was opened (the first, then every resume).
    pub opened_at: Vec<std::time::Instant>,
    /// Status codes its streams ended with (or failed to open with).
    pub ends: Vec<tonic::Code>,
}

/// When a [`follow_goal`] subscriber stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Goal {
    /// Keep following: the last seq is not known yet.
    Open,
    /// Stop once this seq arrived (at once if it already has).
    Until(u64),
    /// Stop now, with whatever arrived.
    Stop,
}

impl Goal {
    fn reached(self, last: u64) -> bool {
        match self {
            Goal::Open => false,
            Goal::Until(n) => last >= n,
            Goal::Stop => true,
        }
    }
}

/// Follows `user`'s stream like a well-behaved client: starts on
/// `addrs[0]`; on any error resumes from the last seq seen on the next
/// address (round robin, 50 ms apart); stops once seq `until` arrived.
pub async fn follow(addrs: Vec<SocketAddr>, user: String, until: u64) -> Followed {
    let (_keep, goal) = tokio::sync::watch::channel(Goal::Until(until));
    follow_goal(addrs, user, goal).await
}

/// [`follow`], with the stopping point decided while it runs (e.g. once
/// racing senders are done and the database says what the last seq is).
pub async fn follow_goal(
    addrs: Vec<SocketAddr>,
    user: String,
    mut goal: tokio::sync::watch::Receiver<Goal>,
) -> Followed {
    let mut seen = Followed::default();
    let mut at = 0;
    let mut goal_alive = true;
    let token = token(&user, "", "");
    loop {
        let last = seen.seqs.last().copied().unwrap_or(0);
        if goal.borrow().reached(last) {
            return seen;
        }
        let addr = addrs[at % addrs.len()];
        let stream = async {
            let channel = Channel::from_shared(format!("http://{addr}"))
                .unwrap()
                .connect_timeout(Duration::from_secs(2))
                .connect()
                .await
                .map_err(|e| Status::unavailable(e.to_string()))?;
            let request = proto::SubscribeRequest {
                after_seq: Some(last),
                types: vec![],
                ..Default::default()
            };
            NotificationsClient::new(channel)
                .subscribe(authed(request, &token))
                .await
                .map(tonic::Response::into_inner)
        };
        let opened = tokio::select! {
            opened = stream => opened,
            () = goal_changed(&mut goal, &mut goal_alive) => continue, // re-checked above
        };
        let mut stream = match opened {
            Ok(s) => s,
            Err(status) => {
                seen.ends.push(status.code());
                at += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        seen.opened_at.push(std::time::Instant::now());
        loop {
            tokio::select! {
                message = stream.message() => match message {
                    Ok(Some(event)) => {
                        let id = match &event.kind {
                            Some(Kind::Notification(n)) => Some(n.id),
                            Some(Kind::Read(_)) => Some(0),
                            _ => None,
                        };
                        if let Some(id) = id {
                            seen.seqs.push(event.seq);
                            seen.ids.push(id);
                            seen.received_at.push(std::time::Instant::now());
                            if goal.borrow().reached(event.seq) {
                                return seen;
                            }
                        }
                    }
                    Ok(None) => {
                        seen.ends.push(tonic::Code::Ok);
                        break;
                    }
                    Err(status) => {
                        seen.ends.push(status.code());
                        break;
                    }
                },
                () = goal_changed(&mut goal, &mut goal_alive) => {
                    if goal.borrow().reached(seen.seqs.last().copied().unwrap_or(0)) {
                        return seen;
                    }
                }
            }
        }
        at += 1;
    }
}

/// Resolves when `goal` changes; never, once its sender is gone (the goal
/// can no longer change).
async fn goal_changed(goal: &mut tokio::sync::watch::Receiver<Goal>, alive: &mut bool) {
    if *alive && goal.changed().await.is_ok() {
        return;
    }
    *alive = false;
    std::future::pending::<()>().await;
}

/// The health (`grpc.health.v1`) of `service` on the replica at `addr`
/// ("" is the overall health). Connecting and the call are bounded by 1 s.
pub async fn health_of(
    addr: SocketAddr,
    service: &str,
) -> Result<tonic_health::pb::health_check_response::ServingStatus, Status> {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(1))
        .connect()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let mut request = Request::new(HealthCheckRequest {
        service: service.to_owned(),
    });
    request.set_timeout(Duration::from_secs(1));
    let response = HealthClient::new(channel).check(request).await?;
    Ok(response.into_inner().status())
}

/// The overall ("") health of the replica at `addr`.
pub async fn health(
    addr: SocketAddr,
) -> Result<tonic_health::pb::health_check_response::ServingStatus, Status> {
    health_of(addr, "").await
}

/// Waits until `addr`'s overall health is `want`, polling every 50 ms;
/// returns how long that took. Fails after `within`.
pub async fn wait_health(
    addr: SocketAddr,
    want: tonic_health::pb::health_check_response::ServingStatus,
    within: Duration,
) -> Duration {
    let start = std::time::Instant::now();
    loop {
        let got = health(addr).await;
        if matches!(got, Ok(s) if s == want) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "health of {addr} still {got:?}, wanted {want:?} within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
