-- cdcsync's metadata schema on the target. Idempotent: `cdcsync setup` runs it every time.
CREATE SCHEMA IF NOT EXISTS cdcsync;

-- The last source commit applied, per slot. Written in the same transaction as the data it covers;
-- never moves backward.
CREATE TABLE IF NOT EXISTS cdcsync.checkpoint (
    slot        text PRIMARY KEY,
    lsn         pg_lsn      NOT NULL,
    commit_time timestamptz,
    updated_at  timestamptz NOT NULL DEFAULT now()
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
