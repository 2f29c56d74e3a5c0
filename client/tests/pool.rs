//! The tenant pool against real PostgreSQL clusters with the extension, and a real streaming standby.

use std::time::{Duration, Instant};

use tenant_scale_client::pool::{Error, MONITOR_APPLICATION, PoolConfig, Role, TenantPool};
use tenant_scale_harness::{Cluster, StopMode};

const CHECK_INTERVAL: Duration = Duration::from_millis(200);

fn config(primary: &Cluster, replicas: &[&Cluster]) -> PoolConfig {
    let mut config = PoolConfig::new(&primary.url()).unwrap();
    config.replica_urls = replicas.iter().map(|replica| replica.url()).collect();
    (config.primary_max, config.primary_min, config.replica_max, config.replica_min) = (4, 1, 4, 1);
    config.wait_timeout = Duration::from_millis(300);
    config.replica_check_interval = CHECK_INTERVAL;
    config.replica_ban = Duration::from_millis(500);
    config
}

/// Pooled connections to `cluster`: client backends other than psql's and the pool's monitor.
fn backends(cluster: &Cluster) -> Vec<String> {
    let pids = cluster
        .psql(&format!(
            "SELECT pid FROM pg_stat_activity WHERE backend_type = 'client backend' \
             AND pid <> pg_backend_pid() AND application_name <> '{MONITOR_APPLICATION}' ORDER BY backend_start"
        ))
        .unwrap();
    pids.lines().map(str::to_string).collect()
}

/// Polls `done` every 20 ms for up to 5 s: the background checks and the server's own shutdown are
/// asynchronous, so tests wait for the state they expect, boundedly, instead of sleeping a fixed time.
async fn eventually(mut done: impl AsyncFnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if done().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    done().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_waits_for_checked_out_connections_until_its_deadline() {
    let primary = Cluster::builder().start().unwrap();
    let pool = TenantPool::connect(config(&primary, &[])).await.unwrap();
    let held = pool.write(Some("acme")).await.unwrap();

    let started = Instant::now();
    let outcome = pool.close(Duration::from_millis(300)).await;
    assert!(matches!(outcome, Err(Error::CloseTimeout { in_use: 1 })), "{outcome:?}");
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert!(matches!(pool.write(Some("acme")).await, Err(Error::Closed)), "no checkout once closing");
    assert!(matches!(pool.read(None).await, Err(Error::Closed)));

    let pool = TenantPool::connect(config(&primary, &[])).await.unwrap();
    let held_too = pool.write(None).await.unwrap();
    let release = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        drop(held_too);
    });
    let started = Instant::now();
    pool.close(Duration::from_secs(5)).await.unwrap();
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(150) && waited < Duration::from_secs(2), "{waited:?}");
    release.await.unwrap();
    drop(held);
    assert!(eventually(async || backends(&primary).is_empty()).await, "closing closed every connection");
    let monitors =
        primary.psql("SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'tenant-scale%'");
    assert_eq!(monitors.unwrap(), "0", "and the checks' own connections");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_keeps_its_minimum_open_and_closes_idle_connections_above_it() {
    let primary = Cluster::builder().start().unwrap();
    let mut config = config(&primary, &[]);
    config.primary_min = 2;
    config.idle_timeout = Duration::from_millis(300);
    let pool = TenantPool::connect(config).await.unwrap();
    assert_eq!(backends(&primary).len(), 2, "the minimum is opened at start");

    let held = check_out(&pool, 4).await;
    assert_eq!(pool.health().await[0].in_use, 4);
    drop(held);
    assert!(
        eventually(async || backends(&primary).len() == 2).await,
        "idle connections above the minimum closed"
    );
    let health = pool.health().await;
    assert_eq!((health[0].size, health[0].in_use, health[0].max_size), (2, 0, 4));
}

/// `n` unattributed primary connections, checked out one after the other and held.
async fn check_out(pool: &TenantPool, n: usize) -> Vec<tenant_scale_client::pool::TenantConnection> {
    let mut held = Vec::new();
    for _ in 0..n {
        held.push(pool.write(None).await.unwrap());
    }
    held
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintenance_opens_only_the_connections_missing_below_the_minimum() {
    let primary = Cluster::builder().start().unwrap();
    let mut config = config(&primary, &[]);
    (config.primary_min, config.primary_max) = (2, 4);
    let pool = TenantPool::connect(config).await.unwrap();
    assert_eq!(backends(&primary).len(), 2);
    let held = pool.write(None).await.unwrap();
    // A raw path closes its connection on return: one in use, none idle, one short of the minimum.
    pool.write(None).await.unwrap().batch_execute("SELECT 1").await.unwrap();
    assert!(eventually(async || backends(&primary).len() == 2).await, "the missing one is reopened");
    // Several more rounds of maintenance: none opens another (the idle timeout, 30 s, closes nothing).
    tokio::time::sleep(CHECK_INTERVAL * 5).await;
    assert_eq!(backends(&primary).len(), 2, "the minimum counts the connection in use");
    assert_eq!(pool.health().await[0].size, 2);
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_keeps_its_deadline_while_a_check_waits_on_a_silent_server() {
    let primary = Cluster::builder().start().unwrap();
    // A "replica" that accepts connections and never answers: each check of it waits for the whole
    // connect timeout.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = silent.local_addr().unwrap().port();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let listener = tokio::spawn({
        let accepted = accepted.clone();
        async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = silent.accept().await {
                held.push(stream);
                accepted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        }
    });
    let mut config = config(&primary, &[]);
    config.replica_urls = vec![format!("postgres://postgres@127.0.0.1:{port}/postgres")];
    config.connect_timeout = Duration::from_secs(2);
    let pool = TenantPool::connect(config).await.unwrap();
    // The first check ran in connect(); the second is the background task's, now waiting.
    assert!(eventually(async || accepted.load(std::sync::atomic::Ordering::SeqCst) >= 2).await);

    let started = Instant::now();
    pool.close(Duration::from_millis(100)).await.unwrap();
    let took = started.elapsed();
    assert!(took < Duration::from_secs(1), "close waited {took:?} for a check to give up");
    listener.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_pool_fails_after_the_wait_timeout_naming_the_node() {
    let primary = Cluster::builder().start().unwrap();
    let mut config = config(&primary, &[]);
    config.primary_max = 1;
    let pool = TenantPool::connect(config).await.unwrap();
    let _held = pool.write(None).await.unwrap();
    let started = Instant::now();
    let error = pool.write(None).await.err().unwrap();
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert!(matches!(error, Error::Checkout { .. }), "{error:?}");
    assert!(error.to_string().contains(&format!("127.0.0.1:{}/postgres", primary.port())), "{error}");
    assert_eq!(pool.health().await[0].waiting, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_is_replaced_after_its_share_of_checkouts() {
    let primary = Cluster::builder().start().unwrap();
    let mut config = config(&primary, &[]);
    (config.primary_max, config.primary_min, config.recycle_after_uses) = (1, 1, 3);
    let pool = TenantPool::connect(config).await.unwrap();
    let first = backends(&primary);
    assert_eq!(first.len(), 1);
    for _ in 0..2 {
        drop(pool.write(None).await.unwrap());
    }
    assert_eq!(backends(&primary), first, "three uses: the one that opened it at start and two checkouts");
    drop(pool.write(None).await.unwrap());
    let replaced = backends(&primary);
    assert_eq!(replaced.len(), 1);
    assert_ne!(replaced, first, "the fourth use got a new connection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_and_reads_without_replicas_go_to_the_primary_and_health_says_so() {
    let primary = Cluster::builder().start().unwrap();
    let pool = TenantPool::connect(config(&primary, &[])).await.unwrap();
    assert_eq!(pool.write(Some("acme")).await.unwrap().server().1, Role::Primary);
    assert_eq!(pool.read(Some("acme")).await.unwrap().server().1, Role::Primary);
    let health = pool.health().await;
    assert_eq!(health.len(), 1);
    assert_eq!((health[0].role, health[0].up, health[0].serves_reads), (Role::Primary, true, false));
    assert_eq!(health[0].name, format!("127.0.0.1:{}/postgres", primary.port()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reports_a_stopped_primary_down() {
    let mut primary = Cluster::builder().start().unwrap();
    let pool = TenantPool::connect(config(&primary, &[])).await.unwrap();
    primary.stop(StopMode::Fast).unwrap();
    let health = pool.health().await;
    assert!(!health[0].up);
    assert!(health[0].last_error.is_some());
    primary.start().unwrap();
    assert!(pool.health().await[0].up);
}

/// `SHOW tenant_scale.company` and the backend's pid, through the pool's own connection.
async fn company_and_pid(connection: &tenant_scale_client::pool::TenantConnection) -> (String, i32) {
    let row = connection
        .query_one("SELECT current_setting('tenant_scale.company'), pg_backend_pid()", &[])
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

fn single_connection(primary: &Cluster) -> PoolConfig {
    let mut config = config(primary, &[]);
    (config.primary_max, config.primary_min) = (1, 1);
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attribution_never_leaks_to_the_next_user_of_a_connection() {
    let primary = Cluster::builder().start().unwrap();
    let pool = TenantPool::connect(single_connection(&primary)).await.unwrap();
    let (company, pid) = company_and_pid(&pool.write(Some("acme")).await.unwrap()).await;
    assert_eq!(company, "acme");
    // A caller that sets the company itself, in autocommit, does not decide the next user's either.
    pool.write(Some("acme"))
        .await
        .unwrap()
        .execute("SET tenant_scale.company = 'mallory'", &[])
        .await
        .unwrap();
    assert_eq!(
        company_and_pid(&pool.write(Some("globex")).await.unwrap()).await,
        ("globex".to_string(), pid)
    );
    assert_eq!(
        company_and_pid(&pool.write(None).await.unwrap()).await,
        (String::new(), pid),
        "none means none"
    );
    assert_eq!(company_and_pid(&pool.read(Some("o'brien \\ co")).await.unwrap()).await.0, "o'brien \\ co");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_transaction_keeps_its_company_and_leaks_nothing() {
    let primary = Cluster::builder().start().unwrap();
    let pool = TenantPool::connect(single_connection(&primary)).await.unwrap();
    let mut connection = pool.write(Some("acme")).await.unwrap();
    {
        let transaction = connection.transaction().await.unwrap();
        transaction.batch_execute("SET tenant_scale.company = 'mallory'").await.unwrap();
        assert!(transaction.execute("SELECT 1 / 0", &[]).await.is_err());
        // Dropped unfinished: rolled back, which also undoes the caller's SET.
    }
    assert_eq!(company_and_pid(&connection).await.0, "acme", "statements after the rollback stay attributed");
    {
        // Left unfinished when the connection goes back: tokio-postgres queues the ROLLBACK, which
        // runs before the next user's attribution.
        let transaction = connection.transaction().await.unwrap();
        transaction.batch_execute("SET tenant_scale.company = 'mallory'").await.unwrap();
    }
    drop(connection);
    assert_eq!(company_and_pid(&pool.write(Some("globex")).await.unwrap()).await.0, "globex");
}

/// `SET tenant_scale.company` statements the server ran, from its log (the cluster must log every
/// statement): what a skipped attribution leaves out, seen from the server's side.
fn attributions_in_server_log(cluster: &Cluster) -> usize {
    std::fs::read_to_string(cluster.log_path())
        .unwrap()
        .matches("statement: SET tenant_scale.company")
        .count()
}

/// The pool's counts of attributions sent and skipped on the primary.
async fn attributions_counted(pool: &TenantPool) -> (u64, u64) {
    let primary = &pool.health().await[0];
    (primary.attributions_sent, primary.attributions_skipped)
}

/// Calls company_stats counts for `company` (0 when it has no entry).
fn calls_of(cluster: &Cluster, company: &str) -> i64 {
    cluster
        .psql(&format!(
            "SELECT coalesce(sum(calls), 0) FROM tenant_scale.company_stats WHERE company_id = '{company}'"
        ))
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkout_for_the_company_a_connection_already_carries_sends_no_set() {
    let primary = Cluster::builder().setting("log_statement", "all").start().unwrap();
    let pool = TenantPool::connect(single_connection(&primary)).await.unwrap();
    let pid = company_and_pid(&pool.write(Some("acme")).await.unwrap()).await.1;
    assert_eq!((attributions_in_server_log(&primary), attributions_counted(&pool).await), (1, (1, 0)));
    for _ in 0..2 {
        assert_eq!(
            company_and_pid(&pool.write(Some("acme")).await.unwrap()).await,
            ("acme".to_string(), pid)
        );
    }
    assert_eq!(
        (attributions_in_server_log(&primary), attributions_counted(&pool).await),
        (1, (1, 2)),
        "the server reported acme after the first SET: the next two checkouts sent none"
    );
    assert_eq!(calls_of(&primary, "acme"), 3, "and their statements were counted for acme");
    assert_eq!(company_and_pid(&pool.write(Some("globex")).await.unwrap()).await.0, "globex");
    assert_eq!(attributions_in_server_log(&primary), 2, "another company: SET");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_company_changed_through_sql_is_set_again_for_the_next_checkout_of_the_same_company() {
    let primary = Cluster::builder().start().unwrap();
    let pool = TenantPool::connect(single_connection(&primary)).await.unwrap();
    let pid = company_and_pid(&pool.write(Some("acme")).await.unwrap()).await.1;
    let changes = [
        "SET tenant_scale.company = 'x-set'",
        "SELECT set_config('tenant_scale.company', 'x-set_config', false)",
        "RESET tenant_scale.company",
    ];
    for change in changes {
        pool.write(Some("acme")).await.unwrap().execute(change, &[]).await.unwrap();
        let (sent, _) = attributions_counted(&pool).await;
        let calls = calls_of(&primary, "acme");
        let next = pool.write(Some("acme")).await.unwrap();
        assert_eq!(company_and_pid(&next).await, ("acme".to_string(), pid), "after {change}");
        drop(next);
        assert_eq!(attributions_counted(&pool).await.0, sent + 1, "the server's report made it send a SET");
        assert_eq!(calls_of(&primary, "acme"), calls + 1, "after {change}");
    }
    let leaked =
        primary.psql("SELECT count(*) FROM tenant_scale.company_stats WHERE company_id LIKE 'x-%'").unwrap();
    assert_eq!(leaked, "0", "no statement of a later checkout counted for the company set through SQL");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_dropped_unfinished_never_leaves_a_stale_report_to_the_next_checkout() {
    let primary = Cluster::builder().start().unwrap();
    let pool = TenantPool::connect(single_connection(&primary)).await.unwrap();
    let mut connection = pool.write(Some("globex")).await.unwrap();
    let pid = company_and_pid(&connection).await.1;
    {
        let transaction = connection.transaction().await.unwrap();
        transaction.batch_execute("SET tenant_scale.company = 'acme'").await.unwrap();
        // Still running when the transaction is dropped: the ROLLBACK queued behind it, which puts globex
        // back, is answered only half a second later. Until then the server's last report says acme.
        let sleep = transaction.batch_execute("SELECT pg_sleep(0.5)");
        assert!(tokio::time::timeout(Duration::from_millis(50), sleep).await.is_err());
    }
    drop(connection);
    let next = pool.write(Some("acme")).await.unwrap();
    assert_eq!(company_and_pid(&next).await, ("acme".to_string(), pid));
    drop(next);
    assert_eq!(attributions_counted(&pool).await, (2, 0), "the transaction left it unsettled: SET");
    assert_eq!((calls_of(&primary, "acme"), calls_of(&primary, "globex")), (2, 1), "the sleep and the check");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_abandoned_mid_way_never_leaves_a_stale_report_to_the_next_checkout() {
    let primary = Cluster::builder().start().unwrap();
    let pool = TenantPool::connect(single_connection(&primary)).await.unwrap();
    let connection = pool.write(Some("acme")).await.unwrap();
    // The FROM item runs first: the setting changes (and is reported) half a second after the start.
    let late_change = connection
        .prepare_cached("SELECT set_config('tenant_scale.company', 'mallory', false) FROM pg_sleep(0.5)")
        .await
        .unwrap();
    let pid = company_and_pid(&connection).await.1;
    let abandoned = tokio::time::timeout(Duration::from_millis(50), connection.execute(&late_change, &[]));
    assert!(abandoned.await.is_err(), "still running when its future is dropped");
    drop(connection);
    let next = pool.write(Some("acme")).await.unwrap();
    assert_eq!(company_and_pid(&next).await, ("acme".to_string(), pid));
    drop(next);
    assert_eq!(calls_of(&primary, "mallory"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_preload_the_server_reports_nothing_and_every_checkout_sets_the_company() {
    let primary = Cluster::builder().without_preload().setting("log_statement", "all").start().unwrap();
    let pool = TenantPool::connect(single_connection(&primary)).await.unwrap();
    let pid = company_and_pid(&pool.write(Some("acme")).await.unwrap()).await.1;
    for company in ["acme", "acme", ""] {
        let connection = pool.write(Some(company)).await.unwrap();
        assert_eq!(company_and_pid(&connection).await, (company.to_string(), pid));
    }
    assert_eq!((attributions_in_server_log(&primary), attributions_counted(&pool).await), (4, (4, 0)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_whose_attribution_failed_is_discarded() {
    let primary = Cluster::builder().start().unwrap();
    let pool = TenantPool::connect(single_connection(&primary)).await.unwrap();
    // A transaction opened and failed through `execute` (a path the pool does not watch) goes back to
    // the pool in a failed transaction block, where the next checkout's SET fails. For the same company
    // too: the server still reports acme, but the failed statement left the connection unsettled.
    for next_company in ["globex", "acme"] {
        let connection = pool.write(Some("acme")).await.unwrap();
        let failed_in = company_and_pid(&connection).await.1;
        connection.execute("BEGIN", &[]).await.unwrap();
        assert!(connection.execute("SELECT 1 / 0", &[]).await.is_err());
        drop(connection);

        let next = pool.write(Some(next_company)).await.unwrap();
        let error = next.query_one("SELECT 1", &[]).await.unwrap_err();
        assert!(matches!(&error, Error::Attribution { company, .. } if company == next_company), "{error:?}");
        drop(next);
        let (company, pid) = company_and_pid(&pool.write(Some(next_company)).await.unwrap()).await;
        assert_eq!(company, next_company);
        assert_ne!(pid, failed_in, "the connection was closed, not handed out again");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_left_open_through_a_raw_path_never_reaches_the_next_checkout() {
    let primary = Cluster::builder().start().unwrap();
    primary.psql("CREATE TABLE notes (note text NOT NULL)").unwrap();
    let pool = TenantPool::connect(single_connection(&primary)).await.unwrap();
    for raw_path in ["batch_execute", "client"] {
        let connection = pool.write(Some("acme")).await.unwrap();
        let begin = format!("BEGIN; INSERT INTO notes VALUES ('acme {raw_path}')");
        match raw_path {
            "batch_execute" => connection.batch_execute(&begin).await.unwrap(),
            _ => connection.client().await.unwrap().batch_execute(&begin).await.unwrap(),
        }
        let left_open = company_and_pid(&connection).await.1;
        drop(connection);

        let mut next = pool.write(Some("globex")).await.unwrap();
        let transaction = next.transaction().await.unwrap();
        transaction.execute("INSERT INTO notes VALUES ('globex ' || $1)", &[&raw_path]).await.unwrap();
        transaction.commit().await.unwrap();
        let (company, pid) = company_and_pid(&next).await;
        drop(next);
        let committed = primary
            .psql(&format!(
                "SELECT string_agg(note, ', ' ORDER BY note) FROM notes WHERE note LIKE '% {raw_path}'"
            ))
            .unwrap();
        assert_eq!(committed, format!("globex {raw_path}"), "acme's uncommitted insert never commits");
        assert_eq!(company, "globex");
        assert_ne!(pid, left_open, "{raw_path}: the connection was closed, not handed to the next checkout");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_are_counted_for_their_company_in_company_stats() {
    let primary = Cluster::builder().start().unwrap();
    let pool = TenantPool::connect(config(&primary, &[])).await.unwrap();
    for (company, statements) in [(Some("acme"), 5), (Some("globex"), 3), (None, 2)] {
        for _ in 0..statements {
            pool.write(company).await.unwrap().query_one("SELECT 1", &[]).await.unwrap();
        }
    }
    let stats = primary
        .psql("SELECT company_id, calls FROM tenant_scale.company_stats WHERE company_id IN ('acme', 'globex') ORDER BY 1")
        .unwrap();
    assert_eq!(
        stats, "acme|5\nglobex|3",
        "exactly the callers' statements, the attribution itself not counted"
    );
}

/// The role of the server `read()` hands a connection from.
async fn read_role(pool: &TenantPool) -> Role {
    pool.read(Some("acme")).await.unwrap().server().1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_move_from_a_stopped_standby_to_the_primary_and_back() {
    let primary = Cluster::builder().start().unwrap();
    let mut standby = primary.start_standby().unwrap();
    let pool = TenantPool::connect(config(&primary, &[&standby])).await.unwrap();
    assert_eq!(read_role(&pool).await, Role::Replica);
    assert_eq!(
        pool.write(Some("acme")).await.unwrap().server().1,
        Role::Primary,
        "writes never go to a replica"
    );

    standby.stop(StopMode::Fast).unwrap();
    for _ in 0..5 {
        assert_eq!(read_role(&pool).await, Role::Primary, "served by the primary at once, no call failing");
    }
    let replica = replica_health(&pool).await;
    assert!(!replica.up && !replica.serves_reads, "{replica:?}");

    standby.start().unwrap();
    assert!(
        eventually(async || read_role(&pool).await == Role::Replica).await,
        "reads return to the standby once it is checked and its ban is over"
    );
}

/// The replica as `health()` reports it (which checks it first).
async fn replica_health(pool: &TenantPool) -> tenant_scale_client::pool::NodeHealth {
    pool.health().await.into_iter().find(|node| node.role == Role::Replica).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_replay_moves_reads_to_the_primary_at_the_next_check_and_back() {
    let primary = Cluster::builder().start().unwrap();
    let standby = primary.start_standby().unwrap();
    let pool = TenantPool::connect(config(&primary, &[&standby])).await.unwrap();
    assert_eq!(read_role(&pool).await, Role::Replica);

    standby.psql("SELECT pg_wal_replay_pause()").unwrap();
    primary.psql("CREATE TABLE written_while_paused AS SELECT 1 AS id").unwrap();
    // Only the background check moves reads (nothing fails on a paused standby): no health() call here.
    assert!(eventually(async || read_role(&pool).await == Role::Primary).await);
    let replica = replica_health(&pool).await;
    assert!(replica.up && !replica.serves_reads, "{replica:?}");
    assert!(replica.last_error.as_deref().is_some_and(|error| error.contains("paused")), "{replica:?}");

    standby.psql("SELECT pg_wal_replay_resume()").unwrap();
    assert!(eventually(async || read_role(&pool).await == Role::Replica).await);
    let replica = replica_health(&pool).await;
    assert!(replica.lag.is_some_and(|lag| lag < Duration::from_secs(5)), "{replica:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_lagging_over_the_maximum_serves_no_reads() {
    let primary = Cluster::builder().start().unwrap();
    let standby = primary.start_standby().unwrap();
    // replica_status() measures lag from the last replayed commit: there must be one.
    primary.psql("CREATE TABLE replayed AS SELECT 1 AS id").unwrap();
    assert!(eventually(async || standby.psql("SELECT count(*) FROM replayed").is_ok()).await);
    let mut config = config(&primary, &[&standby]);
    config.max_replica_lag = Duration::from_millis(300);
    let pool = TenantPool::connect(config).await.unwrap();
    assert_eq!(read_role(&pool).await, Role::Replica);

    // Replay delayed, not paused: the standby receives the next commit and holds it back, so its lag
    // grows while replica_status() still calls it healthy (the extension's own limit is 5 s).
    standby.psql("ALTER SYSTEM SET recovery_min_apply_delay = '1h'").unwrap();
    standby.psql("SELECT pg_reload_conf()").unwrap();
    primary.psql("CREATE TABLE held_back AS SELECT 1 AS id").unwrap();
    assert!(eventually(async || read_role(&pool).await == Role::Primary).await);
    let replica = replica_health(&pool).await;
    assert!(replica.up && !replica.serves_reads, "{replica:?}");
    assert!(
        replica.last_error.as_deref().is_some_and(|error| error.contains("over the maximum")),
        "{replica:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_banned_replica_serves_no_reads_until_a_check_after_the_failure_passes() {
    let primary = Cluster::builder().start().unwrap();
    let mut standby = primary.start_standby().unwrap();
    let mut config = config(&primary, &[&standby]);
    // No background check during the test: only the failure and health() change what the pool knows.
    config.replica_check_interval = Duration::from_secs(3600);
    config.replica_ban = Duration::from_millis(100);
    let pool = TenantPool::connect(config).await.unwrap();
    assert_eq!(read_role(&pool).await, Role::Replica);

    standby.stop(StopMode::Fast).unwrap();
    assert_eq!(read_role(&pool).await, Role::Primary, "the failed checkout bans it and the primary serves");
    standby.start().unwrap();
    let ban_over = Instant::now() + Duration::from_millis(200);
    tokio::time::sleep_until(ban_over.into()).await;
    assert_eq!(
        read_role(&pool).await,
        Role::Primary,
        "the ban is over, but the check that found it fit came before the failure"
    );
    assert!(eventually(async || replica_health(&pool).await.serves_reads).await, "a check after it passes");
    assert_eq!(read_role(&pool).await, Role::Replica);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_reads_round_robin() {
    let primary = Cluster::builder().start().unwrap();
    let (first, second) = (primary.start_standby().unwrap(), primary.start_standby().unwrap());
    let pool = TenantPool::connect(config(&primary, &[&first, &second])).await.unwrap();
    let mut servers = Vec::new();
    for _ in 0..4 {
        let connection = pool.read(None).await.unwrap();
        servers.push(connection.server().0.to_string());
    }
    let names = [first.port(), second.port()].map(|port| format!("127.0.0.1:{port}/postgres"));
    assert_eq!(servers, [&names[0], &names[1], &names[0], &names[1]].map(String::clone), "{servers:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insert_over_the_plan_limit_is_a_typed_quota_error_with_the_upgrade() {
    let primary = Cluster::builder().start().unwrap();
    primary
        .psql(
            "CREATE TABLE patients (id serial PRIMARY KEY, company_id text NOT NULL); \
             CREATE INDEX ON patients (company_id); \
             SELECT tenant_scale.set_plan_limit('free', 'patients', 2); \
             SELECT tenant_scale.set_plan_limit('basic', 'patients', 10); \
             SELECT tenant_scale.enforce_quota('patients', 'patients', 'company_id')",
        )
        .unwrap();
    let pool = TenantPool::connect(config(&primary, &[])).await.unwrap();
    let connection = pool.write(Some("acme")).await.unwrap();
    let insert = "INSERT INTO patients (company_id) VALUES ($1)";
    for _ in 0..2 {
        connection.execute(insert, &[&"acme"]).await.unwrap();
    }
    let error = connection.execute(insert, &[&"acme"]).await.unwrap_err();
    let quota = error.quota().unwrap_or_else(|| panic!("not a quota error: {error:?}"));
    assert_eq!(
        (quota.company.as_deref(), quota.resource.as_deref(), quota.plan.as_deref(), quota.limit),
        (Some("acme"), Some("patients"), Some("free"), Some(2))
    );
    assert_eq!((quota.used, quota.requested), (Some(2), Some(1)));
    assert!(quota.hint.as_deref().is_some_and(|hint| hint.contains("basic")), "{quota:?}");
    assert_eq!((quota.upgrade_plan.as_deref(), quota.upgrade_limit), (Some("basic"), Some(10)));
}
