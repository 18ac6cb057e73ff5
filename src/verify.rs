//! Checking a presented key against the key database: the contract with the
//! services that accept keys. `keyward verify` and Rust services call this.

use jiff::Timestamp;
use serde::Serialize;

use crate::{
    Result,
    key::{KeyHash, is_well_formed},
    store::{KeyState, KeyStore},
};

/// Why a key does not verify. The presented key is never part of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Rejection {
    /// Wrong shape or checksum: rejected without touching the database.
    Malformed,
    /// No record has this hash.
    Unknown,
    /// The key was revoked.
    Revoked,
    /// The key's validity ended (`expires_at` passed).
    Expired,
}

impl Rejection {
    /// The stable lower-case word printed by `keyward verify`.
    pub fn as_str(self) -> &'static str {
        match self {
            Rejection::Malformed => "malformed",
            Rejection::Unknown => "unknown",
            Rejection::Revoked => "revoked",
            Rejection::Expired => "expired",
        }
    }
}

/// What a valid key is for; printed as JSON by `keyward verify`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VerifiedKey {
    /// Public key id.
    pub key_id: String,
    /// Namespace of the ApiKey.
    pub namespace: String,
    /// Name of the ApiKey.
    pub name: String,
    /// Accountable owner.
    pub owner: String,
    /// Owning team.
    pub team: String,
    /// Granted scopes.
    pub scopes: Vec<String>,
    /// `pending` (in its Secret, confirmation under way), `active` or `retiring`.
    pub state: String,
    /// The cluster whose operator issued the key.
    pub cluster: String,
}

/// Verifies `presented` at time `now`.
/// `Ok(Err(_))` is a definite "no"; `Err(_)` means the database could not answer.
pub async fn verify(
    store: &dyn KeyStore,
    presented: &str,
    now: Timestamp,
) -> Result<std::result::Result<VerifiedKey, Rejection>> {
    if !is_well_formed(presented) {
        return Ok(Err(Rejection::Malformed));
    }
    let Some(record) = store
        .find_by_hash(&KeyHash::of(presented.as_bytes()))
        .await?
    else {
        return Ok(Err(Rejection::Unknown));
    };
    let expired = record.expires_at.is_some_and(|at| at <= now);
    let verdict = match record.state {
        KeyState::Revoked => Err(Rejection::Revoked),
        _ if expired => Err(Rejection::Expired),
        // A pending key verifies: its plaintext exists only in its Secret (or was
        // lost in a crash), and a Secret must never hold a key that fails.
        KeyState::Pending | KeyState::Active | KeyState::Retiring => Ok(VerifiedKey {
            key_id: record.key_id,
            namespace: record.namespace,
            name: record.name,
            owner: record.metadata.owner,
            team: record.metadata.team,
            scopes: record.metadata.scopes,
            state: record.state.as_str().to_owned(),
            cluster: record.cluster,
        }),
    };
    Ok(verdict)
}
