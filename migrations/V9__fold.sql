-- Update in place and grouping (SendNotificationRequest's replace_key and
-- group_key). The keys live on the recipient's narrow row, NULL for a
-- plain send (adding nullable columns rewrites nothing; PostgreSQL docs,
-- ALTER TABLE, "Notes"); group_count and actors only with a group_key.
-- `current_content_id` is the content an update gave it (NULL: never
-- updated): listings, counts and filters read that one, while replaying
-- the stream shows each event as it was (the notification event its first
-- content, each update event its own).
ALTER TABLE notifications
    ADD COLUMN current_content_id bigint,
    ADD COLUMN replace_key text,
    ADD COLUMN group_key   text,
    ADD COLUMN group_count integer,
    ADD COLUMN actors      text[];

-- One live notification per recipient and replace key; partial, so plain
-- sends do not pay for it, and a deleted one frees its key.
CREATE UNIQUE INDEX notifications_replace_key ON notifications (tenant, user_id, replace_key)
    WHERE replace_key IS NOT NULL AND deleted_at IS NULL;
-- A recipient's groups of a key, newest first.
CREATE INDEX notifications_group_key ON notifications (tenant, user_id, group_key, created_at)
    WHERE group_key IS NOT NULL AND deleted_at IS NULL;

-- An update in place is an event of its own at a new seq: which
-- notification (its id and its seq, its place in listings), the content it
-- got (a `contents` row, shared by the send's recipients), and the keys,
-- group state and read state it had then, so replaying it shows what it showed live even
-- after later updates or after retention deleted the notification's row.
CREATE TABLE update_events (
    tenant          text        NOT NULL,
    user_id         text        NOT NULL,
    seq             bigint      NOT NULL,
    notification_id bigint      NOT NULL,
    note_seq        bigint      NOT NULL,
    content_id      bigint      NOT NULL,
    replace_key     text,
    group_key       text,
    group_count     integer,
    actors          text[],
    -- The notification's state after the update (renotify clears the
    -- first two).
    read_at         timestamptz,
    seen_at         timestamptz,
    archived_at     timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, user_id, seq)
);

CREATE INDEX update_events_created_at ON update_events USING brin (created_at);
