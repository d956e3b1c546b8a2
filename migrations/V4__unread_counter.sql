-- Unread counts kept on the stream row instead of a partial index over
-- every unread notification: the append that adds notifications already
-- updates that row (its seq), a mark holds its lock, and retention locks it
-- too, so the counter changes in the same transactions as the rows it
-- counts and cannot drift. Each notification insert saves one index entry
-- (the index cost ~20% of a fan-out insert, measured), and counting is one
-- row read.

ALTER TABLE user_streams ADD COLUMN unread bigint NOT NULL DEFAULT 0;

UPDATE user_streams s SET unread = c.n
FROM (SELECT tenant, user_id, count(*) AS n FROM notifications
      WHERE read_at IS NULL GROUP BY tenant, user_id) AS c
WHERE s.tenant = c.tenant AND s.user_id = c.user_id;

DROP INDEX notifications_unread;
