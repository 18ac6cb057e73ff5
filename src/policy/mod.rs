//! Key governance: `ApiKeyPolicy` decides which teams, scopes, owners and
//! lifetimes the ApiKeys in a namespace may claim.
//!
//! - [`crd`]: the resource.
//! - [`evaluate`]: the pure check of one key against the policies.
//! - [`re2`]: owner patterns read as Go's RE2, as the API server reads them.
//! - [`admission`]: the same rules as a ValidatingAdmissionPolicy (`keyward admission`).
//! - [`index`]: the policies and namespace labels the operator knows, and [`Governance`].
//! - [`limit`]: a key's place under `maxKeysPerNamespace`.
//! - [`status`]: each policy's status, computed.
//! - [`watch`]: the watches that fill the index, and the status writer.

pub mod admission;
pub mod crd;
pub mod evaluate;
pub mod index;
pub mod limit;
pub mod re2;
pub mod status;
pub mod watch;

pub use crd::{ApiKeyPolicy, ApiKeyPolicySpec, ApiKeyPolicyStatus, ViolationAction};
pub use evaluate::{Activity, CompiledPolicy, KeyContext, Verdict, Violation, evaluate};
pub use index::{Governance, PolicyIndex};
pub use limit::Holders;
