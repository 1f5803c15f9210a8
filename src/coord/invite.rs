//! Join tokens: everything a new node needs to enroll, in one copy-pasteable string.
//!
//! A token carries the coordinator's address(es), its static public key (which
//! the node pins for the Noise handshake) and a random secret. The coordinator
//! stores only a hash of the secret, so its database alone cannot mint joins.

use anyhow::{Result, anyhow, bail};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use blake2::{Blake2s256, Digest};
use rand_core::{OsRng, RngCore};
use serde::{Deserialize, Serialize};

use crate::keys::Key;

/// Marks the token format; a later format gets a new prefix.
pub const TOKEN_PREFIX: &str = "warren1-";
const SECRET_LEN: usize = 32;
/// Domain separation: this hash is only ever an invite lookup key.
const SECRET_HASH_LABEL: &[u8] = b"warren invite secret v1";
/// A token longer than this is not one of ours; refuse before decoding.
pub const MAX_TOKEN_LEN: usize = 2048;
/// What a user is told about a token that does not decode: a copy-and-paste
/// accident, so the decoder's own detail (a JSON column) would only confuse.
pub const DAMAGED: &str = "invalid join token: damaged or truncated";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinToken {
    /// Coordinator addresses, `host:port`, tried in order.
    #[serde(rename = "a")]
    pub servers: Vec<String>,
    #[serde(rename = "k")]
    pub server_key: Key,
    #[serde(rename = "s")]
    pub secret: String,
}

impl JoinToken {
    pub fn new(servers: Vec<String>, server_key: Key) -> JoinToken {
        let mut secret = [0u8; SECRET_LEN];
        OsRng.fill_bytes(&mut secret);
        JoinToken {
            servers,
            server_key,
            secret: URL_SAFE_NO_PAD.encode(secret),
        }
    }

    pub fn encode(&self) -> String {
        let json = serde_json::to_vec(self).unwrap_or_default();
        format!("{TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(json))
    }

    pub fn parse(token: &str) -> Result<JoinToken> {
        let token = token.trim();
        if token.len() > MAX_TOKEN_LEN {
            bail!("invalid join token: {} characters is too long", token.len());
        }
        let body = token
            .strip_prefix(TOKEN_PREFIX)
            .ok_or_else(|| anyhow!("invalid join token: it does not start with {TOKEN_PREFIX:?}"))?;
        let json = URL_SAFE_NO_PAD.decode(body).map_err(|_| anyhow!(DAMAGED))?;
        let t: JoinToken = serde_json::from_slice(&json).map_err(|_| anyhow!(DAMAGED))?;
        if t.servers.is_empty() {
            bail!("invalid join token: it names no coordinator address");
        }
        Ok(t)
    }
}

/// What the coordinator stores and looks invites up by.
pub fn secret_hash(secret: &str) -> Vec<u8> {
    let mut h = Blake2s256::new();
    h.update(SECRET_HASH_LABEL);
    h.update(secret.as_bytes());
    h.finalize().to_vec()
}

/// Parses `90s`, `30m`, `24h`, `7d` (or a bare number of seconds) into seconds.
pub fn parse_duration(s: &str) -> Result<i64> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: i64 = num
        .parse()
        .map_err(|_| anyhow!("invalid duration {s:?}: expected e.g. 30m, 24h, 7d"))?;
    let mult = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => bail!("invalid duration {s:?}: unit must be s, m, h or d"),
    };
    n.checked_mul(mult)
        .filter(|&v| v > 0)
        .ok_or_else(|| anyhow!("invalid duration {s:?}: out of range"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_round_trips_and_carries_a_fresh_secret() {
        let key = Key::generate_private().public_key();
        let t = JoinToken::new(vec!["203.0.113.1:7777".into(), "coord.example:7777".into()], key);
        let parsed = JoinToken::parse(&format!("  {}\n", t.encode())).unwrap();
        assert_eq!(parsed, t);
        assert_ne!(JoinToken::new(vec!["x:1".into()], key).secret, t.secret);
        assert_eq!(secret_hash(&t.secret), secret_hash(&parsed.secret));
        assert_ne!(secret_hash(&t.secret), secret_hash("other"));
    }

    #[test]
    fn damaged_tokens_are_refused_with_a_reason() {
        let err = format!("{:#}", JoinToken::parse("hello").unwrap_err());
        assert_eq!(err, "invalid join token: it does not start with \"warren1-\"");
    }

    #[test]
    fn damaged_or_truncated_tokens_say_so_and_nothing_more() {
        let t = JoinToken::new(vec!["x:1".into()], Key::generate_private().public_key()).encode();
        let mut damaged = t.clone();
        damaged.insert(20, '!');
        let mut flipped = t.clone().into_bytes();
        flipped[12] = if flipped[12] == b'A' { b'B' } else { b'A' };
        let flipped = String::from_utf8(flipped).unwrap();
        let mut bad: Vec<&str> = vec![damaged.as_str(), flipped.as_str(), "warren1-", "warren1-e30"];
        // Cut anywhere: every prefix longer than the marker is refused the same way
        // (except the ones that happen to be a complete shorter token, which none is).
        bad.extend((TOKEN_PREFIX.len() + 1..t.len()).map(|n| &t[..n]));
        for bad in bad {
            let err = format!("{:#}", JoinToken::parse(bad).unwrap_err());
            assert_eq!(err, DAMAGED, "{bad}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("24h").unwrap(), 86400);
        assert_eq!(parse_duration("30m").unwrap(), 1800);
        assert_eq!(parse_duration("7d").unwrap(), 604_800);
        assert_eq!(parse_duration("45").unwrap(), 45);
        for bad in ["", "h", "1y", "-1h", "0s", "99999999999999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
