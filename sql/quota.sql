-- Per-plan row quotas: configuration tables, their dump registration, and the plpgsql half of the API.
-- The enforcement itself (trigger, counters, status) is Rust: see src/quota/mod.rs for the design.

-- Plans ordered by rank: an upgrade is a plan of higher rank.
CREATE TABLE tenant_scale.plans (
    plan text PRIMARY KEY CHECK (plan <> ''),
    rank integer NOT NULL UNIQUE
);
COMMENT ON TABLE tenant_scale.plans IS
    'Subscription plans; a higher rank is an upgrade. Built in: free 1, basic 2, professional 3, enterprise 4.';
INSERT INTO tenant_scale.plans (plan, rank)
VALUES ('free', 1), ('basic', 2), ('professional', 3), ('enterprise', 4);

-- How many rows of each resource a plan allows. NULL max_rows, or no row at all, is unlimited.
CREATE TABLE tenant_scale.plan_limits (
    plan text NOT NULL REFERENCES tenant_scale.plans ON UPDATE CASCADE ON DELETE CASCADE,
    resource text NOT NULL CHECK (resource <> ''),
    max_rows bigint CHECK (max_rows >= 0),
    PRIMARY KEY (plan, resource)
);
COMMENT ON TABLE tenant_scale.plan_limits IS
    'Row limit per plan and resource; NULL max_rows (or no row) means unlimited. Change with set_plan_limit().';

-- The plan of each company; a company missing here is on tenant_scale.default_plan.
CREATE TABLE tenant_scale.companies (
    company_id text PRIMARY KEY CHECK (company_id <> ''),
    plan text NOT NULL REFERENCES tenant_scale.plans ON UPDATE CASCADE
);
COMMENT ON TABLE tenant_scale.companies IS
    'Plan of each company; companies not listed are on the plan named by tenant_scale.default_plan.';

-- Tables under quota. quota_id never repeats (a sequence), so counters kept for a dropped or
-- re-enforced table can never be mistaken for the new one's.
CREATE SEQUENCE tenant_scale.quota_id_seq;
CREATE TABLE tenant_scale.quotas (
    relation regclass PRIMARY KEY,
    resource text NOT NULL UNIQUE CHECK (resource <> ''),
    company_column name NOT NULL,
    quota_id bigint NOT NULL UNIQUE DEFAULT nextval('tenant_scale.quota_id_seq')
);
ALTER SEQUENCE tenant_scale.quota_id_seq OWNED BY tenant_scale.quotas.quota_id;
COMMENT ON TABLE tenant_scale.quotas IS
    'Tables whose rows count against plan limits. Managed by enforce_quota() and drop_quota().';

-- Counters of the mode without shared memory (library not preloaded): one row per table and company,
-- locked by the writers of that company until they commit. built_at records the server start the
-- count belongs to; a row from an earlier server life is recounted before use. Derived data, so
-- unlogged and not dumped.
CREATE UNLOGGED TABLE tenant_scale.quota_usage (
    quota_id bigint NOT NULL,
    company_id text NOT NULL,
    used bigint NOT NULL,
    built_at timestamptz NOT NULL,
    PRIMARY KEY (quota_id, company_id)
);

-- pg_dump keeps the configuration. The built-in plans are recreated by CREATE EXTENSION, so only
-- plans added or changed are dumped (a built-in plan whose rank was changed is dumped too, and then
-- conflicts with the recreated one on restore: change limits, not the ranks of built-in plans).
SELECT pg_catalog.pg_extension_config_dump('tenant_scale.plans',
    $$WHERE (plan, rank) NOT IN (('free', 1), ('basic', 2), ('professional', 3), ('enterprise', 4))$$);
SELECT pg_catalog.pg_extension_config_dump('tenant_scale.plan_limits', '');
SELECT pg_catalog.pg_extension_config_dump('tenant_scale.companies', '');
SELECT pg_catalog.pg_extension_config_dump('tenant_scale.quotas', '');
SELECT pg_catalog.pg_extension_config_dump('tenant_scale.quota_id_seq', '');

-- Plans and their limits are the public price list; which company is on which plan, and which
-- tables are enforced, are not.
GRANT USAGE ON SCHEMA tenant_scale TO PUBLIC;
GRANT SELECT ON tenant_scale.plans, tenant_scale.plan_limits TO PUBLIC;

CREATE FUNCTION tenant_scale.set_plan_limit(plan text, resource text, max_rows bigint)
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF plan IS NULL OR plan = '' THEN
        RAISE EXCEPTION 'plan must not be empty' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF NOT EXISTS (SELECT FROM tenant_scale.plans p WHERE p.plan = set_plan_limit.plan) THEN
        RAISE EXCEPTION 'plan "%" does not exist', plan
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = format('Known plans: %s.', (SELECT string_agg(p.plan, ', ' ORDER BY p.rank) FROM tenant_scale.plans p));
    END IF;
    IF resource IS NULL OR resource = '' THEN
        RAISE EXCEPTION 'resource must not be empty' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF max_rows < 0 THEN
        RAISE EXCEPTION 'max_rows must not be negative'
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = format('max_rows is %s.', max_rows),
                  HINT = 'Use 0 to allow no rows, or NULL for no limit.';
    END IF;
    INSERT INTO tenant_scale.plan_limits AS l (plan, resource, max_rows)
    VALUES (set_plan_limit.plan, set_plan_limit.resource, set_plan_limit.max_rows)
    ON CONFLICT ON CONSTRAINT plan_limits_pkey DO UPDATE SET max_rows = EXCLUDED.max_rows;
END
$$;
COMMENT ON FUNCTION tenant_scale.set_plan_limit(text, text, bigint) IS
    'Sets how many rows of a resource a plan allows (NULL: unlimited). Applies to new rows at once.';

CREATE FUNCTION tenant_scale.set_company_plan(company_id text, plan text)
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF company_id IS NULL OR company_id = '' THEN
        RAISE EXCEPTION 'company_id must not be empty' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF plan IS NULL OR plan = '' THEN
        RAISE EXCEPTION 'plan must not be empty' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF NOT EXISTS (SELECT FROM tenant_scale.plans p WHERE p.plan = set_company_plan.plan) THEN
        RAISE EXCEPTION 'plan "%" does not exist', plan
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = format('Known plans: %s.', (SELECT string_agg(p.plan, ', ' ORDER BY p.rank) FROM tenant_scale.plans p));
    END IF;
    INSERT INTO tenant_scale.companies AS c (company_id, plan)
    VALUES (set_company_plan.company_id, set_company_plan.plan)
    ON CONFLICT ON CONSTRAINT companies_pkey DO UPDATE SET plan = EXCLUDED.plan;
END
$$;
COMMENT ON FUNCTION tenant_scale.set_company_plan(text, text) IS
    'Puts a company on a plan. A downgrade below current usage blocks new rows; nothing is deleted.';

REVOKE EXECUTE ON FUNCTION tenant_scale.set_plan_limit(text, text, bigint) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION tenant_scale.set_company_plan(text, text) FROM PUBLIC;

-- A dropped table takes its quota with it.
CREATE FUNCTION tenant_scale.forget_dropped_quotas()
RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    -- DROP EXTENSION drops the quotas table in the same command.
    IF to_regclass('tenant_scale.quotas') IS NULL THEN
        RETURN;
    END IF;
    DELETE FROM tenant_scale.quotas q
    USING pg_event_trigger_dropped_objects() d
    WHERE d.classid = 'pg_class'::regclass AND d.objsubid = 0 AND q.relation::oid = d.objid;
END
$$;
REVOKE EXECUTE ON FUNCTION tenant_scale.forget_dropped_quotas() FROM PUBLIC;
CREATE EVENT TRIGGER tenant_scale_forget_dropped_quotas ON sql_drop
    EXECUTE FUNCTION tenant_scale.forget_dropped_quotas();
