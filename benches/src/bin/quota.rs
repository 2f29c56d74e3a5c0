//! Cost of per-plan row quotas on inserts, against a plain table and the two usual hand-made
//! alternatives, measured side by side in interleaved rounds on one cluster:
//! - plain: no quota;
//! - tenant_scale: enforce_quota (limits set high enough never to refuse);
//! - count trigger: a plpgsql BEFORE INSERT trigger comparing COUNT(*) of the company with the limit
//!   (not exact under concurrency);
//! - counter row: a plpgsql BEFORE INSERT trigger doing `UPDATE usage SET used = used + 1 WHERE
//!   company = ... AND used < max` (exact, but holds the company's row lock until commit).
//!
//! Workloads: spread (4 clients, random company of 100), hot (8 clients, one company), bulk (one
//! INSERT ... SELECT of 1,000,000 rows, rolled back; the two triggers only at 20,000 rows, see below),
//! and growth (the hot workload on a company holding 1,000,000 rows instead of 10,000, to show that the
//! cost per insert does not grow with the rows already stored).
//!
//! Every run is a fixed number of transactions and yields two figures: the rate (tps, rows/s) and the
//! rate per second of server CPU (see `pgbench_cpu`). The machines these run on are shared, and the
//! rate of a run swings by a third with what else is running where CPU per transaction does not: the
//! targets are judged on CPU, and both are printed. The hand-made triggers run fewer transactions (they
//! are 2 to 100 times slower), which changes neither figure, both being per transaction.
//!
//! Usage: benches/run quota [RUN_SCALE] [ROUNDS]: RUN_SCALE multiplies the transactions of every run
//! (default 1), ROUNDS defaults to 5.

use std::time::Instant;

use anyhow::{Context, Result};
use tenant_scale_benches::{BACKEND_CPU_NS, Comparison, compare_with_cpu, machine_header, pgbench_cpu};
use tenant_scale_harness::Cluster;

const COMPANIES: i64 = 100;
const ROWS_PER_COMPANY: i64 = 10_000;
const BULK_ROWS: i64 = 1_000_000;
const SMALL_BULK_ROWS: i64 = 20_000;
const HIGH_LIMIT: i64 = 1_000_000_000;

struct Variant {
    name: &'static str,
    table: &'static str,
}

const VARIANTS: [Variant; 4] = [
    Variant { name: "plain", table: "t_plain" },
    Variant { name: "tenant_scale", table: "t_tenant_scale" },
    Variant { name: "count trigger", table: "t_count" },
    Variant { name: "counter row", table: "t_counter" },
];

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let scale: u32 = args.next().map(|value| value.parse()).transpose().context("RUN_SCALE")?.unwrap_or(1);
    let rounds: usize = args.next().map(|value| value.parse()).transpose().context("ROUNDS")?.unwrap_or(5);

    let cluster = Cluster::builder()
        .setting("shared_buffers", "512MB")
        .setting("max_wal_size", "4GB")
        .setting("checkpoint_timeout", "30min")
        .setting("autovacuum", "off")
        .start()?;
    print!("{}", machine_header()?);
    println!("cluster: fsync off, shared_buffers 512MB, autovacuum off; {rounds} interleaved rounds\n");
    let mut client = cluster.connect()?;
    let load_started = Instant::now();
    for variant in &VARIANTS {
        create_table(&mut client, variant.table, ROWS_PER_COMPANY)?;
    }
    install_alternatives(&mut client)?;
    println!(
        "loaded {COMPANIES} companies x {ROWS_PER_COMPANY} rows into each of 4 tables in {:.0?}",
        load_started.elapsed()
    );

    let spread = |table: &str| {
        format!("\\set c random(1, {COMPANIES})\nINSERT INTO {table} (company, payload) VALUES (:c, 'x');\n")
    };
    let hot = |table: &str| format!("INSERT INTO {table} (company, payload) VALUES (1, 'x');\n");
    let bulk = |table: &str, rows: i64| {
        format!(
            "BEGIN;\nINSERT INTO {table} (company, payload) \
             SELECT 1 + i % {COMPANIES}, 'x' FROM generate_series(1, {rows}) AS i;\nROLLBACK;\n"
        )
    };
    let names: Vec<&str> = VARIANTS.iter().map(|variant| variant.name).collect();

    let one_backend = insert_cost(&mut client, &names, rounds * 2, scale)?;
    print!("{}", one_backend.report());

    // Autovacuum is off for steadier figures, so what a run leaves dead (the counter rows' old
    // versions, the rolled-back bulk rows) is vacuumed before the next one, untimed.
    let mut measure = |table: &str, script: String, clients: u32, transactions: u32| {
        // Apart: a batch of several statements is one transaction, where VACUUM cannot run.
        client.batch_execute(&format!("VACUUM {table}"))?;
        client.batch_execute("VACUUM usage")?;
        pgbench_cpu(&cluster, &script, clients, transactions * scale)
    };
    // Transactions per client, per variant: each run takes a few seconds.
    let spread_runs =
        compare_with_cpu("spread (4 clients, random company)", &names, "tps", rounds, |index| {
            let table = VARIANTS[index].table;
            measure(table, spread(table), 4, [25_000, 25_000, 2_000, 15_000][index])
        })?;
    let hot_runs = compare_with_cpu("hot (8 clients, one company)", &names, "tps", rounds, |index| {
        let table = VARIANTS[index].table;
        measure(table, hot(table), 8, [12_000, 12_000, 300, 8_000][index])
    })?;
    let bulk_runs = compare_with_cpu(
        "bulk (INSERT ... SELECT of 1,000,000 rows)",
        &names[..2],
        "rows/s",
        rounds,
        |index| {
            let table = VARIANTS[index].table;
            let (rate, rate_per_cpu) = measure(table, bulk(table, BULK_ROWS), 1, 1)?;
            Ok((rate * BULK_ROWS as f64, rate_per_cpu * BULK_ROWS as f64))
        },
    )?;
    // Neither trigger finishes a million rows in reasonable time: the COUNT(*) trigger reads the
    // company's 10,000+ index entries per row, and the counter-row trigger updates the same 100 rows
    // a million times in one transaction, each update walking a longer chain of row versions.
    let small_bulk_runs =
        compare_with_cpu("bulk (INSERT ... SELECT of 20,000 rows)", &names, "rows/s", rounds, |index| {
            let table = VARIANTS[index].table;
            let (rate, rate_per_cpu) =
                measure(table, bulk(table, SMALL_BULK_ROWS), 1, [60, 60, 1, 1][index])?;
            Ok((rate * SMALL_BULK_ROWS as f64, rate_per_cpu * SMALL_BULK_ROWS as f64))
        })?;
    for comparison in spread_runs.iter().chain(&hot_runs).chain(&bulk_runs).chain(&small_bulk_runs) {
        print!("{}", comparison.report());
    }

    // Growth: company 1 of these tables holds 1,000,000 rows.
    create_table(&mut client, "t_big_plain", 0)?;
    create_table(&mut client, "t_big_tenant_scale", 0)?;
    for table in ["t_big_plain", "t_big_tenant_scale"] {
        client.batch_execute(&format!(
            "INSERT INTO {table} (company, payload) SELECT 1, 'x' FROM generate_series(1, 1000000)"
        ))?;
        client.batch_execute(&format!("VACUUM ANALYZE {table}"))?;
    }
    client.batch_execute(
        "SELECT tenant_scale.enforce_quota('t_big_tenant_scale', 't_big_tenant_scale', 'company')",
    )?;
    let growth_tables = ["t_plain", "t_tenant_scale", "t_big_plain", "t_big_tenant_scale"];
    let growth_names = ["plain 10k", "tenant_scale 10k", "plain 1M", "tenant_scale 1M"];
    let [growth_by_time, growth_by_cpu] = compare_with_cpu(
        "growth (hot, company holding 10k vs 1M rows)",
        &growth_names,
        "tps",
        rounds,
        |index| pgbench_cpu(&cluster, &hot(growth_tables[index]), 8, 12_000 * scale),
    )?;
    print!("{}{}", growth_by_time.report(), growth_by_cpu.report());
    let with_10k = growth_by_cpu.median_ratio(1);
    let with_1m = growth_by_cpu.median_ratio_to(3, 2);
    println!(
        "growth: per server CPU second, tenant_scale/plain is {with_10k:.3}x with 10k rows stored and \
         {with_1m:.3}x with 1M: {:+.1}% cost per insert",
        (with_10k / with_1m - 1.0) * 100.0
    );

    println!(
        "\nsummary, median ratio to plain per server CPU second (by tps in parentheses); targets: \
         tenant_scale >= 0.90x everywhere, growth within 10%:"
    );
    let ratios = |[by_time, by_cpu]: &[Comparison; 2], index: usize| {
        format!("{:.3}x ({:.3}x)", by_cpu.median_ratio(index), by_time.median_ratio(index))
    };
    for (index, variant) in VARIANTS.iter().enumerate().skip(1) {
        println!("  one backend, {}: {:.3}x", variant.name, one_backend.median_ratio(index));
    }
    for (label, comparisons, index) in [
        ("spread", &spread_runs, 1),
        ("hot", &hot_runs, 1),
        ("bulk", &bulk_runs, 1),
        ("bulk 20k", &small_bulk_runs, 1),
        ("spread count trigger", &spread_runs, 2),
        ("hot count trigger", &hot_runs, 2),
        ("bulk 20k count trigger", &small_bulk_runs, 2),
        ("spread counter row", &spread_runs, 3),
        ("hot counter row", &hot_runs, 3),
        ("bulk 20k counter row", &small_bulk_runs, 3),
    ] {
        println!("  {label}: {}", ratios(comparisons, index));
    }
    Ok(())
}

/// Server CPU per single-row insert transaction in one backend, without pgbench, connections or the
/// network: a procedure inserts rows one transaction each (COMMIT after every row) and reads the
/// backend's own CPU clock before and after. The steadiest figure of the runner; reported as
/// transactions per CPU second so that, as everywhere else, a ratio below 1 is a cost.
fn insert_cost(
    client: &mut postgres::Client,
    names: &[&str],
    rounds: usize,
    scale: u32,
) -> Result<Comparison> {
    for variant in &VARIANTS {
        client.batch_execute(&format!(
            "CREATE PROCEDURE insert_one_by_one_{table}(inserts int, INOUT per_cpu_second float8 DEFAULT NULL)
             LANGUAGE plpgsql AS $$
             DECLARE cpu_ns_before bigint := {BACKEND_CPU_NS};
             BEGIN
                 FOR i IN 1..inserts LOOP
                     INSERT INTO {table} (company, payload) VALUES (1 + i * 7919 % {COMPANIES}, 'x');
                     COMMIT;
                 END LOOP;
                 per_cpu_second := inserts * 1e9 / ({BACKEND_CPU_NS} - cpu_ns_before);
             END $$",
            table = variant.table
        ))?;
    }
    let mut comparison = Comparison::new(
        "one backend, single-row insert transactions (procedure, COMMIT per row)",
        names,
        "per backend CPU second",
    );
    comparison.run(rounds, |index| {
        let table = VARIANTS[index].table;
        client.batch_execute(&format!("VACUUM {table}"))?;
        client.batch_execute("VACUUM usage")?;
        let inserts = [20_000, 20_000, 1_000, 20_000][index] * scale;
        // The simple protocol: a procedure that commits must be called outside any transaction block.
        let messages = client.simple_query(&format!("CALL insert_one_by_one_{table}({inserts})"))?;
        let rate = messages.iter().find_map(|message| match message {
            postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_string),
            _ => None,
        });
        let rate = rate.context("CALL returned no row")?;
        rate.parse::<f64>().with_context(|| format!("not a number: {rate}"))
    })?;
    Ok(comparison)
}

/// A table of the benchmark's shape holding `rows_per_company` rows for each company.
fn create_table(client: &mut postgres::Client, table: &str, rows_per_company: i64) -> Result<()> {
    client
        .batch_execute(&format!(
            "CREATE TABLE {table} (id bigserial PRIMARY KEY, company integer NOT NULL, payload text NOT NULL);
             INSERT INTO {table} (company, payload)
                 SELECT 1 + i % {COMPANIES}, 'x' FROM generate_series(1, {rows_per_company} * {COMPANIES}) AS i;
             CREATE INDEX ON {table} (company);"
        ))
        .with_context(|| format!("loading {table}"))?;
    client.batch_execute(&format!("VACUUM ANALYZE {table}")).with_context(|| format!("vacuuming {table}"))
}

fn install_alternatives(client: &mut postgres::Client) -> Result<()> {
    client
        .batch_execute(&format!(
            "SELECT tenant_scale.set_plan_limit(plan, resource, {HIGH_LIMIT})
               FROM tenant_scale.plans, unnest(ARRAY['t_tenant_scale', 't_big_tenant_scale']) AS resource;
             SELECT tenant_scale.enforce_quota('t_tenant_scale', 't_tenant_scale', 'company');

             CREATE FUNCTION count_quota() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 IF (SELECT count(*) FROM t_count WHERE company = NEW.company) >= {HIGH_LIMIT} THEN
                     RAISE EXCEPTION 'quota exceeded' USING ERRCODE = 'configuration_limit_exceeded';
                 END IF;
                 RETURN NEW;
             END $$;
             CREATE TRIGGER count_quota BEFORE INSERT ON t_count FOR EACH ROW EXECUTE FUNCTION count_quota();

             CREATE TABLE usage (company integer PRIMARY KEY, used bigint NOT NULL, max_rows bigint NOT NULL);
             INSERT INTO usage SELECT company, count(*), {HIGH_LIMIT} FROM t_counter GROUP BY company;
             CREATE FUNCTION counter_quota() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 UPDATE usage SET used = used + 1 WHERE company = NEW.company AND used < max_rows;
                 IF NOT FOUND THEN
                     RAISE EXCEPTION 'quota exceeded' USING ERRCODE = 'configuration_limit_exceeded';
                 END IF;
                 RETURN NEW;
             END $$;
             CREATE TRIGGER counter_quota BEFORE INSERT ON t_counter FOR EACH ROW EXECUTE FUNCTION counter_quota();"
        ))
        .context("installing the quota variants")
}
