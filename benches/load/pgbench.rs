//! Running pgbench and reading its results.
//!
//! Throughput and transaction counts come from pgbench's summary. Latencies come from its
//! per-transaction log (`-l --log-prefix`), one line per transaction with the elapsed time in
//! microseconds, from which the mean and the 99th percentile are computed exactly. pgbench's own
//! summary has no percentiles, and without `--rate`/`--progress` its "latency average" is not
//! measured at all but derived from the run time and the transaction count.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::procs::Proc;
use crate::settings::{DATABASE, PASSWORD, Scenario, Script, USER};

/// Beyond the run itself: time for 1,000 clients to log in and for pgbench to write its logs.
const RUN_SLACK: Duration = Duration::from_secs(180);

/// What one pgbench run measured.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// "tps = … (without initial connection time)".
    pub tps: f64,
    /// "number of transactions actually processed".
    pub transactions: u64,
    /// "number of failed transactions" plus transactions the log marks as failed.
    pub failed: u64,
    pub mean_ms: f64,
    pub p99_ms: f64,
    /// pgbench's error lines (aborted clients, connection failures), if any.
    pub errors: Vec<String>,
}

/// A pgbench command for the benchmark user on `port`, with PG* variables of ours removed so
/// that nothing redirects it.
fn command(pgbench: &Path, port: u16, user: &str, password: &str) -> Command {
    let mut cmd = Command::new(pgbench);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("PG") {
            cmd.env_remove(key);
        }
    }
    cmd.env("PGPASSWORD", password).env("PGCONNECT_TIMEOUT", "30");
    cmd.args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", user]);
    cmd
}

/// `pgbench -i -s SCALE` straight into PostgreSQL, as the benchmark user (who owns what it
/// creates, so no grants are needed).
pub fn init(pgbench: &Path, dir: &Path, port: u16, scale: u32) -> Result<(), String> {
    let mut cmd = command(pgbench, port, USER, PASSWORD);
    cmd.args(["-i", "-q", "-s", &scale.to_string(), DATABASE])
        .current_dir(dir);
    let log = dir.join("pgbench-init.log");
    let mut process = Proc::spawn("pgbench -i", cmd, &log)?;
    let status = process.wait_for_exit(Duration::from_secs(900))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("pgbench -i failed ({status}):\n{}", process.log_tail(20)))
    }
}

/// Runs one scenario against `port` for `seconds` and collects the results. `dir` must be
/// empty: the per-transaction logs land there and are removed afterwards.
pub fn run(pgbench: &Path, dir: &Path, port: u16, scenario: &Scenario, seconds: u64) -> Result<Outcome, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let threads = std::thread::available_parallelism()
        .map_or(2, usize::from)
        .min(scenario.clients);
    let mut cmd = command(pgbench, port, USER, PASSWORD);
    // -n: no VACUUM before the run (it would go through the proxies and differ per target).
    cmd.args(["-n", "-M", scenario.mode.arg()]);
    if scenario.script == Script::SelectOnly {
        cmd.arg("-S");
    }
    cmd.args(["-c", &scenario.clients.to_string(), "-j", &threads.to_string()]);
    cmd.args(["-T", &seconds.to_string(), "-l", "--log-prefix"]);
    cmd.arg(dir.join("tx")).arg(DATABASE).current_dir(dir);
    let output = dir.join("output.txt");
    let mut process = Proc::spawn("pgbench", cmd, &output)?;
    let status = process.wait_for_exit(Duration::from_secs(seconds) + RUN_SLACK)?;
    let text = std::fs::read_to_string(&output).map_err(|e| format!("reading {}: {e}", output.display()))?;
    let mut outcome = parse_summary(&text);
    if !status.success() && outcome.errors.is_empty() {
        outcome.errors.push(format!("pgbench exited with {status}"));
    }
    let (latencies_us, failed_in_log) = read_transaction_logs(dir)?;
    outcome.failed = outcome.failed.max(failed_in_log);
    if !latencies_us.is_empty() {
        let sum: u128 = latencies_us.iter().map(|&us| u128::from(us)).sum();
        outcome.mean_ms = sum as f64 / latencies_us.len() as f64 / 1000.0;
        outcome.p99_ms = percentile(latencies_us, 0.99) as f64 / 1000.0;
    }
    if outcome.transactions == 0 && outcome.errors.is_empty() {
        outcome
            .errors
            .push(format!("pgbench reported no transactions:\n{}", process.log_tail(20)));
    }
    Ok(outcome)
}

/// Reads the numbers of pgbench's summary and its error lines.
fn parse_summary(text: &str) -> Outcome {
    let mut outcome = Outcome::default();
    let first_number = |s: &str| -> Option<f64> { s.split_whitespace().next().and_then(|n| n.parse().ok()) };
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("number of transactions actually processed:") {
            // "123456" or, with -t, "123/200".
            let count = rest.trim().split('/').next().unwrap_or("");
            outcome.transactions = count.trim().parse().unwrap_or(0);
        } else if let Some(rest) = line.strip_prefix("number of failed transactions:") {
            outcome.failed = first_number(rest).map_or(0, |n| n as u64);
        } else if let Some(rest) = line.strip_prefix("tps = ") {
            outcome.tps = first_number(rest).unwrap_or(0.0);
        } else if line.contains("error") || line.contains("aborted") || line.contains("FATAL") {
            // Keep the first few; one failing client can print thousands.
            if outcome.errors.len() < 5 {
                outcome.errors.push(line.trim().to_owned());
            }
        }
    }
    outcome
}

/// Latencies (µs) of every successful transaction in the per-transaction logs under `dir`, and
/// the number of failed ones. pgbench writes `tx.PID` for its first thread and `tx.PID.N` for
/// the others; each line is `client_id transaction_no time script_no time_epoch time_us`, with
/// `time` being the latency in µs, or "failed"/"skipped" instead of a number.
fn read_transaction_logs(dir: &Path) -> Result<(Vec<u64>, u64), String> {
    let mut latencies = Vec::new();
    let mut failed = 0;
    let entries = std::fs::read_dir(dir).map_err(|e| format!("reading {}: {e}", dir.display()))?;
    let logs: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| path.file_name().is_some_and(|n| n.to_string_lossy().starts_with("tx.")))
        .collect();
    for path in logs {
        let text = std::fs::read_to_string(&path).map_err(|e| format!("reading {}: {e}", path.display()))?;
        for line in text.lines() {
            match line.split_whitespace().nth(2).map(str::parse::<u64>) {
                Some(Ok(us)) => latencies.push(us),
                Some(Err(_)) => failed += 1,
                None => {}
            }
        }
        // Up to a few hundred MB over a full run: do not keep them.
        let _ = std::fs::remove_file(&path);
    }
    Ok((latencies, failed))
}

/// The nearest-rank percentile `q` (0..1) of `values`.
fn percentile(mut values: Vec<u64>, q: f64) -> u64 {
    if values.is_empty() {
        return 0;
    }
    let rank = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len());
    let (_, value, _) = values.select_nth_unstable(rank - 1);
    *value
}
