//! The key format: `<prefix>_<43 base62 random chars><6 base62 CRC32 chars>`.
//!
//! Modelled on GitHub's 2021 token format: the prefix makes leaked keys easy to
//! scan for, the checksum lets anyone reject typos and fakes offline, and `_`
//! keeps the whole key selectable with a double click. See docs/key-format.md.

use std::fmt;

use sha2::{Digest, Sha256};
use zeroize::{Zeroize, Zeroizing};

use crate::{Error, Result};

/// Digits first, then upper case, then lower case: the usual base62 order.
const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
/// Random bytes in every key: 256 bits from the OS CSPRNG.
const RANDOM_BYTES: usize = 32;
/// 62^43 > 2^256, so 43 base62 characters hold any 32-byte value.
const BODY_LEN: usize = 43;
/// 62^6 > 2^32, so 6 base62 characters hold any CRC32.
const CHECKSUM_LEN: usize = 6;
/// Characters of the random body shown in the hint: about 24 of 256 bits.
const HINT_BODY_LEN: usize = 4;
/// Base62 characters in a key id: about 95 random bits. Ids are public and need only be unique.
const KEY_ID_LEN: usize = 16;

/// A source of cryptographically secure random bytes, injected so tests control it.
pub trait Entropy: Send + Sync {
    /// Fills `buf` with random bytes.
    fn fill(&self, buf: &mut [u8]) -> Result<()>;
}

/// The operating system's CSPRNG (getrandom), used in production.
#[derive(Debug, Default, Clone, Copy)]
pub struct OsEntropy;

impl Entropy for OsEntropy {
    fn fill(&self, buf: &mut [u8]) -> Result<()> {
        use rand::TryRngCore;
        rand::rngs::OsRng
            .try_fill_bytes(buf)
            .map_err(|e| Error::Entropy(e.to_string()))
    }
}

/// Deterministic entropy from a seed, for tests and benchmarks only.
pub struct SeededEntropy(std::sync::Mutex<rand::rngs::StdRng>);

impl SeededEntropy {
    /// Entropy that yields the same bytes for the same seed.
    pub fn new(seed: u64) -> Self {
        use rand::SeedableRng;
        Self(std::sync::Mutex::new(rand::rngs::StdRng::seed_from_u64(
            seed,
        )))
    }
}

impl Entropy for SeededEntropy {
    fn fill(&self, buf: &mut [u8]) -> Result<()> {
        use rand::RngCore;
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .fill_bytes(buf);
        Ok(())
    }
}

/// A plaintext key. It zeroizes its memory on drop and never prints itself.
#[derive(Clone, PartialEq, Eq)]
pub struct PlainKey(Zeroizing<String>);

impl PlainKey {
    /// The key's characters, to be written into its Secret and nowhere else.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The SHA-256 of the whole key: what the database stores.
    pub fn hash(&self) -> KeyHash {
        KeyHash::of(self.expose().as_bytes())
    }

    /// The first characters of the key (`kw_AbC1`), safe to show in status and listings.
    pub fn hint(&self) -> String {
        let (prefix, rest) = self.expose().split_once('_').unwrap_or(("", ""));
        format!("{prefix}_{}", &rest[..HINT_BODY_LEN.min(rest.len())])
    }
}

impl fmt::Debug for PlainKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PlainKey(<redacted>)")
    }
}

/// Lower-case hex SHA-256 of a whole key, as stored in `api_keys.key_hash`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct KeyHash(String);

impl KeyHash {
    /// Hashes presented key bytes.
    pub fn of(bytes: &[u8]) -> Self {
        let digest = Sha256::digest(bytes);
        let mut hex = String::with_capacity(64);
        for byte in digest {
            hex.push(char::from(b"0123456789abcdef"[usize::from(byte >> 4)]));
            hex.push(char::from(b"0123456789abcdef"[usize::from(byte & 0xf)]));
        }
        Self(hex)
    }

    /// Wraps a hash read back from the database.
    pub fn from_hex(hex: String) -> Self {
        Self(hex)
    }

    /// The hex string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Checks a configured key prefix: a lower-case letter, then 1 to 15 lower-case letters or digits.
pub fn validate_prefix(prefix: &str) -> Result<()> {
    let bytes = prefix.as_bytes();
    let ok = (2..=16).contains(&bytes.len())
        && bytes[0].is_ascii_lowercase()
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "key prefix {prefix:?} must match ^[a-z][a-z0-9]{{1,15}}$"
        )))
    }
}

/// Makes new keys and key ids with a fixed prefix from an injected entropy source.
#[derive(Clone)]
pub struct KeyFactory {
    prefix: String,
    entropy: std::sync::Arc<dyn Entropy>,
}

impl KeyFactory {
    /// A factory for keys that start with `<prefix>_`.
    pub fn new(prefix: &str, entropy: std::sync::Arc<dyn Entropy>) -> Result<Self> {
        validate_prefix(prefix)?;
        Ok(Self {
            prefix: prefix.to_owned(),
            entropy,
        })
    }

    /// A fresh key: 32 random bytes in base62, then the checksum.
    pub fn new_key(&self) -> Result<PlainKey> {
        let mut random = Zeroizing::new([0u8; RANDOM_BYTES]);
        self.entropy.fill(random.as_mut())?;
        let mut key = Zeroizing::new(String::with_capacity(self.prefix.len() + 50));
        key.push_str(&self.prefix);
        key.push('_');
        base62_fixed(random.as_ref(), BODY_LEN, &mut key);
        let checksum = checksum_digits(key.as_bytes());
        key.extend(checksum.iter().map(|&d| char::from(d)));
        Ok(PlainKey(key))
    }

    /// A fresh public key id: `kid_` and 16 uniformly random base62 characters.
    pub fn new_key_id(&self) -> Result<String> {
        let mut id = String::from("kid_");
        let mut random = [0u8; KEY_ID_LEN * 2];
        while id.len() < 4 + KEY_ID_LEN {
            self.entropy.fill(&mut random)?;
            // Bytes of 248 and above are skipped so that `% 62` stays uniform.
            id.extend(
                random
                    .iter()
                    .filter(|&&b| b < 248)
                    .map(|&b| char::from(ALPHABET[usize::from(b % 62)]))
                    .take(4 + KEY_ID_LEN - id.len()),
            );
        }
        Ok(id)
    }
}

/// Checks a presented key's shape and checksum without any database.
/// Returns false for anything that keyward cannot have issued.
pub fn is_well_formed(presented: &str) -> bool {
    let Some((prefix, rest)) = presented.split_once('_') else {
        return false;
    };
    if validate_prefix(prefix).is_err()
        || rest.len() != BODY_LEN + CHECKSUM_LEN
        || !rest.bytes().all(|b| b.is_ascii_alphanumeric())
    {
        return false;
    }
    let (signed, checksum) = presented.split_at(presented.len() - CHECKSUM_LEN);
    checksum.as_bytes() == checksum_digits(signed.as_bytes())
}

/// The CRC32 of `signed` as 6 base62 digits. The checksum is public, so unlike
/// the body it needs no wiping, and it is computed on the stack: the verifier
/// checks it on every request.
fn checksum_digits(signed: &[u8]) -> [u8; CHECKSUM_LEN] {
    let mut crc = crc32fast::hash(signed);
    let mut digits = [ALPHABET[0]; CHECKSUM_LEN];
    for slot in digits.iter_mut().rev() {
        *slot = ALPHABET[(crc % 62) as usize];
        crc /= 62;
    }
    digits
}

/// Appends `bytes` (big-endian) as exactly `width` base62 digits, zero-padded.
/// `width` must be large enough for the value; every caller passes a constant that is.
fn base62_fixed(bytes: &[u8], width: usize, out: &mut String) {
    let mut number = Zeroizing::new(bytes.to_vec());
    let mut digits = Zeroizing::new(vec![ALPHABET[0]; width]);
    for slot in digits.iter_mut().rev() {
        let mut remainder = 0u32;
        for byte in number.iter_mut() {
            let acc = (remainder << 8) | u32::from(*byte);
            *byte = (acc / 62) as u8;
            remainder = acc % 62;
        }
        *slot = ALPHABET[remainder as usize];
    }
    debug_assert!(number.iter().all(|&b| b == 0), "base62 width too small");
    out.extend(digits.iter().map(|&d| char::from(d)));
    number.zeroize();
}

/// Overwrites every data value of a Secret in memory before it is dropped:
/// whoever reads a key from a Secret keeps it only as long as it needs it.
pub fn wipe_secret(secret: &mut k8s_openapi::api::core::v1::Secret) {
    for value in secret.data.iter_mut().flat_map(|d| d.values_mut()) {
        value.0.zeroize();
    }
    secret.data = None;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn factory(seed: u64) -> KeyFactory {
        KeyFactory::new("kw", Arc::new(SeededEntropy::new(seed))).unwrap()
    }

    #[test]
    fn keys_have_fixed_width_and_valid_checksum() {
        let keys = factory(1);
        for _ in 0..500 {
            let key = keys.new_key().unwrap();
            assert_eq!(key.expose().len(), 3 + 49);
            assert!(key.expose().starts_with("kw_"));
            assert!(is_well_formed(key.expose()), "{}", key.expose());
        }
    }

    #[test]
    fn extreme_values_are_zero_padded_and_fit() {
        let mut zero = String::new();
        base62_fixed(&[0u8; 32], BODY_LEN, &mut zero);
        assert_eq!(zero, "0".repeat(43));
        let mut max = String::new();
        base62_fixed(&[0xffu8; 32], BODY_LEN, &mut max);
        assert_eq!(max.len(), 43);
        assert_ne!(max.as_bytes()[0], b'0');
        let mut crc = String::new();
        base62_fixed(&u32::MAX.to_be_bytes(), CHECKSUM_LEN, &mut crc);
        assert_eq!(crc, "4gfFC3");
    }

    #[test]
    fn the_stack_checksum_equals_the_general_encoding() {
        // Keys issued before the checksum had its own function must still verify.
        for signed in [&b""[..], b"kw_", b"kw_abcdef", &[0xff; 46]] {
            let mut general = String::new();
            base62_fixed(
                &crc32fast::hash(signed).to_be_bytes(),
                CHECKSUM_LEN,
                &mut general,
            );
            assert_eq!(checksum_digits(signed), general.as_bytes());
        }
    }

    #[test]
    fn base62_matches_integer_arithmetic() {
        let mut out = String::new();
        base62_fixed(&12_345_678u32.to_be_bytes(), 6, &mut out);
        // 12345678 = 51*62^3 + 50*62^2 + 42*62 + 28 → "0PoogS" in 0-9A-Za-z order
        let mut n = 12_345_678u32;
        let mut expected = Vec::new();
        for _ in 0..6 {
            expected.push(ALPHABET[(n % 62) as usize]);
            n /= 62;
        }
        expected.reverse();
        assert_eq!(out.as_bytes(), expected.as_slice());
    }

    #[test]
    fn checksum_rejects_typos_and_fakes() {
        let key = factory(2).new_key().unwrap();
        let text = key.expose().to_owned();
        let mut typo = text.clone().into_bytes();
        typo[10] = if typo[10] == b'a' { b'b' } else { b'a' };
        assert!(!is_well_formed(std::str::from_utf8(&typo).unwrap()));
        assert!(!is_well_formed(&text[..text.len() - 1]));
        assert!(!is_well_formed(&format!("{text}x")));
        assert!(!is_well_formed(&text.replacen("kw_", "KW_", 1)));
        assert!(!is_well_formed(""));
        assert!(!is_well_formed("kw_"));
    }

    #[test]
    fn same_seed_same_key_different_seed_different_key() {
        assert_eq!(factory(7).new_key().unwrap(), factory(7).new_key().unwrap());
        assert_ne!(factory(7).new_key().unwrap(), factory(8).new_key().unwrap());
    }

    #[test]
    fn os_entropy_keys_differ() {
        let keys = KeyFactory::new("kw", Arc::new(OsEntropy)).unwrap();
        assert_ne!(keys.new_key().unwrap(), keys.new_key().unwrap());
    }

    #[test]
    fn debug_never_shows_the_key() {
        let key = factory(3).new_key().unwrap();
        let shown = format!("{key:?} {:?}", Some(&key));
        assert!(!shown.contains(&key.expose()[3..]));
        assert!(shown.contains("redacted"));
    }

    #[test]
    fn hint_is_prefix_and_four_chars() {
        let key = factory(4).new_key().unwrap();
        assert_eq!(key.hint(), key.expose()[..7]);
    }

    #[test]
    fn hash_is_sha256_hex() {
        assert_eq!(
            KeyHash::of(b"abc").as_str(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn key_ids_are_fixed_width() {
        let keys = factory(5);
        let ids: Vec<String> = (0..200).map(|_| keys.new_key_id().unwrap()).collect();
        for id in &ids {
            assert_eq!(id.len(), 4 + KEY_ID_LEN);
            assert!(id.starts_with("kid_") && id[4..].bytes().all(|b| b.is_ascii_alphanumeric()));
        }
        // Uniform characters: the first one is not stuck on a padding digit.
        let firsts: std::collections::HashSet<u8> = ids.iter().map(|id| id.as_bytes()[4]).collect();
        assert!(firsts.len() > 30, "{firsts:?}");
    }

    #[test]
    fn prefixes_are_checked() {
        for good in ["kw", "acme", "a1", "abcdefghijklmnop"] {
            assert!(validate_prefix(good).is_ok(), "{good}");
        }
        for bad in ["", "k", "Kw", "1kw", "k_w", "abcdefghijklmnopq"] {
            assert!(validate_prefix(bad).is_err(), "{bad}");
        }
    }
}
