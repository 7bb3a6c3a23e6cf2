//! The three things pgbench is pointed at: PostgreSQL itself, PgBouncer and pgrelay, each
//! started on a free loopback port with a configuration written here, and with equal settings:
//! transaction pooling, the same pool size, md5 logins for the same user, no TLS to the server.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::procs::{self, Proc};
use crate::settings::{DATABASE, PASSWORD, Settings, USER};

/// How long a proxy gets to accept a first login.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Attempts with a fresh port when a proxy dies at start (another process took the port).
const START_ATTEMPTS: usize = 3;
const PGBOUNCER_PATHS: &[&str] = &["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Direct,
    PgBouncer,
    Pgrelay,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Direct => "PostgreSQL (direct)",
            Kind::PgBouncer => "PgBouncer",
            Kind::Pgrelay => "pgrelay",
        }
    }

    /// Short name for file names and the PGRELAY_BENCH_TARGETS variable.
    pub fn key(self) -> &'static str {
        match self {
            Kind::Direct => "direct",
            Kind::PgBouncer => "pgbouncer",
            Kind::Pgrelay => "pgrelay",
        }
    }
}

/// Something pgbench can connect to; proxies carry the guard of their process.
#[derive(Debug)]
pub struct Target {
    pub kind: Kind,
    pub port: u16,
    pub process: Option<Proc>,
}

impl Target {
    pub fn direct(port: u16) -> Target {
        Target {
            kind: Kind::Direct,
            port,
            process: None,
        }
    }

    /// The proxy's PID (None for PostgreSQL, whose CPU is spread over its backends).
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(Proc::pid)
    }

    /// A libpq/tokio-postgres connection string for the benchmark user.
    pub fn conninfo(&self) -> String {
        conninfo(self.port)
    }

    /// Fails when the proxy has exited (e.g. crashed under load), with the end of its log.
    pub fn check_alive(&mut self) -> Result<(), String> {
        let Some(process) = self.process.as_mut() else {
            return Ok(());
        };
        match process.exited() {
            None => Ok(()),
            Some(status) => Err(format!(
                "{} exited ({status}); last lines of its log:\n{}",
                self.kind.name(),
                process.log_tail(30)
            )),
        }
    }
}

pub fn conninfo(port: u16) -> String {
    format!("host=127.0.0.1 port={port} user={USER} password={PASSWORD} dbname={DATABASE} connect_timeout=30")
}

/// Starts pgrelay from the release binary cargo built for this benchmark.
pub fn start_pgrelay(
    dir: &Path,
    pg_port: u16,
    settings: &Settings,
    rt: &tokio::runtime::Runtime,
) -> Result<Target, String> {
    let binary = env!("CARGO_BIN_EXE_pgrelay");
    let mut last_error = String::new();
    for attempt in 1..=START_ATTEMPTS {
        let port = procs::free_port()?;
        let config_path = dir.join("pgrelay.toml");
        std::fs::write(&config_path, pgrelay_config(port, pg_port, settings))
            .map_err(|e| format!("writing {}: {e}", config_path.display()))?;
        let mut cmd = Command::new(binary);
        cmd.arg("run").arg("-c").arg(&config_path);
        // Its default log level (info) logs each connection, as PgBouncer's defaults do
        // (log_connections = 1): both run as an operator would run them.
        cmd.env_remove("RUST_LOG").env_remove("PGRELAY_CONFIG");
        let process = Proc::spawn("pgrelay", cmd, &dir.join(format!("pgrelay-{attempt}.log")))?;
        let mut target = Target {
            kind: Kind::Pgrelay,
            port,
            process: Some(process),
        };
        match wait_ready(&mut target, rt) {
            Ok(()) => return Ok(target),
            Err(e) => last_error = e,
        }
    }
    Err(last_error)
}

fn pgrelay_config(port: u16, pg_port: u16, settings: &Settings) -> String {
    format!(
        r#"# Written by benches/load.rs.
[server]
listen = "127.0.0.1:{port}"
workers = {workers}
max_client_conn = {max_clients}
metrics_listen = ""
shutdown_timeout = "2s"
client_login_timeout = "60s"

[pool]
mode = "transaction"
size = {pool}
query_wait_timeout = "120s"

[[users]]
name = "{USER}"
password = "{PASSWORD}"
auth = "md5"

[databases.{DATABASE}]
primary = "127.0.0.1:{pg_port}"
server_tls = {{ mode = "disable" }}
"#,
        max_clients = settings.max_client_conn(),
        pool = settings.pool_size,
        workers = settings.workers,
    )
}

/// Starts PgBouncer, installing the Debian package first when it is missing. `Err` means "no
/// PgBouncer columns", with the reason.
pub fn start_pgbouncer(
    dir: &Path,
    pg_port: u16,
    settings: &Settings,
    run_as: Option<&str>,
    rt: &tokio::runtime::Runtime,
) -> Result<Target, String> {
    let binary = pgbouncer_binary(dir)?;
    let conf_dir = dir.join("pgbouncer");
    std::fs::create_dir_all(&conf_dir).map_err(|e| format!("creating {}: {e}", conf_dir.display()))?;
    // PgBouncer refuses to run as root: as root it runs as `run_as`, who must be able to reach
    // and read its files (the files hold only the throwaway benchmark password).
    let user = match run_as {
        Some(name) => Some(
            nix::unistd::User::from_name(name)
                .map_err(|e| format!("looking up user {name}: {e}"))?
                .ok_or_else(|| format!("no user {name} to run PgBouncer as"))?,
        ),
        None => None,
    };
    for path in [dir, conf_dir.as_path()] {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| format!("chmod {}: {e}", path.display()))?;
    }
    let auth_file = conf_dir.join("userlist.txt");
    write_readable(&auth_file, &format!("\"{USER}\" \"{PASSWORD}\"\n"))?;
    let mut last_error = String::new();
    for attempt in 1..=START_ATTEMPTS {
        let port = procs::free_port()?;
        let ini = conf_dir.join("pgbouncer.ini");
        write_readable(&ini, &pgbouncer_ini(port, pg_port, &auth_file, settings))?;
        let mut cmd = Command::new(&binary);
        cmd.arg(&ini).current_dir(&conf_dir);
        if let Some(user) = &user {
            // The same uid switch localpg uses for PostgreSQL (rather than `-u`, so that the
            // parent-death signal set before exec survives).
            cmd.uid(user.uid.as_raw()).gid(user.gid.as_raw());
        }
        let process = Proc::spawn("pgbouncer", cmd, &dir.join(format!("pgbouncer-{attempt}.log")))?;
        let mut target = Target {
            kind: Kind::PgBouncer,
            port,
            process: Some(process),
        };
        match wait_ready(&mut target, rt) {
            Ok(()) => return Ok(target),
            Err(e) => last_error = e,
        }
    }
    Err(last_error)
}

fn pgbouncer_ini(port: u16, pg_port: u16, auth_file: &Path, settings: &Settings) -> String {
    format!(
        "; Written by benches/load.rs.
[databases]
{DATABASE} = host=127.0.0.1 port={pg_port} dbname={DATABASE}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = md5
auth_file = {auth}
pool_mode = transaction
default_pool_size = {pool}
min_pool_size = 0
reserve_pool_size = 0
max_client_conn = {max_clients}
max_db_connections = 0
query_wait_timeout = 120
server_tls_sslmode = disable
; Log to stderr (our log file) only; connection logging stays at its default (on).
logfile =
pidfile =
syslog = 0
",
        auth = auth_file.display(),
        pool = settings.pool_size,
        max_clients = settings.max_client_conn(),
    )
}

fn write_readable(path: &Path, text: &str) -> Result<(), String> {
    std::fs::write(path, text).map_err(|e| format!("writing {}: {e}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644))
        .map_err(|e| format!("chmod {}: {e}", path.display()))
}

/// The PgBouncer binary, installed with apt-get when missing and we are root.
fn pgbouncer_binary(dir: &Path) -> Result<PathBuf, String> {
    let found = || PGBOUNCER_PATHS.iter().map(PathBuf::from).find(|p| p.exists());
    if let Some(path) = found() {
        return Ok(path);
    }
    if !nix::unistd::geteuid().is_root() {
        return Err(
            "PgBouncer is not installed (/usr/sbin/pgbouncer) and we are not root to install it: \
             `sudo apt-get install -y pgbouncer`"
                .into(),
        );
    }
    eprintln!("PgBouncer is missing: apt-get install -y pgbouncer ...");
    let log = dir.join("apt-get.log");
    // A stale or empty package list makes the first attempt fail; update it and try again.
    for args in [
        &["install", "-y", "pgbouncer"][..],
        &["update"][..],
        &["install", "-y", "pgbouncer"][..],
    ] {
        if found().is_some() {
            break;
        }
        let mut cmd = Command::new("apt-get");
        cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        let mut process = Proc::spawn("apt-get", cmd, &log)?;
        let _ = process.wait_for_exit(Duration::from_secs(600));
    }
    found().ok_or_else(|| {
        format!(
            "PgBouncer could not be installed with apt-get; last lines of its output:\n{}",
            procs::tail(&log, 10)
        )
    })
}

/// Waits until a real login and `SELECT 1` through the target succeed.
fn wait_ready(target: &mut Target, rt: &tokio::runtime::Runtime) -> Result<(), String> {
    let deadline = Instant::now() + READY_TIMEOUT;
    let conninfo = target.conninfo();
    loop {
        target.check_alive()?;
        let attempt = rt.block_on(async {
            let (client, connection) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls).await?;
            let driver = tokio::spawn(connection);
            let result = client.simple_query("SELECT 1").await.map(drop);
            drop(client);
            let _ = driver.await;
            result
        });
        match attempt {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() >= deadline => {
                return Err(format!("{} did not accept a login in time: {e}", target.kind.name()));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}
