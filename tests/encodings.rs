//! End-to-end: clients whose client_encoding is not UTF-8 (LATIN9, WIN1252, EUC_JP, SJIS),
//! their text sent and their answers compared as bytes. Text pgrelay can read is routed
//! as in UTF-8 (reads to the replica); SJIS text, whose characters may end in a byte that
//! looks like a backslash, runs on the primary unread; prepared statements with such names
//! and text work in transaction mode; the server's errors and notices arrive byte for byte;
//! and the greeting spells every parameter as the server does.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is a failed test

mod common;

use std::time::Duration;

use common::raw::{Raw, bind_bytes, error_field, execute, message, parse_bytes, query_bytes, row_values, sync};
use common::{Proxy, config_for, config_with_replica, shared_cluster};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

type Row = Vec<Option<Vec<u8>>>;

/// The rows of one simple query, which must succeed.
async fn rows(raw: &mut Raw, sql: &[u8]) -> Vec<Row> {
    raw.send(&[query_bytes(sql)]).await;
    collect_rows(raw, sql).await
}

/// The rows up to the next ReadyForQuery, failing on an error.
async fn collect_rows(raw: &mut Raw, what: &[u8]) -> Vec<Row> {
    let mut rows = Vec::new();
    for (tag, body) in raw.messages_until_ready().await {
        match tag {
            b'D' => rows.push(row_values(&body)),
            b'E' => panic!(
                "{:?} failed: {:?}",
                String::from_utf8_lossy(what),
                String::from_utf8_lossy(&body)
            ),
            _ => {}
        }
    }
    rows
}

fn row(values: &[&[u8]]) -> Vec<Row> {
    vec![values.iter().map(|value| Some(value.to_vec())).collect()]
}

fn with_metrics(config: String) -> String {
    config.replace("metrics_listen = \"\"", "metrics_listen = \"127.0.0.1:0\"")
}

/// pgrelay_routing_decisions_total of database `app` for `reason`, from a scrape.
async fn decisions(proxy: &Proxy, reason: &str) -> f64 {
    let addr = proxy.running().metrics_addr().unwrap();
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = "GET /metrics HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n";
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_string(&mut response))
        .await
        .unwrap()
        .unwrap();
    let body = response.split_once("\r\n\r\n").unwrap().1;
    let scrape = prometheus_parse::Scrape::parse(body.lines().map(|line| Ok(line.to_owned()))).unwrap();
    scrape
        .samples
        .iter()
        .filter(|sample| sample.metric == "pgrelay_routing_decisions_total")
        .filter(|sample| sample.labels.get("database") == Some("app") && sample.labels.get("reason") == Some(reason))
        .map(|sample| match sample.value {
            prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latin9_win1252_and_euc_jp_text_is_read_and_reads_go_to_the_replica() {
    let cluster = shared_cluster();
    let proxy = Proxy::start(&with_metrics(config_with_replica(
        cluster,
        "size = 2",
        "consistency = \"eventual\"",
    )))
    .await;
    let (mut raw, reported) = Raw::connect_with(&proxy.addr.to_string(), &[("client_encoding", "LATIN9")]).await;
    assert!(
        reported.contains(&("client_encoding".into(), "LATIN9".into())),
        "{reported:?}"
    );
    // € is 0xA4 in LATIN9: one character, sent back as that byte.
    assert_eq!(
        rows(
            &mut raw,
            b"SELECT 'foo\xa4bar', length('foo\xa4bar'), pg_is_in_recovery()"
        )
        .await,
        row(&[b"foo\xa4bar", b"7", b"t"])
    );
    rows(&mut raw, b"SET client_encoding TO 'WIN1252'").await;
    // € is 0x80 in WIN1252.
    assert_eq!(
        rows(
            &mut raw,
            b"SELECT 'foo\x80bar', length('foo\x80bar'), pg_is_in_recovery()"
        )
        .await,
        row(&[b"foo\x80bar", b"7", b"t"])
    );
    rows(&mut raw, b"SET NAMES 'euc-jp'").await;
    // 表 is 0xC9 0xBD in EUC_JP.
    assert_eq!(
        rows(&mut raw, b"SELECT '\xc9\xbd', length('\xc9\xbd'), pg_is_in_recovery()").await,
        row(&[b"\xc9\xbd", b"1", b"t"])
    );
    // A write in the same encoding still goes to the primary.
    assert_eq!(
        rows(
            &mut raw,
            b"SELECT '\xc9\xbd', nextval('items_id_seq') > 0, pg_is_in_recovery()"
        )
        .await,
        row(&[b"\xc9\xbd", b"t", b"f"])
    );
    assert_eq!(decisions(&proxy, "unparsed").await, 0.0);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sjis_text_runs_on_the_primary_unread() {
    let cluster = shared_cluster();
    let proxy = Proxy::start(&with_metrics(config_with_replica(
        cluster,
        "size = 2",
        "consistency = \"eventual\"",
    )))
    .await;
    let (mut raw, reported) = Raw::connect_with(&proxy.addr.to_string(), &[("client_encoding", "SJIS")]).await;
    assert!(
        reported.contains(&("client_encoding".into(), "SJIS".into())),
        "{reported:?}"
    );
    // 表 is 0x95 0x5C in SJIS: its second byte is a backslash to anything reading bytes.
    assert_eq!(
        rows(&mut raw, b"SELECT '\x95\x5c', length('\x95\x5c'), pg_is_in_recovery()").await,
        row(&[b"\x95\x5c", b"1", b"f"])
    );
    // The server reads E'表' as one character; a byte reader would see `\'` and read on.
    assert_eq!(
        rows(&mut raw, b"SELECT E'\x95\x5c', pg_is_in_recovery()").await,
        row(&[b"\x95\x5c", b"f"])
    );
    assert_eq!(decisions(&proxy, "unparsed").await, 2.0);
    // ASCII is ASCII in SJIS too: read, and routed as in UTF-8.
    assert_eq!(rows(&mut raw, b"SELECT pg_is_in_recovery()").await, row(&[b"t"]));
    // Back to an encoding pgrelay reads.
    rows(&mut raw, b"SET client_encoding = 'LATIN9'").await;
    assert_eq!(
        rows(&mut raw, b"SELECT '\xa4', pg_is_in_recovery()").await,
        row(&[b"\xa4", b"t"])
    );
    assert_eq!(decisions(&proxy, "unparsed").await, 2.0);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_greeting_spells_parameters_as_the_server_does() {
    let cluster = shared_cluster();
    let proxy = Proxy::start(&config_for(cluster, "size = 2")).await;
    let primary = cluster.primary().addr();
    for params in [
        &[("client_encoding", "utf-8")][..],
        &[("client_encoding", "euc-jp")],
        &[
            ("client_encoding", "Latin-9"),
            ("DateStyle", "german"),
            ("TimeZone", "utc"),
        ],
        &[("client_encoding", "utf_8"), ("DateStyle", "iso")],
    ] {
        let (_direct, direct) = Raw::connect_with(&primary, params).await;
        // Twice: the second greeting comes from what pgrelay learnt the first time.
        for _ in 0..2 {
            let (_raw, relayed) = Raw::connect_with(&proxy.addr.to_string(), params).await;
            for (name, _) in params {
                let value = |reported: &[(String, String)]| {
                    reported
                        .iter()
                        .find(|(reported, _)| reported.eq_ignore_ascii_case(name))
                        .map(|(_, value)| value.clone())
                };
                assert_eq!(value(&relayed), value(&direct), "{name} of {params:?}");
            }
        }
    }
    let (_raw, relayed) = Raw::connect_with(&proxy.addr.to_string(), &[("client_encoding", "utf-8")]).await;
    assert!(
        relayed.contains(&("client_encoding".into(), "UTF8".into())),
        "{relayed:?}"
    );
    let (_raw, relayed) = Raw::connect_with(&proxy.addr.to_string(), &[("client_encoding", "euc-jp")]).await;
    assert!(
        relayed.contains(&("client_encoding".into(), "EUC_JP".into())),
        "{relayed:?}"
    );
    proxy.shutdown().await;
}

/// Parse, Bind, Execute and Sync of `name` with one text parameter; the rows.
async fn run_prepared(raw: &mut Raw, parse: Option<&[u8]>, name: &[u8], param: &[u8]) -> Vec<Row> {
    let mut messages = Vec::new();
    if let Some(sql) = parse {
        messages.push(parse_bytes(name, sql));
    }
    messages.extend([bind_bytes(name, &[param]), execute(), sync()]);
    raw.send(&messages).await;
    collect_rows(raw, name).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_statements_with_latin9_names_and_text_work_in_transaction_mode() {
    let cluster = shared_cluster();
    // One server connection: every client's statements meet on it.
    let proxy = Proxy::start(&config_for(cluster, "size = 1")).await;
    let addr = proxy.addr.to_string();
    let (mut latin9, _) = Raw::connect_with(&addr, &[("client_encoding", "LATIN9")]).await;
    let name = b"caf\xe9";
    let sql = b"SELECT $1::text || '\xa4', length($1::text || '\xa4')";
    assert_eq!(
        run_prepared(&mut latin9, Some(sql), name, b"\xe9").await,
        row(&[b"\xe9\xa4", b"2"])
    );
    assert_eq!(
        run_prepared(&mut latin9, None, name, b"x").await,
        row(&[b"x\xa4", b"2"])
    );
    // Dropped by SQL under its name as written, then unknown.
    assert_eq!(rows(&mut latin9, b"DEALLOCATE \"caf\xe9\"").await, Vec::<Row>::new());
    latin9.send(&[bind_bytes(name, &[b"x"]), execute(), sync()]).await;
    let replies = latin9.messages_until_ready().await;
    let error = replies.iter().find(|(tag, _)| *tag == b'E').expect("an error");
    assert_eq!(error_field(&error.1, b'C').unwrap(), b"26000");
    // Defined again and closed by the protocol.
    run_prepared(&mut latin9, Some(sql), name, b"x").await;
    latin9.send(&[message(b'C', b"Scaf\xe9\0"), sync()]).await;
    let replies = latin9.messages_until_ready().await;
    assert!(replies.iter().all(|(tag, _)| *tag != b'E'), "{replies:?}");

    // The same bytes are other characters in another encoding: 0xC3 0xA9 is é in UTF-8 and
    // Ã© in LATIN9. Each client gets its own statement, though the text is the same.
    let (mut utf8, _) = Raw::connect_with(&addr, &[("client_encoding", "UTF8")]).await;
    let sql = b"SELECT length('\xc3\xa9') + $1::int";
    assert_eq!(run_prepared(&mut utf8, Some(sql), b"s", b"0").await, row(&[b"1"]));
    assert_eq!(run_prepared(&mut latin9, Some(sql), b"s", b"0").await, row(&[b"2"]));
    assert_eq!(run_prepared(&mut utf8, None, b"s", b"0").await, row(&[b"1"]));
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_and_notices_from_the_server_arrive_byte_for_byte() {
    let cluster = shared_cluster();
    let proxy = Proxy::start(&config_for(cluster, "size = 2")).await;
    let (mut raw, _) = Raw::connect_with(&proxy.addr.to_string(), &[("client_encoding", "LATIN9")]).await;
    raw.send(&[query_bytes(
        b"DO $$BEGIN RAISE NOTICE 'caf\xe9 \xa4'; RAISE EXCEPTION 'caf\xe9 \xa4 \xbd'; END$$",
    )])
    .await;
    let replies = raw.messages_until_ready().await;
    let notice = replies.iter().find(|(tag, _)| *tag == b'N').expect("a notice");
    assert_eq!(error_field(&notice.1, b'M').unwrap(), b"caf\xe9 \xa4");
    let error = replies.iter().find(|(tag, _)| *tag == b'E').expect("an error");
    assert_eq!(error_field(&error.1, b'C').unwrap(), b"P0001");
    assert_eq!(error_field(&error.1, b'M').unwrap(), b"caf\xe9 \xa4 \xbd");
    // The session goes on, in its encoding.
    assert_eq!(rows(&mut raw, b"SELECT '\xbd'").await, row(&[b"\xbd"]));
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_move_between_clients_of_other_encodings_intact() {
    let cluster = shared_cluster();
    // One server connection, used in turn by both clients.
    let proxy = Proxy::start(&config_for(cluster, "size = 1")).await;
    let addr = proxy.addr.to_string();
    let (mut utf8, _) = Raw::connect_with(&addr, &[("client_encoding", "UTF8"), ("DateStyle", "iso")]).await;
    let (mut latin9, _) = Raw::connect_with(&addr, &[("client_encoding", "LATIN9"), ("DateStyle", "German")]).await;
    rows(&mut utf8, "SET app.place = 'café'".as_bytes()).await;
    for _ in 0..2 {
        // The other client leaves the server in LATIN9 and German dates.
        assert_eq!(
            rows(&mut latin9, b"SELECT '\xe9', current_setting('DateStyle')").await,
            row(&[b"\xe9", b"German, DMY"])
        );
        // Its setting comes back as it wrote it, in UTF-8; its dates as it asked.
        assert_eq!(
            rows(
                &mut utf8,
                b"SELECT current_setting('app.place'), current_setting('DateStyle')"
            )
            .await,
            row(&["café".as_bytes(), b"ISO, MDY"])
        );
    }
    proxy.shutdown().await;
}
