//! The scrape-time state source: what it reports is exported, what it stops reporting goes.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::super::{Metrics, Role};
use super::{gauge, pool, scrape};

#[test]
fn the_state_source_fills_series_and_clears_those_that_disappear() {
    let metrics = Metrics::new().unwrap();
    let pools = Arc::new(Mutex::new(vec![
        ("10.0.0.1:5432", Role::Primary, pool(10, 4, 6, 0, 250)),
        ("10.0.0.2:5432", Role::Replica, pool(10, 10, 0, 2, 1500)),
    ]));
    let source = pools.clone();
    metrics.set_state_source(move |sink| {
        for (host, role, state) in source.lock().unwrap().iter() {
            sink.pool("app", "alice", *role, host, *state);
            sink.backend("app", *role, host, *role == Role::Primary);
            if *role == Role::Replica {
                sink.replica_lag("app", host, Duration::from_millis(1500));
            }
        }
    });

    let pool_labels = |host| {
        [
            ("database", "app"),
            ("user", "alice"),
            ("role", "replica"),
            ("host", host),
        ]
    };
    let servers = |host, state| {
        gauge(
            &metrics,
            "pgrelay_servers",
            &[
                ("database", "app"),
                ("user", "alice"),
                ("role", "replica"),
                ("host", host),
                ("state", state),
            ],
        )
    };
    assert_eq!(
        gauge(&metrics, "pgrelay_pool_size", &pool_labels("10.0.0.2:5432")),
        Some(10.0)
    );
    assert_eq!(
        gauge(&metrics, "pgrelay_pool_saturation", &pool_labels("10.0.0.2:5432")),
        Some(1.0)
    );
    assert_eq!(servers("10.0.0.2:5432", "active"), Some(10.0));
    assert_eq!(servers("10.0.0.2:5432", "login"), Some(2.0));
    assert_eq!(
        gauge(
            &metrics,
            "pgrelay_pool_max_wait_seconds",
            &[("database", "app"), ("user", "alice")]
        ),
        Some(1.5),
        "the longest wait over the user's pools"
    );
    assert_eq!(
        gauge(
            &metrics,
            "pgrelay_backend_up",
            &[("database", "app"), ("role", "replica"), ("host", "10.0.0.2:5432")]
        ),
        Some(0.0)
    );
    assert_eq!(
        gauge(
            &metrics,
            "pgrelay_replica_lag_seconds",
            &[("database", "app"), ("host", "10.0.0.2:5432")]
        ),
        Some(1.5)
    );

    // A reload removes the replica's pool.
    pools.lock().unwrap().truncate(1);
    let families = scrape(&metrics);
    for family in [
        "pgrelay_servers",
        "pgrelay_pool_size",
        "pgrelay_pool_saturation",
        "pgrelay_backend_up",
    ] {
        assert!(
            families[family]
                .samples
                .iter()
                .all(|s| s.labels["host"] == "10.0.0.1:5432"),
            "{family} kept a removed pool"
        );
    }
    assert!(!families.contains_key("pgrelay_replica_lag_seconds"));
    assert_eq!(
        families["pgrelay_pool_max_wait_seconds"].get(
            "pgrelay_pool_max_wait_seconds",
            &[("database", "app"), ("user", "alice")]
        ),
        Some(0.25)
    );
    let saturation = families["pgrelay_pool_saturation"].get(
        "pgrelay_pool_saturation",
        &[
            ("database", "app"),
            ("user", "alice"),
            ("role", "primary"),
            ("host", "10.0.0.1:5432"),
        ],
    );
    assert_eq!(saturation, Some(0.4));
}

#[test]
fn saturation_stays_within_zero_and_one() {
    let metrics = Metrics::new().unwrap();
    metrics.set_state_source(|sink| {
        sink.pool("app", "alice", Role::Primary, "reserve:1", pool(2, 3, 0, 0, 0)); // using the reserve
        sink.pool("app", "alice", Role::Primary, "empty:1", pool(0, 0, 0, 0, 0));
        sink.pool("app", "alice", Role::Primary, "zero:1", pool(0, 1, 0, 0, 0));
    });
    let saturation = |host| {
        gauge(
            &metrics,
            "pgrelay_pool_saturation",
            &[
                ("database", "app"),
                ("user", "alice"),
                ("role", "primary"),
                ("host", host),
            ],
        )
    };
    assert_eq!(saturation("reserve:1"), Some(1.0));
    assert_eq!(saturation("empty:1"), Some(0.0));
    assert_eq!(saturation("zero:1"), Some(1.0));
}

#[test]
fn a_panicking_state_source_costs_only_its_own_series() {
    let metrics = Metrics::new().unwrap();
    let _session = metrics.session("app", "alice");
    metrics.set_state_source(|sink| {
        sink.backend("app", Role::Primary, "10.0.0.1:5432", true);
        panic!("bug in the state source");
    });
    let families = scrape(&metrics);
    assert!(families.contains_key("pgrelay_clients"));
    assert_eq!(families["pgrelay_backend_up"].samples.len(), 1);
    // Scrapes keep working afterwards (the lock is not left poisoned in a way that matters),
    // and a new source replaces the old one.
    metrics.set_state_source(|sink| sink.backend("app", Role::Primary, "10.0.0.9:5432", false));
    let families = scrape(&metrics);
    assert_eq!(
        families["pgrelay_backend_up"].samples[0].labels["host"],
        "10.0.0.9:5432"
    );
}
