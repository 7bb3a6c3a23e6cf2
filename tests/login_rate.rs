//! Login rate limiting end to end (`[server.login_rate]`): failed passwords from one
//! address are answered later and later, then the address is banned (even with the right
//! password) while other addresses log in; logins beyond the burst wait for tokens and get
//! in, while a flood of failing attempts is refused with 53300, per address and per user
//! name; cancel requests from a banned address still cancel; every refusal is counted by
//! reason.
//!
//! Clients bind their sockets to 127.0.0.x to come from distinct addresses. The attack
//! measured against a pgbench load is `benches/login_attack.rs`, not a test: its numbers
//! depend on the machine.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is a failed test

mod common;

use std::time::{Duration, Instant};

use common::{
    Proxy, config_for, connect_from, first_value, login_refusals, message, shared_cluster, sqlstate, stream_from,
};
use tokio_postgres::NoTls;

fn config(login_rate: &str) -> String {
    config_for(shared_cluster(), "size = 4")
        .replace("\n[pool]", &format!("\n[server.login_rate]\n{login_rate}\n\n[pool]"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_passwords_are_delayed_then_the_address_is_banned() {
    let proxy = Proxy::start(&config(
        "attempts_per_second = 1000\nburst = 1000\nfailed_delay = \"40ms\"\nban_after = 5\nban_duration = \"1m\"",
    ))
    .await;
    for failure in 1..=5u32 {
        let started = Instant::now();
        let error = connect_from(proxy.addr, "127.0.0.7", "app", "wrong", "app")
            .await
            .unwrap_err();
        assert_eq!(sqlstate(&error), "28P01", "{error:?}");
        // The answer waits failed_delay times the address's failures (a lower bound only:
        // a busy machine may take longer, never shorter).
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(40) * failure,
            "failure {failure} answered after {waited:?}"
        );
    }
    let banned = connect_from(proxy.addr, "127.0.0.7", "app", "app", "app")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&banned), "28000");
    assert!(
        message(&banned).starts_with("address \"127.0.0.7\" is banned for "),
        "{}",
        message(&banned)
    );
    // Other addresses, and the same user from them, are not affected.
    let other = connect_from(proxy.addr, "127.0.0.8", "app", "app", "app")
        .await
        .unwrap();
    assert_eq!(first_value(&other.simple_query("SELECT 1").await.unwrap()), "1");
    assert_eq!(login_refusals(&proxy, "password"), 5.0);
    assert_eq!(login_refusals(&proxy, "ban"), 1.0);
    let text = String::from_utf8(proxy.running().shared().metrics.render().unwrap()).unwrap();
    assert!(text.contains("pgrelay_login_banned_addresses 1"), "{text}");

    // A cancel request from the banned address is not a login: it still cancels.
    let cancel_token = other.cancel_token();
    let running = tokio::spawn(async move { other.simple_query("SELECT pg_sleep(30)").await.map(|_| ()) });
    common::wait_until("the sleep runs", Duration::from_secs(10), || async {
        !proxy
            .running()
            .shared()
            .registry
            .clients()
            .iter()
            .all(|client| client.state().as_str() != "active")
    })
    .await;
    let stream = stream_from("127.0.0.7", proxy.addr).await;
    cancel_token.cancel_query_raw(stream, NoTls).await.unwrap();
    let cancelled = tokio::time::timeout(Duration::from_secs(20), running)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert_eq!(sqlstate(&cancelled), "57014");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logins_beyond_the_burst_wait_for_tokens_and_a_flood_of_failures_is_refused() {
    let proxy = Proxy::start(&config(
        "attempts_per_second = 20\nburst = 5\nfailed_delay = \"0\"\nban_after = 0",
    ))
    .await;
    // 30 logins at once from one address, six times the burst: the attempts beyond it wait
    // for tokens (refilled, and given back by the logins that succeed) and all get in.
    let logins: Vec<_> = (0..30)
        .map(|_| tokio::spawn(connect_from(proxy.addr, "127.0.0.10", "app", "app", "app")))
        .collect();
    for login in logins {
        login.await.unwrap().unwrap();
    }
    assert_eq!(login_refusals(&proxy, "rate"), 0.0);
    proxy.shutdown().await;

    let proxy = Proxy::start(&config(
        "attempts_per_second = 1\nburst = 3\nfailed_delay = \"0\"\nban_after = 0",
    ))
    .await;
    // Failures keep their tokens: of 12 wrong passwords at once, the burst is answered
    // 28P01, a few more after waiting for a token, and the rest are refused with 53300 after
    // waiting at most 2 s, before any password is asked for.
    let outcomes = flood(&proxy, |_| ("127.0.0.11".to_owned(), "app_t8")).await;
    let failed = outcomes.iter().filter(|(code, _)| code == "28P01").count();
    let refused: Vec<_> = outcomes.iter().filter(|(code, _)| code == "53300").collect();
    assert!((3..=7).contains(&failed), "{outcomes:?}");
    assert_eq!(failed + refused.len(), 12, "{outcomes:?}");
    assert_eq!(
        refused[0].1,
        "too many login attempts from address \"127.0.0.11\" (server.login_rate: 1 per second, burst 3); try again later"
    );
    assert_eq!(login_refusals(&proxy, "rate"), refused.len() as f64);
    // The user name's own bucket: the same flood from 12 addresses.
    let outcomes = flood(&proxy, |index| (format!("127.0.1.{}", index + 1), "app_t9")).await;
    let for_user = outcomes
        .iter()
        .filter(|(_, message)| message.starts_with("too many login attempts for user \"app_t9\""))
        .count();
    assert!(for_user >= 5, "{outcomes:?}");
    proxy.shutdown().await;
}

/// 12 wrong passwords at once, the i-th from the address and as the user `who(i)` says;
/// the SQLSTATE and message of each answer.
async fn flood(proxy: &Proxy, who: impl Fn(usize) -> (String, &'static str)) -> Vec<(String, String)> {
    let attempts: Vec<_> = (0..12)
        .map(|index| {
            let (source, user) = who(index);
            let addr = proxy.addr;
            tokio::spawn(async move { connect_from(addr, &source, user, "wrong", "app").await })
        })
        .collect();
    let mut outcomes = Vec::new();
    for attempt in attempts {
        let error = attempt.await.unwrap().unwrap_err();
        outcomes.push((sqlstate(&error), message(&error)));
    }
    outcomes
}
