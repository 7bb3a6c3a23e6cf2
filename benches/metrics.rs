//! What counting costs on the data path: an increment on a pre-resolved handle against one
//! that looks its labels up, the session's per-statement calls, the RAII guards, a login's
//! handle resolution, and a whole scrape. `cargo bench --bench metrics`.

// A benchmark whose fixture cannot be built should stop loudly, not measure something else.
#![allow(clippy::unwrap_used)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use pgrelay::metrics::{ClientState, Metrics, PinReason, PoolState, Role, RouteReason};
use prometheus::{IntCounterVec, Opts};

fn counters(c: &mut Criterion) {
    let family = IntCounterVec::new(Opts::new("bench_total", "bench"), &["database", "user", "role"]).unwrap();
    let resolved = family.with_label_values(&["app", "alice", "primary"]);
    let mut group = c.benchmark_group("counter");
    group.bench_function("pre_resolved_inc", |b| b.iter(|| black_box(&resolved).inc()));
    group.bench_function("label_lookup_inc", |b| {
        b.iter(|| family.with_label_values(black_box(&["app", "alice", "primary"])).inc())
    });
    // The same counter from several threads at once: the cache line bounces, which is the
    // real cost when every session of one (database, user) counts into one series.
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(4);
    group.bench_function(format!("pre_resolved_inc_{threads}_threads"), |b| {
        b.iter_custom(|iterations| {
            let start = Instant::now();
            std::thread::scope(|scope| {
                for _ in 0..threads {
                    scope.spawn(|| {
                        for _ in 0..iterations {
                            black_box(&resolved).inc();
                        }
                    });
                }
            });
            start.elapsed()
        })
    });
    group.finish();
}

fn session(c: &mut Criterion) {
    let metrics = Metrics::new().unwrap();
    let session = metrics.session("app", "alice");
    let mut group = c.benchmark_group("session");
    group.bench_function("query", |b| {
        b.iter(|| session.query(black_box(Role::Replica), black_box(Duration::from_micros(180))))
    });
    group.bench_function("transaction", |b| {
        b.iter(|| session.transaction(black_box(Role::Primary)))
    });
    group.bench_function("route", |b| {
        b.iter(|| session.route(black_box(Role::Replica), black_box(RouteReason::Read)))
    });
    // What a login pays: two map look-ups and two Arc clones (the pair already exists).
    group.bench_function("resolve_at_login", |b| {
        b.iter(|| metrics.session(black_box("app"), black_box("alice")))
    });
    group.finish();
}

fn guards(c: &mut Criterion) {
    let metrics = Metrics::new().unwrap();
    let session = metrics.session("app", "alice");
    let mut group = c.benchmark_group("guard");
    let mut client = session.client_state(ClientState::Idle);
    // One transaction in transaction mode: queue for a server (timed), get it, give it back.
    group.bench_function("client_transaction_cycle", |b| {
        b.iter(|| {
            client.set(ClientState::Waiting);
            client.set(ClientState::Active);
            client.set(ClientState::Idle);
        })
    });
    group.bench_function("client_set_same_state", |b| {
        b.iter(|| client.set(black_box(ClientState::Idle)))
    });
    group.bench_function("client_create_drop", |b| {
        b.iter(|| drop(session.client_state(ClientState::Idle)))
    });
    let mut pins = session.pins();
    group.bench_function("pin_insert_remove", |b| {
        b.iter(|| {
            pins.insert(black_box(PinReason::TempTable));
            pins.remove(black_box(PinReason::TempTable));
        })
    });
    group.finish();
}

fn scrape(c: &mut Criterion) {
    let metrics = Metrics::new().unwrap();
    // 10 databases × 5 users × (1 primary + 1 replica) = 100 pools, with live sessions.
    let mut sessions = Vec::new();
    for database in 0..10 {
        for user in 0..5 {
            let session = metrics.session(&format!("db{database}"), &format!("user{user}"));
            session.query(Role::Primary, Duration::from_millis(1));
            sessions.push(session);
        }
    }
    metrics.set_state_source(move |sink| {
        for database in 0..10 {
            let database = format!("db{database}");
            for user in 0..5 {
                let user = format!("user{user}");
                let state = PoolState {
                    max_size: 20,
                    active: 7,
                    idle: 10,
                    login: 1,
                    max_wait: Duration::from_millis(3),
                };
                sink.pool(&database, &user, Role::Primary, "10.0.0.1:5432", state);
                sink.pool(&database, &user, Role::Replica, "10.0.0.2:5432", state);
            }
            sink.backend(&database, Role::Primary, "10.0.0.1:5432", true);
            sink.backend(&database, Role::Replica, "10.0.0.2:5432", true);
            sink.replica_lag(&database, "10.0.0.2:5432", Duration::from_millis(40));
        }
    });
    let size = metrics.render().unwrap().len();
    let mut group = c.benchmark_group("scrape");
    group.bench_function(format!("render_100_pools_{}KiB", size / 1024), |b| {
        b.iter(|| metrics.render().unwrap())
    });
    group.finish();
    drop(sessions);
}

criterion_group!(benches, counters, session, guards, scrape);
criterion_main!(benches);
