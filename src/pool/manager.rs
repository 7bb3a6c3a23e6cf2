//! How the pool makes and checks server connections: the deadpool `Manager`.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use deadpool::managed::{Manager, Metrics, RecycleError, RecycleResult};

use super::PoolCounters;
use crate::upstream::{self, ConnectSpec, ServerConn, UpstreamError};

#[derive(Debug)]
pub struct ServerManager {
    pub(super) spec: Arc<ConnectSpec>,
    pub(super) counters: Arc<PoolCounters>,
    /// Connections older than this are closed instead of reused.
    pub(super) lifetime: Option<Duration>,
    pub(super) observers: super::PoolObservers,
}

impl Manager for ServerManager {
    /// Boxed so a checkout (and a session holding one) is a pointer, not the whole
    /// connection state.
    type Type = Box<ServerConn>;
    type Error = UpstreamError;

    async fn create(&self) -> Result<Box<ServerConn>, UpstreamError> {
        self.counters.logins.fetch_add(1, Ordering::Relaxed);
        // Decremented even if the connect future is dropped by a timeout.
        let _login = scopeguard(|| {
            self.counters.logins.fetch_sub(1, Ordering::Relaxed);
        });
        let result = upstream::connect(&self.spec).await.map(Box::new);
        match result {
            Ok(mut conn) => {
                conn.pool_generation = self.counters.generation.load(Ordering::Acquire);
                self.counters.remember_server_params(conn.reported_params());
                if let Some((registry, database)) = &self.observers.registry {
                    conn.registration = Some(registry.add_server(
                        self.spec.addr.clone(),
                        database,
                        &self.spec.credentials.user,
                        conn.key().process_id,
                    ));
                }
                Ok(conn)
            }
            Err(error) => {
                self.counters.connect_errors.fetch_add(1, Ordering::Relaxed);
                if let Some(counter) = &self.observers.connect_errors {
                    counter.inc();
                }
                Err(error)
            }
        }
    }

    async fn recycle(&self, conn: &mut Box<ServerConn>, metrics: &Metrics) -> RecycleResult<UpstreamError> {
        if self.lifetime.is_some_and(|lifetime| metrics.age() >= lifetime) {
            return Err(RecycleError::message("server_lifetime reached"));
        }
        if conn.pool_generation != self.counters.generation.load(Ordering::Acquire) {
            return Err(RecycleError::message("retired: the server changed its part"));
        }
        if !conn.is_reusable() || !conn.probe_alive() {
            return Err(RecycleError::message("connection closed or not idle"));
        }
        Ok(())
    }
}

/// Runs a closure when dropped.
pub(super) fn scopeguard<F: FnOnce()>(on_drop: F) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(on_drop) = self.0.take() {
                on_drop();
            }
        }
    }
    Guard(Some(on_drop))
}
