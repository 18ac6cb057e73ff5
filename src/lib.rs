//! keyward: a Kubernetes operator that manages API keys as `ApiKey` resources.
//!
//! - [`crd`]: the resource types and the generated CRD.
//! - [`key`]: the key format, hashing and injected entropy.
//! - [`store`]: the key database (SQLite or PostgreSQL), hashes only.
//! - [`operator`]: the pure decision core, the I/O shell that carries decisions
//!   out, and the kube-runtime controller around it, with leader election.
//! - [`usage`]: usage per key: the verifier's counts, the leader's scans, and what status shows.
//! - [`telemetry`]: Prometheus metrics and the health endpoints.
//! - [`plugin`]: the `kubectl keyward` plugin.
//! - [`dashboard`]: `kubectl keyward dashboard`, the key page in a browser.
//! - [`selftest`]: `keyward selftest`, the chart's `helm test`.
//! - [`policy`]: `ApiKeyPolicy`, which teams, scopes and lifetimes a namespace's keys may have.
//! - [`verify`](mod@verify): checking a presented key against the database, for one-off checks.
//! - [`verifier`]: the verifier for gateways and services: an in-memory key set that follows the database.

pub mod anti_entropy;
pub mod cli;
pub mod clock;
pub mod crd;
pub mod dashboard;
mod error;
pub mod key;
pub mod operator;
pub mod plugin;
pub mod policy;
pub mod schedule;
pub mod selftest;
pub mod store;
pub mod telemetry;
pub mod usage;
pub mod verifier;
pub mod verify;

pub use error::{Error, Result};
pub use verify::verify;
