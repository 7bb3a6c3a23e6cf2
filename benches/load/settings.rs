//! What the run covers, from environment variables, and the scenarios that follow from it.

use std::fmt;

use crate::targets::Kind;

/// The role every client logs in as: stored as md5 in PostgreSQL, md5 in pg_hba (see
/// `pgrelay::localpg`). md5 rather than SCRAM so that a login costs the proxies little: with
/// SCRAM, PBKDF2 (4,096 HMAC rounds per login, on the client and, for PgBouncer with a
/// plaintext auth_file, on the proxy too) would dominate the login timing and leak into the CPU
/// per transaction of the 1,000-client runs, where every client logs in during the measurement.
pub const USER: &str = "app_md5";
pub const PASSWORD: &str = "app_md5";
pub const DATABASE: &str = "app";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Script {
    /// `pgbench -S`: one `SELECT abalance FROM pgbench_accounts WHERE aid = :aid`.
    SelectOnly,
    /// pgbench's default TPC-B-like transaction: BEGIN, three UPDATEs, a SELECT, an INSERT, END.
    TpcB,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Simple,
    Extended,
}

impl Mode {
    pub fn arg(self) -> &'static str {
        match self {
            Mode::Simple => "simple",
            Mode::Extended => "extended",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scenario {
    pub script: Script,
    pub mode: Mode,
    pub clients: usize,
}

impl Scenario {
    /// For file names.
    pub fn key(&self) -> String {
        let script = match self.script {
            Script::SelectOnly => "select",
            Script::TpcB => "tpcb",
        };
        format!("{script}-{}-{}", self.mode.arg(), self.clients)
    }

    /// The script and protocol, e.g. "select-only, simple".
    pub fn label(&self) -> String {
        let script = match self.script {
            Script::SelectOnly => "select-only (-S)",
            Script::TpcB => "TPC-B-like",
        };
        format!("{script}, {}", self.mode.arg())
    }
}

impl fmt::Display for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}, {} clients", self.label(), self.clients)
    }
}

#[derive(Debug, Clone)]
pub struct Settings {
    /// Seconds per pgbench run (PGRELAY_BENCH_SECONDS, default 15).
    pub seconds: u64,
    /// Every script × protocol combination (PGRELAY_BENCH_FULL=1) instead of the default subset.
    pub full: bool,
    /// pgbench client counts (PGRELAY_BENCH_CLIENTS, default "50,1000").
    pub clients: Vec<usize>,
    /// Idle clients opened for the memory measurement (PGRELAY_BENCH_IDLE_CLIENTS, default 5000;
    /// 0 skips it).
    pub idle_clients: usize,
    /// Times the idle clients are opened and closed again (PGRELAY_BENCH_IDLE_ROUNDS, default 1):
    /// with 2 or more, memory that grows round after round is a leak rather than the allocator
    /// keeping what it had.
    pub idle_rounds: usize,
    /// Server connections per pool, the same for both proxies (PGRELAY_BENCH_POOL_SIZE, default 20).
    pub pool_size: usize,
    /// pgbench scale factor (PGRELAY_BENCH_SCALE, default 10: 1,000,000 accounts).
    pub scale: u32,
    /// pgrelay's `[server] workers` (PGRELAY_BENCH_WORKERS, default 0: one per core).
    pub workers: usize,
    /// Which targets run (PGRELAY_BENCH_TARGETS, default "direct,pgbouncer,pgrelay").
    pub targets: Vec<Kind>,
}

impl Settings {
    pub fn from_env() -> Result<Settings, String> {
        let targets = match std::env::var("PGRELAY_BENCH_TARGETS") {
            Ok(list) => list
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|name| {
                    [Kind::Direct, Kind::PgBouncer, Kind::Pgrelay]
                        .into_iter()
                        .find(|k| k.key() == name)
                        .ok_or_else(|| {
                            format!("PGRELAY_BENCH_TARGETS: unknown target {name:?} (direct, pgbouncer, pgrelay)")
                        })
                })
                .collect::<Result<Vec<_>, _>>()?,
            Err(_) => vec![Kind::Direct, Kind::PgBouncer, Kind::Pgrelay],
        };
        let clients = match std::env::var("PGRELAY_BENCH_CLIENTS") {
            Ok(list) => list
                .split(',')
                .map(|c| {
                    c.trim()
                        .parse::<usize>()
                        .ok()
                        .filter(|&n| (1..=10_000).contains(&n))
                        .ok_or_else(|| format!("PGRELAY_BENCH_CLIENTS: {c:?} is not a number from 1 to 10000"))
                })
                .collect::<Result<Vec<_>, _>>()?,
            Err(_) => vec![50, 1000],
        };
        Ok(Settings {
            seconds: number("PGRELAY_BENCH_SECONDS", 15, 1, 3600)?,
            full: std::env::var("PGRELAY_BENCH_FULL").is_ok_and(|v| !matches!(v.as_str(), "" | "0" | "false")),
            clients,
            idle_clients: number("PGRELAY_BENCH_IDLE_CLIENTS", 5000, 0, 15_000)? as usize,
            idle_rounds: number("PGRELAY_BENCH_IDLE_ROUNDS", 1, 1, 10)? as usize,
            pool_size: number("PGRELAY_BENCH_POOL_SIZE", 20, 1, 500)? as usize,
            scale: number("PGRELAY_BENCH_SCALE", 10, 1, 1000)? as u32,
            workers: number("PGRELAY_BENCH_WORKERS", 0, 0, 64)? as usize,
            targets,
        })
    }

    pub fn wants(&self, kind: Kind) -> bool {
        self.targets.contains(&kind)
    }

    /// The largest number of clients any phase opens at once.
    pub fn peak_clients(&self) -> usize {
        self.clients.iter().copied().max().unwrap_or(0).max(self.idle_clients)
    }

    /// PostgreSQL's max_connections: the direct pgbench clients (when PostgreSQL is a target),
    /// both proxies' pools, and room for pgbench -i and the readiness checks.
    pub fn max_server_connections(&self) -> usize {
        let direct = if self.wants(Kind::Direct) {
            self.clients.iter().copied().max().unwrap_or(0)
        } else {
            0
        };
        direct + 2 * self.pool_size + 50
    }

    /// Client limit for both proxies: room for every phase plus the readiness checks.
    pub fn max_client_conn(&self) -> usize {
        self.peak_clients().max(6000) + 100
    }

    /// The pgbench runs, in order. Each scenario runs every target back to back, so that slow
    /// drifts of the shared machine affect them alike.
    pub fn scenarios(&self) -> Vec<Scenario> {
        // Default: select-only in both protocols (the transaction DESIGN.md's CPU targets are
        // stated for) and TPC-B in the simple protocol; the full matrix adds TPC-B extended.
        let combos: &[(Script, Mode)] = if self.full {
            &[
                (Script::SelectOnly, Mode::Simple),
                (Script::SelectOnly, Mode::Extended),
                (Script::TpcB, Mode::Simple),
                (Script::TpcB, Mode::Extended),
            ]
        } else {
            &[
                (Script::SelectOnly, Mode::Simple),
                (Script::SelectOnly, Mode::Extended),
                (Script::TpcB, Mode::Simple),
            ]
        };
        let mut scenarios = Vec::new();
        for &clients in &self.clients {
            for &(script, mode) in combos {
                scenarios.push(Scenario { script, mode, clients });
            }
        }
        scenarios
    }
}

fn number(name: &str, default: u64, min: u64, max: u64) -> Result<u64, String> {
    match std::env::var(name) {
        Err(_) => Ok(default),
        Ok(text) => text
            .trim()
            .parse::<u64>()
            .ok()
            .filter(|n| (min..=max).contains(n))
            .ok_or_else(|| format!("{name}: {text:?} is not a number from {min} to {max}")),
    }
}
