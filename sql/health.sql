-- health(): one place for monitoring to ask "is tenant_scale and its database fine?" (src/health.rs).
--
-- Extension point. health() owns no check itself: it returns the rows of every function that
--   * is named tenant_scale.health_<topic>() and takes no arguments,
--   * returns TABLE("check" text, ok boolean, detail text),
--   * belongs to the tenant_scale extension (created by its script, so no other role can add one),
-- in the order of their names. A capability adds its checks by defining such a function in its own
-- sql/ file, with EXECUTE granted to pg_monitor and revoked from PUBLIC, exactly like
-- health_database() below; nothing here changes. Each provider runs as the caller (a pg_monitor
-- member): one that needs to read more than pg_monitor may must be SECURITY DEFINER with
-- search_path = pg_catalog, pg_temp and expose only what the check reports.
-- A provider that raises an error does not hide the others: it yields one row (topic, false, the
-- error) instead.
--
-- Privileges: health() tells which checks fail and why (table names, replication peers), so it is for
-- pg_monitor members (and superusers), not PUBLIC. pg_monitor gets USAGE on the schema for that; other
-- roles get it only when a DBA grants it (applications calling keyset_page or replica_status need it).
GRANT USAGE ON SCHEMA tenant_scale TO pg_monitor;

CREATE FUNCTION tenant_scale.health()
RETURNS TABLE ("check" text, ok boolean, detail text)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    provider record;
BEGIN
    FOR provider IN
        SELECT p.oid::regprocedure AS function, substr(p.proname, length('health_') + 1) AS topic
        FROM pg_proc p
        JOIN pg_depend d ON d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e'
                        AND d.refclassid = 'pg_extension'::regclass
        JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'tenant_scale'
        WHERE p.pronamespace = 'tenant_scale'::regnamespace
          AND p.proname LIKE 'health\_%'
          AND p.pronargs = 0
          AND p.proretset
        ORDER BY p.proname
    LOOP
        BEGIN
            RETURN QUERY EXECUTE format('SELECT "check", ok, detail FROM %s', provider.function);
        EXCEPTION WHEN OTHERS THEN
            RETURN QUERY SELECT provider.topic, false,
                format('%s failed: %s (SQLSTATE %s)', provider.function, SQLERRM, SQLSTATE);
        END;
    END LOOP;
END
$$;
REVOKE ALL ON FUNCTION tenant_scale.health() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION tenant_scale.health() TO pg_monitor;
COMMENT ON FUNCTION tenant_scale.health() IS
    'Rows (check, ok, detail) from every tenant_scale.health_<topic>() check of the extension.';

-- The database answers (this runs at all), and whether it accepts writes.
CREATE FUNCTION tenant_scale.health_database()
RETURNS TABLE ("check" text, ok boolean, detail text)
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT 'database', true,
           format('connected to %s as %s; %s; up since %s',
                  quote_ident(current_database()), quote_ident(current_user),
                  CASE
                      WHEN pg_is_in_recovery() THEN 'read-only: standby in recovery'
                      WHEN current_setting('default_transaction_read_only')::boolean
                          THEN 'read-only: default_transaction_read_only is on'
                      ELSE 'read-write'
                  END,
                  date_trunc('second', pg_postmaster_start_time()))
$$;
REVOKE ALL ON FUNCTION tenant_scale.health_database() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION tenant_scale.health_database() TO pg_monitor;
