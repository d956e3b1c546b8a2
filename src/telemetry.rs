//! Logs and metrics.
//!
//! Logs: `tracing` to stderr, human-readable or JSON (one object per line,
//! with the fields of every enclosing span, so each line of a call carries
//! its `request_id`), filtered by `RUST_LOG` (default `info`).
//!
//! Metrics: the `metrics` facade, exported in the Prometheus text format
//! (<https://prometheus.io/docs/instrumenting/exposition_formats/>) on a
//! separate port at `/metrics`. Without a metrics port no recorder is
//! installed and every metric call is a no-op.

use std::{convert::Infallible, net::SocketAddr, sync::OnceLock, time::Duration};

use http_body_util::Full;
use hyper::{Request, Response, body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use crate::transport::AcceptBackoff;

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, with span fields (for log pipelines).
    Json,
}

/// Installs the global log subscriber. Call once, from `main`.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .init(),
    }
}

/// Metric names, all prefixed `herald_`. Durations are in seconds.
pub mod names {
    /// Gauge: open `Subscribe` streams on this replica.
    pub const STREAMS_OPEN: &str = "herald_streams_open";
    /// Counter: notifications stored (one per recipient).
    pub const NOTIFICATIONS_STORED: &str = "herald_notifications_stored_total";
    /// Counter: notification and read events sent to streams.
    pub const EVENTS_PUSHED: &str = "herald_events_pushed_total";
    /// Histogram: notification stored (transaction start) → sent on a live
    /// stream, seconds.
    pub const COMMIT_TO_PUSH: &str = "herald_commit_to_push_seconds";
    /// Histogram: `SendNotification` handling time, seconds.
    pub const SEND_DURATION: &str = "herald_send_duration_seconds";
    /// Counter: LISTEN connection re-establishments.
    pub const LISTENER_RECONNECTS: &str = "herald_listener_reconnects_total";
    /// Counter: times a stream fell behind and caught up from the store.
    pub const STREAM_LAGS: &str = "herald_stream_lag_total";
    /// Counter: `resync` events sent, by `reason` (the `Resync.Reason`
    /// name, e.g. `REASON_PRUNED`).
    pub const STREAM_RESYNCS: &str = "herald_stream_resync_total";
    /// Gauge: pooled database connections, by `state` (`in_use`, `idle`).
    pub const POOL_CONNECTIONS: &str = "herald_db_pool_connections";
    /// Counter: gRPC calls by `method` and `code` (gRPC status code name).
    pub const GRPC_REQUESTS: &str = "herald_grpc_requests_total";
    /// Gauge: open connections on the gRPC port (HTTP/2 and HTTP/1.1, also
    /// those still in their handshake).
    pub const CONNECTIONS_OPEN: &str = "herald_connections_open";
    /// Counter: connections accepted on the gRPC port.
    pub const CONNECTIONS_ACCEPTED: &str = "herald_connections_accepted_total";
    /// Counter: connections closed by a bound, by `reason`:
    /// `handshake_timeout` (idle before any authenticated request: no
    /// first request in time, or only unauthenticated ones), `reset_limit`
    /// (GOAWAY `ENHANCE_YOUR_CALM` for too many stream resets),
    /// `header_timeout` (HTTP/1.1 headers too slow).
    pub const CONNECTIONS_CLOSED: &str = "herald_connections_closed_total";
    /// Counter: calls ended with `DEADLINE_EXCEEDED` by a server bound, by
    /// `bound`: `request_body` (request not received in time),
    /// `call_timeout` (no response in time).
    pub const CALLS_TIMED_OUT: &str = "herald_calls_timed_out_total";
    /// Counter: failed `accept(2)`s, by `listener` (`grpc`, `metrics`) and
    /// `kind`: `out_of_fds` (EMFILE/ENFILE), `out_of_memory`
    /// (ENOBUFS/ENOMEM), `aborted` (the pending connection died first),
    /// `other`.
    pub const ACCEPT_ERRORS: &str = "herald_accept_errors_total";
}

/// Histogram buckets for latencies, seconds: 0.5 ms to 5 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
];

/// The process-wide Prometheus recorder, installed on first use. Every
/// replica in the process shares it.
pub fn metrics_handle() -> Option<&'static PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets(LATENCY_BUCKETS)
                .and_then(PrometheusBuilder::install_recorder);
            match handle {
                Ok(h) => {
                    describe();
                    Some(h)
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot install the metrics recorder");
                    None
                }
            }
        })
        .as_ref()
}

fn describe() {
    use names::*;
    metrics::describe_gauge!(STREAMS_OPEN, "Open Subscribe streams on this replica.");
    metrics::describe_counter!(
        NOTIFICATIONS_STORED,
        "Notifications stored, one per recipient."
    );
    metrics::describe_counter!(
        EVENTS_PUSHED,
        "Notification and read events sent to streams."
    );
    metrics::describe_histogram!(
        COMMIT_TO_PUSH,
        metrics::Unit::Seconds,
        "Notification stored to sent on a live stream."
    );
    metrics::describe_histogram!(
        SEND_DURATION,
        metrics::Unit::Seconds,
        "SendNotification handling time."
    );
    metrics::describe_counter!(LISTENER_RECONNECTS, "LISTEN connection re-establishments.");
    metrics::describe_counter!(
        STREAM_LAGS,
        "Times a stream fell behind and read from the store."
    );
    metrics::describe_counter!(
        STREAM_RESYNCS,
        "Resume positions that could not be continued (resync), by reason."
    );
    metrics::describe_gauge!(POOL_CONNECTIONS, "Pooled database connections by state.");
    metrics::describe_counter!(GRPC_REQUESTS, "gRPC calls by method and status code.");
    metrics::describe_gauge!(CONNECTIONS_OPEN, "Open connections on the gRPC port.");
    metrics::describe_counter!(
        CONNECTIONS_ACCEPTED,
        "Connections accepted on the gRPC port."
    );
    metrics::describe_counter!(
        CONNECTIONS_CLOSED,
        "Connections closed by a bound (handshake timeout, reset limit, header timeout)."
    );
    metrics::describe_counter!(
        CALLS_TIMED_OUT,
        "Calls ended with DEADLINE_EXCEEDED by a server bound (request body, call timeout)."
    );
    metrics::describe_counter!(
        ACCEPT_ERRORS,
        "Failed accepts by listener and kind (out_of_fds, out_of_memory, aborted, other)."
    );
}

/// Time a scraper has to send its request's headers.
const METRICS_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `/metrics` (anything else: 404) on `listener` until `shutdown`.
/// Failed accepts back off like the gRPC port's (a full descriptor table
/// must not spin this loop either), and a connection that does not send
/// its request headers in time is closed.
pub async fn serve_metrics(
    listener: TcpListener,
    handle: &'static PrometheusHandle,
    shutdown: CancellationToken,
) {
    let addr = listener.local_addr().ok();
    let mut backoff = AcceptBackoff::new("metrics");
    loop {
        let (stream, _) = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => {
                    backoff.succeeded();
                    a
                }
                Err(e) => {
                    let pause = backoff.failed(&e, addr);
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(pause) => continue,
                    }
                }
            },
        };
        let service = service_fn(move |req: Request<hyper::body::Incoming>| async move {
            let response = if req.uri().path() == "/metrics" {
                handle.run_upkeep();
                Response::builder()
                    .header("content-type", "text/plain; version=0.0.4")
                    .body(Full::new(Bytes::from(handle.render())))
            } else {
                Response::builder()
                    .status(404)
                    .body(Full::new(Bytes::from_static(b"not found\n")))
            };
            Ok::<_, Infallible>(response.unwrap_or_default())
        });
        tokio::spawn(async move {
            let _ = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(METRICS_HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Binds the metrics port. Split from [`serve_metrics`] so start-up fails
/// on a taken port.
pub async fn bind_metrics(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}
