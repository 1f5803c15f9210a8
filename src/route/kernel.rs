//! The kernel's routes for peers' subnets: one route per approved prefix
//! through the mesh interface in the main table, next to the mesh's own
//! 100.64.0.0/10 that the interface address brings. Declarative: every
//! route through the mesh interface with warren's protocol is ours, so one
//! left by an agent that crashed is removed on the next sync; a route an
//! administrator added through the interface is never touched.

use std::collections::BTreeSet;
use std::net::IpAddr;

use anyhow::Result;

use crate::netlink::{RTPROT_WARREN, RouteEntry, Rtnl};
use crate::wg::AllowedIp;

/// Prefixes of this node's own networks: IPv4 routes of the main table
/// through other interfaces (connected LANs and routes to them), the
/// default route aside. A peer's route overlapping one is not installed.
pub fn own_networks(routes: &[RouteEntry], mesh_index: Option<u32>) -> Vec<AllowedIp> {
    routes
        .iter()
        .filter(|r| r.dst.addr.is_ipv4() && r.dst.cidr > 0 && r.oif != mesh_index)
        .filter(|r| !is_mesh(&r.dst))
        .map(|r| r.dst)
        .collect()
}

fn is_mesh(p: &AllowedIp) -> bool {
    matches!(p.addr, IpAddr::V4(a) if crate::dns::names::in_mesh(a))
}

/// The routes through the mesh interface that are ours.
fn ours(routes: &[RouteEntry], index: u32) -> BTreeSet<AllowedIp> {
    routes
        .iter()
        .filter(|r| r.oif == Some(index) && r.protocol == RTPROT_WARREN)
        .filter(|r| r.dst.addr.is_ipv4() && r.dst.cidr > 0 && !is_mesh(&r.dst))
        .map(|r| r.dst)
        .collect()
}

/// Makes the routes through `index` exactly `want`; `routes` is the main
/// table as read just before. Logs each change.
pub fn sync(
    rtnl: &mut Rtnl,
    ifname: &str,
    index: u32,
    routes: &[RouteEntry],
    want: &[AllowedIp],
) -> Result<()> {
    let have = ours(routes, index);
    let want: BTreeSet<AllowedIp> = want.iter().copied().collect();
    for p in want.difference(&have) {
        rtnl.replace_route(*p, index)?;
        log!("agent: route {p} via {ifname}");
    }
    for p in have.difference(&want) {
        rtnl.del_route(*p, index)?;
        log!("agent: route {p} via {ifname} removed");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(dst: &str, oif: u32) -> RouteEntry {
        RouteEntry {
            dst: dst.parse().unwrap(),
            oif: Some(oif),
            gateway: None,
            metric: 0,
            protocol: RTPROT_WARREN,
        }
    }

    #[test]
    fn own_networks_and_ours_split_the_table_by_interface() {
        let table = vec![
            route("0.0.0.0/0", 2),
            route("192.168.1.0/24", 2),
            route("100.64.0.0/10", 9),
            route("10.5.0.0/16", 9),
            route("fd00::/64", 9),
            // An administrator's route through the mesh interface.
            RouteEntry {
                protocol: 4,
                ..route("10.6.0.0/16", 9)
            },
        ];
        assert_eq!(
            own_networks(&table, Some(9)),
            vec!["192.168.1.0/24".parse().unwrap()]
        );
        assert_eq!(
            ours(&table, 9).into_iter().collect::<Vec<_>>(),
            vec!["10.5.0.0/16".parse::<AllowedIp>().unwrap()]
        );
    }
}
