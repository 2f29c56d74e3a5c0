//! Per-company statistics on real clusters: exact counts, percentiles against measured durations,
//! eviction at capacity, persistence across a clean restart (and not a crash), the snapshot worker,
//! the non-preloaded behaviour, and the monitoring queries shipped in monitoring/.

use std::time::{Duration, Instant};

use postgres::Client;
use tenant_scale_harness::{Cluster, StopMode};
use tenant_scale_integration::eventually;

/// The bound stated in src/stats/histogram.rs and the README.
const RELATIVE_ERROR_BOUND: f64 = 1.0 / 32.0;

fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let done = eventually(timeout, || done().then_some(()));
    assert!(done.is_some(), "timed out after {timeout:?} waiting for {what}");
}

/// (calls, errors, rows) of one company in the `postgres` database.
fn counts(client: &mut Client, company: &str) -> (i64, i64, i64) {
    let row = client
        .query_one(
            "SELECT calls, errors, rows FROM tenant_scale.company_stats \
             WHERE company_id = $1 AND database = 'postgres'",
            &[&company],
        )
        .unwrap_or_else(|error| panic!("no statistics for {company}: {error}"));
    (row.get(0), row.get(1), row.get(2))
}

#[test]
fn statements_of_several_companies_give_exact_calls_rows_and_errors() {
    let cluster = Cluster::builder().start().unwrap();
    let mut app = cluster.connect().unwrap();
    let unattributed_before: i64 =
        app.query_one("SELECT unattributed_calls FROM tenant_scale.stats_info()", &[]).unwrap().get(0);

    // alpha: 7 statements (the extended protocol) returning 1..=7 rows, and 2 that fail.
    app.batch_execute("SET tenant_scale.company = 'alpha'; CREATE TABLE items(id int PRIMARY KEY)").unwrap();
    for rows in 1..=7 {
        app.query("SELECT generate_series(1, $1)", &[&rows]).unwrap();
    }
    assert!(app.execute("SELECT 1 / 0", &[]).is_err());
    app.execute("INSERT INTO items VALUES (1)", &[]).unwrap();
    let duplicate = app.execute("INSERT INTO items VALUES (1)", &[]).unwrap_err();
    let duplicate = duplicate.as_db_error().expect("a database error");
    assert_eq!(
        duplicate.constraint(),
        Some("items_pkey"),
        "an error passing through the hooks keeps every field PostgreSQL gave it"
    );
    // beta for one transaction (SET LOCAL): 3 statements. Then set_config(.., true): the statement that
    // calls it started as alpha's; the next one is beta's.
    let mut transaction = app.transaction().unwrap();
    transaction.batch_execute("SET LOCAL tenant_scale.company = 'beta'").unwrap();
    for _ in 0..3 {
        transaction.query("SELECT 1", &[]).unwrap();
    }
    transaction.commit().unwrap();
    let mut transaction = app.transaction().unwrap();
    transaction.query("SELECT set_config('tenant_scale.company', 'beta', true)", &[]).unwrap();
    transaction.query("SELECT 2, 3 UNION ALL SELECT 4, 5", &[]).unwrap();
    transaction.commit().unwrap();
    // Back to alpha outside those transactions: one more statement. Then gamma fails inside a
    // savepoint that is rolled back, and its transaction goes on.
    app.query("SELECT 1", &[]).unwrap();
    app.batch_execute("SET tenant_scale.company = 'gamma'; BEGIN; SAVEPOINT s; SELECT 1/0;").unwrap_err();
    app.batch_execute("ROLLBACK TO s; SELECT 1; SELECT 2; COMMIT").unwrap();
    app.batch_execute("RESET tenant_scale.company").unwrap();
    for _ in 0..4 {
        app.query("SELECT 1", &[]).unwrap();
    }

    // alpha: 7 + the insert + set_config's statement + the one after; rows 28 + 1 + 1 + 1; errors: the
    // division and the duplicate key.
    assert_eq!(counts(&mut app, "alpha"), (10, 2, 31));
    // beta: 3 + the union; rows 3 + 2.
    assert_eq!(counts(&mut app, "beta"), (4, 0, 5));
    assert_eq!(counts(&mut app, "gamma"), (2, 1, 2), "the statements after ROLLBACK TO are top-level again");
    let unattributed_after: i64 =
        app.query_one("SELECT unattributed_calls FROM tenant_scale.stats_info()", &[]).unwrap().get(0);
    // The four SELECT 1, the three counts() queries and the query that read the first figure (each is
    // counted when it ends, after it read).
    assert_eq!(unattributed_after - unattributed_before, 4 + 3 + 1);
}

/// The nearest-rank quantile of a sorted sample.
fn quantile(sorted: &[f64], fraction: f64) -> f64 {
    let rank = ((fraction * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

#[test]
fn percentiles_of_known_sleeps_fall_within_the_stated_bound() {
    let cluster = Cluster::builder().start().unwrap();
    let mut app = cluster.connect().unwrap();
    app.batch_execute("SET tenant_scale.company = 'sleepy'").unwrap();
    // Each statement's executor time lies between the sleep asked for and the round trip the client
    // measured; so does each quantile of them, which the histogram must then report within the bound.
    let plan: Vec<f64> = [(40, 0.002), (15, 0.010), (5, 0.040)]
        .iter()
        .flat_map(|(count, seconds)| std::iter::repeat_n(*seconds, *count))
        .collect();
    let statement = app.prepare("SELECT pg_sleep($1)").unwrap();
    let (mut lower_ms, mut upper_ms) = (Vec::new(), Vec::new());
    for seconds in &plan {
        let started = Instant::now();
        app.query(&statement, &[seconds]).unwrap();
        upper_ms.push(started.elapsed().as_secs_f64() * 1000.0);
        lower_ms.push(seconds * 1000.0);
    }
    app.batch_execute("RESET tenant_scale.company").unwrap();
    lower_ms.sort_by(f64::total_cmp);
    upper_ms.sort_by(f64::total_cmp);
    let row = app
        .query_one(
            "SELECT p50_ms, p95_ms, p99_ms FROM tenant_scale.company_stats WHERE company_id = 'sleepy'",
            &[],
        )
        .unwrap();
    for (column, fraction) in [(0, 0.50), (1, 0.95), (2, 0.99)] {
        let reported: f64 = row.get(column);
        let low = quantile(&lower_ms, fraction) * (1.0 - RELATIVE_ERROR_BOUND);
        // +1 µs: the histogram works on durations rounded to the microsecond.
        let high = (quantile(&upper_ms, fraction) + 0.001) * (1.0 + RELATIVE_ERROR_BOUND);
        assert!(
            (low..=high).contains(&reported),
            "p{} = {reported} ms, outside [{low}, {high}]",
            fraction * 100.0
        );
    }
}

#[test]
fn a_cursor_is_timed_while_it_executes_not_while_the_client_waits_between_fetches() {
    let cluster = Cluster::builder().setting("tenant_scale.track", "all").start().unwrap();
    let mut app = cluster.connect().unwrap();
    // Two fetches of one row each, each row sleeping 20 ms, and 400 ms of client think time between
    // them: the cursor's query executed for about 40 ms of the 400+ it was open.
    app.batch_execute(
        "SET tenant_scale.company = 'reader'; BEGIN; \
         DECLARE slow CURSOR FOR SELECT pg_sleep(0.02) FROM generate_series(1, 2); FETCH 1 FROM slow",
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(400));
    app.batch_execute("FETCH 1 FROM slow; CLOSE slow; COMMIT; RESET tenant_scale.company").unwrap();
    // track = all also counts the statements nested in the FETCHes; the cursor's query is the
    // company's slowest.
    let max_ms: f64 = app
        .query_one("SELECT max_ms FROM tenant_scale.company_stats WHERE company_id = 'reader'", &[])
        .unwrap()
        .get(0);
    assert!((40.0 * (1.0 - RELATIVE_ERROR_BOUND)..200.0).contains(&max_ms), "max_ms = {max_ms}");
}

#[test]
fn twenty_thousand_companies_with_room_for_a_thousand_evict_without_growing() {
    let cluster = Cluster::builder().setting("tenant_scale.max_companies", 1000).start().unwrap();
    let mut app = cluster.connect().unwrap();
    let memory_query = "SELECT shared_memory_bytes, \
                        (SELECT sum(total_bytes) FROM pg_backend_memory_contexts)::bigint \
                        FROM tenant_scale.stats_info()";
    let mut backend_memory = Vec::new();
    let mut shared_memory = Vec::new();
    for batch in 0..20 {
        let statements: String = (0..1000)
            .map(|company| format!("SET tenant_scale.company = 'company-{batch}-{company}'; SELECT 1;"))
            .collect();
        app.batch_execute(&statements).unwrap();
        app.batch_execute("RESET tenant_scale.company").unwrap();
        let row = app.query_one(memory_query, &[]).unwrap();
        shared_memory.push(row.get::<_, i64>(0));
        backend_memory.push(row.get::<_, i64>(1));
    }
    let info =
        app.query_one("SELECT max_companies, tracked, evicted FROM tenant_scale.stats_info()", &[]).unwrap();
    let (max, tracked, evicted): (i64, i64, i64) = (info.get(0), info.get(1), info.get(2));
    assert_eq!(max, 1000);
    assert!(tracked <= 1000 && tracked > 900, "tracked {tracked}");
    assert_eq!(tracked + evicted, 20_000, "every company is either tracked or counted as evicted");
    assert!(shared_memory.windows(2).all(|pair| pair[0] == pair[1]), "shared memory is sized once");
    // After the first batch warmed the backend up, its memory does not grow with more companies.
    let growth = backend_memory.last().unwrap() - backend_memory[1];
    assert!(growth < 256 * 1024, "backend memory grew by {growth} bytes: {backend_memory:?}");
    assert_eq!(
        app.query_one("SELECT count(*) FROM tenant_scale.company_stats", &[]).unwrap().get::<_, i64>(0),
        tracked
    );
    let health = cluster
        .psql("SELECT ok, detail FROM tenant_scale.health() WHERE \"check\" = 'stats memory'")
        .unwrap();
    assert!(health.starts_with("f|") && health.ends_with("raise tenant_scale.max_companies"), "{health}");
}

#[test]
fn a_company_evicted_by_another_backend_is_counted_again_from_scratch() {
    // Once another backend's arrivals evicted a company's entry, its memory may hold another company:
    // the company's next calls, moved there by its own backend as it turns to another company, must
    // go to a new entry, not add to that one.
    let cluster = Cluster::builder().setting("tenant_scale.max_companies", 100).start().unwrap();
    let mut steady = cluster.connect().unwrap();
    let steady_then_elsewhere =
        "SET tenant_scale.company = 'steady'; SELECT 1; SET tenant_scale.company = 'elsewhere'; SELECT 1;";
    for _ in 0..3 {
        steady.batch_execute(steady_then_elsewhere).unwrap();
    }
    let mut admin = cluster.connect().unwrap();
    assert_eq!(counts(&mut admin, "steady").0, 3);

    let mut flood = cluster.connect().unwrap();
    let statements: String =
        (0..2000).map(|company| format!("SET tenant_scale.company = 'flood-{company}'; SELECT 1;")).collect();
    flood.batch_execute(&statements).unwrap();
    let tracked = |admin: &mut Client, company: &str| -> bool {
        admin
            .query_one("SELECT count(*) FROM tenant_scale.company_stats WHERE company_id = $1", &[&company])
            .unwrap()
            .get::<_, i64>(0)
            == 1
    };
    assert!(!tracked(&mut admin, "steady"), "2,000 arrivals with room for 100 evict an idle company");

    steady.batch_execute(steady_then_elsewhere).unwrap();
    assert_eq!(counts(&mut admin, "steady").0, 1, "counted from scratch in a new entry");
    let most_calls_of_another: i64 = admin
        .query_one(
            "SELECT max(calls) FROM tenant_scale.company_stats \
             WHERE company_id NOT IN ('steady', 'elsewhere')",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(most_calls_of_another, 1, "every flood company ran one statement, and nobody else's");
}

#[test]
fn calls_an_idle_backend_still_holds_are_read_reset_snapshotted_and_saved() {
    // Each backend keeps its latest calls in its own slot until it turns to another company or
    // minute; every reader must see them, a reset must zero them, and a clean shutdown must keep them.
    let mut cluster = Cluster::builder().start().unwrap();
    let mut workers: Vec<Client> = (0..4).map(|_| cluster.connect().unwrap()).collect();
    std::thread::scope(|scope| {
        for worker in &mut workers {
            scope.spawn(|| {
                worker.batch_execute("SET tenant_scale.company = 'busy'").unwrap();
                for _ in 0..100 {
                    worker.query("SELECT 1", &[]).unwrap();
                }
            });
        }
    });
    let mut admin = cluster.connect().unwrap();
    assert_eq!(counts(&mut admin, "busy"), (400, 0, 400), "every backend's calls, while they sit idle");
    let tracked: i64 = admin.query_one("SELECT tracked FROM tenant_scale.stats_info()", &[]).unwrap().get(0);
    assert_eq!(tracked, 1);

    workers[0].query("SELECT 1", &[]).unwrap();
    let snapshot: i64 = admin
        .query_one("SELECT calls FROM tenant_scale.snapshot_stats() WHERE company_id = 'busy'", &[])
        .unwrap()
        .get(0);
    assert_eq!(snapshot, 401, "the snapshot covers calls still held by a backend");

    workers[1].query("SELECT 1", &[]).unwrap();
    admin.execute("SELECT tenant_scale.stats_reset('busy')", &[]).unwrap();
    workers[2].query("SELECT 1", &[]).unwrap();
    assert_eq!(counts(&mut admin, "busy").0, 1, "a reset zeroes calls a backend still held");

    for worker in &mut workers {
        worker.query("SELECT 1", &[]).unwrap();
    }
    drop(admin);
    cluster.restart(StopMode::Fast).unwrap();
    let calls =
        cluster.psql("SELECT calls FROM tenant_scale.company_stats WHERE company_id = 'busy'").unwrap();
    assert_eq!(calls, "5", "a clean shutdown saves the calls backends still held");
}

#[test]
fn clean_restart_keeps_the_stats_and_a_crash_starts_empty() {
    let mut cluster = Cluster::builder().start().unwrap();
    let figures = "SELECT calls, errors, rows, total_ms, p95_ms, first_seen::text, stats_since::text \
                   FROM tenant_scale.company_stats WHERE company_id = 'durable'";
    let read = |cluster: &Cluster| cluster.psql(figures).unwrap();
    cluster
        .psql("SET tenant_scale.company = 'durable'; SELECT generate_series(1, 3); SELECT pg_sleep(0.01);")
        .unwrap();
    let _ = cluster.psql("SET tenant_scale.company = 'durable'; SELECT 1/0");
    let before = read(&cluster);
    assert!(before.starts_with("2|1|4|"), "{before}");
    // A snapshot before the restart: the next one must cover only what happens after it.
    cluster.psql("SELECT count(*) FROM tenant_scale.snapshot_stats()").unwrap();

    cluster.restart(StopMode::Fast).unwrap();
    assert_eq!(read(&cluster), before, "a clean restart keeps every figure");
    cluster.psql("SET tenant_scale.company = 'durable'; SELECT 1").unwrap();
    assert_eq!(
        cluster.psql("SELECT calls FROM tenant_scale.snapshot_stats() WHERE company_id = 'durable'").unwrap(),
        "1",
        "snapshot baselines survive the restart too"
    );

    cluster.crash().unwrap();
    cluster.start().unwrap();
    assert_eq!(read(&cluster), "", "after a crash nothing stale is loaded");
    assert_eq!(cluster.psql("SELECT tracked FROM tenant_scale.stats_info()").unwrap(), "0");
}

#[test]
fn snapshot_worker_writes_history_on_its_interval_and_survives_sighup() {
    let cluster = Cluster::builder().setting("tenant_scale.snapshot_interval", "1s").start().unwrap();
    let worker_pid = || {
        cluster
            .psql("SELECT pid FROM pg_stat_activity WHERE backend_type = 'tenant_scale stats snapshots'")
            .unwrap()
    };
    let pid = worker_pid();
    assert!(!pid.is_empty(), "the snapshot worker runs");
    let history_calls = || {
        cluster
            .psql("SELECT coalesce(sum(calls), 0) FROM tenant_scale.stats_history WHERE company_id = 'historic'")
            .unwrap()
    };
    cluster.psql("SET tenant_scale.company = 'historic'; SELECT 1; SELECT 2; SELECT 3;").unwrap();
    wait_for("the worker's first snapshot", Duration::from_secs(15), || history_calls() == "3");

    // Snapshots off, through a configuration reload (SIGHUP): the same worker stays, and writes nothing.
    cluster.psql("ALTER SYSTEM SET tenant_scale.snapshot_interval = 0").unwrap();
    cluster.psql("SELECT pg_reload_conf()").unwrap();
    wait_for("the reload", Duration::from_secs(10), || {
        cluster.psql("SELECT setting FROM pg_settings WHERE name = 'tenant_scale.snapshot_interval'").unwrap()
            == "0"
    });
    std::thread::sleep(Duration::from_millis(1500)); // the worker sees the signal at its next wake-up
    cluster.psql("SET tenant_scale.company = 'historic'; SELECT 4;").unwrap();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(history_calls(), "3", "no snapshot while the interval is 0");
    assert_eq!(worker_pid(), pid, "SIGHUP does not restart the worker");

    cluster.psql("ALTER SYSTEM SET tenant_scale.snapshot_interval = 1").unwrap();
    cluster.psql("SELECT pg_reload_conf()").unwrap();
    wait_for("a snapshot after turning them back on", Duration::from_secs(15), || history_calls() == "4");
    assert_eq!(worker_pid(), pid);
}

#[test]
fn calls_moved_between_slots_and_entries_under_concurrent_reads_are_never_lost_or_counted_twice() {
    // Four backends turn from company to company (each turn moves their batch to an entry) while a
    // reader moves every batch again and again: the total it reads never goes down, and ends exact.
    let cluster = Cluster::builder().start().unwrap();
    let mut workers: Vec<Client> = (0..4).map(|_| cluster.connect().unwrap()).collect();
    let mut reader = cluster.connect().unwrap();
    let total_calls = |reader: &mut Client| -> i64 {
        reader
            .query_one(
                "SELECT coalesce(sum(calls), 0)::bigint FROM tenant_scale.company_stats \
                 WHERE company_id LIKE 'turn-%'",
                &[],
            )
            .unwrap()
            .get(0)
    };
    let finished = std::sync::atomic::AtomicUsize::new(0);
    let readings = std::thread::scope(|scope| {
        for (worker_index, worker) in workers.iter_mut().enumerate() {
            let finished = &finished;
            scope.spawn(move || {
                for statement in 0..200 {
                    let company = (worker_index + statement) % 5;
                    worker
                        .batch_execute(&format!("SET tenant_scale.company = 'turn-{company}'; SELECT 1"))
                        .unwrap();
                }
                worker.batch_execute("RESET tenant_scale.company").unwrap();
                finished.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            });
        }
        let mut readings = Vec::new();
        // Bounded: a worker that panics never finishes (the scope then reports its panic).
        let deadline = Instant::now() + Duration::from_secs(60);
        while finished.load(std::sync::atomic::Ordering::SeqCst) < 4 && Instant::now() < deadline {
            readings.push(total_calls(&mut reader));
        }
        readings
    });
    assert!(readings.windows(2).all(|pair| pair[0] <= pair[1]), "the total went down: {readings:?}");
    assert_eq!(total_calls(&mut reader), 800, "every call counted once ({} readings)", readings.len());
}

#[test]
fn statements_of_a_background_worker_are_counted_though_it_has_no_slot() {
    // Only client backends count in a slot of their own; a background worker updates the table
    // directly. The snapshot worker's own statements are attributed here by the configuration file.
    let cluster = Cluster::builder()
        .setting("tenant_scale.snapshot_interval", "1s")
        .setting("tenant_scale.company", "configured")
        .start()
        .unwrap();
    let calls = || -> i64 {
        cluster
            .psql(
                "SET tenant_scale.company = ''; \
                 SELECT coalesce(sum(calls), 0) FROM tenant_scale.company_stats WHERE company_id = 'configured'",
            )
            .unwrap()
            .parse()
            .unwrap()
    };
    let before = calls();
    // Each snapshot runs two statements: whether the extension exists, and snapshot_stats().
    wait_for("two snapshots counted", Duration::from_secs(15), || calls() >= before + 4);
}

#[test]
fn without_preload_stats_raise_55000_with_a_hint_and_nothing_else_breaks() {
    let cluster = Cluster::builder().without_preload().start().unwrap();
    let mut app = cluster.connect().unwrap();
    app.batch_execute("SET tenant_scale.company = 'acme'").unwrap();
    for query in [
        "SELECT * FROM tenant_scale.company_stats",
        "SELECT * FROM tenant_scale.problem_companies",
        "SELECT * FROM tenant_scale.stats_info()",
        "SELECT tenant_scale.stats_reset()",
        "SELECT * FROM tenant_scale.snapshot_stats()",
    ] {
        let error = app.query(query, &[]).unwrap_err();
        let error = error.as_db_error().unwrap_or_else(|| panic!("{query}: {error}"));
        assert_eq!(error.code().code(), "55000", "{query}");
        assert!(error.hint().is_some_and(|hint| hint.contains("shared_preload_libraries")), "{query}");
    }
    // The session goes on, statements run and fail as usual, and the history views read (empty) history.
    assert!(app.execute("SELECT 1/0", &[]).is_err());
    assert_eq!(
        app.query_one("SELECT count(*) FROM tenant_scale.stats_daily", &[]).unwrap().get::<_, i64>(0),
        0
    );
    assert_eq!(
        app.query_one("SELECT tenant_scale.version()", &[]).unwrap().get::<_, String>(0),
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(app.query_one("SHOW tenant_scale.company", &[]).unwrap().get::<_, String>(0), "acme");
    let health = app
        .query_one("SELECT ok, detail FROM tenant_scale.health() WHERE \"check\" = 'stats memory'", &[])
        .unwrap();
    assert!(!health.get::<_, bool>(0));
    assert!(health.get::<_, String>(1).contains("not in shared_preload_libraries"));
}

#[test]
fn every_query_in_the_postgres_exporter_file_runs_as_a_monitoring_role() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../monitoring/postgres_exporter.yml");
    let text = std::fs::read_to_string(path).unwrap();
    let documents = yaml_rust2::YamlLoader::load_from_str(&text).unwrap();
    let queries = documents[0].as_hash().expect("a map of metric namespaces");
    assert!(!queries.is_empty());

    let cluster = Cluster::builder().start().unwrap();
    cluster.psql("CREATE ROLE exporter LOGIN IN ROLE pg_monitor").unwrap();
    cluster.psql("SET tenant_scale.company = 'acme'; SELECT 1/0").unwrap_err();
    cluster
        .psql("SET tenant_scale.company = 'acme'; SELECT count(*) FROM tenant_scale.snapshot_stats()")
        .unwrap();
    let mut exporter = postgres::Client::connect(
        &cluster.connstr().replace("user=postgres", "user=exporter"),
        postgres::NoTls,
    )
    .unwrap();
    for (namespace, spec) in queries {
        let namespace = namespace.as_str().unwrap();
        let query = spec["query"].as_str().unwrap_or_else(|| panic!("{namespace}: no query"));
        let columns: Vec<String> = spec["metrics"]
            .as_vec()
            .unwrap_or_else(|| panic!("{namespace}: no metrics"))
            .iter()
            .flat_map(|metric| metric.as_hash().unwrap().keys().map(|key| key.as_str().unwrap().to_string()))
            .collect();
        let statement = exporter.prepare(query).unwrap_or_else(|error| panic!("{namespace}: {error}"));
        let returned: Vec<&str> = statement.columns().iter().map(|column| column.name()).collect();
        assert_eq!(returned, columns, "{namespace}: the metrics name the query's columns in order");
        exporter.query(&statement, &[]).unwrap_or_else(|error| panic!("{namespace}: {error}"));
    }
}
