//! What a password-guessing client costs everyone else: pgbench with 50 clients logging in
//! and out (`-C`, one login per transaction) through pgrelay as user `app` from 127.0.0.1,
//! while an attacker on 127.0.0.2 tries 1,000 wrong passwords for another user, 20 at a
//! time, starting 3 s into the run. The attacker runs on a thread and runtime of its own, so
//! its own work does not run on pgrelay's workers (it does share the machine's cores).
//!
//! Three runs, each on a fresh pgrelay: no attack; the attack with `[server.login_rate]` at
//! its defaults; the attack with the limiter off; `ROUNDS` times over. Printed per run:
//! pgbench's logins per second over the whole run and over the seconds the attack lasted
//! (from `pgbench -P 1`), the change against the run without attack, how long the attack
//! took and how its attempts were answered.
//!
//! Run: `cargo bench --bench login_attack`. Environment: `ATTACK_SECONDS` (pgbench -T, 15),
//! `ROUNDS` (2).

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark: a failure ends it

use std::collections::BTreeMap;
use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use pgrelay::localpg::{ClusterOptions, LocalCluster};
use tokio::sync::Mutex;

const ATTACKERS: usize = 20;
const ATTEMPTS: usize = 1000;
/// The attack starts this long after pgbench, once its clients are all logging in.
const ATTACK_AFTER: Duration = Duration::from_secs(3);

fn main() -> ExitCode {
    if !std::env::args().any(|arg| arg == "--bench") {
        println!("login_attack: skipped (run it with `cargo bench --bench login_attack`)");
        return ExitCode::SUCCESS;
    }
    let seconds: u64 = std::env::var("ATTACK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(15);
    let cluster = LocalCluster::new(ClusterOptions {
        replicas: 0,
        primary_conf: vec!["max_connections = 200".to_owned()],
        ..ClusterOptions::default()
    })
    .expect("start PostgreSQL");
    let pgbench = cluster.bin_path("pgbench").expect("pgbench");
    let primary = cluster.primary().addr();
    let (_, port) = primary.rsplit_once(':').unwrap();
    let init = Command::new(&pgbench)
        .args(["-i", "-q", "-s", "1", "-h", "127.0.0.1", "-p", port, "-U", "app", "app"])
        .env("PGPASSWORD", "app")
        .output()
        .expect("pgbench -i");
    assert!(init.status.success(), "{}", String::from_utf8_lossy(&init.stderr));
    let rounds: usize = std::env::var("ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(2);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!(
        "pgbench -C -S -c 50 -j 2 -T {seconds} through pgrelay; {ATTEMPTS} wrong passwords, {ATTACKERS} at a time\n"
    );
    println!(
        "{:<30} {:>9} {:>8} {:>17} {:>8} {:>9}   attacker's attempts (by answer)",
        "run", "logins/s", "change", "during attack", "change", "attack"
    );
    for _ in 0..rounds {
        let mut baseline = None;
        for (name, login_rate, attack) in [
            ("no attack, defaults", "", false),
            ("attack, login_rate defaults", "", true),
            (
                "attack, limiter off",
                "[server.login_rate]\nattempts_per_second = 0\nban_after = 0\nfailed_delay = \"0\"\n",
                true,
            ),
        ] {
            let outcome = runtime.block_on(run(&primary, &pgbench, seconds, login_rate, attack));
            let base = *baseline.get_or_insert(outcome.rate);
            let change = (outcome.rate / base - 1.0) * 100.0;
            let (during, during_change, took) = match outcome.during {
                Some((during, took)) => (
                    format!("{during:.1}"),
                    format!("{:+.1}%", (during / base - 1.0) * 100.0),
                    format!("{:.1}s", took.as_secs_f64()),
                ),
                None => ("-".to_owned(), "-".to_owned(), "-".to_owned()),
            };
            let answers: Vec<String> = outcome
                .answers
                .iter()
                .map(|(key, count)| format!("{key}: {count}"))
                .collect();
            println!(
                "{name:<30} {:>9.1} {change:>+7.1}% {during:>17} {during_change:>8} {took:>9}   {}",
                outcome.rate,
                answers.join(", ")
            );
        }
    }
    ExitCode::SUCCESS
}

/// What one run measured.
struct Outcome {
    /// pgbench's logins (= transactions, with -C) per second over the run.
    rate: f64,
    /// Logins per second over the whole seconds the attack lasted, and how long it took.
    during: Option<(f64, Duration)>,
    answers: BTreeMap<String, usize>,
}

async fn run(primary: &str, pgbench: &std::path::Path, seconds: u64, login_rate: &str, attack: bool) -> Outcome {
    let config = format!(
        r#"
[server]
listen = "127.0.0.1:0"
metrics_listen = ""
{login_rate}
[pool]
size = 20

[[users]]
name = "app"
password = "app"

[[users]]
name = "admin_target"
password = "the right one"

[databases.app]
primary = "{primary}"
"#
    );
    let config = pgrelay::config::parse(&config).unwrap();
    let running = pgrelay::app::start(config).await.unwrap();
    let addr = running.local_addr();
    let answers = Arc::new(Mutex::new(BTreeMap::<String, usize>::new()));
    let pgbench = pgbench.to_owned();
    let port = addr.port().to_string();
    let started = Instant::now();
    let bench = tokio::task::spawn_blocking(move || {
        Command::new(pgbench)
            .args([
                "-n",
                "-C",
                "-S",
                "-c",
                "50",
                "-j",
                "2",
                "-P",
                "1",
                "-T",
                &seconds.to_string(),
            ])
            .args(["-h", "127.0.0.1", "-p", &port, "-U", "app", "app"])
            .env("PGPASSWORD", "app")
            .output()
            .expect("pgbench")
    });
    // The attacker on a thread of its own, with its own runtime.
    let attacker = attack.then(|| {
        let answers = answers.clone();
        std::thread::spawn(move || {
            std::thread::sleep(ATTACK_AFTER);
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let begun = started.elapsed();
            runtime.block_on(async move {
                let attempts = Arc::new(AtomicUsize::new(0));
                let mut tasks = Vec::new();
                for _ in 0..ATTACKERS {
                    let (answers, attempts) = (answers.clone(), attempts.clone());
                    tasks.push(tokio::spawn(async move {
                        while attempts.fetch_add(1, Ordering::AcqRel) < ATTEMPTS {
                            let answer = guess(addr).await;
                            *answers.lock().await.entry(answer).or_default() += 1;
                        }
                    }));
                }
                for task in tasks {
                    task.await.unwrap();
                }
            });
            (begun, started.elapsed())
        })
    });
    let output = bench.await.unwrap();
    let window = attacker.map(|attacker| attacker.join().unwrap());
    running.shutdown().await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains("number of failed transactions: 0"),
        "pgbench failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let processed: f64 = stdout
        .lines()
        .find_map(|line| line.strip_prefix("number of transactions actually processed: "))
        .and_then(|rest| rest.split('/').next())
        .and_then(|n| n.trim().parse().ok())
        .expect("pgbench's transaction count");
    let answers = answers.lock().await.clone();
    // "progress: 4.0 s, 180.0 tps, …": the logins of each second.
    let progress: Vec<(f64, f64)> = String::from_utf8_lossy(&output.stderr)
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix("progress: ")?;
            let (at, rest) = rest.split_once(" s, ")?;
            let (tps, _) = rest.split_once(" tps")?;
            Some((at.parse().ok()?, tps.parse().ok()?))
        })
        .collect();
    let during = window.map(|(begun, ended)| {
        // Whole seconds of progress that lie inside the attack (at least the one it ends in).
        let inside: Vec<f64> = progress
            .iter()
            .filter(|(at, _)| *at - 1.0 >= begun.as_secs_f64().floor() && *at <= ended.as_secs_f64().ceil())
            .map(|(_, tps)| *tps)
            .collect();
        let rate = inside.iter().sum::<f64>() / inside.len().max(1) as f64;
        (rate, ended - begun)
    });
    Outcome {
        rate: processed / seconds as f64,
        during,
        answers,
    }
}

/// One wrong password from 127.0.0.2; the SQLSTATE it was answered with.
async fn guess(addr: std::net::SocketAddr) -> String {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let Ok(stream) = socket.connect(addr).await else {
        return "connect failed".to_owned();
    };
    let mut config = tokio_postgres::Config::new();
    config.user("admin_target").password("guess").dbname("app");
    match config.connect_raw(stream, tokio_postgres::NoTls).await {
        Ok(_) => "logged in (!)".to_owned(),
        Err(error) => error
            .code()
            .map_or_else(|| "no SQLSTATE".to_owned(), |code| code.code().to_owned()),
    }
}
