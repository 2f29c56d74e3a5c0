//! # tenant-scale-client
//!
//! The application side of the tenant_scale PostgreSQL extension. Where the extension keeps quotas and
//! per-company statistics inside the database, this crate gives a Rust service the pieces around it:
//!
//! - [`pool`]: connections to the primary and read replicas, each attributed to a company.
//! - [`cache`]: company-scoped values in Redis, with an in-memory fallback when Redis is unavailable.
//! - [`ratelimit`]: per-company, plan-tiered rate limits with the standard response headers.
//! - [`pagination`]: typed pages from the extension's keyset pagination.
//!
//! Configuration is a plain struct that can be filled from the environment; every error names the
//! setting or node that caused it.

pub mod cache;
mod lock;
pub mod pagination;
pub mod pool;
pub mod ratelimit;
mod redis_link;

pub use redis_link::{InvalidRedisUrl, RedisConfig, RedisHealth};
