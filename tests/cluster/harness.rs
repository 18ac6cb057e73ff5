//! A throwaway API server for end-to-end tests, envtest style: etcd and
//! kube-apiserver from `$KUBEBUILDER_ASSETS` (default /usr/local/kubebuilder/bin)
//! on loopback, or an existing cluster from `KEYWARD_E2E_KUBECONFIG`. When
//! neither is there, `Cluster::start` prints a SKIP line and returns `None`.
//! Everything started here is killed on drop, panics included.

use std::{
    fs,
    io::Write,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

#[path = "../support/postgres.rs"]
mod postgres;
pub use postgres::Postgres;

pub const OPERATOR: &str = env!("CARGO_BIN_EXE_keyward");
pub const PLUGIN: &str = env!("CARGO_BIN_EXE_kubectl-keyward");
/// The user name of the operator's ServiceAccount in config/.
pub const SERVICE_ACCOUNT: &str = "system:serviceaccount:keyward-system:keyward";
const SERVICE_ACCOUNT_TOKEN: &str = "operator-sa-token";

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `check` every 200 ms until it returns `Some`, or panics after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A child process killed (SIGKILL) when dropped.
pub struct Guard(pub Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A running API server (or an existing cluster) and a kubeconfig for it.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub kubeconfig: PathBuf,
    _processes: Vec<Guard>,
}

impl Cluster {
    /// Starts etcd and kube-apiserver, or returns `None` after a loud SKIP.
    pub fn start(test: &str) -> Option<Cluster> {
        let dir = tempfile::tempdir().unwrap();
        if let Ok(kubeconfig) = std::env::var("KEYWARD_E2E_KUBECONFIG") {
            return Some(Cluster {
                dir,
                kubeconfig: kubeconfig.into(),
                _processes: Vec::new(),
            });
        }
        let assets = PathBuf::from(
            std::env::var("KUBEBUILDER_ASSETS")
                .unwrap_or_else(|_| "/usr/local/kubebuilder/bin".into()),
        );
        if !assets.join("etcd").exists() || !assets.join("kube-apiserver").exists() {
            eprintln!(
                "SKIP: {test}: no kube-apiserver/etcd in {} (set KUBEBUILDER_ASSETS, or KEYWARD_E2E_KUBECONFIG for an existing cluster)",
                assets.display()
            );
            return None;
        }
        let root = dir.path();
        let (client_port, peer_port, api_port) = (free_port(), free_port(), free_port());
        let log = |name: &str| fs::File::create(root.join(name)).unwrap();
        let etcd = Command::new(assets.join("etcd"))
            .args(["--name", "e2e", "--data-dir"])
            .arg(root.join("etcd"))
            .arg(format!(
                "--listen-client-urls=http://127.0.0.1:{client_port}"
            ))
            .arg(format!(
                "--advertise-client-urls=http://127.0.0.1:{client_port}"
            ))
            .arg(format!("--listen-peer-urls=http://127.0.0.1:{peer_port}"))
            .arg(format!(
                "--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}"
            ))
            .arg(format!(
                "--initial-cluster=e2e=http://127.0.0.1:{peer_port}"
            ))
            .stdout(Stdio::null())
            .stderr(log("etcd.log"))
            .spawn()
            .unwrap();
        let etcd = Guard(etcd);
        // The second user is the operator's ServiceAccount as config/ binds it,
        // so a test can run the operator with exactly those permissions.
        fs::write(
            root.join("tokens.csv"),
            format!(
                "e2e-token,admin,admin,system:masters\n{SERVICE_ACCOUNT_TOKEN},{SERVICE_ACCOUNT},keyward-sa,\"system:serviceaccounts,system:serviceaccounts:keyward-system,system:authenticated\"\n"
            ),
        )
        .unwrap();
        let key = root.join("sa.key");
        let openssl = Command::new("openssl")
            .args(["genrsa", "-out"])
            .arg(&key)
            .arg("2048")
            .stderr(Stdio::null())
            .status()
            .expect("openssl is needed to make a service account key");
        assert!(openssl.success());
        let apiserver = Command::new(assets.join("kube-apiserver"))
            .arg(format!("--etcd-servers=http://127.0.0.1:{client_port}"))
            .arg(format!("--secure-port={api_port}"))
            .arg("--bind-address=127.0.0.1")
            .arg(format!("--cert-dir={}", root.join("certs").display()))
            .arg(format!(
                "--token-auth-file={}",
                root.join("tokens.csv").display()
            ))
            .arg("--authorization-mode=RBAC")
            .arg("--service-account-issuer=https://kubernetes.default.svc")
            .arg(format!("--service-account-key-file={}", key.display()))
            .arg(format!(
                "--service-account-signing-key-file={}",
                key.display()
            ))
            .arg("--service-cluster-ip-range=10.0.0.0/24")
            .arg("--endpoint-reconciler-type=none")
            .arg("--allow-privileged=true")
            .arg("--disable-admission-plugins=ServiceAccount")
            // ValidatingAdmissionPolicy (tests/cluster/admission.rs) is beta and
            // off by default in the 1.28 and 1.29 API servers. It is GA from 1.30
            // on, where the gate and v1beta1 go away in later releases: drop these
            // two flags for such assets.
            .arg("--feature-gates=ValidatingAdmissionPolicy=true")
            .arg("--runtime-config=admissionregistration.k8s.io/v1beta1=true")
            .stdout(Stdio::null())
            .stderr(log("apiserver.log"))
            .spawn()
            .unwrap();
        let apiserver = Guard(apiserver);
        let kubeconfig = root.join("kubeconfig");
        let write_kubeconfig = |path: &Path, token: &str| {
            fs::write(
                path,
                format!(
                    "apiVersion: v1\nkind: Config\nclusters:\n- name: e2e\n  cluster: {{server: \"https://127.0.0.1:{api_port}\", insecure-skip-tls-verify: true}}\nusers:\n- name: user\n  user: {{token: {token}}}\ncontexts:\n- name: e2e\n  context: {{cluster: e2e, user: user, namespace: default}}\ncurrent-context: e2e\n"
                ),
            )
            .unwrap();
        };
        write_kubeconfig(&kubeconfig, "e2e-token");
        write_kubeconfig(&root.join("kubeconfig-operator"), SERVICE_ACCOUNT_TOKEN);
        let cluster = Cluster {
            dir,
            kubeconfig,
            _processes: vec![apiserver, etcd],
        };
        wait_for(
            "the API server to be ready",
            Duration::from_secs(90),
            || cluster.try_kubectl(&["get", "--raw", "/readyz"]).ok(),
        );
        // The default namespace and service account machinery are not needed;
        // wait until namespaces can be listed (the bootstrap is done).
        wait_for("namespace default", Duration::from_secs(30), || {
            cluster.try_kubectl(&["get", "namespace", "default"]).ok()
        });
        Some(cluster)
    }

    /// Runs kubectl; `Err(stderr)` on failure.
    pub fn try_kubectl(&self, args: &[&str]) -> Result<String, String> {
        self.try_kubectl_with_input(args, None)
    }

    /// Runs kubectl with `input` on stdin.
    pub fn try_kubectl_with_input(
        &self,
        args: &[&str],
        input: Option<&str>,
    ) -> Result<String, String> {
        let mut child = Command::new("kubectl")
            .args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        if let Some(input) = input {
            child
                .stdin
                .take()
                .unwrap()
                .write_all(input.as_bytes())
                .unwrap();
        }
        drop(child.stdin.take());
        let output = child.wait_with_output().unwrap();
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&output.stderr).into_owned())
        }
    }

    /// Runs kubectl and panics with its stderr on failure.
    pub fn kubectl(&self, args: &[&str]) -> String {
        self.try_kubectl(args)
            .unwrap_or_else(|e| panic!("kubectl {args:?} failed: {e}"))
    }

    /// `kubectl apply -f -` of a manifest.
    pub fn apply(&self, manifest: &str) -> String {
        self.try_kubectl_with_input(&["apply", "-f", "-"], Some(manifest))
            .unwrap_or_else(|e| panic!("kubectl apply failed: {e}\n{manifest}"))
    }

    /// A JSONPath field of an object; empty when the object or field is missing.
    pub fn field(&self, kind_name: &str, namespace: &str, path: &str) -> String {
        self.try_kubectl(&[
            "get",
            kind_name,
            "-n",
            namespace,
            "-o",
            &format!("jsonpath={path}"),
        ])
        .unwrap_or_default()
    }

    /// The plaintext key in a Secret, if it has one.
    pub fn secret_key(&self, namespace: &str, name: &str) -> Option<String> {
        let encoded = self.field(&format!("secret/{name}"), namespace, "{.data.api-key}");
        if encoded.is_empty() {
            return None;
        }
        let output = Command::new("base64")
            .arg("-d")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                c.stdin.take().unwrap().write_all(encoded.as_bytes())?;
                c.wait_with_output()
            });
        output
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
    }

    /// Starts `keyward run` against this cluster with its log in the temp dir.
    pub fn operator(&self, database_url: &str, extra: &[&str], rust_log: &str) -> Operator {
        self.operator_as(&self.kubeconfig, database_url, extra, rust_log)
    }

    /// A kubeconfig that authenticates as the operator's ServiceAccount (only
    /// with the API server started here).
    pub fn service_account_kubeconfig(&self) -> PathBuf {
        self.dir.path().join("kubeconfig-operator")
    }

    /// A kubeconfig that authenticates as the harness's admin and impersonates
    /// `user` (only with the API server started here), so the API server
    /// authorizes every request as that user, with RBAC.
    pub fn impersonating(&self, user: &str) -> PathBuf {
        let admin = fs::read_to_string(&self.kubeconfig).unwrap();
        let path = self
            .dir
            .path()
            .join(format!("kubeconfig-as-{}", user.replace(':', "-")));
        fs::write(
            &path,
            admin.replace(
                "user: {token: e2e-token}",
                &format!("user: {{token: e2e-token, as: \"{user}\"}}"),
            ),
        )
        .unwrap();
        path
    }

    /// Starts `keyward run` with the given kubeconfig.
    pub fn operator_as(
        &self,
        kubeconfig: &Path,
        database_url: &str,
        extra: &[&str],
        rust_log: &str,
    ) -> Operator {
        static STARTS: AtomicUsize = AtomicUsize::new(0);
        let n = STARTS.fetch_add(1, Ordering::SeqCst);
        let log = self.dir.path().join(format!("operator-{n}.log"));
        let child = Command::new(OPERATOR)
            .args(["run", "--database-url", database_url])
            .args(extra)
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", rust_log)
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Operator {
            process: Guard(child),
            log,
        }
    }

    /// Runs the kubectl plugin; returns (success, stdout, stderr).
    pub fn plugin(&self, args: &[&str]) -> (bool, String, String) {
        let output = Command::new(PLUGIN)
            .args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .output()
            .unwrap();
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }
}

/// A running operator process.
pub struct Operator {
    pub process: Guard,
    pub log: PathBuf,
}

impl Operator {
    /// SIGKILL, as a crash would.
    pub fn kill(mut self) -> PathBuf {
        let _ = self.process.0.kill();
        let _ = self.process.0.wait();
        self.log.clone()
    }

    /// SIGTERM, then wait for a clean exit.
    pub fn stop(mut self) -> (Option<i32>, PathBuf) {
        let pid = self.process.0.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(20);
        let code = loop {
            if let Ok(Some(status)) = self.process.0.try_wait() {
                break status.code();
            }
            if Instant::now() > deadline {
                break None;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        (code, self.log.clone())
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Reads the key database once, through the `KeyStore` the operator uses.
fn read_store<T>(
    database_url: &str,
    read: impl AsyncFnOnce(&keyward::store::SqlStore) -> keyward::Result<T>,
) -> T {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let store = keyward::store::SqlStore::connect(database_url)
            .await
            .unwrap();
        let value = read(&store).await.unwrap();
        store.close().await;
        value
    })
}

/// The key records of the ApiKey with this uid, read from the key database.
pub fn key_set(database_url: &str, uid: &str) -> keyward::store::KeySet {
    use keyward::store::KeyStore;
    read_store(database_url, async |store| store.load(uid).await)
}

/// How many ApiKeys of `namespace` hold a live key, read from the key database.
pub fn holders(database_url: &str, namespace: &str) -> usize {
    use keyward::store::KeyStore;
    read_store(database_url, async |store| store.holders(namespace).await).len()
}

/// `keyward verify`: (exit code, stdout).
pub fn verify(database_url: &str, key: &str) -> (i32, String) {
    let mut child = Command::new(OPERATOR)
        .args(["verify", "--database-url", database_url])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(key.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).trim().to_owned(),
    )
}
