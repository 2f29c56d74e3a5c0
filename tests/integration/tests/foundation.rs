//! The ground every other test stands on: the harness starts real servers, they answer, and nothing
//! outlives its handle.

use std::time::{Duration, Instant};

use tenant_scale_harness::{Cluster, Redis, process_alive};

#[test]
fn primary_standby_and_redis_answer_and_stop_with_their_handles() {
    let primary = Cluster::builder().start().expect("primary");
    let standby = primary.start_standby().expect("standby");
    let redis = Redis::start().expect("redis");

    primary
        .psql("CREATE TABLE handshake(id int primary key, note text); INSERT INTO handshake VALUES (42, 'from primary')")
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let replicated = loop {
        let seen = standby.psql("SELECT note FROM handshake WHERE id = 42").unwrap_or_default();
        if seen == "from primary" || Instant::now() > deadline {
            break seen;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(replicated, "from primary");
    assert_eq!(standby.psql("SELECT pg_is_in_recovery()").unwrap(), "t");
    assert_eq!(primary.psql("SELECT pg_is_in_recovery()").unwrap(), "f");
    assert_eq!(
        standby.psql("SELECT tenant_scale.version()").unwrap(),
        env!("CARGO_PKG_VERSION"),
        "the standby replays CREATE EXTENSION and loads the same library"
    );

    let mut connection = redis::Client::open(redis.url()).unwrap().get_connection().unwrap();
    redis::cmd("SET").arg("handshake").arg("pong").exec(&mut connection).unwrap();
    let value: String = redis::cmd("GET").arg("handshake").query(&mut connection).unwrap();
    assert_eq!(value, "pong");

    let pids = [primary.postmaster_pid().unwrap(), standby.postmaster_pid().unwrap(), redis.pid().unwrap()];
    assert!(pids.iter().all(|pid| process_alive(*pid)));
    drop(connection);
    drop((standby, primary, redis));
    let still_running: Vec<u32> = pids.into_iter().filter(|pid| process_alive(*pid)).collect();
    assert!(still_running.is_empty(), "processes outlived their handles: {still_running:?}");
}

#[test]
fn preloaded_cluster_reports_the_library_in_shared_preload_libraries() {
    let cluster = Cluster::builder().start().unwrap();
    assert_eq!(cluster.psql("SHOW shared_preload_libraries").unwrap(), "tenant_scale");
    assert_eq!(cluster.psql("SELECT tenant_scale.version()").unwrap(), env!("CARGO_PKG_VERSION"));
}

#[test]
fn extension_works_without_preload() {
    let cluster = Cluster::builder().without_preload().start().unwrap();
    assert_eq!(cluster.psql("SHOW shared_preload_libraries").unwrap(), "");
    assert_eq!(cluster.psql("SELECT tenant_scale.version()").unwrap(), env!("CARGO_PKG_VERSION"));
}

#[test]
fn crashed_cluster_restarts_with_its_data() {
    let mut cluster = Cluster::builder().start().unwrap();
    cluster.psql("CREATE TABLE survivor AS SELECT 7 AS id").unwrap();
    let pid = cluster.postmaster_pid().unwrap();
    cluster.crash().unwrap();
    assert!(!process_alive(pid));
    cluster.start().unwrap();
    assert_eq!(cluster.psql("SELECT id FROM survivor").unwrap(), "7");
}
