-- Herald's schema. Each user's event stream is the union of `notifications`
-- and `read_events` ordered by `seq`; `user_streams.last_seq` hands out the
-- next seq under the row lock, so seqs are gap-free and in commit order.

CREATE TABLE user_streams (
    tenant     text   NOT NULL,
    user_id    text   NOT NULL,
    -- Seq of the user's newest event.
    last_seq   bigint NOT NULL,
    -- Events with seq <= pruned_seq were deleted by retention.
    pruned_seq bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant, user_id)
);

CREATE TABLE notifications (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant     text        NOT NULL,
    user_id    text        NOT NULL,
    seq        bigint      NOT NULL,
    type       text        NOT NULL,
    title      text        NOT NULL,
    body       text        NOT NULL,
    -- Kept as sent (compact JSON object text); never queried into.
    data       json        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    read_at    timestamptz,
    UNIQUE (tenant, user_id, seq)
);

-- Unread counts and the fresh-connection backlog.
CREATE INDEX notifications_unread ON notifications (tenant, user_id, seq)
    WHERE read_at IS NULL;
-- Retention.
CREATE INDEX notifications_created_at ON notifications (created_at);

CREATE TABLE read_events (
    tenant           text        NOT NULL,
    user_id          text        NOT NULL,
    seq              bigint      NOT NULL,
    -- Ids marked read by this event (empty for a mark-up-to).
    notification_ids bigint[]    NOT NULL,
    -- Non-zero: every notification with seq <= up_to_seq was marked read.
    up_to_seq        bigint      NOT NULL DEFAULT 0,
    created_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, user_id, seq)
);

CREATE INDEX read_events_created_at ON read_events (created_at);

CREATE TABLE idempotency_keys (
    tenant     text        NOT NULL,
    sender     text        NOT NULL,
    key        text        NOT NULL,
    -- Canonical text of the request, to refuse a key reused for another.
    request    text        NOT NULL,
    -- The deliveries returned the first time, as JSON.
    response   jsonb,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, sender, key)
);

CREATE INDEX idempotency_keys_created_at ON idempotency_keys (created_at);
