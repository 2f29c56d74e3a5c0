-- Per-plan row quotas: each company may keep at most as many rows of a resource as its plan allows.
-- Plans come built in; a higher rank is an upgrade.
SELECT plan, rank FROM tenant_scale.plans ORDER BY rank;

-- Limits per plan and resource. NULL means unlimited.
SELECT tenant_scale.set_plan_limit('free', 'patients', 3);
SELECT tenant_scale.set_plan_limit('basic', 'patients', 5);
SELECT tenant_scale.set_plan_limit('professional', 'patients', 100);
SELECT tenant_scale.set_plan_limit('enterprise', 'patients', NULL);
SELECT plan, resource, max_rows FROM tenant_scale.plan_limits ORDER BY max_rows NULLS LAST;

-- Bad arguments are refused with SQLSTATE 22023, naming the argument.
SELECT tenant_scale.set_plan_limit('gold', 'patients', 5);
\echo :LAST_ERROR_SQLSTATE
SELECT tenant_scale.set_plan_limit('free', 'patients', -1);
SELECT tenant_scale.set_plan_limit('free', '', 5);
SELECT tenant_scale.set_company_plan('', 'basic');
SELECT tenant_scale.set_company_plan('acme', NULL);

-- Any table with a company column can be put under a quota; it needs an index that starts with that
-- column, so that a company's rows can be counted without reading the whole table.
CREATE TABLE patients (id bigserial PRIMARY KEY, company_id integer, name text NOT NULL);
INSERT INTO patients (company_id, name) VALUES (1, 'Ada');
SELECT tenant_scale.enforce_quota('patients', 'patients', 'company_id');
\echo :LAST_ERROR_SQLSTATE
CREATE INDEX ON patients (company_id);
SELECT tenant_scale.enforce_quota('patients', 'patients', 'company_id');
SELECT relation, resource, company_column FROM tenant_scale.quotas;
SELECT tenant_scale.enforce_quota('patients', 'patients', 'company_id');
SELECT tenant_scale.enforce_quota('pg_class', 'classes', 'relname');
CREATE TABLE exams (id bigserial PRIMARY KEY, company text);
SELECT tenant_scale.enforce_quota('exams', 'exams', 'company_id');
SELECT tenant_scale.enforce_quota('exams', '', 'company');

-- The rows already there are the starting usage. Company 1 is not in tenant_scale.companies, so it
-- is on tenant_scale.default_plan (free). The status names the cheapest upgrade that allows more.
SHOW tenant_scale.default_plan;
SELECT * FROM tenant_scale.quota_status('1');

INSERT INTO patients (company_id, name) VALUES (1, 'Grace'), (1, 'Barbara');
SELECT tenant_scale.quota_check('1', 'patients');

-- The row over the limit is refused with SQLSTATE 53400; DETAIL has the numbers, HINT the way out.
INSERT INTO patients (company_id, name) VALUES (1, 'Frances');
\echo :LAST_ERROR_SQLSTATE
SELECT count(*) FROM patients WHERE company_id = 1;

-- A statement that would go over inserts nothing.
SELECT tenant_scale.quota_check('2', 'patients', 4);
INSERT INTO patients (company_id, name) SELECT 2, 'patient ' || i FROM generate_series(1, 4) AS i;
SELECT count(*) FROM patients WHERE company_id = 2;

-- An upgrade applies to the very next row.
SELECT tenant_scale.set_company_plan('1', 'basic');
INSERT INTO patients (company_id, name) VALUES (1, 'Frances'), (1, 'Hedy');
SELECT resource, used, max_rows, remaining, percent_used, plan, upgrade_plan FROM tenant_scale.quota_status('1');
INSERT INTO patients (company_id, name) VALUES (1, 'Katherine');

-- A downgrade below the current usage blocks new rows and deletes nothing.
SELECT tenant_scale.set_company_plan('1', 'free');
SELECT used, max_rows, remaining, percent_used FROM tenant_scale.quota_status('1');
INSERT INTO patients (company_id, name) VALUES (1, 'Margaret');
DELETE FROM patients WHERE company_id = 1 AND name IN ('Hedy', 'Frances', 'Barbara');
INSERT INTO patients (company_id, name) VALUES (1, 'Margaret');
SELECT used, remaining FROM tenant_scale.quota_status('1');

-- The top plan has no upgrade: the HINT says to delete rows instead.
SELECT tenant_scale.set_plan_limit('enterprise', 'patients', 3);
SELECT tenant_scale.set_company_plan('1', 'enterprise');
INSERT INTO patients (company_id, name) VALUES (1, 'Mary');
SELECT tenant_scale.set_plan_limit('enterprise', 'patients', NULL);
SELECT resource, used, max_rows, remaining, percent_used, upgrade_plan FROM tenant_scale.quota_status('1');

-- Rows without a company belong to nobody: not counted, not limited.
INSERT INTO patients (company_id, name) SELECT NULL, 'anonymous' FROM generate_series(1, 5);

-- quota_check validates its arguments too.
SELECT tenant_scale.quota_check('1', 'invoices');
SELECT tenant_scale.quota_check('1', 'patients', -1);
SELECT * FROM tenant_scale.quota_status(NULL);

-- drop_quota removes the triggers and counters; the rows stay.
SELECT tenant_scale.drop_quota('exams');
SELECT tenant_scale.drop_quota('patients');
SELECT count(*) FROM patients;
SELECT count(*) FROM tenant_scale.quotas;
SELECT tgname FROM pg_trigger WHERE tgrelid = 'patients'::regclass ORDER BY tgname;
DROP TABLE patients, exams;
