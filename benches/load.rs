//! Load benchmark: pgbench against PostgreSQL directly, PgBouncer and pgrelay, on this machine
//! and in the same run, so the figures can be compared with each other (and only with each
//! other: numbers from another run, another day or another machine are not comparable).
//!
//! ```text
//! cargo bench --bench load
//! ```
//!
//! It starts a throwaway PostgreSQL (`pgrelay::localpg`), fills it with `pgbench -i`, starts
//! PgBouncer (installing the Debian package when missing; without it the PgBouncer rows are
//! skipped) and pgrelay's release binary with equal settings, then:
//!
//! - runs pgbench for every scenario against each target in turn, reading TPS from pgbench,
//!   mean and p99 latency from its per-transaction log, and each proxy's CPU time (utime +
//!   stime from /proc/PID/stat) over the run divided by the transactions pgbench counted;
//! - opens thousands of logged-in idle clients through each proxy and reads the growth of its
//!   resident memory (VmRSS), and how long the logins took;
//! - reports, per run, how much CPU the rest of the (shared) machine used meanwhile.
//!
//! The default run (6 scenarios × 3 targets × 15 s) takes about 5 minutes on 2 cores.
//!
//! The Markdown result is printed and written to `target/bench-load.md`. Environment variables:
//!
//! | variable | default | meaning |
//! |---|---|---|
//! | `PGRELAY_BENCH_SECONDS` | 15 | seconds per pgbench run |
//! | `PGRELAY_BENCH_FULL` | unset | `1`: TPC-B in the extended protocol too (8 scenarios, not 6) |
//! | `PGRELAY_BENCH_CLIENTS` | `50,1000` | pgbench client counts |
//! | `PGRELAY_BENCH_IDLE_CLIENTS` | 5000 | idle clients for the memory figure; 0 skips it |
//! | `PGRELAY_BENCH_IDLE_ROUNDS` | 1 | times the idle clients are opened and closed (a leak check) |
//! | `PGRELAY_BENCH_POOL_SIZE` | 20 | server connections per pool, both proxies |
//! | `PGRELAY_BENCH_SCALE` | 10 | pgbench scale factor |
//! | `PGRELAY_BENCH_TARGETS` | `direct,pgbouncer,pgrelay` | which targets run |
//! | `PGRELAY_BENCH_WORKERS` | 0 | pgrelay's `[server] workers` (0: one per core) |
//!
//! Everything listens on 127.0.0.1 only. Every process it starts is stopped by its PID when its
//! guard is dropped, including on errors and panics, and dies with this process otherwise.

#![allow(clippy::unwrap_used, clippy::expect_used)] // benchmark code: a failed expectation ends the run

#[path = "load/idle.rs"]
mod idle;
#[path = "load/pgbench.rs"]
mod pgbench;
#[path = "load/procs.rs"]
mod procs;
#[path = "load/report.rs"]
mod report;
#[path = "load/settings.rs"]
mod settings;
#[path = "load/targets.rs"]
mod targets;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

use pgrelay::localpg::{ClusterOptions, LocalCluster};

use report::{IdleRow, Report, RunRow};
use settings::{Mode, Scenario, Script, Settings};
use targets::{Kind, Target};

fn main() -> ExitCode {
    // `cargo test --all-targets` runs benchmarks too, without `--bench`: a ten-minute load
    // test does not belong there.
    if !std::env::args().any(|arg| arg == "--bench") {
        println!("load: skipped (run it with `cargo bench --bench load`)");
        return ExitCode::SUCCESS;
    }
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("load benchmark failed: {error}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), String> {
    let started = Instant::now();
    let load_before = load_average();
    let settings = Settings::from_env()?;
    let scenarios = settings.scenarios();
    println!(
        "load benchmark: {} scenarios × {} targets, {} s each; {} idle clients; pool size {}",
        scenarios.len(),
        settings.targets.len(),
        settings.seconds,
        settings.idle_clients,
        settings.pool_size
    );
    // Each client is a socket in pgbench or in this process, another in the proxy, plus the
    // proxies' server connections and PostgreSQL's backends for the direct runs.
    let wanted = settings.peak_clients() as u64 * 2 + 1000;
    let nofile = procs::raise_open_files_limit(wanted);
    if nofile < settings.peak_clients() as u64 + 100 {
        eprintln!("warning: the open-files limit is {nofile}; runs with more clients than that will fail");
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("starting a tokio runtime: {e}"))?;
    let work = tempfile::Builder::new()
        .prefix("pgrelay-bench-load-")
        .tempdir()
        .map_err(|e| format!("creating a temp dir: {e}"))?;
    let dir = work.path();

    println!("starting PostgreSQL ...");
    let cluster = LocalCluster::new(ClusterOptions {
        replicas: 0,
        primary_conf: vec![
            format!("max_connections = {}", settings.max_server_connections()),
            // The pgbench data set (~16 MB per scale unit) stays in shared buffers, up to 4 GB.
            format!("shared_buffers = '{}MB'", (64 + 20 * settings.scale).min(4096)),
        ],
        ..ClusterOptions::default()
    })
    .map_err(|e| format!("starting PostgreSQL: {e}"))?;
    let primary = cluster.primary();
    let pgbench_bin = cluster
        .bin_path("pgbench")
        .map_err(|e| format!("finding pgbench: {e}"))?;
    println!("pgbench -i -s {} ...", settings.scale);
    pgbench::init(&pgbench_bin, dir, primary.port(), settings.scale)?;

    let mut report = Report {
        setup: describe_setup(&settings, &cluster, &pgbench_bin, &load_before),
        ..Report::default()
    };
    let mut targets = Vec::new();
    if settings.wants(Kind::Direct) {
        targets.push(Target::direct(primary.port()));
    }
    if settings.wants(Kind::PgBouncer) {
        let run_as = nix::unistd::geteuid().is_root().then(|| cluster.os_user().to_owned());
        match targets::start_pgbouncer(dir, primary.port(), &settings, run_as.as_deref(), &rt) {
            Ok(target) => {
                report.setup.push(version_line(
                    "PgBouncer",
                    Command::new(first_existing(&["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"])).arg("--version"),
                ));
                targets.push(target);
            }
            Err(e) => {
                let note = format!("PgBouncer skipped: {e}");
                eprintln!("{note}");
                report.notes.push(note);
            }
        }
    }
    if settings.wants(Kind::Pgrelay) {
        targets.push(targets::start_pgrelay(dir, primary.port(), &settings, &rt)?);
    }

    if settings.idle_clients > 0 {
        for target in targets.iter_mut().filter(|t| t.pid().is_some()) {
            for round in 1..=settings.idle_rounds {
                println!(
                    "{}: opening {} idle clients (round {round}) ...",
                    target.kind.name(),
                    settings.idle_clients
                );
                let outcome = idle::measure(target, settings.idle_clients, &rt);
                if let Err(e) = target.check_alive() {
                    report.notes.push(e);
                }
                match &outcome {
                    Ok(o) => println!(
                        "  {} open in {:.2} s, {:.2} KiB each, {} failed; RSS {} → {} → {} KiB",
                        o.opened,
                        o.login_time.as_secs_f64(),
                        o.kib_per_client(),
                        o.failed,
                        o.rss_before_kib,
                        o.rss_with_clients_kib,
                        o.rss_after_kib
                    ),
                    Err(e) => println!("  error: {e}"),
                }
                report.idle.push(IdleRow {
                    kind: target.kind,
                    round: (settings.idle_rounds > 1).then_some(round),
                    requested: settings.idle_clients,
                    outcome,
                });
            }
        }
    }

    // Fill PostgreSQL's caches before the first measured run.
    let warm_up = Scenario {
        script: Script::SelectOnly,
        mode: Mode::Simple,
        clients: 8,
    };
    let _ = pgbench::run(&pgbench_bin, &dir.join("warm-up"), primary.port(), &warm_up, 3);

    let total = scenarios.len() * targets.len();
    let mut done = 0;
    for scenario in &scenarios {
        for target in &mut targets {
            done += 1;
            let row = run_one(&pgbench_bin, dir, target, scenario, settings.seconds);
            print_progress(done, total, &row);
            report.runs.push(row);
        }
    }

    report.setup.push(format!(
        "whole run (start-up, idle clients, pgbench): {:.0} s; load average at the end (this benchmark included): {}",
        started.elapsed().as_secs_f64(),
        load_average()
    ));
    let markdown = report.markdown();
    println!("\n{markdown}");
    let out = output_path();
    match std::fs::write(&out, &markdown) {
        Ok(()) => println!("written to {}", out.display()),
        Err(e) => eprintln!("could not write {}: {e}", out.display()),
    }
    // Proxies first (their guards stop them), then PostgreSQL, then the temp dir.
    drop(targets);
    drop(cluster);
    drop(work);
    Ok(())
}

/// One pgbench run against one target, with the proxy's CPU time around it.
fn run_one(pgbench_bin: &Path, dir: &Path, target: &mut Target, scenario: &Scenario, seconds: u64) -> RunRow {
    let mut row = RunRow {
        scenario: *scenario,
        kind: target.kind,
        outcome: Err(String::new()),
        cpu_us_per_txn: None,
        other_load_pct: None,
    };
    if let Err(e) = target.check_alive() {
        row.outcome = Err(e);
        return row;
    }
    let run_dir = dir
        .join("runs")
        .join(format!("{}-{}", scenario.key(), target.kind.key()));
    // Everything the machine did minus what this benchmark's own processes did is other work
    // on a shared machine, which skews this run's figures: the report shows it per run.
    let machine_before = procs::machine_busy_ticks();
    let ours_before = procs::tree_cpu_ticks(std::process::id());
    let started = Instant::now();
    let cpu_before = target.pid().map(procs::cpu_ticks).transpose();
    let outcome = pgbench::run(pgbench_bin, &run_dir, target.port, scenario, seconds);
    let cpu_after = target.pid().map(procs::cpu_ticks).transpose();
    let ours = procs::tree_cpu_ticks(std::process::id()).saturating_sub(ours_before);
    let machine = procs::machine_busy_ticks().saturating_sub(machine_before);
    let ticks = procs::clock_ticks_per_second() as f64;
    let capacity =
        started.elapsed().as_secs_f64() * ticks * std::thread::available_parallelism().map_or(1, usize::from) as f64;
    if capacity > 0.0 {
        row.other_load_pct = Some(machine.saturating_sub(ours) as f64 / capacity * 100.0);
    }
    if let (Ok(Some(before)), Ok(Some(after)), Ok(o)) = (&cpu_before, &cpu_after, &outcome)
        && o.transactions > 0
    {
        let seconds = after.saturating_sub(*before) as f64 / ticks;
        row.cpu_us_per_txn = Some(seconds * 1e6 / o.transactions as f64);
    }
    row.outcome = match target.check_alive() {
        Ok(()) => outcome,
        Err(e) => Err(e),
    };
    let _ = std::fs::remove_dir_all(&run_dir);
    row
}

fn print_progress(done: usize, total: usize, row: &RunRow) {
    let what = format!("[{done}/{total}] {} → {}", row.scenario, row.kind.name());
    match &row.outcome {
        Ok(o) => {
            let cpu = row
                .cpu_us_per_txn
                .map_or_else(String::new, |us| format!(", {us:.1} µs CPU/txn"));
            let other = row
                .other_load_pct
                .map_or_else(String::new, |pct| format!(", other work {pct:.0} %"));
            let errors = if o.errors.is_empty() {
                String::new()
            } else {
                format!(" — errors: {}", o.errors.join("; "))
            };
            println!(
                "{what}: {:.0} tps, mean {:.2} ms, p99 {:.2} ms{cpu}, {} failed{other}{errors}",
                o.tps, o.mean_ms, o.p99_ms, o.failed
            );
        }
        Err(e) => println!("{what}: error: {e}"),
    }
}

/// Machine and software facts for the report's header.
fn describe_setup(settings: &Settings, cluster: &LocalCluster, pgbench_bin: &Path, load_before: &str) -> Vec<String> {
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
            })
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let server = cluster
        .psql(cluster.primary(), "postgres", "SHOW server_version")
        .unwrap_or_else(|_| "?".to_owned());
    let date = Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    vec![
        format!(
            "run: {date}; machine: {cores} cores ({cpu}); PostgreSQL, the proxy and pgbench all share them; \
             load average before the run: {load_before} (other work on the machine)"
        ),
        format!("PostgreSQL {server} (fsync off, synchronous_commit off); {}", {
            let mut cmd = Command::new(pgbench_bin);
            cmd.arg("--version");
            version_line("pgbench", &mut cmd)
        }),
        format!(
            "pgbench scale {}, {} s per run, -j {}, -n, no --rate; transaction pooling with {} server connections for \
             each proxy; md5 logins as `{}`; pgrelay `workers = {}`{}",
            settings.scale,
            settings.seconds,
            cores.max(1),
            settings.pool_size,
            settings::USER,
            settings.workers,
            if settings.workers == 0 { " (one per core)" } else { "" }
        ),
    ]
}

/// The 1-, 5- and 15-minute load averages: other work on a shared machine skews every figure, so
/// the report says how busy it was.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|text| text.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".to_owned())
}

/// The first line a `--version` command prints, or a note that it failed.
fn version_line(name: &str, cmd: &mut Command) -> String {
    match cmd.output() {
        Ok(out) => String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or(name)
            .trim()
            .to_owned(),
        Err(e) => format!("{name} (version unknown: {e})"),
    }
}

fn first_existing(paths: &[&str]) -> PathBuf {
    paths
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from(paths[0]))
}

/// `<target dir>/bench-load.md`; CARGO_TARGET_TMPDIR is `<target dir>/tmp`, so this follows
/// CARGO_TARGET_DIR too.
fn output_path() -> PathBuf {
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    tmp.parent().unwrap_or(tmp).join("bench-load.md")
}
