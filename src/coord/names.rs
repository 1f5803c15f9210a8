//! Node names: DNS labels, unique in the mesh.

use anyhow::{Result, bail};

/// RFC 1035 label length limit.
pub const MAX_LABEL_LEN: usize = 63;
/// Name used when a hostname has nothing usable in it.
const FALLBACK_NAME: &str = "node";

/// Turns any hostname into a DNS-label-safe name: lowercase letters, digits and
/// inner hyphens, at most 63 characters. Only the first label of a FQDN is kept.
pub fn sanitize(raw: &str) -> String {
    let first = raw.trim().split('.').next().unwrap_or("");
    let mut out = String::new();
    for c in first.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            out.push(c);
        } else if !out.ends_with('-') && !out.is_empty() {
            out.push('-');
        }
    }
    out.truncate(MAX_LABEL_LEN);
    let out = out.trim_matches('-').to_string();
    if out.is_empty() {
        FALLBACK_NAME.to_string()
    } else {
        out
    }
}

/// Checks a name an administrator typed; unlike [`sanitize`] it refuses rather than fixes.
pub fn validate(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > MAX_LABEL_LEN {
        bail!("invalid name {name:?}: must be 1 to {MAX_LABEL_LEN} characters");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        bail!("invalid name {name:?}: only lowercase letters, digits and '-' are allowed");
    }
    if name.starts_with('-') || name.ends_with('-') {
        bail!("invalid name {name:?}: must not start or end with '-'");
    }
    Ok(())
}

/// The `n`th candidate for a wanted name: `base`, then `base-2`, `base-3`, …
/// trimmed so the suffix still fits in a label.
pub fn with_suffix(base: &str, n: u32) -> String {
    if n <= 1 {
        return base.to_string();
    }
    let suffix = format!("-{n}");
    let mut stem = base[..base.len().min(MAX_LABEL_LEN - suffix.len())].to_string();
    while stem.ends_with('-') {
        stem.pop();
    }
    format!("{stem}{suffix}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sanitizes_hostnames_into_labels() {
        assert_eq!(sanitize("NAS-Box.fritz.box"), "nas-box");
        assert_eq!(sanitize("my_router (2)"), "my-router-2");
        assert_eq!(sanitize("--"), "node");
        assert_eq!(sanitize(""), "node");
        assert_eq!(sanitize("ünïcode"), "n-code");
        let long = sanitize(&"a".repeat(100));
        assert_eq!(long.len(), 63);
        for s in ["NAS-Box", "my_router (2)", "-x-", &"b-".repeat(40)] {
            validate(&sanitize(s)).unwrap();
        }
    }

    #[test]
    fn validate_refuses_unsafe_names() {
        for bad in ["", "UPPER", "a.b", "-a", "a-", "spa ce", &"x".repeat(64)] {
            assert!(validate(bad).is_err(), "{bad:?}");
        }
        validate("nas-2").unwrap();
    }

    #[test]
    fn suffixes_fit_in_a_label() {
        assert_eq!(with_suffix("nas", 1), "nas");
        assert_eq!(with_suffix("nas", 2), "nas-2");
        let long = "a".repeat(63);
        assert_eq!(with_suffix(&long, 10).len(), 63);
        validate(&with_suffix(&long, 10)).unwrap();
    }
}
