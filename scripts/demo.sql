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
