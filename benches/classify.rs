//! Classification cost per statement: uncached (lexer + keyword path + sqlparser + AST walk) and
//! from the cache, for short OLTP statements and a ~10 KB reporting query.
//! Targets (docs/performance.md): ≤ 0.3 µs from the cache, ≤ 20 µs uncached for OLTP statements.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use pgrelay::route::{Classifier, ClassifierSettings};

const PGBENCH_SELECT: &str = "SELECT abalance FROM pgbench_accounts WHERE aid = $1;";
const PGBENCH_UPDATE: &str = "UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2;";
const PGBENCH_INSERT: &str =
    "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES ($1, $2, $3, $4, CURRENT_TIMESTAMP);";
const PGBENCH_BEGIN: &str = "BEGIN;";
const DJANGO_JOIN: &str = r#"SELECT "blog_entry"."id", "blog_entry"."headline", "blog_entry"."pub_date", "blog_blog"."id", "blog_blog"."name", "auth_user"."id", "auth_user"."username" FROM "blog_entry" INNER JOIN "blog_blog" ON ("blog_entry"."blog_id" = "blog_blog"."id") LEFT OUTER JOIN "auth_user" ON ("blog_entry"."author_id" = "auth_user"."id") WHERE ("blog_blog"."name" = $1 AND "blog_entry"."pub_date" >= $2) ORDER BY "blog_entry"."pub_date" DESC LIMIT 21"#;

/// A ~10 KB reporting query: many columns, joins, a CTE and an IN list.
fn big_query() -> String {
    let columns: Vec<String> = (0..150)
        .map(|i| format!("\"report_line\".\"metric_{i}\" AS \"m{i}\""))
        .collect();
    let ids: Vec<String> = (0..600).map(|i| (10_000 + i).to_string()).collect();
    let sql = format!(
        "WITH recent AS (SELECT \"order_id\", sum(\"amount\") AS total FROM \"payment\" \
         WHERE \"created_at\" > now() - interval '30 days' GROUP BY \"order_id\") \
         SELECT {} FROM \"report_line\" JOIN \"order\" ON \"order\".\"id\" = \"report_line\".\"order_id\" \
         LEFT JOIN recent ON recent.\"order_id\" = \"order\".\"id\" \
         WHERE \"report_line\".\"order_id\" IN ({}) ORDER BY 1",
        columns.join(", "),
        ids.join(", ")
    );
    assert!((9_000..12_000).contains(&sql.len()), "big query is {} bytes", sql.len());
    sql
}

fn bench(c: &mut Criterion) {
    let big = big_query();
    let cases: [(&str, &str); 6] = [
        ("pgbench_select", PGBENCH_SELECT),
        ("pgbench_update", PGBENCH_UPDATE),
        ("pgbench_insert", PGBENCH_INSERT),
        ("pgbench_begin", PGBENCH_BEGIN),
        ("django_join", DJANGO_JOIN),
        ("report_10kb", &big),
    ];
    let classifier = Classifier::new(ClassifierSettings {
        cache_capacity: 10_000,
        ..ClassifierSettings::default()
    });

    let mut uncached = c.benchmark_group("classify/uncached");
    for (name, sql) in cases {
        uncached.bench_function(name, |b| b.iter(|| classifier.classify_uncached(black_box(sql))));
    }
    uncached.finish();

    // The 10 KB text is over MAX_CACHED_LEN: its "cached" figure is the uncached path.
    let mut cached = c.benchmark_group("classify/cached");
    for (name, sql) in cases {
        classifier.classify(sql);
        cached.bench_function(name, |b| b.iter(|| classifier.classify(black_box(sql))));
    }
    cached.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
