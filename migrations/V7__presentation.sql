-- How a notification presents itself beyond its text (Inbox v2): its
-- category, severity (the herald.v1.Severity number, 2 = normal), who
-- caused it, where it leads and its buttons (JSON text of
-- [{"l": label, "u": url}], empty for none). Shared by a send's
-- recipients like the rest of the content. Existing rows get the defaults:
-- no category, normal, no actor, no links.
ALTER TABLE contents
    ADD COLUMN category   text     NOT NULL DEFAULT '',
    ADD COLUMN severity   smallint NOT NULL DEFAULT 2,
    ADD COLUMN actor      text     NOT NULL DEFAULT '',
    ADD COLUMN action_url text     NOT NULL DEFAULT '',
    ADD COLUMN actions    text     NOT NULL DEFAULT '';
