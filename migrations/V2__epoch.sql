-- Stream epochs (herald.v1 `Event.epoch`): which history the seqs of this
-- database count in. One row. `cluster` records the PostgreSQL cluster and
-- WAL timeline the epoch was issued on; a replica that finds itself on
-- another one (the database was restored from a backup or a dump, or failed
-- over to a standby that may lack the newest commits) draws a new epoch, so
-- clients resuming from a position of the old history get `resync` instead
-- of a silent jump into a different one (see store/postgres.rs, `epoch`).

CREATE TABLE herald_meta (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    -- 1 .. 2^53 - 1.
    epoch     bigint  NOT NULL CHECK (epoch > 0),
    -- `<system_identifier>/<timeline>` when the epoch was issued; NULL
    -- until a replica first records it.
    cluster   text
);

INSERT INTO herald_meta (epoch)
VALUES (floor(random() * 9007199254740990)::bigint + 1);
