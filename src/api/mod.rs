//! The gRPC service `herald.v1.Notifications`: authenticate, parse the
//! request into domain values, call the store or start a stream, convert
//! back. No SQL and no delivery logic here; errors become statuses in
//! [`status`].

pub mod convert;
pub mod status;

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Request, Response, Status};

use crate::{
    auth::{AuthError, Identity, Verifier},
    clock::Clock,
    hub::Hub,
    limits::RateLimits,
    notification::{
        InvalidArgument, NewNotification, NotificationFilter, PageQuery, SendLimits, StateOutcome,
        StateRequest, StreamKey,
    },
    proto::{self, notifications_server::Notifications},
    store::Store,
    subscription::{EventStream, Session, Start, StreamSettings, token_deadline},
    telemetry::names,
    ticket::{self, TicketGrant},
};

/// Events buffered between a stream's task and tonic's HTTP/2 writer. Small:
/// the hub's per-stream queue is the real buffer.
const OUT_BUFFER: usize = 16;

/// The service implementation, generic over the store.
pub struct NotificationsService<S> {
    store: Arc<S>,
    hub: Arc<Hub>,
    verifier: Arc<Verifier>,
    limits: SendLimits,
    rates: Arc<RateLimits>,
    streams: StreamSettings,
    shutdown: CancellationToken,
    ticket_lifetime: Duration,
    clock: Clock,
}

/// Most named filters in one `GetUnreadCount`.
pub const MAX_COUNT_FILTERS: usize = 20;

/// Default lifetime of an unused stream ticket.
pub const DEFAULT_TICKET_LIFETIME: Duration = Duration::from_secs(30);

impl<S: Store> NotificationsService<S> {
    /// Builds the service. `shutdown` ends every open stream when cancelled.
    pub fn new(
        store: Arc<S>,
        hub: Arc<Hub>,
        verifier: Arc<Verifier>,
        limits: SendLimits,
        rates: Arc<RateLimits>,
        streams: StreamSettings,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            store,
            hub,
            verifier,
            limits,
            rates,
            streams,
            shutdown,
            ticket_lifetime: DEFAULT_TICKET_LIFETIME,
            clock: Clock::system(),
        }
    }

    /// Sends' `deliver_at` and `expires_at` are checked against `clock`.
    #[must_use]
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Stream tickets minted by `CreateStreamTicket` expire unused after
    /// `lifetime` (or with their token, if sooner).
    #[must_use]
    pub fn with_ticket_lifetime(mut self, lifetime: Duration) -> Self {
        self.ticket_lifetime = lifetime;
        self
    }

    fn identify<T>(&self, request: &Request<T>) -> Result<Identity, AuthError> {
        self.verifier.verify(request.metadata())
    }
}

/// `SubscribeRequest`'s filter fields (`types`, `categories`,
/// `min_severity`); `INVALID_ARGUMENT` naming the field otherwise.
pub fn parse_filter(req: &proto::SubscribeRequest) -> Result<NotificationFilter, InvalidArgument> {
    NotificationFilter::parse("", &req.types, &req.categories, req.min_severity)
}

/// The canonical name of a gRPC status code (gRPC status-code guide).
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Counts a finished call by method and status code.
fn observe<T>(method: &'static str, result: Result<T, Status>) -> Result<T, Status> {
    let code = result.as_ref().map_or_else(|s| s.code(), |_| Code::Ok);
    metrics::counter!(names::GRPC_REQUESTS, "method" => method, "code" => code_name(code))
        .increment(1);
    result
}

#[tonic::async_trait]
impl<S: Store> Notifications for NotificationsService<S> {
    async fn send_notification(
        &self,
        request: Request<proto::SendNotificationRequest>,
    ) -> Result<Response<proto::SendNotificationResponse>, Status> {
        let started = std::time::Instant::now();
        let result = observe("SendNotification", self.send(request).await);
        metrics::histogram!(names::SEND_DURATION).record(started.elapsed().as_secs_f64());
        result
    }

    async fn send_notifications(
        &self,
        request: Request<proto::SendNotificationsRequest>,
    ) -> Result<Response<proto::SendNotificationsResponse>, Status> {
        observe("SendNotifications", self.send_many(request).await)
    }

    type SubscribeStream = EventStream;

    async fn subscribe(
        &self,
        request: Request<proto::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        observe("Subscribe", self.open_stream(request).await)
    }

    async fn cancel_scheduled_notification(
        &self,
        request: Request<proto::CancelScheduledNotificationRequest>,
    ) -> Result<Response<proto::CancelScheduledNotificationResponse>, Status> {
        observe(
            "CancelScheduledNotification",
            self.cancel_scheduled(request).await,
        )
    }

    async fn mark_read(
        &self,
        request: Request<proto::MarkReadRequest>,
    ) -> Result<Response<proto::MarkReadResponse>, Status> {
        let outcome = self
            .change_state(request, StateRequest::parse_mark_read)
            .await
            .map(|o| {
                Response::new(proto::MarkReadResponse {
                    marked: o.changed,
                    seq: o.seq,
                })
            });
        observe("MarkRead", outcome)
    }

    async fn update_state(
        &self,
        request: Request<proto::UpdateStateRequest>,
    ) -> Result<Response<proto::UpdateStateResponse>, Status> {
        let outcome = self
            .change_state(request, StateRequest::parse)
            .await
            .map(|o| {
                Response::new(proto::UpdateStateResponse {
                    changed: o.changed,
                    seq: o.seq,
                })
            });
        observe("UpdateState", outcome)
    }

    async fn list_notifications(
        &self,
        request: Request<proto::ListNotificationsRequest>,
    ) -> Result<Response<proto::ListNotificationsResponse>, Status> {
        observe("ListNotifications", self.list(request).await)
    }

    async fn get_unread_count(
        &self,
        request: Request<proto::GetUnreadCountRequest>,
    ) -> Result<Response<proto::GetUnreadCountResponse>, Status> {
        observe("GetUnreadCount", self.count(request).await)
    }

    async fn create_stream_ticket(
        &self,
        request: Request<proto::CreateStreamTicketRequest>,
    ) -> Result<Response<proto::CreateStreamTicketResponse>, Status> {
        observe("CreateStreamTicket", self.ticket(request).await)
    }
}

impl<S: Store> NotificationsService<S> {
    async fn send(
        &self,
        request: Request<proto::SendNotificationRequest>,
    ) -> Result<Response<proto::SendNotificationResponse>, Status> {
        let identity = self.identify(&request)?;
        identity.require_send()?;
        let mut new = NewNotification::parse(request.into_inner(), &self.limits)?;
        new.check_times(self.clock.now())?;
        new.presentation.default_actor(&identity.user);
        self.rates.check_send(
            identity.tenant.as_str(),
            identity.user.as_str(),
            &new.recipients,
        )?;
        let sent = self
            .store
            .send(identity.tenant.as_str(), identity.user.as_str(), &new)
            .await?;
        let deliveries = sent.deliveries;
        if !sent.replayed {
            metrics::counter!(names::NOTIFICATIONS_STORED).increment(deliveries.len() as u64);
        }
        tracing::debug!(
            sender = %identity.user,
            r#type = new.kind.as_str(),
            recipients = deliveries.len(),
            replayed = sent.replayed,
            "notification stored"
        );
        Ok(Response::new(proto::SendNotificationResponse {
            deliveries: deliveries.into_iter().map(Into::into).collect(),
            scheduled: sent.scheduled,
        }))
    }

    /// `SendNotifications`: every valid item within the rate limits goes to
    /// the store at once (concurrently, so group commit batches them), each
    /// answered with its own outcome.
    async fn send_many(
        &self,
        request: Request<proto::SendNotificationsRequest>,
    ) -> Result<Response<proto::SendNotificationsResponse>, Status> {
        let identity = self.identify(&request)?;
        identity.require_send()?;
        let items = request.into_inner().notifications;
        if items.is_empty() || items.len() > self.limits.max_bulk_items {
            return Err(InvalidArgument::new(
                "notifications",
                format!(
                    "must hold 1 to {} items, not {}",
                    self.limits.max_bulk_items,
                    items.len()
                ),
            )
            .into());
        }
        let (tenant, sender) = (identity.tenant.as_str(), identity.user.as_str());
        // Parse and rate-check each item; those that pass are stored
        // concurrently.
        let checked: Vec<Result<NewNotification, Status>> = items
            .into_iter()
            .enumerate()
            .map(|(i, item)| {
                let in_item = |e: InvalidArgument| {
                    Status::from(InvalidArgument::new(
                        format!("notifications[{i}].{}", e.field),
                        e.reason,
                    ))
                };
                let mut new = NewNotification::parse(item, &self.limits).map_err(in_item)?;
                new.check_times(self.clock.now()).map_err(in_item)?;
                new.presentation.default_actor(&identity.user);
                self.rates.check_send(tenant, sender, &new.recipients)?;
                Ok(new)
            })
            .collect();
        let outcomes = futures_util::future::join_all(checked.iter().map(|c| async move {
            match c {
                Ok(new) => self
                    .store
                    .send(tenant, sender, new)
                    .await
                    .map_err(Status::from),
                Err(status) => Err(status.clone()),
            }
        }))
        .await;
        let mut stored = 0;
        let results = outcomes
            .into_iter()
            .enumerate()
            .map(|(i, outcome)| {
                let index = u32::try_from(i).unwrap_or(u32::MAX);
                match outcome {
                    Ok(sent) => {
                        if !sent.replayed {
                            stored += sent.deliveries.len();
                        }
                        proto::SendNotificationsResult {
                            index,
                            code: Code::Ok as i32,
                            message: String::new(),
                            deliveries: sent.deliveries.into_iter().map(Into::into).collect(),
                            scheduled: sent.scheduled,
                        }
                    }
                    Err(status) => proto::SendNotificationsResult {
                        index,
                        code: status.code() as i32,
                        message: status.message().to_owned(),
                        deliveries: Vec::new(),
                        scheduled: false,
                    },
                }
            })
            .collect::<Vec<_>>();
        metrics::counter!(names::NOTIFICATIONS_STORED).increment(stored as u64);
        tracing::debug!(
            sender = %identity.user,
            items = results.len(),
            failed = results.iter().filter(|r| r.code != 0).count(),
            "bulk send done"
        );
        Ok(Response::new(proto::SendNotificationsResponse { results }))
    }

    async fn open_stream(
        &self,
        request: Request<proto::SubscribeRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let grant = TicketGrant::from(&self.identify(&request)?);
        self.open_stream_for(&grant, request.into_inner())
            .await
            .map(Response::new)
    }

    /// Opens `grant.user`'s stream as `Subscribe` does (backlog, `caught_up`,
    /// live; ends at `grant.token_expires_at`), for a caller already
    /// authenticated: `Subscribe` by its token, the SSE door by a ticket.
    /// Errors: `INVALID_ARGUMENT` (`types`), `RESOURCE_EXHAUSTED` (stream
    /// limits), `UNAVAILABLE` (stopping, or the store).
    pub async fn open_stream_for(
        &self,
        grant: &TicketGrant,
        req: proto::SubscribeRequest,
    ) -> Result<EventStream, Status> {
        if self.shutdown.is_cancelled() {
            return Err(status::shutting_down());
        }
        let filter = parse_filter(&req)?;
        let tenant = grant.tenant.as_str();
        let user = grant.user.as_str();
        // Register first, then read the head: whatever commits after the
        // head was read is already being queued for this stream.
        let subscription = self.hub.subscribe(StreamKey::user(tenant, user))?;
        let head = self.store.head(tenant, user).await?;
        let start = Start::new(req.after_seq, req.epoch, head);
        let (out, rx) = mpsc::channel(OUT_BUFFER);
        let session = Session {
            store: self.store.clone(),
            subscription,
            tenant: tenant.to_owned(),
            user: user.to_owned(),
            filter,
            settings: self.streams.clone(),
            shutdown: self.shutdown.clone(),
            token_deadline: token_deadline(grant.token_expires_at),
            out,
        };
        tokio::spawn(session.run(start));
        Ok(EventStream::new(rx))
    }

    async fn ticket(
        &self,
        request: Request<proto::CreateStreamTicketRequest>,
    ) -> Result<Response<proto::CreateStreamTicketResponse>, Status> {
        let grant = TicketGrant::from(&self.identify(&request)?);
        let (ticket, expires_at) = self.mint_ticket(&grant, self.ticket_lifetime).await?;
        Ok(Response::new(proto::CreateStreamTicketResponse {
            ticket,
            expires_at: Some(expires_at.into()),
        }))
    }

    /// Mints and stores a stream ticket for `grant`, valid for `lifetime`
    /// or until the grant's token expires, whichever is sooner. Returns the
    /// ticket and its expiry. Errors: `RESOURCE_EXHAUSTED` (the user's
    /// ticket rate, with `RetryInfo`), `UNAVAILABLE` (store), `INTERNAL` (no
    /// randomness).
    pub async fn mint_ticket(
        &self,
        grant: &TicketGrant,
        lifetime: Duration,
    ) -> Result<(String, SystemTime), Status> {
        self.rates.check_ticket(&grant.tenant, &grant.user)?;
        let minted = ticket::mint().map_err(|e| status::internal(&e))?;
        let expires_at = SystemTime::now()
            .checked_add(lifetime)
            .map_or(grant.token_expires_at, |at| at.min(grant.token_expires_at));
        self.store
            .put_ticket(minted.digest, grant, expires_at)
            .await?;
        Ok((minted.ticket, expires_at))
    }

    /// Redeems a stream ticket: whom it was minted for, once. Errors:
    /// `UNAUTHENTICATED` for a ticket that is malformed, unknown, already
    /// used or expired (all alike, so nothing is learned by guessing);
    /// `UNAVAILABLE` (store).
    pub async fn redeem_ticket(&self, ticket: &str) -> Result<TicketGrant, Status> {
        let refused = || Status::unauthenticated("ticket: unknown, already used or expired");
        let digest = ticket::parse(ticket).ok_or_else(refused)?;
        self.store
            .take_ticket(digest, SystemTime::now())
            .await?
            .filter(|g| g.token_expires_at > SystemTime::now())
            .ok_or_else(refused)
    }

    /// The token identity of a request's headers (`authorization: Bearer`).
    pub fn identify_headers(&self, headers: &http::HeaderMap) -> Result<Identity, Status> {
        Ok(self.verifier.verify_headers(headers)?)
    }

    /// `CancelScheduledNotification`: the caller's scheduled send with the
    /// key, if still waiting.
    async fn cancel_scheduled(
        &self,
        request: Request<proto::CancelScheduledNotificationRequest>,
    ) -> Result<Response<proto::CancelScheduledNotificationResponse>, Status> {
        let identity = self.identify(&request)?;
        identity.require_send()?;
        let key = request.into_inner().idempotency_key;
        let key = NewNotification::parse_idempotency_key(&key)?;
        let cancelled = self
            .store
            .cancel_scheduled(identity.tenant.as_str(), identity.user.as_str(), &key)
            .await?;
        Ok(Response::new(proto::CancelScheduledNotificationResponse {
            cancelled,
        }))
    }

    /// `MarkRead` and `UpdateState`: the token user's state change, parsed
    /// from the request by `parse`.
    async fn change_state<R>(
        &self,
        request: Request<R>,
        parse: impl FnOnce(R) -> Result<StateRequest, InvalidArgument>,
    ) -> Result<StateOutcome, Status> {
        let identity = self.identify(&request)?;
        let change = parse(request.into_inner())?;
        Ok(self
            .store
            .update_state(identity.tenant.as_str(), identity.user.as_str(), &change)
            .await?)
    }

    async fn list(
        &self,
        request: Request<proto::ListNotificationsRequest>,
    ) -> Result<Response<proto::ListNotificationsResponse>, Status> {
        let identity = self.identify(&request)?;
        let query = PageQuery::parse(request.get_ref())?;
        let limit = query.limit;
        let page = self
            .store
            .list(identity.tenant.as_str(), identity.user.as_str(), query)
            .await?;
        let next_page_token = match page.last() {
            Some(n) if page.len() == limit => n.seq.to_string(),
            _ => String::new(),
        };
        Ok(Response::new(proto::ListNotificationsResponse {
            notifications: page.iter().map(Into::into).collect(),
            next_page_token,
        }))
    }

    async fn count(
        &self,
        request: Request<proto::GetUnreadCountRequest>,
    ) -> Result<Response<proto::GetUnreadCountResponse>, Status> {
        let identity = self.identify(&request)?;
        let req = request.into_inner();
        if req.filters.len() > MAX_COUNT_FILTERS {
            return Err(InvalidArgument::new(
                "filters",
                format!(
                    "names {} filters, more than {MAX_COUNT_FILTERS}",
                    req.filters.len()
                ),
            )
            .into());
        }
        let mut names = std::collections::HashSet::with_capacity(req.filters.len());
        let mut filters = Vec::with_capacity(req.filters.len());
        for (i, f) in req.filters.iter().enumerate() {
            if f.name.is_empty() || f.name.len() > 64 || f.name.chars().any(char::is_control) {
                return Err(InvalidArgument::new(
                    format!("filters[{i}].name"),
                    "must be 1 to 64 bytes without control characters",
                )
                .into());
            }
            if !names.insert(f.name.as_str()) {
                return Err(InvalidArgument::new(
                    format!("filters[{i}].name"),
                    format!("{:?} is named twice", f.name),
                )
                .into());
            }
            filters.push(NotificationFilter::parse(
                &format!("filters[{i}]."),
                &f.types,
                &f.categories,
                f.min_severity,
            )?);
        }
        let counts = self
            .store
            .unread_count(identity.tenant.as_str(), identity.user.as_str(), &filters)
            .await?;
        Ok(Response::new(proto::GetUnreadCountResponse {
            unread: counts.unread,
            unseen: counts.unseen,
            seq: counts.seq,
            counts: req
                .filters
                .into_iter()
                .zip(counts.filtered)
                .map(|(f, unread)| proto::UnreadCount {
                    name: f.name,
                    unread,
                })
                .collect(),
        }))
    }
}
