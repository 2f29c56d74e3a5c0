//! `tenant_scale.health()`: the union of every capability's checks.
//!
//! Pure SQL (sql/health.sql): health() discovers the extension's `health_<topic>()` functions, so each
//! capability contributes its rows from its own SQL file and module without editing this one. The
//! contract a check function must meet is documented at the top of sql/health.sql. This module owns
//! the `database` check; `replication` lives with the replica module (sql/replica.sql).

pgrx::extension_sql_file!("../sql/health.sql", name = "health");
