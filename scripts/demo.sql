-- tenant_scale walk-through. Replayable: it starts from a fresh extension each time.
\set QUIET on
\pset footer off
SET client_min_messages = warning;
DROP EXTENSION IF EXISTS tenant_scale CASCADE;
RESET client_min_messages;
CREATE EXTENSION tenant_scale;

-- The library is preloaded, so the shared-memory features are available.
SHOW shared_preload_libraries;
SELECT tenant_scale.version();

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
