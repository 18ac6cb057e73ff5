//! Key governance: `ApiKeyPolicy` decides which teams, scopes, owners and
//! lifetimes the ApiKeys in a namespace may claim.
//!
//! - [`crd`]: the resource.
//! - [`evaluate`]: the pure check of one key against the policies.

pub mod crd;
pub mod evaluate;

pub use crd::{ApiKeyPolicy, ApiKeyPolicySpec, ApiKeyPolicyStatus, ViolationAction};
pub use evaluate::{CompiledPolicy, KeyContext, Verdict, Violation, evaluate};
