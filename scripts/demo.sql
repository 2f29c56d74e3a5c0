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
