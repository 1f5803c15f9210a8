//! The names the responder knows: every node of the map (this one included)
//! under one domain, and the reverse of their mesh addresses.

use std::collections::HashMap;
use std::net::Ipv4Addr;

/// The domain when none is configured: `nas.warren`.
pub const DEFAULT_DOMAIN: &str = "warren";

/// Where a query's name falls.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lookup {
    /// A node of the mesh, by name or (reverse) by address.
    Node { name: String, addr: Ipv4Addr },
    /// In one of our zones, but no such node (NXDOMAIN).
    Missing,
    /// In our zones and exists, but holds no records (the domain itself, a
    /// part of the reverse zone): NOERROR with no answer.
    Empty,
    /// Neither the domain nor the mesh's reverse zone: not ours to answer.
    Foreign,
}

/// Names are kept lowercase: DNS compares names without case (RFC 4343).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NameTable {
    domain: Vec<String>,
    by_name: HashMap<String, Ipv4Addr>,
    by_addr: HashMap<Ipv4Addr, String>,
}

pub fn in_mesh(ip: Ipv4Addr) -> bool {
    let o = ip.octets();
    o[0] == 100 && (o[1] & 0xc0) == 64
}

impl NameTable {
    /// `domain` as typed (`warren`, `mesh.example.`): dots separate labels.
    pub fn new(domain: &str) -> NameTable {
        NameTable {
            domain: domain
                .split('.')
                .filter(|l| !l.is_empty())
                .map(str::to_ascii_lowercase)
                .collect(),
            ..NameTable::default()
        }
    }

    /// The table for this map: `nodes` is every node, this one included. A
    /// name that is not one DNS label (the coordinator's names are) is left out.
    pub fn with_nodes<'a>(domain: &str, nodes: impl IntoIterator<Item = (&'a str, Ipv4Addr)>) -> NameTable {
        let mut t = NameTable::new(domain);
        for (name, addr) in nodes {
            if name.is_empty() || name.len() > 63 || name.contains('.') {
                continue;
            }
            let name = name.to_ascii_lowercase();
            t.by_addr.insert(addr, name.clone());
            t.by_name.insert(name, addr);
        }
        t
    }

    pub fn domain(&self) -> String {
        self.domain.join(".")
    }

    /// Every node as (`name.domain`, address), sorted by name: the hosts-file block.
    pub fn entries(&self) -> Vec<(String, Ipv4Addr)> {
        let domain = self.domain();
        let mut v: Vec<_> = self
            .by_name
            .iter()
            .map(|(n, a)| (format!("{n}.{domain}"), *a))
            .collect();
        v.sort();
        v
    }

    /// Where the name given as its labels (any case) falls.
    pub fn lookup(&self, labels: &[&[u8]]) -> Lookup {
        let lower: Vec<String> = labels
            .iter()
            .map(|l| String::from_utf8_lossy(l).to_ascii_lowercase())
            .collect();
        if let Some(host) = self.under_domain(&lower) {
            return match host {
                [] => Lookup::Empty,
                [name] => match self.by_name.get(name) {
                    Some(addr) => Lookup::Node {
                        name: name.clone(),
                        addr: *addr,
                    },
                    None => Lookup::Missing,
                },
                _ => Lookup::Missing,
            };
        }
        self.reverse(&lower)
    }

    /// The labels before the domain, if the name is in it.
    fn under_domain<'n>(&self, name: &'n [String]) -> Option<&'n [String]> {
        let host_len = name.len().checked_sub(self.domain.len())?;
        (name[host_len..] == self.domain[..]).then_some(&name[..host_len])
    }

    /// `d.c.b.a.in-addr.arpa` for a mesh address (100.64.0.0/10): the
    /// zone is every `B.100.in-addr.arpa` with B in 64..=127.
    fn reverse(&self, name: &[String]) -> Lookup {
        let Some(octets) = name.strip_suffix(&["in-addr".to_string(), "arpa".to_string()]) else {
            return Lookup::Foreign;
        };
        // Most significant octet last; a zone is at least two of them deep.
        let parsed: Vec<Option<u8>> = octets.iter().rev().map(|o| parse_octet(o)).collect();
        let (Some(Some(100)), Some(Some(second))) = (parsed.first(), parsed.get(1)) else {
            return Lookup::Foreign;
        };
        if !in_mesh(Ipv4Addr::new(100, *second, 0, 0)) {
            return Lookup::Foreign;
        }
        match parsed[..] {
            [Some(a), Some(b), Some(c), Some(d)] => {
                let addr = Ipv4Addr::new(a, b, c, d);
                match self.by_addr.get(&addr) {
                    Some(name) => Lookup::Node {
                        name: name.clone(),
                        addr,
                    },
                    None => Lookup::Missing,
                }
            }
            // 100.B.C: a zone cut above some addresses, not a name of its own.
            [_, _] | [_, _, Some(_)] => Lookup::Empty,
            _ => Lookup::Missing,
        }
    }

    /// The PTR target for a node: its full name.
    pub fn full_name(&self, name: &str) -> String {
        format!("{name}.{}", self.domain())
    }
}

/// A decimal octet as written in a reverse name: no sign, no leading zeros.
fn parse_octet(s: &str) -> Option<u8> {
    if s.is_empty()
        || s.len() > 3
        || (s.len() > 1 && s.starts_with('0'))
        || !s.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    s.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> NameTable {
        NameTable::with_nodes(
            "warren",
            [
                ("nas", Ipv4Addr::new(100, 64, 0, 9)),
                ("Laptop", Ipv4Addr::new(100, 100, 3, 4)),
                ("bad.name", Ipv4Addr::new(100, 64, 0, 10)),
            ],
        )
    }

    fn look(t: &NameTable, name: &str) -> Lookup {
        let labels: Vec<&[u8]> = name
            .split('.')
            .filter(|l| !l.is_empty())
            .map(str::as_bytes)
            .collect();
        t.lookup(&labels)
    }

    #[test]
    fn forward_names_any_case() {
        let t = table();
        let nas = Lookup::Node {
            name: "nas".into(),
            addr: Ipv4Addr::new(100, 64, 0, 9),
        };
        assert_eq!(look(&t, "nas.warren"), nas);
        assert_eq!(look(&t, "NaS.WARREN."), nas);
        assert!(matches!(look(&t, "laptop.warren"), Lookup::Node { .. }));
        assert_eq!(look(&t, "printer.warren"), Lookup::Missing);
        assert_eq!(look(&t, "a.nas.warren"), Lookup::Missing);
        assert_eq!(look(&t, "bad.name.warren"), Lookup::Missing);
        assert_eq!(look(&t, "warren"), Lookup::Empty);
        assert_eq!(look(&t, "example.com"), Lookup::Foreign);
        assert_eq!(look(&t, "nas.warren.com"), Lookup::Foreign);
        assert_eq!(look(&t, ""), Lookup::Foreign);
    }

    #[test]
    fn reverse_names_of_the_mesh_only() {
        let t = table();
        assert_eq!(
            look(&t, "9.0.64.100.in-addr.arpa"),
            Lookup::Node {
                name: "nas".into(),
                addr: Ipv4Addr::new(100, 64, 0, 9)
            }
        );
        assert!(matches!(
            look(&t, "4.3.100.100.IN-ADDR.ARPA"),
            Lookup::Node { .. }
        ));
        assert_eq!(look(&t, "8.0.64.100.in-addr.arpa"), Lookup::Missing);
        assert_eq!(look(&t, "09.0.64.100.in-addr.arpa"), Lookup::Missing);
        assert_eq!(look(&t, "1.9.0.64.100.in-addr.arpa"), Lookup::Missing);
        assert_eq!(look(&t, "64.100.in-addr.arpa"), Lookup::Empty);
        assert_eq!(look(&t, "0.127.100.in-addr.arpa"), Lookup::Empty);
        // 100.128.0.0 and up, 100.63 and below: outside 100.64.0.0/10.
        assert_eq!(look(&t, "1.0.128.100.in-addr.arpa"), Lookup::Foreign);
        assert_eq!(look(&t, "1.0.63.100.in-addr.arpa"), Lookup::Foreign);
        assert_eq!(look(&t, "1.1.168.192.in-addr.arpa"), Lookup::Foreign);
        assert_eq!(look(&t, "100.in-addr.arpa"), Lookup::Foreign);
        assert_eq!(look(&t, "in-addr.arpa"), Lookup::Foreign);
    }

    #[test]
    fn another_domain() {
        let t = NameTable::with_nodes("Mesh.Example.", [("nas", Ipv4Addr::new(100, 64, 0, 9))]);
        assert!(matches!(look(&t, "nas.mesh.example"), Lookup::Node { .. }));
        assert_eq!(look(&t, "nas.warren"), Lookup::Foreign);
        assert_eq!(
            t.entries(),
            vec![("nas.mesh.example".to_string(), Ipv4Addr::new(100, 64, 0, 9))]
        );
    }
}
