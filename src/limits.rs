//! Rate limits on sending: a token bucket per sender and per recipient
//! (GCRA, from the `governor` crate), so one misbehaving service cannot
//! flood the database, and one user cannot be flooded.
//!
//! A refused send is `RESOURCE_EXHAUSTED` with a `google.rpc.RetryInfo`
//! detail saying when to retry (gRPC status-code guide; Google API error
//! model, AIP-193), and stores nothing.

use std::{num::NonZeroU32, time::Duration};

use governor::{
    DefaultKeyedRateLimiter, Quota, RateLimiter,
    clock::{Clock, DefaultClock},
};
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

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
}

impl Default for RateSettings {
    fn default() -> Self {
        Self {
            per_sender: 1_000,
            sender_burst: 2_000,
            per_recipient: 20,
            recipient_burst: 100,
        }
    }
}

type Key = (String, String);

/// The limiters of one replica (limits are per replica).
pub struct RateLimits {
    senders: Option<DefaultKeyedRateLimiter<Key>>,
    recipients: Option<DefaultKeyedRateLimiter<Key>>,
    clock: DefaultClock,
}

impl std::fmt::Debug for RateLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimits")
            .field("senders", &self.senders.is_some())
            .field("recipients", &self.recipients.is_some())
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

impl RateLimits {
    /// Limiters for `settings`.
    pub fn new(settings: RateSettings) -> Self {
        Self {
            senders: limiter(settings.per_sender, settings.sender_burst),
            recipients: limiter(settings.per_recipient, settings.recipient_burst),
            clock: DefaultClock::default(),
        }
    }

    /// Charges one send to `sender` and one notification to each of
    /// `recipients`. `RESOURCE_EXHAUSTED` with retry information when any
    /// bucket is empty; tokens already taken for this send are not
    /// returned (the limit errs on the strict side).
    pub fn check_send(
        &self,
        tenant: &str,
        sender: &str,
        recipients: &[UserId],
    ) -> Result<(), Status> {
        if let Some(senders) = &self.senders
            && let Err(not_until) = senders.check_key(&(tenant.to_owned(), sender.to_owned()))
        {
            let wait = not_until.wait_time_from(self.clock.now());
            return Err(exhausted(
                format!("sender {sender} is over its send rate"),
                wait,
            ));
        }
        if let Some(limiter) = &self.recipients {
            for r in recipients {
                if let Err(not_until) = limiter.check_key(&(tenant.to_owned(), r.to_string())) {
                    let wait = not_until.wait_time_from(self.clock.now());
                    return Err(exhausted(
                        format!("recipients: {r} is over its notification rate"),
                        wait,
                    ));
                }
            }
        }
        Ok(())
    }

    /// Forgets keys whose buckets are full again, bounding memory.
    pub fn retain_recent(&self) {
        for l in [&self.senders, &self.recipients].into_iter().flatten() {
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

/// `RESOURCE_EXHAUSTED` with a `RetryInfo` detail of `retry_after`.
pub fn exhausted(message: String, retry_after: Duration) -> Status {
    let retry_after = retry_after.max(Duration::from_millis(1));
    Status::with_error_details(
        Code::ResourceExhausted,
        format!("{message}; retry in {} ms", retry_after.as_millis()),
        ErrorDetails::with_retry_info(Some(retry_after)),
    )
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
    fn sender_and_recipient_buckets_refuse_with_retry_info() {
        let limits = RateLimits::new(RateSettings {
            per_sender: 1,
            sender_burst: 3,
            per_recipient: 1,
            recipient_burst: 2,
        });
        let alice = users(&["alice"]);
        limits.check_send("t", "svc-a", &alice).unwrap();
        limits.check_send("t", "svc-b", &alice).unwrap();
        let err = limits.check_send("t", "svc-c", &alice).unwrap_err();
        assert_eq!(err.code(), Code::ResourceExhausted);
        assert!(
            err.message().starts_with("recipients: alice"),
            "{}",
            err.message()
        );
        let retry = err.get_details_retry_info().expect("RetryInfo detail");
        assert!(retry.retry_delay.is_some_and(|d| d > Duration::ZERO));
        // Another tenant's alice is another bucket.
        limits.check_send("u", "svc-c", &alice).unwrap();
        for i in 0..2 {
            limits
                .check_send("t", "svc-a", &users(&[&format!("x{i}")]))
                .unwrap();
        }
        let err = limits.check_send("t", "svc-a", &users(&["y"])).unwrap_err();
        assert!(
            err.message().starts_with("sender svc-a"),
            "{}",
            err.message()
        );
    }

    #[test]
    fn zero_rate_is_off() {
        let limits = RateLimits::new(RateSettings {
            per_sender: 0,
            sender_burst: 0,
            per_recipient: 0,
            recipient_burst: 0,
        });
        for _ in 0..10_000 {
            limits.check_send("t", "svc", &users(&["alice"])).unwrap();
        }
    }
}
