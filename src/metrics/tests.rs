//! Unit tests: what `/metrics` shows, parsed strictly (here); the guards, the scrape-time
//! source and the HTTP endpoint in `tests/`.

mod guards;
mod http;
mod scrape;
mod text_format;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use super::*;
use text_format::Family;

fn scrape(metrics: &Metrics) -> BTreeMap<String, Family> {
    let body = metrics.render().unwrap();
    let text = String::from_utf8(body).unwrap();
    text_format::parse(&text).unwrap_or_else(|error| panic!("{error}\n{text}"))
}

/// The value of `name{labels}` in family `family`, if the series exists.
fn value(metrics: &Metrics, family: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape(metrics).get(family)?.get(name, labels)
}

fn gauge(metrics: &Metrics, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    value(metrics, name, name, labels)
}

fn clients(metrics: &Metrics, state: &str) -> Option<f64> {
    gauge(
        metrics,
        "pgrelay_clients",
        &[("database", "app"), ("user", "alice"), ("state", state)],
    )
}

fn pool(max_size: usize, active: usize, idle: usize, login: usize, max_wait_ms: u64) -> PoolState {
    PoolState {
        max_size,
        active,
        idle,
        login,
        max_wait: Duration::from_millis(max_wait_ms),
    }
}

/// Every family of docs/metrics.md's table (plus config reloads and the lag limit), with its type and
/// label names.
const FAMILIES: &[(&str, &str, &[&str])] = &[
    ("pgrelay_clients", "gauge", &["database", "user", "state"]),
    (
        "pgrelay_servers",
        "gauge",
        &["database", "user", "role", "host", "state"],
    ),
    ("pgrelay_pool_size", "gauge", &["database", "user", "role", "host"]),
    (
        "pgrelay_pool_saturation",
        "gauge",
        &["database", "user", "role", "host"],
    ),
    ("pgrelay_pool_wait_seconds", "histogram", &["database", "user"]),
    ("pgrelay_pool_max_wait_seconds", "gauge", &["database", "user"]),
    ("pgrelay_queries_total", "counter", &["database", "user", "role"]),
    ("pgrelay_transactions_total", "counter", &["database", "user", "role"]),
    ("pgrelay_query_duration_seconds", "histogram", &["database", "role"]),
    (
        "pgrelay_routing_decisions_total",
        "counter",
        &["database", "role", "reason"],
    ),
    ("pgrelay_backend_up", "gauge", &["database", "role", "host"]),
    ("pgrelay_replica_lag_seconds", "gauge", &["database", "host"]),
    ("pgrelay_max_replica_lag_seconds", "gauge", &["database"]),
    ("pgrelay_server_connect_errors_total", "counter", &["database", "host"]),
    ("pgrelay_client_errors_total", "counter", &["database", "sqlstate"]),
    ("pgrelay_pinned_sessions", "gauge", &["database", "reason"]),
    ("pgrelay_prepared_statements_evictions_total", "counter", &["database"]),
    ("pgrelay_build_info", "gauge", &["version"]),
    ("pgrelay_config_reloads_total", "counter", &["result"]),
    ("pgrelay_runtime_stalls_total", "counter", &[]),
    ("pgrelay_retries_total", "counter", &["database", "reason"]),
    ("pgrelay_login_refusals_total", "counter", &["reason"]),
    ("pgrelay_cancel_requests_total", "counter", &["result"]),
    ("pgrelay_cancel_forward_failures_total", "counter", &[]),
    ("pgrelay_takeover_clients_total", "counter", &["result"]),
    ("pgrelay_user_servers", "gauge", &["user"]),
    ("pgrelay_max_user_connections", "gauge", &["user"]),
    ("pgrelay_database_servers", "gauge", &["database"]),
    ("pgrelay_max_db_connections", "gauge", &["database"]),
    ("pgrelay_login_banned_addresses", "gauge", &[]),
    ("pgrelay_login_tracked_addresses", "gauge", &[]),
];

/// A registry where every family has at least one series.
fn busy_metrics() -> Metrics {
    let metrics = Metrics::new().unwrap();
    let session = metrics.session("app", "alice");
    let _ = session.client_state(ClientState::Idle);
    session.query(Role::Replica, Duration::from_micros(300));
    session.transaction(Role::Replica);
    session.route(Role::Replica, RouteReason::Read);
    session.client_error("53300");
    session.prepared_statements_evicted(2);
    metrics.server_connect_errors("app", "10.0.0.1:5432").inc();
    metrics.retry("app", "connect");
    metrics.login_refusal(crate::metrics::LoginRefusal::Password);
    metrics.cancel_request(crate::metrics::CancelResult::Forwarded);
    metrics.cancel_forward_failure();
    metrics.set_state_source(|sink| {
        sink.pool("app", "alice", Role::Primary, "10.0.0.1:5432", pool(20, 5, 3, 1, 0));
        sink.backend("app", Role::Primary, "10.0.0.1:5432", true);
        sink.backend("app", Role::Replica, "10.0.0.2:5432", true);
        sink.replica_lag("app", "10.0.0.2:5432", Duration::from_millis(120));
        sink.max_replica_lag("app", Duration::from_secs(1));
        sink.user_servers("alice", 3, Some(5));
        sink.database_servers("app", 3, Some(10));
        sink.login_addresses(1, 4);
    });
    metrics
}

#[test]
fn every_family_is_exported_with_its_type_labels_and_help() {
    let families = scrape(&busy_metrics());
    for (name, kind, labels) in FAMILIES {
        let family = families.get(*name).unwrap_or_else(|| panic!("{name} missing"));
        assert_eq!(family.kind, *kind, "{name}");
        assert!(family.help.len() > 10, "{name} has no meaningful HELP");
        let expected: BTreeSet<&str> = labels.iter().copied().collect();
        for sample in &family.samples {
            let mut names: BTreeSet<&str> = sample.labels.keys().map(String::as_str).collect();
            if sample.name.ends_with("_bucket") {
                assert!(names.remove("le"), "{}", sample.name);
            }
            assert_eq!(names, expected, "{}", sample.name);
        }
    }
    let ours: BTreeSet<&str> = FAMILIES.iter().map(|(name, _, _)| *name).collect();
    let exported: BTreeSet<&str> = families.keys().map(String::as_str).collect();
    assert_eq!(exported, ours, "families not in the table above");
}

#[test]
fn histograms_use_the_latency_buckets() {
    let families = scrape(&busy_metrics());
    let family = &families["pgrelay_query_duration_seconds"];
    let bounds: Vec<String> = family
        .samples
        .iter()
        .filter(|s| s.name.ends_with("_bucket") && s.labels["role"] == "replica")
        .map(|s| s.labels["le"].clone())
        .collect();
    assert_eq!(bounds.len(), LATENCY_BUCKETS.len() + 1);
    assert_eq!(bounds.first().map(String::as_str), Some("0.00005"));
    assert_eq!(bounds.last().map(String::as_str), Some("+Inf"));
    let le_500us = family.get(
        "pgrelay_query_duration_seconds_bucket",
        &[("database", "app"), ("role", "replica"), ("le", "0.0005")],
    );
    assert_eq!(le_500us, Some(1.0));
    let le_250us = family.get(
        "pgrelay_query_duration_seconds_bucket",
        &[("database", "app"), ("role", "replica"), ("le", "0.00025")],
    );
    assert_eq!(le_250us, Some(0.0));
}

#[test]
fn build_info_and_reload_results_exist_from_the_start() {
    let metrics = Metrics::new().unwrap();
    assert_eq!(
        gauge(
            &metrics,
            "pgrelay_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        Some(1.0)
    );
    let reloads = |result| {
        value(
            &metrics,
            "pgrelay_config_reloads_total",
            "pgrelay_config_reloads_total",
            &[("result", result)],
        )
    };
    assert_eq!(reloads("ok"), Some(0.0));
    assert_eq!(reloads("error"), Some(0.0));
    metrics.config_reload(ReloadOutcome::Error);
    metrics.config_reload(ReloadOutcome::Ok);
    metrics.config_reload(ReloadOutcome::Ok);
    assert_eq!(reloads("ok"), Some(2.0));
    assert_eq!(reloads("error"), Some(1.0));
}

#[test]
fn a_session_resolves_every_series_at_login_at_zero() {
    let metrics = Metrics::new().unwrap();
    let _session = metrics.session("app", "alice");
    let families = scrape(&metrics);
    for state in ["active", "waiting", "idle"] {
        assert_eq!(clients(&metrics, state), Some(0.0));
    }
    let routing = &families["pgrelay_routing_decisions_total"];
    assert_eq!(routing.samples.len(), Role::ALL.len() * RouteReason::ALL.len());
    assert!(routing.samples.iter().all(|s| s.value == 0.0));
    assert_eq!(families["pgrelay_pinned_sessions"].samples.len(), PinReason::ALL.len());
    let errors: BTreeSet<&str> = families["pgrelay_client_errors_total"]
        .samples
        .iter()
        .map(|s| s.labels["sqlstate"].as_str())
        .collect();
    assert_eq!(errors, ["08006", "08P01", "28P01", "3D000", "42501", "53300"].into());
}

#[test]
fn session_counters_land_in_their_labels_and_are_shared_by_sessions() {
    let metrics = Metrics::new().unwrap();
    let first = metrics.session("app", "alice");
    let second = metrics.session("app", "alice");
    let other_user = metrics.session("app", "bob");
    first.query(Role::Primary, Duration::from_millis(2));
    second.query(Role::Primary, Duration::from_millis(3));
    second.query(Role::Replica, Duration::from_millis(1));
    other_user.query(Role::Primary, Duration::from_millis(1));
    first.transaction(Role::Primary);
    first.route(Role::Primary, RouteReason::Consistency);
    second.route(Role::Primary, RouteReason::Consistency);
    first.prepared_statements_evicted(3);

    let families = scrape(&metrics);
    let queries = &families["pgrelay_queries_total"];
    let q = |user, role| {
        queries.get(
            "pgrelay_queries_total",
            &[("database", "app"), ("user", user), ("role", role)],
        )
    };
    assert_eq!(q("alice", "primary"), Some(2.0));
    assert_eq!(q("alice", "replica"), Some(1.0));
    assert_eq!(q("bob", "primary"), Some(1.0));
    let duration = &families["pgrelay_query_duration_seconds"];
    let count = duration.get(
        "pgrelay_query_duration_seconds_count",
        &[("database", "app"), ("role", "primary")],
    );
    assert_eq!(count, Some(3.0));
    let sum = duration.get(
        "pgrelay_query_duration_seconds_sum",
        &[("database", "app"), ("role", "primary")],
    );
    assert!((sum.unwrap() - 0.006).abs() < 1e-9);
    let transactions = families["pgrelay_transactions_total"].get(
        "pgrelay_transactions_total",
        &[("database", "app"), ("user", "alice"), ("role", "primary")],
    );
    assert_eq!(transactions, Some(1.0));
    let routed = families["pgrelay_routing_decisions_total"].get(
        "pgrelay_routing_decisions_total",
        &[("database", "app"), ("role", "primary"), ("reason", "consistency")],
    );
    assert_eq!(routed, Some(2.0));
    let evicted = families["pgrelay_prepared_statements_evictions_total"]
        .get("pgrelay_prepared_statements_evictions_total", &[("database", "app")]);
    assert_eq!(evicted, Some(3.0));
}

#[test]
fn client_errors_without_a_database_or_with_odd_sqlstates_stay_bounded() {
    let metrics = Metrics::new().unwrap();
    metrics.client_error(None, "53300");
    metrics.client_error(None, "53300");
    metrics.client_error(Some("app"), "57P01");
    metrics.client_error(Some("app"), "not-a-sqlstate\n");
    metrics.session("app", "alice").client_error("08006");
    let errors = |database, sqlstate| {
        value(
            &metrics,
            "pgrelay_client_errors_total",
            "pgrelay_client_errors_total",
            &[("database", database), ("sqlstate", sqlstate)],
        )
    };
    assert_eq!(errors(NO_DATABASE, "53300"), Some(2.0));
    assert_eq!(errors("app", "57P01"), Some(1.0));
    assert_eq!(errors("app", "other"), Some(1.0));
    assert_eq!(errors("app", "08006"), Some(1.0));
}

#[test]
fn label_values_are_escaped() {
    let metrics = Metrics::new().unwrap();
    let database = "we\"ird\\db\nname";
    let session = metrics.session(database, "ünï");
    let _client = session.client_state(ClientState::Active);
    assert_eq!(
        gauge(
            &metrics,
            "pgrelay_clients",
            &[("database", database), ("user", "ünï"), ("state", "active")]
        ),
        Some(1.0)
    );
}

#[test]
fn guards_and_sessions_are_send_and_small() {
    fn send<T: Send + 'static>() {}
    send::<SessionMetrics>();
    send::<ClientStateGauge>();
    send::<PinnedGauge>();
    // Per idle client pgrelay keeps one of each: they must not eat the 1 KiB budget.
    let per_client = size_of::<SessionMetrics>() + size_of::<ClientStateGauge>() + size_of::<PinnedGauge>();
    assert!(per_client <= 64, "{per_client} bytes");
}
