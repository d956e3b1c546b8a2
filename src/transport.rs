//! The gRPC port's connections, from `accept(2)` to close, each with a
//! bound on what it may hold.
//!
//! Herald serves native gRPC (HTTP/2) and grpc-web (HTTP/1.1 or HTTP/2) on
//! one port, so every connection starts with protocol detection: hyper
//! reads the first bytes and compares them with the HTTP/2 connection
//! preface (RFC 9113 §3.4). A client can stop anywhere along the way, or
//! never send a byte, and a replica has a finite number of file
//! descriptors, so this module owns the accept loop and each connection's
//! life instead of leaving them to tonic's default server:
//!
//! - **Accepting.** [`serve`] accepts in one loop and serves each
//!   connection in its own task, so one silent client never stalls the
//!   others. When `accept(2)` fails because the process or the system is
//!   out of file descriptors or memory (`EMFILE`, `ENFILE`, `ENOBUFS`,
//!   `ENOMEM`) the loop backs off (10 ms, doubling to 1 s; reset by the next
//!   success) instead of retrying at once — the listening socket stays
//!   readable while the kernel holds the pending connection, so an instant
//!   retry spins a core. Open connections keep being served meanwhile, and
//!   the pending clients get in, in order, as descriptors free up.
//!   [`raise_open_files_limit`] raises the soft `RLIMIT_NOFILE` to the hard
//!   one at start-up (setrlimit(2)), so the table is as large as the
//!   operator allowed.
//! - **Handshake.** Until one of its requests authenticates (carries a
//!   bearer token that verifies), a connection may not stay idle — no call
//!   in flight — for longer than [`TransportSettings::handshake_timeout`],
//!   counted from accept and then from the end of its last call. So a
//!   client must complete protocol detection (and the HTTP/2 preface) and
//!   send its first request within it, and a connection that only ever
//!   made unauthenticated calls cannot idle on either. Nor can it stay busy
//!   with calls for longer than the call timeout plus the handshake
//!   timeout: every unauthenticated call ends within the call timeout
//!   unless its client does not read the answer (HTTP/2 flow control), and
//!   then only closing the connection frees it. A connection that overstays
//!   is shut down (an HTTP/2 GOAWAY when it got that far) and, a second
//!   later, closed. An authenticated connection may idle; keep-alive pings
//!   close it if its peer is gone.
//! - **Calls.** [`CallBoundsLayer`] bounds each call: its request body must
//!   be complete within [`TransportSettings::request_body_timeout`], and
//!   every call but the long-lived streams ([`LONG_LIVED_METHODS`]) must
//!   have its response within [`TransportSettings::call_timeout`] (or the
//!   client's `grpc-timeout`, if sooner) and end its response stream by
//!   the call timeout; both end with
//!   `DEADLINE_EXCEEDED`, which the gRPC status-code guide gives for "no
//!   response received before the deadline … when the client is unable to
//!   send the request to the server or when the server fails to respond in
//!   time".
//! - **HTTP/2.** Each connection advertises
//!   `SETTINGS_MAX_CONCURRENT_STREAMS` (RFC 9113 §5.1.2; streams above it
//!   are refused with `REFUSED_STREAM`) and is sent GOAWAY
//!   `ENHANCE_YOUR_CALM` once the server has reset
//!   [`TransportSettings::max_resets_per_connection`] of its streams for
//!   the client's errors (refused streams included), as hyper does by
//!   default; clients' own resets are bounded by h2's rapid-reset defence
//!   (GOAWAY after 20 pending). Silent peers are closed by keep-alive
//!   pings, HTTP/1.1 requests whose headers stall by hyper's header read
//!   timeout.
//! - **Stopping.** When the replica's shutdown token is cancelled the
//!   listener closes; connections with no call in flight that never
//!   authenticated close at once, the others get a graceful shutdown (GOAWAY; the service ends
//!   its streams) and [`serve`] returns once all have closed. Dropping the
//!   [`serve`] future (the replica's grace period is over) closes every
//!   connection still open.
//!
//! Metrics (see [`crate::telemetry::names`]): connections open, accepted,
//! closed by each bound; calls ended by each bound; accept errors by kind.

use std::{
    convert::Infallible,
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
    service::TowerToHyperService,
};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::Notify,
    task::JoinSet,
    time::{Instant, Sleep},
};
use tokio_util::sync::CancellationToken;
use tonic::{Status, body::Body, transport::server::TcpConnectInfo};
use tower::{Layer, Service};

use crate::telemetry::names;

/// Methods whose response is a stream that may rightly stay open for hours:
/// exempt from [`TransportSettings::call_timeout`]. Their request (one
/// message) is still bounded by [`TransportSettings::request_body_timeout`].
/// Only `Subscribe`, which needs a token, so its streams count against the
/// per-user and per-replica stream limits. The health service's `Watch`
/// needs none, so it is not here: a watch ends `DEADLINE_EXCEEDED` at the
/// call timeout and its client watches again (otherwise anyone could hold
/// streams, and their connections, forever). Reflection's bidirectional
/// stream answers at once; its request stream is bounded by the body
/// timeout, so a reflection session lasts at most that long.
pub const LONG_LIVED_METHODS: &[&str] = &["/herald.v1.Notifications/Subscribe"];

/// How often a silent HTTP/2 connection is pinged, and how long the answer
/// may take before it is closed (h2 keep-alive).
pub const HTTP2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// See [`HTTP2_KEEPALIVE_INTERVAL`].
pub const HTTP2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time an HTTP/1.1 client has to send a request's headers once the server
/// waits for them (hyper's default, kept explicit), first request included.
pub const HTTP1_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// After a handshake timeout, how long a connection that got as far as
/// HTTP/2 may take to receive its GOAWAY before it is closed regardless.
const HANDSHAKE_CLOSE_GRACE: Duration = Duration::from_secs(1);
/// First pause after an `accept(2)` that failed for lack of descriptors or
/// memory; each further failure doubles it.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
/// Longest pause between failed accepts: how late, at worst, a waiting
/// client gets in once a descriptor frees up.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// At most one warning per this period while accepting fails.
const ACCEPT_WARN_EVERY: Duration = Duration::from_secs(10);

/// The per-connection and per-call bounds of the gRPC port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransportSettings {
    /// Longest a connection may go without a call in flight before one of
    /// its requests authenticates: from accept (protocol detection and the
    /// HTTP/2 preface included), then from the end of its last call.
    pub handshake_timeout: Duration,
    /// From a call's headers to the end of its request body.
    pub request_body_timeout: Duration,
    /// From a call's headers to its response and the end of its response
    /// stream, for every method but [`LONG_LIVED_METHODS`].
    pub call_timeout: Duration,
    /// `SETTINGS_MAX_CONCURRENT_STREAMS` advertised on each HTTP/2
    /// connection.
    pub max_concurrent_streams: u32,
    /// Streams the server may reset for a client's errors on one HTTP/2
    /// connection before it sends GOAWAY `ENHANCE_YOUR_CALM`.
    pub max_resets_per_connection: usize,
}

impl Default for TransportSettings {
    /// The production defaults (also `herald serve`'s and the Helm chart's).
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(10),
            request_body_timeout: Duration::from_secs(10),
            call_timeout: Duration::from_secs(30),
            max_concurrent_streams: 1_000,
            max_resets_per_connection: 1_024,
        }
    }
}

/// The process's open-files limit (`RLIMIT_NOFILE`) before and after
/// [`raise_open_files_limit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenFilesLimit {
    /// Soft limit found at start-up.
    pub soft_before: u64,
    /// Soft limit now.
    pub soft: u64,
    /// Hard limit (the ceiling an unprivileged process may raise to).
    pub hard: u64,
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (setrlimit(2): an
/// unprivileged process may raise its soft limit up to its hard limit), so
/// the replica can hold as many connections as the operator allowed.
/// Returns both limits; fails only if the kernel refuses to report or
/// change them. `RLIM_INFINITY` is reported as `u64::MAX`.
#[cfg(unix)]
pub fn raise_open_files_limit() -> io::Result<OpenFilesLimit> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the valid, exclusively borrowed struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let soft_before = limit.rlim_cur;
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit reads the valid struct; it changes only this
        // process's limit.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(io::Error::last_os_error());
        }
        limit = raised;
    }
    #[allow(clippy::useless_conversion)] // rlim_t is not u64 everywhere
    Ok(OpenFilesLimit {
        soft_before: u64::from(soft_before),
        soft: u64::from(limit.rlim_cur),
        hard: u64::from(limit.rlim_max),
    })
}

/// Not supported off Unix: reports an error.
#[cfg(not(unix))]
pub fn raise_open_files_limit() -> io::Result<OpenFilesLimit> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "RLIMIT_NOFILE exists on Unix only",
    ))
}

/// Why `accept(2)` failed, as counted in
/// [`names::ACCEPT_ERRORS`]`{listener, kind}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AcceptFailure {
    /// `EMFILE`/`ENFILE`: the process's or the system's descriptor table is
    /// full. Back off.
    OutOfFds,
    /// `ENOBUFS`/`ENOMEM`: the kernel is out of memory for sockets. Back
    /// off.
    OutOfMemory,
    /// The pending connection died before it was accepted (`ECONNABORTED`,
    /// `EPROTO`, …): that client's problem; accept the next at once.
    Aborted,
    /// Anything else. Back off, to be safe.
    Other,
}

impl AcceptFailure {
    fn of(error: &io::Error) -> Self {
        match error.raw_os_error() {
            Some(libc::EMFILE | libc::ENFILE) => Self::OutOfFds,
            Some(libc::ENOBUFS | libc::ENOMEM) => Self::OutOfMemory,
            Some(libc::EPROTO | libc::EPERM) => Self::Aborted,
            _ => match error.kind() {
                io::ErrorKind::ConnectionAborted
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::Interrupted
                | io::ErrorKind::WouldBlock => Self::Aborted,
                _ => Self::Other,
            },
        }
    }

    fn label(self) -> &'static str {
        match self {
            Self::OutOfFds => "out_of_fds",
            Self::OutOfMemory => "out_of_memory",
            Self::Aborted => "aborted",
            Self::Other => "other",
        }
    }
}

/// An accept loop's pause after failures, and its rate-limited warning:
/// what every listener of a replica (the gRPC port, `/metrics`) does when
/// `accept(2)` fails.
#[derive(Debug)]
pub(crate) struct AcceptBackoff {
    listener: &'static str,
    next: Duration,
    last_warning: Option<Instant>,
    unreported: u64,
}

impl AcceptBackoff {
    /// For the listener named `listener` in metrics and logs.
    pub(crate) fn new(listener: &'static str) -> Self {
        Self {
            listener,
            next: ACCEPT_BACKOFF_MIN,
            last_warning: None,
            unreported: 0,
        }
    }

    /// An accept succeeded: the next failure pauses briefly again.
    pub(crate) fn succeeded(&mut self) {
        self.next = ACCEPT_BACKOFF_MIN;
    }

    /// Counts and (at most every [`ACCEPT_WARN_EVERY`]) logs `error`;
    /// returns how long to pause before accepting again (zero when only
    /// the pending connection failed).
    pub(crate) fn failed(&mut self, error: &io::Error, addr: Option<SocketAddr>) -> Duration {
        let failure = AcceptFailure::of(error);
        metrics::counter!(
            names::ACCEPT_ERRORS,
            "listener" => self.listener,
            "kind" => failure.label()
        )
        .increment(1);
        let listener = self.listener;
        if failure == AcceptFailure::Aborted {
            tracing::debug!(listener, error = %error, "a pending connection failed before accept");
            return Duration::ZERO;
        }
        let pause = self.next;
        self.next = (self.next * 2).min(ACCEPT_BACKOFF_MAX);
        let now = Instant::now();
        if self
            .last_warning
            .is_some_and(|at| now.duration_since(at) < ACCEPT_WARN_EVERY)
        {
            self.unreported += 1;
            return pause;
        }
        self.last_warning = Some(now);
        let failures_since_last_warning = std::mem::take(&mut self.unreported);
        match failure {
            AcceptFailure::OutOfFds => tracing::warn!(
                listener,
                ?addr,
                error = %error,
                ?pause,
                failures_since_last_warning,
                "cannot accept connections: out of file descriptors; open connections are \
                 still served, new ones wait until descriptors free up (raise the open-files \
                 limit, RLIMIT_NOFILE, if this persists)"
            ),
            _ => tracing::warn!(
                listener,
                ?addr,
                error = %error,
                ?pause,
                failures_since_last_warning,
                "cannot accept connections; backing off"
            ),
        }
        pause
    }
}

/// Tells whether a request's headers authenticate its caller (a bearer
/// token that verifies): the first such request ends its connection's
/// handshake.
pub type Authenticates = Arc<dyn Fn(&HeaderMap) -> bool + Send + Sync>;

/// Serves `service` on every connection `listener` accepts, with the bounds
/// of `settings` (see the module docs), until `shutdown` is cancelled and
/// every connection has closed. `service` is cloned per connection and sees
/// each request with a [`TcpConnectInfo`] extension (as tonic's own server
/// adds it); `authenticates` decides when a connection's handshake is over.
/// Never fails: accept errors are backed off and counted, connection errors
/// end only their connection.
pub async fn serve<S, B>(
    listener: TcpListener,
    service: S,
    authenticates: Authenticates,
    settings: TransportSettings,
    shutdown: CancellationToken,
) where
    S: Service<Request<Body>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let builder = Arc::new(connection_builder(&settings));
    let addr = listener.local_addr().ok();
    // Dropping the set (the replica's grace period is over) aborts every
    // connection task, which closes its socket.
    let mut connections = JoinSet::new();
    let mut backoff = AcceptBackoff::new("grpc");
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            Some(joined) = connections.join_next(), if !connections.is_empty() => {
                reap(joined);
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, remote)) => {
                    backoff.succeeded();
                    metrics::counter!(names::CONNECTIONS_ACCEPTED).increment(1);
                    connections.spawn(serve_connection(
                        stream,
                        remote,
                        builder.clone(),
                        service.clone(),
                        authenticates.clone(),
                        settings,
                        shutdown.clone(),
                    ));
                }
                Err(e) => {
                    let pause = backoff.failed(&e, addr);
                    if !pause.is_zero() {
                        tokio::select! {
                            () = shutdown.cancelled() => break,
                            () = tokio::time::sleep(pause) => {}
                        }
                    }
                }
            },
        }
    }
    // No new connections: the kernel refuses them from here on.
    drop(listener);
    while let Some(joined) = connections.join_next().await {
        reap(joined);
    }
}

fn reap(joined: Result<(), tokio::task::JoinError>) {
    if let Err(e) = joined
        && e.is_panic()
    {
        tracing::error!(error = %e, "a connection task panicked");
    }
}

/// hyper's connection builder, HTTP/1.1 and HTTP/2 on one port.
fn connection_builder(settings: &TransportSettings) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HTTP1_HEADER_READ_TIMEOUT);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(settings.max_concurrent_streams)
        .max_local_error_reset_streams(settings.max_resets_per_connection)
        .keep_alive_interval(HTTP2_KEEPALIVE_INTERVAL)
        .keep_alive_timeout(HTTP2_KEEPALIVE_TIMEOUT);
    builder
}

/// Counts one open connection in [`names::CONNECTIONS_OPEN`] while it
/// lives (also when its task is aborted).
struct OpenConnection;

impl OpenConnection {
    fn new() -> Self {
        metrics::gauge!(names::CONNECTIONS_OPEN).increment(1.0);
        Self
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        metrics::gauge!(names::CONNECTIONS_OPEN).decrement(1.0);
    }
}

/// Why a connection was closed by one of the bounds, as counted in
/// [`names::CONNECTIONS_CLOSED`]`{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClosedBy {
    /// Idle for the handshake timeout before any authenticated request.
    HandshakeTimeout,
    /// GOAWAY `ENHANCE_YOUR_CALM`: too many stream resets (the server's,
    /// for the client's errors, or the client's own).
    ResetLimit,
    /// HTTP/1.1 headers not received within the header read timeout.
    HeaderTimeout,
}

impl ClosedBy {
    fn count(self, remote: SocketAddr) {
        let reason = match self {
            Self::HandshakeTimeout => "handshake_timeout",
            Self::ResetLimit => "reset_limit",
            Self::HeaderTimeout => "header_timeout",
        };
        metrics::counter!(names::CONNECTIONS_CLOSED, "reason" => reason).increment(1);
        tracing::debug!(%remote, reason, "connection closed by a bound");
    }

    /// The bound behind a connection's error, if one was.
    fn of(error: &(dyn std::error::Error + 'static)) -> Option<Self> {
        let mut source = Some(error);
        while let Some(e) = source {
            if let Some(goaway) = e.downcast_ref::<h2::Error>()
                && goaway.is_go_away()
                && goaway.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM)
            {
                return Some(Self::ResetLimit);
            }
            if let Some(hyper) = e.downcast_ref::<hyper::Error>()
                && hyper.is_timeout()
            {
                return Some(Self::HeaderTimeout);
            }
            source = e.source();
        }
        None
    }
}

/// What a connection's task and its service share: whether a request
/// authenticated yet, and the calls in flight (a call lasts until its
/// response body is done or dropped).
#[derive(Default)]
struct Handshake {
    authenticated: AtomicBool,
    in_flight: AtomicUsize,
    /// How many times `in_flight` fell to zero.
    idle_events: AtomicU64,
    /// Signalled when a call starts or ends.
    changed: Notify,
}

impl Handshake {
    /// When the connection must be closed unless a request authenticates
    /// first: `handshake_timeout` after the last call ended (or accept);
    /// while calls are in flight, once they have been continuously so for
    /// `call_timeout` plus `handshake_timeout` (every unauthenticated call
    /// is bounded by the call timeout, so only a client that does not read
    /// its responses gets there). `busy_since` and `seen_idle` carry what
    /// the caller saw last time.
    fn deadline(
        &self,
        settings: &TransportSettings,
        busy_since: &mut Option<Instant>,
        seen_idle: &mut u64,
    ) -> Instant {
        let now = Instant::now();
        let idle_events = self.idle_events.load(Ordering::Acquire);
        let idled = std::mem::replace(seen_idle, idle_events) != idle_events;
        if self.in_flight.load(Ordering::Acquire) == 0 {
            *busy_since = None;
            return now + settings.handshake_timeout;
        }
        if idled {
            *busy_since = None;
        }
        let since = *busy_since.get_or_insert(now);
        since + settings.call_timeout + settings.handshake_timeout
    }
}

/// A request extension for handlers that authenticate a request by other
/// means than its bearer token (the SSE door's stream tickets): calling
/// [`ConnectionHandshake::authenticated`] ends its connection's handshake
/// as an authenticated call would, so a long-lived stream opened with a
/// ticket is not closed by the handshake bound.
#[derive(Clone)]
pub struct ConnectionHandshake(Arc<Handshake>);

impl ConnectionHandshake {
    /// Marks the connection authenticated.
    pub fn authenticated(&self) {
        self.0.authenticated.store(true, Ordering::Release);
        self.0.changed.notify_one();
    }
}

/// One call in flight on a connection, until dropped.
struct InFlight(Arc<Handshake>);

impl InFlight {
    fn start(handshake: &Arc<Handshake>) -> Self {
        handshake.in_flight.fetch_add(1, Ordering::AcqRel);
        handshake.changed.notify_one();
        Self(handshake.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle_events.fetch_add(1, Ordering::AcqRel);
        }
        self.0.changed.notify_one();
    }
}

/// One connection's life: hyper serves it while this watches the handshake
/// deadline ([`Handshake::deadline`]) and the replica's shutdown.
#[allow(clippy::too_many_arguments)] // one connection's parts, passed once
async fn serve_connection<S, B>(
    stream: TcpStream,
    remote: SocketAddr,
    builder: Arc<auto::Builder<TokioExecutor>>,
    service: S,
    authenticates: Authenticates,
    settings: TransportSettings,
    shutdown: CancellationToken,
) where
    S: Service<Request<Body>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let _open = OpenConnection::new();
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(%remote, error = %e, "cannot set TCP_NODELAY");
    }
    let handshake = Arc::new(Handshake::default());
    let service = ConnectionService {
        inner: service,
        info: TcpConnectInfo {
            local_addr: stream.local_addr().ok(),
            remote_addr: Some(remote),
        },
        authenticates,
        handshake: handshake.clone(),
    };
    let connection =
        builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(service));
    tokio::pin!(connection);
    // While the handshake lasts: when the connection will have been idle
    // (or busy) too long.
    let mut busy_since = None;
    let mut seen_idle = 0;
    let mut close_unless_authenticated = Instant::now() + settings.handshake_timeout;
    let mut watching = true;
    let mut close_at: Option<Instant> = None;
    let mut draining = false;
    loop {
        tokio::select! {
            // Calls that started or ended are seen before the deadline.
            biased;
            served = connection.as_mut() => {
                if let Err(e) = served {
                    match ClosedBy::of(&*e) {
                        Some(bound) => bound.count(remote),
                        None => tracing::debug!(%remote, error = %e, "connection ended"),
                    }
                }
                return;
            }
            () = handshake.changed.notified(), if watching => {
                if handshake.authenticated.load(Ordering::Acquire) {
                    watching = false;
                } else {
                    close_unless_authenticated =
                        handshake.deadline(&settings, &mut busy_since, &mut seen_idle);
                }
            }
            () = tokio::time::sleep_until(close_unless_authenticated), if watching => {
                if handshake.authenticated.load(Ordering::Acquire) {
                    watching = false;
                    continue;
                }
                let changed = handshake.idle_events.load(Ordering::Acquire) != seen_idle
                    || (handshake.in_flight.load(Ordering::Acquire) > 0) != busy_since.is_some();
                if changed {
                    // A call started or ended as the deadline passed.
                    close_unless_authenticated =
                        handshake.deadline(&settings, &mut busy_since, &mut seen_idle);
                    continue;
                }
                watching = false;
                ClosedBy::HandshakeTimeout.count(remote);
                connection.as_mut().graceful_shutdown();
                close_at = Some(Instant::now() + HANDSHAKE_CLOSE_GRACE);
            }
            () = sleep_until(close_at) => return,
            () = shutdown.cancelled(), if !draining => {
                draining = true;
                if handshake.in_flight.load(Ordering::Acquire) == 0
                    && !handshake.authenticated.load(Ordering::Acquire)
                {
                    return; // nothing in flight to drain, nobody to tell
                }
                connection.as_mut().graceful_shutdown();
            }
        }
    }
}

/// Sleeps until `at`; never, for `None`.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The replica's service as one connection sees it: during the handshake,
/// notes whether each request authenticates and tracks the calls in
/// flight; adds the connection's addresses; boxes hyper's body into
/// tonic's.
#[derive(Clone)]
struct ConnectionService<S> {
    inner: S,
    info: TcpConnectInfo,
    authenticates: Authenticates,
    handshake: Arc<Handshake>,
}

impl<S, B> Service<Request<Incoming>> for ConnectionService<S>
where
    S: Service<Request<Body>, Response = Response<B>>,
    S::Future: Send + 'static,
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Incoming>) -> Self::Future {
        let in_flight = (!self.handshake.authenticated.load(Ordering::Acquire)).then(|| {
            if (self.authenticates)(request.headers()) {
                self.handshake.authenticated.store(true, Ordering::Release);
            }
            InFlight::start(&self.handshake)
        });
        let mut request = request.map(Body::new);
        request.extensions_mut().insert(self.info.clone());
        if in_flight.is_some() {
            request
                .extensions_mut()
                .insert(ConnectionHandshake(self.handshake.clone()));
        }
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            // The call lasts as long as its response body.
            Ok(response.map(|body| match in_flight {
                Some(in_flight) => Body::new(Tracked {
                    inner: Body::new(body),
                    _in_flight: in_flight,
                }),
                None => Body::new(body),
            }))
        })
    }
}

/// A response body that keeps its call counted in flight.
struct Tracked {
    inner: Body,
    _in_flight: InFlight,
}

impl HttpBody for Tracked {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A [`tower::Layer`] bounding each call's request body and (but for
/// [`LONG_LIVED_METHODS`]) its time to respond; see the module docs. Put it
/// inside the grpc-web translation, so its `DEADLINE_EXCEEDED` reaches
/// grpc-web clients in their format too.
#[derive(Debug, Clone, Copy)]
pub struct CallBoundsLayer {
    request_body_timeout: Duration,
    call_timeout: Duration,
}

impl CallBoundsLayer {
    /// The bounds of `settings`.
    pub fn new(settings: &TransportSettings) -> Self {
        Self {
            request_body_timeout: settings.request_body_timeout,
            call_timeout: settings.call_timeout,
        }
    }
}

impl<S> Layer<S> for CallBoundsLayer {
    type Service = CallBounds<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CallBounds {
            inner,
            bounds: *self,
        }
    }
}

/// The service of [`CallBoundsLayer`].
#[derive(Debug, Clone)]
pub struct CallBounds<S> {
    inner: S,
    bounds: CallBoundsLayer,
}

/// Which deadline ended a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Deadline {
    /// The server's [`TransportSettings::call_timeout`].
    Server,
    /// The client's own `grpc-timeout`.
    Client,
}

impl<S> Service<Request<Body>> for CallBounds<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let started = Instant::now();
        let server = (!LONG_LIVED_METHODS.contains(&request.uri().path()))
            .then(|| started.checked_add(self.bounds.call_timeout))
            .flatten()
            .map(|at| (at, Deadline::Server));
        let client = grpc_timeout(request.headers())
            .and_then(|timeout| started.checked_add(timeout))
            .map(|at| (at, Deadline::Client));
        let deadline = match (server, client) {
            (Some(s), Some(c)) => Some(if c.0 < s.0 { c } else { s }),
            (s, c) => s.or(c),
        };
        let body_deadline = started.checked_add(self.bounds.request_body_timeout);
        let request = request.map(|body| Body::new(BoundedBody::new(body, body_deadline)));
        // The clone that was made ready is the one called (tower's rule).
        let ready = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, ready);
        let call_timeout = self.bounds.call_timeout;
        let server_deadline = server.map(|(at, _)| at);
        let response = inner.call(request);
        Box::pin(async move {
            let Some((at, which)) = deadline else {
                return response.await;
            };
            let response = tokio::select! {
                response = response => response,
                () = tokio::time::sleep_until(at) => {
                    // Dropping the call's future cancels its work, as a
                    // client's cancellation would.
                    let status = match which {
                        Deadline::Server => {
                            metrics::counter!(names::CALLS_TIMED_OUT, "bound" => "call_timeout")
                                .increment(1);
                            Status::deadline_exceeded(format!(
                                "the call took longer than the server's limit ({})",
                                humantime::format_duration(call_timeout)
                            ))
                        }
                        Deadline::Client => Status::deadline_exceeded("deadline exceeded (grpc-timeout)"),
                    };
                    Ok(status.into_http())
                }
            };
            // A bounded call's response stream (a health watch, say) ends
            // at the server's deadline too.
            Ok(match (response, server_deadline) {
                (Ok(response), Some(at)) => {
                    response.map(|body| Body::new(DeadlineBody::new(body, at, call_timeout)))
                }
                (response, _) => response?,
            })
        })
    }
}

/// A response body that ends with `DEADLINE_EXCEEDED` trailers at the
/// call's deadline if it has not ended by then (frames ready in time are
/// sent first).
struct DeadlineBody {
    inner: Body,
    deadline: Pin<Box<Sleep>>,
    call_timeout: Duration,
    ended: bool,
}

impl DeadlineBody {
    fn new(inner: Body, deadline: Instant, call_timeout: Duration) -> Self {
        Self {
            ended: inner.is_end_stream(),
            inner,
            deadline: Box::pin(tokio::time::sleep_until(deadline)),
            call_timeout,
        }
    }
}

impl HttpBody for DeadlineBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        if this.ended {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if frame.is_trailers() {
                    this.ended = true;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                this.ended = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(status))) => Poll::Ready(Some(Err(status))),
            Poll::Pending => {
                if this.deadline.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                this.ended = true;
                this.inner = Body::empty();
                metrics::counter!(names::CALLS_TIMED_OUT, "bound" => "call_timeout").increment(1);
                let status = Status::deadline_exceeded(format!(
                    "the call took longer than the server's limit ({})",
                    humantime::format_duration(this.call_timeout)
                ));
                let mut trailers = HeaderMap::new();
                match status.add_header(&mut trailers) {
                    Ok(()) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
                    Err(status) => Poll::Ready(Some(Err(status))),
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The client's `grpc-timeout` (gRPC over HTTP/2, "Timeout": at most 8
/// digits and a unit, `H` `M` `S` `m` `u` `n`); `None` if absent or
/// malformed (then ignored, as tonic's own server does).
fn grpc_timeout(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get("grpc-timeout")?.to_str().ok()?;
    let unit_at = value.len().checked_sub(1)?;
    let (amount, unit) = (value.get(..unit_at)?, value.get(unit_at..)?);
    if amount.is_empty() || amount.len() > 8 || !amount.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let amount: u64 = amount.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount * 3600),
        "M" => Duration::from_secs(amount * 60),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// A request body that fails with `DEADLINE_EXCEEDED` if it has not ended
/// by its deadline. Whoever reads the body (tonic, before it calls the
/// handler) gets the error and answers with it; hyper then resets the
/// HTTP/2 stream (`RST_STREAM` `NO_ERROR`, RFC 9113 §8.1) or closes the
/// HTTP/1.1 connection, whose unread body it cannot skip.
struct BoundedBody {
    inner: Body,
    deadline: Option<Pin<Box<Sleep>>>,
    ended: bool,
}

impl BoundedBody {
    fn new(inner: Body, deadline: Option<Instant>) -> Self {
        Self {
            ended: inner.is_end_stream(),
            deadline: deadline.map(|at| Box::pin(tokio::time::sleep_until(at))),
            inner,
        }
    }
}

impl HttpBody for BoundedBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        if this.ended {
            return Pin::new(&mut this.inner).poll_frame(cx);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                if frame.is_none() || this.inner.is_end_stream() {
                    this.ended = true;
                }
                Poll::Ready(frame)
            }
            Poll::Pending => {
                let expired = this
                    .deadline
                    .as_mut()
                    .is_some_and(|sleep| sleep.as_mut().poll(cx).is_ready());
                if !expired {
                    return Poll::Pending;
                }
                this.ended = true;
                this.inner = Body::empty();
                metrics::counter!(names::CALLS_TIMED_OUT, "bound" => "request_body").increment(1);
                Poll::Ready(Some(Err(Status::deadline_exceeded(
                    "the request body did not arrive within the server's limit",
                ))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use tower::ServiceExt;

    use super::*;

    /// A service that answers after an hour.
    fn slow() -> impl Service<
        Request<Body>,
        Response = Response<Body>,
        Error = Infallible,
        Future = impl Future<Output = Result<Response<Body>, Infallible>> + Send + 'static,
    > + Clone
    + Send
    + 'static {
        tower::service_fn(|_: Request<Body>| async {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok::<_, Infallible>(Response::new(Body::empty()))
        })
    }

    fn call(path: &str, timeout: Option<&str>) -> Request<Body> {
        let mut request = Request::post(path);
        if let Some(timeout) = timeout {
            request = request.header("grpc-timeout", timeout);
        }
        request.body(Body::empty()).unwrap()
    }

    fn status_of(response: &Response<Body>) -> Option<&str> {
        response.headers().get("grpc-status")?.to_str().ok()
    }

    #[tokio::test]
    async fn calls_but_streams_end_at_the_call_timeout_or_the_clients_deadline() {
        let settings = TransportSettings {
            call_timeout: Duration::from_millis(300),
            ..TransportSettings::default()
        };
        let service = CallBoundsLayer::new(&settings).layer(slow());

        let started = Instant::now();
        let unary = service
            .clone()
            .oneshot(call("/herald.v1.Notifications/GetUnreadCount", None))
            .await
            .unwrap();
        assert_eq!(status_of(&unary), Some("4"), "DEADLINE_EXCEEDED");
        assert!(started.elapsed() >= settings.call_timeout);

        let started = Instant::now();
        let sooner = service
            .clone()
            .oneshot(call(
                "/herald.v1.Notifications/SendNotification",
                Some("100m"),
            ))
            .await
            .unwrap();
        assert_eq!(status_of(&sooner), Some("4"));
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(100) && took < settings.call_timeout,
            "{took:?}"
        );

        let subscribe = tokio::time::timeout(
            3 * settings.call_timeout,
            service
                .clone()
                .oneshot(call("/herald.v1.Notifications/Subscribe", None)),
        )
        .await;
        assert!(subscribe.is_err(), "Subscribe was cut");

        // Needs no token, so it may not last forever: a response stream
        // that answered at once ends at the deadline with trailers.
        let streaming =
            CallBoundsLayer::new(&settings).layer(tower::service_fn(|_: Request<Body>| async {
                let never = http_body_util::StreamBody::new(futures_util::stream::pending::<
                    Result<Frame<Bytes>, Status>,
                >());
                Ok::<_, Infallible>(Response::new(Body::new(never)))
            }));
        let started = Instant::now();
        let watch = streaming
            .oneshot(call("/grpc.health.v1.Health/Watch", None))
            .await
            .unwrap();
        assert_eq!(status_of(&watch), None, "headers at once");
        let trailers = http_body_util::BodyExt::collect(watch.into_body())
            .await
            .unwrap()
            .trailers()
            .cloned()
            .expect("trailers");
        assert_eq!(trailers["grpc-status"], "4");
        assert!(started.elapsed() >= settings.call_timeout);
    }

    #[tokio::test]
    async fn a_request_body_that_never_ends_fails_at_its_deadline() {
        use http_body_util::BodyExt;
        let never = http_body_util::StreamBody::new(futures_util::stream::pending::<
            Result<Frame<Bytes>, Infallible>,
        >());
        let started = Instant::now();
        let mut body =
            BoundedBody::new(Body::new(never), Some(started + Duration::from_millis(200)));
        let error = body.frame().await.expect("an error frame").unwrap_err();
        assert_eq!(error.code(), tonic::Code::DeadlineExceeded);
        assert!(started.elapsed() >= Duration::from_millis(200));
        assert!(body.frame().await.is_none(), "then it ends");

        let whole = BoundedBody::new(
            Body::new(http_body_util::Full::new(Bytes::from_static(b"x"))),
            Some(started),
        );
        let collected = whole.collect().await.unwrap().to_bytes();
        assert_eq!(&collected[..], b"x", "a body that is there is not cut");
    }

    #[test]
    fn grpc_timeout_follows_the_spec() {
        let parse = |v: &str| {
            let mut headers = HeaderMap::new();
            headers.insert("grpc-timeout", v.parse().unwrap());
            grpc_timeout(&headers)
        };
        assert_eq!(parse("3H"), Some(Duration::from_secs(3 * 3600)));
        assert_eq!(parse("2M"), Some(Duration::from_secs(120)));
        assert_eq!(parse("10S"), Some(Duration::from_secs(10)));
        assert_eq!(parse("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse("7u"), Some(Duration::from_micros(7)));
        assert_eq!(parse("99999999n"), Some(Duration::from_nanos(99_999_999)));
        for bad in ["", "S", "123456789S", "10", "10s", "-1S", "1.5S", "１S"] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
        assert_eq!(grpc_timeout(&HeaderMap::new()), None);
    }

    #[test]
    fn accept_failures_are_told_apart() {
        let os = io::Error::from_raw_os_error;
        assert_eq!(
            AcceptFailure::of(&os(libc::EMFILE)),
            AcceptFailure::OutOfFds
        );
        assert_eq!(
            AcceptFailure::of(&os(libc::ENFILE)),
            AcceptFailure::OutOfFds
        );
        assert_eq!(
            AcceptFailure::of(&os(libc::ENOBUFS)),
            AcceptFailure::OutOfMemory
        );
        assert_eq!(
            AcceptFailure::of(&os(libc::ECONNABORTED)),
            AcceptFailure::Aborted
        );
        assert_eq!(AcceptFailure::of(&os(libc::EINVAL)), AcceptFailure::Other);
    }

    #[test]
    fn accept_backoff_doubles_to_a_second_and_resets() {
        let mut backoff = AcceptBackoff::new("grpc");
        let emfile = io::Error::from_raw_os_error(libc::EMFILE);
        let pauses: Vec<_> = (0..9).map(|_| backoff.failed(&emfile, None)).collect();
        assert_eq!(pauses[0], Duration::from_millis(10));
        assert_eq!(pauses[1], Duration::from_millis(20));
        assert_eq!(*pauses.last().unwrap(), ACCEPT_BACKOFF_MAX);
        assert!(pauses.windows(2).all(|w| w[0] <= w[1]));
        backoff.succeeded();
        assert_eq!(backoff.failed(&emfile, None), ACCEPT_BACKOFF_MIN);
        let aborted = io::Error::from_raw_os_error(libc::ECONNABORTED);
        assert_eq!(backoff.failed(&aborted, None), Duration::ZERO);
    }

    #[test]
    fn raising_the_open_files_limit_reaches_the_hard_limit() {
        let limit = raise_open_files_limit().unwrap();
        assert_eq!(limit.soft, limit.hard);
        assert!(limit.soft >= limit.soft_before);
    }
}
