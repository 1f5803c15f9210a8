//! What a node may offer to carry for the others: `--advertise-routes` and
//! `--advertise-exit`. The agent checks the flags before it starts and the
//! coordinator checks what arrives, with the same rules.

use std::net::{IpAddr, Ipv4Addr};

use anyhow::{Result, bail};

use crate::control::messages::{Advertised, MAX_ADVERTISED_ROUTES};
use crate::wg::AllowedIp;

/// The mesh's own range: routing it to one node would cut the mesh.
const MESH_RANGE: AllowedIp = AllowedIp {
    addr: IpAddr::V4(Ipv4Addr::new(100, 64, 0, 0)),
    cidr: 10,
};
/// Ranges no LAN is behind: this host's loopback, multicast, link-local.
const NOT_A_LAN: [AllowedIp; 3] = [
    AllowedIp {
        addr: IpAddr::V4(Ipv4Addr::new(127, 0, 0, 0)),
        cidr: 8,
    },
    AllowedIp {
        addr: IpAddr::V4(Ipv4Addr::new(224, 0, 0, 0)),
        cidr: 4,
    },
    AllowedIp {
        addr: IpAddr::V4(Ipv4Addr::new(169, 254, 0, 0)),
        cidr: 16,
    },
];

/// The default route: what an exit node carries.
pub const DEFAULT_ROUTE: AllowedIp = AllowedIp {
    addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
    cidr: 0,
};

/// Why `prefix` may not be advertised as a subnet route, if it may not.
pub fn check_route(prefix: &AllowedIp) -> Result<()> {
    if !prefix.addr.is_ipv4() {
        bail!("route {prefix}: only IPv4 prefixes can be advertised (the mesh is IPv4)");
    }
    if prefix.cidr == 0 {
        bail!("route {prefix}: the default route is the exit node's: use --advertise-exit");
    }
    if prefix.overlaps(&MESH_RANGE) {
        bail!("route {prefix}: overlaps the mesh's own range {MESH_RANGE}");
    }
    if let Some(r) = NOT_A_LAN.iter().find(|r| prefix.overlaps(r)) {
        bail!("route {prefix}: overlaps {r}, which is no LAN");
    }
    Ok(())
}

/// `--advertise-routes PREFIX[,PREFIX…]`: checked, duplicates dropped, in order.
pub fn parse_routes(list: &str) -> Result<Vec<AllowedIp>> {
    let mut out: Vec<AllowedIp> = Vec::new();
    for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let prefix: AllowedIp = item.parse()?;
        check_route(&prefix)?;
        if !out.contains(&prefix) {
            out.push(prefix);
        }
    }
    if out.len() > MAX_ADVERTISED_ROUTES {
        bail!("{} advertised routes: at most {MAX_ADVERTISED_ROUTES}", out.len());
    }
    Ok(out)
}

/// What of a node's offer the coordinator keeps, and the prefixes it drops
/// with the reason (an older or foreign agent may send anything).
pub fn sanitize(offer: &Advertised) -> (Advertised, Vec<String>) {
    let mut kept = Advertised {
        routes: Vec::new(),
        exit: offer.exit,
    };
    let mut dropped = Vec::new();
    for p in offer.routes.iter().take(MAX_ADVERTISED_ROUTES) {
        match check_route(p) {
            Ok(()) if !kept.routes.contains(p) => kept.routes.push(*p),
            Ok(()) => {}
            Err(e) => dropped.push(e.to_string()),
        }
    }
    (kept, dropped)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lan_prefixes_pass_and_the_rest_is_refused_with_the_reason() {
        assert_eq!(
            parse_routes("192.168.1.0/24, 10.0.0.0/8,192.168.1.7/24").unwrap(),
            vec![
                "192.168.1.0/24".parse().unwrap(),
                "10.0.0.0/8".parse::<AllowedIp>().unwrap()
            ]
        );
        for (bad, why) in [
            ("0.0.0.0/0", "--advertise-exit"),
            ("100.100.0.0/16", "mesh's own range"),
            ("96.0.0.0/4", "mesh's own range"),
            ("fd00::/64", "only IPv4"),
            ("127.0.0.0/16", "no LAN"),
            ("192.168.1.0/33", "prefix length"),
            ("lan", "bad address"),
        ] {
            let err = format!("{:#}", parse_routes(bad).unwrap_err());
            assert!(err.contains(why), "{bad}: {err}");
        }
        let many: Vec<String> = (0..=MAX_ADVERTISED_ROUTES)
            .map(|i| format!("10.{i}.0.0/16"))
            .collect();
        assert!(parse_routes(&many.join(",")).is_err());
    }

    #[test]
    fn the_coordinator_keeps_the_valid_part_of_an_offer() {
        let offer = Advertised {
            routes: vec![
                "192.168.1.0/24".parse().unwrap(),
                "100.64.0.0/24".parse().unwrap(),
                "192.168.1.0/24".parse().unwrap(),
            ],
            exit: true,
        };
        let (kept, dropped) = sanitize(&offer);
        assert_eq!(kept.routes, vec!["192.168.1.0/24".parse().unwrap()]);
        assert!(kept.exit);
        assert_eq!(dropped.len(), 1, "{dropped:?}");
    }
}
