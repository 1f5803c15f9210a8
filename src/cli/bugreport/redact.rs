//! What keeps secrets out of a bug report: every section passes through
//! [`Redactor::apply`] before it is written. Known secrets (the node's
//! private keys, its join secret, token files, server key files) are
//! replaced outright; anything shaped like a join token or a WireGuard key
//! is cut down, so a secret this code does not know of is caught by its shape.

use crate::coord::invite::TOKEN_PREFIX;

/// Base64 of a 32-byte key: 43 characters and one `=`.
const KEY_B64_LEN: usize = 44;
/// Hex of a 32-byte key (the UAPI protocol's form).
const KEY_HEX_LEN: usize = 64;
/// A key is shown by its first characters, as `Key::short` does.
const SHORT_KEY_LEN: usize = 8;
/// Known secrets shorter than this are not searched for (they would match
/// ordinary words).
const MIN_SECRET_LEN: usize = 8;

pub const SECRET_MARK: &str = "[secret redacted]";
pub const TOKEN_MARK: &str = "[token redacted]";
pub const HEX_KEY_MARK: &str = "[hex key redacted]";

#[derive(Default)]
pub struct Redactor {
    secrets: Vec<String>,
}

impl Redactor {
    /// Adds a secret to replace wherever it appears (and its hex form, if it is a key).
    pub fn secret(&mut self, s: &str) {
        let s = s.trim();
        if s.len() < MIN_SECRET_LEN {
            return;
        }
        if let Ok(k) = s.parse::<crate::keys::Key>() {
            self.secrets.push(k.to_hex());
        }
        self.secrets.push(s.to_string());
    }

    pub fn apply(&self, text: &str) -> String {
        let mut out = text.to_string();
        for s in &self.secrets {
            out = out.replace(s.as_str(), SECRET_MARK);
        }
        shorten_keys(&cut_tokens(&out))
    }
}

fn is_b64(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'+' || c == b'/'
}

fn is_token_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'-' || c == b'_'
}

/// `warren1-…` join tokens, whole, become [`TOKEN_MARK`].
fn cut_tokens(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(TOKEN_PREFIX) {
        out.push_str(&rest[..at]);
        let after = &rest[at + TOKEN_PREFIX.len()..];
        let len = after.bytes().take_while(|&c| is_token_char(c)).count();
        out.push_str(TOKEN_MARK);
        rest = &after[len..];
    }
    out.push_str(rest);
    out
}

/// Every whole 44-character base64 key becomes its first characters and
/// `…`; every whole 64-digit hex run becomes [`HEX_KEY_MARK`].
fn shorten_keys(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    let mut copied = 0;
    while i < b.len() {
        if !is_b64(b[i]) || (i > 0 && is_b64(b[i - 1])) {
            i += 1;
            continue;
        }
        let run = b[i..].iter().take_while(|&&c| is_b64(c)).count();
        let end = i + run;
        let padded = b.get(end) == Some(&b'=') && !b.get(end + 1).is_some_and(|&c| is_b64(c) || c == b'=');
        let hex = run == KEY_HEX_LEN && b[i..end].iter().all(u8::is_ascii_hexdigit);
        if padded && run + 1 == KEY_B64_LEN {
            out.push_str(&text[copied..i]);
            out.push_str(&text[i..i + SHORT_KEY_LEN]);
            out.push('…');
            copied = end + 1;
        } else if hex {
            out.push_str(&text[copied..i]);
            out.push_str(HEX_KEY_MARK);
            copied = end;
        }
        i = end;
    }
    out.push_str(&text[copied..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::Key;

    #[test]
    fn keys_are_shortened_and_known_secrets_replaced() {
        let private = Key::generate_private();
        let public = private.public_key();
        let mut r = Redactor::default();
        r.secret(&private.to_string());
        r.secret("s3cret-join-secret");
        let text = format!(
            "priv {private} hex {} pub {public}, \"{public}\"\nsecret s3cret-join-secret\n",
            private.to_hex()
        );
        let out = r.apply(&text);
        assert!(!out.contains(&private.to_string()), "{out}");
        assert!(!out.contains(&private.to_string()[..SHORT_KEY_LEN]), "{out}");
        assert!(!out.contains(&private.to_hex()), "{out}");
        assert!(!out.contains(&public.to_string()), "{out}");
        assert!(!out.contains("s3cret"), "{out}");
        assert_eq!(out.matches(&format!("{}…", public.short())).count(), 2, "{out}");
    }

    #[test]
    fn unknown_keys_and_tokens_are_caught_by_their_shape() {
        let key = Key::generate_private();
        let hex = Key::generate_private().to_hex();
        let token = format!("{TOKEN_PREFIX}eyJ2IjoxLCJrZXkiOiJ4eHgifQ_-x");
        let out = Redactor::default().apply(&format!("{token} k={key}\nuapi private_key={hex}\n"));
        assert_eq!(
            out,
            format!(
                "{TOKEN_MARK} k={}…\nuapi private_key={HEX_KEY_MARK}\n",
                key.short()
            )
        );
    }

    #[test]
    fn ordinary_text_is_left_alone() {
        let text = "peer 100.64.0.2/32 via /usr/lib/x86_64-linux-gnu/libc.so.6 == a=b ===\n";
        assert_eq!(Redactor::default().apply(text), text);
        // Longer base64 runs are not keys.
        let long = format!("{}=", "A".repeat(60));
        assert_eq!(Redactor::default().apply(&long), long);
    }
}
