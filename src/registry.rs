//! Who is connected right now, client sessions and server connections, as the admin
//! console lists them. Entries are added at login or connect and removed by dropping
//! their registration; state changes are single atomic stores.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::time::SystemTime;

use dashmap::DashMap;
use tokio::sync::Notify;

/// What a client or server connection is doing, as SHOW CLIENTS / SHOW SERVERS say it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    Idle = 0,
    Waiting = 1,
    Active = 2,
}

impl LinkState {
    fn from_u8(value: u8) -> Self {
        match value {
            1 => LinkState::Waiting,
            2 => LinkState::Active,
            _ => LinkState::Idle,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            LinkState::Idle => "idle",
            LinkState::Waiting => "waiting",
            LinkState::Active => "active",
        }
    }
}

#[derive(Debug, Default)]
pub struct Registry {
    next_id: AtomicU64,
    clients: DashMap<u64, Arc<ClientEntry>>,
    servers: DashMap<u64, Arc<ServerEntry>>,
}

#[derive(Debug)]
pub struct ClientEntry {
    pub id: u64,
    pub addr: SocketAddr,
    pub database: String,
    pub user: String,
    pub application_name: String,
    pub connected_at: SystemTime,
    state: AtomicU8,
    /// Set by KILL: the session ends at its next chance.
    killed: AtomicBool,
    kill: Notify,
}

impl ClientEntry {
    pub fn state(&self) -> LinkState {
        LinkState::from_u8(self.state.load(Ordering::Relaxed))
    }

    pub fn set_state(&self, state: LinkState) {
        self.state.store(state as u8, Ordering::Relaxed);
    }

    /// Asks the session to end now, whatever it is doing.
    pub fn kill(&self) {
        self.killed.store(true, Ordering::Release);
        self.kill.notify_one();
    }

    /// Resolves once the session was killed.
    pub async fn killed(&self) {
        while !self.killed.load(Ordering::Acquire) {
            self.kill.notified().await;
        }
    }
}

#[derive(Debug)]
pub struct ServerEntry {
    pub id: u64,
    pub addr: Arc<str>,
    pub database: String,
    pub user: String,
    pub backend_pid: u32,
    pub connected_at: SystemTime,
    state: AtomicU8,
}

impl ServerEntry {
    pub fn state(&self) -> LinkState {
        LinkState::from_u8(self.state.load(Ordering::Relaxed))
    }

    pub fn set_state(&self, state: LinkState) {
        self.state.store(state as u8, Ordering::Relaxed);
    }
}

impl Registry {
    pub fn add_client(
        self: &Arc<Self>,
        addr: SocketAddr,
        database: &str,
        user: &str,
        application_name: &str,
    ) -> ClientRegistration {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let entry = Arc::new(ClientEntry {
            id,
            addr,
            database: database.to_owned(),
            user: user.to_owned(),
            application_name: application_name.to_owned(),
            connected_at: SystemTime::now(),
            state: AtomicU8::new(LinkState::Idle as u8),
            killed: AtomicBool::new(false),
            kill: Notify::new(),
        });
        self.clients.insert(id, entry.clone());
        ClientRegistration {
            registry: self.clone(),
            entry,
        }
    }

    pub fn add_server(
        self: &Arc<Self>,
        addr: Arc<str>,
        database: &str,
        user: &str,
        backend_pid: u32,
    ) -> ServerRegistration {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let entry = Arc::new(ServerEntry {
            id,
            addr,
            database: database.to_owned(),
            user: user.to_owned(),
            backend_pid,
            connected_at: SystemTime::now(),
            state: AtomicU8::new(LinkState::Idle as u8),
        });
        self.servers.insert(id, entry.clone());
        ServerRegistration {
            registry: self.clone(),
            entry,
        }
    }

    /// Every client, oldest first.
    /// Frees the room the maps kept for connections that are gone.
    pub fn shrink(&self) {
        self.clients.shrink_to_fit();
        self.servers.shrink_to_fit();
    }

    pub fn clients(&self) -> Vec<Arc<ClientEntry>> {
        let mut all: Vec<_> = self.clients.iter().map(|entry| entry.value().clone()).collect();
        all.sort_by_key(|client| client.id);
        all
    }

    /// How many clients and server connections there are, without copying the lists.
    pub fn counts(&self) -> (usize, usize) {
        (self.clients.len(), self.servers.len())
    }

    /// Every server connection, oldest first.
    pub fn servers(&self) -> Vec<Arc<ServerEntry>> {
        let mut all: Vec<_> = self.servers.iter().map(|entry| entry.value().clone()).collect();
        all.sort_by_key(|server| server.id);
        all
    }
}

/// A client in the registry for as long as this lives.
#[derive(Debug)]
pub struct ClientRegistration {
    registry: Arc<Registry>,
    entry: Arc<ClientEntry>,
}

impl ClientRegistration {
    pub fn entry(&self) -> &Arc<ClientEntry> {
        &self.entry
    }
}

impl Drop for ClientRegistration {
    fn drop(&mut self) {
        self.registry.clients.remove(&self.entry.id);
    }
}

/// A server connection in the registry for as long as this lives.
#[derive(Debug)]
pub struct ServerRegistration {
    registry: Arc<Registry>,
    entry: Arc<ServerEntry>,
}

impl ServerRegistration {
    pub fn entry(&self) -> &Arc<ServerEntry> {
        &self.entry
    }
}

impl Drop for ServerRegistration {
    fn drop(&mut self) {
        self.registry.servers.remove(&self.entry.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn entries_live_as_long_as_their_registration() {
        let registry = Arc::new(Registry::default());
        let client = registry.add_client("127.0.0.1:1".parse().unwrap(), "db", "u", "app");
        let server = registry.add_server(Arc::from("h:1"), "db", "u", 42);
        assert_eq!(registry.clients().len(), 1);
        assert_eq!(registry.servers()[0].backend_pid, 42);
        client.entry().set_state(LinkState::Active);
        assert_eq!(registry.clients()[0].state(), LinkState::Active);
        client.entry().kill();
        tokio::time::timeout(std::time::Duration::from_secs(1), client.entry().killed())
            .await
            .unwrap();
        drop((client, server));
        assert!(registry.clients().is_empty() && registry.servers().is_empty());
    }
}
