//! WireGuard public keys as they travel: 32 bytes, standard base64 on the wire and in configs.

use std::fmt;
use std::str::FromStr;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

/// A Curve25519 public key. Only public keys ever appear in Trellis's shared model.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey(pub [u8; 32]);

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("{0:?} is not a WireGuard key (44 characters of base64 for 32 bytes)")]
pub struct KeyParseError(pub String);

/// Decodes a base64 WireGuard key (public or private) into its 32 bytes.
pub fn decode_key(text: &str) -> Result<[u8; 32], KeyParseError> {
    let bytes = STANDARD
        .decode(text.trim())
        .map_err(|_| KeyParseError(text.to_string()))?;
    bytes
        .try_into()
        .map_err(|_| KeyParseError(text.to_string()))
}

/// Encodes 32 key bytes as base64, as `wg` prints them.
pub fn encode_key(key: &[u8; 32]) -> String {
    STANDARD.encode(key)
}

impl FromStr for PublicKey {
    type Err = KeyParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        decode_key(s).map(Self)
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&encode_key(&self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

impl serde::Serialize for PublicKey {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for PublicKey {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_base64_and_json() {
        let key = PublicKey([7; 32]);
        let text = key.to_string();
        assert_eq!(text.len(), 44);
        assert_eq!(text.parse::<PublicKey>().unwrap(), key);
        let json = serde_json::to_string(&key).unwrap();
        assert_eq!(serde_json::from_str::<PublicKey>(&json).unwrap(), key);
    }

    #[test]
    fn rejects_wrong_lengths_and_garbage() {
        assert!("".parse::<PublicKey>().is_err());
        assert!("not base64!".parse::<PublicKey>().is_err());
        assert!(encode_key(&[0; 32])[..40].parse::<PublicKey>().is_err());
        assert!("AAAA".parse::<PublicKey>().is_err());
    }
}
