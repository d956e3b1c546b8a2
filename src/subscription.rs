//! One `Subscribe` stream, from backlog to live, without loss, duplicates or
//! reordering.
//!
//! The stream is registered in the hub *before* the backlog is read, so
//! nothing committed in between is missed; live events at or below the last
//! delivered seq are then skipped. The stream tracks `last`, the seq of the
//! last event it delivered (or filtered out), and delivers only `last + 1`:
//! a live event further ahead means one was missed (its queue overflowed, or
//! the LISTEN connection dropped), and the stream catches up from the store
//! from `last`. Because seqs are gap-free per user, a gap is always visible.

use std::{
    collections::HashSet,
    sync::Arc,
    time::{Duration, SystemTime},
};

use tokio::{
    sync::mpsc,
    time::{Instant, sleep_until},
};
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::{
    api::{convert::control, status},
    hub::{Next, Subscription},
    notification::{EventBody, InvalidArgument, StreamEvent, StreamHead},
    proto::{self, event::Kind},
    store::{Store, StoreError},
    telemetry::names,
    wire::WireEvent,
};

/// What a stream's task hands to tonic: encoded events (see `wire.rs`).
/// Boxed so the channel's slots are pointer-sized: tokio allocates a block
/// of 32 slots per channel up front.
pub type Outgoing = Result<Box<WireEvent>, Box<Status>>;

/// The response stream of `Subscribe`: the events a [`Session`] produces.
#[derive(Debug)]
pub struct EventStream {
    rx: mpsc::Receiver<Outgoing>,
}

impl EventStream {
    /// A stream of what is sent on `rx`.
    pub fn new(rx: mpsc::Receiver<Outgoing>) -> Self {
        Self { rx }
    }
}

impl futures_util::Stream for EventStream {
    type Item = Result<WireEvent, Status>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.rx
            .poll_recv(cx)
            .map(|o| o.map(|r| r.map(|e| *e).map_err(|s| *s)))
    }
}

/// Events read from the store per query while catching up.
pub const BACKLOG_PAGE: usize = 500;

/// Where a new stream starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// No resume position: replay unread notifications up to this head seq.
    Fresh(u64),
    /// Replay every event after this seq.
    After(u64),
    /// The resume position was pruned: send `resync`, go live from this seq.
    Resync(u64),
}

impl Start {
    /// Decides where a stream starts, from the client's resume position and
    /// the stream head read *after* the stream was registered in the hub.
    /// A position beyond the head is one this server never issued.
    pub fn new(after_seq: Option<u64>, head: StreamHead) -> Result<Self, InvalidArgument> {
        match after_seq {
            None => Ok(Self::Fresh(head.last_seq)),
            Some(s) if s > head.last_seq => Err(InvalidArgument::new(
                "after_seq",
                format!(
                    "{s} is beyond the stream's newest event ({})",
                    head.last_seq
                ),
            )),
            Some(s) if s < head.pruned_seq => Ok(Self::Resync(head.last_seq)),
            Some(s) => Ok(Self::After(s)),
        }
    }
}

/// Settings shared by all streams.
#[derive(Debug, Clone, Copy)]
pub struct StreamSettings {
    /// Idle time after which a heartbeat is sent.
    pub heartbeat_interval: Duration,
}

/// A running stream: everything its task needs.
pub struct Session<S> {
    /// The store, for backlog and catch-up reads.
    pub store: Arc<S>,
    /// The stream's hub registration.
    pub subscription: Subscription,
    /// The stream's tenant.
    pub tenant: String,
    /// The stream's user.
    pub user: String,
    /// Notification types to send; empty for all.
    pub types: HashSet<String>,
    /// Shared settings.
    pub settings: StreamSettings,
    /// Cancelled when the server stops.
    pub shutdown: CancellationToken,
    /// When the stream's token expires: the stream then ends with
    /// UNAUTHENTICATED, and the client resumes with a fresh token.
    pub token_expires_at: SystemTime,
    /// Where events go (to tonic, then the client).
    pub out: mpsc::Sender<Outgoing>,
}

/// Why a stream ended early.
enum End {
    /// The client went away.
    Gone,
    /// The token expired.
    Expired(u64),
    /// A store read failed; the client should resume.
    Store(StoreError),
}

impl<S: Store> Session<S> {
    /// Runs the stream until the client leaves, the server stops (the
    /// client gets `UNAVAILABLE` and resumes elsewhere), or a store read
    /// fails (`UNAVAILABLE`, resume).
    pub async fn run(mut self, start: Start) {
        let result = self.stream(start).await;
        let status = match result {
            Err(End::Gone) => return,
            Err(End::Expired(seq)) => status::token_expired(seq),
            Err(End::Store(e)) => {
                tracing::warn!(error = %e, user = %self.user, "stream ended: store read failed");
                status::stream_interrupted(&e)
            }
            Ok(()) => status::shutting_down(),
        };
        let _ = self.out.send(Err(Box::new(status))).await;
    }

    async fn stream(&mut self, start: Start) -> Result<(), End> {
        let mut last = match start {
            Start::Fresh(head) => {
                self.send_unread(head).await?;
                head
            }
            Start::After(seq) => {
                let mut last = seq;
                self.catch_up(&mut last).await?;
                last
            }
            Start::Resync(head) => {
                self.emit(control(head, Kind::Resync(proto::Resync {})))
                    .await?;
                head
            }
        };
        self.emit(control(last, Kind::CaughtUp(proto::CaughtUp {})))
            .await?;
        let mut idle_until = Instant::now() + self.settings.heartbeat_interval;
        let expires = Instant::now()
            + self
                .token_expires_at
                .duration_since(SystemTime::now())
                .unwrap_or_default();
        loop {
            tokio::select! {
                () = self.shutdown.cancelled() => return Ok(()),
                () = sleep_until(expires) => return Err(End::Expired(last)),
                () = self.out.closed() => return Err(End::Gone),
                () = sleep_until(idle_until) => {
                    let beat = proto::Heartbeat {
                        server_time: Some(std::time::SystemTime::now().into()),
                    };
                    self.emit(control(last, Kind::Heartbeat(beat))).await?;
                }
                next = self.subscription.next() => match next {
                    Next::Event(event) if event.seq <= last => continue,
                    Next::Event(event) if event.seq == last + 1 => {
                        self.deliver(&event).await?;
                        last = event.seq;
                        if let EventBody::Notification(n) = &event.body
                            && let Ok(age) = n.created_at.elapsed()
                        {
                            metrics::histogram!(names::COMMIT_TO_PUSH).record(age.as_secs_f64());
                        }
                    }
                    Next::Event(_) | Next::CatchUp => self.catch_up(&mut last).await?,
                },
            }
            idle_until = Instant::now() + self.settings.heartbeat_interval;
        }
    }

    /// Sends the unread notifications with seq <= `head`, oldest first.
    async fn send_unread(&mut self, head: u64) -> Result<(), End> {
        let mut after = 0;
        loop {
            // Boxed: store futures are large, and inline they would sit in
            // every idle stream's state.
            let page = Box::pin(self.store.unread_after(
                &self.tenant,
                &self.user,
                after,
                head,
                BACKLOG_PAGE,
            ))
            .await
            .map_err(End::Store)?;
            for n in &page {
                after = n.seq;
                if self.wants(&n.kind) {
                    let event = proto::Event {
                        seq: n.seq,
                        kind: Some(Kind::Notification(n.into())),
                    };
                    self.emit(event).await?;
                    metrics::counter!(names::EVENTS_PUSHED).increment(1);
                }
            }
            if page.len() < BACKLOG_PAGE {
                return Ok(());
            }
        }
    }

    /// Delivers every stored event after `*last`, advancing it.
    async fn catch_up(&mut self, last: &mut u64) -> Result<(), End> {
        loop {
            let page =
                Box::pin(
                    self.store
                        .events_after(&self.tenant, &self.user, *last, BACKLOG_PAGE),
                )
                .await
                .map_err(End::Store)?;
            for event in &page {
                self.deliver(event).await?;
                *last = event.seq;
            }
            if page.len() < BACKLOG_PAGE {
                // Anything queued meanwhile at or below `last` is skipped by
                // the caller; anything above it is next.
                return Ok(());
            }
        }
    }

    async fn deliver(&mut self, event: &StreamEvent) -> Result<(), End> {
        if let EventBody::Notification(n) = &event.body
            && !self.wants(&n.kind)
        {
            return Ok(());
        }
        self.send(WireEvent(event.encoded())).await?;
        metrics::counter!(names::EVENTS_PUSHED).increment(1);
        Ok(())
    }

    fn wants(&self, kind: &str) -> bool {
        self.types.is_empty() || self.types.contains(kind)
    }

    /// Sends an event encoded for this stream alone (control events and
    /// the unread backlog).
    async fn emit(&mut self, event: proto::Event) -> Result<(), End> {
        self.send(WireEvent::encode(&event)).await
    }

    async fn send(&mut self, event: WireEvent) -> Result<(), End> {
        self.out
            .send(Ok(Box::new(event)))
            .await
            .map_err(|_| End::Gone)
    }
}
