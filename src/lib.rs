//! pgrelay: a PostgreSQL connection pooler and read/write-splitting proxy.

pub mod access;
pub mod admin;
pub mod app;
pub mod auth;
pub mod cancel;
pub mod cluster;
pub mod config;
pub mod control;
pub mod demo;
pub mod error;
pub mod localpg;
pub mod memory;
pub mod metrics;
pub mod net;
pub mod notify;
pub mod pool;
pub mod protocol;
pub mod registry;
pub mod reload;
pub mod route;
pub mod router;
pub mod runtime;
pub mod session;
pub mod takeover;
pub mod upstream;
pub mod watchdog;
