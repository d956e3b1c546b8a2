//! The in-process bus: the memory store's events go straight to this
//! replica's hub. The store calls [`Bus::stage`] under its lock, after the
//! write, so each stream's events reach the hub in seq order and only once
//! they are stored.

use std::sync::Arc;

use super::{Bus, Committed, Staged};
use crate::hub::Hub;

/// Delivers staged events to `hub` at once.
#[derive(Debug)]
pub struct LocalBus {
    hub: Arc<Hub>,
}

impl LocalBus {
    /// A bus to `hub`.
    pub fn new(hub: Arc<Hub>) -> Self {
        Self { hub }
    }
}

impl Bus for LocalBus {
    fn stage(&self, events: &[Committed]) -> Option<Staged> {
        for c in events {
            self.hub.publish(&c.key, &c.event);
        }
        None
    }
}
