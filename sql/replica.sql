-- Replication lag (src/replica): replica_lag on a primary, replica_status() on any server, and the
-- `replication` check of health().
--
-- healthy means: streaming, at most tenant_scale.max_replica_lag_bytes of WAL behind, and at most
-- tenant_scale.max_replica_lag_ms behind in time (replica_lag_acceptable, so both sides judge alike).
--
-- Privileges:
--   * replica_lag shows every standby's address and application name: pg_monitor (and superusers)
--     only. It runs as the caller, so a member sees what pg_stat_replication shows it.
--   * replica_status() says only how far this server is behind, which every role can already read
--     from pg_last_wal_receive_lsn() and friends; it is SECURITY DEFINER solely to tell whether the
--     WAL receiver is streaming (pg_stat_wal_receiver hides that from roles without
--     pg_read_all_stats), so applications that route reads to replicas can call it as themselves.

CREATE VIEW tenant_scale.replica_lag AS
SELECT r.application_name,
       r.client_addr,
       r.state,
       r.sync_state,
       r.sent_lsn,
       r.write_lsn,
       r.flush_lsn,
       r.replay_lsn,
       lag.bytes AS lag_bytes,
       r.write_lag,
       r.flush_lag,
       r.replay_lag,
       lag.seconds AS lag_seconds,
       COALESCE(r.state = 'streaming' AND tenant_scale.replica_lag_acceptable(lag.bytes, lag.seconds), false)
           AS healthy
FROM pg_catalog.pg_stat_replication r
CROSS JOIN LATERAL (
    SELECT pg_catalog.pg_wal_lsn_diff(
               CASE WHEN pg_catalog.pg_is_in_recovery() THEN pg_catalog.pg_last_wal_receive_lsn()
                    ELSE pg_catalog.pg_current_wal_lsn() END,
               r.replay_lsn)::bigint AS bytes
) AS behind
CROSS JOIN LATERAL (
    -- replay_lag is PostgreSQL's own measure; it turns NULL once a caught-up standby idles.
    SELECT behind.bytes,
           CASE WHEN behind.bytes > 0
                THEN COALESCE(extract(epoch FROM r.replay_lag)::double precision, 0)
                ELSE 0 END AS seconds
) AS lag;
REVOKE ALL ON tenant_scale.replica_lag FROM PUBLIC;
GRANT SELECT ON tenant_scale.replica_lag TO pg_monitor;
COMMENT ON VIEW tenant_scale.replica_lag IS
    'One row per standby streaming from this server, with its lag and whether it is healthy.';

CREATE FUNCTION tenant_scale.replica_status(
    OUT is_replica boolean,
    OUT receive_lsn pg_lsn,
    OUT replay_lsn pg_lsn,
    OUT lag_bytes bigint,
    OUT last_replay_at timestamptz,
    OUT lag_seconds double precision,
    OUT replay_paused boolean,
    OUT healthy boolean)
LANGUAGE sql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT s.is_replica, s.receive_lsn, s.replay_lsn, s.lag_bytes, s.last_replay_at, s.lag_seconds,
           s.replay_paused,
           CASE WHEN NOT s.is_replica THEN true
                ELSE COALESCE(s.streaming AND tenant_scale.replica_lag_acceptable(s.lag_bytes, s.lag_seconds),
                              false)
           END
    FROM (
        SELECT w.*,
               -- Nothing received is waiting for replay: not late, however long ago the primary last
               -- committed (an idle primary must not make its standbys look late).
               CASE WHEN w.lag_bytes = 0 THEN 0
                    ELSE extract(epoch FROM clock_timestamp() - w.last_replay_at)::double precision
               END AS lag_seconds
        FROM (
            SELECT r.is_replica, r.receive_lsn, r.replay_lsn,
                   CASE WHEN r.is_replica
                        THEN GREATEST(COALESCE(pg_wal_lsn_diff(r.receive_lsn, r.replay_lsn), 0), 0)::bigint
                        ELSE 0 END AS lag_bytes,
                   pg_last_xact_replay_timestamp() AS last_replay_at,
                   r.is_replica AND pg_is_wal_replay_paused() AS replay_paused,
                   EXISTS (SELECT FROM pg_stat_wal_receiver WHERE status = 'streaming') AS streaming
            FROM (
                SELECT pg_is_in_recovery() AS is_replica,
                       pg_last_wal_receive_lsn() AS receive_lsn,
                       pg_last_wal_replay_lsn() AS replay_lsn
            ) AS r
        ) AS w
    ) AS s
$$;
COMMENT ON FUNCTION tenant_scale.replica_status() IS
    'This server''s replication state: on a standby how far replay is behind what it received; on a primary is_replica = false and healthy = true.';

-- The `replication` check of health() (see sql/health.sql): one row per standby on a primary (or one
-- saying there is none), and this server's own state on a standby.
CREATE FUNCTION tenant_scale.health_replication()
RETURNS TABLE ("check" text, ok boolean, detail text)
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT 'replication', r.healthy,
           format('standby %s (%s): %s, %s bytes behind, replay lag %s s',
                  quote_literal(r.application_name), COALESCE(host(r.client_addr), 'local socket'),
                  r.state, r.lag_bytes, round(r.lag_seconds::numeric, 3))
    FROM tenant_scale.replica_lag r
    WHERE NOT pg_is_in_recovery()
    UNION ALL
    SELECT 'replication', true, 'primary; no standby is connected'
    WHERE NOT pg_is_in_recovery() AND NOT EXISTS (SELECT FROM tenant_scale.replica_lag)
    UNION ALL
    SELECT 'replication', s.healthy,
           format('standby: %s, %s bytes received but not replayed, %s s behind%s',
                  CASE WHEN s.healthy THEN 'healthy' ELSE 'unhealthy' END,
                  s.lag_bytes, round(s.lag_seconds::numeric, 3),
                  CASE WHEN s.replay_paused THEN ', replay paused' ELSE '' END)
    FROM tenant_scale.replica_status() s
    WHERE s.is_replica
$$;
REVOKE ALL ON FUNCTION tenant_scale.health_replication() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION tenant_scale.health_replication() TO pg_monitor;
