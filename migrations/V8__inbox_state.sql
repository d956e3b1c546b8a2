-- Inbox states beyond read: seen, archived, deleted, each a timestamp on
-- the recipient's narrow row (NULL: not in that state). A notification
-- that was read counts as seen, so no existing row needs rewriting.
-- Adding nullable columns without defaults rewrites nothing (PostgreSQL
-- docs, ALTER TABLE, "Notes").
ALTER TABLE notifications
    ADD COLUMN seen_at     timestamptz,
    ADD COLUMN archived_at timestamptz,
    ADD COLUMN deleted_at  timestamptz;

-- Read events become state events: one kind for every state change, the
-- action (the herald.v1.StateAction number; 1 = read, what every v1 row
-- is) and, for a change by filter, the filter it applied with up_to_seq
-- (all empty and 0 for a change without one).
ALTER TABLE read_events RENAME TO state_events;
ALTER INDEX read_events_pkey RENAME TO state_events_pkey;
ALTER INDEX read_events_created_at RENAME TO state_events_created_at;
ALTER TABLE state_events
    ADD COLUMN action        smallint NOT NULL DEFAULT 1,
    ADD COLUMN types         text[]   NOT NULL DEFAULT '{}',
    ADD COLUMN type_prefixes text[]   NOT NULL DEFAULT '{}',
    ADD COLUMN categories    text[]   NOT NULL DEFAULT '{}',
    ADD COLUMN min_severity  smallint NOT NULL DEFAULT 0;

-- The inbox's notifications neither seen nor read, kept like `unread`:
-- today every unread one (nothing was seen yet).
ALTER TABLE user_streams ADD COLUMN unseen bigint NOT NULL DEFAULT 0;
UPDATE user_streams SET unseen = unread WHERE unread <> 0;
