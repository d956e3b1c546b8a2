//! Stream tickets: short-lived, single-use credentials that open a user's
//! event stream over Server-Sent Events, for clients that cannot set an
//! `Authorization` header (a browser's `EventSource`, WHATWG HTML §9.2).
//!
//! A ticket is 32 bytes from the operating system's CSPRNG, given to the
//! client as 43 characters of unpadded base64url (RFC 4648 §5). The store
//! keeps only its SHA-256 digest, with whom it is for and until when, so a
//! database dump holds no usable ticket; redeeming deletes it in the same
//! statement that reads it, so a ticket opens one stream, on whichever
//! replica, once. A ticket never outlives the token it was minted with.

use std::time::{Duration, SystemTime};

use base64::Engine;
use sha2::{Digest, Sha256};

/// Random bytes in a ticket.
pub const TICKET_BYTES: usize = 32;

/// Characters of a ticket as the client sees it (unpadded base64url of
/// [`TICKET_BYTES`]).
pub const TICKET_CHARS: usize = 43;

/// Longest lifetime of a resume ticket (the cookie an SSE stream sets for
/// `EventSource`'s own reconnects), whatever the token's expiry.
pub const MAX_RESUME_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// The SHA-256 digest of a ticket: what the store keeps and looks up.
pub type TicketDigest = [u8; 32];

/// Whom a ticket opens a stream for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TicketGrant {
    /// The tenant of the token it was minted with.
    pub tenant: String,
    /// The user (`sub`) of that token.
    pub user: String,
    /// That token's expiry: a stream opened with the ticket ends then.
    pub token_expires_at: SystemTime,
}

impl From<&crate::auth::Identity> for TicketGrant {
    /// What a ticket minted with this token grants.
    fn from(identity: &crate::auth::Identity) -> Self {
        Self {
            tenant: identity.tenant.as_str().to_owned(),
            user: identity.user.as_str().to_owned(),
            token_expires_at: identity.expires_at,
        }
    }
}

/// A freshly minted ticket.
#[derive(Debug, Clone)]
pub struct Minted {
    /// What the client gets.
    pub ticket: String,
    /// What the store keeps.
    pub digest: TicketDigest,
}

/// Why a ticket could not be minted.
#[derive(Debug, thiserror::Error)]
#[error("no randomness from the operating system: {0}")]
pub struct MintError(String);

/// Mints a ticket from the operating system's CSPRNG (getrandom(2)).
pub fn mint() -> Result<Minted, MintError> {
    let mut bytes = [0u8; TICKET_BYTES];
    getrandom::fill(&mut bytes).map_err(|e| MintError(e.to_string()))?;
    let ticket = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    Ok(Minted {
        digest: digest(&ticket),
        ticket,
    })
}

/// The digest a ticket is stored under; `None` when `ticket` cannot be
/// one (wrong length or alphabet), so nothing is looked up for it.
pub fn parse(ticket: &str) -> Option<TicketDigest> {
    (ticket.len() == TICKET_CHARS
        && ticket
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
    .then(|| digest(ticket))
}

fn digest(ticket: &str) -> TicketDigest {
    Sha256::digest(ticket.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_minted_ticket_parses_to_its_digest_and_nothing_else_does() {
        let a = mint().unwrap();
        let b = mint().unwrap();
        assert_ne!(a.ticket, b.ticket);
        assert_eq!(a.ticket.len(), TICKET_CHARS);
        assert_eq!(parse(&a.ticket), Some(a.digest));
        assert_ne!(a.digest, b.digest);
        assert_eq!(parse(""), None);
        assert_eq!(parse(&a.ticket[1..]), None);
        assert_eq!(parse(&format!("{}=", &a.ticket[1..])), None);
        assert_eq!(parse(&"é".repeat(TICKET_CHARS)), None);
    }
}
