//! Identifiers: project ids, event ids and API keys.
//!
//! * A [`ProjectId`] is 12 random bytes written as 24 lowercase hex digits, like Keen's.
//! * An event id (`keen.id`) is also 24 lowercase hex digits, but time-ordered: 48 bits of
//!   milliseconds, 16 bits that identify the generating process, and a 32-bit counter, so ids
//!   sort by creation time and two ingest nodes do not collide in practice.
//! * API keys are 256 random bits in upper-case hex. Only their SHA-256 ([`KeyHash`]) is ever
//!   stored; comparing hashes is done in constant time.

use std::fmt;
use std::str::FromStr;
use std::sync::Mutex;

use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// A project's id: 12 bytes, printed as 24 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProjectId([u8; 12]);

impl ProjectId {
    /// A new random project id.
    pub fn random() -> Self {
        let mut bytes = [0u8; 12];
        rand::rng().fill_bytes(&mut bytes);
        Self(bytes)
    }

    /// The id from its 12 raw bytes.
    pub fn from_bytes(bytes: [u8; 12]) -> Self {
        Self(bytes)
    }

    /// The 12 raw bytes.
    pub fn as_bytes(&self) -> &[u8; 12] {
        &self.0
    }
}

/// A project id string that is not 24 hex digits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a project id is 24 hexadecimal digits")]
pub struct InvalidProjectId;

impl FromStr for ProjectId {
    type Err = InvalidProjectId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != 24 {
            return Err(InvalidProjectId);
        }
        let mut bytes = [0u8; 12];
        hex::decode_to_slice(s, &mut bytes).map_err(|_| InvalidProjectId)?;
        Ok(Self(bytes))
    }
}

impl fmt::Display for ProjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for ProjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ProjectId({self})")
    }
}

impl serde::Serialize for ProjectId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for ProjectId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Makes `keen.id` values: unique, 24 lowercase hex digits, ordered by creation time.
///
/// Layout (96 bits): 48-bit Unix milliseconds, a 16-bit process tag chosen at random when the
/// generator is built, and a 32-bit counter that starts at a random value. Within one generator
/// ids strictly increase even if the clock steps back: the last timestamp is kept and reused.
#[derive(Debug)]
pub struct EventIdGenerator {
    process_tag: u16,
    state: Mutex<(i64, u32)>,
}

impl Default for EventIdGenerator {
    fn default() -> Self {
        Self::new()
    }
}

impl EventIdGenerator {
    /// A generator with a random process tag.
    pub fn new() -> Self {
        let mut rng = rand::rng();
        Self {
            process_tag: (rng.next_u32() & 0xffff) as u16,
            state: Mutex::new((0, rng.next_u32())),
        }
    }

    /// The next id, for an event received at `now_ms`.
    pub fn next_id(&self, now_ms: i64) -> String {
        String::from_utf8(self.next_id_ascii(now_ms).to_vec()).expect("hex is ASCII")
    }

    /// The next id as 24 ASCII hex digits, without allocating.
    pub fn next_id_ascii(&self, now_ms: i64) -> [u8; 24] {
        let (ms, counter) = {
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let (last_ms, last_counter) = *state;
            let ms = now_ms.max(last_ms);
            let counter = last_counter.wrapping_add(1);
            // A wrapped counter within the same millisecond would repeat an id: borrow the next
            // millisecond instead (one id in four billion, so time stays almost exact).
            let ms = if counter == 0 && ms == last_ms { ms + 1 } else { ms };
            *state = (ms, counter);
            (ms, counter)
        };
        let mut bytes = [0u8; 12];
        bytes[..6].copy_from_slice(&(ms as u64).to_be_bytes()[2..]);
        bytes[6..8].copy_from_slice(&self.process_tag.to_be_bytes());
        bytes[8..].copy_from_slice(&counter.to_be_bytes());
        let mut ascii = [0u8; 24];
        hex::encode_to_slice(bytes, &mut ascii).expect("24 = 2 * 12");
        ascii
    }
}

/// A new random API key: 256 bits as 64 upper-case hex digits.
pub fn new_api_key() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    hex::encode_upper(bytes)
}

/// The SHA-256 of an API key: what the catalog stores instead of the key.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyHash([u8; 32]);

impl KeyHash {
    /// Hashes a presented key.
    pub fn of(key: &str) -> Self {
        Self(Sha256::digest(key.as_bytes()).into())
    }

    /// Constant-time comparison, for checking a presented key against a stored hash.
    pub fn ct_eq(&self, other: &KeyHash) -> bool {
        self.0.ct_eq(&other.0).into()
    }

    /// Lowercase hex, for storage.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses the hex form written by [`KeyHash::to_hex`].
    pub fn from_hex(s: &str) -> Option<Self> {
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(s, &mut bytes).ok()?;
        Some(Self(bytes))
    }
}

impl fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Enough to tell hashes apart in logs, never the whole value.
        write!(f, "KeyHash({}…)", &self.to_hex()[..8])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn project_ids_round_trip_as_24_lowercase_hex_digits() {
        let id = ProjectId::random();
        let text = id.to_string();
        assert_eq!(text.len(), 24);
        assert!(
            text.chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
        assert_eq!(text.parse::<ProjectId>().unwrap(), id);
        assert!("xyz".parse::<ProjectId>().is_err());
        assert!("0123456789abcdef0123456g".parse::<ProjectId>().is_err());
    }

    #[test]
    fn event_ids_are_unique_and_ordered_even_when_the_clock_steps_back() {
        let ids = EventIdGenerator::new();
        let mut last = String::new();
        for now in [1_000, 1_000, 999, 2_000, 1_500, 2_000] {
            let id = ids.next_id(now);
            assert_eq!(id.len(), 24);
            assert!(id > last, "{id} after {last}");
            last = id;
        }
    }

    #[test]
    fn api_keys_are_256_bits_and_hash_comparisons_work() {
        let key = new_api_key();
        assert_eq!(key.len(), 64);
        let hash = KeyHash::of(&key);
        assert!(hash.ct_eq(&KeyHash::of(&key)));
        assert!(!hash.ct_eq(&KeyHash::of("other")));
        assert_eq!(KeyHash::from_hex(&hash.to_hex()), Some(hash));
    }
}
