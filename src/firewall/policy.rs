//! The policy compiler, sans IO: (policy, this node, the peer map) → what
//! this node's firewall accepts. The coordinator sends every node the whole
//! policy; each node keeps the rules whose `to` is itself (its input chain)
//! or a prefix (traffic it forwards), with `from` resolved to the mesh
//! addresses of the nodes it names now, so a rename, join or removal changes
//! the sets and nothing else.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use crate::control::policy::Policy;
use crate::control::policy::{PortSpec, Prefix, Rule, Target, parse_ports, parse_target};

/// Who a rule accepts connections from.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Sources {
    /// `*`: any sender on the mesh interface (WireGuard's allowed IPs
    /// already pin each peer's source addresses).
    Any,
    /// These mesh addresses; never empty.
    Set(BTreeSet<Ipv4Addr>),
}

/// One accepted (sources, destinations, ports) triple.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Accept {
    pub sources: Sources,
    /// Forwarded traffic only: the destination prefixes. Empty in the input chain.
    pub dests: Vec<Prefix>,
    /// In the rule's order, without repeats.
    pub ports: Vec<PortSpec>,
}

/// What this node's firewall accepts on its mesh interface; everything else
/// that is not a reply (conntrack) is refused.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ruleset {
    /// Connections to this node.
    pub input: Vec<Accept>,
    /// Connections this node forwards (subnet routes, exit node).
    pub forward: Vec<Accept>,
}

/// A node as the compiler needs it: its name and mesh address.
#[derive(Clone, Copy, Debug)]
pub struct Member<'a> {
    pub name: &'a str,
    pub addr: Ipv4Addr,
}

/// The ruleset for node `me` given the mesh's `peers` (without `me`).
/// Entries the coordinator validated never fail to parse here; one that
/// does (a newer coordinator's syntax) matches nothing rather than everything.
pub fn compile(policy: &Policy, me: &str, peers: &[Member]) -> Ruleset {
    let mut out = Ruleset::default();
    for rule in &policy.accept {
        let Some(sources) = sources(policy, rule, peers) else {
            continue;
        };
        let ports = distinct(rule.ports.iter().filter_map(|p| parse_ports(p).ok()));
        if ports.is_empty() {
            continue;
        }
        let to: Vec<Target> = rule.to.iter().filter_map(|t| parse_target(t).ok()).collect();
        if to.iter().any(|t| names(policy, t, me)) {
            out.input.push(Accept {
                sources: sources.clone(),
                dests: Vec::new(),
                ports: ports.clone(),
            });
        }
        let dests = distinct(to.iter().filter_map(|t| match t {
            Target::Prefix(p) => Some(*p),
            _ => None,
        }));
        if !dests.is_empty() {
            out.forward.push(Accept {
                sources,
                dests,
                ports,
            });
        }
    }
    out
}

/// In first-seen order without repeats. A rule lists a handful: a linear
/// check costs less code than a sort (the router build counts bytes).
fn distinct<T: PartialEq>(items: impl Iterator<Item = T>) -> Vec<T> {
    let mut out = Vec::new();
    for i in items {
        if !out.contains(&i) {
            out.push(i);
        }
    }
    out
}

/// Whether `target` names the node called `name`.
fn names(policy: &Policy, target: &Target, name: &str) -> bool {
    match target {
        Target::Any => true,
        Target::Node(n) => *n == name,
        Target::Tag(t) => policy.tags.get(*t).is_some_and(|m| m.iter().any(|n| n == name)),
        Target::Prefix(_) => false,
    }
}

/// The rule's senders among `peers`; `None` when it names none of them.
fn sources(policy: &Policy, rule: &Rule, peers: &[Member]) -> Option<Sources> {
    let from: Vec<Target> = rule.from.iter().filter_map(|t| parse_target(t).ok()).collect();
    if from.contains(&Target::Any) {
        return Some(Sources::Any);
    }
    let set: BTreeSet<Ipv4Addr> = peers
        .iter()
        .filter(|p| from.iter().any(|t| names(policy, t, p.name)))
        .map(|p| p.addr)
        .collect();
    (!set.is_empty()).then_some(Sources::Set(set))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::policy::Proto;
    use std::collections::BTreeMap;

    fn policy(tags: &[(&str, &[&str])], rules: &[(&[&str], &[&str], &[&str])]) -> Policy {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        Policy {
            digest: "d".into(),
            tags: tags
                .iter()
                .map(|(t, m)| (t.to_string(), s(m)))
                .collect::<BTreeMap<_, _>>(),
            accept: rules
                .iter()
                .map(|(f, t, p)| Rule {
                    from: s(f),
                    to: s(t),
                    ports: s(p),
                })
                .collect(),
        }
    }

    fn ip(last: u8) -> Ipv4Addr {
        Ipv4Addr::new(100, 64, 0, last)
    }

    /// nas .9, backup .10, alice-laptop .11, bob-laptop .12, pi .13
    fn mesh<'a>(names: &[(&'a str, u8)]) -> Vec<Member<'a>> {
        names
            .iter()
            .map(|&(name, l)| Member { name, addr: ip(l) })
            .collect()
    }

    const ALL: &[(&str, u8)] = &[
        ("nas", 9),
        ("backup", 10),
        ("alice-laptop", 11),
        ("bob-laptop", 12),
        ("pi", 13),
    ];

    fn peers_of<'a>(me: &str, all: &[(&'a str, u8)]) -> Vec<Member<'a>> {
        mesh(all).into_iter().filter(|m| m.name != me).collect()
    }

    fn set(lasts: &[u8]) -> Sources {
        Sources::Set(lasts.iter().map(|&l| ip(l)).collect())
    }

    fn tags() -> Vec<(&'static str, &'static [&'static str])> {
        vec![
            ("nas", &["nas", "backup"]),
            ("laptop", &["alice-laptop", "bob-laptop"]),
        ]
    }

    #[test]
    fn a_tag_accepts_from_a_tag_on_its_ports_only_at_its_members() {
        let p = policy(&tags(), &[(&["tag:laptop"], &["tag:nas"], &["tcp/22", "icmp"])]);
        for me in ["nas", "backup"] {
            let r = compile(&p, me, &peers_of(me, ALL));
            assert_eq!(
                r.input,
                [Accept {
                    sources: set(&[11, 12]),
                    dests: vec![],
                    ports: vec![PortSpec::Range(Proto::Tcp, 22, 22), PortSpec::Proto(Proto::Icmp)],
                }],
                "{me}"
            );
            assert!(r.forward.is_empty());
        }
        // A node in no rule's `to` accepts nothing (replies only).
        for me in ["alice-laptop", "pi"] {
            assert_eq!(compile(&p, me, &peers_of(me, ALL)), Ruleset::default(), "{me}");
        }
    }

    #[test]
    fn star_names_every_node_on_either_side() {
        let p = policy(&[], &[(&["*"], &["*"], &["*"])]);
        let r = compile(&p, "pi", &peers_of("pi", ALL));
        assert_eq!(r.input.len(), 1);
        assert_eq!(r.input[0].sources, Sources::Any);
        assert_eq!(r.input[0].ports, [PortSpec::Any]);
        // `*` in `to` is every node, not every destination: nothing is forwarded.
        assert!(r.forward.is_empty());
        let p = policy(&[], &[(&["pi"], &["*"], &["udp"])]);
        assert_eq!(
            compile(&p, "nas", &peers_of("nas", ALL)).input[0].sources,
            set(&[13])
        );
    }

    #[test]
    fn overlapping_rules_stay_separate_and_ports_are_deduplicated() {
        let p = policy(
            &tags(),
            &[
                (&["tag:laptop"], &["nas"], &["tcp/22", "tcp/22", "tcp/445"]),
                (&["alice-laptop", "pi"], &["tag:nas", "nas"], &["tcp/22"]),
            ],
        );
        let r = compile(&p, "nas", &peers_of("nas", ALL));
        assert_eq!(r.input.len(), 2);
        assert_eq!(r.input[0].sources, set(&[11, 12]));
        assert_eq!(
            r.input[0].ports,
            [
                PortSpec::Range(Proto::Tcp, 22, 22),
                PortSpec::Range(Proto::Tcp, 445, 445)
            ]
        );
        assert_eq!(r.input[1].sources, set(&[11, 13]));
        // backup is in tag:nas for the second rule only.
        let r = compile(&p, "backup", &peers_of("backup", ALL));
        assert_eq!(r.input.len(), 1);
        assert_eq!(r.input[0].sources, set(&[11, 13]));
    }

    #[test]
    fn prefixes_in_to_are_the_forward_chain() {
        let p = policy(
            &tags(),
            &[
                (
                    &["tag:laptop"],
                    &["192.168.1.0/24", "pi", "10.0.0.0/8", "192.168.1.0/24"],
                    &["tcp/80"],
                ),
                (&["*"], &["0.0.0.0/0"], &["*"]),
            ],
        );
        let r = compile(&p, "pi", &peers_of("pi", ALL));
        assert_eq!(r.input.len(), 1);
        assert_eq!(r.forward.len(), 2);
        let dests: Vec<String> = r.forward[0].dests.iter().map(|d| d.to_string()).collect();
        assert_eq!(dests, ["192.168.1.0/24", "10.0.0.0/8"]);
        assert_eq!(r.forward[0].sources, set(&[11, 12]));
        assert_eq!(r.forward[1].sources, Sources::Any);
        // Every node compiles the forward rules: a router without them refuses to forward.
        assert_eq!(compile(&p, "nas", &peers_of("nas", ALL)).forward.len(), 2);
    }

    #[test]
    fn renames_joins_and_removals_change_only_the_sets() {
        let p = policy(&tags(), &[(&["tag:laptop"], &["tag:nas"], &["tcp/22"])]);
        let before = compile(&p, "nas", &peers_of("nas", ALL));
        // bob-laptop is renamed: it leaves the tag.
        let renamed = [
            ("nas", 9),
            ("backup", 10),
            ("alice-laptop", 11),
            ("bob-old", 12),
            ("pi", 13),
        ];
        let after = compile(&p, "nas", &peers_of("nas", &renamed));
        assert_eq!(after.input[0].sources, set(&[11]));
        assert_eq!(after.input[0].ports, before.input[0].ports);
        // Both laptops gone: the rule names nobody and is left out.
        let gone = [("nas", 9), ("backup", 10), ("pi", 13)];
        assert_eq!(compile(&p, "nas", &peers_of("nas", &gone)), Ruleset::default());
        // A laptop joins later under a listed name.
        let joined = [("nas", 9), ("bob-laptop", 40)];
        assert_eq!(
            compile(&p, "nas", &peers_of("nas", &joined)).input[0].sources,
            set(&[40])
        );
        // This node renamed out of the tag: nothing is accepted any more.
        let me_renamed = [("nas2", 9), ("alice-laptop", 11)];
        assert_eq!(
            compile(&p, "nas2", &peers_of("nas2", &me_renamed)),
            Ruleset::default()
        );
    }

    #[test]
    fn an_entry_the_agent_cannot_read_matches_nothing() {
        let p = policy(
            &[],
            &[(&["*"], &["*"], &["sctp/9"]), (&["future:x"], &["*"], &["*"])],
        );
        assert_eq!(compile(&p, "nas", &peers_of("nas", ALL)), Ruleset::default());
    }
}
