//! Memory per idle client: the proxy's resident memory before and while thousands of logged-in
//! clients sit idle, and how long their logins took.
//!
//! Each client logs in (md5) and runs one `SELECT 1` before going idle, because a real pooled
//! client has run transactions before it idles, and a proxy that allocates buffers lazily would
//! look better than it is with clients that never sent a query.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_postgres::{Client, NoTls};

use crate::procs;
use crate::targets::Target;

/// Logins in flight at once: enough to keep both cores busy, few enough not to hit the
/// listen backlog.
const CONCURRENT_LOGINS: usize = 64;
/// Time for the proxy's allocator and tasks to settle before a memory reading.
const SETTLE: Duration = Duration::from_secs(2);
/// Overall bound on opening the clients.
const OPEN_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, Default)]
pub struct IdleOutcome {
    /// Clients that logged in, ran their query and stayed connected.
    pub opened: usize,
    pub failed: usize,
    pub first_error: Option<String>,
    /// Wall time from the first connect to the last successful login.
    pub login_time: Duration,
    pub rss_before_kib: u64,
    pub rss_with_clients_kib: u64,
    /// After all clients disconnected again: what the proxy did not give back.
    pub rss_after_kib: u64,
}

impl IdleOutcome {
    /// Growth of the resident set per idle client, in KiB.
    pub fn kib_per_client(&self) -> f64 {
        if self.opened == 0 {
            return 0.0;
        }
        self.rss_with_clients_kib.saturating_sub(self.rss_before_kib) as f64 / self.opened as f64
    }
}

/// Opens `count` idle clients through `target`, measures, and closes them again.
pub fn measure(target: &Target, count: usize, rt: &tokio::runtime::Runtime) -> Result<IdleOutcome, String> {
    let pid = target
        .pid()
        .ok_or("memory per idle client is measured for proxies only")?;
    let conninfo = target.conninfo();
    rt.block_on(async move {
        // One client first, so that pools, caches and lazily started tasks already exist in
        // the "before" figure.
        {
            let clients = open(&conninfo, 1).await;
            if let Some(Err(e)) = clients.into_iter().next() {
                return Err(format!("warm-up login failed: {e}"));
            }
        }
        tokio::time::sleep(SETTLE).await;
        let mut outcome = IdleOutcome {
            rss_before_kib: procs::rss_kib(pid)?,
            ..IdleOutcome::default()
        };
        let started = Instant::now();
        let results = tokio::time::timeout(OPEN_TIMEOUT, open(&conninfo, count))
            .await
            .map_err(|_| format!("opening {count} clients took more than {OPEN_TIMEOUT:?}"))?;
        outcome.login_time = started.elapsed();
        let mut clients = Vec::with_capacity(count);
        for result in results {
            match result {
                Ok(client) => clients.push(client),
                Err(e) => {
                    outcome.failed += 1;
                    outcome.first_error.get_or_insert(e);
                }
            }
        }
        tokio::time::sleep(SETTLE).await;
        // Count only clients still connected now: one the proxy dropped is not "idle".
        clients.retain(|c| !c.0.is_closed());
        outcome.opened = clients.len();
        outcome.rss_with_clients_kib = procs::rss_kib(pid)?;
        close(clients).await;
        tokio::time::sleep(SETTLE).await;
        outcome.rss_after_kib = procs::rss_kib(pid)?;
        Ok(outcome)
    })
}

/// A logged-in client and the task driving its connection.
struct Open(Client, tokio::task::JoinHandle<()>);

/// Opens `count` clients, `CONCURRENT_LOGINS` at a time; each runs `SELECT 1` once.
async fn open(conninfo: &str, count: usize) -> Vec<Result<Open, String>> {
    let permits = Arc::new(Semaphore::new(CONCURRENT_LOGINS));
    let mut tasks = JoinSet::new();
    for _ in 0..count {
        let permits = Arc::clone(&permits);
        let conninfo = conninfo.to_owned();
        tasks.spawn(async move {
            let _permit = permits.acquire_owned().await.map_err(|e| e.to_string())?;
            let (client, connection) = tokio_postgres::connect(&conninfo, NoTls)
                .await
                .map_err(|e| format!("login: {e}"))?;
            let driver = tokio::spawn(async move {
                let _ = connection.await;
            });
            client
                .simple_query("SELECT 1")
                .await
                .map_err(|e| format!("SELECT 1 after login: {e}"))?;
            Ok(Open(client, driver))
        });
    }
    let mut results = Vec::with_capacity(count);
    while let Some(joined) = tasks.join_next().await {
        results.push(joined.unwrap_or_else(|e| Err(format!("login task failed: {e}"))));
    }
    results
}

/// Drops every client (tokio-postgres then sends Terminate) and waits for the connections to end.
async fn close(clients: Vec<Open>) {
    let mut drivers = Vec::with_capacity(clients.len());
    for Open(client, driver) in clients {
        drop(client);
        drivers.push(driver);
    }
    let all = async {
        for driver in drivers {
            let _ = driver.await;
        }
    };
    if tokio::time::timeout(Duration::from_secs(60), all).await.is_err() {
        eprintln!("warning: some idle clients took more than 60 s to disconnect");
    }
}
