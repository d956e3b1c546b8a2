//! Rate limits on sending: a token bucket per sender and per recipient
//! (GCRA, from the `governor` crate), so one misbehaving service cannot
//! flood the database, and one user cannot be flooded.
//!
//! A refused send is a [`RateLimitError`] saying when to retry, and stores
//! nothing; `api::status` makes it `RESOURCE_EXHAUSTED` with a
//! `google.rpc.RetryInfo` detail (gRPC status-code guide; Google API error
//! model, AIP-193).

use std::{num::NonZeroU32, time::Duration};

use governor::{
    DefaultKeyedRateLimiter, Quota, RateLimiter,
    clock::{Clock, DefaultClock},
};

use crate::notification::UserId;

/// Rate limit settings; a rate of 0 turns that limit off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateSettings {
    /// Sends per second per sender (token `sub`, per tenant).
    pub per_sender: u32,
    /// Sends a sender may make in a burst above its rate.
    pub sender_burst: u32,
    /// Notifications per second per recipient.
    pub per_recipient: u32,
    /// Notifications a recipient may get in a burst above its rate.
    pub recipient_burst: u32,
    /// Stream tickets per minute per user (`CreateStreamTicket`, and the
    /// resume ticket each SSE stream sets as a cookie): each is a stored
    /// row until it is used or expires.
    pub tickets_per_minute: u32,
    /// Tickets a user may mint in a burst above that rate.
    pub ticket_burst: u32,
}

impl Default for RateSettings {
    fn default() -> Self {
        Self {
            per_sender: 1_000,
            sender_burst: 2_000,
            per_recipient: 20,
            recipient_burst: 100,
            tickets_per_minute: 60,
            ticket_burst: 30,
        }
    }
}

type Key = (String, String);

/// A send refused by a rate limit: which bucket is empty, and how long
/// until it holds a token again.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RateLimitError {
    /// The sender is over its send rate.
    #[error("sender {sender} is over its send rate")]
    Sender {
        /// The sender (token `sub`).
        sender: String,
        /// When its bucket has a token again.
        retry_after: Duration,
    },
    /// A recipient is over its notification rate.
    #[error("recipients: {recipient} is over its notification rate")]
    Recipient {
        /// The first recipient found over its rate.
        recipient: UserId,
        /// When its bucket has a token again.
        retry_after: Duration,
    },
    /// The user is over its stream-ticket rate.
    #[error("user {user} is over its stream ticket rate")]
    Tickets {
        /// The user (token `sub`).
        user: String,
        /// When its bucket has a token again.
        retry_after: Duration,
    },
}

impl RateLimitError {
    /// How long the caller should wait before retrying.
    pub fn retry_after(&self) -> Duration {
        match self {
            Self::Sender { retry_after, .. }
            | Self::Recipient { retry_after, .. }
            | Self::Tickets { retry_after, .. } => *retry_after,
        }
    }
}

/// The limiters of one replica (limits are per replica).
pub struct RateLimits {
    senders: Option<DefaultKeyedRateLimiter<Key>>,
    recipients: Option<DefaultKeyedRateLimiter<Key>>,
    tickets: Option<DefaultKeyedRateLimiter<Key>>,
    clock: DefaultClock,
}

impl std::fmt::Debug for RateLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimits")
            .field("senders", &self.senders.is_some())
            .field("recipients", &self.recipients.is_some())
            .field("tickets", &self.tickets.is_some())
            .finish()
    }
}

fn limiter(rate: u32, burst: u32) -> Option<DefaultKeyedRateLimiter<Key>> {
    let rate = NonZeroU32::new(rate)?;
    let burst = NonZeroU32::new(burst).unwrap_or(rate);
    Some(RateLimiter::keyed(
        Quota::per_second(rate).allow_burst(burst),
    ))
}

fn per_minute_limiter(rate: u32, burst: u32) -> Option<DefaultKeyedRateLimiter<Key>> {
    let rate = NonZeroU32::new(rate)?;
    let burst = NonZeroU32::new(burst).unwrap_or(rate);
    Some(RateLimiter::keyed(
        Quota::per_minute(rate).allow_burst(burst),
    ))
}

impl RateLimits {
    /// Limiters for `settings`.
    pub fn new(settings: RateSettings) -> Self {
        Self {
            senders: limiter(settings.per_sender, settings.sender_burst),
            recipients: limiter(settings.per_recipient, settings.recipient_burst),
            tickets: per_minute_limiter(settings.tickets_per_minute, settings.ticket_burst),
            clock: DefaultClock::default(),
        }
    }

    /// Charges one send to `sender` and one notification to each of
    /// `recipients`. A [`RateLimitError`] when any bucket is empty; tokens
    /// already taken for this send are not returned (the limit errs on the
    /// strict side).
    pub fn check_send(
        &self,
        tenant: &str,
        sender: &str,
        recipients: &[UserId],
    ) -> Result<(), RateLimitError> {
        if let Some(senders) = &self.senders
            && let Err(not_until) = senders.check_key(&(tenant.to_owned(), sender.to_owned()))
        {
            return Err(RateLimitError::Sender {
                sender: sender.to_owned(),
                retry_after: not_until.wait_time_from(self.clock.now()),
            });
        }
        if let Some(limiter) = &self.recipients {
            for r in recipients {
                if let Err(not_until) = limiter.check_key(&(tenant.to_owned(), r.to_string())) {
                    return Err(RateLimitError::Recipient {
                        recipient: r.clone(),
                        retry_after: not_until.wait_time_from(self.clock.now()),
                    });
                }
            }
        }
        Ok(())
    }

    /// Charges one stream ticket to `user`; [`RateLimitError::Tickets`]
    /// when its bucket is empty.
    pub fn check_ticket(&self, tenant: &str, user: &str) -> Result<(), RateLimitError> {
        if let Some(tickets) = &self.tickets
            && let Err(not_until) = tickets.check_key(&(tenant.to_owned(), user.to_owned()))
        {
            return Err(RateLimitError::Tickets {
                user: user.to_owned(),
                retry_after: not_until.wait_time_from(self.clock.now()),
            });
        }
        Ok(())
    }

    /// Forgets keys whose buckets are full again, bounding memory.
    pub fn retain_recent(&self) {
        for l in [&self.senders, &self.recipients, &self.tickets]
            .into_iter()
            .flatten()
        {
            l.retain_recent();
            l.shrink_to_fit();
        }
    }
}

/// The background job that drops rate-limit buckets of senders and
/// recipients that went quiet, once a minute until `shutdown`, so their
/// memory stays bounded.
pub async fn forget_idle_keys(
    rates: std::sync::Arc<RateLimits>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(60)) => rates.retain_recent(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn users(names: &[&str]) -> Vec<UserId> {
        names
            .iter()
            .map(|n| UserId::parse("r", n).unwrap())
            .collect()
    }

    #[test]
    fn sender_and_recipient_buckets_refuse_with_when_to_retry() {
        let limits = RateLimits::new(RateSettings {
            per_sender: 1,
            sender_burst: 3,
            per_recipient: 1,
            recipient_burst: 2,
            tickets_per_minute: 1,
            ticket_burst: 2,
        });
        let alice = users(&["alice"]);
        limits.check_send("t", "svc-a", &alice).unwrap();
        limits.check_send("t", "svc-b", &alice).unwrap();
        let err = limits.check_send("t", "svc-c", &alice).unwrap_err();
        assert!(
            matches!(&err, RateLimitError::Recipient { recipient, .. } if *recipient == alice[0]),
            "{err:?}"
        );
        assert!(err.to_string().starts_with("recipients: alice"), "{err}");
        assert!(err.retry_after() > Duration::ZERO);
        // Another tenant's alice is another bucket.
        limits.check_send("u", "svc-c", &alice).unwrap();
        for i in 0..2 {
            limits
                .check_send("t", "svc-a", &users(&[&format!("x{i}")]))
                .unwrap();
        }
        let err = limits.check_send("t", "svc-a", &users(&["y"])).unwrap_err();
        assert!(
            matches!(&err, RateLimitError::Sender { sender, .. } if sender == "svc-a"),
            "{err:?}"
        );
        assert!(err.to_string().starts_with("sender svc-a"), "{err}");
        assert!(err.retry_after() > Duration::ZERO);
        // Stream tickets: per user, per minute.
        limits.check_ticket("t", "alice").unwrap();
        limits.check_ticket("t", "alice").unwrap();
        let err = limits.check_ticket("t", "alice").unwrap_err();
        assert!(matches!(&err, RateLimitError::Tickets { user, .. } if user == "alice"));
        assert!(err.retry_after() > Duration::from_secs(50), "{err:?}");
        limits.check_ticket("t", "bob").unwrap();
    }

    #[test]
    fn zero_rate_is_off() {
        let limits = RateLimits::new(RateSettings {
            per_sender: 0,
            sender_burst: 0,
            per_recipient: 0,
            recipient_burst: 0,
            tickets_per_minute: 0,
            ticket_burst: 0,
        });
        for _ in 0..10_000 {
            limits.check_send("t", "svc", &users(&["alice"])).unwrap();
            limits.check_ticket("t", "alice").unwrap();
        }
    }
}
