//! Configuration: the `herald serve` flags (each also an environment
//! variable), turned into one validated [`Config`]. The server refuses to
//! start on an invalid configuration and says why.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::Args;

use crate::{
    auth::{AuthConfig, DEV_SECRET, MAX_LEEWAY, VerificationKey},
    bus::postgres::ListenerSettings,
    hub::StreamLimits,
    limits::RateSettings,
    notification::SendLimits,
    store::{group_commit::GroupCommitSettings, postgres::DEFAULT_STATEMENT_TIMEOUT},
    telemetry::LogFormat,
    transport::TransportSettings,
};

/// Shortest HS256 secret accepted outside `--dev`: 256 bits, the hash size
/// (RFC 7518 §3.2).
pub const MIN_SECRET_BYTES: usize = 32;

/// The validated server configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address to serve gRPC on (port 0: any free port).
    pub listen: SocketAddr,
    /// PostgreSQL URL; `None` runs the in-memory store (one replica).
    pub database_url: Option<String>,
    /// URL for the LISTEN connection when it must bypass a transaction
    /// pooler; defaults to `database_url`.
    pub listener_database_url: Option<String>,
    /// Most pooled database connections.
    pub pool_size: usize,
    /// How long a call waits for a pooled connection (or a new one).
    pub pool_timeout: Duration,
    /// How tokens are verified.
    pub auth: AuthConfig,
    /// Development mode: loopback only, well-known secret.
    pub dev: bool,
    /// Idle time after which a stream gets a heartbeat.
    pub heartbeat_interval: Duration,
    /// How long an unused stream ticket stays valid.
    pub stream_ticket_lifetime: Duration,
    /// Events older than this are pruned; resuming before them gets
    /// `resync`.
    pub retention: Duration,
    /// Time between retention runs.
    pub prune_interval: Duration,
    /// Time between scheduler runs (scheduled sends, expiry).
    pub schedule_interval: Duration,
    /// The clock scheduling and expiry go by: the system's, or a test's.
    pub clock: crate::clock::Clock,
    /// Listener liveness probing.
    pub listener: ListenerSettings,
    /// Send limits.
    pub limits: SendLimits,
    /// Browser origins allowed to call over grpc-web (CORS); empty: none.
    pub cors_origins: Vec<String>,
    /// Where to serve Prometheus metrics; `None`: not served.
    pub metrics_listen: Option<SocketAddr>,
    /// How long a stop waits for in-flight calls before closing them.
    pub shutdown_grace: Duration,
    /// Time between health checks of the database and LISTEN connection.
    pub health_check_interval: Duration,
    /// How concurrent sends are batched into transactions (PostgreSQL).
    pub group_commit: GroupCommitSettings,
    /// Longest a write statement may run, lock waits included, before the
    /// call fails with UNAVAILABLE; `None`: the server's setting.
    pub statement_timeout: Option<Duration>,
    /// Per-stream queue and open-stream limits.
    pub streams: StreamLimits,
    /// Send rate limits.
    pub rates: RateSettings,
    /// Largest request message accepted, bytes.
    pub max_request_bytes: usize,
    /// Bounds on each connection and call of the gRPC port.
    pub transport: TransportSettings,
}

impl Config {
    /// A configuration with defaults, verifying tokens with `auth`, serving
    /// on `listen`, with the in-memory store.
    pub fn new(listen: SocketAddr, auth: AuthConfig) -> Self {
        Self {
            listen,
            database_url: None,
            listener_database_url: None,
            pool_size: 16,
            pool_timeout: Duration::from_secs(5),
            auth,
            dev: false,
            heartbeat_interval: Duration::from_secs(15),
            stream_ticket_lifetime: crate::api::DEFAULT_TICKET_LIFETIME,
            retention: Duration::from_secs(30 * 24 * 3600),
            prune_interval: Duration::from_secs(3600),
            schedule_interval: crate::store::scheduler::DEFAULT_SCHEDULE_INTERVAL,
            clock: crate::clock::Clock::system(),
            listener: ListenerSettings {
                ping_interval: Duration::from_secs(10),
                ping_timeout: Duration::from_secs(5),
            },
            limits: SendLimits::default(),
            cors_origins: Vec::new(),
            metrics_listen: None,
            shutdown_grace: Duration::from_secs(25),
            health_check_interval: Duration::from_secs(5),
            group_commit: GroupCommitSettings::default(),
            statement_timeout: Some(DEFAULT_STATEMENT_TIMEOUT),
            streams: StreamLimits::default(),
            rates: RateSettings::default(),
            max_request_bytes: 256 * 1024,
            transport: TransportSettings::default(),
        }
    }
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// No way to verify tokens.
    #[error(
        "no JWT verification key: set HERALD_JWT_SECRET (or --jwt-secret-file) for HS256, \
         or --jwt-public-key-file for RS256/ES256; for local development only, use --dev"
    )]
    NoKey,
    /// More than one key source.
    #[error(
        "give one of --jwt-secret or --jwt-secret-file (optionally with --jwt-previous-secret), \
         or --jwt-public-key-file"
    )]
    SeveralKeys,
    /// A secret too short to be safe.
    #[error("the JWT secret is {0} bytes; use at least {MIN_SECRET_BYTES} random bytes")]
    WeakSecret(usize),
    /// A key file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A public key that is neither RSA nor P-256 EC.
    #[error("--jwt-public-key-file: {0}")]
    BadPublicKey(String),
    /// `--dev` with a non-loopback listen address.
    #[error("--dev serves with a publicly known secret, so it binds to loopback only; {0} is not")]
    DevNotLoopback(SocketAddr),
    /// A value out of range.
    #[error("{0}")]
    Invalid(String),
}

/// Where an HS256 secret comes from; shared by `serve` and the client
/// commands (which mint their own tokens with it).
#[derive(Debug, Clone, Args)]
pub struct SecretArgs {
    /// HS256 secret for verifying (and, in client commands, minting) tokens.
    #[arg(long, env = "HERALD_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// File holding the HS256 secret (trailing newline ignored).
    #[arg(long, env = "HERALD_JWT_SECRET_FILE")]
    pub jwt_secret_file: Option<PathBuf>,
    /// Development mode: loopback only, with the documented insecure secret.
    #[arg(long, env = "HERALD_DEV")]
    pub dev: bool,
}

impl SecretArgs {
    /// The HS256 secret these flags give (the dev secret under `--dev`), if
    /// any. Reads the secret file.
    pub fn secret(&self) -> Result<Option<Vec<u8>>, ConfigError> {
        if let Some(s) = &self.jwt_secret {
            return Ok(Some(s.as_bytes().to_vec()));
        }
        if let Some(path) = &self.jwt_secret_file {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.clone(),
                source,
            })?;
            return Ok(Some(
                text.trim_end_matches(['\r', '\n']).as_bytes().to_vec(),
            ));
        }
        Ok(self.dev.then(|| DEV_SECRET.as_bytes().to_vec()))
    }
}

/// Token verification flags of `serve`.
#[derive(Debug, Clone, Args)]
pub struct AuthArgs {
    /// The HS256 secret, or `--dev`.
    #[command(flatten)]
    pub secret: SecretArgs,
    /// A second HS256 secret also accepted, for rotation: deploy the new
    /// secret as --jwt-secret and the old one here until its tokens expire.
    #[arg(long, env = "HERALD_JWT_PREVIOUS_SECRET", hide_env_values = true)]
    pub jwt_previous_secret: Option<String>,
    /// PEM public key files (RSA for RS256, P-256 EC for ES256),
    /// comma-separated; several are accepted at once, for rotation.
    #[arg(long, env = "HERALD_JWT_PUBLIC_KEY_FILE", value_delimiter = ',')]
    pub jwt_public_key_file: Vec<PathBuf>,
    /// Required `iss` claim.
    #[arg(long, env = "HERALD_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// Required `aud` claim.
    #[arg(long, env = "HERALD_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// How far past `exp` (or before `nbf`) a token is still accepted, for
    /// clock skew between the token issuer and Herald (RFC 7519 §4.1.4),
    /// e.g. `60s`; whole seconds, at most 1h.
    #[arg(long, env = "HERALD_JWT_LEEWAY", default_value = "60s", value_parser = duration)]
    pub jwt_leeway: Duration,
}

impl AuthArgs {
    /// The verification configuration for `serve`: HS256 secret(s) or
    /// public key(s), not both; a leeway of at most [`MAX_LEEWAY`].
    pub fn auth_config(&self) -> Result<AuthConfig, ConfigError> {
        if self.jwt_leeway > MAX_LEEWAY {
            return Err(ConfigError::Invalid(format!(
                "--jwt-leeway: {} is more than {}; leeway only absorbs clock skew between \
                 the token issuer and Herald, usually seconds (RFC 7519 §4.1.4)",
                humantime::format_duration(self.jwt_leeway),
                humantime::format_duration(MAX_LEEWAY),
            )));
        }
        let given_secret =
            self.secret.jwt_secret.is_some() || self.secret.jwt_secret_file.is_some();
        if self.secret.jwt_secret.is_some() && self.secret.jwt_secret_file.is_some()
            || given_secret && !self.jwt_public_key_file.is_empty()
        {
            return Err(ConfigError::SeveralKeys);
        }
        let keys = if !self.jwt_public_key_file.is_empty() {
            if self.jwt_previous_secret.is_some() {
                return Err(ConfigError::SeveralKeys);
            }
            self.jwt_public_key_file
                .iter()
                .map(|path| {
                    let pem = std::fs::read(path).map_err(|source| ConfigError::Read {
                        path: path.clone(),
                        source,
                    })?;
                    public_key(pem)
                })
                .collect::<Result<Vec<_>, _>>()?
        } else {
            let secret = self.secret.secret()?.ok_or(ConfigError::NoKey)?;
            let mut secrets = vec![secret];
            if let Some(previous) = &self.jwt_previous_secret {
                secrets.push(previous.as_bytes().to_vec());
            }
            if (given_secret || self.jwt_previous_secret.is_some())
                && let Some(weak) = secrets.iter().find(|s| s.len() < MIN_SECRET_BYTES)
            {
                return Err(ConfigError::WeakSecret(weak.len()));
            }
            secrets.into_iter().map(VerificationKey::Secret).collect()
        };
        Ok(AuthConfig {
            keys,
            issuer: self.jwt_issuer.clone(),
            audience: self.jwt_audience.clone(),
            leeway: self.jwt_leeway,
        })
    }
}

/// Tells RSA from EC by trying both parsers.
fn public_key(pem: Vec<u8>) -> Result<VerificationKey, ConfigError> {
    use jsonwebtoken::DecodingKey;
    if DecodingKey::from_rsa_pem(&pem).is_ok() {
        return Ok(VerificationKey::RsaPem(pem));
    }
    match DecodingKey::from_ec_pem(&pem) {
        Ok(_) => Ok(VerificationKey::EcPem(pem)),
        Err(e) => Err(ConfigError::BadPublicKey(format!(
            "not an RSA or EC public key in PEM: {e}"
        ))),
    }
}

fn duration(s: &str) -> Result<Duration, humantime::DurationError> {
    humantime::parse_duration(s)
}

/// `herald serve` flags.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address to serve gRPC on.
    #[arg(long, env = "HERALD_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// PostgreSQL URL. Without it, notifications are kept in memory (one
    /// replica, lost on restart).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Direct PostgreSQL URL for the LISTEN connection (LISTEN does not work
    /// through a transaction-pooling PgBouncer). Defaults to DATABASE_URL.
    #[arg(long, env = "HERALD_LISTENER_DATABASE_URL", hide_env_values = true)]
    pub listener_database_url: Option<String>,
    /// Most pooled database connections.
    #[arg(long, env = "HERALD_POOL_SIZE", default_value_t = 16)]
    pub pool_size: usize,
    /// How long a call waits for a database connection, e.g. `5s`.
    #[arg(long, env = "HERALD_POOL_TIMEOUT", default_value = "5s", value_parser = duration)]
    pub pool_timeout: Duration,
    /// Token verification.
    #[command(flatten)]
    pub auth: AuthArgs,
    /// Idle time after which a stream gets a heartbeat, e.g. `15s`.
    #[arg(long, env = "HERALD_HEARTBEAT_INTERVAL", default_value = "15s", value_parser = duration)]
    pub heartbeat_interval: Duration,
    /// How long a stream ticket (`CreateStreamTicket`, for SSE) stays valid
    /// unused, e.g. `30s`. Long enough for a page to open its stream; short,
    /// since the ticket travels in a URL.
    #[arg(long, env = "HERALD_STREAM_TICKET_LIFETIME", default_value = "30s", value_parser = duration)]
    pub stream_ticket_lifetime: Duration,
    /// Events queued per stream before a slow stream reads from the store.
    #[arg(long, env = "HERALD_STREAM_QUEUE", default_value_t = 256)]
    pub stream_queue: usize,
    /// How long events are kept, e.g. `30days`.
    #[arg(long, env = "HERALD_RETENTION", default_value = "30days", value_parser = duration)]
    pub retention: Duration,
    /// Time between retention runs.
    #[arg(long, env = "HERALD_PRUNE_INTERVAL", default_value = "1h", value_parser = duration)]
    pub prune_interval: Duration,
    /// Time between scheduler runs: how late, at most, a scheduled send
    /// (`deliver_at`) is delivered and an expired notification deleted.
    #[arg(long, env = "HERALD_SCHEDULE_INTERVAL", default_value = "1s", value_parser = duration)]
    pub schedule_interval: Duration,
    /// Time between LISTEN liveness probes.
    #[arg(long, env = "HERALD_LISTENER_PING_INTERVAL", default_value = "10s", value_parser = duration)]
    pub listener_ping_interval: Duration,
    /// How long a LISTEN liveness probe may take before reconnecting.
    #[arg(long, env = "HERALD_LISTENER_PING_TIMEOUT", default_value = "5s", value_parser = duration)]
    pub listener_ping_timeout: Duration,
    /// Most distinct recipients of one send.
    #[arg(long, env = "HERALD_MAX_RECIPIENTS", default_value_t = 1_000)]
    pub max_recipients: usize,
    /// Most items of one `SendNotifications` call (each is a whole send).
    #[arg(long, env = "HERALD_MAX_BULK_ITEMS", default_value_t = 1_000)]
    pub max_bulk_items: usize,
    /// Longest notification body, bytes.
    #[arg(long, env = "HERALD_MAX_BODY_BYTES", default_value_t = 16 * 1024)]
    pub max_body_bytes: usize,
    /// Longest notification data JSON, bytes.
    #[arg(long, env = "HERALD_MAX_DATA_BYTES", default_value_t = 16 * 1024)]
    pub max_data_bytes: usize,
    /// Deepest nesting of objects/arrays in notification data.
    #[arg(long, env = "HERALD_MAX_DATA_DEPTH", default_value_t = 16)]
    pub max_data_depth: usize,
    /// Largest request message, bytes (larger: RESOURCE_EXHAUSTED).
    #[arg(long, env = "HERALD_MAX_REQUEST_BYTES", default_value_t = 256 * 1024)]
    pub max_request_bytes: usize,
    /// Open streams per user on one replica.
    #[arg(long, env = "HERALD_MAX_STREAMS_PER_USER", default_value_t = 32)]
    pub max_streams_per_user: usize,
    /// Open streams on one replica.
    #[arg(long, env = "HERALD_MAX_STREAMS", default_value_t = 100_000)]
    pub max_streams: usize,
    /// Sends per second per sender (per replica); 0: unlimited.
    #[arg(long, env = "HERALD_RATE_PER_SENDER", default_value_t = 1_000)]
    pub rate_per_sender: u32,
    /// Burst above --rate-per-sender.
    #[arg(long, env = "HERALD_RATE_SENDER_BURST", default_value_t = 2_000)]
    pub rate_sender_burst: u32,
    /// Notifications per second per recipient (per replica); 0: unlimited.
    #[arg(long, env = "HERALD_RATE_PER_RECIPIENT", default_value_t = 20)]
    pub rate_per_recipient: u32,
    /// Burst above --rate-per-recipient.
    #[arg(long, env = "HERALD_RATE_RECIPIENT_BURST", default_value_t = 100)]
    pub rate_recipient_burst: u32,
    /// Stream tickets per minute per user (per replica): `CreateStreamTicket`
    /// and the resume ticket each SSE stream sets; 0: unlimited.
    #[arg(long, env = "HERALD_RATE_TICKETS_PER_MINUTE", default_value_t = 60)]
    pub rate_tickets_per_minute: u32,
    /// Burst above --rate-tickets-per-minute.
    #[arg(long, env = "HERALD_RATE_TICKET_BURST", default_value_t = 30)]
    pub rate_ticket_burst: u32,
    /// Browser origins allowed to call over grpc-web, comma-separated, e.g.
    /// `https://app.example.com`. None by default.
    #[arg(long, env = "HERALD_CORS_ORIGINS", value_delimiter = ',')]
    pub cors_origins: Vec<String>,
    /// Address to serve Prometheus metrics on (`/metrics`), e.g.
    /// `0.0.0.0:9090`. Not served by default.
    #[arg(long, env = "HERALD_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// On SIGTERM, how long to wait for in-flight calls before exiting.
    #[arg(long, env = "HERALD_SHUTDOWN_GRACE", default_value = "25s", value_parser = duration)]
    pub shutdown_grace: Duration,
    /// Time between health checks of the database and LISTEN connection.
    #[arg(long, env = "HERALD_HEALTH_CHECK_INTERVAL", default_value = "5s", value_parser = duration)]
    pub health_check_interval: Duration,
    /// Group commit: writer tasks, each committing one batch of sends at a
    /// time.
    #[arg(long, env = "HERALD_GROUP_COMMIT_WRITERS", default_value_t = 2)]
    pub group_commit_writers: usize,
    /// Group commit: most sends per transaction.
    #[arg(long, env = "HERALD_GROUP_COMMIT_MAX_SENDS", default_value_t = 256)]
    pub group_commit_max_sends: usize,
    /// Group commit: how long a writer that found several sends waiting
    /// lingers for more, e.g. `1ms`; `0s` commits at once.
    #[arg(long, env = "HERALD_GROUP_COMMIT_WINDOW", default_value = "0s", value_parser = duration)]
    pub group_commit_window: Duration,
    /// Longest a write statement may run, lock waits included, before the
    /// call fails with UNAVAILABLE (PostgreSQL `statement_timeout`, set per
    /// transaction); `0s`: the server's own setting.
    #[arg(long, env = "HERALD_STATEMENT_TIMEOUT", default_value = "10s", value_parser = duration)]
    pub statement_timeout: Duration,
    /// Longest a connection may go without a call in flight until one of
    /// its requests authenticates (a bearer token that verifies), e.g.
    /// `10s`: from accept it must complete protocol detection (the HTTP/2
    /// preface, RFC 9113 §3.4) and send its first request within this, and
    /// after unauthenticated calls it may idle only this long (or stay busy
    /// with answers it does not read for --call-timeout more); then it is
    /// closed. Long enough for a slow network's first round trips; a client
    /// that connects ahead of its first call and waits longer reconnects
    /// when it makes the call.
    #[arg(long, env = "HERALD_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = duration)]
    pub handshake_timeout: Duration,
    /// Time a call has, from its headers, to send its whole request body,
    /// e.g. `10s`; then it ends with DEADLINE_EXCEEDED. Every request is one
    /// message of at most --max-request-bytes, so this only needs to cover
    /// the slowest legitimate upload of one.
    #[arg(long, env = "HERALD_REQUEST_BODY_TIMEOUT", default_value = "10s", value_parser = duration)]
    pub request_body_timeout: Duration,
    /// Longest a call other than a Subscribe stream may take, from its
    /// headers to its response, e.g. `30s`; then it ends with
    /// DEADLINE_EXCEEDED (a health Watch too: it needs no token, and its
    /// client watches again). A client's shorter `grpc-timeout` applies
    /// first. Keep it above --statement-timeout plus --pool-timeout, so
    /// calls that wait on the database fail with their own status first.
    #[arg(long, env = "HERALD_CALL_TIMEOUT", default_value = "30s", value_parser = duration)]
    pub call_timeout: Duration,
    /// Most concurrent calls (streams included) on one HTTP/2 connection
    /// (SETTINGS_MAX_CONCURRENT_STREAMS, RFC 9113 §5.1.2). A client or
    /// proxy multiplexing more streams over one connection must open more
    /// connections: tonic and grpc-go channels do not, they queue further
    /// calls until a slot frees, so a gateway holding many users' streams
    /// on one channel needs more channels or a higher value.
    #[arg(long, env = "HERALD_MAX_CONCURRENT_STREAMS", default_value_t = 1_000)]
    pub max_concurrent_streams: u32,
    /// Streams the server may reset for a client's protocol errors
    /// (refused streams included) on one HTTP/2 connection before it sends
    /// GOAWAY ENHANCE_YOUR_CALM and closes it; counted over the
    /// connection's life (hyper's default). A compliant client that reuses
    /// a stream slot an instant before the server has freed it is refused
    /// too, so a long-lived connection kept at the stream limit needs room.
    #[arg(
        long,
        env = "HERALD_MAX_RESETS_PER_CONNECTION",
        default_value_t = 1_024
    )]
    pub max_resets_per_connection: usize,
    /// Log format: `text` or `json`.
    #[arg(long, env = "HERALD_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Let the heap be backed by transparent huge pages (2 MiB) where the
    /// kernel offers them (`/sys/kernel/mm/transparent_hugepage/enabled`
    /// is `madvise` or `always`; mimalloc asks for them with
    /// `madvise(MADV_HUGEPAGE)`). Off, the process opts out
    /// (`prctl(PR_SET_THP_DISABLE)`) and its memory is counted in 4 KiB
    /// pages. Trade-off: huge pages cost fewer TLB misses, but a huge page
    /// is resident as soon as one byte of it is touched, and an idle
    /// connection touches a few bytes of many allocations: measured on
    /// 10,000 idle streams on their own connections, 47.2 KiB of RSS per
    /// stream with them, 30.0 KiB without (grpc-web over HTTP/1.1: 37.7
    /// and 24.5); the latency and throughput runs of both overlapped
    /// (BENCHMARKS.md, "Memory per connection"). A process-wide setting,
    /// read once at start-up.
    #[arg(
        long,
        env = "HERALD_TRANSPARENT_HUGE_PAGES",
        default_value_t = false,
        action = clap::ArgAction::Set
    )]
    pub transparent_huge_pages: bool,
}

/// Checks an origin (RFC 6454 §6.2 serialization): `scheme://host[:port]`,
/// no path, usable as a header value.
fn parse_origin(origin: &str) -> Result<String, ConfigError> {
    let bad = || {
        ConfigError::Invalid(format!(
            "--cors-origins: {origin:?} is not an origin like https://app.example.com"
        ))
    };
    let origin = origin.trim();
    let (scheme, rest) = origin.split_once("://").ok_or_else(bad)?;
    if !matches!(scheme, "http" | "https")
        || rest.is_empty()
        || rest.contains(['/', '?', '#', ' '])
        || http::HeaderValue::from_str(origin).is_err()
    {
        return Err(bad());
    }
    Ok(origin.to_owned())
}

impl ServeArgs {
    /// Validates the flags into a [`Config`].
    pub fn into_config(self) -> Result<Config, ConfigError> {
        let auth = self.auth.auth_config()?;
        if self.auth.secret.dev && !self.listen.ip().is_loopback() {
            return Err(ConfigError::DevNotLoopback(self.listen));
        }
        for (name, d) in [
            ("--heartbeat-interval", self.heartbeat_interval),
            ("--stream-ticket-lifetime", self.stream_ticket_lifetime),
            // 0 would prune every event as soon as it is stored: a resuming
            // client would always get resync and a fresh one no backlog.
            ("--retention", self.retention),
            ("--prune-interval", self.prune_interval),
            ("--schedule-interval", self.schedule_interval),
            ("--listener-ping-interval", self.listener_ping_interval),
            ("--listener-ping-timeout", self.listener_ping_timeout),
            ("--pool-timeout", self.pool_timeout),
            ("--shutdown-grace", self.shutdown_grace),
            ("--health-check-interval", self.health_check_interval),
            ("--handshake-timeout", self.handshake_timeout),
            ("--request-body-timeout", self.request_body_timeout),
            ("--call-timeout", self.call_timeout),
        ] {
            if d.is_zero() {
                return Err(ConfigError::Invalid(format!("{name} must be positive")));
            }
        }
        if [
            self.max_recipients,
            self.max_bulk_items,
            self.pool_size,
            self.stream_queue,
            self.max_data_depth,
            self.max_request_bytes,
            self.max_streams_per_user,
            self.max_streams,
            self.group_commit_writers,
            self.group_commit_max_sends,
            self.max_resets_per_connection,
            self.max_concurrent_streams as usize,
        ]
        .contains(&0)
        {
            return Err(ConfigError::Invalid(
                "--max-recipients, --max-bulk-items, --pool-size, --stream-queue, --max-data-depth, \
                 --max-request-bytes, --max-streams-per-user, --max-streams, \
                 --group-commit-writers, --group-commit-max-sends, --max-resets-per-connection \
                 and --max-concurrent-streams must be positive"
                    .into(),
            ));
        }
        if self.group_commit_writers >= self.pool_size {
            return Err(ConfigError::Invalid(format!(
                "--group-commit-writers ({}) must be below --pool-size ({}): each writer holds \
                 a pooled connection while it commits",
                self.group_commit_writers, self.pool_size
            )));
        }
        if self.listener_database_url.is_some() && self.database_url.is_none() {
            return Err(ConfigError::Invalid(
                "HERALD_LISTENER_DATABASE_URL needs DATABASE_URL".into(),
            ));
        }
        Ok(Config {
            listen: self.listen,
            database_url: self.database_url,
            listener_database_url: self.listener_database_url,
            pool_size: self.pool_size,
            pool_timeout: self.pool_timeout,
            auth,
            dev: self.auth.secret.dev,
            heartbeat_interval: self.heartbeat_interval,
            stream_ticket_lifetime: self.stream_ticket_lifetime,
            retention: self.retention,
            prune_interval: self.prune_interval,
            schedule_interval: self.schedule_interval,
            clock: crate::clock::Clock::system(),
            listener: ListenerSettings {
                ping_interval: self.listener_ping_interval,
                ping_timeout: self.listener_ping_timeout,
            },
            limits: SendLimits {
                max_recipients: self.max_recipients,
                max_bulk_items: self.max_bulk_items,
                max_body_bytes: self.max_body_bytes,
                max_data_bytes: self.max_data_bytes,
                max_data_depth: self.max_data_depth,
            },
            streams: StreamLimits {
                queue_len: self.stream_queue,
                per_user: self.max_streams_per_user,
                total: self.max_streams,
            },
            rates: RateSettings {
                per_sender: self.rate_per_sender,
                sender_burst: self.rate_sender_burst,
                per_recipient: self.rate_per_recipient,
                recipient_burst: self.rate_recipient_burst,
                tickets_per_minute: self.rate_tickets_per_minute,
                ticket_burst: self.rate_ticket_burst,
            },
            max_request_bytes: self.max_request_bytes,
            transport: TransportSettings {
                handshake_timeout: self.handshake_timeout,
                request_body_timeout: self.request_body_timeout,
                call_timeout: self.call_timeout,
                max_concurrent_streams: self.max_concurrent_streams,
                max_resets_per_connection: self.max_resets_per_connection,
            },
            statement_timeout: Some(self.statement_timeout).filter(|d| !d.is_zero()),
            cors_origins: self
                .cors_origins
                .iter()
                .filter(|o| !o.trim().is_empty())
                .map(|o| parse_origin(o))
                .collect::<Result<_, _>>()?,
            metrics_listen: self.metrics_listen,
            shutdown_grace: self.shutdown_grace,
            health_check_interval: self.health_check_interval,
            group_commit: GroupCommitSettings {
                writers: self.group_commit_writers,
                max_sends: self.group_commit_max_sends,
                window: self.group_commit_window,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    fn parse(args: &[&str]) -> Result<Config, ConfigError> {
        // Only flags, so the environment of the test run cannot leak in
        // through defaults that the flags do not override.
        let mut argv = vec!["herald"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv).unwrap().serve.into_config()
    }

    #[test]
    fn refuses_to_start_without_a_key() {
        if std::env::vars().any(|(k, _)| k.starts_with("HERALD_JWT") || k == "HERALD_DEV") {
            return; // the environment configures a key; nothing to check
        }
        let err = parse(&[]).unwrap_err();
        assert!(matches!(err, ConfigError::NoKey));
        assert!(
            err.to_string().contains("--dev"),
            "says how to fix it: {err}"
        );
    }

    #[test]
    fn dev_binds_to_loopback_only() {
        let err = parse(&["--dev", "--listen", "0.0.0.0:50051"]).unwrap_err();
        assert!(matches!(err, ConfigError::DevNotLoopback(_)));
        let ok = parse(&["--dev"]).unwrap();
        assert!(ok.dev);
        assert!(
            matches!(&ok.auth.keys[..], [VerificationKey::Secret(s)] if s == DEV_SECRET.as_bytes())
        );
    }

    #[test]
    fn refuses_weak_or_conflicting_keys() {
        assert!(matches!(
            parse(&["--jwt-secret", "short"]).unwrap_err(),
            ConfigError::WeakSecret(5)
        ));
        let secret = "s".repeat(MIN_SECRET_BYTES);
        assert!(matches!(
            parse(&[
                "--jwt-secret",
                &secret,
                "--jwt-public-key-file",
                "/nonexistent"
            ])
            .unwrap_err(),
            ConfigError::SeveralKeys
        ));
        assert!(parse(&["--jwt-secret", &secret, "--listen", "0.0.0.0:1"]).is_ok());
        assert!(matches!(
            parse(&["--dev", "--heartbeat-interval", "0s"]).unwrap_err(),
            ConfigError::Invalid(_)
        ));
        let zero_retention = parse(&["--dev", "--retention", "0s"]).unwrap_err();
        assert!(
            zero_retention.to_string().contains("--retention"),
            "{zero_retention}"
        );
        for bad in ["app.example.com", "https://app.example.com/path", "ftp://x"] {
            assert!(
                matches!(
                    parse(&["--dev", "--cors-origins", bad]),
                    Err(ConfigError::Invalid(_))
                ),
                "{bad}"
            );
        }
        let ok = parse(&[
            "--dev",
            "--cors-origins",
            "https://a.example,http://127.0.0.1:5173",
        ])
        .unwrap();
        assert_eq!(
            ok.cors_origins,
            ["https://a.example", "http://127.0.0.1:5173"]
        );
    }

    #[test]
    fn jwt_leeway_defaults_to_a_minute_and_refuses_an_hour_more() {
        let leeway = |args: &[&str]| {
            let mut argv = vec!["--dev"];
            argv.extend_from_slice(args);
            parse(&argv).map(|c| c.auth.leeway)
        };
        if std::env::var_os("HERALD_JWT_LEEWAY").is_none() {
            assert_eq!(leeway(&[]).unwrap(), crate::auth::DEFAULT_LEEWAY);
        }
        assert_eq!(leeway(&["--jwt-leeway", "0s"]).unwrap(), Duration::ZERO);
        assert_eq!(
            leeway(&["--jwt-leeway", "5s"]).unwrap(),
            Duration::from_secs(5)
        );
        assert_eq!(leeway(&["--jwt-leeway", "1h"]).unwrap(), MAX_LEEWAY);
        let err = leeway(&["--jwt-leeway", "1h 1s"]).unwrap_err();
        assert!(matches!(err, ConfigError::Invalid(_)), "{err}");
        assert!(
            err.to_string()
                .starts_with("--jwt-leeway: 1h 1s is more than 1h"),
            "{err}"
        );
    }

    #[test]
    fn transport_bounds_default_to_the_production_defaults_and_must_be_positive() {
        let env = ["HANDSHAKE_TIMEOUT", "REQUEST_BODY_TIMEOUT", "CALL_TIMEOUT"];
        if std::env::vars().any(|(k, _)| {
            k.strip_prefix("HERALD_").is_some_and(|k| {
                env.contains(&k) || k.starts_with("MAX_CONCURRENT") || k.starts_with("MAX_RESETS")
            })
        }) {
            return; // the environment overrides a default; nothing to check
        }
        assert_eq!(
            parse(&["--dev"]).unwrap().transport,
            TransportSettings::default()
        );
        for zero in [
            ["--handshake-timeout", "0s"],
            ["--request-body-timeout", "0s"],
            ["--call-timeout", "0s"],
            ["--max-concurrent-streams", "0"],
            ["--max-resets-per-connection", "0"],
        ] {
            let err = parse(&["--dev", zero[0], zero[1]]).unwrap_err();
            assert!(
                matches!(&err, ConfigError::Invalid(m) if m.contains(zero[0])),
                "{zero:?}: {err}"
            );
        }
    }

    #[test]
    fn transparent_huge_pages_are_off_unless_asked_for() {
        let args = |extra: &[&str]| {
            let mut argv = vec!["herald", "--dev"];
            argv.extend_from_slice(extra);
            Cli::try_parse_from(argv).map(|cli| cli.serve.transparent_huge_pages)
        };
        if std::env::var_os("HERALD_TRANSPARENT_HUGE_PAGES").is_none() {
            assert!(!args(&[]).unwrap());
        }
        assert!(args(&["--transparent-huge-pages=true"]).unwrap());
        assert!(!args(&["--transparent-huge-pages", "false"]).unwrap());
        assert!(args(&["--transparent-huge-pages", "maybe"]).is_err());
    }
}
