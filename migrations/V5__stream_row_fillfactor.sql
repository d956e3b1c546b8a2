-- Every append updates its streams' `user_streams` rows (seq and unread
-- counter). Those columns are not indexed, so PostgreSQL can update a row
-- in place on its page (a heap-only tuple, no new index entry) when the
-- page has free room (PostgreSQL docs, "Heap-Only Tuples (HOT)"). At the
-- default fillfactor of 100 pages are full and nearly every update also
-- inserts into the primary key index; leaving half of each page free makes
-- most updates HOT. Measured on a 2,000-stream batch: the seq statement
-- ~45 ms -> ~30 ms. New pages get the setting; existing ones as they are
-- rewritten (VACUUM FULL, or over time).
ALTER TABLE user_streams SET (fillfactor = 50);
