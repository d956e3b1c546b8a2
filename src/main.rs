//! The `herald` command: `serve` a replica, `migrate` a database, and the
//! client commands `token`, `send` and `subscribe` for trying it out.

use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use herald::{
    auth::{self, SEND_SCOPE},
    config::{SecretArgs, ServeArgs},
    proto::{self, event::Kind, notifications_client::NotificationsClient},
    server, store, telemetry, transport,
};
use serde_json::json;
use tonic::{Request, transport::Channel};

/// Herald: a gRPC streaming notification service on PostgreSQL.
/// mimalloc: the service allocates many small, short-lived buffers per
/// request (HTTP/2 frames, protobuf messages); under load glibc's malloc
/// was ~18% of replica CPU in profiles (BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(name = "herald", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a replica.
    Serve(Box<ServeArgs>),
    /// Apply database migrations and exit.
    Migrate {
        /// PostgreSQL URL.
        #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
        database_url: String,
    },
    /// Print an HS256 token signed with the configured secret.
    Token {
        /// The user (`sub`).
        #[arg(long)]
        user: String,
        #[command(flatten)]
        claims: ClaimArgs,
        #[command(flatten)]
        secret: SecretArgs,
    },
    /// Send a notification and print what was stored, as JSON.
    Send(Box<SendArgs>),
    /// Stream a user's events, one JSON object per line.
    Subscribe(SubscribeArgs),
    /// Change the state of a user's notifications (read, unread, seen,
    /// archive, unarchive, delete) and print what changed, as JSON.
    State(StateArgs),
    /// Cancel a send scheduled with --deliver-in, by its idempotency key.
    Cancel(CancelArgs),
}

#[derive(Debug, Args)]
struct StateArgs {
    /// The user whose notifications change, when minting a token.
    #[arg(long)]
    user: String,
    /// What to do.
    #[arg(long, value_parser = ["read", "unread", "seen", "archive", "unarchive", "delete"])]
    action: String,
    /// These notification ids, comma-separated.
    #[arg(long, value_delimiter = ',', conflicts_with_all = ["up_to_seq", "types", "categories"])]
    ids: Vec<i64>,
    /// Every notification with seq <= this.
    #[arg(long, conflicts_with_all = ["types", "categories"])]
    up_to_seq: Option<u64>,
    /// By filter: these types (exact or `prefix.*`), comma-separated.
    #[arg(long, value_delimiter = ',')]
    types: Vec<String>,
    /// By filter: these categories, comma-separated.
    #[arg(long, value_delimiter = ',')]
    categories: Vec<String>,
    #[command(flatten)]
    client: ClientArgs,
}

#[derive(Debug, Args)]
struct CancelArgs {
    /// The scheduled send's idempotency key.
    #[arg(long)]
    key: String,
    /// The sender that scheduled it, when minting a token.
    #[arg(long = "as", default_value = "herald-cli")]
    sender: String,
    #[command(flatten)]
    client: ClientArgs,
}

#[derive(Debug, Args)]
struct ClaimArgs {
    /// Tenant claim.
    #[arg(long, env = "HERALD_TENANT", default_value = "")]
    tenant: String,
    /// Space-separated scopes.
    #[arg(long, default_value = "")]
    scope: String,
    /// Lifetime in seconds.
    #[arg(long, default_value_t = 3600)]
    ttl: u64,
}

#[derive(Debug, Args)]
struct ClientArgs {
    /// Server URL.
    #[arg(long, env = "HERALD_SERVER", default_value = "http://127.0.0.1:50051")]
    server: String,
    /// Bearer token; without it one is minted with the HS256 secret.
    #[arg(long, env = "HERALD_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Tenant of the minted token.
    #[arg(long, env = "HERALD_TENANT", default_value = "")]
    tenant: String,
    #[command(flatten)]
    secret: SecretArgs,
}

impl ClientArgs {
    fn token(&self, user: &str, scope: &str) -> anyhow::Result<String> {
        if let Some(t) = &self.token {
            return Ok(t.clone());
        }
        let Some(secret) = self.secret.secret()? else {
            bail!("give --token, or set HERALD_JWT_SECRET to mint one, or use --dev");
        };
        Ok(auth::mint(&secret, user, &self.tenant, scope, 3600)?)
    }

    async fn client(&self) -> anyhow::Result<NotificationsClient<Channel>> {
        let channel = Channel::from_shared(self.server.clone())
            .context("--server is not a URL")?
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .with_context(|| format!("cannot connect to {}", self.server))?;
        Ok(NotificationsClient::new(channel))
    }
}

fn authorized<T>(message: T, token: &str) -> anyhow::Result<Request<T>> {
    Ok(auth::bearer(message, token)?)
}

#[derive(Debug, Args)]
struct SendArgs {
    /// Recipients, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    to: Vec<String>,
    /// Notification type, e.g. `project.created`.
    #[arg(long = "type")]
    kind: String,
    /// Title.
    #[arg(long)]
    title: String,
    /// Body.
    #[arg(long, default_value = "")]
    body: String,
    /// Data: a JSON object.
    #[arg(long, default_value = "")]
    data: String,
    /// Idempotency key.
    #[arg(long, default_value = "")]
    idempotency_key: String,
    /// Category, e.g. `billing`.
    #[arg(long, default_value = "")]
    category: String,
    /// Severity: low, normal, high or critical.
    #[arg(long, value_parser = ["low", "normal", "high", "critical"])]
    severity: Option<String>,
    /// Who caused it (default: the sender).
    #[arg(long, default_value = "")]
    actor: String,
    /// Where opening it leads: an http(s) URL or a path starting with `/`.
    #[arg(long, default_value = "")]
    action_url: String,
    /// A button, `label=url` (repeatable, at most 5).
    #[arg(long = "action", value_parser = parse_action)]
    actions: Vec<proto::Action>,
    /// Update in place: replace each recipient's notification sent with
    /// this key, if any.
    #[arg(long, default_value = "", conflicts_with = "group_key")]
    replace_key: String,
    /// Fold into each recipient's group of this key opened within
    /// `--group-window`.
    #[arg(long, default_value = "", requires = "group_window")]
    group_key: String,
    /// How long a group stays open, e.g. `10m`.
    #[arg(long, value_parser = humantime::parse_duration, requires = "group_key")]
    group_window: Option<std::time::Duration>,
    /// With --replace-key or --group-key: an update makes the notification
    /// unread and unseen again.
    #[arg(long)]
    renotify: bool,
    /// Expire it this long after it is delivered, e.g. `15m`.
    #[arg(long, value_parser = humantime::parse_duration)]
    expires_in: Option<std::time::Duration>,
    /// Deliver it this much later, e.g. `2h` (scheduled; cancel with its
    /// idempotency key).
    #[arg(long, value_parser = humantime::parse_duration)]
    deliver_in: Option<std::time::Duration>,
    /// The sender, when minting a token.
    #[arg(long = "as", default_value = "herald-cli")]
    sender: String,
    #[command(flatten)]
    client: ClientArgs,
}

#[derive(Debug, Args)]
struct SubscribeArgs {
    /// The user, when minting a token.
    #[arg(long, default_value = "")]
    user: String,
    /// Resume after this seq.
    #[arg(long)]
    after_seq: Option<u64>,
    /// The epoch of --after-seq (the `epoch` of the events received).
    #[arg(long, default_value_t = 0)]
    epoch: u64,
    /// Only these types, comma-separated.
    #[arg(long, value_delimiter = ',')]
    types: Vec<String>,
    #[command(flatten)]
    client: ClientArgs,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli.command).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            match e.downcast_ref::<tonic::Status>() {
                Some(status) => eprintln!("error: {:?}: {}", status.code(), status.message()),
                None => eprintln!("error: {e:#}"),
            }
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve(args) => serve(*args).await,
        Command::Migrate { database_url } => {
            telemetry::init(telemetry::LogFormat::Text);
            let applied = store::postgres::migrate(&database_url).await?;
            tracing::info!(?applied, "migrations applied");
            Ok(())
        }
        Command::Token {
            user,
            claims,
            secret,
        } => {
            let Some(secret) = secret.secret()? else {
                bail!("set HERALD_JWT_SECRET (or --jwt-secret-file), or use --dev");
            };
            println!(
                "{}",
                auth::mint(&secret, &user, &claims.tenant, &claims.scope, claims.ttl)?
            );
            Ok(())
        }
        Command::Send(args) => send(*args).await,
        Command::Subscribe(args) => subscribe(args).await,
        Command::State(args) => change_state(args).await,
        Command::Cancel(args) => cancel(args).await,
    }
}

async fn change_state(args: StateArgs) -> anyhow::Result<()> {
    use proto::update_state_request::Target;
    let token = args.client.token(&args.user, "")?;
    let mut client = args.client.client().await?;
    let action = match args.action.as_str() {
        "read" => proto::StateAction::Read,
        "unread" => proto::StateAction::Unread,
        "seen" => proto::StateAction::Seen,
        "archive" => proto::StateAction::Archive,
        "unarchive" => proto::StateAction::Unarchive,
        _ => proto::StateAction::Delete,
    };
    let target = if !args.ids.is_empty() {
        Target::Ids(proto::NotificationIds { ids: args.ids })
    } else if let Some(seq) = args.up_to_seq {
        Target::UpToSeq(seq)
    } else if !args.types.is_empty() || !args.categories.is_empty() {
        Target::Filter(proto::NotificationFilter {
            types: args.types,
            categories: args.categories,
            min_severity: 0,
        })
    } else {
        bail!("give --ids, --up-to-seq, or a filter (--types, --categories)");
    };
    let request = proto::UpdateStateRequest {
        action: action as i32,
        target: Some(target),
    };
    let response = client
        .update_state(authorized(request, &token)?)
        .await?
        .into_inner();
    println!(
        "{}",
        json!({"changed": response.changed, "seq": response.seq})
    );
    Ok(())
}

async fn cancel(args: CancelArgs) -> anyhow::Result<()> {
    let token = args.client.token(&args.sender, SEND_SCOPE)?;
    let mut client = args.client.client().await?;
    let request = proto::CancelScheduledNotificationRequest {
        idempotency_key: args.key,
    };
    let response = client
        .cancel_scheduled_notification(authorized(request, &token)?)
        .await?
        .into_inner();
    println!("{}", json!({"cancelled": response.cancelled}));
    Ok(())
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    telemetry::init(args.log_format);
    transparent_huge_pages(args.transparent_huge_pages);
    let config = args.into_config()?;
    raise_open_files_limit();
    let grace = config.shutdown_grace;
    let running = server::start(config).await?;
    let token = running.shutdown_token();
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutting down: ending streams so clients resume elsewhere");
        token.cancel();
    });
    running.wait(grace).await?;
    Ok(())
}

/// Every connection holds a file descriptor: take all the operator allows
/// (the soft limit is often 1,024 while the hard one is far higher), and
/// say what it is.
fn raise_open_files_limit() {
    match transport::raise_open_files_limit() {
        Ok(limit) if limit.soft > limit.soft_before => tracing::info!(
            soft_before = limit.soft_before,
            soft = limit.soft,
            hard = limit.hard,
            "raised the open-files limit (RLIMIT_NOFILE) to its hard limit"
        ),
        Ok(limit) => tracing::info!(
            soft = limit.soft,
            hard = limit.hard,
            "open-files limit (RLIMIT_NOFILE) already at its hard limit"
        ),
        Err(e) => tracing::warn!(error = %e, "cannot read or raise the open-files limit"),
    }
}

/// Opts the process out of transparent huge pages unless `allowed`
/// (`--transparent-huge-pages`): mimalloc advises huge pages for its heap,
/// and the kernel then makes a whole 2 MiB page resident for the first byte
/// touched in it, which idle connections pay for (BENCHMARKS.md, `streams`).
/// The kernel checks the flag at each page fault, so memory mapped before
/// this call is covered too (prctl(2), `PR_SET_THP_DISABLE`).
fn transparent_huge_pages(allowed: bool) {
    if allowed {
        tracing::info!("transparent huge pages allowed (--transparent-huge-pages)");
        return;
    }
    #[cfg(target_os = "linux")]
    {
        // SAFETY: PR_SET_THP_DISABLE takes plain integer arguments and
        // changes only this process's memory policy.
        if unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) } != 0 {
            let e = std::io::Error::last_os_error();
            tracing::warn!(error = %e, "cannot opt out of transparent huge pages");
        }
    }
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// `label=url` → an action (the URL is checked by the server).
fn parse_action(value: &str) -> Result<proto::Action, String> {
    let (label, url) = value
        .split_once('=')
        .ok_or_else(|| format!("{value:?} is not label=url"))?;
    Ok(proto::Action {
        label: label.to_owned(),
        url: url.to_owned(),
    })
}

async fn send(args: SendArgs) -> anyhow::Result<()> {
    let token = args.client.token(&args.sender, SEND_SCOPE)?;
    let mut client = args.client.client().await?;
    let request = proto::SendNotificationRequest {
        recipients: args.to,
        r#type: args.kind,
        title: args.title,
        body: args.body,
        data: args.data,
        idempotency_key: args.idempotency_key,
        category: args.category,
        severity: match args.severity.as_deref() {
            Some("low") => proto::Severity::Low,
            Some("high") => proto::Severity::High,
            Some("critical") => proto::Severity::Critical,
            Some(_) => proto::Severity::Normal,
            None => proto::Severity::Unspecified,
        } as i32,
        actor: args.actor,
        action_url: args.action_url,
        actions: args.actions,
        replace_key: args.replace_key,
        group_key: args.group_key,
        group_window: match args.group_window {
            Some(w) => Some(w.try_into()?),
            None => None,
        },
        renotify: args.renotify,
        deliver_at: args
            .deliver_in
            .map(|d| (std::time::SystemTime::now() + d).into()),
        expires_at: args.expires_in.map(|d| {
            (std::time::SystemTime::now() + args.deliver_in.unwrap_or_default() + d).into()
        }),
    };
    let response = client
        .send_notification(authorized(request, &token)?)
        .await?
        .into_inner();
    let deliveries: Vec<_> = response
        .deliveries
        .iter()
        .map(|d| {
            json!({
                "recipient": d.recipient,
                "notification_id": d.notification_id,
                "seq": d.seq,
                "updated": d.updated,
            })
        })
        .collect();
    println!(
        "{}",
        json!({ "deliveries": deliveries, "scheduled": response.scheduled })
    );
    Ok(())
}

async fn subscribe(args: SubscribeArgs) -> anyhow::Result<()> {
    if args.user.is_empty() && args.client.token.is_none() {
        bail!("give --user (to mint a token) or --token");
    }
    let token = args.client.token(&args.user, "")?;
    let mut client = args.client.client().await?;
    let request = proto::SubscribeRequest {
        after_seq: args.after_seq,
        types: args.types,
        epoch: args.epoch,
        ..Default::default()
    };
    let mut stream = client
        .subscribe(authorized(request, &token)?)
        .await?
        .into_inner();
    while let Some(event) = stream.message().await? {
        println!("{}", event_json(&event));
    }
    Ok(())
}

fn event_json(event: &proto::Event) -> serde_json::Value {
    let notification = |n: &proto::Notification| {
        json!({
            "id": n.id,
            "seq": n.seq,
            "recipient": n.recipient,
            "type": n.r#type,
            "title": n.title,
            "body": n.body,
            "data": serde_json::from_str::<serde_json::Value>(&n.data).unwrap_or_default(),
            "created_at": n.created_at.map(|t| t.to_string()),
            "category": n.category,
            "severity": n.severity().as_str_name(),
            "actor": n.actor,
            "action_url": n.action_url,
            "actions": n.actions.iter().map(|a| json!({"label": a.label, "url": a.url})).collect::<Vec<_>>(),
            "replace_key": n.replace_key,
            "group_key": n.group_key,
            "group_count": n.group_count,
            "actors": n.actors,
        })
    };
    let (kind, body) = match &event.kind {
        Some(Kind::Notification(n)) => ("notification", notification(n)),
        Some(Kind::Updated(n)) => ("updated", notification(n)),
        Some(Kind::Read(r)) => (
            "read",
            json!({"notification_ids": r.notification_ids, "up_to_seq": r.up_to_seq}),
        ),
        Some(Kind::State(s)) => (
            "state",
            json!({
                "action": s.action().as_str_name(),
                "notification_ids": s.notification_ids,
                "up_to_seq": s.up_to_seq,
                "filter": s.filter.as_ref().map(|f| json!({
                    "types": f.types,
                    "categories": f.categories,
                    "min_severity": f.min_severity().as_str_name(),
                })),
            }),
        ),
        Some(Kind::CaughtUp(c)) => (
            "caught_up",
            json!({"heartbeat_interval": c.heartbeat_interval.map(|d| d.to_string())}),
        ),
        Some(Kind::Heartbeat(h)) => (
            "heartbeat",
            json!({"server_time": h.server_time.map(|t| t.to_string())}),
        ),
        Some(Kind::Resync(r)) => ("resync", json!({"reason": r.reason().as_str_name()})),
        None => ("unknown", json!({})),
    };
    json!({"seq": event.seq, "epoch": event.epoch, "kind": kind, kind: body})
}
