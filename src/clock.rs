//! The time a replica goes by for what depends on the wall clock beyond a
//! transaction: when a scheduled send is due (`deliver_at`) and when a
//! notification has expired (`expires_at`). The system clock in
//! production; tests set one they move forward by hand, so scheduling and
//! expiry are tested without sleeping.

use std::{
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering},
    },
    time::{Duration, SystemTime},
};

/// A wall clock: the system's, or the system's moved by an offset that
/// only [`Clock::advance`] changes (a test's). Cheap to clone; clones share
/// the offset.
#[derive(Debug, Clone, Default)]
pub struct Clock {
    /// Microseconds added to the system time; `None`: the system clock.
    offset: Option<Arc<AtomicI64>>,
}

impl Clock {
    /// The system clock.
    pub fn system() -> Self {
        Self::default()
    }

    /// A clock that starts at the system time and that [`Clock::advance`]
    /// moves forward (for tests).
    pub fn manual() -> Self {
        Self {
            offset: Some(Arc::new(AtomicI64::new(0))),
        }
    }

    /// The current time.
    pub fn now(&self) -> SystemTime {
        let now = SystemTime::now();
        match &self.offset {
            None => now,
            Some(offset) => {
                let micros = offset.load(Ordering::Acquire);
                now + Duration::from_micros(u64::try_from(micros).unwrap_or(0))
            }
        }
    }

    /// Moves a manual clock forward by `by` (saturating); the system clock
    /// cannot be moved, and is left as it is.
    pub fn advance(&self, by: Duration) {
        if let Some(offset) = &self.offset {
            let by = i64::try_from(by.as_micros()).unwrap_or(i64::MAX);
            let _ = offset.fetch_update(Ordering::AcqRel, Ordering::Acquire, |o| {
                Some(o.saturating_add(by))
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_only_when_advanced_and_its_clones_follow() {
        let clock = Clock::manual();
        let copy = clock.clone();
        let before = clock.now();
        clock.advance(Duration::from_secs(3600));
        let after = copy.now();
        assert!(after.duration_since(before).unwrap() >= Duration::from_secs(3600));
        let system = Clock::system();
        system.advance(Duration::from_secs(3600));
        assert!(system.now() < after, "the system clock is not moved");
    }
}
