-- Least-privilege role for cdcsync on the TARGET. Run as an administrator (on Neon: the
-- project owner role). It can write the replicated tables and its own `cdcsync` schema only.
--
--   psql "$TARGET_ADMIN_DSN" -v password="'...'" -v schema=public -f sql/target_role.sql
--
-- Neon: session_replication_role cannot be changed there, so target triggers and foreign keys
-- stay active during apply; cdcsync orders its merges by foreign key for that reason.
CREATE ROLE cdcsync_apply WITH LOGIN PASSWORD :password;
CREATE SCHEMA IF NOT EXISTS cdcsync AUTHORIZATION cdcsync_apply;
GRANT USAGE ON SCHEMA :"schema" TO cdcsync_apply;
GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON ALL TABLES IN SCHEMA :"schema" TO cdcsync_apply;
-- The merge stages each batch in temporary tables.
GRANT TEMPORARY ON DATABASE :"DBNAME" TO cdcsync_apply;
-- `cdcsync setup --create-tables` additionally needs CREATE on the schema; grant it only for
-- that first run, or create the target tables yourself:
--   GRANT CREATE ON SCHEMA public TO cdcsync_apply;
-- [apply] schema_changes = "add_columns" runs ALTER TABLE ... ADD COLUMN, which only a table's
-- owner may do. Without ownership a new source column halts with the ALTER TABLE to run as the
-- owner; or make the role own the replicated tables:
--   ALTER TABLE public.orders OWNER TO cdcsync_apply;
-- Tables created later need the grants above again (or ALTER DEFAULT PRIVILEGES).
