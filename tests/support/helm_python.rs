//! Where the chart tests find helm-python-sdk (shared by tests/helm.rs and
//! tests/cluster/chart.rs through `#[path]`).

use std::path::PathBuf;

/// The python with helm-python-sdk: `KEYWARD_HELM_PYTHON` (set by scripts/test),
/// else the venv scripts/test keeps in the cache; `None` when neither exists.
pub fn helm_python() -> Option<PathBuf> {
    if let Some(python) = std::env::var_os("KEYWARD_HELM_PYTHON") {
        return Some(python.into());
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))?;
    let python = cache.join("keyward/helm-venv/bin/python");
    python.exists().then_some(python)
}
