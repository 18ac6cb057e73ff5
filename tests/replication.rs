//! The streaming-replication test infrastructure (tests/support/replication.rs)
//! against real PostgreSQL: a standby replays its primary and refuses writes,
//! a promoted standby takes over a proxy's address, a standby cut off from an
//! asynchronous primary loses its last commit on failover, a synchronous commit
//! waits for the standby, and an apply delay holds the standby back. Each test
//! also checks that no PostgreSQL outlives it.

#[path = "support/replication.rs"]
mod replication;

use std::{
    fs,
    net::TcpStream,
    path::Path,
    process::{Child, Stdio},
    thread,
    time::{Duration, Instant},
};

use replication::{Server, TcpProxy, replay_lag, sql_at, wait_replayed};
use sqlx::{Connection, PgConnection};

/// Asserts that no process still runs with a path under `dir` on its command
/// line: the postmaster does (`postgres -D dir/...`) and its children end with
/// it, so this catches a server a test left behind.
fn no_postgres_left(dir: &Path) {
    let dir = dir.to_string_lossy().into_owned();
    let left: Vec<String> = fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|entry| fs::read(entry.path().join("cmdline")).ok())
        .map(|cmdline| String::from_utf8_lossy(&cmdline).replace('\0', " "))
        .filter(|cmdline| cmdline.contains(&dir))
        .collect();
    assert!(left.is_empty(), "processes left behind: {left:?}");
}

/// Asserts that nothing listens on `address` any more.
fn closed(address: &str) {
    assert!(
        TcpStream::connect(address).is_err(),
        "{address} still accepts connections"
    );
}

#[test]
fn a_standby_replays_the_primary_and_refuses_writes() {
    if !replication::available("a_standby_replays_the_primary_and_refuses_writes") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let primary = Server::primary(dir.path(), false);
    let standby = Server::standby_of(&primary.address(), dir.path());
    assert!(!primary.is_in_recovery());
    assert!(standby.is_in_recovery());

    primary.sql("CREATE TABLE t (v text); INSERT INTO t VALUES ('one')");
    wait_replayed(&primary, &standby);
    assert_eq!(replay_lag(&primary, &standby), 0);
    assert_eq!(standby.sql("SELECT v FROM t"), "one");
    // Over TCP too, at the URL the code under test would use.
    assert_eq!(sql_at(&standby.url(), "SELECT v FROM t").unwrap(), "one");

    let refused = standby.try_sql("INSERT INTO t VALUES ('two')").unwrap_err();
    assert!(refused.contains("read-only transaction"), "{refused}");
    assert_eq!(primary.sql("SELECT count(*) FROM t"), "1");

    let addresses = [primary.address(), standby.address()];
    drop(standby);
    drop(primary);
    addresses.iter().for_each(|a| closed(a));
    no_postgres_left(dir.path());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promoted_standby_takes_over_the_proxy_address() {
    if !replication::available("a_promoted_standby_takes_over_the_proxy_address") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let primary = Server::primary(dir.path(), false);
    let standby = Server::standby_of(&primary.address(), dir.path());
    let service = TcpProxy::start(&primary.address());

    let mut before = PgConnection::connect(&service.url()).await.unwrap();
    sqlx::query("CREATE TABLE t (v text)")
        .execute(&mut before)
        .await
        .unwrap();
    sqlx::query("INSERT INTO t VALUES ('before')")
        .execute(&mut before)
        .await
        .unwrap();
    wait_replayed(&primary, &standby);

    primary.kill();
    closed(&primary.address());
    // The Service address leads nowhere until it is retargeted.
    assert!(sqlx::query("SELECT 1").execute(&mut before).await.is_err());
    assert!(sql_at(&service.url(), "SELECT 1").is_err());

    standby.promote();
    service.retarget(&standby.address());
    let mut after = PgConnection::connect(&service.url()).await.unwrap();
    let in_recovery: bool = sqlx::query_scalar("SELECT pg_is_in_recovery()")
        .fetch_one(&mut after)
        .await
        .unwrap();
    assert!(!in_recovery);
    sqlx::query("INSERT INTO t VALUES ('after')")
        .execute(&mut after)
        .await
        .unwrap();
    let rows: Vec<String> = sqlx::query_scalar("SELECT v FROM t ORDER BY v")
        .fetch_all(&mut after)
        .await
        .unwrap();
    assert_eq!(rows, ["after", "before"]);

    drop(after);
    drop((service, standby, primary));
    no_postgres_left(dir.path());
}

#[test]
fn a_standby_cut_off_from_its_asynchronous_primary_loses_the_last_commit() {
    if !replication::available(
        "a_standby_cut_off_from_its_asynchronous_primary_loses_the_last_commit",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let primary = Server::primary(dir.path(), false);
    let link = TcpProxy::start(&primary.address());
    let standby = Server::standby_of(&link.address().to_string(), dir.path());
    primary.sql("CREATE TABLE t (v text); INSERT INTO t VALUES ('replicated')");
    wait_replayed(&primary, &standby);

    link.cut();
    // Asynchronous: the commit returns without the standby.
    primary.sql("INSERT INTO t VALUES ('lost')");
    assert_eq!(primary.sql("SELECT count(*) FROM t"), "2");
    // Streaming takes milliseconds; cut off, the standby does not get it.
    thread::sleep(Duration::from_millis(500));
    assert!(replay_lag(&primary, &standby) > 0);
    assert_eq!(standby.sql("SELECT v FROM t"), "replicated");

    primary.kill();
    standby.promote();
    assert_eq!(standby.sql("SELECT v FROM t"), "replicated");
    standby.sql("INSERT INTO t VALUES ('after')");
    assert_eq!(standby.sql("SELECT count(*) FROM t"), "2");

    drop((link, standby, primary));
    no_postgres_left(dir.path());
}

/// Kills the child when the test ends early, so that a failed assertion
/// leaves no psql waiting.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_synchronous_commit_waits_for_the_standby() {
    if !replication::available("a_synchronous_commit_waits_for_the_standby") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let primary = Server::primary(dir.path(), true);
    let link = TcpProxy::start(&primary.address());
    let standby = Server::standby_of(&link.address().to_string(), dir.path());
    primary.wait_for("SELECT sync_state FROM pg_stat_replication", "sync");
    primary.sql("CREATE TABLE t (v text)");

    link.cut();
    let mut waiting = Reaped(
        primary
            .sql_command("INSERT INTO t VALUES ('waits')")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    thread::sleep(Duration::from_secs(1));
    assert!(
        waiting.0.try_wait().unwrap().is_none(),
        "the commit returned without the standby"
    );
    // Committed locally but not visible until the standby confirms it.
    assert_eq!(primary.sql("SELECT count(*) FROM t"), "0");

    link.resume();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = waiting.0.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the commit still waits");
        thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success());
    assert_eq!(primary.sql("SELECT count(*) FROM t"), "1");
    wait_replayed(&primary, &standby);
    assert_eq!(standby.sql("SELECT v FROM t"), "waits");

    drop((waiting, link, standby, primary));
    no_postgres_left(dir.path());
}

#[test]
fn an_apply_delay_holds_the_standby_back() {
    if !replication::available("an_apply_delay_holds_the_standby_back") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let primary = Server::primary(dir.path(), false);
    let standby = Server::standby_of(&primary.address(), dir.path());
    primary.sql("CREATE TABLE t (v text)");
    wait_replayed(&primary, &standby);

    let delay = Duration::from_secs(2);
    standby.set_apply_delay(delay);
    let written = Instant::now();
    primary.sql("INSERT INTO t VALUES ('late')");
    thread::sleep(Duration::from_millis(500));
    assert_eq!(standby.sql("SELECT count(*) FROM t"), "0");
    wait_replayed(&primary, &standby);
    assert!(
        written.elapsed() >= delay,
        "applied after {:?}",
        written.elapsed()
    );
    assert_eq!(standby.sql("SELECT v FROM t"), "late");

    drop((standby, primary));
    no_postgres_left(dir.path());
}
