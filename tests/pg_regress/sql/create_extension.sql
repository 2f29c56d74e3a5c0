-- tenant_scale lives in its own schema, created by CREATE EXTENSION.
CREATE EXTENSION tenant_scale;

SELECT extname, extversion = tenant_scale.version() AS library_matches_sql, nspname AS schema
FROM pg_extension JOIN pg_namespace ON pg_namespace.oid = extnamespace
WHERE extname = 'tenant_scale';

-- version() is the version of the loaded shared library.
SELECT tenant_scale.version() ~ '^\d+\.\d+\.\d+$' AS semver;

-- Settings under the tenant_scale. prefix are reserved: a misspelt name is an error, not a silent
-- placeholder.
SET tenant_scale.no_such_setting = 'on';
