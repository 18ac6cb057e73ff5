//! The verifier: answers "is this key good for this request?" for gateways and
//! services in microseconds, from an in-memory key set that follows the key
//! database's change sequence, so a revoked key is refused within a second.
//!
//! - [`snapshot`]: the pure key set and check.
//! - [`core`]: [`Verifier`], the key set with the database fallback, staleness limit
//!   and last-used recorder, and the follower that keeps it current.
//! - [`request`]: what both protocols read from a request (the key, the scopes)
//!   and say about an answer (identity headers, metric label).
//! - [`http`]: the HTTP check, `/v1/verify` and probes.
//! - [`grpc`]: Envoy ext_authz over gRPC.
//! - [`listen`]: the one-port server of both, the PostgreSQL LISTEN/NOTIFY
//!   wake-up and `keyward verifier`.

pub mod core;
pub mod grpc;
pub mod http;
pub mod listen;
pub mod request;
pub mod snapshot;

pub use core::{Checked, KeySource, Verifier, VerifierConfig};
pub use snapshot::{Code, Identity, Verdict};
