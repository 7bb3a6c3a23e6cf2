//! Prometheus metrics: owns the registry with every `pgrelay_*` family of docs/metrics.md, the typed
//! handles and RAII gauges the data path counts through, the scrape-time collection of pool
//! and backend state, and the HTTP endpoint (`/metrics`, `/healthz`, `/readyz`).
//!
//! Counting stays off the hot path in three ways:
//! - a session resolves its handles once, at login ([`Metrics::session`]); afterwards each
//!   count is a relaxed atomic add on a handle picked by enum index — no label look-up,
//!   formatting or allocation per message or per transaction;
//! - client states and pins are RAII guards ([`ClientStateGauge`], [`PinnedGauge`]) that
//!   undo their count when the session ends, however it ends;
//! - pool, server-connection and backend gauges are not maintained at all between scrapes:
//!   the application reports them through a [`StateSink`] when Prometheus asks.
//!
//! A leaf module: it knows nothing of pools, sessions or config. Callers map their own types
//! onto the label enums of [`labels`].

mod guards;
mod handles;
mod http;
pub mod labels;
mod registry;
mod scrape;
#[cfg(test)]
mod tests;

pub use guards::{ClientStateGauge, PinnedGauge};
pub use handles::SessionMetrics;
pub use http::{Health, serve};
pub use labels::{
    CancelResult, ClientState, LoginRefusal, NO_DATABASE, PinReason, ReloadOutcome, Role, RouteReason, TakeoverResult,
};
pub use registry::{LATENCY_BUCKETS, Metrics, MetricsError, NotifyMetrics};
pub use scrape::{PoolState, StateSink};
