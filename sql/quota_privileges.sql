-- Runs once the quota functions written in Rust exist.

-- Every backend drops its cached configuration when these tables change (see src/quota/config.rs).
CREATE TRIGGER quota_config_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON tenant_scale.plans
    FOR EACH STATEMENT EXECUTE FUNCTION tenant_scale.quota_config_changed();
CREATE TRIGGER quota_config_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON tenant_scale.plan_limits
    FOR EACH STATEMENT EXECUTE FUNCTION tenant_scale.quota_config_changed();
CREATE TRIGGER quota_config_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON tenant_scale.companies
    FOR EACH STATEMENT EXECUTE FUNCTION tenant_scale.quota_config_changed();
CREATE TRIGGER quota_config_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON tenant_scale.quotas
    FOR EACH STATEMENT EXECUTE FUNCTION tenant_scale.quota_config_changed();

-- Applications may insert and ask (quota_status, quota_check); only the extension owner, and roles
-- it grants EXECUTE to, manage quotas.
REVOKE EXECUTE ON FUNCTION tenant_scale.enforce_quota(regclass, text, name) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION tenant_scale.drop_quota(regclass) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION tenant_scale.reconcile(regclass) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION tenant_scale.quota_trigger() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION tenant_scale.quota_config_changed() FROM PUBLIC;

-- The `quotas` row of tenant_scale.health() (sql/health.sql): for monitoring roles.
REVOKE ALL ON FUNCTION tenant_scale.health_quotas() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION tenant_scale.health_quotas() TO pg_monitor;
