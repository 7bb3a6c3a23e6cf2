//! Throwaway local PostgreSQL clusters (a primary plus streaming replicas) built from the
//! PostgreSQL binaries on this machine, for `pgrelay demo` and the end-to-end tests.
//!
//! Everything is synchronous (std::process). A cluster lives in its own temp directory and
//! listens on 127.0.0.1 only; dropping it stops the servers and removes the directory, and the
//! servers also die with this process (see `spawner`), so a killed test leaves nothing behind.
//!
//! Every cluster has the superuser `postgres`/`postgres` and these roles, with databases `app`
//! and `other` (both owned by `app`):
//!
//! | role        | password    | stored as | pg_hba method over TCP |
//! |-------------|-------------|-----------|------------------------|
//! | `app`       | `app`       | SCRAM     | scram-sha-256          |
//! | `app_md5`   | `app_md5`   | md5       | md5                    |
//! | `app_plain` | `app_plain` | SCRAM     | password (cleartext)   |
//! | `app_trust` | none        | -         | trust                  |
//!
//! ```text
//! let cluster = LocalCluster::new(ClusterOptions::default())?;
//! let (primary, replica) = (cluster.primary(), &cluster.replicas()[0]);
//! cluster.psql(primary, "app", "CREATE TABLE t (x int)")?;
//! cluster.wait_replay(replica, Duration::from_secs(10))?;
//! cluster.kill(primary)?;   // crash; cluster.start(primary)? brings it back on the same port
//! ```
//!
//! A cluster kept in a `static` is never dropped: its servers still die with the process, and
//! its directory is removed by the next `LocalCluster::new` of any later run.

mod binaries;
mod error;
mod node;
mod ports;
mod privileges;
mod setup;
mod spawner;
mod workdir;

#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

pub use binaries::PgBinaries;
pub use error::{Error, Result};
pub use node::{Node, SUPERUSER, SUPERUSER_PASSWORD};
pub use privileges::RunAs;

use node::Context;

/// Longest path the server accepts for a Unix socket file (sun_path, less the NUL).
const MAX_SOCKET_PATH: usize = 107;
/// How long Drop gives a fast shutdown before resorting to SIGKILL.
const DROP_GRACE: Duration = Duration::from_secs(5);

/// How to build a [`LocalCluster`].
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Number of streaming replicas (default 1).
    pub replicas: usize,
    /// `recovery_min_apply_delay` on the replicas, to make replication lag deterministic.
    pub replica_apply_delay: Option<Duration>,
    /// Run on the primary after the standard roles and databases exist, in database `postgres`,
    /// each entry separately (so `CREATE DATABASE` works), stopping at the first error. An entry
    /// may also be a single psql backslash command such as `\c app`.
    pub setup_sql: Vec<String>,
    /// Extra postgresql.conf lines for the primary.
    pub primary_conf: Vec<String>,
    /// Extra postgresql.conf lines for the replicas.
    pub replica_conf: Vec<String>,
    /// Extra pg_hba.conf lines, placed before the final `host all all ... scram-sha-256`.
    pub extra_hba: Vec<String>,
    /// Deadline for a server to start, be promoted or stop (default 60 s).
    pub startup_timeout: Duration,
    /// Deadline for each psql run (default 60 s).
    pub command_timeout: Duration,
    /// Leave the directory (data, logs) in place on drop, for debugging.
    pub keep_dir: bool,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            replicas: 1,
            replica_apply_delay: None,
            setup_sql: Vec::new(),
            primary_conf: Vec::new(),
            replica_conf: Vec::new(),
            extra_hba: Vec::new(),
            startup_timeout: Duration::from_secs(60),
            command_timeout: Duration::from_secs(60),
            keep_dir: false,
        }
    }
}

/// A running primary with its replicas. All operations take `&self`, so one cluster can be
/// shared by several tests (e.g. through a `static OnceLock`).
#[derive(Debug)]
pub struct LocalCluster {
    ctx: Arc<Context>,
    /// `nodes[0]` is the primary the cluster was created with; the rest are its replicas.
    nodes: Vec<Node>,
    keep_dir: bool,
    torn_down: AtomicBool,
}

impl LocalCluster {
    /// Creates and starts a primary and `options.replicas` streaming replicas, returning once
    /// every replica streams.
    pub fn new(options: ClusterOptions) -> Result<Self> {
        let bins = PgBinaries::locate()?;
        let run_as = RunAs::detect()?;
        let dir = workdir::create(&run_as)?;
        let sockets = dir.join("sock");
        let socket_dir = (sockets.join(".s.PGSQL.65535").as_os_str().len() <= MAX_SOCKET_PATH).then_some(sockets);
        let mut cluster = LocalCluster {
            ctx: Arc::new(Context {
                bins,
                run_as,
                dir,
                socket_dir,
                command_timeout: options.command_timeout,
                startup_timeout: options.startup_timeout,
            }),
            nodes: Vec::new(),
            keep_dir: options.keep_dir,
            torn_down: AtomicBool::new(false),
        };
        // From here on an early return drops `cluster`, which stops what was started.
        let ctx = Arc::clone(&cluster.ctx);
        if let Some(sockets) = &ctx.socket_dir {
            ctx.run_as.create_private_dir(sockets)?;
        }
        setup::initdb(&ctx, &ctx.dir.join("primary"))?;
        setup::write_hba(&ctx, &ctx.dir.join("primary"), &options.extra_hba)?;
        let primary = start_new_node(&ctx, "primary", None, &options.primary_conf)?;
        cluster.nodes.push(primary);
        setup::create_roles(cluster.primary(), &options.setup_sql)?;
        for i in 1..=options.replicas {
            let name = format!("replica{i}");
            let port = cluster.primary().port();
            setup::base_backup(&ctx, port, &ctx.dir.join(&name), &format!("pgrelay_{name}"))?;
            let node = start_new_node(&ctx, &name, Some(options.replica_apply_delay), &options.replica_conf)?;
            cluster.nodes.push(node);
            if let Some(node) = cluster.nodes.last() {
                node.wait_streaming(ctx.startup_timeout)?;
            }
        }
        tracing::debug!(dir = %ctx.dir.display(), replicas = options.replicas, "local cluster up");
        Ok(cluster)
    }

    /// The node the cluster was created with as primary (still this node after a promotion).
    pub fn primary(&self) -> &Node {
        &self.nodes[0]
    }

    /// The nodes created as replicas, in order (`replica1` first).
    pub fn replicas(&self) -> &[Node] {
        &self.nodes[1..]
    }

    /// The primary followed by the replicas.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// The cluster's directory (data directories, logs, sockets).
    pub fn dir(&self) -> &Path {
        &self.ctx.dir
    }

    /// The PostgreSQL bin directory the servers run from.
    pub fn bin_dir(&self) -> &Path {
        self.ctx.bins.dir()
    }

    /// Path of a PostgreSQL program (`psql`, `pgbench`, ...): the bin directory, then /usr/bin.
    pub fn bin_path(&self, name: &str) -> Result<PathBuf> {
        self.ctx.bins.path(name)
    }

    pub fn binaries(&self) -> &PgBinaries {
        &self.ctx.bins
    }

    /// The OS user the servers run as.
    pub fn os_user(&self) -> &str {
        self.ctx.run_as.name()
    }

    /// Runs `sql` with psql (`-X -A -t -q -v ON_ERROR_STOP=1`) as the superuser on `node`, in
    /// database `db`, and returns its trimmed output: one row per line, columns joined by `|`.
    pub fn psql(&self, node: &Node, db: &str, sql: &str) -> Result<String> {
        node.psql(db, &[sql])
    }

    /// Fast shutdown (SIGINT), waiting for the server to exit. Stopping a stopped node is a no-op.
    pub fn stop(&self, node: &Node) -> Result<()> {
        node.stop(self.ctx.startup_timeout)
    }

    /// Immediate shutdown (`pg_ctl stop -m immediate`): no checkpoint, crash recovery at
    /// the next start. Stopping a stopped node is a no-op.
    pub fn stop_immediate(&self, node: &Node) -> Result<()> {
        node.stop_immediate(self.ctx.startup_timeout)
    }

    /// SIGKILL, like a crash; returns once its orphaned server processes are gone too.
    pub fn kill(&self, node: &Node) -> Result<()> {
        node.kill(self.ctx.startup_timeout)
    }

    /// Starts a stopped node again on the same port and waits until it accepts connections (and,
    /// for a replica whose primary runs, until it streams). A running node is left alone.
    pub fn start(&self, node: &Node) -> Result<()> {
        node.spawn_and_wait()?;
        let primary = self.primary();
        if node.is_replica() && primary.is_running() && !primary.is_replica() {
            node.wait_streaming(self.ctx.startup_timeout)?;
        }
        Ok(())
    }

    /// Promotes a replica (`pg_ctl promote -w`) and waits until it leaves recovery. The other
    /// nodes are not repointed: the old primary, if running, is now a second primary.
    pub fn promote(&self, replica: &Node) -> Result<()> {
        if replica.psql("postgres", &["SELECT pg_is_in_recovery()"])? != "t" {
            return Err(Error::NotAReplica {
                node: replica.name().to_string(),
                what: "promoted".into(),
            });
        }
        let mut cmd = self.ctx.command("pg_ctl")?;
        let secs = self.ctx.startup_timeout.as_secs().max(1).to_string();
        cmd.arg("promote").arg("-D").arg(replica.data_dir());
        cmd.args(["-w", "-t", &secs]);
        let command = spawner::describe(&cmd);
        let out = spawner::run(cmd, self.ctx.startup_timeout + Duration::from_secs(5))?;
        if !out.status.success() {
            return Err(Error::CommandFailed {
                command,
                status: out.status.to_string(),
                stderr: format!("{}\n{}", out.stdout.trim(), out.stderr.trim()),
                log_tail: format!(
                    "\nlast lines of {}:\n{}",
                    replica.log_path().display(),
                    replica.log_tail(30)
                ),
            });
        }
        replica.wait_for(
            "SELECT pg_is_in_recovery()",
            "f",
            "leave recovery after promotion",
            self.ctx.startup_timeout,
        )?;
        replica.set_replica(false);
        Ok(())
    }

    /// Waits until `replica` has replayed everything the primary had written when this was
    /// called (`pg_last_wal_replay_lsn()` at least the primary's WAL position).
    pub fn wait_replay(&self, replica: &Node, timeout: Duration) -> Result<()> {
        // With synchronous_commit=off, recent commits may still sit in the primary's WAL buffers,
        // unsent, so pg_current_wal_lsn() could be short of them. A synchronous commit of a
        // transaction that wrote WAL flushes everything before it (one that merely took an xid
        // would commit asynchronously); the flush position after it is the target.
        let out = self.primary().psql(
            "postgres",
            &[
                "SET synchronous_commit = on",
                "SELECT pg_logical_emit_message(true, 'pgrelay_localpg', 'wait_replay')",
                "SELECT pg_current_wal_flush_lsn()",
            ],
        )?;
        let target = out.lines().last().unwrap_or_default().trim();
        replica.wait_for(
            &format!("SELECT coalesce(pg_last_wal_replay_lsn() >= '{target}'::pg_lsn, false)"),
            "t",
            &format!("replay the primary's WAL up to {target}"),
            timeout,
        )
    }

    /// Sets (or with `None` clears) `recovery_min_apply_delay` on a replica through ALTER SYSTEM
    /// and a reload, returning once new sessions see the new value.
    pub fn set_apply_delay(&self, replica: &Node, delay: Option<Duration>) -> Result<()> {
        let ms = delay.map_or(0, |d| d.as_millis());
        replica.psql(
            "postgres",
            &[
                &format!("ALTER SYSTEM SET recovery_min_apply_delay = '{ms}ms'"),
                "SELECT pg_reload_conf()",
            ],
        )?;
        replica.wait_for(
            "SELECT setting FROM pg_settings WHERE name = 'recovery_min_apply_delay'",
            &ms.to_string(),
            "pick up the new recovery_min_apply_delay",
            self.ctx.startup_timeout,
        )
    }

    /// Stops every node and removes the directory, reporting anything that went wrong (Drop
    /// does the same but can only log).
    pub fn shutdown(self) -> Result<()> {
        let errors = self.stop_all();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(Error::Shutdown(errors.join("\n")))
        }
    }

    /// What Drop does, for a cluster that is never dropped (one leaked into a `static`, say, from
    /// an `atexit` hook): stops every node and removes the directory, logging problems. Only the
    /// first call does anything; the cluster is unusable afterwards.
    pub fn teardown(&self) {
        for e in self.stop_all() {
            tracing::warn!(error = %e, "cleaning up a local PostgreSQL cluster");
        }
    }

    fn stop_all(&self) -> Vec<String> {
        if self.torn_down.swap(true, Ordering::SeqCst) {
            return Vec::new();
        }
        let mut errors = Vec::new();
        // Signal all first so the shutdowns overlap.
        for node in &self.nodes {
            node.signal(Signal::SIGINT);
        }
        let deadline = Instant::now() + DROP_GRACE;
        for node in &self.nodes {
            if !node.wait_exit(deadline.saturating_duration_since(Instant::now())) {
                tracing::warn!(node = node.name(), "no fast shutdown in time, sending SIGKILL");
                if let Err(e) = node.kill(DROP_GRACE) {
                    errors.push(e.to_string());
                }
            }
        }
        // psql and friends run with the cluster directory as working directory; a straggler
        // still in there (e.g. after a timeout) would keep files open as we delete them.
        let deadline = Instant::now() + DROP_GRACE;
        while !node::processes_in(&self.ctx.dir).is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let left = node::processes_in(&self.ctx.dir);
        if !left.is_empty() {
            errors.push(format!("processes {left:?} still run in {}", self.ctx.dir.display()));
        }
        if !self.keep_dir
            && let Err(e) = std::fs::remove_dir_all(&self.ctx.dir)
        {
            errors.push(format!("removing {}: {e}", self.ctx.dir.display()));
        }
        errors
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// Configures and starts a node on a fresh port, retrying with another port when a different
/// process grabbed ours between the probe and the server's bind. `apply_delay` is `Some` for
/// replicas.
fn start_new_node(
    ctx: &Arc<Context>,
    name: &str,
    apply_delay: Option<Option<Duration>>,
    extra: &[String],
) -> Result<Node> {
    start_new_node_with(ctx, name, apply_delay, extra, &mut ports::free_port)
}

fn start_new_node_with(
    ctx: &Arc<Context>,
    name: &str,
    apply_delay: Option<Option<Duration>>,
    extra: &[String],
    next_port: &mut dyn FnMut() -> Result<u16>,
) -> Result<Node> {
    const ATTEMPTS: usize = 5;
    let data_dir = ctx.dir.join(name);
    let mut attempt = 0;
    loop {
        attempt += 1;
        let port = next_port()?;
        let config = setup::NodeConfig {
            port,
            apply_delay: apply_delay.flatten(),
            extra,
        };
        setup::write_config(ctx, &data_dir, &config)?;
        let node = Node::new(Arc::clone(ctx), name, port, apply_delay.is_some());
        let (result, clash) = node.start_detecting_port_clash();
        let Err(e) = result else {
            return Ok(node);
        };
        // It may have timed out while still running: never leave it behind.
        let _ = node.kill(DROP_GRACE);
        if !clash || attempt == ATTEMPTS {
            return Err(e);
        }
        tracing::debug!(node = name, port, "port taken before the server bound it; retrying");
    }
}
