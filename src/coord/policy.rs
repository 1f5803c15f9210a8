//! The policy file an administrator sets (`warren server policy set FILE`):
//! parsed from TOML and validated with the line of every mistake, so that a
//! refused file says where it went wrong and the old policy stays in force.
//!
//! ```toml
//! [tags]
//! nas = ["nas", "backup"]
//! [[accept]]
//! from = ["tag:laptop"]
//! to = ["tag:nas"]
//! ports = ["tcp/22", "icmp"]
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;

use blake2::{Blake2s256, Digest};
use serde::Deserialize;
use toml::Spanned;

use crate::control::policy::{
    MAX_POLICY_BYTES, MAX_RULES, MAX_TAGS, Policy, Rule, Target, parse_ports, parse_target,
};

/// Why a policy file is refused: the line (1-based; 0 when the whole file) and the reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyError {
    pub line: usize,
    pub reason: String,
}

impl std::fmt::Display for PolicyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.line == 0 {
            write!(f, "{}", self.reason)
        } else {
            write!(f, "line {}: {}", self.line, self.reason)
        }
    }
}

impl std::error::Error for PolicyError {}

type Names = Spanned<Vec<Spanned<String>>>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    tags: BTreeMap<Spanned<String>, Names>,
    #[serde(default)]
    accept: Vec<Spanned<RawRule>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    from: Names,
    to: Names,
    ports: Names,
}

/// Parses and validates a policy file.
pub fn parse(text: &str) -> Result<Policy, PolicyError> {
    let whole = |reason: String| PolicyError { line: 0, reason };
    if text.len() > MAX_POLICY_BYTES {
        return Err(whole(format!(
            "policy file of {} bytes exceeds the limit of {MAX_POLICY_BYTES}",
            text.len()
        )));
    }
    let at = |span: Range<usize>, reason: String| PolicyError {
        line: line_of(text, span.start),
        reason,
    };
    let file: File = toml::from_str(text).map_err(|e| PolicyError {
        line: e.span().map_or(0, |s| line_of(text, s.start)),
        // One line: toml puts what it expected on lines of its own.
        reason: e
            .message()
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join(": "),
    })?;
    if file.tags.len() > MAX_TAGS {
        return Err(whole(format!(
            "{} tags exceed the limit of {MAX_TAGS}",
            file.tags.len()
        )));
    }
    if file.accept.len() > MAX_RULES {
        return Err(whole(format!(
            "{} accept rules exceed the limit of {MAX_RULES}",
            file.accept.len()
        )));
    }
    let mut tags = BTreeMap::new();
    for (tag, members) in &file.tags {
        if !matches!(
            parse_target(&format!("tag:{}", tag.get_ref())),
            Ok(Target::Tag(_))
        ) {
            return Err(at(
                tag.span(),
                format!(
                    "tag {:?}: a tag name is lowercase letters, digits and hyphens",
                    tag.get_ref()
                ),
            ));
        }
        let mut names = Vec::new();
        for m in members.get_ref() {
            match parse_target(m.get_ref()) {
                Ok(Target::Node(n)) => names.push(n.to_string()),
                _ => {
                    return Err(at(
                        m.span(),
                        format!(
                            "tag {:?}: {:?} is not a node name (a tag lists node names)",
                            tag.get_ref(),
                            m.get_ref()
                        ),
                    ));
                }
            }
        }
        tags.insert(tag.get_ref().clone(), names);
    }
    let mut accept = Vec::new();
    for rule in &file.accept {
        let r = rule.get_ref();
        let from = targets(text, "from", &r.from, &tags, false)?;
        let to = targets(text, "to", &r.to, &tags, true)?;
        if r.ports.get_ref().is_empty() {
            return Err(at(
                r.ports.span(),
                "ports is empty: list what the rule accepts (\"*\" for everything)".into(),
            ));
        }
        let mut ports = Vec::new();
        for p in r.ports.get_ref() {
            parse_ports(p.get_ref()).map_err(|e| at(p.span(), e))?;
            ports.push(p.get_ref().clone());
        }
        accept.push(Rule { from, to, ports });
    }
    Ok(Policy {
        digest: digest(text),
        tags,
        accept,
    })
}

fn targets(
    text: &str,
    field: &str,
    names: &Names,
    tags: &BTreeMap<String, Vec<String>>,
    prefixes_allowed: bool,
) -> Result<Vec<String>, PolicyError> {
    let at = |span: Range<usize>, reason: String| PolicyError {
        line: line_of(text, span.start),
        reason,
    };
    if names.get_ref().is_empty() {
        return Err(at(
            names.span(),
            format!("{field} is empty: name nodes, \"tag:NAME\" or \"*\""),
        ));
    }
    let mut out = Vec::new();
    for n in names.get_ref() {
        match parse_target(n.get_ref()) {
            Err(e) => return Err(at(n.span(), format!("{field}: {e}"))),
            Ok(Target::Tag(t)) if !tags.contains_key(t) => {
                return Err(at(
                    n.span(),
                    format!("{field}: tag {t:?} is used but not defined in [tags]"),
                ));
            }
            Ok(Target::Prefix(_)) if !prefixes_allowed => {
                return Err(at(
                    n.span(),
                    format!(
                        "from: {:?}: sources are node names, \"tag:NAME\" or \"*\", not prefixes",
                        n.get_ref()
                    ),
                ));
            }
            Ok(_) => out.push(n.get_ref().clone()),
        }
    }
    Ok(out)
}

/// Node names the policy mentions (in tags or rules) that no node has: a
/// warning, not an error (a node may join later under that name).
pub fn unknown_names<'a>(policy: &Policy, known: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let known: BTreeSet<&str> = known.into_iter().collect();
    let mut mentioned: BTreeSet<&str> = policy.tags.values().flatten().map(String::as_str).collect();
    for r in &policy.accept {
        for t in r.from.iter().chain(&r.to) {
            if let Ok(Target::Node(n)) = parse_target(t) {
                mentioned.insert(n);
            }
        }
    }
    mentioned
        .into_iter()
        .filter(|n| !known.contains(n))
        .map(str::to_string)
        .collect()
}

/// Short name of a policy text: what `warren status` shows to tell policies apart.
pub fn digest(text: &str) -> String {
    let d = Blake2s256::digest(text.as_bytes());
    d[..8].iter().map(|b| format!("{b:02x}")).collect()
}

fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end].iter().filter(|&&b| b == b'\n').count() + 1
}

/// Entry for the fuzz target: never panics, and what it accepts is bounded.
pub fn fuzz_parse(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(p) = parse(text)
    {
        assert!(p.accept.len() <= MAX_RULES && p.tags.len() <= MAX_TAGS);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[tags]
nas = ["nas", "backup"]
laptop = ["alice-laptop", "bob-laptop"]

[[accept]]
from = ["tag:laptop"]
to = ["tag:nas", "192.168.1.0/24"]
ports = ["tcp/22", "tcp/445", "udp/53", "tcp/8000-8100", "icmp"]

[[accept]]
from = ["*"]
to = ["nas"]
ports = ["*"]
"#;

    #[test]
    fn a_good_file_is_kept_as_written() {
        let p = parse(GOOD).unwrap();
        assert_eq!(p.tags["laptop"], ["alice-laptop", "bob-laptop"]);
        assert_eq!(p.accept.len(), 2);
        assert_eq!(p.accept[0].to, ["tag:nas", "192.168.1.0/24"]);
        assert_eq!(p.accept[1].ports, ["*"]);
        assert_eq!(p.digest, digest(GOOD));
        assert_eq!(p.digest.len(), 16);
        assert_ne!(p.digest, digest(&GOOD.replace("22", "23")));
        // An empty file is a policy that accepts nothing.
        let empty = parse("").unwrap();
        assert!(empty.accept.is_empty() && empty.tags.is_empty());
    }

    fn err(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    fn rule(from: &str, to: &str, ports: &str) -> String {
        format!("[tags]\nnas = [\"nas\"]\n\n[[accept]]\nfrom = {from}\nto = {to}\nports = {ports}\n")
    }

    #[test]
    fn every_mistake_is_refused_with_its_line_and_reason() {
        let cases = [
            (
                rule(r#"["*"]"#, r#"["tag:nas"]"#, r#"["sctp/9"]"#),
                r#"line 7: "sctp/9": unknown protocol "sctp" (tcp, udp, icmp or "*")"#,
            ),
            (
                rule(r#"["*"]"#, r#"["tag:nas"]"#, r#"["tcp/22", "tcp/90-80"]"#),
                r#"line 7: "tcp/90-80": bad port range: 90 is above 80"#,
            ),
            (
                rule(r#"["*"]"#, r#"["tag:nas"]"#, r#"["tcp/99999"]"#),
                r#"line 7: "tcp/99999": bad port "99999" (1 to 65535)"#,
            ),
            (
                rule(r#"["*"]"#, r#"["10.1.0.0/8"]"#, r#"["*"]"#),
                r#"line 6: to: "10.1.0.0/8": bad prefix: address bits set beyond /8 (did you mean 10.0.0.0/8?)"#,
            ),
            (
                rule(r#"["tag:laptop"]"#, r#"["tag:nas"]"#, r#"["*"]"#),
                r#"line 5: from: tag "laptop" is used but not defined in [tags]"#,
            ),
            (
                rule(r#"[]"#, r#"["tag:nas"]"#, r#"["*"]"#),
                r#"line 5: from is empty: name nodes, "tag:NAME" or "*""#,
            ),
            (
                rule(r#"["*"]"#, r#"[]"#, r#"["*"]"#),
                r#"line 6: to is empty: name nodes, "tag:NAME" or "*""#,
            ),
            (
                rule(r#"["*"]"#, r#"["nas"]"#, r#"[]"#),
                r#"line 7: ports is empty: list what the rule accepts ("*" for everything)"#,
            ),
            (
                rule(r#"["10.0.0.0/8"]"#, r#"["nas"]"#, r#"["*"]"#),
                r#"line 5: from: "10.0.0.0/8": sources are node names, "tag:NAME" or "*", not prefixes"#,
            ),
            (
                rule(r#"["Alice Laptop"]"#, r#"["nas"]"#, r#"["*"]"#),
                r#"line 5: from: "Alice Laptop" is not a node name, "tag:NAME", "*" or an IPv4 prefix"#,
            ),
            (
                "[tags]\nnas = [\"tag:x\"]\n".into(),
                r#"line 2: tag "nas": "tag:x" is not a node name (a tag lists node names)"#,
            ),
            (
                "[tags]\n\"Big Box\" = [\"x\"]\n".into(),
                r#"line 2: tag "Big Box": a tag name is lowercase letters, digits and hyphens"#,
            ),
        ];
        for (text, want) in cases {
            assert_eq!(err(&text), want, "{text}");
        }
        // The TOML parser's own errors keep its line and reason.
        let e = err("[tags]\nnas = [\"nas\"\n");
        assert_eq!(e, "line 3: invalid array: expected `]`");
        let e = err("[[accept]]\nfrom = [\"*\"]\nto = [\"*\"]\n");
        assert_eq!(e, "line 1: missing field `ports`");
        let e = err("[[accept]]\nfrom = [\"*\"]\nto = [\"*\"]\nports = [\"*\"]\nport = 3\n");
        assert!(e.starts_with("line 5: unknown field `port`"), "{e}");
        let e = err("[[accept]]\nfrom = \"*\"\n");
        assert!(e.starts_with("line 2: invalid type"), "{e}");
        let e = err("colour = 1\n");
        assert!(e.starts_with("line 1: unknown field `colour`"), "{e}");
    }

    #[test]
    fn limits_are_said_in_the_error() {
        let big = format!("# {}\n", "x".repeat(MAX_POLICY_BYTES));
        assert_eq!(
            err(&big),
            format!(
                "policy file of {} bytes exceeds the limit of {MAX_POLICY_BYTES}",
                big.len()
            )
        );
        let many: String = (0..=MAX_RULES)
            .map(|_| "[[accept]]\nfrom=[\"*\"]\nto=[\"*\"]\nports=[\"*\"]\n")
            .collect();
        assert!(many.len() <= MAX_POLICY_BYTES);
        assert_eq!(
            err(&many),
            format!("{} accept rules exceed the limit of {MAX_RULES}", MAX_RULES + 1)
        );
        let tags: String = std::iter::once("[tags]\n".to_string())
            .chain((0..=MAX_TAGS).map(|i| format!("t{i}=[]\n")))
            .collect();
        assert_eq!(
            err(&tags),
            format!("{} tags exceed the limit of {MAX_TAGS}", MAX_TAGS + 1)
        );
    }

    #[test]
    fn names_no_node_has_are_listed() {
        let p = parse(GOOD).unwrap();
        assert_eq!(
            unknown_names(&p, ["nas", "alice-laptop"]),
            ["backup", "bob-laptop"]
        );
        assert!(unknown_names(&p, ["nas", "alice-laptop", "bob-laptop", "backup"]).is_empty());
    }

    #[test]
    fn garbage_never_panics() {
        for cut in 0..GOOD.len() {
            fuzz_parse(&GOOD.as_bytes()[..cut]);
            let mut flipped = GOOD.as_bytes().to_vec();
            flipped[cut] ^= 0x21;
            fuzz_parse(&flipped);
        }
    }
}
