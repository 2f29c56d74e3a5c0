//! replica_lag, replica_status() and the replication check of health() on a real primary and
//! streaming standby. Lag is made on demand by pausing replay on the standby, so the test takes
//! seconds: about 5 s on 2 cores, one primary and one standby.

use std::time::Duration;

use tenant_scale_harness::{Cluster, StopMode};
use tenant_scale_integration::eventually;

const WAIT: Duration = Duration::from_secs(30);

/// `application_name|state|lag_bytes|healthy` for each standby in replica_lag, one per line.
fn replica_lag(primary: &Cluster) -> String {
    primary.psql("SELECT application_name, state, lag_bytes, healthy FROM tenant_scale.replica_lag").unwrap()
}

/// `is_replica|lag_bytes|replay_paused|healthy` from replica_status().
fn replica_status(server: &Cluster) -> Vec<String> {
    server
        .psql("SELECT is_replica, lag_bytes, replay_paused, healthy FROM tenant_scale.replica_status()")
        .unwrap()
        .split('|')
        .map(str::to_string)
        .collect()
}

fn replication_check(server: &Cluster) -> String {
    server.psql("SELECT ok, detail FROM tenant_scale.health() WHERE \"check\" = 'replication'").unwrap()
}

fn lag_bytes(line: &str) -> i64 {
    line.split('|').nth(2).and_then(|bytes| bytes.parse().ok()).unwrap_or(-1)
}

#[test]
fn paused_replay_makes_both_sides_unhealthy_until_resumed_and_a_stopped_standby_drops_out() {
    // A low byte limit, so that a few hundred kB of WAL make the lag visible; a generous time limit,
    // so that the outcome does not depend on how fast this machine replays.
    let primary = Cluster::builder()
        .setting("tenant_scale.max_replica_lag_bytes", "64kB")
        .setting("tenant_scale.max_replica_lag_ms", "60s")
        .start()
        .unwrap();
    let mut standby = primary.start_standby().unwrap();

    // Both answer: one streaming, healthy standby on the primary; a healthy replica on the standby.
    let streaming = eventually(WAIT, || {
        let line = replica_lag(&primary);
        (line.contains("|streaming|") && line.ends_with("|t")).then_some(line)
    });
    assert!(
        streaming.is_some(),
        "replica_lag never showed a healthy streaming standby: {}",
        replica_lag(&primary)
    );
    assert_eq!(replica_status(&primary), ["f", "0", "f", "t"], "a primary is not a replica and is healthy");
    let caught_up = eventually(WAIT, || (replica_status(&standby) == ["t", "0", "f", "t"]).then_some(()));
    assert!(caught_up.is_some(), "standby status: {:?}", replica_status(&standby));
    assert!(replication_check(&primary).starts_with("t|standby "), "{}", replication_check(&primary));
    assert!(replication_check(&standby).starts_with("t|standby: healthy"), "{}", replication_check(&standby));

    // A replayed commit dates the standby's position (last_replay_at), so its lag gets a time too.
    primary.psql("CREATE TABLE marker ()").unwrap();
    let dated = eventually(WAIT, || {
        standby.psql("SELECT to_regclass('marker') IS NOT NULL").ok().filter(|seen| seen == "t")
    });
    assert!(dated.is_some(), "the marker never replicated");

    // Pause replay and write on the primary: WAL arrives but is not replayed.
    standby.psql("SELECT pg_wal_replay_pause()").unwrap();
    primary
        .psql("CREATE TABLE filler AS SELECT g, repeat('x', 200) AS pad FROM generate_series(1, 5000) g")
        .unwrap();
    let primary_side = eventually(WAIT, || {
        let line = replica_lag(&primary);
        (lag_bytes(&line) > 64 * 1024 && line.ends_with("|f")).then_some(line)
    });
    assert!(primary_side.is_some(), "primary never saw the lag: {}", replica_lag(&primary));
    let standby_side = eventually(WAIT, || {
        let status = replica_status(&standby);
        let behind = status[1].parse::<i64>().unwrap_or(0) > 64 * 1024;
        (behind && status[2] == "t" && status[3] == "f").then_some(status)
    });
    assert!(standby_side.is_some(), "standby never saw its own lag: {:?}", replica_status(&standby));
    assert!(replication_check(&primary).starts_with("f|"), "{}", replication_check(&primary));
    assert!(replication_check(&standby).contains("replay paused"), "{}", replication_check(&standby));
    // The time limit counts too: with a 1 ms limit the paused standby is late by time alone.
    let by_time = standby
        .psql(
            "SET tenant_scale.max_replica_lag_bytes = '1GB'; SET tenant_scale.max_replica_lag_ms = 1;
             SELECT lag_seconds > 0, healthy FROM tenant_scale.replica_status()",
        )
        .unwrap();
    assert_eq!(by_time, "t|f");

    // Resume: both sides return to healthy once replay has caught up.
    standby.psql("SELECT pg_wal_replay_resume()").unwrap();
    let healed = eventually(WAIT, || {
        let primary_ok = replica_lag(&primary).ends_with("|t");
        (primary_ok && replica_status(&standby) == ["t", "0", "f", "t"]).then_some(())
    });
    assert!(
        healed.is_some(),
        "not healthy again: {} / {:?}",
        replica_lag(&primary),
        replica_status(&standby)
    );
    assert_eq!(standby.psql("SELECT count(*) FROM filler").unwrap(), "5000");

    // A stopped standby disappears from replica_lag (or stops streaming) and health() says so.
    standby.stop(StopMode::Fast).unwrap();
    let gone = eventually(WAIT, || {
        let line = replica_lag(&primary);
        (line.is_empty() || !line.contains("|streaming|")).then_some(line)
    });
    assert!(gone.is_some(), "stopped standby still streaming: {}", replica_lag(&primary));
    let check = replication_check(&primary);
    assert!(check == "t|primary; no standby is connected" || check.starts_with("f|"), "{check}");
}

#[test]
fn replica_lag_and_health_are_for_pg_monitor_while_replica_status_is_public() {
    let primary = Cluster::builder().start().unwrap();
    primary
        .psql("CREATE ROLE app LOGIN; CREATE ROLE watcher LOGIN IN ROLE pg_monitor; GRANT USAGE ON SCHEMA tenant_scale TO app")
        .unwrap();
    let as_role = |role: &str, sql: &str| {
        let mut client = postgres::Client::connect(
            &primary.connstr().replace("user=postgres", &format!("user={role}")),
            postgres::NoTls,
        )
        .unwrap();
        client.simple_query(sql).map(|_| ()).map_err(|error| error.code().map(|code| code.code().to_string()))
    };
    assert_eq!(as_role("app", "SELECT * FROM tenant_scale.replica_lag"), Err(Some("42501".to_string())));
    assert_eq!(as_role("app", "SELECT * FROM tenant_scale.health()"), Err(Some("42501".to_string())));
    assert_eq!(
        as_role("app", "SELECT * FROM tenant_scale.health_replication()"),
        Err(Some("42501".to_string()))
    );
    assert_eq!(as_role("app", "SELECT * FROM tenant_scale.replica_status()"), Ok(()));
    assert_eq!(as_role("watcher", "SELECT * FROM tenant_scale.replica_lag"), Ok(()));
    assert_eq!(as_role("watcher", "SELECT * FROM tenant_scale.health()"), Ok(()));
}
