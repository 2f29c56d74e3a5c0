//! Row quotas on real clusters: concurrent races at the limit, every path a row can take in a seeded
//! random mix, a kill -9 in the middle of it, more (table, company) pairs than counters, least
//! privilege, configuration changes seen by other sessions, pg_dump, and the mode without shared
//! memory.

use std::sync::{Arc, Barrier, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use fastrand::Rng;
use postgres::error::SqlState;
use postgres::{Client, NoTls};
use tenant_scale_harness::{Cluster, pg_bindir};

const COMPANIES: [&str; 4] = ["acme", "globex", "initech", "umbrella"];

fn create_quota_table(client: &mut Client, table: &str, company_type: &str) {
    client
        .batch_execute(&format!(
            "CREATE TABLE {table} (id bigint PRIMARY KEY, company {company_type}, note text);
             CREATE INDEX ON {table} (company);
             SELECT tenant_scale.enforce_quota('{table}', '{table}', 'company');"
        ))
        .unwrap();
}

fn is_refusal(error: &postgres::Error) -> bool {
    error.code() == Some(&SqlState::CONFIGURATION_LIMIT_EXCEEDED)
}

/// (company, counter, COUNT(*)) for every company of the mix table.
fn counters_and_counts(client: &mut Client, table: &str) -> Vec<(String, i64, i64)> {
    client
        .query(
            &format!(
                "SELECT c, (SELECT used FROM tenant_scale.quota_status(c) WHERE resource = '{table}'),
                        (SELECT count(*) FROM {table} t WHERE t.company = c)
                 FROM unnest($1::text[]) AS c ORDER BY c"
            ),
            &[&COMPANIES.to_vec()],
        )
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect()
}

fn race_at_limit(cluster: &Cluster) {
    const LIMIT: i64 = 5_000;
    const CONNECTIONS: usize = 16;
    const ATTEMPTS_PER_CONNECTION: usize = 700;
    let mut admin = cluster.connect().unwrap();
    admin
        .batch_execute(&format!(
            "CREATE TABLE race (id bigserial PRIMARY KEY, company integer NOT NULL);
             CREATE INDEX ON race (company);
             SELECT tenant_scale.set_plan_limit('free', 'race', {LIMIT});
             SELECT tenant_scale.enforce_quota('race', 'race', 'company');"
        ))
        .unwrap();
    let start = Arc::new(Barrier::new(CONNECTIONS));
    let workers: Vec<_> = (0..CONNECTIONS)
        .map(|_| {
            let start = start.clone();
            let mut client = cluster.connect().unwrap();
            thread::spawn(move || {
                let insert = client.prepare("INSERT INTO race (company) VALUES (7)").unwrap();
                start.wait();
                let (mut stored, mut refused) = (0i64, 0i64);
                for _ in 0..ATTEMPTS_PER_CONNECTION {
                    match client.execute(&insert, &[]) {
                        Ok(_) => stored += 1,
                        Err(error) if is_refusal(&error) => refused += 1,
                        Err(error) => panic!("unexpected error: {error:?}"),
                    }
                }
                (stored, refused)
            })
        })
        .collect();
    let (stored, refused) = workers
        .into_iter()
        .map(|worker| worker.join().unwrap())
        .fold((0, 0), |(a, b), (c, d)| (a + c, b + d));
    let attempts = (CONNECTIONS * ATTEMPTS_PER_CONNECTION) as i64;
    assert_eq!(stored, LIMIT, "inserts that succeeded");
    assert_eq!(refused, attempts - LIMIT, "every other insert got SQLSTATE 53400");
    let count: i64 = admin.query_one("SELECT count(*) FROM race", &[]).unwrap().get(0);
    assert_eq!(count, LIMIT, "rows stored");
    let used: i64 = admin.query_one("SELECT used FROM tenant_scale.quota_status('7')", &[]).unwrap().get(0);
    assert_eq!(used, LIMIT, "counter");
}

#[test]
fn race_at_limit_never_overshoots() {
    race_at_limit(&Cluster::builder().start().unwrap());
}

#[test]
fn race_at_limit_never_overshoots_without_shared_memory() {
    race_at_limit(&Cluster::builder().without_preload().start().unwrap());
}

/// One random transaction of the mix: several operations, each in a savepoint so that an expected
/// refusal (53400) or duplicate key (23505) undoes only that operation; then COMMIT or ROLLBACK.
/// Returns how many operations the quota refused, or None when the connection is gone (the crash test
/// kills the server).
fn random_transaction(client: &mut Client, rng: &mut Rng, ids: &mut IdPool, table: &str) -> Option<usize> {
    let company = |rng: &mut Rng| COMPANIES[rng.usize(0..COMPANIES.len())];
    let mut statements = vec!["BEGIN".to_string()];
    for _ in 0..rng.usize(1..=4) {
        let c = company(rng);
        let other = company(rng);
        let statement = match rng.u32(0..12) {
            0 => format!("INSERT INTO {table} (id, company) VALUES ({}, '{c}')", ids.fresh()),
            1 => {
                let rows: Vec<String> =
                    (0..rng.usize(2..=5)).map(|_| format!("({}, '{c}')", ids.fresh())).collect();
                format!("INSERT INTO {table} (id, company) VALUES {}", rows.join(", "))
            }
            2 => {
                let first = ids.fresh_range(rng.i64(2..=6));
                format!(
                    "INSERT INTO {table} (id, company) SELECT i, '{c}' FROM generate_series({}, {}) AS i",
                    first.0, first.1
                )
            }
            3 => format!(
                "DELETE FROM {table} WHERE id IN (SELECT id FROM {table} WHERE company = '{c}' ORDER BY random() LIMIT {})",
                rng.usize(1..=3)
            ),
            4 => format!(
                "UPDATE {table} SET company = '{other}' WHERE id IN (SELECT id FROM {table} WHERE company = '{c}' LIMIT {})",
                rng.usize(1..=2)
            ),
            5 => format!("UPDATE {table} SET note = 'touched' WHERE company = '{c}'"),
            6 => format!(
                "INSERT INTO {table} (id, company) VALUES ({}, '{c}'), ({}, '{c}') ON CONFLICT (id) DO NOTHING",
                ids.existing(rng),
                ids.fresh()
            ),
            7 => format!(
                "INSERT INTO {table} (id, company) VALUES ({}, '{other}'), ({}, '{c}') \
                 ON CONFLICT (id) DO UPDATE SET company = EXCLUDED.company",
                ids.existing(rng),
                ids.fresh()
            ),
            8 => format!(
                "INSERT INTO {table} (id, company) VALUES ({}, '{c}'), ({}, '{c}')",
                ids.fresh(),
                ids.existing(rng)
            ),
            9 => format!("INSERT INTO {table} (id, company) VALUES ({}, NULL)", ids.fresh()),
            10 if rng.f64() < 0.1 => format!("TRUNCATE {table}"),
            _ => "COPY".to_string(),
        };
        statements.push(statement);
    }
    let finish = if rng.f64() < 0.2 { "ROLLBACK" } else { "COMMIT" };
    let mut refusals = 0;
    for statement in &statements {
        let result = if statement == "BEGIN" {
            client.batch_execute("BEGIN")
        } else {
            client
                .batch_execute("SAVEPOINT op")
                .and_then(|_| run_operation(client, statement, rng, ids, table))
        };
        match result {
            Ok(()) => {}
            // Refusals, duplicate keys (the mix reuses ids on purpose) and, between concurrent
            // workers, deadlocks are expected outcomes of an operation.
            Err(error)
                if is_refusal(&error)
                    || error.code() == Some(&SqlState::UNIQUE_VIOLATION)
                    || error.code() == Some(&SqlState::T_R_DEADLOCK_DETECTED) =>
            {
                refusals += usize::from(is_refusal(&error));
                client.batch_execute("ROLLBACK TO SAVEPOINT op").ok()?;
            }
            Err(error) if connection_lost(&error) => return None,
            Err(error) => panic!("{statement}: {error:?}"),
        }
    }
    client.batch_execute(finish).ok().map(|_| refusals)
}

/// The error a client sees when the server under it was killed or restarted.
fn connection_lost(error: &postgres::Error) -> bool {
    error.is_closed()
        || error.code().is_none()
        || [SqlState::ADMIN_SHUTDOWN, SqlState::CRASH_SHUTDOWN, SqlState::CANNOT_CONNECT_NOW]
            .iter()
            .any(|state| error.code() == Some(state))
}

fn run_operation(
    client: &mut Client,
    statement: &str,
    rng: &mut Rng,
    ids: &mut IdPool,
    table: &str,
) -> Result<(), postgres::Error> {
    if statement != "COPY" {
        return client.batch_execute(statement);
    }
    use std::io::Write;
    let company = COMPANIES[rng.usize(0..COMPANIES.len())];
    let mut writer = client.copy_in(&format!("COPY {table} (id, company) FROM STDIN"))?;
    for _ in 0..rng.usize(1..=4) {
        writeln!(writer, "{}\t{company}", ids.fresh()).expect("writing COPY data");
    }
    writer.finish().map(|_| ())
}

/// Row ids for one worker: fresh ones never used, and existing ones for conflicts.
struct IdPool {
    next: i64,
    used: Vec<i64>,
}

impl IdPool {
    fn new(worker: i64) -> IdPool {
        IdPool { next: worker * 100_000_000, used: Vec::new() }
    }

    fn fresh(&mut self) -> i64 {
        self.next += 1;
        self.used.push(self.next);
        self.next
    }

    fn fresh_range(&mut self, rows: i64) -> (i64, i64) {
        let first = self.next + 1;
        for _ in 0..rows {
            self.fresh();
        }
        (first, self.next)
    }

    fn existing(&self, rng: &mut Rng) -> i64 {
        if self.used.is_empty() {
            1
        } else {
            self.used[rng.usize(self.used.len().saturating_sub(40)..self.used.len())]
        }
    }
}

fn configure_mix(client: &mut Client, table: &str) {
    client
        .batch_execute(&format!(
            "SELECT tenant_scale.set_plan_limit('free', '{table}', 12);
             SELECT tenant_scale.set_plan_limit('basic', '{table}', 20);
             SELECT tenant_scale.set_company_plan('acme', 'basic');
             SELECT tenant_scale.set_company_plan('initech', 'enterprise');
             SELECT tenant_scale.set_plan_limit('enterprise', '{table}', 30);"
        ))
        .unwrap();
    create_quota_table(client, table, "text");
}

fn limit_of(company: &str) -> i64 {
    match company {
        "acme" => 20,
        "initech" => 30,
        _ => 12,
    }
}

#[test]
fn random_mix_of_every_path_keeps_counters_equal_to_count() {
    const SEED: u64 = 0x7e4a_47ca_1e00;
    const TRANSACTIONS: usize = 400;
    let cluster = Cluster::builder().start().unwrap();
    let mut client = cluster.connect().unwrap();
    configure_mix(&mut client, "mix");
    let mut rng = Rng::with_seed(SEED);
    let mut ids = IdPool::new(0);
    let mut refusals = 0;
    for transaction in 0..TRANSACTIONS {
        refusals += random_transaction(&mut client, &mut rng, &mut ids, "mix").expect("connection stays up");
        for (company, counter, count) in counters_and_counts(&mut client, "mix") {
            assert_eq!(
                counter, count,
                "seed {SEED:#x}, after transaction {transaction}: counter of {company}"
            );
            assert!(count <= limit_of(&company), "seed {SEED:#x}: {company} holds {count} rows");
        }
    }
    assert!(refusals > 20, "the mix must reach the limits often enough to test refusals ({refusals})");
}

#[test]
fn kill_9_during_the_mix_leaves_counters_exact_and_enforced() {
    const WORKERS: i64 = 4;
    let mut cluster = Cluster::builder().start().unwrap();
    configure_mix(&mut cluster.connect().unwrap(), "mix");
    let running = Arc::new(Mutex::new(true));
    let workers: Vec<_> = (1..=WORKERS)
        .map(|worker| {
            let mut client = cluster.connect().unwrap();
            let running = running.clone();
            thread::spawn(move || {
                let mut rng = Rng::with_seed(worker as u64);
                let mut ids = IdPool::new(worker);
                let mut transactions = 0;
                while *running.lock().unwrap() {
                    if random_transaction(&mut client, &mut rng, &mut ids, "mix").is_none() {
                        break;
                    }
                    transactions += 1;
                }
                transactions
            })
        })
        .collect();
    thread::sleep(Duration::from_millis(2_500));
    cluster.crash().unwrap();
    *running.lock().unwrap() = false;
    let transactions: usize = workers.into_iter().map(|worker| worker.join().unwrap()).sum();
    assert!(transactions > 20, "the mix ran before the crash ({transactions} transactions)");

    cluster.start().unwrap();
    let mut client = cluster.connect().unwrap();
    for (company, counter, count) in counters_and_counts(&mut client, "mix") {
        assert_eq!(counter, count, "counter of {company} after the crash");
        assert!(count <= limit_of(&company));
    }
    // Still enforced: each company takes exactly what is left of its limit, then nothing more.
    let mut ids = IdPool::new(9);
    for company in COMPANIES {
        let mut stored: i64 =
            client.query_one("SELECT count(*) FROM mix WHERE company = $1", &[&company]).unwrap().get(0);
        loop {
            match client.execute("INSERT INTO mix (id, company) VALUES ($1, $2)", &[&ids.fresh(), &company]) {
                Ok(_) => stored += 1,
                Err(error) if is_refusal(&error) => break,
                Err(error) => panic!("{error}"),
            }
        }
        assert_eq!(stored, limit_of(company), "{company} filled up to its limit after the crash");
    }
}

#[test]
fn more_table_company_pairs_than_counters_stay_exact() {
    const COMPANY_COUNT: usize = 60;
    const LIMIT: i64 = 5;
    let cluster = Cluster::builder().setting("tenant_scale.max_quota_counters", 16).start().unwrap();
    let mut admin = cluster.connect().unwrap();
    admin.batch_execute(&format!("SELECT tenant_scale.set_plan_limit('free', 'pairs', {LIMIT})")).unwrap();
    create_quota_table(&mut admin, "pairs", "integer");
    let workers: Vec<_> = (0..4i64)
        .map(|worker| {
            let mut client = cluster.connect().unwrap();
            thread::spawn(move || {
                let mut rng = Rng::with_seed(100 + worker as u64);
                let mut ids = IdPool::new(worker + 1);
                for _ in 0..120 {
                    let rows: Vec<String> = (0..rng.usize(1..=3))
                        .map(|_| format!("({}, {})", ids.fresh(), rng.usize(0..COMPANY_COUNT)))
                        .collect();
                    for row in rows {
                        match client.batch_execute(&format!("INSERT INTO pairs (id, company) VALUES {row}")) {
                            Ok(()) => {}
                            Err(error) if is_refusal(&error) => {}
                            Err(error) => panic!("{error:?}"),
                        }
                    }
                }
            })
        })
        .collect();
    for worker in workers {
        worker.join().unwrap();
    }
    let counts: Vec<(i32, i64)> = admin
        .query("SELECT company, count(*) FROM pairs GROUP BY company ORDER BY company", &[])
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    assert_eq!(counts.len(), COMPANY_COUNT, "every company got rows");
    for (company, count) in counts {
        // 480 inserts over 60 companies: every company was offered more than its limit, so anything
        // but exactly the limit is either an overshoot or a wrong refusal.
        assert_eq!(count, LIMIT, "company {company}");
        let used: i64 = admin
            .query_one("SELECT used FROM tenant_scale.quota_status($1)", &[&company.to_string()])
            .unwrap()
            .get(0);
        assert_eq!(used, LIMIT, "counter of company {company}");
    }
    let (in_use, capacity, evicted): (i64, i64, i64) = admin
        .query_one("SELECT in_use, capacity, evicted FROM tenant_scale.quota_counters()", &[])
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .unwrap();
    assert_eq!(capacity, 16);
    assert!(in_use <= capacity);
    assert!(evicted > 0, "60 companies through 16 counters must evict");
}

#[test]
fn application_role_can_insert_and_ask_but_not_change_quotas() {
    let cluster = Cluster::builder().start().unwrap();
    let mut admin = cluster.connect().unwrap();
    admin
        .batch_execute(
            "SELECT tenant_scale.set_plan_limit('free', 'tickets', 2);
             CREATE TABLE tickets (id bigserial PRIMARY KEY, company text);
             CREATE INDEX ON tickets (company);
             SELECT tenant_scale.enforce_quota('tickets', 'tickets', 'company');
             CREATE ROLE app LOGIN;
             GRANT SELECT, INSERT, UPDATE, DELETE ON tickets TO app;
             GRANT USAGE ON SEQUENCE tickets_id_seq TO app;",
        )
        .unwrap();
    let mut app = cluster.connect_as("app", "postgres").unwrap();
    app.batch_execute("INSERT INTO tickets (company) VALUES ('acme'), ('acme')").unwrap();
    let refused = app.batch_execute("INSERT INTO tickets (company) VALUES ('acme')").unwrap_err();
    assert!(is_refusal(&refused), "{refused}");
    let used: i64 = app.query_one("SELECT used FROM tenant_scale.quota_status('acme')", &[]).unwrap().get(0);
    assert_eq!(used, 2);
    let allowed: bool =
        app.query_one("SELECT tenant_scale.quota_check('acme', 'tickets')", &[]).unwrap().get(0);
    assert!(!allowed);

    let forbidden = [
        "SELECT tenant_scale.set_plan_limit('free', 'tickets', 1000)",
        "SELECT tenant_scale.set_company_plan('acme', 'enterprise')",
        "INSERT INTO tenant_scale.companies VALUES ('acme', 'enterprise')",
        "UPDATE tenant_scale.plan_limits SET max_rows = NULL",
        "DELETE FROM tenant_scale.quotas",
        "UPDATE tenant_scale.quota_usage SET used = 0",
        "SELECT tenant_scale.drop_quota('tickets')",
        "SELECT * FROM tenant_scale.reconcile('tickets')",
        "SELECT tenant_scale.enforce_quota('tickets', 'more_tickets', 'company')",
        "ALTER TABLE tickets DISABLE TRIGGER ALL",
        "DROP TRIGGER zz_tenant_scale_quota ON tickets",
        "SET session_replication_role = replica",
        "SET tenant_scale.default_plan = 'enterprise'",
        "SELECT * FROM tenant_scale.companies",
    ];
    for statement in forbidden {
        let error = app.batch_execute(statement).expect_err(statement);
        assert_eq!(error.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE), "{statement}: {error}");
    }
    let refused = app.batch_execute("INSERT INTO tickets (company) VALUES ('acme')").unwrap_err();
    assert!(is_refusal(&refused), "enforcement still on: {refused}");
}

#[test]
fn plan_changes_reach_other_sessions_without_a_lookup_per_row() {
    let cluster = Cluster::builder().start().unwrap();
    let mut admin = cluster.connect().unwrap();
    admin.batch_execute("SELECT tenant_scale.set_plan_limit('free', 'notes', 3)").unwrap();
    create_quota_table(&mut admin, "notes", "text");
    let mut app = cluster.connect().unwrap();
    app.batch_execute("INSERT INTO notes VALUES (1, 'acme'), (2, 'acme')").unwrap();

    admin.batch_execute("SELECT tenant_scale.set_plan_limit('free', 'notes', 2)").unwrap();
    let refused = app.batch_execute("INSERT INTO notes VALUES (3, 'acme')").unwrap_err();
    assert!(is_refusal(&refused), "a lower limit applies to the next row: {refused}");
    admin
        .batch_execute(
            "SELECT tenant_scale.set_plan_limit('basic', 'notes', 5);
             SELECT tenant_scale.set_company_plan('acme', 'basic');
             SELECT tenant_scale.set_company_plan('bulk', 'enterprise');",
        )
        .unwrap();
    app.batch_execute("INSERT INTO notes VALUES (3, 'acme')").unwrap();

    // 300 statements in one transaction read the configuration tables a bounded number of times
    // (loading the cache), not once per row.
    app.batch_execute("BEGIN").unwrap();
    for id in 100..400i64 {
        app.execute("INSERT INTO notes VALUES ($1, 'bulk')", &[&id]).unwrap();
    }
    let scans: i64 = app
        .query_one(
            "SELECT sum(pg_stat_get_xact_numscans(c.oid))::bigint FROM pg_class c
             WHERE c.relnamespace = 'tenant_scale'::regnamespace
               AND c.relname IN ('plans', 'plan_limits', 'companies', 'quotas')",
            &[],
        )
        .unwrap()
        .get(0);
    app.batch_execute("ROLLBACK").unwrap();
    assert!(scans <= 8, "configuration tables scanned {scans} times for 300 inserts");
}

#[test]
fn pg_dump_keeps_plans_limits_companies_and_quotas() {
    let cluster = Cluster::builder().start().unwrap();
    let mut admin = cluster.connect().unwrap();
    admin
        .batch_execute(
            "INSERT INTO tenant_scale.plans VALUES ('startup', 5);
             SELECT tenant_scale.set_plan_limit('startup', 'invoices', 1);
             SELECT tenant_scale.set_plan_limit('free', 'invoices', 0);
             SELECT tenant_scale.set_company_plan('acme', 'startup');
             CREATE TABLE invoices (id bigint PRIMARY KEY, company text);
             CREATE INDEX ON invoices (company);
             SELECT tenant_scale.enforce_quota('invoices', 'invoices', 'company');
             INSERT INTO invoices VALUES (1, 'acme');",
        )
        .unwrap();
    admin.batch_execute("CREATE DATABASE restored").unwrap();
    let dump = tempfile_path("tenant_scale-dump");
    let port = cluster.port().to_string();
    let run = |program: &str, args: &[&str]| {
        let output = std::process::Command::new(pg_bindir().unwrap().join(program))
            .args(["-h", "127.0.0.1", "-p", &port, "-U", "postgres"])
            .args(args)
            .output()
            .unwrap();
        assert!(output.status.success(), "{program}: {}", String::from_utf8_lossy(&output.stderr));
    };
    run("pg_dump", &["-Fc", "-d", "postgres", "-f", dump.to_str().unwrap()]);
    run("pg_restore", &["--exit-on-error", "-d", "restored", dump.to_str().unwrap()]);
    let _ = std::fs::remove_file(&dump);

    let mut restored = cluster.connect_as("postgres", "restored").unwrap();
    let config: Vec<String> = restored
        .query(
            "SELECT format('%s/%s', plan, rank) FROM tenant_scale.plans
             UNION ALL SELECT format('%s/%s/%s', plan, resource, max_rows) FROM tenant_scale.plan_limits
             UNION ALL SELECT format('%s/%s', company_id, plan) FROM tenant_scale.companies
             UNION ALL SELECT format('%s/%s/%s', relation, resource, company_column) FROM tenant_scale.quotas
             ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(
        config,
        [
            "acme/startup",
            "basic/2",
            "enterprise/4",
            "free/1",
            "free/invoices/0",
            "invoices/invoices/company",
            "professional/3",
            "startup/5",
            "startup/invoices/1"
        ]
    );
    let refused = restored.batch_execute("INSERT INTO invoices VALUES (2, 'acme')").unwrap_err();
    assert!(is_refusal(&refused), "the restored quota is enforced: {refused}");
}

fn tempfile_path(prefix: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("{prefix}-{}-{:?}", std::process::id(), Instant::now()))
}

#[test]
fn without_shared_memory_quotas_still_work_and_say_so() {
    let cluster = Cluster::builder().without_preload().start().unwrap();
    let notices = Arc::new(Mutex::new(Vec::new()));
    let mut config: postgres::Config = cluster.connstr().parse().unwrap();
    let seen = notices.clone();
    config.notice_callback(move |notice| seen.lock().unwrap().push(notice.message().to_string()));
    let mut client = config.connect(NoTls).unwrap();
    client.batch_execute("SELECT tenant_scale.set_plan_limit('free', 'slow', 1)").unwrap();
    create_quota_table(&mut client, "slow", "text");
    assert!(
        notices.lock().unwrap().iter().any(|notice| notice.contains("runs without shared memory")),
        "enforce_quota announces the slower mode: {:?}",
        notices.lock().unwrap()
    );
    client.batch_execute("INSERT INTO slow VALUES (1, 'acme')").unwrap();
    assert!(is_refusal(&client.batch_execute("INSERT INTO slow VALUES (2, 'acme')").unwrap_err()));

    let error = client.query_one("SELECT * FROM tenant_scale.quota_counters()", &[]).unwrap_err();
    let db_error = error.as_db_error().unwrap();
    assert_eq!(db_error.code(), &SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE);
    assert!(db_error.hint().unwrap().contains("shared_preload_libraries"), "{db_error:?}");
}

#[test]
fn two_phase_commit_is_refused_only_for_quota_changes() {
    let cluster = Cluster::builder().setting("max_prepared_transactions", 2).start().unwrap();
    let mut client = cluster.connect().unwrap();
    create_quota_table(&mut client, "pledges", "text");
    client.batch_execute("CREATE TABLE plain (id int)").unwrap();

    client.batch_execute("BEGIN; INSERT INTO pledges VALUES (1, 'acme')").unwrap();
    let error = client.batch_execute("PREPARE TRANSACTION 'quota'").unwrap_err();
    assert_eq!(error.code(), Some(&SqlState::FEATURE_NOT_SUPPORTED), "{error}");
    let count: i64 = client.query_one("SELECT count(*) FROM pledges", &[]).unwrap().get(0);
    assert_eq!(count, 0, "the refused transaction was rolled back");

    client.batch_execute("BEGIN; INSERT INTO plain VALUES (1); PREPARE TRANSACTION 'plain'").unwrap();
    client.batch_execute("COMMIT PREPARED 'plain'").unwrap();
    let used: i64 =
        client.query_one("SELECT used FROM tenant_scale.quota_status('acme')", &[]).unwrap().get(0);
    assert_eq!(used, 0);
}
