-- cdcsync's metadata schema on the target. Idempotent: `cdcsync setup` runs it every time.
-- CREATE SCHEMA IF NOT EXISTS needs CREATE on the database even when the schema exists; the
-- least-privilege apply role (sql/target_role.sql) owns the schema but has no such right.
DO $$
BEGIN
    IF to_regnamespace('cdcsync') IS NULL THEN
        CREATE SCHEMA cdcsync;
    END IF;
END
$$;

-- The last source commit applied, per slot. Written in the same transaction as the data it covers;
-- never moves backward.
CREATE TABLE IF NOT EXISTS cdcsync.checkpoint (
    slot        text PRIMARY KEY,
    lsn         pg_lsn      NOT NULL,
    commit_time timestamptz,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- The walsender (the source backend's PID) of each slot's latest stream, written with the stream's
-- first commit: the next holder of the slot's lock ends it if it still holds the slot, and leaves
-- any other consumer of the slot alone (see cdcsync/walsenders.py).
CREATE TABLE IF NOT EXISTS cdcsync.streams (
    slot        text        PRIMARY KEY,
    walsender   integer     NOT NULL,
    process     text        NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now()
);

-- Every incoming change that lost to a newer row on the target.
CREATE TABLE IF NOT EXISTS cdcsync.conflicts (
    id           bigserial PRIMARY KEY,
    recorded_at  timestamptz NOT NULL DEFAULT now(),
    table_name   text        NOT NULL,
    key          jsonb       NOT NULL,
    operation    text        NOT NULL,
    source_value text,
    target_value text,
    source_lsn   pg_lsn
);
CREATE INDEX IF NOT EXISTS conflicts_recorded_at ON cdcsync.conflicts (recorded_at);

-- How fresh the target is: one query for an application reading it.
CREATE OR REPLACE VIEW cdcsync.freshness AS
SELECT slot,
       lsn          AS source_lsn,
       commit_time  AS source_commit_time,
       now() - commit_time AS staleness,
       updated_at   AS applied_at
FROM cdcsync.checkpoint;

-- Per table and slot: whether its rows have been copied from the source (initial snapshot or a
-- resync of the whole table). A table is streamed in every state; `ready` means it is complete.
CREATE TABLE IF NOT EXISTS cdcsync.table_state (
    slot          text        NOT NULL,
    table_name    text        NOT NULL,
    state         text        NOT NULL CHECK (state IN ('pending', 'copying', 'ready', 'error')),
    rows_copied   bigint      NOT NULL DEFAULT 0,
    rows_estimate bigint,
    reason        text,
    fix           text,
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (slot, table_name)
);

-- Re-copies asked for by `cdcsync resync` (or by the daemon for tables not yet copied), performed
-- by the process that streams the slot, chunk by chunk between watermarks.
CREATE TABLE IF NOT EXISTS cdcsync.resync_requests (
    id            bigserial   PRIMARY KEY,
    slot          text        NOT NULL,
    table_name    text        NOT NULL,
    where_sql     text,
    purpose       text        NOT NULL DEFAULT 'resync'
                              CHECK (purpose IN ('resync', 'snapshot', 'repair')),
    state         text        NOT NULL DEFAULT 'queued'
                              CHECK (state IN ('queued', 'running', 'done', 'failed')),
    rows_estimate bigint,
    rows_copied   bigint      NOT NULL DEFAULT 0,
    chunks        integer     NOT NULL DEFAULT 0,
    error         text,
    requested_at  timestamptz NOT NULL DEFAULT now(),
    started_at    timestamptz,
    finished_at   timestamptz
);
CREATE INDEX IF NOT EXISTS resync_requests_open ON cdcsync.resync_requests (slot, id)
    WHERE state IN ('queued', 'running');
-- Changes the target rejected while [apply] on_error = "dead_letter": everything else was applied.
-- The row is the replicated columns as text (JSON null for SQL NULL); a column the source left
-- unchanged (TOAST) is absent. `cdcsync dead-letters list|retry|discard` manages them.
CREATE TABLE IF NOT EXISTS cdcsync.dead_letters (
    id          bigserial PRIMARY KEY,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    table_name  text        NOT NULL,
    key         jsonb       NOT NULL,
    operation   text        NOT NULL,
    row_data    jsonb       NOT NULL,
    error       text        NOT NULL,
    source_lsn  pg_lsn      NOT NULL,
    commit_time timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS dead_letters_recorded_at ON cdcsync.dead_letters (recorded_at);
