//! A throwaway PostgreSQL that a test can stop and start again (scripts/pg),
//! shared by tests/cluster and tests/verifier.rs through `#[path]`.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

/// A throwaway PostgreSQL that can be stopped and started again (scripts/pg).
pub struct Postgres {
    pub dir: PathBuf,
    pub url: String,
}

impl Postgres {
    pub fn start(parent: &Path) -> Postgres {
        let dir = parent.join("pg");
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/pg");
        let output = Command::new("bash")
            .args([script, "start"])
            .arg(&dir)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "scripts/pg start: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Postgres {
            url: String::from_utf8_lossy(&output.stdout).trim().to_owned(),
            dir,
        }
    }

    fn pg_ctl(&self, args: &[&str]) {
        let pg_ctl = which("pg_ctl");
        let data = self.dir.join("data");
        let mut command = if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(pg_ctl);
            c
        } else {
            Command::new(pg_ctl)
        };
        let status = command
            .arg("-D")
            .arg(&data)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "pg_ctl {args:?} failed");
    }

    /// Stops the server at once: the database is down.
    pub fn stop(&self) {
        self.pg_ctl(&["-m", "immediate", "-w", "stop"]);
    }

    /// Starts it again on the same socket and data.
    pub fn restart(&self) {
        let options = format!(
            "-c listen_addresses='' -c unix_socket_directories='{}' -c fsync=off -c max_connections=200",
            self.dir.display()
        );
        let log = self.dir.join("server.log");
        self.pg_ctl(&[
            "-l",
            &log.display().to_string(),
            "-w",
            "-t",
            "60",
            "-o",
            &options,
            "start",
        ]);
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/pg");
        let _ = Command::new("bash")
            .args([script, "stop"])
            .arg(&self.dir)
            .output();
    }
}

fn which(binary: &str) -> PathBuf {
    let output = Command::new("sh")
        .args([
            "-c",
            &format!("command -v {binary} || ls /usr/lib/postgresql/*/bin/{binary} | head -1"),
        ])
        .output()
        .unwrap();
    PathBuf::from(String::from_utf8_lossy(&output.stdout).trim())
}

/// Whether this process runs as root (initdb and pg_ctl refuse to).
fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0\n"))
        .unwrap_or(false)
}
