-- Per-company query statistics: the views over the shared-memory table (src/stats), the history
-- table with its snapshot function and roll-up views, and who may read what.
--
-- Privileges: nothing here is granted to PUBLIC. One company's application role must not read other
-- companies' figures, so reading is for the extension owner and members of pg_read_all_stats (which
-- pg_monitor includes); resetting and snapshotting are for the owner and roles it grants them to.

GRANT USAGE ON SCHEMA tenant_scale TO pg_read_all_stats;

CREATE VIEW tenant_scale.company_stats AS
SELECT s.company_id,
       d.datname AS database,
       s.calls,
       s.errors,
       CASE WHEN s.calls + s.errors > 0 THEN s.errors::float8 / (s.calls + s.errors) END AS error_rate,
       s.rows,
       s.total_ms,
       CASE WHEN s.calls > 0 THEN s.total_ms / s.calls END AS mean_ms,
       s.min_ms,
       s.max_ms,
       s.p50_ms,
       s.p95_ms,
       s.p99_ms,
       s.calls_last_minute,
       s.calls_last_15min,
       s.first_seen,
       s.last_seen,
       s.stats_since
  FROM tenant_scale.company_stats_raw() AS s
  LEFT JOIN pg_catalog.pg_database AS d ON d.oid = s.database_oid;

COMMENT ON VIEW tenant_scale.company_stats IS
'Per (database, company) statement statistics since stats_since, kept in shared memory. calls counts '
'statements that completed (SELECT, INSERT, UPDATE, DELETE, MERGE; utility commands are not counted), '
'errors every statement of the company that ended in ERROR, error_rate = errors / (calls + errors). '
'Times are executor times in milliseconds; p50/p95/p99 are within 3.125 % of the exact percentile. '
'calls_last_minute and calls_last_15min are sliding windows over per-minute counts. At most '
'tenant_scale.max_companies entries: when full, the least active 5 % (decaying score) are evicted '
'and counted in stats_info().evicted. Survives a clean restart, not a crash.';

CREATE VIEW tenant_scale.problem_companies AS
WITH thresholds AS (
    SELECT max(setting::float8) FILTER (WHERE name = 'tenant_scale.problem_error_rate') AS error_rate,
           max(setting::float8) FILTER (WHERE name = 'tenant_scale.problem_p95_ms') AS p95_ms,
           max(setting::float8) FILTER (WHERE name = 'tenant_scale.problem_min_calls') AS min_calls
      FROM pg_catalog.pg_settings
     WHERE name IN ('tenant_scale.problem_error_rate', 'tenant_scale.problem_p95_ms',
                    'tenant_scale.problem_min_calls')
)
SELECT s.company_id, s.database, p.problem, p.observed, p.threshold
  FROM tenant_scale.company_stats AS s
 CROSS JOIN thresholds AS t
 CROSS JOIN LATERAL (VALUES ('error_rate', s.error_rate, t.error_rate, s.calls + s.errors),
                            ('slow_p95', s.p95_ms, t.p95_ms, s.calls))
       AS p(problem, observed, threshold, sample)
 WHERE p.sample >= t.min_calls
   AND p.observed > p.threshold;

COMMENT ON VIEW tenant_scale.problem_companies IS
'Companies whose error_rate exceeds tenant_scale.problem_error_rate or whose p95_ms exceeds '
'tenant_scale.problem_p95_ms, once they ran at least tenant_scale.problem_min_calls statements. '
'One row per company and problem; observed and threshold are in the unit of the problem.';

CREATE TABLE tenant_scale.stats_history (
    snapshot_at timestamptz NOT NULL,
    database name NOT NULL,
    company_id text NOT NULL,
    calls bigint NOT NULL,
    errors bigint NOT NULL,
    rows bigint NOT NULL,
    total_ms double precision NOT NULL,
    p95_ms double precision,
    PRIMARY KEY (company_id, database, snapshot_at)
);
CREATE INDEX stats_history_snapshot_at ON tenant_scale.stats_history (snapshot_at);
SELECT pg_catalog.pg_extension_config_dump('tenant_scale.stats_history', '');

COMMENT ON TABLE tenant_scale.stats_history IS
'One row per company and snapshot interval that had activity: what happened between the previous '
'committed snapshot and snapshot_at. p95_ms is the interval''s own 95th percentile. Written by '
'snapshot_stats(); rows older than tenant_scale.history_days are deleted by it. Kept by pg_dump.';

CREATE FUNCTION tenant_scale.snapshot_stats() RETURNS SETOF tenant_scale.stats_history
LANGUAGE sql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    -- One snapshot at a time: a second one waits, then sees only what the first did not take.
    LOCK TABLE tenant_scale.stats_history IN SHARE ROW EXCLUSIVE MODE;
    DELETE FROM tenant_scale.stats_history
     WHERE snapshot_at < now() - make_interval(days => current_setting('tenant_scale.history_days', true)::int);
    INSERT INTO tenant_scale.stats_history
    SELECT i.snapshot_at, coalesce(d.datname, i.database_oid::text), i.company_id,
           i.calls, i.errors, i.rows, i.total_ms, i.p95_ms
      FROM tenant_scale.snapshot_intervals() AS i
      LEFT JOIN pg_database AS d ON d.oid = i.database_oid
    RETURNING *;
$$;

COMMENT ON FUNCTION tenant_scale.snapshot_stats() IS
'Writes to stats_history the activity of every company since the last committed snapshot and returns '
'the rows written. If the calling transaction rolls back, the next snapshot covers the same activity.';

-- The period views share one definition. p95_ms of a period is the highest interval p95 in it: the
-- 95th percentile of a mix of intervals never exceeds the largest of theirs, so it is an upper bound.
CREATE FUNCTION tenant_scale.stats_per_period(unit text)
RETURNS TABLE (period_start timestamptz, database name, company_id text, calls bigint, errors bigint,
               rows bigint, total_ms double precision, mean_ms double precision, p95_ms double precision)
LANGUAGE sql STABLE
AS $$
    SELECT date_trunc(unit, h.snapshot_at), h.database, h.company_id,
           sum(h.calls)::bigint, sum(h.errors)::bigint, sum(h.rows)::bigint,
           sum(h.total_ms), sum(h.total_ms) / nullif(sum(h.calls), 0), max(h.p95_ms)
      FROM tenant_scale.stats_history AS h
     GROUP BY 1, 2, 3
$$;

CREATE VIEW tenant_scale.stats_hourly AS SELECT * FROM tenant_scale.stats_per_period('hour');
CREATE VIEW tenant_scale.stats_daily AS SELECT * FROM tenant_scale.stats_per_period('day');
CREATE VIEW tenant_scale.stats_weekly AS SELECT * FROM tenant_scale.stats_per_period('week');

REVOKE ALL ON FUNCTION tenant_scale.company_stats_raw(), tenant_scale.stats_info(),
    tenant_scale.stats_reset(text), tenant_scale.snapshot_intervals(), tenant_scale.snapshot_stats(),
    tenant_scale.stats_per_period(text) FROM PUBLIC;
REVOKE ALL ON tenant_scale.company_stats, tenant_scale.problem_companies, tenant_scale.stats_history,
    tenant_scale.stats_hourly, tenant_scale.stats_daily, tenant_scale.stats_weekly FROM PUBLIC;
GRANT EXECUTE ON FUNCTION tenant_scale.company_stats_raw(), tenant_scale.stats_info(),
    tenant_scale.stats_per_period(text) TO pg_read_all_stats;
GRANT SELECT ON tenant_scale.company_stats, tenant_scale.problem_companies, tenant_scale.stats_history,
    tenant_scale.stats_hourly, tenant_scale.stats_daily, tenant_scale.stats_weekly TO pg_read_all_stats;

-- The 'stats memory' check of tenant_scale.health() (contract: sql/health.sql). Not ok when the
-- statistics are off (library not preloaded) or when the table has been full: companies were evicted
-- since the last full reset, so some figures restarted from zero.
CREATE FUNCTION tenant_scale.health_stats()
RETURNS TABLE ("check" text, ok boolean, detail text)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    info record;
BEGIN
    SELECT * INTO info FROM tenant_scale.stats_info();
    RETURN QUERY SELECT 'stats memory', info.evicted = 0,
        format('%s of %s companies tracked, %s evicted since %s; %s of shared memory%s',
               info.tracked, info.max_companies, info.evicted,
               CASE WHEN info.evicted = 0 THEN 'the last reset' ELSE info.stats_reset::text END,
               pg_size_pretty(info.shared_memory_bytes),
               CASE WHEN info.evicted > 0 THEN ': raise tenant_scale.max_companies' ELSE '' END);
EXCEPTION WHEN object_not_in_prerequisite_state THEN
    RETURN QUERY SELECT 'stats memory', false,
        'per-company statistics are off: tenant_scale is not in shared_preload_libraries';
END
$$;
REVOKE ALL ON FUNCTION tenant_scale.health_stats() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION tenant_scale.health_stats() TO pg_monitor;
