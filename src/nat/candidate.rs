//! Endpoint candidates: where a peer may reach this node directly. Each is a
//! pair, the WireGuard endpoint and the matching endpoint of the agent's
//! plain UDP check socket, so a check that passes on one predicts the other
//! (both sockets sit behind the same NAT and the same firewall).

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use crate::ifaddrs::IfAddr;

/// How a candidate was learned. The order is the preference among passing
/// pairs: an address on a shared LAN beats a mapping on a router, a mapping
/// the router promised (port mapping) beats one STUN observed: it is fixed
/// for every destination, where a symmetric NAT's observed one is not.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// An address of one of the node's own interfaces.
    Local,
    /// Router mappings made on request (`portmap`), by protocol.
    Pcp,
    NatPmp,
    Upnp,
    /// The public mapping of the WireGuard socket, learned from WG-STUN.
    WgStun,
    /// Learned from the source of a peer's check: the peer's NAT gave it a
    /// mapping nobody announced. Good for checks only; its WireGuard
    /// endpoint is unknown, so nobody dials it.
    PeerReflexive,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Local => "local",
            Kind::Pcp => "pcp",
            Kind::NatPmp => "natpmp",
            Kind::Upnp => "upnp",
            Kind::WgStun => "wgstun",
            Kind::PeerReflexive => "prflx",
        }
    }

    pub fn is_portmap(self) -> bool {
        matches!(self, Kind::Pcp | Kind::NatPmp | Kind::Upnp)
    }

    pub fn to_wire(self) -> u8 {
        match self {
            Kind::Local => 1,
            Kind::Upnp => 2,
            Kind::WgStun => 3,
            Kind::PeerReflexive => 4,
            Kind::NatPmp => 5,
            Kind::Pcp => 6,
        }
    }

    pub fn from_wire(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Local,
            2 => Kind::Upnp,
            3 => Kind::WgStun,
            4 => Kind::PeerReflexive,
            5 => Kind::NatPmp,
            6 => Kind::Pcp,
            _ => return None,
        })
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Candidate {
    pub kind: Kind,
    /// Where to send WireGuard datagrams.
    pub wg: SocketAddr,
    /// Where to send checks.
    pub check: SocketAddr,
}

/// Whether `ip` is a private (RFC 1918, ULA) or shared-address-space address:
/// reachable only inside some network, never across the internet.
pub fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            v4.is_private() || (o[0] == 100 && (o[1] & 0xc0) == 64)
        }
        IpAddr::V6(v6) => (v6.segments()[0] & 0xfe00) == 0xfc00,
    }
}

/// The local candidates: every address of every up interface except
/// loopback, the mesh interface itself, link-local and mesh addresses.
/// Sorted and deduplicated, so an unchanged network gives an unchanged list.
pub fn local(addrs: &[IfAddr], mesh_ifname: &str, wg_port: u16, check_port: u16) -> Vec<Candidate> {
    let mut out: Vec<Candidate> = addrs
        .iter()
        .filter(|a| a.up && a.ifname != mesh_ifname && usable(a.addr))
        .map(|a| Candidate {
            kind: Kind::Local,
            wg: SocketAddr::new(a.addr, wg_port),
            check: SocketAddr::new(a.addr, check_port),
        })
        .collect();
    out.sort_by_key(|c| (c.wg.is_ipv6(), c.wg));
    out.dedup();
    out
}

fn usable(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            let mesh = o[0] == 100 && (o[1] & 0xc0) == 64;
            !(v4.is_loopback() || v4.is_link_local() || v4.is_unspecified() || v4.is_multicast() || mesh)
        }
        IpAddr::V6(v6) => {
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || v6.is_unicast_link_local()
                // IPv4-mapped addresses are IPv4's, already listed.
                || v6.to_ipv4_mapped().is_some())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(ifname: &str, addr: &str, up: bool) -> IfAddr {
        IfAddr {
            ifname: ifname.into(),
            addr: addr.parse().unwrap(),
            up,
        }
    }

    #[test]
    fn local_candidates_skip_loopback_mesh_link_local_and_down_interfaces() {
        let addrs = [
            a("lo", "127.0.0.1", true),
            a("lo", "::1", true),
            a("eth0", "10.1.0.2", true),
            a("eth0", "fe80::1", true),
            a("eth0", "2001:db8::2", true),
            a("eth0", "169.254.3.4", true),
            a("wg0", "100.64.0.9", true),
            a("eth1", "192.168.9.9", false),
            a("tun7", "100.100.1.1", true),
            a("eth0", "10.1.0.2", true),
        ];
        let c = local(&addrs, "wg0", 51820, 51821);
        let wg: Vec<String> = c.iter().map(|c| c.wg.to_string()).collect();
        assert_eq!(wg, ["10.1.0.2:51820", "[2001:db8::2]:51820"]);
        assert!(c.iter().all(|c| c.kind == Kind::Local && c.check.port() == 51821));
        assert_eq!(c[0].check, "10.1.0.2:51821".parse().unwrap());
    }

    #[test]
    fn kinds_round_trip_and_prefer_lan() {
        for k in [
            Kind::Local,
            Kind::Pcp,
            Kind::NatPmp,
            Kind::Upnp,
            Kind::WgStun,
            Kind::PeerReflexive,
        ] {
            assert_eq!(Kind::from_wire(k.to_wire()), Some(k));
        }
        assert_eq!(Kind::from_wire(0), None);
        assert!(Kind::Local < Kind::Pcp && Kind::Upnp < Kind::WgStun);
        assert!(is_private("10.0.0.1".parse().unwrap()) && !is_private("203.0.113.1".parse().unwrap()));
        assert!(is_private("fd00::1".parse().unwrap()) && !is_private("2001:db8::1".parse().unwrap()));
    }
}
