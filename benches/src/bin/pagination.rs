//! benches/run pagination: a page of 20 rows at depth 10, 10k and 900k of a 1M-row table, four ways:
//! OFFSET, a hand-written seek query (row-value comparison) with json_agg, the same with jsonb_agg
//! (keyset_page returns jsonb, which costs a parse on the way in and a print on the way out that a json
//! result does not), and tenant_scale.keyset_page.
//!
//! One client, pgbench -M prepared, interleaved rounds, a fixed number of pages (transactions) per run.
//! Each run yields pages per second and pages per second of server CPU (see `pgbench_cpu`); a ratio
//! above 1 means faster. The targets are judged on CPU, which other work on these shared machines
//! barely moves. Targets (issue 5): keyset_page at least 100x faster than OFFSET at depth 900k, and at
//! least 1/1.5 of the hand-written seek's speed at every depth.
//!
//! Usage: benches/run pagination [ROUNDS] [RUN_SCALE]   (default 5 rounds; RUN_SCALE multiplies the
//! pages of every run, default 1)

use anyhow::{Context, Result, bail};
use tenant_scale_benches::{compare_with_cpu, machine_header, pgbench_cpu};
use tenant_scale_harness::Cluster;

const ROWS: i64 = 1_000_000;
const PAGE: i64 = 20;
const DEPTHS: [i64; 3] = [10, 10_000, 900_000];
/// Page size used to walk to a depth (keyset_page cursors cannot be made, only followed).
const WALK_PAGE: i64 = 10_000;
const ORDER: &str = "created_at, id";
/// Pages per run: OFFSET reads every skipped row, so it runs fewer at depth.
const OFFSET_PAGES: [u32; 3] = [3_000, 300, 10];
const SEEK_PAGES: u32 = 3_000;

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let rounds: usize = args.next().map(|arg| arg.parse()).transpose().context("ROUNDS")?.unwrap_or(5);
    let scale: u32 = args.next().map(|arg| arg.parse()).transpose().context("RUN_SCALE")?.unwrap_or(1);

    print!("{}", machine_header()?);
    println!(
        "workload: {ROWS} rows, page of {PAGE}, ORDER BY {ORDER} (btree index on it), 1 client, {rounds} rounds"
    );

    let cluster =
        Cluster::builder().setting("shared_buffers", "512MB").setting("autovacuum", "off").start()?;
    let mut client = cluster.connect()?;
    // Three rows per timestamp, so that the tie-breaker matters.
    client.batch_execute(&format!(
        "CREATE TABLE items (id bigint PRIMARY KEY, company_id int NOT NULL, created_at timestamptz NOT NULL,
                             title text NOT NULL, amount numeric(12, 2) NOT NULL);
         INSERT INTO items
         SELECT g, g % 1000 + 1, timestamptz '2024-01-01' + (g / 3) * interval '1 second', 'item ' || md5(g::text),
                (g % 100000) / 100.0
         FROM generate_series(1, {ROWS}) g;
         CREATE INDEX items_created_at_id ON items (created_at, id);
         INSERT INTO tenant_scale.page_limits VALUES ('items', {WALK_PAGE});"
    ))?;
    // Alone: VACUUM cannot run in the implicit transaction of a multi-statement batch.
    client.batch_execute("VACUUM ANALYZE items")?;

    for (depth, offset_pages) in DEPTHS.into_iter().zip(OFFSET_PAGES) {
        let key = client.query_one(
            &format!("SELECT created_at::text, id FROM items ORDER BY {ORDER} OFFSET $1::bigint - 1 LIMIT 1"),
            &[&depth],
        )?;
        let (created_at, id): (String, i64) = (key.get(0), key.get(1));
        let cursor = cursor_at_depth(&mut client, depth)?;

        let offset = format!(
            "SELECT json_agg(t) FROM (SELECT * FROM items ORDER BY {ORDER} OFFSET {depth} LIMIT {PAGE}) t;\n"
        );
        let seek = format!(
            "SELECT json_agg(t) FROM (SELECT * FROM items WHERE (created_at, id) > ('{created_at}'::timestamptz, {id}) \
             ORDER BY {ORDER} LIMIT {PAGE}) t;\n"
        );
        let seek_jsonb = seek.replacen("json_agg", "jsonb_agg", 1);
        let keyset =
            format!("SELECT tenant_scale.keyset_page('items', '{{created_at}}', {PAGE}, '{cursor}');\n");
        check_same_rows(&mut client, &seek, &keyset)?;

        let scripts = [offset, seek, seek_jsonb, keyset];
        let [by_time, by_cpu] = compare_with_cpu(
            &format!("depth {depth}"),
            &["OFFSET", "hand-written seek (json_agg)", "hand-written seek (jsonb_agg)", "keyset_page"],
            "pages/s",
            rounds,
            |index| {
                let pages = if index == 0 { offset_pages } else { SEEK_PAGES };
                pgbench_cpu(&cluster, &scripts[index], 1, pages * scale)
            },
        )?;
        print!("{}{}", by_time.report(), by_cpu.report());
        // Ratios of rates: keyset_page/OFFSET is its speed-up; seek/keyset_page is the time (CPU) it
        // takes relative to the seek.
        println!(
            "depth {depth}: per server CPU second (by pages/s in parentheses), keyset_page is {:.1}x as fast as OFFSET ({:.1}x){}; \
             takes {:.2}x the CPU of the hand-written seek with json_agg ({:.2}x; target <= 1.5x), {:.2}x with jsonb_agg ({:.2}x)",
            by_cpu.median_ratio_to(3, 0),
            by_time.median_ratio_to(3, 0),
            if depth == 900_000 { " (target >= 100x)" } else { "" },
            by_cpu.median_ratio_to(1, 3),
            by_time.median_ratio_to(1, 3),
            by_cpu.median_ratio_to(2, 3),
            by_time.median_ratio_to(2, 3),
        );
    }
    Ok(())
}

/// The next_cursor after the first `depth` rows, by walking pages (the last one exactly to `depth`).
fn cursor_at_depth(client: &mut postgres::Client, depth: i64) -> Result<String> {
    let mut cursor: Option<String> = None;
    let mut walked = 0;
    while walked < depth {
        let size = (depth - walked).min(WALK_PAGE) as i32;
        let row = client.query_one(
            "SELECT p->>'next_cursor' FROM tenant_scale.keyset_page('items', '{created_at}', $1, $2) p",
            &[&size, &cursor],
        )?;
        cursor = Some(row.get::<_, Option<String>>(0).context("the listing ended before the depth")?);
        walked += i64::from(size);
    }
    cursor.context("depth must be positive")
}

/// Both queries must return the same rows, or the comparison would mean nothing.
fn check_same_rows(client: &mut postgres::Client, seek: &str, keyset: &str) -> Result<()> {
    let statement = |script: &str| script.trim_end_matches([';', '\n']).to_string();
    let mut ids = |rows: String| -> Result<String> {
        Ok(client.query_one(&format!("SELECT string_agg(r->>'id', ',') FROM {rows} r"), &[])?.get(0))
    };
    let seek_ids = ids(format!("json_array_elements(({}))", statement(seek)))?;
    let keyset_ids = ids(format!("jsonb_array_elements(({})->'data')", statement(keyset)))?;
    if seek_ids != keyset_ids {
        bail!("keyset_page returned {keyset_ids}, the hand-written seek {seek_ids}");
    }
    Ok(())
}
