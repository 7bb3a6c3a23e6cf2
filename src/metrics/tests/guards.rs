//! The RAII gauges: counts move with the state, waits are timed, drops leave nothing behind.

use std::time::Duration;

use super::super::{ClientState, Metrics, PinReason};
use super::{clients, gauge, value};

#[test]
fn client_state_guard_counts_one_state_and_leaves_on_drop() {
    let metrics = Metrics::new().unwrap();
    let session = metrics.session("app", "alice");
    let mut first = session.client_state(ClientState::Idle);
    let second = session.client_state(ClientState::Idle);
    assert_eq!(clients(&metrics, "idle"), Some(2.0));

    first.set(ClientState::Waiting);
    assert_eq!(first.state(), ClientState::Waiting);
    assert_eq!(
        (clients(&metrics, "idle"), clients(&metrics, "waiting")),
        (Some(1.0), Some(1.0))
    );
    first.set(ClientState::Waiting); // no-op: still one waiting, wait not yet recorded
    assert_eq!(clients(&metrics, "waiting"), Some(1.0));
    let waits = || {
        value(
            &metrics,
            "pgrelay_pool_wait_seconds",
            "pgrelay_pool_wait_seconds_count",
            &[("database", "app"), ("user", "alice")],
        )
    };
    assert_eq!(waits(), Some(0.0));

    std::thread::sleep(Duration::from_millis(2));
    first.set(ClientState::Active);
    assert_eq!(
        (clients(&metrics, "waiting"), clients(&metrics, "active")),
        (Some(0.0), Some(1.0))
    );
    assert_eq!(waits(), Some(1.0));
    let waited = value(
        &metrics,
        "pgrelay_pool_wait_seconds",
        "pgrelay_pool_wait_seconds_sum",
        &[("database", "app"), ("user", "alice")],
    );
    assert!(waited.unwrap() >= 0.002, "{waited:?}");

    first.set(ClientState::Idle);
    assert_eq!(waits(), Some(1.0), "leaving active records no wait");
    drop(first);
    drop(second);
    for state in ["active", "waiting", "idle"] {
        assert_eq!(clients(&metrics, state), Some(0.0), "{state}");
    }
}

#[test]
fn a_client_dropped_while_waiting_records_its_wait() {
    let metrics = Metrics::new().unwrap();
    let session = metrics.session("app", "alice");
    let mut client = session.client_state(ClientState::Idle);
    client.set(ClientState::Waiting);
    drop(client);
    assert_eq!(clients(&metrics, "waiting"), Some(0.0));
    let waits = value(
        &metrics,
        "pgrelay_pool_wait_seconds",
        "pgrelay_pool_wait_seconds_count",
        &[("database", "app"), ("user", "alice")],
    );
    assert_eq!(waits, Some(1.0));
}

#[test]
fn pinned_gauge_counts_each_reason_once_and_clears_on_drop() {
    let metrics = Metrics::new().unwrap();
    let session = metrics.session("app", "alice");
    let pinned = |reason| {
        gauge(
            &metrics,
            "pgrelay_pinned_sessions",
            &[("database", "app"), ("reason", reason)],
        )
    };
    let mut first = session.pins();
    let mut second = session.pins();
    assert!(!first.is_pinned());
    assert!(first.insert(PinReason::TempTable));
    assert!(
        !first.insert(PinReason::TempTable),
        "a reason is counted once per client"
    );
    assert!(first.insert(PinReason::Listen));
    assert!(second.insert(PinReason::TempTable));
    assert_eq!(pinned("temp_table"), Some(2.0));
    assert_eq!(pinned("listen"), Some(1.0));
    assert_eq!(
        first.reasons().collect::<Vec<_>>(),
        [PinReason::TempTable, PinReason::Listen]
    );

    assert!(first.remove(PinReason::TempTable));
    assert!(!first.remove(PinReason::TempTable));
    assert!(first.is_pinned() && first.contains(PinReason::Listen));
    assert_eq!(pinned("temp_table"), Some(1.0));
    second.clear();
    assert_eq!(pinned("temp_table"), Some(0.0));
    drop(first);
    for reason in PinReason::ALL {
        assert_eq!(pinned(reason.label()), Some(0.0), "{reason:?}");
    }
}
