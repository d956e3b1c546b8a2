-- Stream tickets: short-lived, single-use credentials that open a user's
-- event stream over Server-Sent Events (src/ticket.rs). Only the SHA-256
-- digest of a ticket is kept. Redeeming deletes the row (any replica,
-- once); retention deletes the expired ones.
CREATE TABLE stream_tickets (
    digest bytea PRIMARY KEY,
    tenant text NOT NULL,
    user_id text NOT NULL,
    -- The expiry of the token the ticket was minted with: a stream opened
    -- with it ends then.
    token_expires_at timestamptz NOT NULL,
    expires_at timestamptz NOT NULL
);
CREATE INDEX stream_tickets_expires_at ON stream_tickets (expires_at);
