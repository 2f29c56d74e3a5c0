-- tenant_scale walk-through. Replayable: it starts from a fresh extension each time.
\set QUIET on
\pset footer off
SET client_min_messages = warning;
DROP SCHEMA IF EXISTS demo CASCADE;
DROP EXTENSION IF EXISTS tenant_scale CASCADE;
RESET client_min_messages;
CREATE EXTENSION tenant_scale;
CREATE SCHEMA demo;

-- The library is preloaded, so the shared-memory features are available.
SHOW shared_preload_libraries;
SELECT tenant_scale.version();

-- Row quotas: a company on the free plan reaches its limit, upgrades, and carries on.
CREATE TABLE demo.patients (id bigserial PRIMARY KEY, company_id text NOT NULL, name text NOT NULL);
CREATE INDEX ON demo.patients (company_id);
SELECT tenant_scale.set_plan_limit('free', 'patients', 3);
SELECT tenant_scale.set_plan_limit('basic', 'patients', 10);
SELECT tenant_scale.enforce_quota('demo.patients', 'patients', 'company_id');
INSERT INTO demo.patients (company_id, name) VALUES ('acme', 'Ada'), ('acme', 'Grace'), ('acme', 'Barbara');
\set ON_ERROR_STOP 0
INSERT INTO demo.patients (company_id, name) VALUES ('acme', 'Frances');
\set ON_ERROR_STOP 1
SELECT * FROM tenant_scale.quota_status('acme');
SELECT tenant_scale.set_company_plan('acme', 'basic');
INSERT INTO demo.patients (company_id, name) VALUES ('acme', 'Frances');
SELECT resource, used, max_rows, remaining, plan, upgrade_plan FROM tenant_scale.quota_status('acme');

-- Keyset pagination: pages of a 100,000-row table, each a seek through an index (no OFFSET).
SET client_min_messages = warning;
DROP TABLE IF EXISTS demo_orders;
RESET client_min_messages;
CREATE TABLE demo_orders (id int PRIMARY KEY, company_id int NOT NULL, placed_at timestamptz NOT NULL, total numeric(10, 2));
INSERT INTO demo_orders
SELECT g, g % 50 + 1, timestamptz '2024-01-01' + (g / 2) * interval '1 minute', (g % 997) / 10.0
FROM generate_series(1, 100000) g;
CREATE INDEX demo_orders_company_placed ON demo_orders (company_id, placed_at DESC, id);
ANALYZE demo_orders;
-- The newest orders of company 7, three per page:
SELECT jsonb_pretty(tenant_scale.keyset_page('demo_orders', ARRAY['placed_at desc'], 3, filter => '{"company_id": 7}'))
       AS first_page;
-- Follow its next_cursor to the second page:
SELECT tenant_scale.keyset_page('demo_orders', ARRAY['placed_at desc'], 3, filter => '{"company_id": 7}')
       ->> 'next_cursor' AS next_cursor \gset
SELECT jsonb_path_query_array(page, '$.data[*].id') AS second_page_ids, page->'has_prev' AS has_prev,
       page->'has_next' AS has_next
FROM tenant_scale.keyset_page('demo_orders', ARRAY['placed_at desc'], 3, :'next_cursor', '{"company_id": 7}') AS page;
-- Every statement it runs is an index scan:
SELECT * FROM tenant_scale.keyset_page_explain('demo_orders', ARRAY['placed_at desc'], 3, :'next_cursor',
                                               '{"company_id": 7}');
-- A cursor is only good for its own listing:
\set ON_ERROR_STOP off
SELECT tenant_scale.keyset_page('demo_orders', ARRAY['placed_at'], 3, :'next_cursor');
\set ON_ERROR_STOP on

-- Replication: this demo server is a primary without standbys.
SELECT * FROM tenant_scale.replica_status();
SELECT * FROM tenant_scale.replica_lag;
SELECT * FROM tenant_scale.health();

-- Per-company query statistics ------------------------------------------------------------------
-- Three companies run a short workload: acme is healthy, slowco is slow, failco fails now and then.
-- Each statement is counted for the company tenant_scale.company names when it starts.
SELECT tenant_scale.stats_reset() >= 0 AS statistics_reset;
DROP TABLE IF EXISTS demo_company_orders;
CREATE TABLE demo_company_orders (id bigserial PRIMARY KEY, company text NOT NULL, amount numeric NOT NULL);
-- The workload's statements are generated with \gexec; neither they nor their results are echoed.
\set ECHO none
\o /dev/null
SET tenant_scale.company = 'acme';
SELECT format('INSERT INTO demo_company_orders (company, amount) VALUES (''acme'', %s)', i) FROM generate_series(1, 30) AS i \gexec
SELECT 'SELECT count(*), sum(amount) FROM demo_company_orders WHERE company = ''acme''' FROM generate_series(1, 30) \gexec
SET tenant_scale.company = 'slowco';
SELECT 'SELECT pg_sleep(0.02)' FROM generate_series(1, 25) \gexec
SET tenant_scale.company = 'failco';
SELECT 'SELECT count(*) FROM demo_company_orders' FROM generate_series(1, 20) \gexec
-- Three statements that fail (their errors are printed below): an error rate well above 5 %.
\set ON_ERROR_STOP 0
SELECT 'INSERT INTO demo_company_orders (id, company, amount) VALUES (1, ''failco'', 0)' FROM generate_series(1, 3) \gexec
\set ON_ERROR_STOP 1
RESET tenant_scale.company;
\o
\set ECHO queries
SELECT company_id, calls, errors, round(error_rate::numeric, 3) AS error_rate, rows,
       round(p50_ms::numeric, 2) AS p50_ms, round(p95_ms::numeric, 2) AS p95_ms,
       round(p99_ms::numeric, 2) AS p99_ms, calls_last_minute
  FROM tenant_scale.company_stats ORDER BY company_id;
-- Problems use tenant_scale.problem_error_rate (5 %) and tenant_scale.problem_p95_ms (500 ms by
-- default; 10 ms for this demo), once a company ran tenant_scale.problem_min_calls (20) statements.
SET tenant_scale.problem_p95_ms = '10ms';
SELECT company_id, problem, round(observed::numeric, 3) AS observed, threshold
  FROM tenant_scale.problem_companies ORDER BY company_id, problem;
RESET tenant_scale.problem_p95_ms;
-- History: the background worker snapshots every tenant_scale.snapshot_interval seconds; here by hand.
SELECT company_id, calls, errors, round(p95_ms::numeric, 2) AS p95_ms
  FROM tenant_scale.snapshot_stats() ORDER BY company_id;
SELECT max_companies, tracked, evicted, pg_size_pretty(shared_memory_bytes) AS shared_memory
  FROM tenant_scale.stats_info();
