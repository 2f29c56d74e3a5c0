//! Connections to the primary and its read replicas, attributed to the company they serve.

mod config;

pub use config::{ConfigError, PoolConfig};
