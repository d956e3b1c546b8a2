-- Expiry (SendNotificationRequest.expires_at): on the recipient's narrow
-- row, NULL for a notification that does not expire. Listings, counts and
-- backlogs leave out what has expired; the expiry job deletes it (a state
-- event per user), finding it through the first index; a count subtracts
-- the expired ones not yet deleted through the second. Both partial:
-- notifications without an expiry pay nothing.
ALTER TABLE notifications ADD COLUMN expires_at timestamptz;
ALTER TABLE update_events ADD COLUMN expires_at timestamptz;
CREATE INDEX notifications_expiring ON notifications (expires_at)
    WHERE expires_at IS NOT NULL AND deleted_at IS NULL;
CREATE INDEX notifications_expiring_per_user ON notifications (tenant, user_id, expires_at)
    WHERE expires_at IS NOT NULL AND deleted_at IS NULL;

-- Scheduled sends (deliver_at): the send as a herald.v1.SendNotificationRequest
-- (protobuf bytes: validated when scheduled, the default actor filled in,
-- without idempotency key or deliver_at), appended to the recipients'
-- streams by the scheduler when due, in the transaction that deletes it
-- here. Cancelled by (tenant, sender, idempotency key).
CREATE TABLE scheduled_sends (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant          text        NOT NULL,
    sender          text        NOT NULL,
    idempotency_key text,
    request         bytea       NOT NULL,
    deliver_at      timestamptz NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX scheduled_sends_due ON scheduled_sends (deliver_at);
CREATE UNIQUE INDEX scheduled_sends_key ON scheduled_sends (tenant, sender, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
