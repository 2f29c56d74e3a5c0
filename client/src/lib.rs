//! # tenant-scale-client
//!
//! The application side of the tenant_scale PostgreSQL extension. Where the extension keeps quotas and
//! per-company statistics inside the database, this crate gives a Rust service the pieces around it:
//!
//! - [`pool`]: connections to the primary and read replicas, each attributed to a company.
//!
//! Configuration is a plain struct that can be filled from the environment; every error names the
//! setting or node that caused it.

pub mod pool;
