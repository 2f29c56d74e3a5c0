-- Per-company query statistics. Each statement is counted for the company that the setting
-- tenant_scale.company names when the statement starts; empty means unattributed.
SELECT name, setting, unit, context, min_val, max_val
  FROM pg_settings
 WHERE name IN ('tenant_scale.company', 'tenant_scale.track', 'tenant_scale.max_companies',
                'tenant_scale.problem_error_rate', 'tenant_scale.problem_p95_ms',
                'tenant_scale.problem_min_calls', 'tenant_scale.snapshot_interval',
                'tenant_scale.database', 'tenant_scale.history_days')
 ORDER BY name;

-- Start from zero (the function returns how many companies it reset).
SELECT tenant_scale.stats_reset() >= 0 AS reset;

CREATE TABLE orders (id int PRIMARY KEY, company text NOT NULL, amount numeric NOT NULL);

-- acme runs three statements that complete (4 rows) and one that fails.
SET tenant_scale.company = 'acme';
INSERT INTO orders VALUES (1, 'acme', 10), (2, 'acme', 20);
INSERT INTO orders VALUES (3, 'acme', 30);
SELECT count(*) FROM orders WHERE company = 'acme';
INSERT INTO orders VALUES (1, 'acme', 99);
-- SET LOCAL attributes one transaction to globex (3 rows updated)...
BEGIN;
SET LOCAL tenant_scale.company = 'globex';
UPDATE orders SET amount = amount + 1 WHERE company = 'acme';
COMMIT;
-- ...after which the session's company is acme again (a fourth statement, 1 row).
SELECT amount FROM orders WHERE id = 1;
-- Unattributed statements only add to stats_info().unattributed_calls.
RESET tenant_scale.company;
SELECT 'nobody' AS company;

-- Counts are exact; times vary from run to run, so only their relations are shown here.
SELECT company_id, database, calls, errors, round(error_rate::numeric, 3) AS error_rate, rows,
       min_ms <= p50_ms AND p50_ms <= p95_ms AND p95_ms <= p99_ms AND p99_ms <= max_ms AS percentiles_ordered,
       min_ms <= mean_ms AND mean_ms <= max_ms AS mean_within_extremes,
       calls_last_15min = calls AND calls_last_minute <= calls AS recent_calls,
       first_seen <= last_seen AND stats_since <= first_seen AS times_ordered
  FROM tenant_scale.company_stats ORDER BY company_id;

SELECT max_companies, tracked, unattributed_calls > 0 AS unattributed_counted,
       shared_memory_bytes > 0 AS memory_reported, stats_reset <= now() AS reset_in_past
  FROM tenant_scale.stats_info();

-- Problems: an error rate above tenant_scale.problem_error_rate, or a p95 above
-- tenant_scale.problem_p95_ms, once a company ran tenant_scale.problem_min_calls statements.
SELECT * FROM tenant_scale.problem_companies;
SET tenant_scale.problem_min_calls = 4;
SELECT company_id, database, problem, round(observed::numeric, 3) AS observed, threshold
  FROM tenant_scale.problem_companies ORDER BY company_id, problem;
-- Every statement takes longer than 0 ms (the unit may be given: '0.5s' is 500).
SET tenant_scale.problem_p95_ms = 0;
SELECT company_id, problem, threshold FROM tenant_scale.problem_companies ORDER BY company_id, problem;
RESET tenant_scale.problem_p95_ms;
RESET tenant_scale.problem_min_calls;

-- tenant_scale.track: top (the default) counts the statements clients send; all also counts
-- statements run inside functions; none counts nothing.
CREATE FUNCTION order_count() RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE n bigint;
BEGIN
    SELECT count(*) INTO n FROM orders;
    RETURN n;
END $$;
SET tenant_scale.company = 'initech';
SELECT order_count();
SET tenant_scale.track = 'all';
SELECT order_count();
SET tenant_scale.track = 'none';
SELECT order_count();
RESET tenant_scale.track;
RESET tenant_scale.company;
SELECT company_id, calls FROM tenant_scale.company_stats WHERE company_id = 'initech';

-- Bad values are refused with the reason.
SET tenant_scale.company = 'a-company-id-that-is-longer-than-the-sixty-three-bytes-an-id-may-have';
SET tenant_scale.track = 'sometimes';
SET tenant_scale.problem_error_rate = 2;
SET tenant_scale.max_companies = 100;

-- History: snapshot_stats() writes one row per company with activity since the last committed
-- snapshot, and returns the rows it wrote.
SELECT database, company_id, calls, errors, rows, p95_ms > 0 AS has_p95
  FROM tenant_scale.snapshot_stats() ORDER BY company_id;
SELECT count(*) AS nothing_new FROM tenant_scale.snapshot_stats();
-- A snapshot that rolls back leaves its interval for the next one.
SET tenant_scale.company = 'acme';
SELECT 'one more' AS acme;
RESET tenant_scale.company;
BEGIN;
SELECT company_id, calls FROM tenant_scale.snapshot_stats();
ROLLBACK;
SELECT company_id, calls FROM tenant_scale.snapshot_stats();
-- Roll-ups per hour, day and week (p95_ms: the highest interval p95 of the period).
SELECT company_id, calls, errors, rows, p95_ms > 0 AS has_p95
  FROM tenant_scale.stats_hourly ORDER BY company_id;
SELECT company_id, sum(calls) AS calls FROM tenant_scale.stats_daily GROUP BY company_id ORDER BY company_id;
SELECT company_id, sum(calls) AS calls FROM tenant_scale.stats_weekly GROUP BY company_id ORDER BY company_id;
-- pg_dump keeps the history.
SELECT 'tenant_scale.stats_history'::regclass::oid = ANY (extconfig) AS history_dumped
  FROM pg_extension WHERE extname = 'tenant_scale';

-- Resetting one company zeroes it in every database; it stays known (first_seen).
SELECT tenant_scale.stats_reset('globex');
SELECT company_id, calls, rows, p95_ms, stats_since > first_seen AS restarted
  FROM tenant_scale.company_stats WHERE company_id = 'globex';
SELECT tenant_scale.stats_reset('');
SELECT tenant_scale.stats_reset(repeat('x', 64));

-- Privileges: one company's application role reads nothing; members of pg_monitor or
-- pg_read_all_stats read everything; resetting needs the owner or a grant.
CREATE ROLE app_acme;
CREATE ROLE dashboards IN ROLE pg_monitor;
GRANT USAGE ON SCHEMA tenant_scale TO app_acme;
SET ROLE app_acme;
SELECT count(*) FROM tenant_scale.company_stats;
SELECT count(*) FROM tenant_scale.company_stats_raw();
SELECT count(*) FROM tenant_scale.stats_history;
SELECT tenant_scale.stats_reset('acme');
SELECT count(*) FROM tenant_scale.snapshot_stats();
RESET ROLE;
SET ROLE dashboards;
SELECT count(*) AS companies FROM tenant_scale.company_stats;
SELECT count(*) > 0 AS history_readable FROM tenant_scale.stats_hourly;
SELECT tracked FROM tenant_scale.stats_info();
SELECT tenant_scale.stats_reset('acme');
RESET ROLE;
GRANT EXECUTE ON FUNCTION tenant_scale.stats_reset(text) TO dashboards;
SET ROLE dashboards;
SELECT tenant_scale.stats_reset('acme');
RESET ROLE;
DROP OWNED BY app_acme, dashboards;
DROP ROLE app_acme, dashboards;
DROP FUNCTION order_count();
DROP TABLE orders;

-- A statement counts for the company named when it started, even when it changes the setting as
-- it runs: the first set_config below counts for hooli, the SELECT after it for piedpiper, and the
-- error of the last statement for piedpiper too. With tenant_scale.track = all, a function's SET
-- clause attributes the statements inside it, while the call itself still counts for the caller's
-- company.
CREATE FUNCTION count_as_endframe() RETURNS bigint LANGUAGE plpgsql
SET tenant_scale.company = 'endframe' AS $$
DECLARE n bigint;
BEGIN
    SELECT count(*) INTO n FROM pg_class WHERE false;
    RETURN n;
END $$;
SET tenant_scale.company = 'hooli';
SELECT set_config('tenant_scale.company', 'piedpiper', false);
SELECT 1;
SET tenant_scale.track = 'all';
SELECT count_as_endframe();
RESET tenant_scale.track;
SELECT set_config('tenant_scale.company', 'hooli', false), 1 / count(*) FROM pg_class WHERE false;
RESET tenant_scale.company;
SELECT company_id, calls, errors FROM tenant_scale.company_stats
 WHERE company_id IN ('hooli', 'piedpiper', 'endframe') ORDER BY company_id;
DROP FUNCTION count_as_endframe();
