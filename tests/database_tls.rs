//! The key database over TLS (`sslmode=require` in the URL), as managed
//! PostgreSQL often demands (RDS forces it by default from PostgreSQL 15):
//! keyward's connections are encrypted, and the server sees them so.

#[allow(dead_code)]
#[path = "support/replication.rs"]
mod replication;

use std::process::Command;

use keyward::store::SqlStore;
use replication::Server;

/// A self-signed certificate and key the server can read (as the postgres
/// user when we are root); returns their paths.
fn certificate(dir: &std::path::Path) -> (String, String) {
    let (cert, key) = (dir.join("server.crt"), dir.join("server.key"));
    let made = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=127.0.0.1", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl makes the test certificate");
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let postgres_user = Command::new("id").args(["-u", "postgres"]).output().ok();
    let root = Command::new("id").arg("-u").output().unwrap().stdout == b"0\n";
    if let (true, Some(uid)) = (root, postgres_user) {
        let uid: u32 = String::from_utf8_lossy(&uid.stdout).trim().parse().unwrap();
        for file in [&cert, &key] {
            std::os::unix::fs::chown(file, Some(uid), None).unwrap();
        }
        let _ = Command::new("chmod").arg("o+x").arg(dir).status();
    }
    let _ = Command::new("chmod").arg("600").arg(&key).status();
    (cert.display().to_string(), key.display().to_string())
}

#[tokio::test]
async fn the_key_database_can_require_tls() {
    let test = "the_key_database_can_require_tls";
    if !replication::available(test) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = Server::primary(dir.path(), false);
    let (cert, key) = certificate(dir.path());
    server.sql(&format!("ALTER SYSTEM SET ssl_cert_file = '{cert}'"));
    server.sql(&format!("ALTER SYSTEM SET ssl_key_file = '{key}'"));
    server.sql("ALTER SYSTEM SET ssl = on");
    server.sql("SELECT pg_reload_conf()");
    server.wait_for("SHOW ssl", "on");

    let url = format!("{}?sslmode=require", server.url());
    let store = SqlStore::connect(&url).await.unwrap();
    store.migrate().await.unwrap();
    // The store's pool keeps its connections: the server sees them encrypted.
    let connections = |ssl: bool| {
        server.sql(&format!(
            "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE a.backend_type = 'client backend' AND a.pid <> pg_backend_pid() AND s.ssl = {ssl}"
        ))
    };
    assert_ne!(connections(true), "0", "the store's connections use TLS");
    assert_eq!(connections(false), "0", "and none goes without it");
    store.close().await;
}
