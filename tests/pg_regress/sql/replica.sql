-- Replication lag and health checks. This cluster is a primary without standbys; the standby side is
-- exercised by tests/integration/tests/replica.rs on a real streaming standby.

-- replica_lag: one row per standby streaming from this server (none here).
SELECT * FROM tenant_scale.replica_lag;

-- replica_status(): this server's own replication state. On a primary: not a replica, healthy.
SELECT is_replica, receive_lsn, replay_lsn, lag_bytes, last_replay_at, lag_seconds, replay_paused, healthy
FROM tenant_scale.replica_status();

-- healthy = streaming and lag within both limits, which every session may tighten or relax.
SELECT name, setting, unit, context, short_desc FROM pg_settings
WHERE name LIKE 'tenant_scale.max_replica_lag%' ORDER BY name;
SHOW tenant_scale.max_replica_lag_bytes;
SELECT tenant_scale.replica_lag_acceptable(16 * 1024 * 1024, 5.0) AS at_the_limits,
       tenant_scale.replica_lag_acceptable(16 * 1024 * 1024 + 1, 0) AS one_byte_over,
       tenant_scale.replica_lag_acceptable(0, 5.001) AS one_ms_over,
       tenant_scale.replica_lag_acceptable(NULL, 0) AS unknown_bytes;
SET tenant_scale.max_replica_lag_ms = '10s';
SELECT tenant_scale.replica_lag_acceptable(0, 9.5) AS within_ten_seconds;
RESET tenant_scale.max_replica_lag_ms;

-- health(): (check, ok, detail) rows from every capability's checks, in the order of their names.
SELECT "check", ok, regexp_replace(detail, 'up since .*', 'up since ...') AS detail
FROM tenant_scale.health();

-- Each capability adds checks by defining tenant_scale.health_<topic>() in its own SQL file (see
-- sql/health.sql). A check that fails yields a row saying so instead of hiding the others.
CREATE FUNCTION tenant_scale.health_zz_example() RETURNS TABLE ("check" text, ok boolean, detail text)
LANGUAGE sql AS $$ SELECT 'zz example', 1 / 0 = 1, 'never shown' $$;
SELECT "check", ok, detail FROM tenant_scale.health() WHERE "check" NOT IN ('database', 'quotas', 'replication', 'stats memory');
-- Only functions of the extension count, so a function created by hand is ignored until it is added:
ALTER EXTENSION tenant_scale ADD FUNCTION tenant_scale.health_zz_example();
SELECT "check", ok, detail FROM tenant_scale.health() WHERE "check" NOT IN ('database', 'quotas', 'replication', 'stats memory');
ALTER EXTENSION tenant_scale DROP FUNCTION tenant_scale.health_zz_example();
DROP FUNCTION tenant_scale.health_zz_example();

-- health() and replica_lag are for monitoring roles (pg_monitor, which has USAGE on the schema);
-- replica_status() is for every role the DBA lets use the schema, since applications route reads by it
-- and it tells nothing PUBLIC could not read already.
CREATE ROLE regress_app;
CREATE ROLE regress_watcher IN ROLE pg_monitor;
GRANT USAGE ON SCHEMA tenant_scale TO regress_app;
SET ROLE regress_app;
SELECT is_replica, healthy FROM tenant_scale.replica_status();
SELECT count(*) FROM tenant_scale.replica_lag;
SELECT count(*) FROM tenant_scale.health();
SET ROLE regress_watcher;
SELECT count(*) FROM tenant_scale.replica_lag;
SELECT "check", ok FROM tenant_scale.health();
RESET ROLE;
REVOKE USAGE ON SCHEMA tenant_scale FROM regress_app;
DROP ROLE regress_app, regress_watcher;
