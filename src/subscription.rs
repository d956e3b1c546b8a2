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
    future::Future,
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
    notification::{Epoch, EventBody, NotificationFilter, StreamEvent, StreamHead},
    proto::{self, event::Kind, resync::Reason as ResyncReason},
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
    /// No resume position: replay unread notifications up to this head.
    Fresh(StreamHead),
    /// Replay every event after this seq of `head.epoch`.
    After(u64, StreamHead),
    /// The resume position cannot be continued: send `resync`, go live
    /// from this head.
    Resync(StreamHead, ResyncReason),
}

impl Start {
    /// Decides where a stream starts, from the client's resume position
    /// (`after_seq` of `epoch`, 0 meaning "the current one") and the stream
    /// head read *after* the stream was registered in the hub. Any position
    /// that cannot be continued gets `resync`, never an error the client
    /// cannot get past, and never a silent jump into another history.
    pub fn new(after_seq: Option<u64>, epoch: Epoch, head: StreamHead) -> Self {
        match after_seq {
            None => Self::Fresh(head),
            Some(_) if epoch != 0 && epoch != head.epoch => {
                Self::Resync(head, ResyncReason::EpochChanged)
            }
            Some(s) if s > head.last_seq => Self::Resync(head, ResyncReason::BeyondHead),
            Some(s) if s < head.pruned_seq => Self::Resync(head, ResyncReason::Pruned),
            Some(s) => Self::After(s, head),
        }
    }
}

/// Settings shared by all streams.
#[derive(Debug, Clone)]
pub struct StreamSettings {
    /// Idle time after which a heartbeat is sent.
    pub heartbeat_interval: Duration,
    /// Permits for the store reads of backlogs and catch-ups, shared by
    /// every stream of the replica. When the bus reconnects, every local
    /// stream catches up at once; with 100k streams and a pool of 16
    /// connections, unbounded reads would queue on the pool past its wait
    /// timeout and end streams with UNAVAILABLE. Waiting for a permit has
    /// no timeout, so catch-ups are spread over time instead.
    pub store_reads: Arc<tokio::sync::Semaphore>,
}

impl StreamSettings {
    /// Settings with `heartbeat_interval`, allowing `store_reads` backlog
    /// and catch-up reads at once (at least 1).
    pub fn new(heartbeat_interval: Duration, store_reads: usize) -> Self {
        Self {
            heartbeat_interval,
            store_reads: Arc::new(tokio::sync::Semaphore::new(store_reads.max(1))),
        }
    }
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
    /// Which notifications to send (read and control events always go).
    pub filter: NotificationFilter,
    /// Shared settings.
    pub settings: StreamSettings,
    /// Cancelled when the server stops.
    pub shutdown: CancellationToken,
    /// When the stream's token expires (see [`token_deadline`]): the
    /// stream then ends with UNAUTHENTICATED, and the client resumes with a
    /// fresh token.
    pub token_deadline: Instant,
    /// Where events go (to tonic, then the client).
    pub out: mpsc::Sender<Outgoing>,
}

/// Why a stream ended.
enum End {
    /// The client went away.
    Gone,
    /// The server is stopping.
    Shutdown,
    /// The token expired.
    Expired,
    /// A store read failed; the client should resume.
    Store(StoreError),
}

/// The stream's position: the last seq delivered (or filtered out) and the
/// epoch it counts in.
#[derive(Debug, Clone, Copy)]
struct Position {
    seq: u64,
    epoch: Epoch,
}

/// Longest a token's remaining life is taken to be, so that adding it to
/// the clock cannot overflow (a token may say it expires in 2^64 s).
const MAX_TOKEN_LIFE: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

impl<S: Store> Session<S> {
    /// Runs the stream until the client leaves, the server stops (the
    /// client gets `UNAVAILABLE` and resumes elsewhere), the token expires
    /// (`UNAUTHENTICATED`, resume with a fresh token) or a store read fails
    /// (`UNAVAILABLE`, resume).
    ///
    /// A client that stops reading does not hold the session: every send
    /// also watches shutdown and token expiry, and the final status is
    /// written through a slot reserved up front, so the session ends (and
    /// leaves the hub and the stream limits) even when the output is full.
    pub async fn run(mut self, start: Start) {
        // One slot of the output channel is kept for the final status.
        let Ok(last_word) = self.out.clone().reserve_owned().await else {
            return; // the client is already gone
        };
        let mut position = Position { seq: 0, epoch: 0 };
        let result = self.stream(start, &mut position).await;
        let status = match result {
            End::Gone => return,
            End::Expired => status::token_expired(position.seq, position.epoch),
            End::Store(e) => {
                tracing::warn!(error = %e, user = %self.user, "stream ended: store read failed");
                status::stream_interrupted(&e)
            }
            End::Shutdown => status::shutting_down(),
        };
        last_word.send(Err(Box::new(status)));
    }

    async fn stream(&mut self, start: Start, at: &mut Position) -> End {
        match self.serve(start, at).await {
            Ok(never) => match never {},
            Err(end) => end,
        }
    }

    async fn serve(
        &mut self,
        start: Start,
        at: &mut Position,
    ) -> Result<std::convert::Infallible, End> {
        match start {
            Start::Fresh(head) => {
                *at = Position {
                    seq: head.last_seq,
                    epoch: head.epoch,
                };
                self.send_unread(head.last_seq, head.epoch).await?;
            }
            Start::After(seq, head) => {
                *at = Position {
                    seq,
                    epoch: head.epoch,
                };
                self.catch_up(at).await?;
            }
            Start::Resync(head, reason) => self.resync(head, reason, at).await?,
        }
        let caught_up = proto::CaughtUp {
            heartbeat_interval: prost_types::Duration::try_from(self.settings.heartbeat_interval)
                .ok(),
        };
        self.emit(control(at.seq, at.epoch, Kind::CaughtUp(caught_up)))
            .await?;
        let mut idle_until = Instant::now() + self.settings.heartbeat_interval;
        loop {
            tokio::select! {
                () = self.shutdown.cancelled() => return Err(End::Shutdown),
                () = sleep_until(self.token_deadline) => return Err(End::Expired),
                () = self.out.closed() => return Err(End::Gone),
                () = sleep_until(idle_until) => {
                    let beat = proto::Heartbeat {
                        server_time: Some(std::time::SystemTime::now().into()),
                    };
                    self.emit(control(at.seq, at.epoch, Kind::Heartbeat(beat))).await?;
                }
                next = self.subscription.next() => match next {
                    Next::Event(event) if event.epoch == at.epoch && event.seq <= at.seq => continue,
                    Next::Event(event) if event.epoch == at.epoch && event.seq == at.seq + 1 => {
                        self.deliver(&event).await?;
                        at.seq = event.seq;
                        if let EventBody::Notification(n) = &event.body
                            && let Ok(age) = n.content.created_at.elapsed()
                        {
                            metrics::histogram!(names::COMMIT_TO_PUSH).record(age.as_secs_f64());
                        }
                    }
                    // Ahead (a gap), of another epoch, or a signal: the
                    // store says what comes next, in which epoch.
                    Next::Event(_) | Next::CatchUp => self.catch_up(at).await?,
                },
            }
            idle_until = Instant::now() + self.settings.heartbeat_interval;
        }
    }

    /// Tells the client its position cannot be continued and moves the
    /// stream to `head`: `resync` at the head's seq and epoch; live events
    /// after it follow.
    async fn resync(
        &mut self,
        head: StreamHead,
        reason: ResyncReason,
        at: &mut Position,
    ) -> Result<(), End> {
        metrics::counter!(names::STREAM_RESYNCS, "reason" => reason.as_str_name()).increment(1);
        *at = Position {
            seq: head.last_seq,
            epoch: head.epoch,
        };
        let resync = proto::Resync {
            reason: reason.into(),
        };
        self.emit(control(at.seq, at.epoch, Kind::Resync(resync)))
            .await
    }

    /// Sends the unread notifications with seq <= `head`, oldest first.
    async fn send_unread(&mut self, head: u64, epoch: Epoch) -> Result<(), End> {
        let mut after = 0;
        loop {
            if self.shutdown.is_cancelled() {
                return Err(End::Shutdown);
            }
            // Boxed: store futures are large, and inline they would sit in
            // every idle stream's state.
            let page = Box::pin(self.read(self.store.unread_after(
                &self.tenant,
                &self.user,
                after,
                head,
                BACKLOG_PAGE,
            )))
            .await
            .map_err(End::Store)?;
            for n in &page {
                after = n.seq;
                if self.wants(&n.content) {
                    let event = proto::Event {
                        seq: n.seq,
                        kind: Some(Kind::Notification(n.into())),
                        epoch,
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

    /// Delivers every stored event after `at`, advancing it. Checks what
    /// the store returns itself: an event of another epoch, or one that is
    /// not `at.seq + 1` (retention pruned the next events while the stream
    /// was behind), moves the stream to the head with `resync` instead of
    /// delivering across a gap.
    async fn catch_up(&mut self, at: &mut Position) -> Result<(), End> {
        loop {
            if self.shutdown.is_cancelled() {
                return Err(End::Shutdown);
            }
            let page = Box::pin(self.read(self.store.events_after(
                &self.tenant,
                &self.user,
                at.seq,
                BACKLOG_PAGE,
            )))
            .await
            .map_err(End::Store)?;
            if page.epoch != at.epoch {
                return self.resync_to_head(ResyncReason::EpochChanged, at).await;
            }
            let page = page.events;
            for event in &page {
                if event.seq != at.seq + 1 {
                    return self.resync_to_head(ResyncReason::Pruned, at).await;
                }
                self.deliver(event).await?;
                at.seq = event.seq;
            }
            if page.len() < BACKLOG_PAGE {
                // Anything queued meanwhile at or below `at` is skipped by
                // the caller; anything above it is next.
                return Ok(());
            }
        }
    }

    /// Runs a backlog or catch-up read under one of the replica's
    /// [`StreamSettings::store_reads`] permits.
    async fn read<T>(
        &self,
        read: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let _permit = self.settings.store_reads.acquire().await;
        read.await
    }

    async fn resync_to_head(&mut self, reason: ResyncReason, at: &mut Position) -> Result<(), End> {
        let head = Box::pin(self.store.head(&self.tenant, &self.user))
            .await
            .map_err(End::Store)?;
        self.resync(head, reason, at).await
    }

    async fn deliver(&mut self, event: &StreamEvent) -> Result<(), End> {
        // A filtered stream gets the notifications its filter matches and
        // their updates (as the update's content matches); state changes
        // always.
        if let EventBody::Notification(n) | EventBody::Updated(n) = &event.body
            && !self.wants(&n.content)
        {
            return Ok(());
        }
        self.send(WireEvent(event.encoded())).await?;
        metrics::counter!(names::EVENTS_PUSHED).increment(1);
        Ok(())
    }

    fn wants(&self, content: &crate::notification::Content) -> bool {
        self.filter.matches(content)
    }

    /// Sends an event encoded for this stream alone (control events and
    /// the unread backlog).
    async fn emit(&mut self, event: proto::Event) -> Result<(), End> {
        self.send(WireEvent::encode(&event)).await
    }

    /// Queues `event` for the client. Waiting for room also watches
    /// shutdown and token expiry, so a client that stopped reading cannot
    /// keep the session (and its place in the hub) alive.
    async fn send(&mut self, event: WireEvent) -> Result<(), End> {
        tokio::select! {
            sent = self.out.send(Ok(Box::new(event))) => sent.map_err(|_| End::Gone),
            () = self.shutdown.cancelled() => Err(End::Shutdown),
            () = sleep_until(self.token_deadline) => Err(End::Expired),
        }
    }
}

/// When a stream opened with a token expiring at `expires_at` must end:
/// the token's remaining life from now, at most 100 years, so that
/// a token claiming to live 2^64 seconds cannot overflow the clock.
pub fn token_deadline(expires_at: SystemTime) -> Instant {
    let remaining = expires_at
        .duration_since(SystemTime::now())
        .unwrap_or_default()
        .min(MAX_TOKEN_LIFE);
    Instant::now() + remaining
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use prost::Message;

    use super::*;
    use crate::{
        hub::{Hub, StreamLimits},
        notification::{NewNotification, SendLimits, StreamKey},
        store::memory::MemoryStore,
    };

    struct Fixture {
        hub: Arc<Hub>,
        store: Arc<MemoryStore>,
        shutdown: CancellationToken,
    }

    impl Fixture {
        fn new() -> Self {
            let hub = Hub::new(StreamLimits::default());
            let store = Arc::new(MemoryStore::new(hub.clone()));
            Self {
                hub,
                store,
                shutdown: CancellationToken::new(),
            }
        }

        async fn send(&self, n: usize) {
            for i in 0..n {
                let req = proto::SendNotificationRequest {
                    recipients: vec!["alice".into()],
                    r#type: "t".into(),
                    title: format!("n{i}"),
                    ..Default::default()
                };
                let new = NewNotification::parse(req, &SendLimits::default()).unwrap();
                self.store.send("", "svc", &new).await.unwrap();
            }
        }

        /// A session for alice whose client holds `rx` (capacity `out`).
        fn session(
            &self,
            out: usize,
            deadline: Instant,
        ) -> (Session<MemoryStore>, mpsc::Receiver<Outgoing>) {
            let (tx, rx) = mpsc::channel(out);
            let session = Session {
                store: self.store.clone(),
                subscription: self.hub.subscribe(StreamKey::user("", "alice")).unwrap(),
                tenant: String::new(),
                user: "alice".into(),
                filter: NotificationFilter::default(),
                settings: StreamSettings::new(Duration::from_secs(3600), 4),
                shutdown: self.shutdown.clone(),
                token_deadline: deadline,
                out: tx,
            };
            (session, rx)
        }
    }

    fn decode(item: Outgoing) -> Result<proto::Event, Status> {
        item.map(|e| proto::Event::decode(e.0.as_ref()).unwrap())
            .map_err(|s| *s)
    }

    fn far() -> Instant {
        Instant::now() + Duration::from_secs(3600)
    }

    #[tokio::test]
    async fn a_client_that_stops_reading_does_not_hold_the_session_past_shutdown() {
        let f = Fixture::new();
        f.send(50).await;
        let (session, mut rx) = f.session(4, far());
        let head = f.store.head("", "alice").await.unwrap();
        let task = tokio::spawn(session.run(Start::After(0, head)));
        // The client reads nothing: the session blocks on a full output.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!task.is_finished());
        f.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the session ends at shutdown although its client reads nothing")
            .unwrap();
        assert_eq!(f.hub.stream_count(), 0, "it left the hub");
        let mut last = None;
        while let Ok(item) = rx.try_recv() {
            last = Some(decode(item));
        }
        let status = last.unwrap().unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    }

    #[tokio::test]
    async fn a_client_that_stops_reading_does_not_hold_the_session_past_token_expiry() {
        let f = Fixture::new();
        f.send(50).await;
        let deadline = Instant::now() + Duration::from_millis(200);
        let (session, mut rx) = f.session(4, deadline);
        let head = f.store.head("", "alice").await.unwrap();
        let task = tokio::spawn(session.run(Start::After(0, head)));
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the session ends at token expiry although its client reads nothing")
            .unwrap();
        let mut last = None;
        while let Ok(item) = rx.try_recv() {
            last = Some(decode(item));
        }
        let status = last.unwrap().unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
        assert!(status.message().contains("epoch"), "{}", status.message());
    }

    /// Retention deletes the events after a resume position between the
    /// head read and the catch-up read: the stream must say `resync`, not
    /// jump the gap.
    #[tokio::test]
    async fn pruning_racing_a_resume_gets_resync_not_a_gap() {
        let f = Fixture::new();
        f.send(5).await;
        let before_prune = f.store.head("", "alice").await.unwrap();
        assert_eq!(before_prune.pruned_seq, 0);
        // Prune everything stored so far, then add two more.
        let cutoff = SystemTime::now() + Duration::from_secs(1);
        assert_eq!(f.store.prune(cutoff).await.unwrap(), 5);
        f.send(2).await;
        let (session, mut rx) = f.session(64, far());
        let task = tokio::spawn(session.run(Start::After(1, before_prune)));
        let first = decode(rx.recv().await.unwrap()).unwrap();
        match first.kind {
            Some(Kind::Resync(r)) => assert_eq!(r.reason(), ResyncReason::Pruned),
            other => panic!("expected resync, got {other:?}"),
        }
        assert_eq!(first.seq, 7, "resync moves the stream to the head");
        let caught_up = decode(rx.recv().await.unwrap()).unwrap();
        assert!(matches!(caught_up.kind, Some(Kind::CaughtUp(_))));
        assert_eq!(caught_up.seq, 7);
        f.shutdown.cancel();
        task.await.unwrap();
    }

    #[test]
    fn a_token_that_claims_to_live_forever_cannot_overflow_the_clock() {
        let forever = UNIX_EPOCH + Duration::from_secs(u64::MAX / 4);
        let deadline = token_deadline(forever);
        assert!(deadline > Instant::now() + Duration::from_secs(365 * 24 * 3600));
        assert!(token_deadline(UNIX_EPOCH) <= Instant::now());
    }
}
