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
//! INSERT ... SELECT of 1,000,000 rows, rolled back after timing; the two triggers only at 20,000
//! rows, see below), and growth (the hot workload on a company holding 1,000,000 rows instead of
//! 10,000, to show the cost per insert does not grow with the rows already stored).
//!
//! Usage: benches/run quota [SECONDS_PER_RUN] [ROUNDS]   (defaults 10 and 3)

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tenant_scale_benches::{Comparison, machine_header, pgbench};
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
    let seconds: u64 = args.next().map(|value| value.parse()).transpose()?.unwrap_or(10);
    let rounds: usize = args.next().map(|value| value.parse()).transpose()?.unwrap_or(3);
    let duration = Duration::from_secs(seconds);

    let cluster = Cluster::builder()
        .setting("shared_buffers", "512MB")
        .setting("max_wal_size", "4GB")
        .setting("checkpoint_timeout", "30min")
        .setting("autovacuum", "off")
        .start()?;
    print!("{}", machine_header()?);
    println!("cluster: fsync off, shared_buffers 512MB; {seconds} s per pgbench run, {rounds} rounds\n");
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
    let names: Vec<&str> = VARIANTS.iter().map(|variant| variant.name).collect();

    // The counter rows are updated tens of thousands of times per run; vacuumed (untimed) before each
    // run so that every round measures the same thing, as autovacuum is off for steadier figures.
    let measure =
        |client: &mut postgres::Client, index: usize, script: String, clients: u32| -> Result<f64> {
            if VARIANTS[index].table == "t_counter" {
                client.batch_execute("VACUUM usage")?;
            }
            pgbench(&cluster, &script, clients, duration)
        };
    let mut spread_run = Comparison::new("spread (4 clients, random company)", &names, "tps");
    spread_run.run(rounds, |index| measure(&mut client, index, spread(VARIANTS[index].table), 4))?;
    print!("{}", spread_run.report());

    let mut hot_run = Comparison::new("hot (8 clients, one company)", &names, "tps");
    hot_run.run(rounds, |index| measure(&mut client, index, hot(VARIANTS[index].table), 8))?;
    print!("{}", hot_run.report());

    let mut bulk_run = Comparison::new("bulk (INSERT ... SELECT of 1,000,000 rows)", &names[..2], "rows/s");
    bulk_run.run(rounds, |index| bulk_insert(&mut client, VARIANTS[index].table, BULK_ROWS))?;
    print!("{}", bulk_run.report());
    // Neither trigger finishes a million rows in reasonable time: the COUNT(*) trigger reads the
    // company's 10,000+ index entries per row, and the counter-row trigger updates the same 100 rows
    // a million times in one transaction, each update walking a longer chain of row versions.
    let mut small_bulk_run = Comparison::new("bulk (INSERT ... SELECT of 20,000 rows)", &names, "rows/s");
    small_bulk_run.run(rounds, |index| bulk_insert(&mut client, VARIANTS[index].table, SMALL_BULK_ROWS))?;
    print!("{}", small_bulk_run.report());

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
    let mut growth_run =
        Comparison::new("growth (hot, company holding 10k vs 1M rows)", &growth_names, "tps");
    growth_run.run(rounds, |index| pgbench(&cluster, &hot(growth_tables[index]), 8, duration))?;
    print!("{}", growth_run.report());
    let with_10k = growth_run.median_ratio(1);
    let with_1m = growth_run.median_ratio(3) / growth_run.median_ratio(2);
    println!(
        "growth: tenant_scale/plain is {with_10k:.3}x with 10k rows stored and {with_1m:.3}x with 1M: \
         {:+.1}% per insert",
        (with_10k / with_1m - 1.0) * 100.0
    );

    println!(
        "\nsummary (median ratio to plain; targets: tenant_scale >= 0.90x everywhere, growth within 10%):"
    );
    for (label, comparison, index) in [
        ("spread", &spread_run, 1),
        ("hot", &hot_run, 1),
        ("bulk", &bulk_run, 1),
        ("bulk 20k", &small_bulk_run, 1),
        ("spread count trigger", &spread_run, 2),
        ("hot count trigger", &hot_run, 2),
        ("bulk 20k count trigger", &small_bulk_run, 2),
        ("spread counter row", &spread_run, 3),
        ("hot counter row", &hot_run, 3),
        ("bulk 20k counter row", &small_bulk_run, 3),
    ] {
        println!("  {label}: {:.3}x", comparison.median_ratio(index));
    }
    Ok(())
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

/// Rows per second of one INSERT ... SELECT of `rows` rows, rolled back so that every round starts
/// from the same table (the dead rows are vacuumed away, untimed).
fn bulk_insert(client: &mut postgres::Client, table: &str, rows: i64) -> Result<f64> {
    client.batch_execute("BEGIN")?;
    let started = Instant::now();
    client.batch_execute(&format!(
        "INSERT INTO {table} (company, payload) SELECT 1 + i % {COMPANIES}, 'x' FROM generate_series(1, {rows}) AS i"
    ))?;
    let elapsed = started.elapsed();
    client.batch_execute("ROLLBACK")?;
    client.batch_execute(&format!("VACUUM {table}"))?;
    Ok(rows as f64 / elapsed.as_secs_f64())
}
