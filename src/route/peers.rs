//! Which prefixes go to which peer: every peer's approved routes (from the
//! peer map) and the default route to the chosen exit node, minus what would
//! cut this node off its own LAN. Pure: the agent applies the result to
//! WireGuard's allowed IPs (src/agent/run/wireguard.rs) and to the kernel's
//! routes (`kernel`).

use std::collections::BTreeMap;

use crate::control::messages::PeerInfo;
use crate::keys::Key;
use crate::route::advert::DEFAULT_ROUTE;
use crate::wg::AllowedIp;

/// Where the exit node stands, for the log and `warren status`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Exit {
    /// None chosen.
    Off,
    /// The chosen peer carries the default route.
    Via { name: String, key: Key },
    /// Chosen but unusable: traffic keeps the normal default route (fail
    /// open, as a home router's users expect), for this reason.
    Unusable { name: String, why: &'static str },
}

/// The routes through the mesh this node uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// Subnet prefixes per peer, beyond its mesh address.
    pub routes: BTreeMap<Key, Vec<AllowedIp>>,
    pub exit: Exit,
    /// Prefixes left out, with the peer's name and why: one log line each.
    pub skipped: Vec<String>,
}

impl Plan {
    /// The allowed IPs to add to `key`'s mesh address.
    pub fn allowed_ips(&self, key: &Key) -> Vec<AllowedIp> {
        let mut out = self.routes.get(key).cloned().unwrap_or_default();
        if matches!(&self.exit, Exit::Via { key: k, .. } if k == key) {
            out.push(DEFAULT_ROUTE);
        }
        out
    }

    /// Every subnet prefix, for the kernel's routes on the mesh interface.
    pub fn prefixes(&self) -> Vec<AllowedIp> {
        let mut v: Vec<AllowedIp> = self.routes.values().flatten().copied().collect();
        v.sort();
        v
    }
}

/// `own`: the prefixes of this node's other interfaces (its LANs). A
/// prefix two peers publish goes to the one with the lower id (the
/// coordinator publishes it for one only; this holds for any coordinator).
pub fn plan(peers: &[PeerInfo], own: &[AllowedIp], exit_node: Option<&str>) -> Plan {
    let mut sorted: Vec<&PeerInfo> = peers.iter().collect();
    sorted.sort_by_key(|p| p.id);
    let mut owner: BTreeMap<AllowedIp, &str> = BTreeMap::new();
    let mut routes: BTreeMap<Key, Vec<AllowedIp>> = BTreeMap::new();
    let mut skipped = Vec::new();
    for p in &sorted {
        for r in &p.routes {
            if let Some(lan) = own.iter().find(|l| l.overlaps(r)) {
                skipped.push(format!(
                    "route {r} of {}: not used, it covers this node's own network {lan}",
                    p.name
                ));
            } else if r.cidr == 0 || !r.addr.is_ipv4() {
                skipped.push(format!("route {r} of {}: not used, not an IPv4 subnet", p.name));
            } else if let Some(first) = owner.get(r) {
                skipped.push(format!(
                    "route {r} of {}: not used, {first} has it too (lower id)",
                    p.name
                ));
            } else {
                owner.insert(*r, &p.name);
                routes.entry(p.public_key).or_default().push(*r);
            }
        }
    }
    let exit = match exit_node {
        None => Exit::Off,
        Some(name) => match sorted.iter().find(|p| p.name == name) {
            None => Exit::Unusable {
                name: name.to_string(),
                why: "no such node in the mesh",
            },
            Some(p) if !p.exit => Exit::Unusable {
                name: name.to_string(),
                why: "not an approved exit node",
            },
            Some(p) if !p.online => Exit::Unusable {
                name: name.to_string(),
                why: "offline",
            },
            Some(p) => Exit::Via {
                name: name.to_string(),
                key: p.public_key,
            },
        },
    };
    Plan {
        routes,
        exit,
        skipped,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> AllowedIp {
        s.parse().unwrap()
    }

    fn peer(id: u64, name: &str, routes: &[&str], exit: bool, online: bool) -> PeerInfo {
        PeerInfo {
            id,
            name: name.into(),
            mesh_addr: std::net::Ipv4Addr::new(100, 64, 0, 8 + id as u8),
            public_key: Key([id as u8; 32]),
            candidates: vec![],
            online,
            home_relay: None,
            routes: routes.iter().map(|r| ip(r)).collect(),
            exit,
        }
    }

    #[test]
    fn nested_prefixes_stay_a_shared_one_goes_to_the_lower_id_and_the_own_lan_is_skipped() {
        let peers = vec![
            peer(7, "b", &["10.1.0.0/16", "192.168.7.0/24"], false, true),
            peer(
                3,
                "a",
                &["10.0.0.0/8", "192.168.7.0/24", "192.168.1.0/24"],
                false,
                true,
            ),
        ];
        let own = [ip("192.168.1.0/24"), ip("203.0.113.0/24")];
        let p = plan(&peers, &own, None);
        assert_eq!(
            p.allowed_ips(&Key([3; 32])),
            vec![ip("10.0.0.0/8"), ip("192.168.7.0/24")]
        );
        assert_eq!(p.allowed_ips(&Key([7; 32])), vec![ip("10.1.0.0/16")]);
        assert_eq!(p.skipped.len(), 2, "{:?}", p.skipped);
        assert!(
            p.skipped[0].contains("own network 192.168.1.0/24"),
            "{:?}",
            p.skipped
        );
        assert!(p.skipped[1].contains("a has it too"), "{:?}", p.skipped);
        assert_eq!(p.exit, Exit::Off);
    }

    #[test]
    fn the_exit_node_gets_the_default_route_only_when_approved_and_online() {
        let peers = vec![
            peer(1, "gw", &[], true, true),
            peer(2, "off", &[], true, false),
            peer(3, "plain", &[], false, true),
        ];
        let p = plan(&peers, &[], Some("gw"));
        assert_eq!(p.allowed_ips(&Key([1; 32])), vec![DEFAULT_ROUTE]);
        assert!(
            p.prefixes().is_empty(),
            "the default route is policy routing's, not a main-table route"
        );
        for (name, why) in [
            ("off", "offline"),
            ("plain", "not an approved exit node"),
            ("ghost", "no such node in the mesh"),
        ] {
            let p = plan(&peers, &[], Some(name));
            assert_eq!(
                p.exit,
                Exit::Unusable {
                    name: name.into(),
                    why
                }
            );
            assert!(peers.iter().all(|q| p.allowed_ips(&q.public_key).is_empty()));
        }
    }
}
