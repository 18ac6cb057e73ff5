//! `keyward selftest`: the chart's `helm test`. It checks, from inside the
//! cluster, what an installation must do: the operator and the verifier
//! answer, a throwaway ApiKey is issued into its Secret, its key verifies, and
//! once the ApiKey is deleted the key is refused. It prints what it checked,
//! never the key, and removes the ApiKey whatever happens.

use std::time::Duration;

use clap::Args;
use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api, Client,
    api::{DeleteParams, PostParams},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use zeroize::Zeroizing;

use crate::{
    Error, Result,
    crd::{ApiKey, ApiKeySpec, SECRET_DATA_KEY},
    key::wipe_secret,
};

/// The throwaway ApiKey's name; the chart's test Role may read only its Secret.
pub const SELFTEST_KEY: &str = "keyward-selftest";
/// The scope the throwaway key carries and the check asks for.
const SELFTEST_SCOPE: &str = "keyward-selftest";
/// How often a wait looks again.
const POLL: Duration = Duration::from_millis(500);

/// Options of `keyward selftest`.
#[derive(Debug, Args)]
pub struct SelftestArgs {
    /// The operator's HTTP endpoints (its /readyz), e.g. `http://keyward-metrics:8080`.
    #[arg(long)]
    pub operator_url: String,
    /// The verifier, e.g. `http://keyward-verifier:9000`; without it, the key
    /// is checked in the ApiKey's status only.
    #[arg(long)]
    pub verifier_url: Option<String>,
    /// Where the throwaway ApiKey goes; default: the pod's namespace.
    #[arg(long)]
    pub namespace: Option<String>,
    /// How long each step may take.
    #[arg(long, default_value_t = 120)]
    pub timeout_seconds: u64,
}

/// Runs every check; the first failure ends it, after removing the ApiKey.
pub async fn run(args: SelftestArgs) -> Result<()> {
    let client = Client::try_default().await?;
    let namespace = args
        .namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_owned());
    let timeout = Duration::from_secs(args.timeout_seconds);
    let operator = Endpoint::parse(&args.operator_url)?;
    let verifier = args
        .verifier_url
        .as_deref()
        .map(Endpoint::parse)
        .transpose()?;
    wait(timeout, "the operator's /readyz to answer 200", || async {
        Ok(operator.get("/readyz", None).await? == 200)
    })
    .await?;
    println!("ok: the operator is ready");
    if let Some(verifier) = &verifier {
        wait(timeout, "the verifier's /readyz to answer 200", || async {
            Ok(verifier.get("/readyz", None).await? == 200)
        })
        .await?;
        println!("ok: the verifier is ready");
    }
    let api: Api<ApiKey> = Api::namespaced(client.clone(), &namespace);
    remove(&api, timeout).await?;
    let outcome = issue_and_revoke(&api, &client, &namespace, verifier.as_ref(), timeout).await;
    let cleanup = remove(&api, timeout).await;
    outcome.and(cleanup)
}

async fn issue_and_revoke(
    api: &Api<ApiKey>,
    client: &Client,
    namespace: &str,
    verifier: Option<&Endpoint>,
    timeout: Duration,
) -> Result<()> {
    let mut key = ApiKey::new(
        SELFTEST_KEY,
        ApiKeySpec {
            owner: "helm-test@keyward.dev".into(),
            team: "keyward-selftest".into(),
            scopes: vec![SELFTEST_SCOPE.into()],
            secret_name: None,
            description: Some("Created and deleted by keyward selftest (helm test).".into()),
            rotation: None,
            expires_after: Some("1h".into()),
            rollout: None,
        },
    );
    key.metadata.labels = Some([("app.kubernetes.io/component".into(), "selftest".into())].into());
    api.create(&PostParams::default(), &key).await?;
    println!("ok: created ApiKey {namespace}/{SELFTEST_KEY}");
    let ready = wait(timeout, "the throwaway ApiKey to become Ready", || async {
        let key = api.get(SELFTEST_KEY).await?;
        Ok(key.ready_condition().is_some_and(|c| c.status == "True"))
    })
    .await;
    if let Err(error) = ready {
        // Say why: a policy, a conflict, the database.
        let why = api
            .get(SELFTEST_KEY)
            .await
            .ok()
            .and_then(|key| {
                key.ready_condition()
                    .map(|c| format!("; Ready is {} ({}: {})", c.status, c.reason, c.message))
            })
            .unwrap_or_default();
        return Err(Error::Config(format!("{error}{why}")));
    }
    println!("ok: the operator issued its key into Secret {SELFTEST_KEY}");
    let Some(verifier) = verifier else {
        return Ok(());
    };
    let mut secret = Api::<Secret>::namespaced(client.clone(), namespace)
        .get(SELFTEST_KEY)
        .await?;
    let presented = secret
        .data
        .as_ref()
        .and_then(|data| data.get(SECRET_DATA_KEY))
        .map(|bytes| Zeroizing::new(String::from_utf8_lossy(&bytes.0).into_owned()));
    wipe_secret(&mut secret);
    let presented =
        presented.ok_or_else(|| Error::Config(format!("Secret {SELFTEST_KEY} holds no key")))?;
    let check = format!("/check?scope={SELFTEST_SCOPE}");
    wait(timeout, "the verifier to accept the key (200)", || async {
        Ok(verifier.get(&check, Some(&presented)).await? == 200)
    })
    .await?;
    println!("ok: the verifier accepts the key");
    remove(api, timeout).await?;
    wait(
        timeout,
        "the verifier to refuse the revoked key (401)",
        || async { Ok(verifier.get(&check, Some(&presented)).await? == 401) },
    )
    .await?;
    println!("ok: deleted, the key is refused");
    Ok(())
}

/// Deletes the throwaway ApiKey, if there is one, and waits until it is gone
/// (its finalizer revokes the key).
async fn remove(api: &Api<ApiKey>, timeout: Duration) -> Result<()> {
    if api.get_opt(SELFTEST_KEY).await?.is_none() {
        return Ok(());
    }
    match api.delete(SELFTEST_KEY, &DeleteParams::default()).await {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.code == 404 => {}
        Err(other) => return Err(other.into()),
    }
    wait(
        timeout,
        "the throwaway ApiKey to be revoked and gone",
        || async { Ok(api.get_opt(SELFTEST_KEY).await?.is_none()) },
    )
    .await
}

/// Polls `done` until it says yes, or fails after `timeout` naming `what`.
async fn wait<F, Fut>(timeout: Duration, what: &str, mut done: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last_error = None;
    loop {
        match done().await {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(error) => last_error = Some(error.to_string()),
        }
        if tokio::time::Instant::now() >= deadline {
            let why = last_error
                .map(|e| format!(" (last error: {e})"))
                .unwrap_or_default();
            return Err(Error::Config(format!(
                "timed out after {}s waiting for {what}{why}",
                timeout.as_secs()
            )));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// An `http://host:port` address: the in-cluster Services the test calls.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Endpoint {
    host: String,
    port: u16,
}

impl Endpoint {
    fn parse(url: &str) -> Result<Self> {
        let bad = || Error::Config(format!("{url}: expected http://host:port"));
        let rest = url.strip_prefix("http://").ok_or_else(bad)?;
        let authority = rest.split('/').next().unwrap_or_default();
        let (host, port) = authority.rsplit_once(':').ok_or_else(bad)?;
        Ok(Self {
            host: host.to_owned(),
            port: port.parse().map_err(|_| bad())?,
        })
    }

    /// The status code of a GET, with `bearer` as the Authorization token.
    async fn get(&self, path: &str, bearer: Option<&str>) -> Result<u16> {
        let io = |e: std::io::Error| Error::Config(format!("{}:{}: {e}", self.host, self.port));
        let mut stream = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(io)?;
        let mut request = Zeroizing::new(format!(
            "GET {path} HTTP/1.1\r\nHost: {}:{}\r\nConnection: close\r\n",
            self.host, self.port
        ));
        if let Some(token) = bearer {
            request.push_str(&format!("Authorization: Bearer {token}\r\n"));
        }
        request.push_str("\r\n");
        stream.write_all(request.as_bytes()).await.map_err(io)?;
        let mut reply = Vec::new();
        stream.read_to_end(&mut reply).await.map_err(io)?;
        let head = String::from_utf8_lossy(&reply[..reply.len().min(64)]).into_owned();
        head.split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| {
                Error::Config(format!("{}:{} did not answer HTTP", self.host, self.port))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_http_host_and_port() {
        assert_eq!(
            Endpoint::parse("http://keyward-verifier:9000").unwrap(),
            Endpoint {
                host: "keyward-verifier".into(),
                port: 9000
            }
        );
        assert_eq!(
            Endpoint::parse("http://127.0.0.1:8080/").unwrap().port,
            8080
        );
        for bad in ["https://x:1", "http://x", "http://x:port", "x:1"] {
            assert!(Endpoint::parse(bad).is_err(), "{bad}");
        }
    }
}
