//! WireGuard keys: X25519, standard base64, byte-compatible with `wg genkey` / `wg pubkey`.

use std::fmt;
use std::str::FromStr;

use anyhow::{Context, Result, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use rand_core::{OsRng, RngCore};

pub const KEY_LEN: usize = 32;

/// A 32-byte WireGuard key (private, public or preshared). `Debug` never prints
/// the bytes so a private key cannot end up in a log by accident.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key(pub [u8; KEY_LEN]);

impl Key {
    /// A fresh private key, clamped the way `wg genkey` clamps it.
    pub fn generate_private() -> Key {
        let mut bytes = [0u8; KEY_LEN];
        OsRng.fill_bytes(&mut bytes);
        bytes[0] &= 248;
        bytes[31] &= 127;
        bytes[31] |= 64;
        Key(bytes)
    }

    /// A fresh random preshared key (`wg genpsk`).
    pub fn generate_preshared() -> Key {
        let mut bytes = [0u8; KEY_LEN];
        OsRng.fill_bytes(&mut bytes);
        Key(bytes)
    }

    pub fn public_key(&self) -> Key {
        let secret = x25519_dalek::StaticSecret::from(self.0);
        Key(x25519_dalek::PublicKey::from(&secret).to_bytes())
    }

    pub fn is_zero(&self) -> bool {
        self.0 == [0u8; KEY_LEN]
    }

    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }

    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn from_hex(s: &str) -> Result<Key> {
        if s.len() != KEY_LEN * 2 {
            bail!("key must be {} hex digits, got {}", KEY_LEN * 2, s.len());
        }
        let mut out = [0u8; KEY_LEN];
        for (i, chunk) in s.as_bytes().chunks(2).enumerate() {
            let pair = std::str::from_utf8(chunk).context("key is not ASCII hex")?;
            out[i] = u8::from_str_radix(pair, 16)
                .with_context(|| format!("invalid hex digit in key at byte {i}"))?;
        }
        Ok(Key(out))
    }

    /// First 8 base64 characters: enough to tell peers apart in a log line.
    pub fn short(&self) -> String {
        self.to_base64()[..8].to_string()
    }
}

impl FromStr for Key {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Key> {
        let s = s.trim();
        // A 32-byte key is always 44 base64 characters ending in a single '='.
        if s.len() != 44 || !s.ends_with('=') || s.ends_with("==") {
            bail!(
                "invalid key: expected 44 base64 characters (32 bytes), got {} characters",
                s.len()
            );
        }
        let bytes = STANDARD
            .decode(s)
            .map_err(|e| anyhow::anyhow!("invalid key: not base64 ({e})"))?;
        let arr: [u8; KEY_LEN] = bytes
            .try_into()
            .map_err(|_| anyhow::anyhow!("invalid key: does not decode to 32 bytes"))?;
        Ok(Key(arr))
    }
}

impl fmt::Display for Key {
    /// Displays the base64 form. Callers that log must use [`Key::short`] on
    /// public keys only; never format a private key into a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_base64())
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({}…)", &self.to_base64()[..8])
    }
}

impl serde::Serialize for Key {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_base64())
    }
}

impl<'de> serde::Deserialize<'de> for Key {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Key, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // RFC 7748 section 6.1 test vector (Alice).
    const ALICE_PRIV_HEX: &str = "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a";
    const ALICE_PUB_HEX: &str = "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a";

    #[test]
    fn public_key_matches_rfc7748_vector() {
        let private = Key::from_hex(ALICE_PRIV_HEX).unwrap();
        assert_eq!(private.public_key().to_hex(), ALICE_PUB_HEX);
    }

    #[test]
    fn base64_round_trip() {
        let k = Key::generate_private();
        let parsed: Key = k.to_base64().parse().unwrap();
        assert_eq!(parsed, k);
        assert_eq!(k.to_base64().len(), 44);
    }

    #[test]
    fn generated_private_keys_are_clamped() {
        let k = Key::generate_private();
        assert_eq!(k.0[0] & 7, 0);
        assert_eq!(k.0[31] & 128, 0);
        assert_eq!(k.0[31] & 64, 64);
    }

    #[test]
    fn malformed_keys_are_rejected_with_a_reason() {
        for bad in ["", "abc", "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!=", "AAAA"] {
            let err = bad.parse::<Key>().unwrap_err().to_string();
            assert!(err.starts_with("invalid key"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn debug_does_not_reveal_the_key() {
        let k = Key::generate_private();
        assert!(!format!("{k:?}").contains(&k.to_base64()));
    }
}
