//! Real servers for tenant_scale's tests, benches and demo: PostgreSQL 15 clusters with the extension,
//! streaming standbys made with `pg_basebackup -R`, and Redis, each on a free loopback port in its own
//! directory.
//!
//! Invariants:
//! - Whatever a handle starts, dropping the handle stops, also while a failing test unwinds; a failing
//!   test also gets the tail of the server log on stderr.
//! - PostgreSQL refuses to run as root, so when the harness runs as root every server-side command
//!   (initdb, pg_ctl, pg_basebackup) runs as the `postgres` user through `runuser`, and the directories
//!   it creates are handed to that user. Clients (psql, pg_regress, Rust drivers) run as the caller.
//! - The extension is not built here: `cargo pgrx install` puts it into the PostgreSQL installation that
//!   `PG_CONFIG` names (scripts/test uses a private tree per checkout, see `install`), and the harness
//!   refuses to start a cluster that needs it when it is missing, rather than failing later.

mod cluster;
mod install;
mod os;
mod redis;

pub use cluster::{Cluster, ClusterBuilder, StopMode};
pub use install::private_install;
pub use os::{pg_bindir, pg_regress_path, process_alive};
pub use redis::Redis;
