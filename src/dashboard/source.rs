//! Where the key list comes from. Locally, a watch per namespace scope the
//! user looks at, so a page after the first is served from memory, and memory
//! stays bounded by the namespaces shown (past a few more watches than shown
//! namespaces, the least recently shown one stops). In token passthrough mode
//! each request lists with the caller's own token, since one caller's cache
//! must never serve another.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::StreamExt;
use kube::{
    Api, Client,
    api::ListParams,
    runtime::{
        WatchStreamExt,
        reflector::{self, Store},
        watcher,
    },
};

use crate::{Result, crd::ApiKey};

/// How long the first page waits for a watch's initial list.
const FIRST_LIST_TIMEOUT: Duration = Duration::from_secs(60);

/// Drops what no page shows from a cached ApiKey: managed fields and the
/// hourly usage series (a key's own page reads the object afresh).
pub fn trim(key: &mut ApiKey) {
    key.metadata.managed_fields = None;
    if let Some(usage) = key.status.as_mut().and_then(|s| s.usage.as_mut()) {
        usage.hourly.valid = Vec::new();
        usage.hourly.insufficient_scope = Vec::new();
        usage.hourly.revoked = Vec::new();
        usage.hourly.expired = Vec::new();
    }
}

/// Watches of ApiKeys by scope (`None` is every namespace), least recently used evicted.
pub struct KeyWatches {
    client: Client,
    /// Watches kept at once.
    max: usize,
    watches: Mutex<HashMap<Option<String>, Watch>>,
}

struct Watch {
    store: Store<ApiKey>,
    task: tokio::task::JoinHandle<()>,
    used: Instant,
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl KeyWatches {
    /// No watch yet: each starts when a page first shows its scope.
    pub fn new(client: Client, max: usize) -> Self {
        Self {
            client,
            max,
            watches: Mutex::new(HashMap::new()),
        }
    }

    /// The ApiKeys in `namespace` (`None`: every namespace), from the watch of
    /// that scope, started (and its first list awaited) if it is not running.
    pub async fn keys(&self, namespace: Option<&str>) -> Result<Vec<Arc<ApiKey>>> {
        let scope = namespace.map(str::to_owned);
        let existing = {
            let mut watches = self.watches.lock().expect("watch map poisoned");
            watches.get_mut(&scope).map(|watch| {
                watch.used = Instant::now();
                watch.store.clone()
            })
        };
        let store = match existing {
            Some(store) => store,
            None => self.start(scope).await?,
        };
        tokio::time::timeout(FIRST_LIST_TIMEOUT, store.wait_until_ready())
            .await
            .map_err(|_| crate::Error::Config("the ApiKey list did not arrive within 60s".into()))?
            .map_err(|_| crate::Error::Config("the ApiKey watch stopped".into()))?;
        Ok(store.state())
    }

    async fn start(&self, scope: Option<String>) -> Result<Store<ApiKey>> {
        let api: Api<ApiKey> = match &scope {
            Some(ns) => Api::namespaced(self.client.clone(), ns),
            None => Api::all(self.client.clone()),
        };
        // One page first, so RBAC's refusal reaches the page with the API
        // server's own message instead of a watch that never becomes ready.
        api.list(&ListParams::default().limit(1)).await?;
        let (store, writer) = reflector::store();
        let events = watcher(api, watcher::Config::default())
            .default_backoff()
            .modify(trim)
            .reflect(writer);
        let task = tokio::spawn(async move {
            events
                .for_each(|event| async move {
                    if let Err(error) = event {
                        tracing::warn!(%error, "dashboard ApiKey watch");
                    }
                })
                .await;
        });
        let mut watches = self.watches.lock().expect("watch map poisoned");
        if watches.len() >= self.max
            && let Some(oldest) = watches
                .iter()
                .min_by_key(|(_, w)| w.used)
                .map(|(scope, _)| scope.clone())
        {
            watches.remove(&oldest);
        }
        watches.insert(
            scope,
            Watch {
                store: store.clone(),
                task,
                used: Instant::now(),
            },
        );
        Ok(store)
    }
}

/// The ApiKeys in `namespace` (`None`: every namespace), listed now with `client`.
pub async fn list_now(client: Client, namespace: Option<&str>) -> Result<Vec<Arc<ApiKey>>> {
    let api: Api<ApiKey> = match namespace {
        Some(ns) => Api::namespaced(client, ns),
        None => Api::all(client),
    };
    Ok(api
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .map(|mut key| {
            trim(&mut key);
            Arc::new(key)
        })
        .collect())
}
