//! The classification table: real statements sent by pgbench, psql, Rails (ActiveRecord),
//! Django, Hibernate/JDBC, SQLAlchemy, Prisma and pg_dump, and every tricky case of docs/routing.md's
//! routing rules, each with its expected classification in a compact rendering (see `render`).
//! Expectations were written from PostgreSQL's semantics, not from this module's output.

use std::fmt::Write as _;

use crate::route::fast::Ctx;
use crate::route::functions::FunctionLists;
use crate::route::{
    Access, Classification, Classifier, ClassifierSettings, Isolation, SessionEffect, Tables, TxControl, WriteReason,
    lex, parsed, relations,
};

/// `R` or `W(reason)`, then ` tx=…`, ` end`, ` t=…` (tables, omitted when none, `?` unknown),
/// ` w=…` (written), ` s=…;…` (session effects), ` hint=…`, ` unparsed`, ` n=…` (when not 1).
pub(super) fn render(c: &Classification) -> String {
    let mut out = match (&c.access, &c.write_reason) {
        (Access::Read, None) => "R".to_owned(),
        (Access::Write, Some(WriteReason::WritingFunction(f))) => format!("W(fn:{f})"),
        (Access::Write, Some(WriteReason::VolatileFunction(f))) => format!("W(volatile:{f})"),
        (Access::Write, Some(r)) => format!("W({})", r.label()),
        (a, r) => format!("INCONSISTENT({a:?},{r:?})"),
    };
    if let Some(tx) = &c.transaction {
        let modes = |r: &Option<bool>, i: &Option<Isolation>| {
            let mut parts: Vec<String> = Vec::new();
            match r {
                Some(true) => parts.push("ro".into()),
                Some(false) => parts.push("rw".into()),
                None => {}
            }
            if let Some(i) = i {
                parts.push(i.as_str().replace(' ', "_"));
            }
            if parts.is_empty() {
                String::new()
            } else {
                format!("({})", parts.join(","))
            }
        };
        let text = match tx {
            TxControl::Begin { read_only, isolation } => format!("begin{}", modes(read_only, isolation)),
            TxControl::SetTransaction { read_only, isolation } => format!("set_tx{}", modes(read_only, isolation)),
            TxControl::Commit { chain } => if *chain { "commit(chain)" } else { "commit" }.to_owned(),
            TxControl::Rollback { chain } => if *chain { "rollback(chain)" } else { "rollback" }.to_owned(),
            TxControl::Savepoint { name } => format!("savepoint({name})"),
            TxControl::Release { name } => format!("release({name})"),
            TxControl::RollbackToSavepoint { name } => format!("rollback_to({name})"),
            TxControl::PrepareTransaction { gid } => format!("prepare_tx({gid})"),
            TxControl::CommitPrepared { gid } => format!("commit_prepared({gid})"),
            TxControl::RollbackPrepared { gid } => format!("rollback_prepared({gid})"),
        };
        let _ = write!(out, " tx={text}");
    }
    if c.ends_transaction {
        out.push_str(" end");
    }
    for (key, tables) in [("t", &c.tables), ("w", &c.written_tables)] {
        match tables {
            Tables::Unknown => {
                let _ = write!(out, " {key}=?");
            }
            Tables::Known(names) if !names.is_empty() => {
                let _ = write!(out, " {key}={}", names.join(","));
            }
            Tables::Known(_) => {}
        }
    }
    if !c.session.is_empty() {
        let effects: Vec<String> = c.session.iter().map(effect).collect();
        let _ = write!(out, " s={}", effects.join(";"));
    }
    if let Some(h) = c.hint {
        let _ = write!(out, " hint={}", format!("{h:?}").to_lowercase());
    }
    if !c.parsed {
        out.push_str(" unparsed");
    }
    if c.statements != 1 {
        let _ = write!(out, " n={}", c.statements);
    }
    out
}

fn effect(e: &SessionEffect) -> String {
    let opt = |n: &Option<String>| n.clone().unwrap_or_else(|| "*".to_owned());
    match e {
        SessionEffect::Set {
            name,
            value,
            local: false,
        } => format!("set({name}={value})"),
        SessionEffect::Set {
            name,
            value,
            local: true,
        } => format!("set_local({name}={value})"),
        SessionEffect::Reset { name } => format!("reset({name})"),
        SessionEffect::ResetAll => "reset_all".to_owned(),
        SessionEffect::DiscardAll => "discard_all".to_owned(),
        SessionEffect::DiscardPlans => "discard_plans".to_owned(),
        SessionEffect::DiscardTemp => "discard_temp".to_owned(),
        SessionEffect::DiscardSequences => "discard_sequences".to_owned(),
        SessionEffect::Deallocate { name } => format!("deallocate({})", opt(name)),
        SessionEffect::Prepare { name } => format!("prepare({name})"),
        SessionEffect::Listen { channel } => format!("listen({channel})"),
        SessionEffect::Unlisten { channel } => format!("unlisten({})", opt(channel)),
        SessionEffect::DeclareHoldCursor { name } => format!("hold({name})"),
        SessionEffect::CloseCursor { name } => format!("close({})", opt(name)),
        SessionEffect::Pin(r) => format!("pin({})", r.label()),
        SessionEffect::Unpin(r) => format!("unpin({})", r.label()),
    }
}

/// (statement, expected rendering).
pub(crate) const CASES: &[(&str, &str)] = &[
    // ---- pgbench: default scripts (simple protocol substitutes literals; -M extended uses $n) ----
    ("BEGIN;", "R tx=begin"),
    (
        "UPDATE pgbench_accounts SET abalance = abalance + -2781 WHERE aid = 60357;",
        "W(dml) t=pgbench_accounts w=pgbench_accounts",
    ),
    (
        "SELECT abalance FROM pgbench_accounts WHERE aid = 60357;",
        "R t=pgbench_accounts",
    ),
    (
        "UPDATE pgbench_tellers SET tbalance = tbalance + -2781 WHERE tid = 7;",
        "W(dml) t=pgbench_tellers w=pgbench_tellers",
    ),
    (
        "UPDATE pgbench_branches SET bbalance = bbalance + -2781 WHERE bid = 1;",
        "W(dml) t=pgbench_branches w=pgbench_branches",
    ),
    (
        "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (7, 1, 60357, -2781, CURRENT_TIMESTAMP);",
        "W(dml) t=pgbench_history w=pgbench_history",
    ),
    ("END;", "R tx=commit end"),
    (
        "UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2;",
        "W(dml) t=pgbench_accounts w=pgbench_accounts",
    ),
    (
        "SELECT abalance FROM pgbench_accounts WHERE aid = $1;",
        "R t=pgbench_accounts",
    ),
    (
        "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES ($1, $2, $3, $4, CURRENT_TIMESTAMP);",
        "W(dml) t=pgbench_history w=pgbench_history",
    ),
    (
        "drop table if exists pgbench_accounts, pgbench_branches, pgbench_history, pgbench_tellers",
        "W(ddl) t=? w=?",
    ),
    (
        "create table pgbench_history(tid int,bid int,aid    int,delta int,mtime timestamp,filler char(22))",
        "W(ddl) t=? w=?",
    ),
    (
        "copy pgbench_accounts from stdin with (freeze on)",
        "W(copy) t=pgbench_accounts w=pgbench_accounts",
    ),
    ("vacuum analyze pgbench_branches", "W(maintenance)"),
    ("alter table pgbench_branches add primary key (bid)", "W(ddl) t=? w=?"),
    (
        "truncate table pgbench_accounts, pgbench_branches, pgbench_history, pgbench_tellers",
        "W(ddl) t=pgbench_accounts,pgbench_branches,pgbench_history,pgbench_tellers w=pgbench_accounts,pgbench_branches,pgbench_history,pgbench_tellers",
    ),
    (
        "insert into pgbench_branches(bid,bbalance) select bid, 0 from generate_series(1, 1) as bid",
        "W(dml) t=pgbench_branches w=pgbench_branches",
    ),
    ("select count(*) from pgbench_branches", "R t=pgbench_branches"),
    // ---- psql -E: \dt, \l, \du, \d accounts, \dn, \df, \dv, \di, \ds, \dx (PostgreSQL 15) ----
    (
        r#"SELECT n.nspname as "Schema",
  c.relname as "Name",
  CASE c.relkind WHEN 'r' THEN 'table' WHEN 'v' THEN 'view' WHEN 'm' THEN 'materialized view' WHEN 'i' THEN 'index' WHEN 'S' THEN 'sequence' WHEN 't' THEN 'TOAST table' WHEN 'f' THEN 'foreign table' WHEN 'p' THEN 'partitioned table' WHEN 'I' THEN 'partitioned index' END as "Type",
  pg_catalog.pg_get_userbyid(c.relowner) as "Owner"
FROM pg_catalog.pg_class c
     LEFT JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
     LEFT JOIN pg_catalog.pg_am am ON am.oid = c.relam
WHERE c.relkind IN ('r','p','')
      AND n.nspname <> 'pg_catalog'
      AND n.nspname !~ '^pg_toast'
      AND n.nspname <> 'information_schema'
  AND pg_catalog.pg_table_is_visible(c.oid)
ORDER BY 1,2;"#,
        "R t=pg_catalog.pg_am,pg_catalog.pg_class,pg_catalog.pg_namespace",
    ),
    (
        r#"SELECT d.datname as "Name",
       pg_catalog.pg_get_userbyid(d.datdba) as "Owner",
       pg_catalog.pg_encoding_to_char(d.encoding) as "Encoding",
       d.datcollate as "Collate",
       d.datctype as "Ctype",
       d.daticulocale as "ICU Locale",
       CASE d.datlocprovider WHEN 'c' THEN 'libc' WHEN 'i' THEN 'icu' END AS "Locale Provider",
       pg_catalog.array_to_string(d.datacl, E'\n') AS "Access privileges"
FROM pg_catalog.pg_database d
ORDER BY 1;"#,
        "R t=pg_catalog.pg_database",
    ),
    (
        r#"SELECT r.rolname, r.rolsuper, r.rolinherit,
  r.rolcreaterole, r.rolcreatedb, r.rolcanlogin,
  r.rolconnlimit, r.rolvaliduntil,
  ARRAY(SELECT b.rolname
        FROM pg_catalog.pg_auth_members m
        JOIN pg_catalog.pg_roles b ON (m.roleid = b.oid)
        WHERE m.member = r.oid) as memberof
, r.rolreplication
, r.rolbypassrls
FROM pg_catalog.pg_roles r
WHERE r.rolname !~ '^pg_'
ORDER BY 1;"#,
        "R t=pg_catalog.pg_auth_members,pg_catalog.pg_roles",
    ),
    (
        r#"SELECT c.oid,
  n.nspname,
  c.relname
FROM pg_catalog.pg_class c
     LEFT JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE c.relname OPERATOR(pg_catalog.~) '^(accounts)$' COLLATE pg_catalog.default
  AND pg_catalog.pg_table_is_visible(c.oid)
ORDER BY 2, 3;"#,
        "R t=pg_catalog.pg_class,pg_catalog.pg_namespace",
    ),
    (
        r#"SELECT c.relchecks, c.relkind, c.relhasindex, c.relhasrules, c.relhastriggers, c.relrowsecurity, c.relforcerowsecurity, false AS relhasoids, c.relispartition, '', c.reltablespace, CASE WHEN c.reloftype = 0 THEN '' ELSE c.reloftype::pg_catalog.regtype::pg_catalog.text END, c.relpersistence, c.relreplident, am.amname
FROM pg_catalog.pg_class c
 LEFT JOIN pg_catalog.pg_class tc ON (c.reltoastrelid = tc.oid)
LEFT JOIN pg_catalog.pg_am am ON (c.relam = am.oid)
WHERE c.oid = '16385';"#,
        "R t=pg_catalog.pg_am,pg_catalog.pg_class",
    ),
    (
        r#"SELECT a.attname,
  pg_catalog.format_type(a.atttypid, a.atttypmod),
  (SELECT pg_catalog.pg_get_expr(d.adbin, d.adrelid, true)
   FROM pg_catalog.pg_attrdef d
   WHERE d.adrelid = a.attrelid AND d.adnum = a.attnum AND a.atthasdef),
  a.attnotnull,
  (SELECT c.collname FROM pg_catalog.pg_collation c, pg_catalog.pg_type t
   WHERE c.oid = a.attcollation AND t.oid = a.atttypid AND a.attcollation <> t.typcollation) AS attcollation,
  a.attidentity,
  a.attgenerated
FROM pg_catalog.pg_attribute a
WHERE a.attrelid = '16385' AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum;"#,
        "R t=pg_catalog.pg_attrdef,pg_catalog.pg_attribute,pg_catalog.pg_collation,pg_catalog.pg_type",
    ),
    (
        r#"SELECT c2.relname, i.indisprimary, i.indisunique, i.indisclustered, i.indisvalid, pg_catalog.pg_get_indexdef(i.indexrelid, 0, true),
  pg_catalog.pg_get_constraintdef(con.oid, true), contype, condeferrable, condeferred, i.indisreplident, c2.reltablespace
FROM pg_catalog.pg_class c, pg_catalog.pg_class c2, pg_catalog.pg_index i
  LEFT JOIN pg_catalog.pg_constraint con ON (conrelid = i.indrelid AND conindid = i.indexrelid AND contype IN ('p','u','x'))
WHERE c.oid = '16385' AND c.oid = i.indrelid AND i.indexrelid = c2.oid
ORDER BY i.indisprimary DESC, c2.relname;"#,
        "R t=pg_catalog.pg_class,pg_catalog.pg_constraint,pg_catalog.pg_index",
    ),
    (
        r#"SELECT pol.polname, pol.polpermissive,
  CASE WHEN pol.polroles = '{0}' THEN NULL ELSE pg_catalog.array_to_string(array(select rolname from pg_catalog.pg_roles where oid = any (pol.polroles) order by 1),',') END,
  pg_catalog.pg_get_expr(pol.polqual, pol.polrelid),
  pg_catalog.pg_get_expr(pol.polwithcheck, pol.polrelid),
  CASE pol.polcmd
    WHEN 'r' THEN 'SELECT'
    WHEN 'a' THEN 'INSERT'
    WHEN 'w' THEN 'UPDATE'
    WHEN 'd' THEN 'DELETE'
    END AS cmd
FROM pg_catalog.pg_policy pol
WHERE pol.polrelid = '16385' ORDER BY 1;"#,
        "R t=pg_catalog.pg_policy,pg_catalog.pg_roles",
    ),
    (
        r#"SELECT oid, stxrelid::pg_catalog.regclass, stxnamespace::pg_catalog.regnamespace::pg_catalog.text AS nsp, stxname,
pg_catalog.pg_get_statisticsobjdef_columns(oid) AS columns,
  'd' = any(stxkind) AS ndist_enabled,
  'f' = any(stxkind) AS deps_enabled,
  'm' = any(stxkind) AS mcv_enabled,
stxstattarget
FROM pg_catalog.pg_statistic_ext
WHERE stxrelid = '16385'
ORDER BY nsp, stxname;"#,
        "R t=pg_catalog.pg_statistic_ext",
    ),
    (
        r#"SELECT pubname
     , NULL
     , NULL
FROM pg_catalog.pg_publication p
     JOIN pg_catalog.pg_publication_namespace pn ON p.oid = pn.pnpubid
     JOIN pg_catalog.pg_class pc ON pc.relnamespace = pn.pnnspid
WHERE pc.oid ='16385' and pg_catalog.pg_relation_is_publishable('16385')
UNION
SELECT pubname
     , pg_get_expr(pr.prqual, c.oid)
     , (CASE WHEN pr.prattrs IS NOT NULL THEN
         (SELECT string_agg(attname, ', ')
           FROM pg_catalog.generate_series(0, pg_catalog.array_upper(pr.prattrs::pg_catalog.int2[], 1)) s,
                pg_catalog.pg_attribute
          WHERE attrelid = pr.prrelid AND attnum = prattrs[s])
        ELSE NULL END) FROM pg_catalog.pg_publication p
     JOIN pg_catalog.pg_publication_rel pr ON p.oid = pr.prpubid
     JOIN pg_catalog.pg_class c ON c.oid = pr.prrelid
WHERE pr.prrelid = '16385'
UNION
SELECT pubname
     , NULL
     , NULL
FROM pg_catalog.pg_publication p
WHERE p.puballtables AND pg_catalog.pg_relation_is_publishable('16385')
ORDER BY 1;"#,
        "R t=pg_catalog.pg_attribute,pg_catalog.pg_class,pg_catalog.pg_publication,pg_catalog.pg_publication_namespace,pg_catalog.pg_publication_rel",
    ),
    (
        r#"SELECT c.oid::pg_catalog.regclass
FROM pg_catalog.pg_class c, pg_catalog.pg_inherits i
WHERE c.oid = i.inhparent AND i.inhrelid = '16385'
  AND c.relkind != 'p' AND c.relkind != 'I'
ORDER BY inhseqno;"#,
        "R t=pg_catalog.pg_class,pg_catalog.pg_inherits",
    ),
    (
        r#"SELECT c.oid::pg_catalog.regclass, c.relkind, inhdetachpending, pg_catalog.pg_get_expr(c.relpartbound, c.oid)
FROM pg_catalog.pg_class c, pg_catalog.pg_inherits i
WHERE c.oid = i.inhrelid AND i.inhparent = '16385'
ORDER BY pg_catalog.pg_get_expr(c.relpartbound, c.oid) = 'DEFAULT', c.oid::pg_catalog.regclass::pg_catalog.text;"#,
        "R t=pg_catalog.pg_class,pg_catalog.pg_inherits",
    ),
    (
        r#"SELECT n.nspname AS "Name",
  pg_catalog.pg_get_userbyid(n.nspowner) AS "Owner"
FROM pg_catalog.pg_namespace n
WHERE n.nspname !~ '^pg_' AND n.nspname <> 'information_schema'
ORDER BY 1;"#,
        "R t=pg_catalog.pg_namespace",
    ),
    (
        r#"SELECT n.nspname as "Schema",
  p.proname as "Name",
  pg_catalog.pg_get_function_result(p.oid) as "Result data type",
  pg_catalog.pg_get_function_arguments(p.oid) as "Argument data types",
 CASE p.prokind
  WHEN 'a' THEN 'agg'
  WHEN 'w' THEN 'window'
  WHEN 'p' THEN 'proc'
  ELSE 'func'
 END as "Type"
FROM pg_catalog.pg_proc p
     LEFT JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
WHERE pg_catalog.pg_function_is_visible(p.oid)
      AND n.nspname <> 'pg_catalog'
      AND n.nspname <> 'information_schema'
ORDER BY 1, 2, 4;"#,
        "R t=pg_catalog.pg_namespace,pg_catalog.pg_proc",
    ),
    (
        r#"SELECT n.nspname as "Schema",
  c.relname as "Name",
  CASE c.relkind WHEN 'r' THEN 'table' WHEN 'v' THEN 'view' WHEN 'm' THEN 'materialized view' WHEN 'i' THEN 'index' WHEN 'S' THEN 'sequence' WHEN 't' THEN 'TOAST table' WHEN 'f' THEN 'foreign table' WHEN 'p' THEN 'partitioned table' WHEN 'I' THEN 'partitioned index' END as "Type",
  pg_catalog.pg_get_userbyid(c.relowner) as "Owner",
  c2.relname as "Table"
FROM pg_catalog.pg_class c
     LEFT JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
     LEFT JOIN pg_catalog.pg_am am ON am.oid = c.relam
     LEFT JOIN pg_catalog.pg_index i ON i.indexrelid = c.oid
     LEFT JOIN pg_catalog.pg_class c2 ON i.indrelid = c2.oid
WHERE c.relkind IN ('i','I','')
      AND n.nspname <> 'pg_catalog'
      AND n.nspname !~ '^pg_toast'
      AND n.nspname <> 'information_schema'
  AND pg_catalog.pg_table_is_visible(c.oid)
ORDER BY 1,2;"#,
        "R t=pg_catalog.pg_am,pg_catalog.pg_class,pg_catalog.pg_index,pg_catalog.pg_namespace",
    ),
    (
        r#"SELECT e.extname AS "Name", e.extversion AS "Version", n.nspname AS "Schema", c.description AS "Description"
FROM pg_catalog.pg_extension e LEFT JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace LEFT JOIN pg_catalog.pg_description c ON c.objoid = e.oid AND c.classoid = 'pg_catalog.pg_extension'::pg_catalog.regclass
ORDER BY 1;"#,
        "R t=pg_catalog.pg_description,pg_catalog.pg_extension,pg_catalog.pg_namespace",
    ),
    (
        "SELECT pg_catalog.set_config('search_path', '', false);",
        "W(fn:pg_catalog.set_config) s=set(search_path='')",
    ),
    // ---- Rails (ActiveRecord, PostgreSQL adapter) ----
    (
        "SET client_min_messages TO 'warning'",
        "R s=set(client_min_messages='warning')",
    ),
    (
        "SET standard_conforming_strings = on",
        "R s=set(standard_conforming_strings=on)",
    ),
    ("SET SESSION timezone TO 'UTC'", "R s=set(timezone='UTC')"),
    ("SET intervalstyle = iso_8601", "R s=set(intervalstyle=iso_8601)"),
    (
        "SELECT t.oid, t.typname\n            FROM pg_type as t\n            WHERE t.typname IN ('int2', 'int4', 'int8', 'oid', 'float4', 'float8', 'bool')",
        "R t=pg_type",
    ),
    (
        r#"SELECT t.oid, t.typname, t.typelem, t.typdelim, t.typinput, r.rngsubtype, t.typtype, t.typbasetype
              FROM pg_type as t
              LEFT JOIN pg_range as r ON oid = rngtypid
              WHERE
                t.typname IN ('int2', 'int4', 'int8', 'oid', 'float4', 'float8', 'text', 'varchar', 'char', 'name', 'bpchar', 'bool', 'bit', 'varbit', 'timestamptz', 'date', 'money', 'bytea', 'point', 'hstore', 'json', 'jsonb', 'cidr', 'inet', 'uuid', 'xml', 'tsvector', 'macaddr', 'citext', 'ltree', 'line', 'lseg', 'box', 'path', 'polygon', 'circle', 'interval', 'time', 'timestamp', 'numeric')
                OR t.typtype IN ('r', 'e', 'd')
                OR t.typinput = 'array_in(cstring,oid,integer)'::regprocedure
                OR t.typelem != 0"#,
        "R t=pg_range,pg_type",
    ),
    ("SHOW TIME ZONE", "R"),
    (
        "SELECT c.relname FROM pg_class c LEFT JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = ANY (current_schemas(false)) AND c.relkind IN ('r','v','m','p','f')",
        "R t=pg_class,pg_namespace",
    ),
    (
        r#"SELECT a.attname
  FROM (
         SELECT indrelid, indkey, generate_subscripts(indkey, 1) idx
           FROM pg_index
          WHERE indrelid = '"accounts"'::regclass
            AND indisprimary
       ) i
  JOIN pg_attribute a
    ON a.attrelid = i.indrelid
   AND a.attnum = i.indkey[i.idx]
 ORDER BY i.idx"#,
        "R t=pg_attribute,pg_index",
    ),
    ("SHOW search_path", "R"),
    (
        r#"SELECT  "accounts".* FROM "accounts" ORDER BY "accounts"."id" DESC LIMIT $1"#,
        "R t=accounts",
    ),
    (
        r#"SELECT a.attname, format_type(a.atttypid, a.atttypmod),
                     pg_get_expr(d.adbin, d.adrelid), a.attnotnull, a.atttypid, a.atttypmod,
                     c.collname, col_description(a.attrelid, a.attnum) AS comment
                FROM pg_attribute a
                LEFT JOIN pg_attrdef d ON a.attrelid = d.adrelid AND a.attnum = d.adnum
                LEFT JOIN pg_type t ON a.atttypid = t.oid
                LEFT JOIN pg_collation c ON a.attcollation = c.oid AND a.attcollation <> t.typcollation
               WHERE a.attrelid = '"accounts"'::regclass
                 AND a.attnum > 0 AND NOT a.attisdropped
               ORDER BY a.attnum"#,
        "R t=pg_attrdef,pg_attribute,pg_collation,pg_type",
    ),
    ("SHOW max_identifier_length", "R"),
    (
        r#"SELECT attr.attname, nsp.nspname, seq.relname
FROM pg_class      seq,
     pg_attribute  attr,
     pg_depend     dep,
     pg_constraint cons,
     pg_namespace  nsp
WHERE seq.oid           = dep.objid
  AND seq.relkind       = 'S'
  AND attr.attrelid     = dep.refobjid
  AND attr.attnum       = dep.refobjsubid
  AND attr.attrelid     = cons.conrelid
  AND attr.attnum       = cons.conkey[1]
  AND seq.relnamespace  = nsp.oid
  AND cons.contype      = 'p'
  AND dep.classid       = 'pg_class'::regclass
  AND dep.refobjid      = '"accounts"'::regclass"#,
        "R t=pg_attribute,pg_class,pg_constraint,pg_depend,pg_namespace",
    ),
    (
        "SELECT pg_try_advisory_lock(1286445305)",
        "W(fn:pg_try_advisory_lock) s=pin(advisory_lock)",
    ),
    ("SELECT pg_advisory_unlock(1286445305)", "W(fn:pg_advisory_unlock)"),
    (
        r#"SELECT "schema_migrations"."version" FROM "schema_migrations" ORDER BY "schema_migrations"."version" ASC"#,
        "R t=schema_migrations",
    ),
    (
        r#"INSERT INTO "schema_migrations" ("version") VALUES ($1) RETURNING "version""#,
        "W(dml) t=schema_migrations w=schema_migrations",
    ),
    (
        r#"SELECT "ar_internal_metadata"."value" FROM "ar_internal_metadata" WHERE "ar_internal_metadata"."key" = $1 LIMIT $2"#,
        "R t=ar_internal_metadata",
    ),
    ("SAVEPOINT active_record_1", "R tx=savepoint(active_record_1)"),
    ("RELEASE SAVEPOINT active_record_1", "R tx=release(active_record_1)"),
    (
        "ROLLBACK TO SAVEPOINT active_record_1",
        "R tx=rollback_to(active_record_1)",
    ),
    (
        r#"SELECT "accounts".* FROM "accounts" WHERE "accounts"."id" = $1 LIMIT $2 FOR UPDATE"#,
        "W(locking_clause) t=accounts",
    ),
    (
        r#"INSERT INTO "accounts" ("name", "balance", "created_at", "updated_at") VALUES ($1, $2, $3, $4) RETURNING "id""#,
        "W(dml) t=accounts w=accounts",
    ),
    (
        r#"UPDATE "accounts" SET "balance" = $1, "updated_at" = $2 WHERE "accounts"."id" = $3"#,
        "W(dml) t=accounts w=accounts",
    ),
    (
        r#"DELETE FROM "accounts" WHERE "accounts"."id" = $1"#,
        "W(dml) t=accounts w=accounts",
    ),
    (
        r#"UPDATE "posts" SET "comments_count" = COALESCE("comments_count", 0) + $1 WHERE "posts"."id" = $2"#,
        "W(dml) t=posts w=posts",
    ),
    ("DEALLOCATE a1", "R s=deallocate(a1)"),
    ("BEGIN", "R tx=begin"),
    ("COMMIT", "R tx=commit end"),
    ("ROLLBACK", "R tx=rollback end"),
    (
        r#"SELECT 1 AS one FROM "accounts" WHERE "accounts"."name" = $1 LIMIT $2"#,
        "R t=accounts",
    ),
    (
        r#"SELECT setval('"public"."accounts_id_seq"', 42, true)"#,
        "W(fn:setval) t=public.accounts_id_seq w=public.accounts_id_seq",
    ),
    (r#"ALTER TABLE "accounts" DISABLE TRIGGER ALL"#, "W(ddl) t=? w=?"),
    (
        r#"SELECT COUNT(*) FROM "comments" INNER JOIN "posts" ON "posts"."id" = "comments"."post_id" WHERE "posts"."author_id" = $1"#,
        "R t=comments,posts",
    ),
    // ---- Django ----
    (
        "SELECT set_config('TimeZone', 'UTC', false)",
        "W(fn:set_config) s=set(timezone='UTC')",
    ),
    (
        "SELECT set_config('TimeZone', $1, false)",
        "W(fn:set_config) s=pin(untrackable_set)",
    ),
    (
        r#"SELECT "auth_user"."id", "auth_user"."password", "auth_user"."last_login", "auth_user"."is_superuser", "auth_user"."username" FROM "auth_user" WHERE "auth_user"."id" = 1 LIMIT 21"#,
        "R t=auth_user",
    ),
    (
        r#"SELECT "blog_entry"."id", "blog_entry"."headline", "blog_blog"."id", "blog_blog"."name" FROM "blog_entry" INNER JOIN "blog_blog" ON ("blog_entry"."blog_id" = "blog_blog"."id") WHERE "blog_blog"."name" = 'Beatles Blog' ORDER BY "blog_entry"."pub_date" DESC LIMIT 21"#,
        "R t=blog_blog,blog_entry",
    ),
    (
        r#"SELECT "shop_order"."id", "shop_order"."status" FROM "shop_order" WHERE "shop_order"."id" = 7 FOR UPDATE"#,
        "W(locking_clause) t=shop_order",
    ),
    (
        r#"SELECT "shop_order"."id" FROM "shop_order" WHERE "shop_order"."status" = 'new' FOR UPDATE NOWAIT"#,
        "W(locking_clause) t=shop_order",
    ),
    (
        r#"SELECT "shop_order"."id" FROM "shop_order" WHERE "shop_order"."status" = 'new' LIMIT 10 FOR UPDATE SKIP LOCKED"#,
        "W(locking_clause) t=shop_order",
    ),
    (
        r#"SELECT "shop_order"."id", "shop_customer"."id" FROM "shop_order" INNER JOIN "shop_customer" ON ("shop_order"."customer_id" = "shop_customer"."id") FOR UPDATE OF "shop_order""#,
        "W(locking_clause) t=shop_customer,shop_order",
    ),
    (
        r#"SELECT "shop_order"."id" FROM "shop_order" WHERE "shop_order"."id" = 7 FOR NO KEY UPDATE"#,
        "W(locking_clause) t=shop_order",
    ),
    (
        r#"SAVEPOINT "s140330467256128_x1""#,
        "R tx=savepoint(s140330467256128_x1)",
    ),
    (
        r#"RELEASE SAVEPOINT "s140330467256128_x1""#,
        "R tx=release(s140330467256128_x1)",
    ),
    (
        r#"ROLLBACK TO SAVEPOINT "s140330467256128_x1""#,
        "R tx=rollback_to(s140330467256128_x1)",
    ),
    (
        r#"DECLARE "_django_curs_140330467256128_sync_1" NO SCROLL CURSOR WITH HOLD FOR SELECT "blog_entry"."id", "blog_entry"."headline" FROM "blog_entry""#,
        "R t=blog_entry s=pin(hold_cursor);hold(_django_curs_140330467256128_sync_1)",
    ),
    (r#"FETCH FORWARD 2000 FROM "_django_curs_140330467256128_sync_1""#, "R"),
    (
        r#"CLOSE "_django_curs_140330467256128_sync_1""#,
        "R s=close(_django_curs_140330467256128_sync_1)",
    ),
    (
        r#"
            SELECT
                c.relname,
                CASE
                    WHEN c.relispartition THEN 'p'
                    WHEN c.relkind IN ('m', 'v') THEN 'v'
                    ELSE 't'
                END,
                obj_description(c.oid, 'pg_class')
            FROM pg_catalog.pg_class c
            LEFT JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
            WHERE c.relkind IN ('f', 'm', 'p', 'r', 'v')
                AND n.nspname NOT IN ('pg_catalog', 'pg_toast')
                AND pg_catalog.pg_table_is_visible(c.oid)
        "#,
        "R t=pg_catalog.pg_class,pg_catalog.pg_namespace",
    ),
    (
        r#"SELECT "django_migrations"."id", "django_migrations"."app", "django_migrations"."name", "django_migrations"."applied" FROM "django_migrations""#,
        "R t=django_migrations",
    ),
    (
        r#"INSERT INTO "django_migrations" ("app", "name", "applied") VALUES ('auth', '0001_initial', '2024-01-01T00:00:00+00:00'::timestamptz) RETURNING "django_migrations"."id""#,
        "W(dml) t=django_migrations w=django_migrations",
    ),
    (
        r#"SELECT setval(pg_get_serial_sequence('"auth_user"','id'), coalesce(max("id"), 1), max("id") IS NOT null) FROM "auth_user";"#,
        "W(fn:setval) t=? w=?",
    ),
    (r#"SELECT pg_get_serial_sequence('"auth_user"', 'id')"#, "R"),
    (
        r#"INSERT INTO "app_tag" ("name") VALUES ('a'), ('b'), ('c') RETURNING "app_tag"."id""#,
        "W(dml) t=app_tag w=app_tag",
    ),
    (
        r#"UPDATE "app_item" SET "count" = ("app_item"."count" + 1) WHERE "app_item"."id" IN (SELECT U0."id" FROM "app_item" U0 WHERE U0."active")"#,
        "W(dml) t=app_item w=app_item",
    ),
    (
        r#"DELETE FROM "app_item" WHERE "app_item"."id" IN (1, 2, 3)"#,
        "W(dml) t=app_item w=app_item",
    ),
    ("SET CONSTRAINTS ALL IMMEDIATE", "R"),
    (
        r#"TRUNCATE "app_item", "app_tag";"#,
        "W(ddl) t=app_item,app_tag w=app_item,app_tag",
    ),
    (r#"TRUNCATE "app_item" RESTART IDENTITY CASCADE;"#, "W(ddl) t=? w=?"),
    (
        r#"SELECT 1 AS "a" FROM "auth_user" WHERE "auth_user"."username" = 'bob' LIMIT 1"#,
        "R t=auth_user",
    ),
    (
        r#"SELECT COUNT(*) AS "__count" FROM "blog_entry" WHERE "blog_entry"."blog_id" IN (SELECT U0."id" FROM "blog_blog" U0 WHERE U0."name"::text LIKE 'B%')"#,
        "R t=blog_blog,blog_entry",
    ),
    (
        r#"UPDATE "django_session" SET "session_data" = 'e30:1r', "expire_date" = '2024-02-01T00:00:00+00:00'::timestamptz WHERE "django_session"."session_key" = 'abc'"#,
        "W(dml) t=django_session w=django_session",
    ),
    (
        r#"SELECT DISTINCT ON ("app_item"."category") "app_item"."id", "app_item"."category" FROM "app_item" ORDER BY "app_item"."category" ASC, "app_item"."price" DESC"#,
        "R t=app_item",
    ),
    (
        r#"SELECT "app_item"."id", RANK() OVER (PARTITION BY "app_item"."category" ORDER BY "app_item"."price" DESC) AS "rank" FROM "app_item""#,
        "R t=app_item",
    ),
    (
        r#"SELECT "django_session"."session_key", "django_session"."session_data", "django_session"."expire_date" FROM "django_session" WHERE ("django_session"."expire_date" > '2024-01-01T00:00:00+00:00'::timestamptz AND "django_session"."session_key" = 'abc') LIMIT 21"#,
        "R t=django_session",
    ),
    (
        r#"SELECT "blog_entry"."id" FROM "blog_entry" WHERE EXISTS(SELECT 1 AS "a" FROM "blog_comment" U1 WHERE U1."entry_id" = ("blog_entry"."id") LIMIT 1)"#,
        "R t=blog_comment,blog_entry",
    ),
    // ---- Hibernate / JDBC ----
    (
        "select nextval ('hibernate_sequence')",
        "W(fn:nextval) t=hibernate_sequence w=hibernate_sequence",
    ),
    ("select nextval('users_seq')", "W(fn:nextval) t=users_seq w=users_seq"),
    (
        "select nextval('users_seq') from generate_series(1,50)",
        "W(fn:nextval) t=users_seq w=users_seq",
    ),
    ("select currval('users_seq')", "W(fn:currval)"),
    (
        "select u1_0.id,u1_0.email,u1_0.name from users u1_0 where u1_0.id=$1",
        "R t=users",
    ),
    (
        "select u1_0.id,u1_0.name from users u1_0 where u1_0.id=$1 for update",
        "W(locking_clause) t=users",
    ),
    (
        "select u1_0.id from users u1_0 where u1_0.id=$1 for no key update",
        "W(locking_clause) t=users",
    ),
    (
        "select u1_0.id from users u1_0 where u1_0.id=$1 for share",
        "W(locking_clause) t=users",
    ),
    (
        "select u1_0.id from users u1_0 where u1_0.id=$1 for update skip locked",
        "W(locking_clause) t=users",
    ),
    (
        "insert into users (email,name,id) values ($1,$2,$3)",
        "W(dml) t=users w=users",
    ),
    (
        "update users set email=$1,name=$2 where id=$3",
        "W(dml) t=users w=users",
    ),
    ("delete from users where id=$1", "W(dml) t=users w=users"),
    (
        "select o1_0.id,c1_0.id,c1_0.name from orders o1_0 join customers c1_0 on c1_0.id=o1_0.customer_id where o1_0.status=$1 offset $2 rows fetch first $3 rows only",
        "R t=customers,orders",
    ),
    (
        "SET application_name = 'PostgreSQL JDBC Driver'",
        "R s=set(application_name='PostgreSQL JDBC Driver')",
    ),
    ("SET extra_float_digits = 3", "R s=set(extra_float_digits=3)"),
    (
        "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
        "R s=set(default_transaction_read_only=on)",
    ),
    (
        "SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE",
        "R s=set(default_transaction_read_only=off)",
    ),
    (
        "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE",
        "R s=set(default_transaction_isolation='serializable')",
    ),
    ("BEGIN READ ONLY", "R tx=begin(ro)"),
    ("SHOW TRANSACTION ISOLATION LEVEL", "R"),
    ("select current_schema()", "R"),
    ("SELECT 1", "R"),
    ("SELECT version()", "R"),
    // ---- SQLAlchemy (psycopg2 interpolates literals) ----
    ("select pg_catalog.version()", "R"),
    ("show standard_conforming_strings", "R"),
    (
        "SELECT pg_catalog.pg_class.relname FROM pg_catalog.pg_class JOIN pg_catalog.pg_namespace ON pg_catalog.pg_namespace.oid = pg_catalog.pg_class.relnamespace WHERE pg_catalog.pg_class.relname = 'users' AND pg_catalog.pg_class.relkind = ANY (ARRAY['r', 'p', 'f', 'v', 'm']) AND pg_catalog.pg_table_is_visible(pg_catalog.pg_class.oid) AND pg_catalog.pg_namespace.nspname != 'pg_catalog'",
        "R t=pg_catalog.pg_class,pg_catalog.pg_namespace",
    ),
    (
        "SELECT users.id AS users_id, users.name AS users_name \nFROM users \nWHERE users.id = 5",
        "R t=users",
    ),
    (
        "SELECT users.id, users.name \nFROM users \nWHERE users.id = 5 FOR UPDATE",
        "W(locking_clause) t=users",
    ),
    (
        "SELECT users.id, users.name \nFROM users \nWHERE users.id = 5 FOR SHARE",
        "W(locking_clause) t=users",
    ),
    (
        "SELECT users.id, users.name \nFROM users \nWHERE users.id = 5 FOR KEY SHARE",
        "W(locking_clause) t=users",
    ),
    (
        "SELECT users.id FROM users WHERE users.id = 5 FOR NO KEY UPDATE NOWAIT",
        "W(locking_clause) t=users",
    ),
    (
        "INSERT INTO users (id, name) VALUES (nextval('users_id_seq'), 'bob') RETURNING users.id",
        "W(dml) t=users,users_id_seq w=users,users_id_seq",
    ),
    (
        "INSERT INTO users (name) VALUES ('a') RETURNING users.id",
        "W(dml) t=users w=users",
    ),
    (
        "SELECT users.id AS users_id FROM users WHERE users.id IN (1, 2, 3)",
        "R t=users",
    ),
    (
        "SELECT addresses.id, addresses.email FROM addresses JOIN users ON users.id = addresses.user_id WHERE users.name = 'ed' ORDER BY addresses.id",
        "R t=addresses,users",
    ),
    (
        "SELECT anon_1.users_id FROM (SELECT users.id AS users_id FROM users WHERE users.name LIKE 'e%') AS anon_1",
        "R t=users",
    ),
    // ---- Prisma (migrate and query engine) ----
    (
        "SELECT pg_advisory_lock(72707369)",
        "W(fn:pg_advisory_lock) s=pin(advisory_lock)",
    ),
    ("SELECT pg_advisory_unlock(72707369)", "W(fn:pg_advisory_unlock)"),
    (
        r#"CREATE TABLE IF NOT EXISTS "_prisma_migrations" (
    "id"                    VARCHAR(36) PRIMARY KEY NOT NULL,
    "checksum"              VARCHAR(64) NOT NULL,
    "finished_at"           TIMESTAMPTZ,
    "migration_name"        VARCHAR(255) NOT NULL,
    "logs"                  TEXT,
    "rolled_back_at"        TIMESTAMPTZ,
    "started_at"            TIMESTAMPTZ NOT NULL DEFAULT now(),
    "applied_steps_count"   INTEGER NOT NULL DEFAULT 0
);"#,
        "W(ddl) t=? w=?",
    ),
    (
        r#"SELECT "id", "checksum", "finished_at", "migration_name", "logs", "rolled_back_at", "started_at", "applied_steps_count" FROM "_prisma_migrations" ORDER BY "started_at" ASC"#,
        "R t=_prisma_migrations",
    ),
    (
        r#"INSERT INTO "_prisma_migrations" ("id", "checksum", "logs", "started_at", "finished_at", "migration_name", "applied_steps_count") VALUES ($1, $2, $3, now(), $4, $5, $6)"#,
        "W(dml) t=_prisma_migrations w=_prisma_migrations",
    ),
    (
        r#"UPDATE "_prisma_migrations" SET "finished_at" = now(), "applied_steps_count" = $1 WHERE "id" = $2"#,
        "W(dml) t=_prisma_migrations w=_prisma_migrations",
    ),
    (
        r#"SELECT "public"."User"."id", "public"."User"."email", "public"."User"."name" FROM "public"."User" WHERE ("public"."User"."email" = $1 AND 1=1) LIMIT $2 OFFSET $3"#,
        "R t=public.User",
    ),
    (
        r#"INSERT INTO "public"."User" ("email","name") VALUES ($1,$2) RETURNING "public"."User"."id", "public"."User"."email""#,
        "W(dml) t=public.User w=public.User",
    ),
    (
        r#"SELECT COUNT(*) AS "_count._all" FROM (SELECT "public"."Post"."id" FROM "public"."Post" WHERE 1=1 OFFSET $1) AS "sub""#,
        "R t=public.Post",
    ),
    (
        r#"DELETE FROM "public"."Post" WHERE ("public"."Post"."id" = $1 AND 1=1)"#,
        "W(dml) t=public.Post w=public.Post",
    ),
    (
        r#"SELECT "t1"."id", "t1"."title" FROM "public"."Post" AS "t1" LEFT JOIN "public"."User" AS "t2" ON "t2"."id" = "t1"."authorId" WHERE "t2"."email" = $1"#,
        "R t=public.Post,public.User",
    ),
    ("DEALLOCATE ALL", "R s=deallocate(*);unpin(sql_prepare)"),
    (
        "SELECT namespace.nspname as namespace_name FROM pg_namespace as namespace WHERE namespace.nspname = ANY ( $1 ) ORDER BY namespace_name;",
        "R t=pg_namespace",
    ),
    // ---- pg_dump output preamble, sent as one simple query by psql -f with -1 ----
    (
        "SET statement_timeout = 0;\nSET lock_timeout = 0;\nSET idle_in_transaction_session_timeout = 0;\nSET client_encoding = 'UTF8';\nSET standard_conforming_strings = on;\nSELECT pg_catalog.set_config('search_path', '', false);\nSET check_function_bodies = false;\nSET xmloption = content;\nSET client_min_messages = warning;\nSET row_security = off;\n",
        "W(fn:pg_catalog.set_config) s=set(statement_timeout=0);set(lock_timeout=0);set(idle_in_transaction_session_timeout=0);set(client_encoding='UTF8');set(standard_conforming_strings=on);set(search_path='');set(check_function_bodies=false);set(xmloption=content);set(client_min_messages=warning);set(row_security=off) n=10",
    ),
    ("SET default_tablespace = '';", "R s=set(default_tablespace='')"),
    (
        "SET default_table_access_method = heap;",
        "R s=set(default_table_access_method=heap)",
    ),
    (
        "COPY public.accounts (id, name, balance) FROM stdin;",
        "W(copy) t=public.accounts w=public.accounts",
    ),
    (
        "SELECT pg_catalog.setval('public.accounts_id_seq', 3, true);",
        "W(fn:pg_catalog.setval) t=public.accounts_id_seq w=public.accounts_id_seq",
    ),
    (
        "COPY public.accounts (id, name, balance) TO stdout;",
        "R t=public.accounts",
    ),
    // ---- migration tools (golang-migrate, Flyway, Liquibase, Knex) ----
    (
        "SELECT pg_advisory_lock($1)",
        "W(fn:pg_advisory_lock) s=pin(advisory_lock)",
    ),
    (
        r#"SELECT version, dirty FROM "schema_migrations" LIMIT 1"#,
        "R t=schema_migrations",
    ),
    (
        r#"TRUNCATE "schema_migrations""#,
        "W(ddl) t=schema_migrations w=schema_migrations",
    ),
    (
        "SELECT pg_try_advisory_xact_lock(77431708279161)",
        "W(fn:pg_try_advisory_xact_lock)",
    ),
    (
        "UPDATE public.databasechangeloglock SET LOCKED = TRUE, LOCKEDBY = 'host (10.0.0.1)', LOCKGRANTED = NOW() WHERE ID = 1 AND LOCKED = FALSE",
        "W(dml) t=public.databasechangeloglock w=public.databasechangeloglock",
    ),
    (
        "LOCK TABLE public.flyway_schema_history IN ACCESS EXCLUSIVE MODE",
        "W(lock) t=public.flyway_schema_history",
    ),
    (
        r#"select * from "knex_migrations_lock" where "is_locked" = $1 for update"#,
        "W(locking_clause) t=knex_migrations_lock",
    ),
    ("SET ROLE migrator", "R s=set(role=migrator);pin(set_role)"),
    ("RESET ROLE", "R s=reset(role);unpin(set_role)"),
    // ---- transaction control ----
    ("begin", "R tx=begin"),
    ("BEGIN WORK", "R tx=begin"),
    ("BEGIN TRANSACTION", "R tx=begin"),
    ("BEGIN TRANSACTION READ WRITE", "R tx=begin(rw)"),
    ("BEGIN ISOLATION LEVEL SERIALIZABLE", "R tx=begin(serializable)"),
    (
        "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",
        "R tx=begin(ro,repeatable_read)",
    ),
    (
        "BEGIN READ ONLY ISOLATION LEVEL READ COMMITTED",
        "R tx=begin(ro,read_committed)",
    ),
    ("START TRANSACTION", "R tx=begin"),
    (
        "START TRANSACTION READ ONLY, ISOLATION LEVEL SERIALIZABLE, DEFERRABLE",
        "R tx=begin(ro,serializable)",
    ),
    (
        "START TRANSACTION ISOLATION LEVEL READ UNCOMMITTED, READ WRITE",
        "R tx=begin(rw,read_uncommitted)",
    ),
    ("start transaction read only", "R tx=begin(ro)"),
    ("BEGIN READ ONLY GARBAGE", "W(unparsed) t=? w=? unparsed"),
    ("START", "W(unparsed) t=? w=? unparsed"),
    ("COMMIT WORK", "R tx=commit end"),
    ("COMMIT AND CHAIN", "R tx=commit(chain)"),
    ("COMMIT AND NO CHAIN", "R tx=commit end"),
    ("END TRANSACTION", "R tx=commit end"),
    ("ROLLBACK WORK", "R tx=rollback end"),
    ("ROLLBACK AND CHAIN", "R tx=rollback(chain)"),
    ("ABORT", "R tx=rollback end"),
    ("ROLLBACK TO sp1", "R tx=rollback_to(sp1)"),
    ("ROLLBACK TRANSACTION TO SAVEPOINT \"Sp 1\"", "R tx=rollback_to(Sp 1)"),
    ("SAVEPOINT sp1", "R tx=savepoint(sp1)"),
    ("RELEASE sp1", "R tx=release(sp1)"),
    ("PREPARE TRANSACTION 'tx-42'", "R tx=prepare_tx(tx-42) end"),
    (
        "COMMIT PREPARED 'tx-42'",
        "W(two_phase_commit) tx=commit_prepared(tx-42) t=? w=?",
    ),
    (
        "ROLLBACK PREPARED 'tx-42'",
        "W(two_phase_commit) tx=rollback_prepared(tx-42) t=? w=?",
    ),
    ("SET TRANSACTION READ ONLY", "R tx=set_tx(ro)"),
    (
        "SET TRANSACTION READ WRITE",
        "W(set_transaction_read_write) tx=set_tx(rw)",
    ),
    (
        "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ",
        "R tx=set_tx(repeatable_read)",
    ),
    (
        "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ ONLY, DEFERRABLE",
        "R tx=set_tx(ro,serializable)",
    ),
    ("SET TRANSACTION SNAPSHOT '00000003-0000001B-1'", "R tx=set_tx"),
    ("SET transaction_read_only = on", "R tx=set_tx(ro)"),
    (
        "SET transaction_isolation = 'serializable'",
        "R tx=set_tx(serializable)",
    ),
    (
        "SET LOCAL transaction_read_only TO 'off'",
        "W(set_transaction_read_write) tx=set_tx(rw)",
    ),
    ("BEGIN; SELECT * FROM t; COMMIT;", "R tx=begin end t=t n=3"),
    ("BEGIN READ ONLY; SELECT * FROM t; COMMIT", "R tx=begin(ro) end t=t n=3"),
    ("BEGIN; UPDATE t SET x = 1; COMMIT", "W(dml) tx=begin end t=t w=t n=3"),
    (
        "BEGIN;\nSET TRANSACTION READ ONLY;\nSELECT count(*) FROM t;",
        "R tx=begin t=t n=3",
    ),
    ("COMMIT; BEGIN", "R tx=commit end n=2"),
    ("SELECT 1; ROLLBACK", "R tx=rollback end n=2"),
    // ---- SET / RESET / SHOW / DISCARD / DEALLOCATE ----
    (
        "SET search_path TO \"$user\", public",
        "R s=set(search_path=\"$user\", public)",
    ),
    ("SET search_path=myapp,public", "R s=set(search_path=myapp,public)"),
    (
        "SET LOCAL search_path TO tenant_42",
        "R s=set_local(search_path=tenant_42)",
    ),
    (
        "SET SESSION statement_timeout = '5s'",
        "R s=set(statement_timeout='5s')",
    ),
    ("set statement_timeout to 0", "R s=set(statement_timeout=0)"),
    ("SET work_mem = '64MB' /* for the report */", "R s=set(work_mem='64MB')"),
    ("SET x.y = -1", "R s=set(x.y=-1)"),
    ("SET \"MyApp\".\"User_Id\" = '42'", "R s=set(MyApp.User_Id='42')"),
    ("SET search_path TO DEFAULT", "R s=reset(search_path)"),
    ("SET TIME ZONE 'Europe/Paris'", "R s=set(timezone='Europe/Paris')"),
    ("SET TIME ZONE LOCAL", "R s=reset(timezone)"),
    (
        "SET TIME ZONE INTERVAL '+02:00' HOUR TO MINUTE",
        "R s=pin(untrackable_set)",
    ),
    ("SET SCHEMA 'app'", "R s=set(search_path='app')"),
    ("SET NAMES 'UTF8'", "R s=set(client_encoding='UTF8')"),
    ("SET XML OPTION DOCUMENT", "R s=set(xmloption=DOCUMENT)"),
    (
        "SET default_transaction_read_only = on",
        "R s=set(default_transaction_read_only=on)",
    ),
    ("SET ROLE NONE", "R s=reset(role);unpin(set_role)"),
    ("SET LOCAL ROLE reporting", "R s=set_local(role=reporting)"),
    (
        "SET SESSION AUTHORIZATION 'alice'",
        "R s=set(session_authorization='alice');pin(session_authorization)",
    ),
    (
        "SET SESSION AUTHORIZATION DEFAULT",
        "R s=reset(session_authorization);unpin(session_authorization)",
    ),
    (
        "RESET SESSION AUTHORIZATION",
        "R s=reset(session_authorization);unpin(session_authorization)",
    ),
    ("SET myvar FROM CURRENT", "R"),
    (
        "SET search_path TO 'a'; SET LOCAL work_mem TO '1GB'",
        "R s=set(search_path='a');set_local(work_mem='1GB') n=2",
    ),
    ("RESET search_path", "R s=reset(search_path)"),
    ("RESET ALL", "R s=reset_all;unpin(untrackable_set)"),
    ("RESET TIME ZONE", "R s=reset(timezone)"),
    ("SHOW ALL", "R"),
    ("SHOW transaction_read_only", "R"),
    (
        "DISCARD ALL",
        "R s=discard_all;unpin(temp_table);unpin(advisory_lock);unpin(listen);unpin(hold_cursor);unpin(sql_prepare);unpin(set_role);unpin(session_authorization);unpin(untrackable_set)",
    ),
    ("DISCARD PLANS", "R s=discard_plans"),
    ("DISCARD SEQUENCES", "R s=discard_sequences"),
    ("DISCARD TEMP", "R s=discard_temp;unpin(temp_table)"),
    ("DISCARD TEMPORARY", "R s=discard_temp;unpin(temp_table)"),
    ("DEALLOCATE PREPARE \"S_1\"", "R s=deallocate(S_1)"),
    ("DEALLOCATE lrupsc_1_0", "R s=deallocate(lrupsc_1_0)"),
    ("SET", "W(unparsed) t=? w=? unparsed"),
    ("SET work_mem", "W(unparsed) t=? w=? unparsed"),
    // ---- set_config and other session-changing calls ----
    (
        "SELECT set_config('search_path', 'app, public', false)",
        "W(fn:set_config) s=set(search_path=\"app\", \"public\")",
    ),
    (
        "SELECT set_config('search_path', '\"$user\", Public', false)",
        "W(fn:set_config) s=set(search_path=\"$user\", \"public\")",
    ),
    (
        "SELECT set_config('app.user_id', '42', true)",
        "W(fn:set_config) s=set_local(app.user_id='42')",
    ),
    ("SELECT set_config('app.user_id', $1, true)", "W(fn:set_config)"),
    (
        "SELECT set_config('app.user_id', $1, $2)",
        "W(fn:set_config) s=pin(untrackable_set)",
    ),
    (
        "SELECT set_config('app.note', 'it''s', 'f')",
        "W(fn:set_config) s=set(app.note='it''s')",
    ),
    (
        "SELECT set_config('search_path', 'x; DROP TABLE t', false)",
        "W(fn:set_config) s=pin(untrackable_set)",
    ),
    (
        "SELECT set_config(name, setting, false) FROM saved_settings",
        "W(fn:set_config) t=saved_settings s=pin(untrackable_set)",
    ),
    ("SELECT current_setting('search_path')", "R"),
    (
        "SELECT pg_advisory_lock(1), pg_advisory_lock_shared(2)",
        "W(fn:pg_advisory_lock) s=pin(advisory_lock);pin(advisory_lock)",
    ),
    (
        "SELECT pg_try_advisory_lock(hashtext('job'))",
        "W(fn:pg_try_advisory_lock) s=pin(advisory_lock)",
    ),
    ("SELECT pg_advisory_xact_lock(42)", "W(fn:pg_advisory_xact_lock)"),
    (
        "SELECT pg_advisory_unlock_all()",
        "W(fn:pg_advisory_unlock_all) s=unpin(advisory_lock)",
    ),
    ("SELECT pg_notify('events', 'hello')", "W(fn:pg_notify)"),
    ("SELECT txid_current()", "W(fn:txid_current)"),
    ("SELECT pg_current_xact_id()", "W(fn:pg_current_xact_id)"),
    ("SELECT txid_current_snapshot()", "R"),
    ("SELECT lo_create(0)", "W(fn:lo_create) t=? w=?"),
    ("SELECT lo_import('/tmp/x')", "W(fn:lo_import) t=? w=?"),
    ("SELECT lo_unlink(16401)", "W(fn:lo_unlink) t=? w=?"),
    (
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = 'app' AND pid <> pg_backend_pid()",
        "W(fn:pg_terminate_backend) t=pg_stat_activity",
    ),
    ("SELECT pg_cancel_backend(12345)", "W(fn:pg_cancel_backend)"),
    ("SELECT pg_reload_conf()", "W(fn:pg_reload_conf)"),
    ("SELECT pg_switch_wal()", "W(fn:pg_switch_wal)"),
    (
        "SELECT * FROM dblink_exec('dbname=other', 'DELETE FROM t')",
        "W(fn:dblink_exec) t=? w=?",
    ),
    ("SELECT pg_sequence_last_value('users_id_seq')", "R"),
    ("SELECT last_value FROM users_id_seq", "R t=users_id_seq"),
    ("SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn()", "R"),
    ("SELECT now(), random(), gen_random_uuid(), clock_timestamp()", "R"),
    (
        "SELECT NEXTVAL('Orders_Seq'::regclass)",
        "W(fn:nextval) t=orders_seq w=orders_seq",
    ),
    ("SELECT \"nextval\"('s')", "W(fn:nextval) t=s w=s"),
    (
        "SELECT x FROM t WHERE id = (SELECT nextval('s'))",
        "W(fn:nextval) t=s,t w=s",
    ),
    (
        "SELECT * FROM t WHERE id IN (SELECT setval('s', max(id)) FROM u)",
        "W(fn:setval) t=s,t,u w=s",
    ),
    ("SELECT nextval($1)", "W(fn:nextval) t=? w=?"),
    (
        "SELECT pg_catalog.nextval('public.s')",
        "W(fn:pg_catalog.nextval) t=public.s w=public.s",
    ),
    // ---- pinning state ----
    ("CREATE TEMP TABLE tmp_ids (id int)", "W(ddl) t=? s=pin(temp_table)"),
    (
        "CREATE TEMPORARY TABLE tmp_ids AS SELECT id FROM users",
        "W(ddl) t=? s=pin(temp_table)",
    ),
    (
        "CREATE LOCAL TEMPORARY TABLE IF NOT EXISTS tmp_ids (id int)",
        "W(ddl) t=? s=pin(temp_table)",
    ),
    (
        "CREATE GLOBAL TEMP TABLE g (id int) ON COMMIT DELETE ROWS",
        "W(ddl) t=? s=pin(temp_table)",
    ),
    ("CREATE TEMP TABLE tmp_ids (id int) ON COMMIT DROP", "W(ddl) t=?"),
    ("CREATE TEMP TABLE tmp_ids ON COMMIT DROP AS SELECT 1", "W(ddl) t=?"),
    ("CREATE TABLE pg_temp.scratch (id int)", "W(ddl) t=? s=pin(temp_table)"),
    (
        "CREATE TABLE scratch (id int) ON COMMIT PRESERVE ROWS",
        "W(ddl) t=? s=pin(temp_table)",
    ),
    (
        "CREATE OR REPLACE TEMP VIEW v AS SELECT 1",
        "W(ddl) t=? s=pin(temp_table)",
    ),
    ("CREATE TEMPORARY SEQUENCE tmp_seq", "W(ddl) t=? s=pin(temp_table)"),
    (
        "CREATE TEMP RECURSIVE VIEW nums (n) AS VALUES (1) UNION ALL SELECT n+1 FROM nums WHERE n < 5",
        "W(ddl) t=? s=pin(temp_table)",
    ),
    ("CREATE UNLOGGED TABLE cache_t (k text, v text)", "W(ddl) t=? w=?"),
    (
        "CREATE TABLE t (id bigint GENERATED ALWAYS AS IDENTITY, note text DEFAULT 'temp')",
        "W(ddl) t=? w=?",
    ),
    (
        "SELECT * INTO TEMP TABLE recent FROM orders WHERE created_at > now() - interval '1 day'",
        "W(select_into) t=orders s=pin(temp_table)",
    ),
    (
        "SELECT * INTO TEMPORARY recent FROM orders",
        "W(select_into) t=orders s=pin(temp_table)",
    ),
    (
        "SELECT id, name INTO archive_2023 FROM orders",
        "W(select_into) t=archive_2023,orders w=archive_2023",
    ),
    (
        "SELECT id INTO UNLOGGED TABLE snap FROM orders",
        "W(select_into) t=orders,snap w=snap",
    ),
    (
        "LISTEN orders_channel",
        "W(listen) s=pin(listen);listen(orders_channel)",
    ),
    ("LISTEN \"Orders\"", "W(listen) s=pin(listen);listen(Orders)"),
    ("UNLISTEN orders_channel", "W(listen) s=unlisten(orders_channel)"),
    ("UNLISTEN *", "W(listen) s=unlisten(*);unpin(listen)"),
    ("NOTIFY orders_channel, 'order 42 paid'", "W(notify)"),
    (
        "DECLARE c CURSOR WITH HOLD FOR SELECT * FROM big_table",
        "R t=big_table s=pin(hold_cursor);hold(c)",
    ),
    ("DECLARE c SCROLL CURSOR FOR SELECT * FROM big_table", "R t=big_table"),
    (
        "DECLARE c BINARY INSENSITIVE NO SCROLL CURSOR WITHOUT HOLD FOR SELECT 1",
        "R",
    ),
    (
        "DECLARE c CURSOR WITH HOLD FOR SELECT * FROM jobs FOR UPDATE",
        "W(locking_clause) t=jobs s=pin(hold_cursor);hold(c)",
    ),
    ("FETCH 100 FROM c", "R"),
    ("MOVE FORWARD 10 IN c", "R"),
    ("CLOSE ALL", "R s=close(*);unpin(hold_cursor)"),
    (
        "PREPARE fooplan (int, text, bool, numeric) AS INSERT INTO foo VALUES($1, $2, $3, $4)",
        "W(dml) t=foo s=pin(sql_prepare);prepare(fooplan)",
    ),
    (
        "PREPARE usrrptplan (int) AS SELECT * FROM users u, logs l WHERE u.usrid=$1 AND u.usrid=l.usrid AND l.date = $2",
        "R t=logs,users s=pin(sql_prepare);prepare(usrrptplan)",
    ),
    (
        "PREPARE q AS SELECT set_config('a', 'b', false)",
        "W(fn:set_config) s=pin(sql_prepare);prepare(q)",
    ),
    ("EXECUTE fooplan(1, 'Hunter Valley', 't', 200.00)", "W(execute) t=? w=?"),
    ("LOAD 'auto_explain'", "R s=pin(load)"),
    // ---- data-modifying CTEs, locking clauses, INTO ----
    (
        "WITH moved AS (DELETE FROM queue WHERE id = 1 RETURNING *) INSERT INTO done SELECT * FROM moved",
        "W(dml) t=done,queue w=done,queue",
    ),
    (
        "WITH upd AS (UPDATE accounts SET balance = balance - 10 WHERE id = 1 RETURNING id) SELECT * FROM upd",
        "W(data_modifying_cte) t=accounts w=accounts",
    ),
    (
        "WITH a AS (SELECT 1), b AS (INSERT INTO log (msg) VALUES ('x') RETURNING id) SELECT * FROM a, b",
        "W(data_modifying_cte) t=log w=log",
    ),
    (
        "WITH a AS (SELECT * FROM (WITH b AS (DELETE FROM t RETURNING *) SELECT * FROM b) s) SELECT * FROM a",
        "W(data_modifying_cte) t=t w=t",
    ),
    (
        "WITH RECURSIVE r(n) AS (VALUES (1) UNION ALL SELECT n + 1 FROM r WHERE n < 10) SELECT * FROM r",
        "R",
    ),
    (
        "WITH recent AS MATERIALIZED (SELECT * FROM orders WHERE created_at > now() - interval '1 day') SELECT count(*) FROM recent",
        "R t=orders",
    ),
    (
        "WITH orders AS (SELECT * FROM archive.orders) SELECT * FROM orders",
        "R t=archive.orders",
    ),
    (
        "WITH m AS (MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN DELETE RETURNING t.id) SELECT * FROM m",
        "W(data_modifying_cte) t=s,t w=t",
    ),
    (
        "WITH x AS (SELECT id FROM t) UPDATE u SET flag = true FROM x WHERE u.id = x.id",
        "W(dml) t=t,u w=u",
    ),
    (
        "SELECT * FROM (SELECT * FROM jobs WHERE state = 'ready' LIMIT 1 FOR UPDATE SKIP LOCKED) j",
        "W(locking_clause) t=jobs",
    ),
    (
        "SELECT * FROM t WHERE id IN (SELECT id FROM u FOR SHARE)",
        "W(locking_clause) t=t,u",
    ),
    (
        "SELECT * FROM jobs FOR NO KEY UPDATE OF jobs SKIP LOCKED",
        "W(locking_clause) t=jobs",
    ),
    (
        "SELECT * FROM a JOIN b ON a.id = b.a_id FOR KEY SHARE OF a FOR UPDATE OF b",
        "W(locking_clause) t=a,b",
    ),
    (
        "SELECT * FROM t FOR\n  NO /* strength */ KEY\n  UPDATE",
        "W(locking_clause) t=t",
    ),
    ("SELECT substring(name FROM 1 FOR 3) FROM t", "R t=t"),
    ("SELECT 'FOR UPDATE', \"for update\" FROM t", "R t=t"),
    ("SELECT x AS update FROM t", "R t=t"),
    ("SELECT t.update FROM t", "R t=t"),
    // ---- EXPLAIN ----
    ("EXPLAIN SELECT * FROM t WHERE id = 1", "R t=t"),
    ("EXPLAIN INSERT INTO t VALUES (1)", "R t=t"),
    ("EXPLAIN (FORMAT JSON, COSTS OFF) DELETE FROM t", "R t=t"),
    ("EXPLAIN ANALYZE SELECT * FROM t", "R t=t"),
    ("EXPLAIN ANALYZE INSERT INTO t VALUES (1)", "W(explain_analyze) t=t w=t"),
    (
        "EXPLAIN (ANALYZE, BUFFERS) UPDATE t SET x = 1",
        "W(explain_analyze) t=t w=t",
    ),
    ("EXPLAIN (ANALYZE false, VERBOSE) UPDATE t SET x = 1", "R t=t"),
    ("EXPLAIN (ANALYZE on) SELECT nextval('s')", "W(explain_analyze) t=s w=s"),
    (
        "EXPLAIN ANALYSE VERBOSE WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d",
        "W(explain_analyze) t=t w=t",
    ),
    ("EXPLAIN ANALYZE SELECT * FROM t FOR UPDATE", "W(explain_analyze) t=t"),
    ("EXPLAIN", "W(unparsed) t=? w=? unparsed"),
    // ---- COPY ----
    ("COPY t FROM STDIN WITH (FORMAT csv, HEADER true)", "W(copy) t=t w=t"),
    (
        "COPY t (a, b) FROM '/var/lib/postgresql/import.csv' CSV",
        "W(copy) t=t w=t",
    ),
    ("COPY t TO STDOUT WITH (FORMAT binary)", "R t=t"),
    ("COPY (SELECT * FROM t WHERE x > 1) TO STDOUT WITH CSV HEADER", "R t=t"),
    ("COPY (SELECT * FROM t) TO '/tmp/out.csv'", "W(copy) t=t"),
    ("COPY t TO PROGRAM 'gzip > /tmp/t.gz'", "W(copy) t=t"),
    (
        "COPY (INSERT INTO t VALUES (1) RETURNING *) TO STDOUT",
        "W(dml) t=t w=t",
    ),
    ("COPY (SELECT nextval('s')) TO STDOUT", "W(fn:nextval) t=s w=s"),
    ("COPY BINARY t FROM STDIN", "W(copy) t=t w=t"),
    // ---- DDL, maintenance, procedural ----
    (
        "CREATE INDEX CONCURRENTLY idx_users_email ON users (email)",
        "W(ddl) t=? w=?",
    ),
    ("ALTER TABLE users ADD COLUMN last_seen timestamptz", "W(ddl) t=? w=?"),
    ("DROP TABLE IF EXISTS tmp_ids", "W(ddl) t=? w=?"),
    (
        "GRANT SELECT ON ALL TABLES IN SCHEMA public TO reporting",
        "W(ddl) t=? w=?",
    ),
    ("REVOKE ALL ON users FROM PUBLIC", "W(ddl) t=? w=?"),
    ("COMMENT ON TABLE users IS 'people'", "W(ddl) t=? w=?"),
    (
        "SECURITY LABEL FOR selinux ON TABLE t IS 'system_u:object_r:sepgsql_table_t:s0'",
        "W(ddl) t=? w=?",
    ),
    ("TRUNCATE ONLY t1, t2 * RESTART IDENTITY", "W(ddl) t=t1,t2 w=t1,t2"),
    ("VACUUM (VERBOSE, ANALYZE) users", "W(maintenance)"),
    ("VACUUM ANALYZE t", "W(maintenance)"),
    ("ANALYZE users", "W(maintenance)"),
    ("CLUSTER users USING users_pkey", "W(maintenance)"),
    ("REINDEX INDEX CONCURRENTLY idx_users_email", "W(maintenance)"),
    ("CHECKPOINT", "W(maintenance)"),
    (
        "REFRESH MATERIALIZED VIEW CONCURRENTLY daily_totals",
        "W(maintenance) t=daily_totals w=daily_totals",
    ),
    ("LOCK TABLE accounts IN SHARE ROW EXCLUSIVE MODE", "W(lock) t=accounts"),
    ("LOCK t1, ONLY t2 NOWAIT", "W(lock) t=t1,t2"),
    ("DO $$BEGIN UPDATE t SET x = 1; END$$", "W(do) t=? w=?"),
    (
        "DO $$BEGIN SET search_path TO evil; END$$",
        "W(do) t=? w=? s=pin(untrackable_set)",
    ),
    ("DO $$BEGIN SET LOCAL work_mem = '1GB'; END$$", "W(do) t=? w=?"),
    (
        "DO $$BEGIN PERFORM set_config('app.x', '1', false); END$$",
        "W(do) t=? w=? s=pin(untrackable_set)",
    ),
    (
        "DO $$BEGIN EXECUTE 'SET role ' || quote_ident('x'); END$$",
        "W(do) t=? w=? s=pin(untrackable_set)",
    ),
    (
        "DO $$BEGIN CREATE TEMP TABLE scratch(id int); END$$",
        "W(do) t=? w=? s=pin(temp_table)",
    ),
    (
        "DO $$BEGIN PERFORM pg_advisory_lock(42); END$$",
        "W(do) t=? w=? s=pin(advisory_lock)",
    ),
    (
        "DO $$BEGIN IF true THEN LISTEN jobs; END IF; END$$",
        "W(do) t=? w=? s=pin(listen)",
    ),
    (
        "DO LANGUAGE plpython3u $$ plpy.execute('SET search_path TO x') $$",
        "W(do) t=? w=? s=pin(untrackable_set)",
    ),
    ("DO 'BEGIN RAISE NOTICE ''set''; END'", "W(do) t=? w=?"),
    (
        "DO LANGUAGE plpgsql $body$ BEGIN PERFORM pg_sleep(1); END $body$",
        "W(do) t=? w=?",
    ),
    ("CALL refresh_all(1, 'x')", "W(call) t=? w=?"),
    (
        "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS $$ SELECT 1; UPDATE t SET x = 2; $$",
        "W(ddl) t=? w=?",
    ),
    (
        "CREATE OR REPLACE FUNCTION add(a int, b int) RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT CASE WHEN a > 0 THEN a ELSE 0 END + b; END; SELECT 1",
        "W(ddl) t=? w=? n=2",
    ),
    (
        "CREATE PROCEDURE p() LANGUAGE sql BEGIN ATOMIC INSERT INTO t VALUES (1); INSERT INTO t VALUES (2); END",
        "W(ddl) t=? w=?",
    ),
    (
        "IMPORT FOREIGN SCHEMA remote FROM SERVER s1 INTO local",
        "W(ddl) t=? w=?",
    ),
    ("REASSIGN OWNED BY old_role TO new_role", "W(ddl) t=? w=?"),
    // ---- comments, hints, literals, quoting ----
    ("/* pgrelay: replica */ SELECT * FROM t", "R t=t hint=replica"),
    ("/* pgrelay: primary */ SELECT * FROM t", "R t=t hint=primary"),
    ("-- pgrelay: replica\nSELECT * FROM t", "R t=t hint=replica"),
    ("  /*pgrelay:PRIMARY*/\nSELECT 1", "R hint=primary"),
    (
        "/* pgrelay: replica */ INSERT INTO t VALUES (1)",
        "W(dml) t=t w=t hint=replica",
    ),
    ("SELECT * FROM t /* pgrelay: replica */", "R t=t"),
    ("/* app=web,route=/home */ /* pgrelay: replica */ SELECT 1", "R"),
    ("/* pgrelay: anywhere */ SELECT 1", "R"),
    ("-- leading comment\nSELECT * FROM t -- trailing\n", "R t=t"),
    ("/* outer /* nested; DELETE FROM t; */ still comment */ SELECT 1", "R"),
    ("SELECT 'UPDATE t SET x = 1; DELETE FROM t' AS sql_text", "R"),
    ("SELECT $$ FOR UPDATE; INSERT INTO t VALUES (1) $$ AS body", "R"),
    ("SELECT $fn$ SELECT nextval('s') $fn$", "R"),
    ("SELECT E'it\\'s; DELETE FROM t' AS s", "R"),
    ("SELECT 'it''s; DELETE FROM t'", "R"),
    (
        "SELECT \"delete\", \"into\", \"update\" FROM \"Order Items\"",
        "R t=Order Items",
    ),
    (
        "SELECT * FROM \"Users\" u JOIN public.\"Orders\" o ON o.user_id = u.id",
        "R t=Users,public.Orders",
    ),
    ("SELECT * FROM Users", "R t=users"),
    ("SELECT * FROM MySchema.Users", "R t=myschema.users"),
    ("SELECT 'a\\' || nextval('s') || ''", "W(fn:nextval) t=? w=? unparsed"),
    (
        "SELECT x FROM t WHERE y ILIKE 'a%' ESCAPE '\\'",
        "W(unparsed) t=? w=? unparsed",
    ),
    ("SELECT 'unterminated", "W(unparsed) t=? w=? unparsed"),
    ("SELECT /* unterminated comment", "W(unparsed) t=? w=? unparsed"),
    ("SELECT $tag$ never closed", "W(unparsed) t=? w=? unparsed"),
    ("SELECT U&'d\\0061t\\+000061' AS unicode", "R"),
    ("SELECT B'1010', X'1F', N'national'", "R"),
    ("SELECT a$b FROM t", "R t=t"),
    ("SELECT 1.5e-3, .5, 10::numeric(10,2)", "R"),
    // ---- multi-statement texts ----
    ("SELECT 1; SELECT 2;", "R n=2"),
    ("SELECT * FROM a; SELECT * FROM b", "R t=a,b n=2"),
    ("SELECT * FROM a; UPDATE b SET x = 1", "W(dml) t=a,b w=b n=2"),
    (
        "INSERT INTO a VALUES (1); SELECT currval('a_id_seq')",
        "W(dml) t=a w=a n=2",
    ),
    (
        "SET search_path TO app; SELECT * FROM users",
        "R t=users s=set(search_path=app) n=2",
    ),
    ("SELECT 1; DO $$ BEGIN NULL; END $$", "W(do) t=? w=? n=2"),
    (
        "LISTEN a; LISTEN b",
        "W(listen) s=pin(listen);listen(a);pin(listen);listen(b) n=2",
    ),
    ("SELECT 1; garbage here", "W(unparsed) t=? w=? unparsed n=2"),
    ("", "R n=0"),
    ("   ", "R n=0"),
    (";;", "R n=0"),
    ("-- only a comment", "R n=0"),
    ("/* pgrelay: primary */", "R hint=primary n=0"),
    ("SELECT 1;;SELECT 2", "R n=2"),
    // ---- other shapes ----
    ("VALUES (1, 'one'), (2, 'two')", "R"),
    ("TABLE users", "R t=users"),
    ("TABLE ONLY public.users", "R t=public.users"),
    ("TABLE users ORDER BY 1", "R t=users"),
    ("(SELECT id FROM a) UNION ALL (SELECT id FROM b)", "R t=a,b"),
    (
        "SELECT id FROM a EXCEPT SELECT id FROM b INTERSECT SELECT id FROM c",
        "R t=a,b,c",
    ),
    ("SELECT * FROM ONLY parent_t WHERE x = 1", "R t=parent_t"),
    ("UPDATE ONLY parent_t SET x = 2", "W(dml) t=parent_t w=parent_t"),
    ("DELETE FROM ONLY parent_t WHERE x = 2", "W(dml) t=parent_t w=parent_t"),
    (
        "SELECT * FROM generate_series(1, 10) AS g(i) CROSS JOIN LATERAL (SELECT * FROM t WHERE t.id = g.i) s",
        "R t=t",
    ),
    ("SELECT * FROM unnest(ARRAY[1,2,3]) WITH ORDINALITY AS u(x, n)", "R"),
    (
        "SELECT count(*) FILTER (WHERE paid), percentile_cont(0.5) WITHIN GROUP (ORDER BY amount) FROM invoices",
        "R t=invoices",
    ),
    (
        "SELECT CASE WHEN EXISTS (SELECT 1 FROM flags WHERE on_) THEN 1 END FROM dual_t",
        "R t=dual_t,flags",
    ),
    (
        "SELECT (SELECT max(v) FROM (SELECT v FROM vals ORDER BY v DESC LIMIT 3) top3)",
        "R t=vals",
    ),
    (
        "SELECT * FROM t WHERE x = ANY(SELECT y FROM u) AND z <> ALL(SELECT w FROM v)",
        "R t=t,u,v",
    ),
    ("SELECT j->>'a', j #> '{b,c}', j @? '$.d' FROM docs", "R t=docs"),
    ("SELECT row_to_json(t) FROM (SELECT id, name FROM users) t", "R t=users"),
    (
        "SELECT * FROM t1 JOIN (t2 JOIN t3 ON t2.id = t3.id) ON t1.id = t2.id",
        "R t=t1,t2,t3",
    ),
    (
        "SELECT * FROM (VALUES (1), (2)) v(x) WHERE x IN (SELECT id FROM w)",
        "R t=w",
    ),
    ("SELECT $1::text, $2::int[], $10", "R"),
    (
        "INSERT INTO t SELECT * FROM staging ON CONFLICT (id) DO UPDATE SET v = EXCLUDED.v WHERE t.v IS DISTINCT FROM EXCLUDED.v",
        "W(dml) t=staging,t w=t",
    ),
    ("INSERT INTO t (a) VALUES (1) ON CONFLICT DO NOTHING", "W(dml) t=t w=t"),
    (
        "UPDATE t SET x = s.x FROM s JOIN r ON r.id = s.rid WHERE t.id = s.id RETURNING t.*",
        "W(dml) t=r,s,t w=t",
    ),
    (
        "DELETE FROM t USING u WHERE t.id = u.id AND u.gone RETURNING t.id",
        "W(dml) t=t,u w=t",
    ),
    (
        "MERGE INTO stock s USING deliveries d ON s.item = d.item WHEN MATCHED THEN UPDATE SET qty = s.qty + d.qty WHEN NOT MATCHED THEN INSERT VALUES (d.item, d.qty)",
        "W(dml) t=deliveries,stock w=stock",
    ),
    (
        "INSERT INTO t VALUES (1) RETURNING pg_advisory_lock(id)",
        "W(dml) t=t w=t s=pin(advisory_lock)",
    ),
    ("UPDATE t SET x = (1 WHERE id = 2", "W(dml) t=? w=t"),
    (
        "INSERT INTO \"Weird\"\"Name\" VALUES (1)",
        "W(dml) t=Weird\"Name w=Weird\"Name",
    ),
    ("SELECT pg_sleep(0.1)", "R"),
    ("SELECT my_report_fn(42)", "R"),
    ("SELECT * FROM my_srf(42)", "R"),
    ("FOOBAR", "W(unparsed) t=? w=? unparsed"),
    ("12345", "W(unparsed) t=? w=? unparsed"),
    ("SELECT", "W(unparsed) t=? w=? unparsed"),
    ("SELEC * FROM t", "W(unparsed) t=? w=? unparsed"),
    ("SELECT * FROM t WHERE", "W(unparsed) t=? w=? unparsed"),
];

fn classifier(write: &[&str], read_only: &[&str]) -> Classifier {
    Classifier::new(ClassifierSettings {
        write_functions: write.iter().map(|s| s.to_string()).collect(),
        read_only_functions: read_only.iter().map(|s| s.to_string()).collect(),
        cache_capacity: 10_000,
        ..Default::default()
    })
}

#[test]
fn classification_table() {
    assert!(CASES.len() >= 250, "only {} statements", CASES.len());
    let c = classifier(&[], &[]);
    let mut failures = Vec::new();
    for (sql, expected) in CASES {
        let got = render(&c.classify(sql));
        if got != *expected {
            failures.push(format!("{sql:?}\n    expected: {expected}\n    got:      {got}"));
        }
        assert_eq!(*c.classify(sql), c.classify_uncached(sql), "cache differs for {sql:?}");
    }
    assert!(
        failures.is_empty(),
        "{} of {} mismatched:\n{}",
        failures.len(),
        CASES.len(),
        failures.join("\n")
    );
}

#[test]
fn classifier_is_shareable() {
    fn shareable<T: Send + Sync + 'static>() {}
    shareable::<Classifier>();
    shareable::<Classification>();
}

#[test]
fn replica_eligible_transactions() {
    let c = classifier(&[], &[]);
    let eligible = |sql: &str| {
        c.classify(sql)
            .transaction
            .as_ref()
            .is_some_and(TxControl::replica_eligible)
    };
    assert!(eligible("BEGIN READ ONLY"));
    assert!(eligible("START TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY"));
    assert!(eligible("SET TRANSACTION READ ONLY"));
    // A hot standby refuses serializable mode even for read-only transactions.
    assert!(!eligible(
        "START TRANSACTION READ ONLY, ISOLATION LEVEL SERIALIZABLE, DEFERRABLE"
    ));
    assert!(!eligible("BEGIN"));
    assert!(!eligible("BEGIN READ WRITE"));
    assert!(!eligible("COMMIT"));
}

#[test]
fn configured_function_lists() {
    let c = classifier(
        &["audit_log", "Billing.Charge"],
        &["lo_get", "set_config", "public.safe_nextval"],
    );
    let cases = [
        ("SELECT audit_log('login')", "W(fn:audit_log) t=? w=?"),
        ("SELECT billing.charge(10)", "W(fn:billing.charge) t=? w=?"),
        ("SELECT charge(10)", "W(fn:charge) t=? w=?"),
        ("SELECT other.audit(10)", "R"),
        (
            "SELECT * FROM t WHERE x = (SELECT audit_log(id) FROM u)",
            "W(fn:audit_log) t=? w=?",
        ),
        ("SELECT lo_get(16401)", "R"),
        ("SELECT lo_put(16401, 0, 'x')", "W(fn:lo_put) t=? w=?"),
        ("SELECT set_config('a.b', 'c', false)", "R s=set(a.b='c')"),
        ("SELECT public.safe_nextval()", "R"),
    ];
    for (sql, expected) in cases {
        assert_eq!(render(&c.classify(sql)), expected, "{sql}");
    }
}

#[test]
fn effects_render_as_sql() {
    let c = classifier(&[], &[]);
    let sql = |text: &str| {
        c.classify(text)
            .session
            .iter()
            .filter_map(SessionEffect::to_sql)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        sql("SET search_path TO \"$user\", public"),
        ["SET \"search_path\" TO \"$user\", public"]
    );
    assert_eq!(sql("SET LOCAL work_mem = '64MB'"), ["SET LOCAL \"work_mem\" TO '64MB'"]);
    assert_eq!(
        sql("SELECT set_config('app.user', 'o''brien', false)"),
        ["SET \"app\".\"user\" TO 'o''brien'"]
    );
    assert_eq!(sql("SET TIME ZONE DEFAULT"), ["RESET \"timezone\""]);
    assert_eq!(sql("RESET ALL"), ["RESET ALL"]);
}

#[test]
fn cache_behaviour() {
    let c = classifier(&[], &[]);
    let a = c.classify("SELECT * FROM t WHERE id = $1");
    let b = c.classify("SELECT * FROM t WHERE id = $1");
    assert!(std::sync::Arc::ptr_eq(&a, &b));
    let long = format!("SELECT 1 /* {} */", "x".repeat(crate::route::MAX_CACHED_LEN));
    assert!(!std::sync::Arc::ptr_eq(&c.classify(&long), &c.classify(&long)));
    let off = Classifier::new(ClassifierSettings {
        cache_capacity: 0,
        ..ClassifierSettings::default()
    });
    assert!(!std::sync::Arc::ptr_eq(
        &off.classify("SELECT 1"),
        &off.classify("SELECT 1")
    ));
    assert_eq!(*off.classify("SELECT 1"), *c.classify("SELECT 1"));
}

#[test]
fn bounded_work_on_huge_or_deep_inputs() {
    let c = classifier(&[], &[]);
    // Over MAX_PARSE_LEN: a SELECT is not read, DML keeps its keyword verdict and target.
    let big_select = format!("SELECT * FROM t WHERE id IN ({})", vec!["1"; 600_000].join(","));
    assert_eq!(render(&c.classify(&big_select)), "W(unparsed) t=? w=? unparsed");
    let big_insert = format!("INSERT INTO t VALUES {}", vec!["(1,'x')"; 200_000].join(","));
    assert_eq!(render(&c.classify(&big_insert)), "W(dml) t=? w=t");
    // A long operator chain is read by the token reader; sqlparser never sees one longer than
    // MAX_OPERATORS (dropping its AST would overflow the stack).
    let chain = format!("SELECT {} FROM t", vec!["a"; 60_000].join(" + "));
    assert_eq!(render(&c.classify(&chain)), "R t=t");
    let cut_short = format!("SELECT {} FROM t WHERE", vec!["a"; 60_000].join(" + "));
    assert_eq!(render(&c.classify(&cut_short)), "W(unparsed) t=? w=? unparsed");
    // The longest chain sqlparser is given is walked and dropped within a test thread's 2 MiB
    // stack, even in a debug build.
    let chain_ok = format!("SELECT {} FROM t", vec!["a"; crate::route::MAX_OPERATORS].join(" + "));
    let lists = FunctionLists::default();
    let ctx = Ctx {
        lists: &lists,
        volatile: None,
        parse_allowed: true,
    };
    let mut ast = None;
    lex::for_each_statement(&chain_ok, |stmt| ast = parsed::ast_tables(&ctx, &stmt));
    assert_eq!(ast, Some((Tables::Known(vec!["t".into()]), Tables::empty())));
    let or_chain = format!(
        "SELECT * FROM t WHERE {}",
        vec!["(a = 1 AND b = 2)"; 1_000].join(" OR ")
    );
    assert_eq!(render(&c.classify(&or_chain)), "R t=t");
    let parens = format!("SELECT {}1{}", "(".repeat(5_000), ")".repeat(5_000));
    assert!(!c.classify(&parens).is_read());
    let subqueries = format!("SELECT {}1{}", "(SELECT ".repeat(300), ")".repeat(300));
    assert!(!c.classify(&subqueries).is_read());
    let explains = format!("{}SELECT 1", "EXPLAIN ANALYZE ".repeat(10_000));
    assert!(!c.classify(&explains).is_read());
    let many = "SELECT 1;".repeat(50_000);
    assert_eq!(c.classify(&many).statements, 50_000);
    // Effects and tables are capped per text.
    let sets = "SET a.b = 1;".repeat(10_000);
    let class = c.classify(&sets);
    assert_eq!(class.session.len(), crate::route::MAX_EFFECTS + 1);
    assert_eq!(
        class.session.last(),
        Some(&SessionEffect::Pin(crate::route::PinReason::UntrackableSet))
    );
    let tables: String = (0..5_000).map(|i| format!("SELECT * FROM t{i};")).collect();
    assert_eq!(c.classify(&tables).tables, Tables::Unknown);
    let tokens = format!("UPDATE t SET x = 1 WHERE id IN ({})", vec!["1"; 300_000].join(","));
    assert_eq!(render(&c.classify(&tokens)), "W(dml) t=? w=t");
}

/// The token reader and the AST walk agree on every statement both understand.
#[test]
fn token_reader_matches_the_ast() {
    let lists = FunctionLists::default();
    let ctx = Ctx {
        lists: &lists,
        volatile: None,
        parse_allowed: true,
    };
    let (mut compared, mut reader_only) = (0, Vec::new());
    for sql in CASES.iter().map(|(s, _)| *s).chain(EXTRA_TABLE_CASES.iter().copied()) {
        lex::for_each_statement(sql, |stmt| {
            let first = stmt.tok_text(0).to_ascii_lowercase();
            if ![
                "select", "with", "values", "table", "(", "insert", "update", "delete", "merge",
            ]
            .contains(&first.as_str())
            {
                return;
            }
            let reader = relations::extract(&stmt).map(|(mut read, mut written)| {
                written.sort_unstable();
                written.dedup();
                read.extend(written.iter().cloned());
                read.sort_unstable();
                read.dedup();
                (Tables::Known(read), Tables::Known(written))
            });
            match (reader, parsed::ast_tables(&ctx, &stmt)) {
                (Some(r), Some(a)) if !a.0.is_unknown() => {
                    compared += 1;
                    assert_eq!(r, a, "token reader and AST differ on {:?}", stmt.text());
                }
                (Some(_), None) => reader_only.push(stmt.text().to_owned()),
                _ => {}
            }
        });
    }
    assert!(compared >= 150, "only {compared} statements compared");
    println!("compared {compared}; read only by the token reader: {reader_only:#?}");
}

/// More shapes for the reader/AST comparison (no expected rendering).
const EXTRA_TABLE_CASES: &[&str] = &[
    "SELECT * FROM a, b AS x, c y WHERE a.id = x.id",
    "SELECT * FROM a AS x(c1, c2), b",
    "SELECT * FROM a LEFT JOIN b ON a.id = b.id, c",
    "SELECT * FROM a JOIN b USING (id), c",
    "SELECT * FROM a NATURAL FULL OUTER JOIN b",
    "SELECT * FROM (SELECT * FROM a) s JOIN (b JOIN c ON b.id = c.id) ON s.id = b.id",
    "SELECT * FROM a WHERE EXTRACT(YEAR FROM a.ts) = 2024 AND TRIM(BOTH ' ' FROM a.n) = 'x'",
    "SELECT SUBSTRING(n FROM 2 FOR 3), OVERLAY(n PLACING 'x' FROM 2) FROM a",
    "SELECT * FROM a WHERE x IS DISTINCT FROM y",
    "SELECT (SELECT max(v) FROM b WHERE b.id = a.id) AS m, c FROM a",
    "SELECT * FROM a WHERE id IN (SELECT id FROM b UNION SELECT id FROM c)",
    "WITH x AS (SELECT * FROM a), y AS (SELECT * FROM x JOIN b ON true) SELECT * FROM y, c",
    "WITH RECURSIVE t(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM t WHERE n < 3) SELECT * FROM t",
    "WITH x(a, b) AS NOT MATERIALIZED (SELECT 1, 2) SELECT * FROM x",
    "SELECT * FROM a WHERE EXISTS (SELECT 1 FROM b WHERE b.a = a.id) ORDER BY a.x, a.y",
    "SELECT a.x, count(*) FROM a GROUP BY a.x, a.y HAVING count(*) > 1",
    "SELECT * FROM a CROSS JOIN LATERAL (SELECT * FROM b WHERE b.id = a.id LIMIT 1) l",
    "SELECT * FROM generate_series(1, 3) g, a",
    "SELECT * FROM public.a pa JOIN \"S\".\"B\" sb ON pa.id = sb.id",
    "SELECT x FROM a UNION ALL SELECT x FROM b EXCEPT SELECT x FROM c",
    "UPDATE a SET x = b.x FROM b, c WHERE a.id = b.id AND b.cid = c.id",
    "UPDATE a SET x = (SELECT max(y) FROM b) WHERE id = 1",
    "DELETE FROM a USING b, c WHERE a.id = b.id",
    "INSERT INTO a (x, y) SELECT x, y FROM b JOIN c ON b.id = c.id",
    "INSERT INTO a SELECT * FROM b WHERE NOT EXISTS (SELECT 1 FROM a WHERE a.id = b.id)",
    "INSERT INTO a VALUES (1) ON CONFLICT (id) DO UPDATE SET x = EXCLUDED.x",
    "WITH d AS (DELETE FROM a RETURNING *) INSERT INTO b SELECT * FROM d",
    "WITH u AS (UPDATE a SET x = 1 RETURNING id) SELECT * FROM u JOIN b ON b.id = u.id",
    "MERGE INTO a USING (SELECT * FROM b) s ON a.id = s.id WHEN MATCHED THEN UPDATE SET x = s.x",
    "SELECT * FROM a WINDOW w AS (PARTITION BY x ORDER BY y)",
    "SELECT count(*) FILTER (WHERE x > 0) OVER (PARTITION BY y) FROM a",
    "SELECT CAST(x AS int), x::text, ARRAY(SELECT y FROM b) FROM a",
    "SELECT * FROM a WHERE x = ANY (SELECT y FROM b) AND z IN (1, 2)",
    "SELECT * FROM a FOR UPDATE OF a",
    "SELECT * FROM a, b FOR SHARE OF a, b",
    "SELECT * FROM a OFFSET 10 LIMIT 5",
    "SELECT DISTINCT ON (a.x) a.x FROM a",
    "SELECT * FROM a TABLESAMPLE SYSTEM (10) REPEATABLE (1), b",
    "SELECT * FROM (VALUES (1, 2)) AS v(x, y) JOIN a ON a.id = v.x",
    "SELECT * FROM unnest(ARRAY[1, 2]) WITH ORDINALITY AS u(x, n) JOIN a ON a.id = u.x",
    "SELECT * FROM a WHERE x IN (TABLE b)",
    "TABLE a UNION TABLE b",
];

/// Volatile functions as a database's catalog would list them (schema, name).
const CATALOG: &[(&str, &str)] = &[
    ("app", "log_event"),
    ("App", "Log Event"),
    ("public", "bump"),
    ("public", "audit"),
    ("pg_catalog", "nextval"),
    ("pg_catalog", "random"),
    ("pg_catalog", "clock_timestamp"),
    ("pg_catalog", "pg_current_wal_lsn"),
    ("pg_catalog", "pg_is_in_recovery"),
    ("pg_catalog", "pg_stat_get_activity"),
    ("pg_catalog", "pg_sleep"),
    ("pg_catalog", "set_config"),
    ("app", "random"),
];

/// With the catalog above loaded, and `write_functions` / `read_only_functions` as given in
/// `catalog_classifier`: volatile calls in every position are writes; stable ones (not in the
/// catalog list) and read-safe built-ins stay reads; the lists still win.
const VOLATILE_CASES: &[(&str, &str)] = &[
    ("SELECT log_event('x')", "W(volatile:log_event) t=? w=?"),
    ("SELECT app.log_event('x')", "W(volatile:app.log_event) t=? w=?"),
    ("SELECT \"app\".\"log_event\"('x')", "W(volatile:app.log_event) t=? w=?"),
    ("SELECT \"App\".\"Log Event\"('x')", "W(volatile:App.Log Event) t=? w=?"),
    (
        "SELECT * FROM t WHERE id = log_event('x')",
        "W(volatile:log_event) t=? w=?",
    ),
    ("SELECT * FROM log_event('x')", "W(volatile:log_event) t=? w=?"),
    (
        "SELECT * FROM t WHERE id IN (SELECT bump())",
        "W(volatile:bump) t=? w=?",
    ),
    (
        "WITH x AS (SELECT public.bump()) SELECT * FROM x",
        "W(volatile:public.bump) t=? w=?",
    ),
    // The case of an unquoted name folds: "App"."Log Event" is not app.log_event.
    ("SELECT app.\"Log Event\"('x')", "R"),
    ("SELECT other.log_event('x')", "R"),
    ("SELECT pg_current_wal_lsn()", "W(volatile:pg_current_wal_lsn) t=? w=?"),
    (
        "SELECT pg_catalog.pg_current_wal_lsn()",
        "W(volatile:pg_catalog.pg_current_wal_lsn) t=? w=?",
    ),
    // Stable and immutable functions are not in the catalog's list; configured writes still are.
    ("SELECT now(), lower(name) FROM t", "R t=t"),
    ("SELECT report_total(1)", "W(fn:report_total) t=? w=?"),
    // Read-safe built-ins, unqualified or in pg_catalog; a user's own `random` is not.
    ("SELECT random(), clock_timestamp()", "R"),
    ("SELECT pg_catalog.random()", "R"),
    ("SELECT app.random()", "W(volatile:app.random) t=? w=?"),
    ("SELECT pg_is_in_recovery()", "R"),
    ("SELECT pg_stat_get_activity(NULL)", "R"),
    ("SELECT pg_sleep(1)", "R"),
    // Built-in rules keep their reasons and effects.
    ("SELECT nextval('s')", "W(fn:nextval) t=s w=s"),
    // The lists win: `audit` is read-only, `report_total` a write by configuration.
    ("SELECT audit()", "R"),
    ("SELECT report_total(1), log_event('x')", "W(fn:report_total) t=? w=?"),
    // Names in literals and comments are not calls.
    ("SELECT 'log_event(1)' /* bump() */", "R"),
];

fn catalog_classifier() -> Classifier {
    let c = Classifier::new(ClassifierSettings {
        write_functions: vec!["report_total".into()],
        read_only_functions: vec!["audit".into()],
        cache_capacity: 10_000,
        catalog_volatility: true,
    });
    let rows = CATALOG.iter().map(|(s, n)| (s.to_string(), n.to_string()));
    assert!(c.set_volatile(crate::route::VolatileSet::from_rows(rows)));
    c
}

#[test]
fn volatile_functions_from_the_catalog() {
    let c = catalog_classifier();
    let failures: Vec<String> = VOLATILE_CASES
        .iter()
        .filter_map(|(sql, expected)| {
            let got = render(&c.classify(sql));
            (got != *expected).then(|| format!("{sql:?}\n    expected: {expected}\n    got:      {got}"))
        })
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn the_catalog_replaces_cached_classifications_and_only_when_asked_for() {
    let rows = || CATALOG.iter().map(|(s, n)| (s.to_string(), n.to_string()));
    let c = Classifier::new(ClassifierSettings {
        cache_capacity: 10_000,
        catalog_volatility: true,
        ..Default::default()
    });
    // Before the catalog: the built-in lists only.
    assert!(c.classify("SELECT log_event('x')").is_read());
    assert!(!c.catalog_loaded());
    assert!(c.set_volatile(crate::route::VolatileSet::from_rows(rows())));
    assert!(
        !c.classify("SELECT log_event('x')").is_read(),
        "cached read served after the catalog"
    );
    // The same set again keeps the cache; a set without the function makes it a read again.
    assert!(!c.set_volatile(crate::route::VolatileSet::from_rows(rows())));
    assert!(c.set_volatile(crate::route::VolatileSet::from_rows(
        rows().filter(|(_, n)| n != "log_event")
    )));
    assert!(c.classify("SELECT log_event('x')").is_read());

    let lists = Classifier::new(ClassifierSettings {
        cache_capacity: 10_000,
        ..Default::default()
    });
    assert!(!lists.set_volatile(crate::route::VolatileSet::from_rows(rows())));
    assert!(lists.classify("SELECT log_event('x')").is_read());
    assert!(!lists.classify("SELECT nextval('s')").is_read());
}

#[test]
fn a_refused_text_is_a_write_from_then_on_even_with_a_new_catalog() {
    let c = catalog_classifier();
    let sql = "SELECT report_by_trigger(1)";
    assert!(c.classify(sql).is_read());
    c.remember_refused(sql.as_bytes(), crate::route::Charset::Utf8);
    assert_eq!(render(&c.classify(sql)), "W(replica_refused) w=?");
    // A new catalog starts a new cache; the refused text stays a write.
    assert!(c.set_volatile(crate::route::VolatileSet::default()));
    assert_eq!(render(&c.classify(sql)), "W(replica_refused) w=?");
    // Other texts are untouched.
    assert!(c.classify("SELECT report_by_trigger(2)").is_read());
}
