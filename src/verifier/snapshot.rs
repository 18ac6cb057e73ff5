//! The key set a verifier holds in memory, and the pure answer to "is this key
//! good for these scopes at this time?". It follows the key database through its
//! change sequence; nothing here does I/O or reads a clock.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use jiff::Timestamp;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::{
    key::is_well_formed,
    store::{KeyRecord, KeyState},
};

/// The SHA-256 of a key, as the map key.
pub type Digest32 = [u8; 32];

/// The SHA-256 of a presented key.
pub fn digest(presented: &str) -> Digest32 {
    Sha256::digest(presented.as_bytes()).into()
}

/// Parses the database's lower-case hex hash.
pub fn digest_from_hex(hex: &str) -> Option<Digest32> {
    let bytes = hex.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let nibble = |b: u8| match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; 32];
    for (slot, pair) in out.iter_mut().zip(bytes.chunks_exact(2)) {
        *slot = nibble(pair[0])? << 4 | nibble(pair[1])?;
    }
    Some(out)
}

/// The answer to one check, as `/v1/verify` spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Code {
    /// The key is good for the request.
    Valid,
    /// No key, or not the keyward format, or a bad checksum.
    Malformed,
    /// No key with this hash.
    Unknown,
    /// The key was revoked.
    Revoked,
    /// The key's validity has ended.
    Expired,
    /// The key is good but lacks a required scope.
    InsufficientScope,
}

impl Code {
    /// The metric label: lower case.
    pub fn as_str(self) -> &'static str {
        match self {
            Code::Valid => "valid",
            Code::Malformed => "malformed",
            Code::Unknown => "unknown",
            Code::Revoked => "revoked",
            Code::Expired => "expired",
            Code::InsufficientScope => "insufficient_scope",
        }
    }
}

/// Who a valid key belongs to: what the identity headers carry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Identity {
    /// Public key id.
    pub key_id: Arc<str>,
    /// The ApiKey's namespace.
    pub namespace: Arc<str>,
    /// The ApiKey's name.
    pub name: Arc<str>,
    /// Accountable owner.
    pub owner: Arc<str>,
    /// Owning team.
    pub team: Arc<str>,
    /// Granted scopes.
    pub scopes: Arc<[Arc<str>]>,
    /// The cluster whose operator issued the key (`--cluster-name`).
    pub cluster: Arc<str>,
}

/// One live key in memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Who it belongs to.
    pub identity: Arc<Identity>,
    /// Pending, active or retiring.
    pub state: KeyState,
    /// When it stops verifying, if ever.
    pub expires_at: Option<Timestamp>,
}

impl Entry {
    /// The entry for a live record. `shared` gives the strings that repeat
    /// between keys (namespace, owner, team, scopes) one copy; ids are unique.
    fn of(record: &KeyRecord, mut shared: impl FnMut(&str) -> Arc<str>) -> Self {
        let identity = Arc::new(Identity {
            key_id: Arc::from(record.key_id.as_str()),
            namespace: shared(&record.namespace),
            name: Arc::from(record.name.as_str()),
            owner: shared(&record.metadata.owner),
            team: shared(&record.metadata.team),
            scopes: record.metadata.scopes.iter().map(|s| shared(s)).collect(),
            cluster: shared(&record.cluster),
        });
        Entry {
            identity,
            state: record.state,
            expires_at: record.expires_at,
        }
    }

    /// Whether this entry already says what `record` says, so a reload can keep it.
    fn holds(&self, record: &KeyRecord) -> bool {
        let id = &self.identity;
        self.state == record.state
            && self.expires_at == record.expires_at
            && *id.key_id == *record.key_id
            && *id.namespace == *record.namespace
            && *id.name == *record.name
            && *id.owner == *record.metadata.owner
            && *id.team == *record.metadata.team
            && *id.cluster == *record.cluster
            && id.scopes.len() == record.metadata.scopes.len()
            && id
                .scopes
                .iter()
                .zip(&record.metadata.scopes)
                .all(|(held, given)| **held == **given)
    }
}

/// The outcome of a check: the code, and the identity when the key is known.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// What the answer is.
    pub code: Code,
    /// The key's identity for `Valid` and `InsufficientScope`.
    pub identity: Option<Arc<Identity>>,
}

impl Verdict {
    fn only(code: Code) -> Self {
        Verdict {
            code,
            identity: None,
        }
    }
}

/// What the snapshot knows of a hash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lookup {
    /// A live key.
    Live(Arc<Entry>),
    /// Revoked while this verifier followed the changes.
    Revoked,
    /// Not in memory: ask the database.
    Missing,
}

/// Checks a key that is well-formed and known against `now` and the required scopes.
pub fn judge(entry: &Entry, required: &[&str], now: Timestamp) -> Verdict {
    if entry.expires_at.is_some_and(|at| at <= now) {
        return Verdict::only(Code::Expired);
    }
    scoped(entry.identity.clone(), required)
}

/// `Valid` when the identity has every required scope, else `InsufficientScope`.
pub fn scoped(identity: Arc<Identity>, required: &[&str]) -> Verdict {
    let granted = |scope: &&str| identity.scopes.iter().any(|s| &**s == *scope);
    let code = if required.iter().all(granted) {
        Code::Valid
    } else {
        Code::InsufficientScope
    };
    Verdict {
        code,
        identity: Some(identity),
    }
}

/// Whether a presented key has the keyward shape and checksum; checked before
/// any hashing, so garbage costs nothing.
pub fn well_formed(presented: &str) -> bool {
    is_well_formed(presented)
}

/// A live key in the map, with the mark of the last full load that saw it.
#[derive(Debug)]
struct Slot {
    entry: Arc<Entry>,
    mark: u32,
}

/// Every live key, by hash, current to change `seq`.
#[derive(Debug, Default)]
pub struct Snapshot {
    keys: HashMap<Digest32, Slot>,
    /// The current full load's mark: rows it brings are marked, and the keys it
    /// did not bring are swept at its end, so a reload needs no second key set.
    mark: u32,
    /// Hashes revoked since the verifier started, so that they answer
    /// `Revoked` without a database query, and are never believed live again
    /// (a restored database); bounded, oldest forgotten first.
    /// With each, its key id, for the usage count of refused attempts.
    revoked: HashMap<Digest32, Arc<str>>,
    revoked_order: std::collections::VecDeque<Digest32>,
    seq: i64,
    /// The last change applied since the last full load (key id, change
    /// number): its row must still carry at least that number, or the
    /// database's history moved backwards.
    witness: Option<(String, i64)>,
    strings: HashSet<Arc<str>>,
}

/// How many revoked hashes a snapshot remembers.
pub const REMEMBERED_REVOCATIONS: usize = 100_000;

impl Snapshot {
    /// A snapshot of these records, current to change `seq`.
    pub fn load(seq: i64, records: Vec<KeyRecord>) -> Self {
        let mut snapshot = Snapshot {
            seq,
            ..Snapshot::default()
        };
        snapshot.begin_reload();
        for record in records {
            snapshot.reloaded(record);
        }
        snapshot.finish_reload(seq);
        snapshot
    }

    /// The change number this snapshot is current to.
    pub fn seq(&self) -> i64 {
        self.seq
    }

    /// The last change applied since the last full load: (key id, change number).
    pub fn witness(&self) -> Option<(&str, i64)> {
        self.witness.as_ref().map(|(id, seq)| (id.as_str(), *seq))
    }

    /// How many live keys it holds.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether it holds no key.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Applies one change (the row as it is after change `seq`). Older or
    /// repeated changes are ignored. Returns the key's hash when it changed.
    pub fn apply(&mut self, seq: i64, record: KeyRecord) -> Option<Digest32> {
        if seq <= self.seq {
            return None;
        }
        self.seq = seq;
        self.witness = Some((record.key_id.clone(), seq));
        self.put(record)
    }

    /// Starts a full load in place: [`reloaded`](Self::reloaded) marks each row
    /// it brings, and [`finish_reload`](Self::finish_reload) drops the keys it
    /// did not bring. Until then every key stays as it was, so checks go on.
    pub fn begin_reload(&mut self) {
        self.mark = self.mark.wrapping_add(1);
    }

    /// Takes one row of a full load. The rows are read after the load's change
    /// number, so each is at least as new as what the snapshot holds.
    pub fn reloaded(&mut self, record: KeyRecord) {
        self.put(record);
    }

    /// Ends a full load current to change `seq`: drops the keys it did not bring
    /// (revoked, or gone, at or before `seq`); returns how many. The load's
    /// number replaces the snapshot's: lower only when history moved backwards.
    pub fn finish_reload(&mut self, seq: i64) -> usize {
        let before = self.keys.len();
        let mark = self.mark;
        self.keys.retain(|_, slot| slot.mark == mark);
        self.seq = seq;
        self.witness = None;
        self.compact();
        before - self.keys.len()
    }

    fn put(&mut self, record: KeyRecord) -> Option<Digest32> {
        let hash = digest_from_hex(record.key_hash.as_str())?;
        if record.state == KeyState::Revoked {
            self.keys.remove(&hash);
            if self
                .revoked
                .insert(hash, Arc::from(record.key_id.as_str()))
                .is_none()
            {
                self.revoked_order.push_back(hash);
                if self.revoked_order.len() > REMEMBERED_REVOCATIONS
                    && let Some(oldest) = self.revoked_order.pop_front()
                {
                    self.revoked.remove(&oldest);
                }
            }
            return Some(hash);
        }
        if self.revoked.contains_key(&hash) {
            // Revocation is final: a restored or failed-over database that
            // shows this key live again is wrong, and is not believed.
            return None;
        }
        let mark = self.mark;
        if let Some(slot) = self.keys.get_mut(&hash)
            && slot.entry.holds(&record)
        {
            // Unchanged (most rows of a reload): keep the entry, allocate nothing.
            slot.mark = mark;
            return Some(hash);
        }
        let entry = Arc::new(Entry::of(&record, |text| self.intern(text)));
        self.keys.insert(hash, Slot { entry, mark });
        Some(hash)
    }

    /// One shared copy of a string that repeats between keys.
    fn intern(&mut self, text: &str) -> Arc<str> {
        if let Some(shared) = self.strings.get(text) {
            return shared.clone();
        }
        let shared: Arc<str> = Arc::from(text);
        self.strings.insert(shared.clone());
        shared
    }

    /// What the snapshot knows of a hash.
    pub fn lookup(&self, hash: &Digest32) -> Lookup {
        match self.keys.get(hash) {
            Some(slot) => Lookup::Live(Arc::clone(&slot.entry)),
            None if self.revoked.contains_key(hash) => Lookup::Revoked,
            None => Lookup::Missing,
        }
    }

    /// The key id of a hash held live or seen revoked.
    pub fn key_id_of(&self, hash: &Digest32) -> Option<Arc<str>> {
        match self.keys.get(hash) {
            Some(slot) => Some(Arc::clone(&slot.entry.identity.key_id)),
            None => self.revoked.get(hash).cloned(),
        }
    }

    /// Drops interned strings nothing refers to any more (after many changes).
    pub fn compact(&mut self) {
        self.strings.retain(|s| Arc::strong_count(s) > 1);
    }
}

/// The full answer for a key the snapshot knows, or `None` to ask the database.
pub fn answer(
    snapshot: &Snapshot,
    presented: &str,
    required: &[&str],
    now: Timestamp,
) -> Option<Verdict> {
    if !well_formed(presented) {
        return Some(Verdict::only(Code::Malformed));
    }
    match snapshot.lookup(&digest(presented)) {
        Lookup::Live(entry) => Some(judge(&entry, required, now)),
        Lookup::Revoked => Some(Verdict::only(Code::Revoked)),
        Lookup::Missing => None,
    }
}

/// The answer the database gives for a record found by hash (or none).
pub fn answer_from_record(
    record: Option<&KeyRecord>,
    required: &[&str],
    now: Timestamp,
) -> Verdict {
    let Some(record) = record else {
        return Verdict::only(Code::Unknown);
    };
    if record.state == KeyState::Revoked {
        return Verdict::only(Code::Revoked);
    }
    judge(&Entry::of(record, |text| Arc::from(text)), required, now)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        key::KeyHash,
        store::{IssueReason, KeyMetadata},
    };

    fn record(id: &str, key: &str, state: KeyState) -> KeyRecord {
        KeyRecord {
            key_id: id.into(),
            key_hash: KeyHash::of(key.as_bytes()),
            key_hint: "kw_x".into(),
            apikey_uid: "uid".into(),
            namespace: "ns".into(),
            name: "n".into(),
            metadata: KeyMetadata {
                owner: "o".into(),
                team: "t".into(),
                scopes: vec!["inference".into()],
            },
            state,
            created_at: Timestamp::UNIX_EPOCH,
            activated_at: None,
            expires_at: None,
            revoked_at: None,
            revoke_reason: None,
            issue_reason: IssueReason::Initial,
            rotation_request: None,
            cluster: "default".into(),
        }
    }

    fn state(snapshot: &Snapshot, key: &str) -> Option<KeyState> {
        match snapshot.lookup(&digest(key)) {
            Lookup::Live(entry) => Some(entry.state),
            Lookup::Revoked => Some(KeyState::Revoked),
            Lookup::Missing => None,
        }
    }

    #[test]
    fn changes_apply_in_order_across_gaps_and_never_go_back() {
        let mut snapshot = Snapshot::load(2, vec![record("a", "key-a", KeyState::Active)]);
        assert_eq!(snapshot.seq(), 2);
        assert!(
            snapshot
                .apply(3, record("b", "key-b", KeyState::Pending))
                .is_some()
        );
        // 4 and 5 wrote nothing (rolled back); 6 is the next row.
        assert!(
            snapshot
                .apply(6, record("a", "key-a", KeyState::Retiring))
                .is_some()
        );
        assert_eq!(snapshot.seq(), 6);
        assert_eq!(state(&snapshot, "key-a"), Some(KeyState::Retiring));
        // A stale change (a repeat, or older than what was seen) changes nothing.
        assert!(
            snapshot
                .apply(5, record("a", "key-a", KeyState::Active))
                .is_none()
        );
        assert_eq!(state(&snapshot, "key-a"), Some(KeyState::Retiring));
        assert!(
            snapshot
                .apply(7, record("a", "key-a", KeyState::Revoked))
                .is_some()
        );
        assert_eq!(state(&snapshot, "key-a"), Some(KeyState::Revoked));
        assert_eq!(snapshot.len(), 1);
        assert_eq!(state(&snapshot, "key-c"), None);
    }

    #[test]
    fn a_full_load_in_place_keeps_what_it_brings_and_drops_the_rest() {
        let mut snapshot = Snapshot::load(
            3,
            vec![
                record("a", "key-a", KeyState::Active),
                record("b", "key-b", KeyState::Active),
            ],
        );
        let entry = |snapshot: &Snapshot, key: &str| match snapshot.lookup(&digest(key)) {
            Lookup::Live(entry) => entry,
            other => panic!("{other:?}"),
        };
        let a = entry(&snapshot, "key-a");
        snapshot.begin_reload();
        snapshot.reloaded(record("a", "key-a", KeyState::Active));
        snapshot.reloaded(record("c", "key-c", KeyState::Pending));
        // Until the load ends, the keys it has not brought yet still answer.
        assert_eq!(state(&snapshot, "key-b"), Some(KeyState::Active));
        assert_eq!(snapshot.finish_reload(5), 1);
        assert!(Arc::ptr_eq(&a, &entry(&snapshot, "key-a")), "unchanged");
        assert_eq!(state(&snapshot, "key-b"), None, "not brought: dropped");
        assert_eq!(state(&snapshot, "key-c"), Some(KeyState::Pending));
        assert_eq!((snapshot.seq(), snapshot.len()), (5, 2));
        // A changed row replaces its entry.
        snapshot.begin_reload();
        snapshot.reloaded(record("a", "key-a", KeyState::Retiring));
        snapshot.reloaded(record("c", "key-c", KeyState::Pending));
        assert_eq!(snapshot.finish_reload(5), 0);
        assert_eq!(state(&snapshot, "key-a"), Some(KeyState::Retiring));
    }

    #[test]
    fn strings_are_shared_between_keys() {
        let snapshot = Snapshot::load(
            1,
            vec![
                record("a", "key-a", KeyState::Active),
                record("b", "key-b", KeyState::Active),
            ],
        );
        let team = |key: &str| match snapshot.lookup(&digest(key)) {
            Lookup::Live(entry) => entry.identity.team.clone(),
            _ => panic!("live"),
        };
        assert!(Arc::ptr_eq(&team("key-a"), &team("key-b")));
    }

    #[test]
    fn hex_hashes_parse_and_bad_ones_are_refused() {
        let hash = KeyHash::of(b"key");
        assert_eq!(digest_from_hex(hash.as_str()), Some(digest("key")));
        assert_eq!(digest_from_hex("zz"), None);
        assert_eq!(digest_from_hex(&"g".repeat(64)), None);
    }
}
