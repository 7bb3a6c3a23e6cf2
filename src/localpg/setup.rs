//! Builds a cluster's files and roles: initdb, postgresql.conf and pg_hba.conf, the test roles and
//! databases, and base backups for replicas.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use super::error::{Error, Result};
use super::node::{Context, Node, SUPERUSER, SUPERUSER_PASSWORD};
use super::spawner;

/// Our settings live in their own file so that replicas, which copy the primary's
/// postgresql.conf in the base backup, only need that one file rewritten.
const NODE_CONF: &str = "pgrelay.conf";
/// initdb and pg_basebackup on a cold cache can be slow on a loaded machine.
const SLOW_TOOL_TIMEOUT: Duration = Duration::from_secs(180);

/// Per-node configuration.
pub(super) struct NodeConfig<'a> {
    pub port: u16,
    pub apply_delay: Option<Duration>,
    pub extra: &'a [String],
}

pub(super) fn initdb(ctx: &Context, data_dir: &Path) -> Result<()> {
    ctx.run_as.create_private_dir(data_dir)?;
    let pwfile = ctx.dir.join("superuser-password");
    ctx.run_as
        .create_private_file(&pwfile, &format!("{SUPERUSER_PASSWORD}\n"))?;
    let mut cmd = ctx.command("initdb")?;
    cmd.arg("-D")
        .arg(data_dir)
        .arg(format!("--pwfile={}", pwfile.display()));
    cmd.args(["-U", SUPERUSER, "--auth-local=trust", "--auth-host=scram-sha-256"]);
    // Skipping fsync and locale detection saves seconds per cluster.
    cmd.args(["--no-sync", "--encoding=UTF8", "--locale=C"]);
    let result = run_ok(cmd, SLOW_TOOL_TIMEOUT);
    let _ = std::fs::remove_file(&pwfile);
    result
}

/// Points postgresql.conf at our own file (once) and (re)writes that file.
pub(super) fn write_config(ctx: &Context, data_dir: &Path, node: &NodeConfig<'_>) -> Result<()> {
    let main = data_dir.join("postgresql.conf");
    let text = std::fs::read_to_string(&main).map_err(|e| Error::io(format!("reading {}", main.display()), e))?;
    let include = format!("include '{NODE_CONF}'");
    if !text.lines().any(|l| l.trim() == include) {
        ctx.run_as.create_private_file(&main, &format!("{text}\n{include}\n"))?;
    }
    ctx.run_as
        .create_private_file(&data_dir.join(NODE_CONF), &config_text(ctx, node))
}

fn config_text(ctx: &Context, node: &NodeConfig<'_>) -> String {
    let sockets = ctx
        .socket_dir
        .as_deref()
        .map_or_else(String::new, |d| d.display().to_string());
    let mut lines = vec![
        "# Written by pgrelay's localpg for throwaway test clusters; speed over durability.".to_string(),
        "listen_addresses = '127.0.0.1'".to_string(),
        format!("port = {}", node.port),
        format!("unix_socket_directories = {}", quote(&sockets)),
        "max_connections = 300".to_string(),
        "shared_buffers = '16MB'".to_string(),
        "fsync = off".to_string(),
        "synchronous_commit = off".to_string(),
        "full_page_writes = off".to_string(),
        "wal_level = replica".to_string(),
        "max_wal_senders = 10".to_string(),
        "max_replication_slots = 10".to_string(),
        "hot_standby = on".to_string(),
        "hot_standby_feedback = on".to_string(),
        // Replicas report their position every second rather than every ten, so lag
        // observed on the primary follows reality closely.
        "wal_receiver_status_interval = '1s'".to_string(),
        "password_encryption = 'scram-sha-256'".to_string(),
        "logging_collector = off".to_string(),
        "log_min_messages = warning".to_string(),
        "log_line_prefix = '%m [%p] %q%u@%d '".to_string(),
    ];
    if let Some(delay) = node.apply_delay {
        lines.push(format!("recovery_min_apply_delay = '{}ms'", delay.as_millis()));
    }
    lines.extend(node.extra.iter().cloned());
    lines.join("\n") + "\n"
}

/// A single-quoted postgresql.conf value.
fn quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

pub(super) fn write_hba(ctx: &Context, data_dir: &Path, extra: &[String]) -> Result<()> {
    let mut lines = vec![
        "# Written by pgrelay's localpg. First match wins.".to_string(),
        "host  replication  all        127.0.0.1/32  trust".to_string(),
        "host  all          app_md5    127.0.0.1/32  md5".to_string(),
        "host  all          app_plain  127.0.0.1/32  password".to_string(),
        "host  all          app_trust  127.0.0.1/32  trust".to_string(),
    ];
    lines.extend(extra.iter().cloned());
    lines.push("host  all          all        127.0.0.1/32  scram-sha-256".to_string());
    // The socket directory is private to the PostgreSQL user, so trust is safe there.
    lines.push("local all          all                      trust".to_string());
    ctx.run_as
        .create_private_file(&data_dir.join("pg_hba.conf"), &(lines.join("\n") + "\n"))
}

/// The roles and databases every cluster has, then the caller's own setup.
pub(super) fn create_roles(primary: &Node, setup_sql: &[String]) -> Result<()> {
    let mut commands: Vec<&str> = vec![
        "CREATE ROLE app LOGIN CREATEDB PASSWORD 'app'",
        "CREATE ROLE app_plain LOGIN CREATEDB PASSWORD 'app_plain'",
        "CREATE ROLE app_trust LOGIN CREATEDB",
        // Stored as md5 so that the md5 exchange, not SCRAM, is what app_md5 exercises.
        "SET password_encryption = 'md5'",
        "CREATE ROLE app_md5 LOGIN CREATEDB PASSWORD 'app_md5'",
        "RESET password_encryption",
        "CREATE DATABASE app OWNER app",
        "CREATE DATABASE other OWNER app",
    ];
    // Since PostgreSQL 15 only the owner may create in schema public. Default privileges let
    // the test roles use each other's tables, so tests need not care who created one.
    let per_db = "GRANT ALL ON SCHEMA public TO PUBLIC; \
        ALTER DEFAULT PRIVILEGES FOR ROLE app, app_md5, app_plain, app_trust IN SCHEMA public \
        GRANT ALL ON TABLES TO PUBLIC; \
        ALTER DEFAULT PRIVILEGES FOR ROLE app, app_md5, app_plain, app_trust IN SCHEMA public \
        GRANT ALL ON SEQUENCES TO PUBLIC";
    commands.extend(["\\c app", per_db, "\\c other", per_db, "\\c postgres"]);
    commands.extend(setup_sql.iter().map(String::as_str));
    primary.psql("postgres", &commands).map(drop)
}

/// Copies the running primary into `data_dir` as a streaming standby (`-R` writes
/// standby.signal and primary_conninfo), with its own replication slot so the primary keeps the
/// WAL a stopped replica still needs.
pub(super) fn base_backup(ctx: &Context, primary_port: u16, data_dir: &Path, slot: &str) -> Result<()> {
    ctx.run_as.create_private_dir(data_dir)?;
    let mut cmd = ctx.command("pg_basebackup")?;
    let port = primary_port.to_string();
    cmd.args(["-h", "127.0.0.1", "-p", &port, "-U", SUPERUSER, "-D"]);
    cmd.arg(data_dir);
    cmd.args(["-R", "-X", "stream", "-c", "fast", "--no-sync", "-C", "-S", slot]);
    run_ok(cmd, SLOW_TOOL_TIMEOUT)
}

fn run_ok(cmd: Command, timeout: Duration) -> Result<()> {
    let command = spawner::describe(&cmd);
    let out = spawner::run(cmd, timeout)?;
    if out.status.success() {
        return Ok(());
    }
    Err(Error::CommandFailed {
        command,
        status: out.status.to_string(),
        stderr: format!("{}\n{}", out.stdout.trim(), out.stderr.trim())
            .trim()
            .to_string(),
        log_tail: String::new(),
    })
}
