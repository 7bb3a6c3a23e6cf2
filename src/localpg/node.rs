//! One PostgreSQL server of a local cluster: its process, its files, and the operations on it.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;

use super::binaries::PgBinaries;
use super::error::{Error, Result};
use super::privileges::RunAs;
use super::spawner;

/// The superuser every node is created with (trusted over the private socket).
pub const SUPERUSER: &str = "postgres";
/// Its password, for TCP connections.
pub const SUPERUSER_PASSWORD: &str = "postgres";
const LOG_TAIL_LINES: usize = 30;
const POLL: Duration = Duration::from_millis(50);

/// What all nodes of a cluster share.
#[derive(Debug)]
pub(super) struct Context {
    pub bins: PgBinaries,
    pub run_as: RunAs,
    /// The cluster directory, canonical, so it compares equal to /proc/PID/cwd of the servers.
    pub dir: PathBuf,
    /// None when the path would exceed the Unix socket path limit; then psql uses TCP.
    pub socket_dir: Option<PathBuf>,
    pub command_timeout: Duration,
    pub startup_timeout: Duration,
}

impl Context {
    /// A command for a PostgreSQL program, run as the PostgreSQL user, with any PG* variables of
    /// ours removed so that they cannot redirect it to some other server.
    pub fn command(&self, program: &str) -> Result<Command> {
        let mut cmd = Command::new(self.bins.path(program)?);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("PG") {
                cmd.env_remove(key);
            }
        }
        cmd.env("PGCONNECT_TIMEOUT", "5")
            .env("PGAPPNAME", "pgrelay-localpg")
            // Our working directory may be unreadable to the PostgreSQL user.
            .current_dir(&self.dir);
        self.run_as.apply(&mut cmd);
        Ok(cmd)
    }
}

#[derive(Debug)]
struct State {
    child: Option<Child>,
    replica: bool,
}

/// One server (the primary or a replica) of a [`LocalCluster`](super::LocalCluster).
#[derive(Debug)]
pub struct Node {
    name: String,
    port: u16,
    data_dir: PathBuf,
    log_path: PathBuf,
    ctx: Arc<Context>,
    state: Mutex<State>,
}

impl Node {
    pub(super) fn new(ctx: Arc<Context>, name: &str, port: u16, replica: bool) -> Self {
        Node {
            name: name.to_string(),
            port,
            data_dir: ctx.dir.join(name),
            log_path: ctx.dir.join(format!("{name}.log")),
            ctx,
            state: Mutex::new(State { child: None, replica }),
        }
    }

    /// "primary", "replica1", "replica2", ...
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The TCP port it listens on (on 127.0.0.1), kept across restarts.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Always "127.0.0.1".
    pub fn host(&self) -> &'static str {
        "127.0.0.1"
    }

    /// "127.0.0.1:PORT".
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `postgres://user:password@127.0.0.1:PORT/db`; no percent-encoding, so keep the parts plain.
    pub fn url(&self, user: &str, password: &str, db: &str) -> String {
        format!("postgres://{user}:{password}@127.0.0.1:{}/{db}", self.port)
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The server's log (stdout and stderr of the postmaster).
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The last `lines` lines of the server log.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log_path, lines)
    }

    /// The postmaster's PID while it runs.
    pub fn pid(&self) -> Option<u32> {
        let mut state = self.state();
        reap(&mut state);
        state.child.as_ref().map(Child::id)
    }

    pub fn is_running(&self) -> bool {
        self.pid().is_some()
    }

    /// Whether the node was created as a replica and has not been promoted since.
    pub fn is_replica(&self) -> bool {
        self.state().replica
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn log_size(&self) -> u64 {
        std::fs::metadata(&self.log_path).map_or(0, |m| m.len())
    }

    /// Starts the postmaster as a direct child (pg_ctl would daemonize it out of our reach) and
    /// waits until it accepts connections.
    pub(super) fn spawn_and_wait(&self) -> Result<()> {
        let mut state = self.state();
        reap(&mut state);
        if state.child.is_some() {
            return Ok(());
        }
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .map_err(|e| Error::io(format!("opening {}", self.log_path.display()), e))?;
        self.ctx.run_as.give(&self.log_path)?;
        let log_err = log
            .try_clone()
            .map_err(|e| Error::io("duplicating the log file handle", e))?;
        let mut cmd = self.ctx.command("postgres")?;
        cmd.arg("-D")
            .arg(&self.data_dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        // SIGQUIT is PostgreSQL's immediate shutdown: the postmaster takes its children along.
        let child = spawner::spawn(cmd, Signal::SIGQUIT)?;
        tracing::debug!(node = %self.name, pid = child.id(), port = self.port, "started postgres");
        state.child = Some(child);
        let deadline = Instant::now() + self.ctx.startup_timeout;
        loop {
            if let Some(status) = reap(&mut state) {
                return Err(Error::StartupFailed {
                    node: self.name.clone(),
                    status,
                    log: self.log_path.clone(),
                    tail: self.log_tail(LOG_TAIL_LINES),
                });
            }
            if self.accepts_connections() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(self.timeout("accept connections", self.ctx.startup_timeout));
            }
            std::thread::sleep(POLL);
        }
    }

    /// Like [`Self::spawn_and_wait`], also telling whether a failure was a lost race for the port.
    pub(super) fn start_detecting_port_clash(&self) -> (Result<()>, bool) {
        let offset = self.log_size();
        let result = self.spawn_and_wait();
        let clash = result.is_err() && {
            let log = std::fs::read(&self.log_path).unwrap_or_default();
            let fresh = log.get(offset as usize..).unwrap_or_default();
            String::from_utf8_lossy(fresh).contains("Address already in use")
        };
        (result, clash)
    }

    fn accepts_connections(&self) -> bool {
        let Ok(mut cmd) = self.ctx.command("pg_isready") else {
            return false;
        };
        let port = self.port.to_string();
        cmd.args(["-q", "-t", "2", "-h", "127.0.0.1", "-p", &port]);
        cmd.args(["-U", SUPERUSER, "-d", "postgres"]);
        spawner::run(cmd, Duration::from_secs(5)).is_ok_and(|f| f.status.success())
    }

    /// Polls `sql` on this node until it returns `want` (psql errors count as "not yet").
    pub(super) fn wait_for(&self, sql: &str, want: &str, what: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(got) = self.psql("postgres", &[sql])
                && got == want
            {
                return Ok(());
            }
            if !self.is_running() {
                return Err(Error::NotRunning {
                    node: self.name.clone(),
                });
            }
            if Instant::now() >= deadline {
                return Err(self.timeout(what, timeout));
            }
            std::thread::sleep(POLL);
        }
    }

    pub(super) fn wait_streaming(&self, timeout: Duration) -> Result<()> {
        self.wait_for(
            "SELECT pg_is_in_recovery() AND EXISTS \
             (SELECT 1 FROM pg_stat_wal_receiver WHERE status = 'streaming')",
            "t",
            "stream WAL from the primary",
            timeout,
        )
    }

    /// Runs each of `commands` (SQL, or a single psql backslash command) in turn as the superuser
    /// in one session, stopping at the first error; returns the trimmed output.
    pub(super) fn psql(&self, db: &str, commands: &[&str]) -> Result<String> {
        let mut cmd = self.ctx.command("psql")?;
        let port = self.port.to_string();
        match &self.ctx.socket_dir {
            Some(dir) => cmd.arg("-h").arg(dir),
            None => cmd.env("PGPASSWORD", SUPERUSER_PASSWORD).args(["-h", "127.0.0.1"]),
        };
        cmd.args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-p", &port]);
        cmd.args(["-U", SUPERUSER, "-d", db]);
        for c in commands {
            cmd.arg("-c").arg(c);
        }
        let command = spawner::describe(&cmd);
        let out = spawner::run(cmd, self.ctx.command_timeout).map_err(|e| self.with_log_if_down(e))?;
        if !out.status.success() {
            return Err(self.with_log_if_down(Error::CommandFailed {
                command,
                status: out.status.to_string(),
                stderr: out.stderr.trim().to_string(),
                log_tail: String::new(),
            }));
        }
        Ok(out.stdout.trim().to_string())
    }

    /// Server log lines only help when the server is why a client command failed.
    fn with_log_if_down(&self, err: Error) -> Error {
        if self.is_running() {
            return err;
        }
        let extra = format!(
            "\n{} is not running; last lines of {}:\n{}",
            self.name,
            self.log_path.display(),
            self.log_tail(LOG_TAIL_LINES)
        );
        match err {
            Error::CommandFailed {
                command,
                status,
                stderr,
                ..
            } => Error::CommandFailed {
                command,
                status,
                stderr,
                log_tail: extra,
            },
            Error::CommandTimedOut { command, timeout, .. } => Error::CommandTimedOut {
                command,
                timeout,
                log_tail: extra,
            },
            other => other,
        }
    }

    pub(super) fn timeout(&self, what: &str, timeout: Duration) -> Error {
        Error::Timeout {
            node: self.name.clone(),
            what: what.to_string(),
            timeout,
            log: self.log_path.clone(),
            tail: self.log_tail(LOG_TAIL_LINES),
        }
    }

    /// Sends `signal` to the postmaster if it still runs; true if it was sent.
    pub(super) fn signal(&self, signal: Signal) -> bool {
        let mut state = self.state();
        reap(&mut state);
        match &state.child {
            // The child is unreaped, so its PID cannot have been reused.
            Some(child) => nix::sys::signal::kill(pid_of(child), signal).is_ok(),
            None => false,
        }
    }

    /// Waits until the postmaster has exited; false on timeout.
    pub(super) fn wait_exit(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.pid().is_none() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Fast shutdown: SIGINT, then wait for the postmaster (which waits for its children).
    pub(super) fn stop(&self, timeout: Duration) -> Result<()> {
        self.signal(Signal::SIGINT);
        if self.wait_exit(timeout) {
            Ok(())
        } else {
            Err(self.timeout("shut down after SIGINT", timeout))
        }
    }

    /// Immediate shutdown (SIGQUIT, as `pg_ctl stop -m immediate`): every server process
    /// exits at once without a checkpoint; the next start runs crash recovery.
    pub(super) fn stop_immediate(&self, timeout: Duration) -> Result<()> {
        self.signal(Signal::SIGQUIT);
        if self.wait_exit(timeout) {
            Ok(())
        } else {
            Err(self.timeout("shut down after SIGQUIT", timeout))
        }
    }

    /// SIGKILL to the postmaster, then wait for the orphaned backends and auxiliary processes
    /// to notice and exit, since they would keep the shared memory busy and block a restart.
    pub(super) fn kill(&self, timeout: Duration) -> Result<()> {
        {
            let mut state = self.state();
            if let Some(mut child) = state.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        let deadline = Instant::now() + timeout;
        while !processes_in(&self.data_dir).is_empty() {
            if Instant::now() >= deadline {
                return Err(self.timeout("lose its orphaned server processes after SIGKILL", timeout));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    pub(super) fn set_replica(&self, replica: bool) {
        self.state().replica = replica;
    }
}

fn pid_of(child: &Child) -> Pid {
    Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX))
}

/// Reaps an exited postmaster; returns how it ended.
fn reap(state: &mut State) -> Option<String> {
    let child = state.child.as_mut()?;
    match child.try_wait() {
        Ok(Some(status)) => {
            state.child = None;
            Some(status.to_string())
        }
        Ok(None) => None,
        Err(e) => {
            state.child = None;
            Some(format!("could not wait for it: {e}"))
        }
    }
}

/// The last `lines` lines of a (possibly missing) file.
pub(super) fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// PIDs of processes whose working directory is `dir` or below: PostgreSQL server processes
/// chdir into their data directory, so this finds a cluster's servers, orphans included.
pub(super) fn processes_in(dir: &Path) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| cwd.starts_with(dir)))
        .collect()
}
