//! Heap allocations per transaction and heap bytes per idle client, counted exactly by a
//! counting global allocator around pgrelay running in this process against a real
//! PostgreSQL (`pgrelay::localpg`).
//!
//! ```text
//! cargo bench --bench allocations
//! ```
//!
//! Unlike CPU time, these figures do not depend on how busy the machine is: the same
//! build gives the same counts (± a few allocations of pgrelay's background tasks, whose
//! rate is printed). The clients are plain blocking sockets on threads whose own
//! allocations are not counted; they send pre-built messages and read the replies into a
//! fixed buffer, so every counted allocation is pgrelay's (or its runtime's).
//!
//! Environment variables:
//!
//! | variable | default | meaning |
//! |---|---|---|
//! | `PGRELAY_BENCH_TXNS` | 20000 | measured transactions per scenario (after 2,000 of warm-up); 0 skips them |
//! | `PGRELAY_BENCH_IDLE_CLIENTS` | 2000 | idle logged-in clients for the memory figure; 0 skips it |
//! | `PGRELAY_BENCH_WORKERS` | 2 | pgrelay's worker threads |

#![allow(clippy::unwrap_used, clippy::expect_used)] // benchmark code: a failed expectation ends the run
#![allow(unsafe_code)] // a global allocator cannot be written without it

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::ExitCode;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use pgrelay::localpg::{ClusterOptions, LocalCluster};

/// Counts the allocations and live bytes of every thread not marked as a client's.
struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
static ALLOCATED_BYTES: AtomicU64 = AtomicU64::new(0);
static LIVE_BYTES: AtomicI64 = AtomicI64::new(0);

thread_local! {
    /// Set on the benchmark's client threads: their allocations are not pgrelay's.
    static UNCOUNTED: Cell<bool> = const { Cell::new(false) };
}

fn counted() -> bool {
    !UNCOUNTED.try_with(Cell::get).unwrap_or(false)
}

/// `PGRELAY_BENCH_TRACE=1`: the call stacks of the allocations of a few measured
/// transactions are kept, to be printed grouped (to find where they come from).
static TRACING: AtomicBool = AtomicBool::new(false);
static TRACES: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Keeps the call stack of an allocation of `size` bytes while tracing.
fn trace(size: usize) {
    if !TRACING.load(Ordering::Relaxed) {
        return;
    }
    // What tracing allocates is not counted, nor traced again.
    UNCOUNTED.with(|uncounted| uncounted.set(true));
    let stack = std::backtrace::Backtrace::force_capture().to_string();
    let frames: Vec<&str> = stack
        .lines()
        .filter(|line| line.trim_start().starts_with(|c: char| c.is_ascii_digit()))
        .map(|line| line.split_once(": ").map_or(line, |(_, name)| name))
        .filter(|name| !name.contains("allocations::") && !name.contains("alloc::alloc") && !name.contains("backtrace"))
        .take(14)
        .collect();
    if let Ok(mut traces) = TRACES.lock() {
        traces.push(format!("{size} bytes\n    {}", frames.join("\n    ")));
    }
    UNCOUNTED.with(|uncounted| uncounted.set(false));
}

// SAFETY: every method hands the call to the system allocator unchanged; the counters are
// atomics and the thread-local is a const-initialised `Cell`, neither of which allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if counted() {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
            ALLOCATED_BYTES.fetch_add(layout.size() as u64, Ordering::Relaxed);
            LIVE_BYTES.fetch_add(layout.size() as i64, Ordering::Relaxed);
            trace(layout.size());
        }
        // SAFETY: the caller's contract is passed on as is.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if counted() {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
            ALLOCATED_BYTES.fetch_add(layout.size() as u64, Ordering::Relaxed);
            LIVE_BYTES.fetch_add(layout.size() as i64, Ordering::Relaxed);
            trace(layout.size());
        }
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if counted() {
            LIVE_BYTES.fetch_sub(layout.size() as i64, Ordering::Relaxed);
        }
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if counted() {
            // A reallocation is an allocation of its own for this count.
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
            ALLOCATED_BYTES.fetch_add(new_size as u64, Ordering::Relaxed);
            LIVE_BYTES.fetch_add(new_size as i64 - layout.size() as i64, Ordering::Relaxed);
            trace(new_size);
        }
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[derive(Debug, Clone, Copy)]
struct Counts {
    allocations: u64,
    bytes: u64,
    live: i64,
}

fn counts() -> Counts {
    Counts {
        allocations: ALLOCATIONS.load(Ordering::Relaxed),
        bytes: ALLOCATED_BYTES.load(Ordering::Relaxed),
        live: LIVE_BYTES.load(Ordering::Relaxed),
    }
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

fn main() -> ExitCode {
    // `cargo test --all-targets` runs benchmarks too, without `--bench`.
    if !std::env::args().any(|arg| arg == "--bench") {
        println!("allocations: skipped (run it with `cargo bench --bench allocations`)");
        return ExitCode::SUCCESS;
    }
    let txns = env_usize("PGRELAY_BENCH_TXNS", 20_000);
    let idle_clients = env_usize("PGRELAY_BENCH_IDLE_CLIENTS", 2_000);
    let workers = env_usize("PGRELAY_BENCH_WORKERS", 2);

    println!("starting PostgreSQL (primary and one replica) ...");
    let cluster = LocalCluster::new(ClusterOptions {
        replicas: 1,
        primary_conf: vec!["max_connections = 200".to_owned()],
        setup_sql: vec![
            "\\c app".to_owned(),
            "CREATE TABLE IF NOT EXISTS bench_items (id int PRIMARY KEY, value int)".to_owned(),
            "INSERT INTO bench_items SELECT g, 0 FROM generate_series(1, 100) g".to_owned(),
            "GRANT ALL ON bench_items TO PUBLIC".to_owned(),
        ],
        ..ClusterOptions::default()
    })
    .expect("start PostgreSQL");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .expect("runtime");

    let mut rows = Vec::new();
    for setup in Setup::ALL {
        let config = setup.config(&cluster);
        let config = pgrelay::config::parse(&config).unwrap_or_else(|errors| panic!("config invalid:\n{errors}"));
        let running = runtime.block_on(pgrelay::app::start(config)).expect("start pgrelay");
        let addr = running.local_addr();
        for scenario in setup.scenarios().iter().filter(|_| txns > 0) {
            let result = measure_transactions(addr, *scenario, txns);
            println!(
                "{:<48} {:<28} {:>6.2} allocations, {:>7.0} bytes per transaction",
                scenario.name(),
                setup.name(),
                result.0,
                result.1
            );
            rows.push((setup.name(), scenario.name(), result));
        }
        let background = measure_background();
        println!(
            "{:<48} {:<28} {:>6.1} allocations per second",
            "background (no client active, 1 s)",
            setup.name(),
            background
        );
        if idle_clients > 0 && matches!(setup, Setup::Primary) {
            let idle = measure_idle(addr, idle_clients);
            println!(
                "idle clients: {} open; {:.0} heap bytes each (live bytes {} → {}), {:.0} RSS bytes each (RSS {} → {} KiB); \
                 after they left: live bytes {}, RSS {} KiB",
                idle_clients,
                idle.live_per_client,
                idle.live_before,
                idle.live_with,
                idle.rss_per_client,
                idle.rss_before_kib,
                idle.rss_with_kib,
                idle.live_after,
                idle.rss_after_kib
            );
        }
        runtime.block_on(running.shutdown());
    }
    drop(cluster);
    ExitCode::SUCCESS
}

/// How pgrelay is configured for a group of scenarios.
#[derive(Debug, Clone, Copy)]
enum Setup {
    /// Transaction mode, primary only.
    Primary,
    /// Transaction mode, primary and replica, consistency = "eventual".
    Split,
    /// Transaction mode, primary and replica, consistency = "session".
    SplitSession,
}

impl Setup {
    const ALL: [Setup; 3] = [Setup::Primary, Setup::Split, Setup::SplitSession];

    fn name(self) -> &'static str {
        match self {
            Setup::Primary => "primary only",
            Setup::Split => "split, eventual",
            Setup::SplitSession => "split, session",
        }
    }

    fn scenarios(self) -> &'static [Scenario] {
        match self {
            Setup::Primary => &[
                Scenario::SimpleSelect1,
                Scenario::ExtendedSelect1,
                Scenario::SimplePointSelect,
                Scenario::SimpleUpdate,
            ],
            Setup::Split => &[Scenario::SimpleSelect1, Scenario::SimplePointSelect],
            Setup::SplitSession => &[Scenario::SimpleSelect1, Scenario::SimpleUpdate],
        }
    }

    fn config(self, cluster: &LocalCluster) -> String {
        let primary = cluster.primary().addr();
        let replica = cluster.replicas()[0].addr();
        let database = match self {
            Setup::Primary => format!("primary = \"{primary}\"\n"),
            Setup::Split => format!(
                "primary = \"{primary}\"\nreplicas = [\"{replica}\"]\n\n[databases.app.routing]\n\
                 consistency = \"eventual\"\nmax_replica_lag = \"0\"\n"
            ),
            Setup::SplitSession => format!(
                "primary = \"{primary}\"\nreplicas = [\"{replica}\"]\n\n[databases.app.routing]\n\
                 consistency = \"session\"\nmax_replica_lag = \"0\"\n"
            ),
        };
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nmetrics_listen = \"\"\nmax_client_conn = 20000\n\n\
             [pool]\nmode = \"transaction\"\nsize = 4\n\n\
             [[users]]\nname = \"app_trust\"\nauth = \"trust\"\n\n\
             [databases.app]\n{database}"
        )
    }
}

/// What one transaction sends.
#[derive(Debug, Clone, Copy)]
enum Scenario {
    /// `SELECT 1` as a simple query.
    SimpleSelect1,
    /// `SELECT 1` as unnamed Parse, Bind, Describe, Execute, Sync.
    ExtendedSelect1,
    /// `SELECT value FROM bench_items WHERE id = 42` as a simple query (the same text each
    /// time, as with an ORM's parameterised statement).
    SimplePointSelect,
    /// `UPDATE bench_items SET value = value + 1 WHERE id = 7` as a simple query.
    SimpleUpdate,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::SimpleSelect1 => "SELECT 1, simple",
            Scenario::ExtendedSelect1 => "SELECT 1, extended (unnamed)",
            Scenario::SimplePointSelect => "SELECT value … WHERE id = 42, simple",
            Scenario::SimpleUpdate => "UPDATE … WHERE id = 7 (autocommit), simple",
        }
    }

    fn messages(self) -> Vec<u8> {
        match self {
            Scenario::SimpleSelect1 => query("SELECT 1"),
            Scenario::SimplePointSelect => query("SELECT value FROM bench_items WHERE id = 42"),
            Scenario::SimpleUpdate => query("UPDATE bench_items SET value = value + 1 WHERE id = 7"),
            Scenario::ExtendedSelect1 => {
                let mut out = Vec::new();
                // Parse: name, text, no parameter types.
                out.extend(message(b'P', b"\0SELECT 1\0\0\0"));
                // Bind: portal, statement, no formats, no parameters, no result formats.
                out.extend(message(b'B', b"\0\0\0\0\0\0\0\0"));
                out.extend(message(b'D', b"P\0"));
                out.extend(message(b'E', b"\0\0\0\0\0"));
                out.extend(message(b'S', b""));
                out
            }
        }
    }
}

fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    out.extend_from_slice(body);
    out
}

fn query(sql: &str) -> Vec<u8> {
    let mut body = sql.as_bytes().to_vec();
    body.push(0);
    message(b'Q', &body)
}

/// A logged-in client on a blocking socket that reads into a fixed buffer.
struct Client {
    stream: TcpStream,
    buf: Vec<u8>,
    /// Bytes in `buf` not yet looked at: `buf[start..end]`.
    start: usize,
    end: usize,
}

impl Client {
    /// Logs in as app_trust to database app.
    fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect(addr).expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        let mut body = 196_608u32.to_be_bytes().to_vec();
        body.extend_from_slice(b"user\0app_trust\0database\0app\0\0");
        let mut packet = ((body.len() + 4) as u32).to_be_bytes().to_vec();
        packet.extend_from_slice(&body);
        let mut client = Client {
            stream,
            buf: vec![0; 16 * 1024],
            start: 0,
            end: 0,
        };
        client.stream.write_all(&packet).expect("startup");
        client.until_ready();
        client
    }

    /// Reads messages until ReadyForQuery; panics on an ErrorResponse.
    fn until_ready(&mut self) {
        loop {
            while self.end - self.start >= 5 {
                let tag = self.buf[self.start];
                let len =
                    u32::from_be_bytes(self.buf[self.start + 1..self.start + 5].try_into().expect("4 bytes")) as usize;
                if self.end - self.start < len + 1 {
                    break;
                }
                if tag == b'E' {
                    panic!(
                        "error from pgrelay: {}",
                        String::from_utf8_lossy(&self.buf[self.start + 5..self.start + 1 + len])
                    );
                }
                self.start += len + 1;
                if tag == b'Z' {
                    return;
                }
            }
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            let read = self.stream.read(&mut self.buf[self.end..]).expect("read");
            assert!(read > 0, "pgrelay closed the connection");
            self.end += read;
        }
    }

    fn transaction(&mut self, messages: &[u8]) {
        self.stream.write_all(messages).expect("write");
        self.until_ready();
    }
}

/// Runs `count` transactions of `scenario` on one client after a warm-up; returns the
/// allocations and bytes allocated per transaction.
fn measure_transactions(addr: SocketAddr, scenario: Scenario, count: usize) -> (f64, f64) {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                UNCOUNTED.with(|uncounted| uncounted.set(true));
                let messages = scenario.messages();
                let mut client = Client::connect(addr);
                for _ in 0..2_000 {
                    client.transaction(&messages);
                }
                let before = counts();
                for _ in 0..count {
                    client.transaction(&messages);
                }
                let after = counts();
                if std::env::var_os("PGRELAY_BENCH_TRACE").is_some() {
                    TRACING.store(true, Ordering::Relaxed);
                    for _ in 0..TRACED {
                        client.transaction(&messages);
                    }
                    TRACING.store(false, Ordering::Relaxed);
                    print_traces();
                }
                (
                    (after.allocations - before.allocations) as f64 / count as f64,
                    (after.bytes - before.bytes) as f64 / count as f64,
                )
            })
            .join()
            .expect("client thread")
    })
}

/// Transactions whose allocations are traced with `PGRELAY_BENCH_TRACE`.
const TRACED: usize = 20;

/// Prints the traced call stacks, most frequent first, and forgets them.
fn print_traces() {
    let traces = TRACES
        .lock()
        .map(|mut traces| std::mem::take(&mut *traces))
        .unwrap_or_default();
    let mut grouped: std::collections::BTreeMap<String, usize> = std::collections::BTreeMap::new();
    for trace in traces {
        *grouped.entry(trace).or_default() += 1;
    }
    let mut grouped: Vec<(String, usize)> = grouped.into_iter().collect();
    grouped.sort_by_key(|entry| std::cmp::Reverse(entry.1));
    for (trace, count) in grouped {
        println!("{:.2} per transaction: {trace}", count as f64 / TRACED as f64);
    }
}

/// Allocations per second while no client does anything (pgrelay's own tasks: health
/// checks, the janitor, the watchdog).
fn measure_background() -> f64 {
    let before = counts();
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    (counts().allocations - before.allocations) as f64 / started.elapsed().as_secs_f64()
}

struct Idle {
    live_before: i64,
    live_with: i64,
    live_after: i64,
    live_per_client: f64,
    rss_before_kib: u64,
    rss_with_kib: u64,
    rss_after_kib: u64,
    rss_per_client: f64,
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// Opens `count` logged-in clients that each ran `SELECT 1` once, and reads pgrelay's live
/// heap bytes and the process's RSS before, with them idle, and after they left.
fn measure_idle(addr: SocketAddr, count: usize) -> Idle {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                UNCOUNTED.with(|uncounted| uncounted.set(true));
                let select = query("SELECT 1");
                // One client first, so that lazily made state exists in the "before" figure.
                Client::connect(addr).transaction(&select);
                std::thread::sleep(Duration::from_secs(1));
                let mut clients = Vec::with_capacity(count);
                let live_before = counts().live;
                let rss_before_kib = rss_kib();
                for _ in 0..count {
                    let mut client = Client::connect(addr);
                    client.transaction(&select);
                    // Only the socket is kept: the client's buffer would be in the RSS.
                    clients.push(client.stream);
                }
                std::thread::sleep(Duration::from_secs(1));
                let live_with = counts().live;
                let rss_with_kib = rss_kib();
                let terminate = message(b'X', b"");
                for mut client in clients {
                    let _ = client.write_all(&terminate);
                }
                std::thread::sleep(Duration::from_secs(2));
                Idle {
                    live_before,
                    live_with,
                    live_after: counts().live,
                    live_per_client: (live_with - live_before) as f64 / count as f64,
                    rss_before_kib,
                    rss_with_kib,
                    rss_after_kib: rss_kib(),
                    rss_per_client: (rss_with_kib.saturating_sub(rss_before_kib) * 1024) as f64 / count as f64,
                }
            })
            .join()
            .expect("client thread")
    })
}
