//! `herald-bench`: Herald's load generator. It creates a fresh database,
//! starts real `herald serve` replicas (or targets given ones), drives them
//! with the real tonic client, and checks every subscriber's stream for
//! loss, duplicates and order — failing (exit 1) if any. See BENCHMARKS.md.
//!
//! Latency is measured from just before a `SendNotification` call starts to
//! the moment the event arrives on a subscriber's stream: the send's start
//! time (nanoseconds since the bench started) travels in the title.

use std::{
    collections::HashMap,
    net::SocketAddr,
    process::Stdio,
    sync::{
        Arc, LazyLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use herald::{
    auth::{self, SEND_SCOPE},
    proto::{self, event::Kind, notifications_client::NotificationsClient},
};
use serde::Serialize;
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
    sync::Barrier,
};
use tokio_postgres::NoTls;
use tonic::{Request, transport::Channel};

/// mimalloc: the service allocates many small, short-lived buffers per
/// request (HTTP/2 frames, protobuf messages); under load glibc's malloc
/// was ~18% of replica CPU in profiles (BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

static BASE: LazyLock<Instant> = LazyLock::new(Instant::now);

fn now_ns() -> u64 {
    u64::try_from(BASE.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// Herald's load generator.
#[derive(Debug, Parser)]
#[command(name = "herald-bench")]
struct Cli {
    #[command(flatten)]
    setup: Setup,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Debug, Args)]
struct Setup {
    /// PostgreSQL URL allowed to CREATE DATABASE; a fresh one is made per run.
    #[arg(
        long,
        env = "HERALD_BENCH_ADMIN_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    admin_url: String,
    /// Replicas to start.
    #[arg(long, default_value_t = 2)]
    replicas: usize,
    /// Target running replicas instead (comma-separated URLs); they must
    /// share one database and verify tokens with --secret.
    #[arg(long, value_delimiter = ',')]
    targets: Vec<String>,
    /// HS256 secret to mint tokens with (and start replicas with).
    #[arg(
        long,
        env = "HERALD_JWT_SECRET",
        default_value = "herald-bench-secret-0123456789abcdef-0123456789"
    )]
    secret: String,
    /// The `herald` binary; default: next to this one.
    #[arg(long)]
    herald: Option<std::path::PathBuf>,
    /// Extra `herald serve` flag for started replicas (repeatable), e.g.
    /// `--replica-arg=--group-commit-window=1ms`.
    #[arg(long = "replica-arg", allow_hyphen_values = true)]
    replica_args: Vec<String>,
    /// Write results as JSON (an array of rows) to this file.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// HTTP/2 connections per replica for subscribers (latency, throughput,
    /// fanout).
    #[arg(long, default_value_t = 8)]
    connections: usize,
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// Single-recipient sends at a fixed rate to random subscribers spread
    /// over the replicas; all sends go through replica A.
    Latency(Load),
    /// Raise the rate step by step until p99 exceeds the limit or anything
    /// is lost; report the highest rate held.
    Throughput {
        #[command(flatten)]
        load: Load,
        /// Rate increment per step, sends/s.
        #[arg(long, default_value_t = 2_000)]
        step: u64,
        /// Highest rate tried, sends/s.
        #[arg(long, default_value_t = 40_000)]
        max_rate: u64,
        /// p99 above this ends the search, milliseconds.
        #[arg(long, default_value_t = 50.0)]
        p99_limit_ms: f64,
    },
    /// Sends with K recipients each; every recipient has a stream.
    Fanout(Load),
    /// `SendNotifications` calls of `--items` single-recipient items each,
    /// to random subscribers; `--rate` is calls/s. Latency is per item.
    Bulk {
        #[command(flatten)]
        load: Load,
        /// Items per call.
        #[arg(long, default_value_t = 100)]
        items: usize,
    },
    /// Open S idle streams on replica A over N HTTP/2 connections (or, with
    /// `--grpc-web`, one HTTP/1.1 connection each); report RSS per stream
    /// and time to open them.
    Streams {
        /// Streams to open.
        #[arg(long, default_value_t = 10_000)]
        streams: usize,
        /// HTTP/2 connections to spread them over.
        #[arg(long, default_value_t = 100)]
        stream_connections: usize,
        /// Open them as Server-Sent Events instead, each on its own
        /// HTTP/1.1 connection (`--stream-connections` is ignored).
        #[arg(long, conflicts_with = "grpc_web")]
        sse: bool,
        /// Open each stream as a browser does: a grpc-web call
        /// (`application/grpc-web+proto`) on its own HTTP/1.1 connection;
        /// `--stream-connections` is then ignored.
        #[arg(long)]
        grpc_web: bool,
    },
}

#[derive(Debug, Clone, Args)]
struct Load {
    /// Subscribers (one stream each, users u0..uS-1). For fanout: also the
    /// recipients of every send.
    #[arg(long, default_value_t = 2_000)]
    subscribers: usize,
    /// Offered send rate, sends/s (throughput: the first step).
    #[arg(long, default_value_t = 2_000)]
    rate: u64,
    /// How long to send, e.g. `10s`.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Concurrent sending callers.
    #[arg(long, default_value_t = 32)]
    callers: usize,
    /// Connections from the callers to replica A.
    #[arg(long, default_value_t = 4)]
    send_connections: usize,
    /// Subscribers read Server-Sent Events (`GET /v1/events`, one HTTP/1.1
    /// connection each) instead of gRPC streams.
    #[arg(long)]
    sse: bool,
    /// Sends carry every presentation field (category, severity, actor,
    /// action URL, two actions) and an expiry (a day out), as a rich
    /// inbox's would.
    #[arg(long)]
    rich: bool,
    /// The first part of each run, e.g. `1s`, whose sends are checked for
    /// loss, duplicates and order but left out of the latency figures
    /// (fresh connections, caches and prepared statements warm up).
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    warmup: Duration,
}

/// One result row; keys are stable (BENCHMARKS.md).
#[derive(Debug, Clone, Serialize)]
struct Row {
    scenario: String,
    replicas: usize,
    streams: usize,
    offered_rate: u64,
    sent: u64,
    delivered: u64,
    lost: u64,
    duplicates: u64,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    max_ms: f64,
    deliveries_per_s: f64,
    rss_kib_per_replica: Vec<u64>,
    cpu_s_per_replica: Vec<f64>,
    /// CPU seconds of the whole local PostgreSQL cluster over the run;
    /// `null` when the database is not on this machine.
    pg_cpu_s: Option<f64>,
    /// (replicas' + PostgreSQL's CPU) / sends acknowledged, microseconds.
    server_cpu_us_per_send: f64,
}

impl Row {
    fn print_header() {
        println!(
            "{:<12} {:>8} {:>8} {:>9} {:>9} {:>5} {:>5} {:>8} {:>8} {:>8} {:>8} {:>11} {:>18} {:>14} {:>8} {:>9}",
            "scenario",
            "streams",
            "rate",
            "sent",
            "delivered",
            "lost",
            "dups",
            "p50 ms",
            "p99 ms",
            "p999 ms",
            "max ms",
            "deliv/s",
            "rss KiB/replica",
            "cpu s/replica",
            "pg cpu s",
            "µs/send"
        );
    }

    fn print(&self) {
        println!(
            "{:<12} {:>8} {:>8} {:>9} {:>9} {:>5} {:>5} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>11.0} {:>18} {:>14} {:>8} {:>9.0}",
            self.scenario,
            self.streams,
            self.offered_rate,
            self.sent,
            self.delivered,
            self.lost,
            self.duplicates,
            self.p50_ms,
            self.p99_ms,
            self.p999_ms,
            self.max_ms,
            self.deliveries_per_s,
            format!("{:?}", self.rss_kib_per_replica),
            format!("{:.1?}", self.cpu_s_per_replica),
            self.pg_cpu_s.map_or("-".to_owned(), |s| format!("{s:.1}")),
            self.server_cpu_us_per_send,
        );
    }
}

/// A replica under test.
struct Replica {
    url: String,
    pid: Option<u32>,
    _child: Option<Child>,
}

/// The system under test; its database is dropped and its replicas killed
/// on drop.
struct Bench {
    replicas: Vec<Replica>,
    secret: String,
    admin_url: String,
    database: Option<String>,
    connections: usize,
    /// The local PostgreSQL's postmaster, when the database runs here.
    postmaster: Option<u32>,
}

impl Bench {
    async fn start(setup: &Setup) -> anyhow::Result<Self> {
        if !setup.targets.is_empty() {
            return Ok(Self {
                replicas: setup
                    .targets
                    .iter()
                    .map(|url| Replica {
                        url: url.clone(),
                        pid: None,
                        _child: None,
                    })
                    .collect(),
                secret: setup.secret.clone(),
                admin_url: setup.admin_url.clone(),
                database: None,
                connections: setup.connections,
                postmaster: None,
            });
        }
        let herald = match &setup.herald {
            Some(p) => p.clone(),
            None => std::env::current_exe()?
                .parent()
                .context("no parent directory")?
                .join("herald"),
        };
        let name = format!("herald_bench_{}_{}", std::process::id(), now_ns());
        let admin = connect(&setup.admin_url).await?;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await?;
        let url = with_database(&setup.admin_url, &name);
        let backend: i32 = admin
            .query_one("SELECT pg_backend_pid()", &[])
            .await?
            .get(0);
        let mut bench = Self {
            replicas: Vec::new(),
            secret: setup.secret.clone(),
            admin_url: setup.admin_url.clone(),
            database: Some(name),
            connections: setup.connections,
            postmaster: u32::try_from(backend).ok().and_then(parent),
        };
        for _ in 0..setup.replicas.max(1) {
            bench
                .replicas
                .push(spawn_replica(&herald, &url, &setup.secret, &setup.replica_args).await?);
        }
        Ok(bench)
    }

    async fn channels(&self, replica: usize, n: usize) -> anyhow::Result<Vec<Channel>> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n.max(1) {
            out.push(
                Channel::from_shared(self.replicas[replica].url.clone())?
                    .tcp_nodelay(true)
                    .connect()
                    .await
                    .with_context(|| format!("connect to {}", self.replicas[replica].url))?,
            );
        }
        Ok(out)
    }

    fn token(&self, user: &str, scope: &str) -> anyhow::Result<String> {
        Ok(auth::mint(
            self.secret.as_bytes(),
            user,
            "",
            scope,
            24 * 3600,
        )?)
    }

    fn usage(&self) -> Vec<Usage> {
        self.replicas
            .iter()
            .map(|r| r.pid.map(usage).unwrap_or_default())
            .collect()
    }

    async fn cleanup(self) {
        drop(self.replicas); // kill_on_drop
        tokio::time::sleep(Duration::from_millis(200)).await;
        if let Some(name) = &self.database
            && let Ok(admin) = connect(&self.admin_url).await
        {
            let _ = admin
                .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .await;
        }
    }
}

async fn connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

fn with_database(url: &str, db: &str) -> String {
    let (base, query) = url
        .split_once('?')
        .map_or((url, None), |(b, q)| (b, Some(q)));
    let server = base.rsplit_once('/').map_or(base, |(s, _)| s);
    match query {
        Some(q) => format!("{server}/{db}?{q}"),
        None => format!("{server}/{db}"),
    }
}

async fn spawn_replica(
    herald: &std::path::Path,
    database_url: &str,
    secret: &str,
    extra: &[String],
) -> anyhow::Result<Replica> {
    let mut child = Command::new(herald)
        .args(["serve", "--listen", "127.0.0.1:0", "--log-format", "json"])
        // The bench is one sender flooding a few users on purpose.
        .args(["--rate-per-sender", "0", "--rate-per-recipient", "0"])
        .args(extra)
        .env("DATABASE_URL", database_url)
        .env("HERALD_JWT_SECRET", secret)
        .env("RUST_LOG", "warn,herald::server=info")
        .env_remove("HERALD_DEV")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("start {}", herald.display()))?;
    let stderr = child.stderr.take().context("no stderr")?;
    let mut lines = BufReader::new(stderr).lines();
    let addr: SocketAddr = loop {
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .context("replica did not start within 30 s")??
            .context("replica exited before serving")?;
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if v["fields"]["message"] == "serving with PostgreSQL" {
            break v["fields"]["addr"].as_str().context("no addr")?.parse()?;
        }
        if v["level"] == "ERROR" {
            bail!("replica failed: {line}");
        }
    };
    // Keep draining its logs so it never blocks on a full pipe.
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains("\"ERROR\"") {
                eprintln!("replica: {line}");
            }
        }
    });
    Ok(Replica {
        url: format!("http://{addr}"),
        pid: child.id(),
        _child: Some(child),
    })
}

/// A process's resident memory and CPU time so far, from /proc (proc(5)).
#[derive(Debug, Clone, Copy, Default)]
struct Usage {
    rss_kib: u64,
    cpu_s: f64,
}

fn usage(pid: u32) -> Usage {
    let rss_kib = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0);
    // utime + stime, in clock ticks.
    let ticks = stat_fields(pid)
        .and_then(|f| Some(f.get(11)? + f.get(12)?))
        .unwrap_or(0);
    Usage {
        rss_kib,
        cpu_s: ticks as f64 / clock_ticks_per_s(),
    }
}

/// Fields of /proc/PID/stat after the `)` that ends the command name
/// (proc(5): field 4, the parent pid, is index 1; utime, stime, cutime,
/// cstime are 11 to 14).
fn stat_fields(pid: u32) -> Option<Vec<u64>> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = s.rsplit_once(')')?.1;
    Some(
        rest.split_whitespace()
            .map(|f| f.parse().unwrap_or(0))
            .collect(),
    )
}

/// The parent of a process on this machine.
fn parent(pid: u32) -> Option<u32> {
    let ppid = *stat_fields(pid)?.get(1)?;
    u32::try_from(ppid).ok().filter(|&p| p > 1)
}

/// CPU seconds used so far by the PostgreSQL cluster whose postmaster is
/// `postmaster`: its own time, its exited children's (cutime, cstime:
/// backends that ended and were waited for), and every live child's.
fn pg_cpu_s(postmaster: u32) -> Option<f64> {
    let own = stat_fields(postmaster)?;
    let mut ticks: u64 = own.get(11..15)?.iter().sum();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if let Some(f) = stat_fields(pid)
            && f.get(1) == Some(&u64::from(postmaster))
        {
            ticks += f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
        }
    }
    Some(ticks as f64 / clock_ticks_per_s())
}

/// The unit of /proc's CPU times (sysconf(3) `_SC_CLK_TCK`).
fn clock_ticks_per_s() -> f64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64
}

/// CPU seconds each replica used between two readings.
fn cpu_between(before: &[Usage], after: &[Usage]) -> Vec<f64> {
    after
        .iter()
        .zip(before)
        .map(|(a, b)| a.cpu_s - b.cpu_s)
        .collect()
}

fn authed<T>(message: T, token: &str) -> anyhow::Result<Request<T>> {
    Ok(auth::bearer(message, token)?)
}

/// What one subscriber saw.
#[derive(Debug, Default)]
struct Seen {
    delivered: u64,
    duplicates: u64,
    out_of_order: u64,
    latencies_us: Vec<u32>,
}

/// Per-user count of acknowledged sends, shared by senders and the final
/// check.
struct Expected(Vec<AtomicU64>);

/// What the load check needs of one event.
struct Seen1 {
    seq: u64,
    caught_up: bool,
    /// A notification's title; `None` for other kinds.
    title: Option<String>,
}

/// A subscriber's stream: gRPC or Server-Sent Events.
enum Source {
    Grpc(tonic::Streaming<proto::Event>),
    Sse(SseReader),
}

impl Source {
    /// The next event other than a heartbeat.
    async fn next(&mut self) -> anyhow::Result<Seen1> {
        match self {
            Self::Grpc(stream) => loop {
                let event = stream.message().await?.context("stream ended early")?;
                let (caught_up, title) = match event.kind {
                    Some(Kind::Notification(n)) => (false, Some(n.title)),
                    Some(Kind::CaughtUp(_)) => (true, None),
                    Some(Kind::Heartbeat(_)) => continue,
                    _ => (false, None),
                };
                return Ok(Seen1 {
                    seq: event.seq,
                    caught_up,
                    title,
                });
            },
            Self::Sse(reader) => reader.next().await,
        }
    }
}

/// `GET /v1/events` on its own HTTP/1.1 connection, read event by event.
struct SseReader {
    body: hyper::body::Incoming,
    buffer: Vec<u8>,
    _connection: tokio::task::JoinHandle<()>,
}

impl SseReader {
    /// Opens `url`'s event stream for `token`'s user with `query`.
    async fn open(url: &str, token: &str, query: &str) -> anyhow::Result<Self> {
        let uri: http::Uri = format!("{url}/v1/events?{query}").parse()?;
        let authority = uri.authority().context("no host in the URL")?.clone();
        let tcp = tokio::net::TcpStream::connect(authority.as_str()).await?;
        tcp.set_nodelay(true)?;
        let (mut send, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await?;
        let connection = tokio::spawn(async move {
            let _ = connection.await;
        });
        let request = http::Request::get(uri)
            .header(http::header::HOST, authority.as_str())
            .header(http::header::AUTHORIZATION, format!("Bearer {token}"))
            .body(http_body_util::Empty::<bytes::Bytes>::new())?;
        let response = send.send_request(request).await?;
        if !response.status().is_success() {
            bail!("GET /v1/events: {}", response.status());
        }
        Ok(Self {
            body: response.into_body(),
            buffer: Vec::new(),
            _connection: connection,
        })
    }

    /// The next event (heartbeat comments skipped).
    async fn next(&mut self) -> anyhow::Result<Seen1> {
        use http_body_util::BodyExt;
        loop {
            if let Some(end) = self.buffer.windows(2).position(|w| w == b"\n\n") {
                let block: Vec<u8> = self.buffer.drain(..end + 2).collect();
                let block = std::str::from_utf8(&block)?;
                let (mut kind, mut data) = ("", "");
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event: ") {
                        kind = v;
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        data = v;
                    }
                }
                if data.is_empty() {
                    continue;
                }
                if kind == "error" {
                    bail!("the stream ended: {data}");
                }
                let event: serde_json::Value = serde_json::from_str(data)?;
                let seq = event["seq"].as_str().unwrap_or("0").parse()?;
                return Ok(Seen1 {
                    seq,
                    caught_up: kind == "caught_up",
                    title: (kind == "notification").then(|| {
                        event["notification"]["title"]
                            .as_str()
                            .unwrap_or_default()
                            .to_owned()
                    }),
                });
            }
            let frame = self.body.frame().await.context("stream ended early")??;
            if let Ok(data) = frame.into_data() {
                self.buffer.extend_from_slice(&data);
            }
        }
    }
}

/// Opens one stream per user in `users`, spread over every replica's
/// channels; returns once all are caught up. Each task ends when its user's
/// stream has delivered `expected` events, or at `stop`.
async fn open_subscribers(
    bench: &Bench,
    users: std::ops::Range<usize>,
    sse: bool,
    expected: Arc<Expected>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<anyhow::Result<Seen>>>> {
    let mut channels = Vec::new();
    for r in 0..bench.replicas.len() {
        channels.push(
            bench
                .channels(r, if sse { 1 } else { bench.connections })
                .await?,
        );
    }
    let urls: Vec<String> = bench.replicas.iter().map(|r| r.url.clone()).collect();
    let ready = Arc::new(Barrier::new(users.len() + 1));
    let mut tasks = Vec::with_capacity(users.len());
    for u in users {
        let replica = u % channels.len();
        let channel = channels[replica][(u / channels.len()) % channels[replica].len()].clone();
        let url = urls[replica].clone();
        let token = bench.token(&format!("u{u}"), "")?;
        let ready = ready.clone();
        let expected = expected.clone();
        let mut stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut stream = if sse {
                Source::Sse(SseReader::open(&url, &token, "last_event_id=0:0").await?)
            } else {
                let request = proto::SubscribeRequest {
                    after_seq: Some(0),
                    ..Default::default()
                };
                Source::Grpc(
                    NotificationsClient::new(channel)
                        .subscribe(authed(request, &token)?)
                        .await?
                        .into_inner(),
                )
            };
            // The order check starts where the backlog ends (earlier runs of
            // a throughput search leave one).
            let mut last = loop {
                let event = stream.next().await?;
                if event.caught_up {
                    break event.seq;
                }
            };
            ready.wait().await;
            let mut seen = Seen::default();
            loop {
                let event = tokio::select! {
                    event = stream.next() => event?,
                    // Sending is over: stop once everything acknowledged
                    // has arrived, else keep reading (the caller's drain
                    // deadline bounds the wait). `changed` fires once.
                    _ = stop.changed() => {
                        if seen.delivered >= expected.0[u].load(Ordering::Acquire) {
                            break;
                        }
                        continue;
                    }
                };
                let Some(title) = &event.title else {
                    continue;
                };
                let at = now_ns();
                if event.seq <= last {
                    seen.duplicates += 1;
                    continue;
                }
                if event.seq != last + 1 {
                    seen.out_of_order += 1;
                }
                last = event.seq;
                seen.delivered += 1;
                if let Some(t) = title.strip_prefix("t:").and_then(|t| t.parse::<u64>().ok()) {
                    let us = at.saturating_sub(t) / 1_000;
                    seen.latencies_us
                        .push(u32::try_from(us).unwrap_or(u32::MAX));
                }
                if seen.delivered >= expected.0[u].load(Ordering::Acquire) && *stop.borrow() {
                    break;
                }
            }
            Ok(seen)
        }));
    }
    ready.wait().await;
    Ok(tasks)
}

/// Sends at `rate`/s for `duration` from `callers` callers through replica
/// A, each send to users chosen by `pick`. With `items` > 1 each call is a
/// `SendNotifications` of that many sends. Returns sends acknowledged.
async fn drive(
    bench: &Bench,
    load: &Load,
    rate: u64,
    items: usize,
    expected: Arc<Expected>,
    pick: impl Fn(&mut fastrand::Rng) -> Vec<usize> + Send + Sync + Clone + 'static,
) -> anyhow::Result<u64> {
    let channels = bench.channels(0, load.send_connections).await?;
    let token = bench.token("bench-sender", SEND_SCOPE)?;
    let callers = load.callers.max(1);
    let rich = load.rich;
    let period = Duration::from_secs_f64(callers as f64 / rate.max(1) as f64);
    let end = tokio::time::Instant::now() + load.duration;
    let warm_until = tokio::time::Instant::now() + load.warmup.min(load.duration);
    let mut tasks = Vec::new();
    for c in 0..callers {
        let mut client = NotificationsClient::new(channels[c % channels.len()].clone());
        let token = token.clone();
        let expected = expected.clone();
        let pick = pick.clone();
        let start = tokio::time::Instant::now() + period.mul_f64(c as f64 / callers as f64);
        tasks.push(tokio::spawn(async move {
            let mut rng = fastrand::Rng::with_seed(c as u64);
            let mut ticks = tokio::time::interval_at(start, period);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut acked = 0u64;
            loop {
                // Stop on the wall clock, not the schedule: a caller that
                // fell behind must not keep sending past the end.
                ticks.tick().await;
                if tokio::time::Instant::now() >= end {
                    return Ok::<_, anyhow::Error>(acked);
                }
                // "w:" marks a warm-up send: checked, but not timed.
                let mark = if tokio::time::Instant::now() < warm_until {
                    "w"
                } else {
                    "t"
                };
                let request = |users: &[usize]| {
                    let mut r = proto::SendNotificationRequest {
                        recipients: users.iter().map(|u| format!("u{u}")).collect(),
                        r#type: "bench".into(),
                        title: format!("{mark}:{}", now_ns()),
                        ..Default::default()
                    };
                    if rich {
                        r.category = "builds".into();
                        r.severity = proto::Severity::High as i32;
                        r.actor = "ci-runner".into();
                        r.action_url = "https://ci.example.com/builds/42".into();
                        r.actions = vec![
                            proto::Action {
                                label: "Open".into(),
                                url: "/builds/42".into(),
                            },
                            proto::Action {
                                label: "Retry".into(),
                                url: "/builds/42/retry".into(),
                            },
                        ];
                        let day = std::time::Duration::from_secs(24 * 3600);
                        r.expires_at = Some((std::time::SystemTime::now() + day).into());
                    }
                    r
                };
                if items <= 1 {
                    let users = pick(&mut rng);
                    client
                        .send_notification(authed(request(&users), &token)?)
                        .await?;
                    for u in users {
                        expected.0[u].fetch_add(1, Ordering::AcqRel);
                    }
                    acked += 1;
                    continue;
                }
                let batch: Vec<Vec<usize>> = (0..items).map(|_| pick(&mut rng)).collect();
                let notifications = batch.iter().map(|users| request(users)).collect();
                let results = client
                    .send_notifications(authed(
                        proto::SendNotificationsRequest { notifications },
                        &token,
                    )?)
                    .await?
                    .into_inner()
                    .results;
                for r in results {
                    let users = batch
                        .get(r.index as usize)
                        .context("a result for no item")?;
                    if r.code != 0 {
                        bail!("item {} failed: {} {}", r.index, r.code, r.message);
                    }
                    for &u in users {
                        expected.0[u].fetch_add(1, Ordering::AcqRel);
                    }
                    acked += 1;
                }
            }
        }));
    }
    let mut sent = 0;
    for t in tasks {
        sent += t.await??;
    }
    Ok(sent)
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    f64::from(sorted[i]) / 1_000.0
}

/// One load run: subscribers, sends, drain, check.
async fn run_load(
    bench: &Bench,
    scenario: &str,
    load: &Load,
    rate: u64,
    fanout: bool,
    items: usize,
) -> anyhow::Result<Row> {
    let users = load.subscribers.max(1);
    let expected = Arc::new(Expected((0..users).map(|_| AtomicU64::new(0)).collect()));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let subscribers =
        open_subscribers(bench, 0..users, load.sse, expected.clone(), stop_rx).await?;
    let before = bench.usage();
    let pg_before = bench.postmaster.and_then(pg_cpu_s);
    let started = Instant::now();
    let sent = if fanout {
        drive(bench, load, rate, items, expected.clone(), move |_| {
            (0..users).collect()
        })
        .await?
    } else {
        drive(bench, load, rate, items, expected.clone(), move |rng| {
            vec![rng.usize(0..users)]
        })
        .await?
    };
    // Drain: wait for everything acknowledged to arrive (at most 30 s).
    let want: u64 = expected.0.iter().map(|e| e.load(Ordering::Acquire)).sum();
    let _ = stop_tx.send(true);
    let mut seen = Vec::with_capacity(subscribers.len());
    let drain = tokio::time::Instant::now() + Duration::from_secs(30);
    for (u, task) in subscribers.into_iter().enumerate() {
        let abort = task.abort_handle();
        match tokio::time::timeout_at(drain, task).await {
            Ok(joined) => seen.push(joined??),
            Err(_) => {
                abort.abort();
                eprintln!("u{u}: did not receive everything within the drain time");
                seen.push(Seen::default());
            }
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let after = bench.usage();
    let pg_cpu = bench
        .postmaster
        .and_then(pg_cpu_s)
        .zip(pg_before)
        .map(|(a, b)| a - b);
    let cpu = cpu_between(&before, &after);
    let server_cpu_s = cpu.iter().sum::<f64>() + pg_cpu.unwrap_or(0.0);
    let delivered: u64 = seen.iter().map(|s| s.delivered).sum();
    let duplicates: u64 = seen.iter().map(|s| s.duplicates).sum();
    let out_of_order: u64 = seen.iter().map(|s| s.out_of_order).sum();
    let mut latencies: Vec<u32> = seen.into_iter().flat_map(|s| s.latencies_us).collect();
    latencies.sort_unstable();
    if out_of_order > 0 {
        eprintln!("ORDER VIOLATION: {out_of_order} events arrived after a gap");
    }
    Ok(Row {
        scenario: scenario.to_owned(),
        replicas: bench.replicas.len(),
        streams: users,
        offered_rate: rate,
        sent,
        delivered,
        lost: want.saturating_sub(delivered) + out_of_order,
        duplicates,
        p50_ms: percentile(&latencies, 0.50),
        p99_ms: percentile(&latencies, 0.99),
        p999_ms: percentile(&latencies, 0.999),
        max_ms: latencies.last().map_or(0.0, |v| f64::from(*v) / 1_000.0),
        deliveries_per_s: delivered as f64 / elapsed,
        rss_kib_per_replica: after.iter().map(|u| u.rss_kib).collect(),
        cpu_s_per_replica: cpu,
        pg_cpu_s: pg_cpu,
        server_cpu_us_per_send: server_cpu_s * 1e6 / sent.max(1) as f64,
    })
}

/// Opens idle streams on replica A over `connections` new HTTP/2
/// connections and measures its RSS growth (connections included).
async fn run_streams(
    bench: &Bench,
    streams: usize,
    connections: usize,
    sse: bool,
) -> anyhow::Result<Row> {
    // Measured before connecting: a connection's memory counts too.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = bench.usage();
    let started = Instant::now();
    let channels = bench
        .channels(0, if sse { 1 } else { connections.max(1) })
        .await?;
    let url = bench.replicas[0].url.clone();
    let ready = Arc::new(Barrier::new(streams + 1));
    let mut held = Vec::with_capacity(streams);
    let opening = Arc::new(tokio::sync::Semaphore::new(512));
    for s in 0..streams {
        let channel = channels[s % channels.len()].clone();
        let token = bench.token(&format!("idle{s}"), "")?;
        let ready = ready.clone();
        let opening = opening.clone();
        let url = url.clone();
        held.push(tokio::spawn(async move {
            let permit = opening.acquire_owned().await?;
            if sse {
                let mut stream = SseReader::open(&url, &token, "").await?;
                while !stream.next().await?.caught_up {}
                drop(permit);
                ready.wait().await;
                loop {
                    stream.next().await?;
                }
            }
            let request = proto::SubscribeRequest {
                after_seq: None,
                ..Default::default()
            };
            let mut stream = NotificationsClient::new(channel)
                .subscribe(authed(request, &token)?)
                .await?
                .into_inner();
            loop {
                let event = stream.message().await?.context("stream ended early")?;
                if matches!(event.kind, Some(Kind::CaughtUp(_))) {
                    break;
                }
            }
            drop(permit);
            ready.wait().await;
            // Hold the stream open until the task is aborted.
            while stream.message().await?.is_some() {}
            Ok::<_, anyhow::Error>(())
        }));
    }
    all_open(&ready, &mut held).await?;
    let over = if sse {
        "SSE, one HTTP/1.1 connection each".to_owned()
    } else {
        format!("gRPC over {connections} HTTP/2 connections")
    };
    streams_row(bench, streams, &over, started, before, held).await
}

/// Opens `streams` idle streams on replica A as grpc-web calls, each on its
/// own HTTP/1.1 connection, the way a browser's grpc-web client holds one
/// (a `fetch` whose response body stays open); reports like
/// [`run_streams`].
async fn run_streams_grpc_web(bench: &Bench, streams: usize) -> anyhow::Result<Row> {
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = bench.usage();
    let started = Instant::now();
    let url = bench.replicas[0].url.clone();
    let authority: Arc<str> = url
        .strip_prefix("http://")
        .context("grpc-web streams need an http:// replica URL")?
        .trim_end_matches('/')
        .into();
    let ready = Arc::new(Barrier::new(streams + 1));
    let mut held = Vec::with_capacity(streams);
    let opening = Arc::new(tokio::sync::Semaphore::new(512));
    for s in 0..streams {
        let token = bench.token(&format!("idle{s}"), "")?;
        let ready = ready.clone();
        let opening = opening.clone();
        let authority = authority.clone();
        held.push(tokio::spawn(async move {
            let permit = opening.acquire_owned().await?;
            let mut events = GrpcWebStream::open(&authority, &token).await?;
            loop {
                let event = events.next().await?.context("stream ended early")?;
                if matches!(event.kind, Some(Kind::CaughtUp(_))) {
                    break;
                }
            }
            drop(permit);
            ready.wait().await;
            while events.next().await?.is_some() {}
            Ok::<_, anyhow::Error>(())
        }));
    }
    all_open(&ready, &mut held).await?;
    streams_row(
        bench,
        streams,
        "grpc-web, one HTTP/1.1 connection each",
        started,
        before,
        held,
    )
    .await
}

/// Waits until every stream task has passed `ready` (its stream is open
/// and caught up), or fails with the first task that ended before: a
/// stream that cannot open would otherwise leave the barrier waiting
/// forever.
async fn all_open(
    ready: &Barrier,
    held: &mut [tokio::task::JoinHandle<anyhow::Result<()>>],
) -> anyhow::Result<()> {
    let mut opened = std::pin::pin!(ready.wait());
    loop {
        tokio::select! {
            _ = &mut opened => return Ok(()),
            () = tokio::time::sleep(Duration::from_millis(200)) => {
                if let Some(task) = held.iter_mut().find(|task| task.is_finished()) {
                    task.await??;
                    bail!("a stream ended before all were open");
                }
            }
        }
    }
}

/// A `Subscribe` call in grpc-web over its own HTTP/1.1 connection.
struct GrpcWebStream {
    body: hyper::body::Incoming,
    buffered: bytes::BytesMut,
    ended: bool,
}

impl GrpcWebStream {
    /// Connects to `authority` and calls `Subscribe` as grpc-web: `POST`
    /// with `content-type: application/grpc-web+proto`, the bearer token,
    /// and one length-prefixed `SubscribeRequest` (gRPC-Web protocol,
    /// PROTOCOL-WEB.md in grpc/grpc).
    async fn open(authority: &str, token: &str) -> anyhow::Result<Self> {
        use prost::Message;
        let tcp = tokio::net::TcpStream::connect(authority)
            .await
            .with_context(|| format!("connect to {authority}"))?;
        tcp.set_nodelay(true)?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await?;
        tokio::spawn(connection);
        let message = proto::SubscribeRequest::default().encode_to_vec();
        let mut frame = Vec::with_capacity(5 + message.len());
        frame.push(0); // a data frame, uncompressed
        frame.extend_from_slice(&u32::try_from(message.len())?.to_be_bytes());
        frame.extend_from_slice(&message);
        let request = http::Request::post("/herald.v1.Notifications/Subscribe")
            .header(http::header::HOST, authority)
            .header(http::header::CONTENT_TYPE, "application/grpc-web+proto")
            .header("x-grpc-web", "1")
            .header(http::header::AUTHORIZATION, format!("Bearer {token}"))
            .body(http_body_util::Full::new(bytes::Bytes::from(frame)))?;
        let response = sender.send_request(request).await?;
        if response.status() != http::StatusCode::OK {
            bail!("grpc-web Subscribe answered HTTP {}", response.status());
        }
        if let Some(status) = response.headers().get("grpc-status")
            && status != "0"
        {
            bail!("grpc-web Subscribe failed: grpc-status {status:?}");
        }
        Ok(Self {
            body: response.into_body(),
            buffered: bytes::BytesMut::new(),
            ended: false,
        })
    }

    /// The next event; `None` once the call ended with status OK.
    async fn next(&mut self) -> anyhow::Result<Option<proto::Event>> {
        use bytes::Buf;
        use http_body_util::BodyExt;
        use prost::Message;
        loop {
            if self.buffered.len() >= 5 {
                let flags = self.buffered[0];
                let len = u32::from_be_bytes(self.buffered[1..5].try_into()?) as usize;
                if self.buffered.len() >= 5 + len {
                    self.buffered.advance(5);
                    let payload = self.buffered.split_to(len).freeze();
                    if flags & 0x80 != 0 {
                        // Trailers, as an HTTP/1 header block.
                        let trailers = String::from_utf8_lossy(&payload).to_lowercase();
                        self.ended = true;
                        if trailers.contains("grpc-status:0") || trailers.contains("grpc-status: 0")
                        {
                            return Ok(None);
                        }
                        bail!("grpc-web stream ended: {}", trailers.trim());
                    }
                    return Ok(Some(proto::Event::decode(payload)?));
                }
            }
            if self.ended {
                return Ok(None);
            }
            match self.body.frame().await {
                Some(frame) => {
                    if let Ok(data) = frame?.into_data() {
                        self.buffered.extend_from_slice(&data);
                    }
                }
                None => {
                    self.ended = true;
                    if !self.buffered.is_empty() {
                        bail!("grpc-web stream ended inside a frame");
                    }
                }
            }
        }
    }
}

/// Measures replica A once `held` streams are open (opened since `started`,
/// RSS `before` them), then closes them; prints the per-stream RSS.
async fn streams_row(
    bench: &Bench,
    streams: usize,
    over: &str,
    started: Instant,
    before: Vec<Usage>,
    held: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
) -> anyhow::Result<Row> {
    let open_s = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = bench.usage();
    for h in &held {
        h.abort();
    }
    let per_stream: Vec<f64> = after
        .iter()
        .zip(&before)
        .map(|(a, b)| (a.rss_kib.saturating_sub(b.rss_kib)) as f64 / streams as f64)
        .collect();
    println!(
        "opened {streams} streams ({over}) in {open_s:.2} s; \
         replica A RSS {} → {} KiB = {:.2} KiB per stream",
        before[0].rss_kib, after[0].rss_kib, per_stream[0]
    );
    Ok(Row {
        scenario: "streams".into(),
        replicas: bench.replicas.len(),
        streams,
        offered_rate: 0,
        sent: 0,
        delivered: 0,
        lost: 0,
        duplicates: 0,
        p50_ms: 0.0,
        p99_ms: 0.0,
        p999_ms: 0.0,
        max_ms: open_s * 1_000.0,
        deliveries_per_s: 0.0,
        rss_kib_per_replica: after.iter().map(|u| u.rss_kib).collect(),
        cpu_s_per_replica: cpu_between(&before, &after),
        pg_cpu_s: None,
        server_cpu_us_per_send: 0.0,
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Thousands of connections: take all the descriptors allowed. Best
    // effort; a run that needs more fails at connect and says so.
    let _ = herald::transport::raise_open_files_limit();
    LazyLock::force(&BASE);
    let bench = Bench::start(&cli.setup).await?;
    let result = run(&bench, &cli.scenario).await;
    bench.cleanup().await;
    let rows = result?;
    if let Some(path) = &cli.setup.json {
        std::fs::write(path, serde_json::to_string_pretty(&rows)?)
            .with_context(|| format!("write {}", path.display()))?;
    }
    let bad: Vec<&Row> = rows
        .iter()
        .filter(|r| r.lost > 0 || r.duplicates > 0)
        .collect();
    if !bad.is_empty() {
        bail!("LOSS OR DUPLICATES DETECTED in {} run(s)", bad.len());
    }
    Ok(())
}

async fn run(bench: &Bench, scenario: &Scenario) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    Row::print_header();
    match scenario {
        Scenario::Latency(load) => {
            let row = run_load(bench, "latency", load, load.rate, false, 1).await?;
            row.print();
            rows.push(row);
        }
        Scenario::Fanout(load) => {
            let row = run_load(bench, "fanout", load, load.rate, true, 1).await?;
            row.print();
            rows.push(row);
        }
        Scenario::Bulk { load, items } => {
            let row = run_load(bench, "bulk", load, load.rate, false, *items).await?;
            row.print();
            rows.push(row);
        }
        Scenario::Throughput {
            load,
            step,
            max_rate,
            p99_limit_ms,
        } => {
            let mut held = None;
            let mut rate = load.rate;
            while rate <= *max_rate {
                let row = run_load(bench, "throughput", load, rate, false, 1).await?;
                row.print();
                let achieved = row.sent as f64 / load.duration.as_secs_f64();
                let ok = row.p99_ms <= *p99_limit_ms
                    && row.lost == 0
                    && row.duplicates == 0
                    && achieved >= 0.95 * rate as f64;
                rows.push(row);
                if !ok {
                    break;
                }
                held = Some((rate, achieved));
                rate += step;
            }
            match held {
                Some((rate, achieved)) => println!(
                    "highest rate held: {rate} sends/s offered ({achieved:.0}/s acknowledged, p99 <= {p99_limit_ms} ms, nothing lost)"
                ),
                None => println!("no rate held"),
            }
        }
        Scenario::Streams {
            streams,
            stream_connections,
            sse,
            grpc_web,
        } => {
            let row = if *grpc_web {
                run_streams_grpc_web(bench, *streams).await?
            } else {
                run_streams(bench, *streams, *stream_connections, *sse).await?
            };
            row.print();
            rows.push(row);
        }
    }
    let _: HashMap<(), ()> = HashMap::new();
    Ok(rows)
}
