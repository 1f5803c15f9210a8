//! The mesh's access policy as the coordinator sends it to agents, and the
//! grammar of its parts (targets and ports), shared by the coordinator's
//! validation (`coord::policy`) and the agent's compiler (`firewall::policy`)
//! so both read a rule the same way.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

/// Largest policy file accepted: bounds the message every agent gets.
pub const MAX_POLICY_BYTES: usize = 16 * 1024;
/// Most accept rules in a policy.
pub const MAX_RULES: usize = 256;
/// Most tags in a policy.
pub const MAX_TAGS: usize = 256;

/// A validated policy: who may open connections to whom.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// Names this policy by its text (see `coord::policy::digest`), for `warren status`.
    pub digest: String,
    #[serde(default)]
    pub tags: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    pub accept: Vec<Rule>,
}

/// `from` may open connections to `to` on `ports` (strings as in the file).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    pub from: Vec<String>,
    pub to: Vec<String>,
    pub ports: Vec<String>,
}

/// One entry of a rule's `from` or `to`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target<'a> {
    /// `*`: every node.
    Any,
    /// `tag:NAME`.
    Tag(&'a str),
    /// A node's name.
    Node(&'a str),
    /// An IPv4 prefix (only in `to`): forwarded traffic to it.
    Prefix(Prefix),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Prefix {
    pub addr: Ipv4Addr,
    pub len: u8,
}

impl Prefix {
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let mask = mask(self.len);
        u32::from(ip) & mask == u32::from(self.addr)
    }
}

impl std::fmt::Display for Prefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

fn mask(len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(len))
    }
}

const TAG_PREFIX: &str = "tag:";

pub fn parse_target(s: &str) -> Result<Target<'_>, String> {
    if s == "*" {
        return Ok(Target::Any);
    }
    if let Some(tag) = s.strip_prefix(TAG_PREFIX) {
        if !is_name(tag) {
            return Err(format!(
                "{s:?}: a tag name is lowercase letters, digits and hyphens"
            ));
        }
        return Ok(Target::Tag(tag));
    }
    if s.contains('/') || s.parse::<Ipv4Addr>().is_ok() {
        return parse_prefix(s).map(Target::Prefix);
    }
    if !is_name(s) {
        return Err(format!(
            "{s:?} is not a node name, \"tag:NAME\", \"*\" or an IPv4 prefix"
        ));
    }
    Ok(Target::Node(s))
}

fn parse_prefix(s: &str) -> Result<Prefix, String> {
    let (addr, len) = s.split_once('/').unwrap_or((s, "32"));
    let addr: Ipv4Addr = addr
        .parse()
        .map_err(|_| format!("{s:?}: bad prefix: {addr:?} is not an IPv4 address"))?;
    let len: u8 = match len.parse() {
        Ok(l) if l <= 32 => l,
        _ => return Err(format!("{s:?}: bad prefix: length {len:?} is not 0 to 32")),
    };
    if u32::from(addr) & !mask(len) != 0 {
        return Err(format!(
            "{s:?}: bad prefix: address bits set beyond /{len} (did you mean {}/{len}?)",
            Ipv4Addr::from(u32::from(addr) & mask(len))
        ));
    }
    Ok(Prefix { addr, len })
}

/// Node names and tags: DNS labels, as the coordinator hands out names.
fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= crate::control::messages::MAX_NAME_LEN
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proto {
    Tcp,
    Udp,
    Icmp,
}

impl Proto {
    pub fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::Icmp => "icmp",
        }
    }
}

/// One entry of a rule's `ports`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PortSpec {
    /// `*`: every protocol and port.
    Any,
    /// `tcp`, `udp` (every port) or `icmp`.
    Proto(Proto),
    /// `tcp/22`, `udp/5000-5100`: an inclusive range.
    Range(Proto, u16, u16),
}

pub fn parse_ports(s: &str) -> Result<PortSpec, String> {
    if s == "*" {
        return Ok(PortSpec::Any);
    }
    let (proto, ports) = match s.split_once('/') {
        Some((p, r)) => (p, Some(r)),
        None => (s, None),
    };
    let proto = match proto {
        "tcp" => Proto::Tcp,
        "udp" => Proto::Udp,
        "icmp" => Proto::Icmp,
        other => {
            return Err(format!(
                "{s:?}: unknown protocol {other:?} (tcp, udp, icmp or \"*\")"
            ));
        }
    };
    let Some(ports) = ports else {
        return Ok(PortSpec::Proto(proto));
    };
    if proto == Proto::Icmp {
        return Err(format!("{s:?}: icmp has no ports (write \"icmp\")"));
    }
    let port = |p: &str| match p.parse::<u16>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("{s:?}: bad port {p:?} (1 to 65535)")),
    };
    let (lo, hi) = match ports.split_once('-') {
        Some((lo, hi)) => (port(lo)?, port(hi)?),
        None => {
            let p = port(ports)?;
            (p, p)
        }
    };
    if lo > hi {
        return Err(format!("{s:?}: bad port range: {lo} is above {hi}"));
    }
    Ok(PortSpec::Range(proto, lo, hi))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        assert_eq!(parse_target("*"), Ok(Target::Any));
        assert_eq!(parse_target("tag:nas"), Ok(Target::Tag("nas")));
        assert_eq!(parse_target("alice-laptop"), Ok(Target::Node("alice-laptop")));
        let p = |a: [u8; 4], len| {
            Ok(Target::Prefix(Prefix {
                addr: Ipv4Addr::from(a),
                len,
            }))
        };
        assert_eq!(parse_target("192.168.1.0/24"), p([192, 168, 1, 0], 24));
        assert_eq!(parse_target("0.0.0.0/0"), p([0, 0, 0, 0], 0));
        assert_eq!(parse_target("10.0.0.1"), p([10, 0, 0, 1], 32));
        for (bad, why) in [
            (
                "192.168.1.5/24",
                "address bits set beyond /24 (did you mean 192.168.1.0/24?)",
            ),
            ("10.0.0.0/33", "length \"33\" is not 0 to 32"),
            ("10.0.0/8", "\"10.0.0\" is not an IPv4 address"),
            ("tag:", "a tag name is"),
            ("Bad Name", "is not a node name"),
        ] {
            let e = parse_target(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn ports() {
        assert_eq!(parse_ports("*"), Ok(PortSpec::Any));
        assert_eq!(parse_ports("icmp"), Ok(PortSpec::Proto(Proto::Icmp)));
        assert_eq!(parse_ports("udp"), Ok(PortSpec::Proto(Proto::Udp)));
        assert_eq!(parse_ports("tcp/22"), Ok(PortSpec::Range(Proto::Tcp, 22, 22)));
        assert_eq!(
            parse_ports("tcp/8000-8100"),
            Ok(PortSpec::Range(Proto::Tcp, 8000, 8100))
        );
        for (bad, why) in [
            ("sctp/1", "unknown protocol \"sctp\""),
            ("tcp/0", "bad port \"0\""),
            ("tcp/70000", "bad port \"70000\""),
            ("tcp/200-100", "200 is above 100"),
            ("tcp/", "bad port \"\""),
            ("icmp/8", "icmp has no ports"),
        ] {
            let e = parse_ports(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn prefix_contains() {
        let Ok(Target::Prefix(p)) = parse_target("192.168.1.0/24") else {
            panic!()
        };
        assert!(p.contains(Ipv4Addr::new(192, 168, 1, 77)));
        assert!(!p.contains(Ipv4Addr::new(192, 168, 2, 1)));
        let Ok(Target::Prefix(all)) = parse_target("0.0.0.0/0") else {
            panic!()
        };
        assert!(all.contains(Ipv4Addr::new(8, 8, 8, 8)));
    }
}
