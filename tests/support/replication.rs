//! Real PostgreSQL streaming replication on loopback for failover tests: a
//! primary ([`Server::primary`]), hot standbys cloned from it with
//! `pg_basebackup -R` ([`Server::standby_of`]), promotion, killing a server,
//! replication lag, and a [`TcpProxy`] that stands in for a Service address or
//! cuts a standby off from its primary.
//!
//! Everything here is std only and blocks, so it works from plain `#[test]`s
//! and from inside any tokio runtime alike. The PostgreSQL server binaries run
//! as the `postgres` user through `runuser` when the tests run as root, since
//! initdb and postgres refuse to run as root. SQL runs through `psql`, which
//! keeps this module free of the database driver under test.

use std::{
    collections::HashMap,
    fs::{self, OpenOptions},
    io::Write,
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicUsize, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

/// How long a server gets to start, promote or catch up before a test fails.
const PATIENCE: Duration = Duration::from_secs(30);

/// Whether the PostgreSQL binaries this module needs are here (and, as root,
/// the `postgres` user to run them as). Prints a SKIP line for `test` when not;
/// under CI (`CI=true`) it panics instead, so that CI never skips silently.
pub fn available(test: &str) -> bool {
    let missing = match tools() {
        Err(why) => why.clone(),
        Ok(_) => return true,
    };
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test}: PostgreSQL is required in CI: {missing}");
    }
    eprintln!("SKIP: {test}: {missing}");
    false
}

/// Where the binaries are and who runs them, found once per test process.
struct Tools {
    bindir: PathBuf,
    /// The `postgres` user's uid and gid when this process is root.
    owner: Option<(u32, u32)>,
}

fn tools() -> &'static Result<Tools, String> {
    static TOOLS: OnceLock<Result<Tools, String>> = OnceLock::new();
    TOOLS.get_or_init(|| {
        let bindir = bindir().ok_or(
            "no PostgreSQL server binaries (pg_config --bindir, /usr/lib/postgresql/*/bin, PATH)",
        )?;
        let owner = if id(&["-u"]).as_deref() == Some("0") {
            let uid = id(&["-u", "postgres"]).and_then(|s| s.parse().ok());
            let gid = id(&["-g", "postgres"]).and_then(|s| s.parse().ok());
            match (uid, gid) {
                (Some(uid), Some(gid)) => Some((uid, gid)),
                _ => {
                    return Err(
                        "running as root but there is no `postgres` user to run PostgreSQL as"
                            .into(),
                    );
                }
            }
        } else {
            None
        };
        Ok(Tools { bindir, owner })
    })
}

/// The directory holding every binary used here: `pg_basebackup` and `psql`
/// are often only in the versioned bindir, not on PATH.
fn bindir() -> Option<PathBuf> {
    let complete = |dir: &Path| {
        ["initdb", "pg_ctl", "postgres", "pg_basebackup", "psql"]
            .iter()
            .all(|binary| dir.join(binary).is_file())
    };
    let from_pg_config = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    let mut versioned: Vec<PathBuf> = fs::read_dir("/usr/lib/postgresql")
        .map(|entries| entries.flatten().map(|e| e.path().join("bin")).collect())
        .unwrap_or_default();
    versioned.sort(); // newest last
    let on_path = Command::new("sh")
        .args(["-c", "command -v initdb"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| {
            fs::canonicalize(String::from_utf8_lossy(&o.stdout).trim())
                .ok()?
                .parent()
                .map(Path::to_path_buf)
        });
    from_pg_config
        .into_iter()
        .chain(versioned.into_iter().rev())
        .chain(on_path)
        .find(|dir| complete(dir))
}

fn id(args: &[&str]) -> Option<String> {
    let output = Command::new("id").args(args).output().ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

pub fn tool(binary: &str) -> PathBuf {
    match tools() {
        Ok(tools) => tools.bindir.join(binary),
        Err(why) => panic!("{why} (call replication::available first)"),
    }
}

/// A PostgreSQL server binary, as the `postgres` user when we are root, run
/// from `dir` (the postgres user may not be able to enter our working directory).
fn as_postgres(binary: &str, dir: &Path) -> Command {
    let path = tool(binary);
    let mut command = match tools() {
        Ok(Tools { owner: Some(_), .. }) => {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        }
        _ => Command::new(path),
    };
    command.current_dir(dir).stdin(Stdio::null());
    command
}

/// A port on 127.0.0.1 that was free a moment ago; the server start retries
/// with another if someone takes it in between.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs `sql` with psql against `target`, a connection string or a URL such
/// as a proxy's (what a client of a Service address would see): unaligned,
/// tuples only, stopping at the first error. Ok is the trimmed output, Err the
/// error text.
pub fn sql_at(target: &str, sql: &str) -> Result<String, String> {
    let output = Command::new(tool("psql"))
        .args([
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            target,
            "-c",
            sql,
        ])
        .env("PGCONNECT_TIMEOUT", "5")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).trim().to_owned())
    }
}

/// The sqlx-style URL of the `postgres` database behind `address` (host:port).
pub fn url(address: &str) -> String {
    format!("postgres://postgres@{address}/postgres")
}

/// Polls `check` until it returns true, panicking with `what` after [`PATIENCE`].
fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        thread::sleep(Duration::from_millis(50));
    }
}

/// One PostgreSQL instance with its own data directory, listening on a free
/// TCP port on 127.0.0.1 and on a unix socket in its directory. Dropping it
/// stops the server at once and removes its directory.
pub struct Server {
    /// Owned by the postgres user: `data/`, the socket and `server.log`.
    dir: PathBuf,
    port: u16,
}

impl Server {
    /// A new primary in a directory under `parent` (typically a
    /// `tempfile::tempdir()`), ready for standbys to stream from it. With
    /// `synchronous`, every commit waits until any standby has flushed it
    /// (`synchronous_standby_names = '*'`), so it blocks while none is connected.
    pub fn primary(parent: &Path, synchronous: bool) -> Server {
        let dir = Self::make_dir(parent, "primary");
        let data = dir.join("data");
        let output = as_postgres("initdb", &dir)
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-locale",
                "--no-sync",
            ])
            .output()
            .unwrap();
        assert!(output.status.success(), "initdb: {}", stderr(&output));
        // Trust for everything on loopback, replication included: pg_basebackup
        // and the standbys connect over TCP, possibly through a TcpProxy.
        fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\n\
             local replication all trust\n\
             host all all 127.0.0.1/32 trust\n\
             host replication all 127.0.0.1/32 trust\n",
        )
        .unwrap();
        // Standbys inherit this file through pg_basebackup, so it holds what
        // every member needs; each appends its own port and socket after it.
        append(
            &data.join("postgresql.conf"),
            &format!(
                "wal_level = replica\n\
                 max_wal_senders = 10\n\
                 wal_keep_size = '64MB'\n\
                 hot_standby = on\n\
                 fsync = off\n\
                 max_connections = 200\n\
                 shared_buffers = '16MB'\n\
                 listen_addresses = '127.0.0.1'\n\
                 # reconnect to the primary soon after a TcpProxy cut is resumed\n\
                 wal_retrieve_retry_interval = '100ms'\n\
                 synchronous_standby_names = '{}'\n\
                 synchronous_commit = on\n",
                if synchronous { "*" } else { "" }
            ),
        );
        Self::start_in(dir)
    }

    /// A hot standby cloned with `pg_basebackup -R` from the primary at
    /// `primary_address` (host:port: the primary's [`Server::address`], or a
    /// [`TcpProxy`] in front of it so that the test can cut the link), started on
    /// its own port and streaming. It never requires synchronous standbys of its
    /// own, so that it is writable at once when promoted.
    pub fn standby_of(primary_address: &str, parent: &Path) -> Server {
        let (host, port) = primary_address
            .rsplit_once(':')
            .unwrap_or_else(|| panic!("{primary_address}: expected host:port"));
        let dir = Self::make_dir(parent, "standby");
        let data = dir.join("data");
        let output = as_postgres("pg_basebackup", &dir)
            .args(["-R", "-X", "stream", "-c", "fast", "--no-sync"])
            .args(["-h", host, "-p", port, "-U", "postgres", "-D"])
            .arg(&data)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "pg_basebackup: {}",
            stderr(&output)
        );
        // The walreceiver reports cluster_name as its application_name, which
        // names this standby in the primary's pg_stat_replication.
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        append(
            &data.join("postgresql.conf"),
            &format!("cluster_name = '{name}'\nsynchronous_standby_names = ''\n"),
        );
        let standby = Self::start_in(dir);
        assert!(standby.is_in_recovery(), "the standby is not in recovery");
        standby.wait_for("SELECT status FROM pg_stat_wal_receiver", "streaming");
        standby
    }

    /// `parent/<role>-<n>`, enterable and owned by the user PostgreSQL runs as.
    fn make_dir(parent: &Path, role: &str) -> PathBuf {
        static NEXT: AtomicUsize = AtomicUsize::new(1);
        let dir = parent.join(format!("{role}-{}", NEXT.fetch_add(1, Ordering::Relaxed)));
        fs::create_dir(&dir).unwrap();
        if let Ok(Tools {
            owner: Some((uid, gid)),
            ..
        }) = tools()
        {
            std::os::unix::fs::chown(&dir, Some(*uid), Some(*gid)).unwrap();
            // tempfile makes 0700 directories the postgres user cannot enter.
            let mut mode = fs::metadata(parent).unwrap().permissions();
            mode.set_mode(mode.mode() | 0o001);
            fs::set_permissions(parent, mode).unwrap();
        }
        dir
    }

    /// Starts the server in `dir` on a free port, trying another port when the
    /// chosen one was taken in the meantime.
    fn start_in(dir: PathBuf) -> Server {
        let mut server = Server { dir, port: 0 };
        for _ in 0..5 {
            server.port = free_port();
            // The last setting in the file wins, so a retry simply appends again.
            append(
                &server.dir.join("data/postgresql.conf"),
                &format!(
                    "port = {}\nunix_socket_directories = '{}'\n",
                    server.port,
                    server.dir.display()
                ),
            );
            if server.start() {
                return server;
            }
            if !server.log().contains("could not bind") {
                break;
            }
        }
        panic!("PostgreSQL did not start:\n{}", server.log());
    }

    /// Starts the server again (after [`Server::kill`]) on the same port and
    /// data, waiting until it accepts connections; false when it did not start.
    pub fn start(&self) -> bool {
        as_postgres("pg_ctl", &self.dir)
            .arg("-D")
            .arg(self.dir.join("data"))
            .arg("-l")
            .arg(self.dir.join("server.log"))
            .args(["-w", "-t", "60", "start"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap()
            .success()
    }

    /// Stops the server at once (`pg_ctl -m immediate`), as a crash or a killed
    /// pod would: whatever the standbys did not receive yet is gone with it.
    pub fn kill(&self) {
        let output = self.pg_ctl(&["-m", "immediate", "-w", "stop"]);
        assert!(output.status.success(), "pg_ctl stop: {}", stderr(&output));
    }

    /// Promotes this standby and waits until it takes writes.
    pub fn promote(&self) {
        let output = self.pg_ctl(&["-w", "-t", "60", "promote"]);
        assert!(
            output.status.success(),
            "pg_ctl promote: {}",
            stderr(&output)
        );
        eventually("the promoted standby leaves recovery", || {
            !self.is_in_recovery()
        });
    }

    fn pg_ctl(&self, args: &[&str]) -> Output {
        as_postgres("pg_ctl", &self.dir)
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(args)
            .output()
            .unwrap()
    }

    /// Whether the server is a standby still replaying its primary's WAL.
    pub fn is_in_recovery(&self) -> bool {
        self.sql("SELECT pg_is_in_recovery()") == "t"
    }

    /// host:port of the server on loopback, for [`Server::standby_of`] and
    /// [`TcpProxy`] targets.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The sqlx-style URL of its `postgres` database over TCP.
    pub fn url(&self) -> String {
        url(&self.address())
    }

    /// Runs `sql` over the unix socket; Err carries the error text, e.g. that a
    /// standby refuses writes.
    pub fn try_sql(&self, sql: &str) -> Result<String, String> {
        let target = format!(
            "host={} port={} user=postgres dbname=postgres",
            self.dir.display(),
            self.port
        );
        sql_at(&target, sql)
    }

    /// Runs `sql` and returns its output (one line per row, columns split by
    /// `|`), panicking when it fails.
    pub fn sql(&self, sql: &str) -> String {
        self.try_sql(sql)
            .unwrap_or_else(|e| panic!("{sql}: {e}\nserver log:\n{}", self.log()))
    }

    /// A psql running `sql` against this server, not started yet: for a
    /// statement that is expected to block, e.g. a synchronous commit while
    /// the standby is cut off.
    pub fn sql_command(&self, sql: &str) -> Command {
        let mut command = Command::new(tool("psql"));
        command
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .args([
                "-h",
                &self.dir.display().to_string(),
                "-p",
                &self.port.to_string(),
            ])
            .args(["-U", "postgres", "-d", "postgres", "-c", sql])
            .stdin(Stdio::null());
        command
    }

    /// Polls `sql` until its output is `expected`, panicking after a while.
    pub fn wait_for(&self, sql: &str, expected: &str) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let last = match self.try_sql(sql) {
                Ok(out) if out == expected => return,
                other => other,
            };
            if Instant::now() > deadline {
                panic!(
                    "{sql}: expected {expected:?}, last got {last:?}\nserver log:\n{}",
                    self.log()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// This standby's `recovery_min_apply_delay`: it receives WAL as before but
    /// applies each commit only after `delay`, so reads on it lag the primary.
    pub fn set_apply_delay(&self, delay: Duration) {
        let ms = delay.as_millis();
        self.sql(&format!(
            "ALTER SYSTEM SET recovery_min_apply_delay = '{ms}ms'"
        ));
        self.sql("SELECT pg_reload_conf()");
        // A new session sees the setting once the postmaster has reloaded, and
        // by then it has signalled the startup process that applies the WAL.
        self.wait_for(
            "SELECT setting FROM pg_settings WHERE name = 'recovery_min_apply_delay'",
            &ms.to_string(),
        );
    }

    /// The server's log so far, for failure messages.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Fails harmlessly when the server was killed already.
        let _ = self.pg_ctl(&["-m", "immediate", "-w", "stop"]);
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Waits until `standby` has replayed everything `primary` has written so far
/// (its `pg_last_wal_replay_lsn()` reaches the primary's `pg_current_wal_lsn()`).
pub fn wait_replayed(primary: &Server, standby: &Server) {
    let lsn = primary.sql("SELECT pg_current_wal_lsn()");
    standby.wait_for(
        &format!("SELECT pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn"),
        "t",
    );
}

/// How many bytes of the primary's WAL `standby` has not replayed yet.
pub fn replay_lag(primary: &Server, standby: &Server) -> u64 {
    let lsn = primary.sql("SELECT pg_current_wal_lsn()");
    standby
        .sql(&format!(
            "SELECT greatest(pg_wal_lsn_diff('{lsn}'::pg_lsn, pg_last_wal_replay_lsn()), 0)::bigint"
        ))
        .parse()
        .unwrap()
}

fn append(file: &Path, text: &str) {
    OpenOptions::new()
        .append(true)
        .open(file)
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A TCP forwarder on a free 127.0.0.1 port, on its own threads so that it
/// works whatever runtime the test uses (or none). In front of a primary it is
/// the Service address clients keep using across a failover ([`retarget`]);
/// between a standby and its primary it is the network that can partition
/// them ([`cut`]). Dropping it closes every connection.
///
/// [`retarget`]: TcpProxy::retarget
/// [`cut`]: TcpProxy::cut
pub struct TcpProxy {
    address: SocketAddr,
    shared: Arc<Mutex<Links>>,
    acceptor: Option<thread::JoinHandle<()>>,
}

/// The proxy's state, shared by its threads.
struct Links {
    target: String,
    cut: bool,
    stopped: bool,
    next: u64,
    /// Both sockets of every open connection, to shut them from `cut`.
    open: HashMap<u64, [TcpStream; 2]>,
}

impl Links {
    fn close_all(&mut self) {
        for (_, sockets) in self.open.drain() {
            for socket in sockets {
                let _ = socket.shutdown(Shutdown::Both);
            }
        }
    }
}

impl TcpProxy {
    /// Starts forwarding new connections to `target` (host:port).
    pub fn start(target: &str) -> TcpProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        let shared = Arc::new(Mutex::new(Links {
            target: target.to_owned(),
            cut: false,
            stopped: false,
            next: 0,
            open: HashMap::new(),
        }));
        let links = Arc::clone(&shared);
        let acceptor = thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let target = {
                    let links = links.lock().unwrap();
                    if links.stopped {
                        return;
                    }
                    if links.cut {
                        continue; // dropping `client` closes it
                    }
                    links.target.clone()
                };
                let links = Arc::clone(&links);
                thread::spawn(move || forward(client, &target, &links));
            }
        });
        TcpProxy {
            address,
            shared,
            acceptor: Some(acceptor),
        }
    }

    /// Where clients connect.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// The sqlx-style URL of the `postgres` database behind the proxy.
    pub fn url(&self) -> String {
        url(&self.address.to_string())
    }

    /// Sends new connections to `target` from now on, as a Service does when
    /// its endpoint changes; open connections stay where they are.
    pub fn retarget(&self, target: &str) {
        self.shared.lock().unwrap().target = target.to_owned();
    }

    /// Closes every open connection and closes new ones on accept until
    /// [`TcpProxy::resume`]. Once it returns, nothing the target sends reaches
    /// the clients any more.
    pub fn cut(&self) {
        let mut links = self.shared.lock().unwrap();
        links.cut = true;
        links.close_all();
    }

    /// Forwards new connections again after [`TcpProxy::cut`].
    pub fn resume(&self) {
        self.shared.lock().unwrap().cut = false;
    }
}

/// Connects `client` to `target` and copies both ways until either side
/// closes or the proxy cuts them.
fn forward(client: TcpStream, target: &str, links: &Mutex<Links>) {
    let Ok(server) = TcpStream::connect(target) else {
        return; // the target is down: the client sees its connection closed
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let id = {
        let mut links = links.lock().unwrap();
        if links.cut || links.stopped {
            return;
        }
        let id = links.next;
        links.next += 1;
        let sockets = [client.try_clone().unwrap(), server.try_clone().unwrap()];
        links.open.insert(id, sockets);
        id
    };
    let (client_in, server_in) = (client.try_clone().unwrap(), server.try_clone().unwrap());
    let upstream = thread::spawn(move || pump(client_in, server_in));
    pump(server, client);
    let _ = upstream.join();
    links.lock().unwrap().open.remove(&id);
}

/// Copies `from` to `to`; when either side ends, shuts both so that the other
/// direction ends too (PostgreSQL does not use half-closed connections).
fn pump(mut from: TcpStream, mut to: TcpStream) {
    let _ = std::io::copy(&mut from, &mut to);
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        {
            let mut links = self.shared.lock().unwrap();
            links.stopped = true;
            links.close_all();
        }
        // Wakes the acceptor so that it sees `stopped` and ends.
        let _ = TcpStream::connect(self.address);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}
