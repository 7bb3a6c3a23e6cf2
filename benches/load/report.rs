//! The results as Markdown: one table of pgbench runs, one of pgrelay relative to PgBouncer, one
//! of memory per idle client, and the notes (skipped targets, errors).

use std::fmt::Write;

use crate::idle::IdleOutcome;
use crate::pgbench::Outcome;
use crate::settings::Scenario;
use crate::targets::Kind;

/// One pgbench run of one target.
#[derive(Debug)]
pub struct RunRow {
    pub scenario: Scenario,
    pub kind: Kind,
    pub outcome: Result<Outcome, String>,
    /// The proxy's CPU time (user + system) per transaction, in µs; None for PostgreSQL.
    pub cpu_us_per_txn: Option<f64>,
    /// CPU the rest of the machine used during the run, in % of all cores.
    pub other_load_pct: Option<f64>,
}

/// The idle-client measurement of one proxy.
#[derive(Debug)]
pub struct IdleRow {
    pub kind: Kind,
    /// Which round, when there are several.
    pub round: Option<usize>,
    pub requested: usize,
    pub outcome: Result<IdleOutcome, String>,
}

#[derive(Debug, Default)]
pub struct Report {
    /// Bullet points describing the machine and the run.
    pub setup: Vec<String>,
    pub runs: Vec<RunRow>,
    pub idle: Vec<IdleRow>,
    pub notes: Vec<String>,
}

impl Report {
    pub fn markdown(&self) -> String {
        let mut md = String::from("# pgrelay load benchmark\n\n");
        for line in &self.setup {
            let _ = writeln!(md, "- {line}");
        }
        md.push_str("\n## Throughput, latency and proxy CPU per transaction (pgbench)\n\n");
        md.push_str(
            "| scenario | clients | target | TPS | mean ms | p99 ms | proxy CPU µs/txn | failed txns | other work |\n",
        );
        md.push_str("|---|---:|---|---:|---:|---:|---:|---:|---:|\n");
        for row in &self.runs {
            let head = format!(
                "| {} | {} | {} ",
                row.scenario.label(),
                row.scenario.clients,
                row.kind.name()
            );
            match &row.outcome {
                Ok(o) => {
                    let cpu = row
                        .cpu_us_per_txn
                        .map_or_else(|| "–".to_owned(), |us| format!("{us:.1}"));
                    let other = row
                        .other_load_pct
                        .map_or_else(|| "?".to_owned(), |pct| format!("{pct:.0} %"));
                    let _ = writeln!(
                        md,
                        "{head}| {:.0} | {:.2} | {:.2} | {cpu} | {}{} | {other} |",
                        o.tps,
                        o.mean_ms,
                        o.p99_ms,
                        o.failed,
                        if o.errors.is_empty() {
                            ""
                        } else {
                            " (errors, see notes)"
                        }
                    );
                }
                Err(_) => {
                    let _ = writeln!(md, "{head}| error, see notes | | | | | |");
                }
            }
        }
        self.ratios(&mut md);
        self.split_ratios(&mut md);
        self.idle_table(&mut md);
        let errors = self.errors();
        if !self.notes.is_empty() || !errors.is_empty() {
            md.push_str("\n## Notes and errors\n\n");
            for note in self.notes.iter().chain(&errors) {
                let _ = writeln!(md, "- {}", note.replace('\n', "\n  "));
            }
        }
        md
    }

    /// What read/write splitting and `consistency = "session"` cost, per scenario: CPU per
    /// transaction of the split targets against pgrelay without a replica, and session against
    /// eventual in CPU and p99 latency.
    fn split_ratios(&self, md: &mut String) {
        let find = |scenario: &Scenario, kind: Kind| {
            self.runs
                .iter()
                .find(|r| r.scenario == *scenario && r.kind == kind)
                .and_then(|r| r.outcome.as_ref().ok().map(|o| (o, r.cpu_us_per_txn)))
        };
        let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
            _ => "–".to_owned(),
        };
        let mut lines = Vec::new();
        for row in self.runs.iter().filter(|r| r.kind == Kind::SplitEventual) {
            let Some((_, eventual_cpu)) = find(&row.scenario, Kind::SplitEventual) else {
                continue;
            };
            let eventual = find(&row.scenario, Kind::SplitEventual).map(|(o, _)| o.p99_ms);
            let plain_cpu = find(&row.scenario, Kind::Pgrelay).and_then(|(_, cpu)| cpu);
            let session = find(&row.scenario, Kind::SplitSession);
            let session_cpu = session.and_then(|(_, cpu)| cpu);
            let session_p99 = session.map(|(o, _)| o.p99_ms);
            lines.push(format!(
                "| {} | {} | {} | {} | {} |",
                row.scenario.label(),
                row.scenario.clients,
                ratio(eventual_cpu, plain_cpu),
                ratio(session_cpu, eventual_cpu),
                ratio(session_p99, eventual),
            ));
        }
        if lines.is_empty() {
            return;
        }
        md.push_str("\n## Read/write splitting (same run)\n\n");
        md.push_str("Targets (docs/performance.md): each ratio ≤ 1.10.\n\n");
        md.push_str(
            "| scenario | clients | CPU/txn split eventual ÷ pgrelay | CPU/txn session ÷ eventual | p99 session ÷ eventual |\n",
        );
        md.push_str("|---|---:|---:|---:|---:|\n");
        for line in lines {
            md.push_str(&line);
            md.push('\n');
        }
    }

    /// pgrelay ÷ PgBouncer per scenario, when both ran cleanly.
    fn ratios(&self, md: &mut String) {
        let find = |scenario: &Scenario, kind: Kind| {
            self.runs
                .iter()
                .find(|r| r.scenario == *scenario && r.kind == kind)
                .and_then(|r| r.outcome.as_ref().ok().map(|o| (o, r.cpu_us_per_txn)))
        };
        let mut lines = Vec::new();
        for row in self.runs.iter().filter(|r| r.kind == Kind::Pgrelay) {
            let (Some((relay, relay_cpu)), Some((bouncer, bouncer_cpu))) =
                (find(&row.scenario, Kind::Pgrelay), find(&row.scenario, Kind::PgBouncer))
            else {
                continue;
            };
            let tps = if bouncer.tps > 0.0 {
                format!("{:.2}", relay.tps / bouncer.tps)
            } else {
                "–".to_owned()
            };
            let cpu = match (relay_cpu, bouncer_cpu) {
                (Some(r), Some(b)) if b > 0.0 => format!("{:.2}", r / b),
                _ => "–".to_owned(),
            };
            lines.push(format!(
                "| {} | {} | {tps} | {cpu} |",
                row.scenario.label(),
                row.scenario.clients
            ));
        }
        if lines.is_empty() {
            return;
        }
        md.push_str("\n## pgrelay relative to PgBouncer (same run)\n\n");
        md.push_str("Targets (docs/performance.md): TPS ratio ≥ 1.00, CPU ratio ≤ 0.80.\n\n");
        md.push_str("| scenario | clients | TPS pgrelay ÷ PgBouncer | CPU/txn pgrelay ÷ PgBouncer |\n");
        md.push_str("|---|---:|---:|---:|\n");
        for line in lines {
            md.push_str(&line);
            md.push('\n');
        }
    }

    fn idle_table(&self, md: &mut String) {
        if self.idle.is_empty() {
            return;
        }
        md.push_str("\n## Memory per idle client\n\n");
        md.push_str(
            "Each client logs in (md5), runs `SELECT 1`, then stays idle. Target (docs/performance.md): ≤ 1 KiB per idle client.\n\n",
        );
        md.push_str("| target | idle clients | logins took | logins/s | RSS before | RSS with clients | KiB per idle client | RSS after close | failed logins |\n");
        md.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|\n");
        let mib = |kib: u64| format!("{:.1} MiB", kib as f64 / 1024.0);
        for row in &self.idle {
            let name = match row.round {
                Some(round) => format!("{} (round {round})", row.kind.name()),
                None => row.kind.name().to_owned(),
            };
            match &row.outcome {
                Ok(o) => {
                    let secs = o.login_time.as_secs_f64();
                    let rate = if secs > 0.0 { o.opened as f64 / secs } else { 0.0 };
                    let _ = writeln!(
                        md,
                        "| {name} | {} | {secs:.2} s | {rate:.0} | {} | {} | **{:.2}** | {} | {} |",
                        o.opened,
                        mib(o.rss_before_kib),
                        mib(o.rss_with_clients_kib),
                        o.kib_per_client(),
                        mib(o.rss_after_kib),
                        o.failed
                    );
                }
                Err(_) => {
                    let _ = writeln!(md, "| {name} | {} | error, see notes | | | | | | |", row.requested);
                }
            }
        }
    }

    /// Every error, with where it happened.
    fn errors(&self) -> Vec<String> {
        let mut errors = Vec::new();
        for row in &self.runs {
            let at = format!("{} ({})", row.kind.name(), row.scenario);
            match &row.outcome {
                Err(e) => errors.push(format!("{at}: {e}")),
                Ok(o) if !o.errors.is_empty() => errors.push(format!("{at}: {}", o.errors.join("; "))),
                Ok(_) => {}
            }
        }
        for row in &self.idle {
            match &row.outcome {
                Err(e) => errors.push(format!("{} idle clients: {e}", row.kind.name())),
                Ok(IdleOutcome {
                    first_error: Some(e),
                    failed,
                    ..
                }) => errors.push(format!(
                    "{} idle clients: {failed} logins failed, the first with: {e}",
                    row.kind.name()
                )),
                Ok(_) => {}
            }
        }
        errors
    }
}
