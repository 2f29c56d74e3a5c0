//! benches/run stats [RUN_SCALE] [ROUNDS] [INTERLEAVED_ROUNDS]: the cost of per-company statistics on
//! the statement path. About 8 minutes on 2 cores with the defaults.
//!
//! Five clusters side by side: vanilla PostgreSQL; a second vanilla cluster, identical to the first
//! (an A/A check: how far two identical clusters land apart in one run is how fine the other ratios
//! can be read); pg_stat_statements preloaded; tenant_scale preloaded, every connection attributed
//! to a company (one of 100 tracked ones, a different one each round); both preloaded. Workloads:
//! pgbench -S (one indexed SELECT), a small read/write script (UPDATE + SELECT), both with 2 clients,
//! and -S with 8 clients all on one company (every statement updates the same entry). Targets
//! (issue 4): tenant_scale >= 0.97x vanilla on -S, and not below pg_stat_statements' ratio in the
//! same run.
//!
//! Each workload is measured twice:
//! - interleaved (the figures the targets are judged on): the workload's statements, prepared, over
//!   connections held open to all five clusters, each client sending its transactions to the five
//!   in turn (see `Interleaved`); INTERLEAVED_ROUNDS rounds (default 120) of 1,000 transactions per
//!   client and cluster (250 for the heavier workloads), compared as server CPU per transaction.
//!   With 40 rounds, one run's median ratio of unchanged code moved by about 2 % from run to run,
//!   as wide as the margin the targets are read with; three times the rounds narrow that by √3;
//! - pgbench, for tps: ROUNDS rounds (default 7) of one pgbench run per cluster, a fixed number of
//!   transactions per client times RUN_SCALE (default 2), each yielding tps and transactions per
//!   second of server CPU (see `pgbench_cpu`). Runs seconds apart see the machine's load change, so
//!   these ratios move by 5 % and more from one run to the next.
//!
//! The last block times a PL/pgSQL loop of SELECTs by the backend's own clock, every one counted.
//!
//! With `BASELINE_LIBRARY=/path/to/tenant_scale.so` (another build of the library, made with
//! `cargo pgrx package` in a checkout of an earlier commit, readable by the `postgres` user), the
//! fifth cluster preloads that build instead of both extensions, and each interleaved workload also
//! prints tenant_scale's ratio to it: a change measured against the code before it in one run.

use std::process::Command;

use anyhow::{Context, Result, bail};
use tenant_scale_benches::{
    BACKEND_CPU_NS, Comparison, Interleaved, compare_with_cpu, machine_header, pgbench_cpu,
};
use tenant_scale_harness::{Cluster, ClusterBuilder, pg_bindir};

const SCALE: u32 = 5;
const COMPANIES: u32 = 100;
const PG_STAT_STATEMENTS: usize = 2;
/// The first variant whose connections are attributed to a company; every later one is too.
const TENANT_SCALE: usize = 3;
const BOTH_OR_BASELINE: usize = 4;

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let scale_runs: u32 = args.next().map(|arg| arg.parse()).transpose().context("RUN_SCALE")?.unwrap_or(2);
    let rounds: usize = args.next().map(|arg| arg.parse()).transpose().context("ROUNDS")?.unwrap_or(7);
    let interleaved_rounds: usize =
        args.next().map(|arg| arg.parse()).transpose().context("INTERLEAVED_ROUNDS")?.unwrap_or(120);

    let baseline = std::env::var("BASELINE_LIBRARY").ok();
    let fifth = if baseline.is_some() { "tenant_scale, baseline build" } else { "both" };
    let variants = ["vanilla", "vanilla, second cluster", "pg_stat_statements", "tenant_scale", fifth];

    print!("{}", machine_header()?);
    if let Some(library) = &baseline {
        println!("baseline build: {library}");
    }
    println!(
        "pgbench scale {SCALE}, prepared statements, autovacuum off; {interleaved_rounds} interleaved rounds, \
         then {rounds} rounds of pgbench runs"
    );

    let with_quiet_autovacuum = |builder: ClusterBuilder| builder.setting("autovacuum", "off").start();
    let clusters = [
        with_quiet_autovacuum(Cluster::builder().without_preload().without_extension())?,
        with_quiet_autovacuum(Cluster::builder().without_preload().without_extension())?,
        with_quiet_autovacuum(
            Cluster::builder()
                .without_preload()
                .without_extension()
                .setting("shared_preload_libraries", "pg_stat_statements"),
        )?,
        with_quiet_autovacuum(Cluster::builder())?,
        with_quiet_autovacuum(match &baseline {
            // Without the extension's SQL objects: nothing then loads the library under test there.
            Some(library) => {
                Cluster::builder().without_extension().setting("shared_preload_libraries", library)
            }
            None => Cluster::builder().setting("shared_preload_libraries", "pg_stat_statements,tenant_scale"),
        })?,
    ];
    for cluster in &clusters {
        init_pgbench(cluster)?;
    }
    for cluster in &clusters[TENANT_SCALE..] {
        // 100 companies in the table, so lookups go through a populated hash table.
        let warm_up: String = (0..COMPANIES)
            .map(|company| format!("SET tenant_scale.company = 'company_{company}'; SELECT 1;"))
            .collect();
        cluster.psql(&warm_up)?;
    }
    let tracked = clusters[TENANT_SCALE].psql("SELECT tracked FROM tenant_scale.stats_info()")?;
    println!("companies tracked before measuring: {tracked}");
    interleaved(&clusters, &variants, baseline.is_some(), interleaved_rounds)?;

    let select_only =
        "\\set aid random(1, 100000 * 5)\nSELECT abalance FROM pgbench_accounts WHERE aid = :aid;\n";
    let read_write = "\\set aid random(1, 100000 * 5)\n\\set delta random(-5000, 5000)\n\
                      UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid;\n\
                      SELECT abalance FROM pgbench_accounts WHERE aid = :aid;\n";
    // (name, script, clients, transactions per client, one company per round or always the same)
    let workloads = [
        ("select-only (-S), 2 clients, 100 companies", select_only, 2, 20_000, true),
        ("read/write, 2 clients, 100 companies", read_write, 2, 5_000, true),
        ("select-only (-S), 8 clients, one company", select_only, 8, 5_000, false),
    ];
    for (name, script, clients, transactions, rotate_companies) in workloads {
        let mut measured = 0;
        let comparisons = compare_with_cpu(name, &variants, "tps", rounds, |variant| {
            let round = measured / variants.len();
            measured += 1;
            if variant >= TENANT_SCALE {
                let company = if rotate_companies { round as u32 % COMPANIES } else { 0 };
                // New connections pick the role's setting up, as a pooled connection checked out for
                // one company would have it set.
                clusters[variant]
                    .psql(&format!("ALTER ROLE postgres SET tenant_scale.company = 'company_{company}'"))?;
            }
            pgbench_cpu(&clusters[variant], script, clients, transactions * scale_runs)
        })?;
        for comparison in comparisons {
            print!("{}", comparison.report());
        }
    }
    statement_cost(&clusters, rounds * 2)?;
    let calls = clusters[TENANT_SCALE].psql("SELECT sum(calls) FROM tenant_scale.company_stats")?;
    println!("statements counted by tenant_scale in its cluster: {calls}");
    Ok(())
}

/// The pgbench workloads' statements over connections held open, the clusters taking turns
/// transaction by transaction ([`Interleaved`]): the figures the targets are judged on.
/// With `against_baseline`, the fifth cluster runs a baseline build of tenant_scale.
fn interleaved(
    clusters: &[Cluster; 5],
    variants: &[&str; 5],
    against_baseline: bool,
    rounds: usize,
) -> Result<()> {
    const SELECT: &str = "SELECT abalance FROM pgbench_accounts WHERE aid = $1";
    const UPDATE: &str = "UPDATE pgbench_accounts SET abalance = abalance + $2 WHERE aid = $1";
    // Rows spread over the table, different for every client and round (clients updating the same
    // row would wait on each other).
    let account = |round: usize, client: usize, i: u32| -> i32 {
        let spread = round as u64 * 1_000_003 + client as u64 * 250_007 + u64::from(i) * 7_919;
        (spread % (100_000 * u64::from(SCALE))) as i32 + 1
    };
    // (name, statements, clients, transactions per client and cluster in a round, one company per
    // round or always the same)
    let workloads: [(&str, &[&str], usize, u32, bool); 3] = [
        ("select-only (-S), 2 clients, 100 companies, interleaved", &[SELECT], 2, 1_000, true),
        ("read/write, 2 clients, 100 companies, interleaved", &[UPDATE, SELECT], 2, 250, true),
        ("select-only (-S), 8 clients, one company, interleaved", &[SELECT], 8, 250, false),
    ];
    for (name, statements, clients, transactions, rotate_companies) in workloads {
        let mut sessions = Interleaved::open(&clusters.each_ref(), clients, statements)?;
        let mut comparison = Comparison::new(name, variants, "per server CPU second");
        for round in 0..rounds {
            let company = if rotate_companies { round as u32 % COMPANIES } else { 0 };
            for variant in TENANT_SCALE..variants.len() {
                sessions
                    .batch_execute(variant, &format!("SET tenant_scale.company = 'company_{company}'"))?;
            }
            let ns_per_transaction =
                sessions.cpu_ns_per_transaction(transactions, |session, client, i| {
                    let aid = account(round, client, i);
                    match session.statements.as_slice() {
                        [select] => session.client.query(select, &[&aid]).map(drop),
                        [update, select] => {
                            let delta = (i % 10_001) as i32 - 5_000;
                            session.client.execute(update, &[&aid, &delta])?;
                            session.client.query(select, &[&aid]).map(drop)
                        }
                        _ => unreachable!("one or two statements per workload"),
                    }
                })?;
            comparison.record_round(&ns_per_transaction.iter().map(|ns| 1e9 / ns).collect::<Vec<_>>());
        }
        print!("{}", comparison.report());
        println!(
            "{name}: median ratio tenant_scale / pg_stat_statements {:.3}x",
            comparison.median_ratio_to(TENANT_SCALE, PG_STAT_STATEMENTS)
        );
        if against_baseline {
            println!(
                "{name}: median ratio tenant_scale / {} {:.3}x",
                variants[BOTH_OR_BASELINE],
                comparison.median_ratio_to(TENANT_SCALE, BOTH_OR_BASELINE)
            );
        }
    }
    Ok(())
}

/// The hooks' cost per statement, in one backend, without pgbench and its connections: a PL/pgSQL
/// loop of indexed SELECTs, each one counted (track = all). The backend's own CPU time
/// (/proc/self/schedstat, in ns) is read before and after, so time the machine spent on other
/// processes is not counted.
fn statement_cost(clusters: &[Cluster; 5], rounds: usize) -> Result<()> {
    const STATEMENTS: u32 = 20_000;
    let loop_function = format!(
        "CREATE OR REPLACE FUNCTION bench_loop() RETURNS float8 LANGUAGE plpgsql AS $$ \
         DECLARE cpu_ns_before bigint; balance int; \
         BEGIN \
           cpu_ns_before := {BACKEND_CPU_NS}; \
           FOR i IN 1..{STATEMENTS} LOOP \
             SELECT abalance INTO balance FROM pgbench_accounts WHERE aid = (i * 7919) % 500000 + 1; \
           END LOOP; \
           RETURN ({BACKEND_CPU_NS} - cpu_ns_before) \
                  / 1000.0 / {STATEMENTS}; \
         END $$"
    );
    let (vanilla, pg_stat_statements, tenant_scale) =
        (&clusters[0], &clusters[PG_STAT_STATEMENTS], &clusters[TENANT_SCALE]);
    for cluster in [vanilla, pg_stat_statements, tenant_scale] {
        cluster.psql(&loop_function)?;
    }
    let variants = [
        (vanilla, ""),
        (pg_stat_statements, "SET pg_stat_statements.track = 'all';"),
        (tenant_scale, "SET tenant_scale.track = 'all'; SET tenant_scale.company = 'company_0';"),
        (tenant_scale, "SET tenant_scale.track = 'none'; SET tenant_scale.company = 'company_0';"),
    ];
    let mut comparison = Comparison::new(
        &format!("backend CPU per statement, {STATEMENTS} SELECTs in a PL/pgSQL loop"),
        &[
            "vanilla",
            "pg_stat_statements (track all)",
            "tenant_scale (track all)",
            "tenant_scale (track none)",
        ],
        "µs CPU",
    );
    comparison.run(rounds, |variant| {
        let (cluster, settings) = variants[variant];
        let micros = cluster.psql(&format!("{settings} SELECT bench_loop()"))?;
        micros.trim().parse::<f64>().with_context(|| format!("not a number: {micros}"))
    })?;
    print!("{}", comparison.report());
    Ok(())
}

fn init_pgbench(cluster: &Cluster) -> Result<()> {
    let output = Command::new(pg_bindir()?.join("pgbench"))
        .args(["-i", "-q", "-s", &SCALE.to_string(), "-h", "127.0.0.1", "-U", "postgres"])
        .arg("-p")
        .arg(cluster.port().to_string())
        .arg("postgres")
        .output()
        .context("running pgbench -i")?;
    if !output.status.success() {
        bail!("pgbench -i failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    Ok(())
}
