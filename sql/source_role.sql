-- Least-privilege role for cdcsync on the SOURCE (the primary). Run as an administrator.
-- It can stream the slot and read the published tables; nothing else.
--
--   psql "$SOURCE_ADMIN_DSN" -v password="'...'" -v schema=public -f sql/source_role.sql
--
-- Supabase: run it as the `postgres` user in the SQL editor or over the direct connection
-- (port 5432); cdcsync must also connect directly, the pooler cannot carry replication.
-- Neon as a source: enable logical replication in the project settings first.
CREATE ROLE cdcsync_replicator WITH LOGIN REPLICATION PASSWORD :password;
GRANT USAGE ON SCHEMA :"schema" TO cdcsync_replicator;
-- SELECT on the replicated tables only; list them instead of ALL TABLES for a narrower grant.
GRANT SELECT ON ALL TABLES IN SCHEMA :"schema" TO cdcsync_replicator;
-- `cdcsync setup` creates the publication, which requires owning the tables. Either run setup
-- once as the table owner, or create the publication yourself and let setup find it:
--   CREATE PUBLICATION cdcsync FOR TABLE public.orders, public.customers;
-- Let the role create publications in this database (owning them; it still cannot publish
-- tables it does not own):
GRANT CREATE ON DATABASE :"DBNAME" TO cdcsync_replicator;
-- The heartbeat (every [source] heartbeat_interval_s) writes a logical message into the WAL.
GRANT EXECUTE ON FUNCTION pg_logical_emit_message(boolean, text, text) TO cdcsync_replicator;
