-- Keyset pagination: configuration and the cursor secret (src/pagination).
--
-- keyset_page() runs as its caller (SECURITY INVOKER): what it returns is what the caller could
-- SELECT, row level security included. Its only privileged step is reading the two tables below,
-- which no other role may read or write.

-- Per-relation page size limits. A relation listed here uses its own max_page_size instead of the
-- tenant_scale.max_page_size setting (larger or smaller). Registered with pg_extension_config_dump, so
-- pg_dump keeps the rows (the regclass column dumps as the relation's name).
CREATE TABLE tenant_scale.page_limits (
    relation regclass PRIMARY KEY,
    max_page_size integer NOT NULL CHECK (max_page_size BETWEEN 1 AND 100000)
);
COMMENT ON TABLE tenant_scale.page_limits IS
    'Largest page_size keyset_page accepts per relation; others use tenant_scale.max_page_size.';
SELECT pg_catalog.pg_extension_config_dump('tenant_scale.page_limits', '');

-- The key that signs pagination cursors (HMAC-SHA256), one row. A client can read a cursor but cannot
-- make or alter one without this key, so it is readable by no role but its owner. Deliberately not
-- dumped: a restored database gets a fresh key, and cursors of the old one (which named relations
-- by OID anyway) are refused with SQLSTATE 22023 instead of paging somewhere else.
CREATE TABLE tenant_scale.cursor_secret (
    secret bytea NOT NULL CHECK (length(secret) >= 32)
);
CREATE UNIQUE INDEX cursor_secret_single_row ON tenant_scale.cursor_secret ((true));
REVOKE ALL ON tenant_scale.cursor_secret FROM PUBLIC;
COMMENT ON TABLE tenant_scale.cursor_secret IS
    'Key that signs keyset_page cursors. Replace it with rotate_cursor_secret() to invalidate every cursor.';

-- Replaces the key: every cursor handed out so far is refused from then on (clients start again
-- from the first page). 32 bytes from the server's strong random source (gen_random_uuid).
CREATE FUNCTION tenant_scale.rotate_cursor_secret() RETURNS void
LANGUAGE sql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
    DELETE FROM tenant_scale.cursor_secret;
    INSERT INTO tenant_scale.cursor_secret
    SELECT decode(replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', ''), 'hex');
$$;
REVOKE ALL ON FUNCTION tenant_scale.rotate_cursor_secret() FROM PUBLIC;
COMMENT ON FUNCTION tenant_scale.rotate_cursor_secret() IS
    'Replaces the cursor signing key; every keyset_page cursor handed out before is refused afterwards.';

-- Each backend caches both tables (src/pagination/settings.rs); a change makes them forget it.
CREATE TRIGGER page_limits_changed
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON tenant_scale.page_limits
    FOR EACH STATEMENT EXECUTE FUNCTION tenant_scale.pagination_settings_changed();
CREATE TRIGGER cursor_secret_changed
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON tenant_scale.cursor_secret
    FOR EACH STATEMENT EXECUTE FUNCTION tenant_scale.pagination_settings_changed();

SELECT tenant_scale.rotate_cursor_secret();

COMMENT ON FUNCTION tenant_scale.keyset_page(regclass, text[], integer, text, jsonb) IS
    'A page of the relation in order_by order, as jsonb {data, page_size, has_next, has_prev, next_cursor, prev_cursor}. Runs as the caller.';
COMMENT ON FUNCTION tenant_scale.keyset_page_explain(regclass, text[], integer, text, jsonb) IS
    'EXPLAIN (COSTS OFF) of each statement keyset_page runs for these arguments, in order.';
