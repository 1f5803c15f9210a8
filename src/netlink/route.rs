//! Routes through a link in the main table (the mesh's 100.64.0.0/10 and
//! friends).

use std::net::IpAddr;

use anyhow::{Result, anyhow};
use netlink_packet_core::{NLM_F_CREATE, NLM_F_DUMP, NLM_F_REPLACE};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};

use super::Rtnl;
use super::addr::family;
use crate::wg::AllowedIp;

/// A route as the kernel lists it (main table only).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RouteEntry {
    pub dst: AllowedIp,
    pub oif: Option<u32>,
    /// The next hop, for routes through a router (the default route's is
    /// where port-mapping requests go).
    pub gateway: Option<IpAddr>,
    /// Lower wins among routes to the same destination.
    pub metric: u32,
}

fn route_message(dst: AllowedIp, index: u32) -> RouteMessage {
    let mut msg = RouteMessage::default();
    msg.header.address_family = family(dst.addr);
    msg.header.destination_prefix_length = dst.cidr;
    msg.header.table = RouteHeader::RT_TABLE_MAIN;
    msg.header.protocol = RouteProtocol::Static;
    msg.header.scope = RouteScope::Link;
    msg.header.kind = RouteType::Unicast;
    msg.attributes
        .push(RouteAttribute::Destination(RouteAddress::from(dst.addr)));
    msg.attributes.push(RouteAttribute::Oif(index));
    msg
}

/// Destination and output interface of a route message, when it is a
/// unicast route in the main table.
pub(super) fn route_of(msg: &RouteMessage) -> Option<RouteEntry> {
    let mut table = msg.header.table as u32;
    let mut dst: Option<IpAddr> = None;
    let mut oif = None;
    let mut gateway = None;
    let mut metric = 0;
    for attr in &msg.attributes {
        match attr {
            RouteAttribute::Destination(RouteAddress::Inet(a)) => dst = Some((*a).into()),
            RouteAttribute::Destination(RouteAddress::Inet6(a)) => dst = Some((*a).into()),
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Gateway(RouteAddress::Inet(a)) => gateway = Some((*a).into()),
            RouteAttribute::Gateway(RouteAddress::Inet6(a)) => gateway = Some((*a).into()),
            RouteAttribute::Priority(p) => metric = *p,
            RouteAttribute::Table(t) => table = *t,
            _ => {}
        }
    }
    if table != RouteHeader::RT_TABLE_MAIN as u32 || msg.header.kind != RouteType::Unicast {
        return None;
    }
    let dst = match dst {
        Some(d) => d,
        // The default route carries no destination attribute.
        None if msg.header.address_family == netlink_packet_route::AddressFamily::Inet => {
            IpAddr::V4(0.into())
        }
        None if msg.header.address_family == netlink_packet_route::AddressFamily::Inet6 => {
            IpAddr::V6(0.into())
        }
        None => return None,
    };
    let dst = AllowedIp::new(dst, msg.header.destination_prefix_length).ok()?;
    Some(RouteEntry {
        dst,
        oif,
        gateway,
        metric,
    })
}

impl Rtnl {
    /// Adds or replaces a route to `dst` through link `index`.
    pub fn replace_route(&mut self, dst: AllowedIp, index: u32) -> Result<()> {
        let msg = route_message(dst, index);
        self.request(RouteNetlinkMessage::NewRoute(msg), NLM_F_CREATE | NLM_F_REPLACE)
            .map_err(|e| {
                let what = self.describe(index);
                anyhow!("adding route {dst} via {what}: {e}")
            })?;
        Ok(())
    }

    pub fn del_route(&mut self, dst: AllowedIp, index: u32) -> Result<()> {
        let msg = route_message(dst, index);
        self.request(RouteNetlinkMessage::DelRoute(msg), 0).map_err(|e| {
            let what = self.describe(index);
            anyhow!("removing route {dst} via {what}: {e}")
        })?;
        Ok(())
    }

    /// Unicast routes of the main table (IPv4 and IPv6).
    pub fn routes(&mut self) -> Result<Vec<RouteEntry>> {
        let mut out = Vec::new();
        for fam in [
            netlink_packet_route::AddressFamily::Inet,
            netlink_packet_route::AddressFamily::Inet6,
        ] {
            let mut req = RouteMessage::default();
            req.header.address_family = fam;
            let msgs = self
                .request(RouteNetlinkMessage::GetRoute(req), NLM_F_DUMP)
                .map_err(|e| anyhow!("listing routes: {e}"))?;
            out.extend(msgs.iter().filter_map(|m| match m {
                RouteNetlinkMessage::NewRoute(r) => route_of(r),
                _ => None,
            }));
        }
        Ok(out)
    }

    /// The IPv4 default route's next hop and link (lowest metric wins): the
    /// home router, which port-mapping requests go to.
    pub fn default_gateway_v4(&mut self) -> Result<Option<(std::net::Ipv4Addr, u32)>> {
        let routes = self.routes()?;
        Ok(routes
            .iter()
            .filter(|r| r.dst.cidr == 0 && r.dst.addr.is_ipv4())
            .filter_map(|r| match (r.gateway, r.oif) {
                (Some(IpAddr::V4(g)), Some(oif)) => Some((r.metric, g, oif)),
                _ => None,
            })
            .min()
            .map(|(_, g, oif)| (g, oif)))
    }
}
