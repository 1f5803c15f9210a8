//! Routes through a link: in the main table (the mesh's 100.64.0.0/10 and
//! friends) or in a table of their own (policy routing, exit nodes).

use std::net::IpAddr;

use anyhow::{Result, anyhow};
use netlink_packet_core::{NLM_F_CREATE, NLM_F_DUMP, NLM_F_REPLACE};

use super::Rtnl;
use super::addr::{AF_INET, AF_INET6, family};
use super::attr::{Request, attrs, split_header};
use super::socket::NlError;
use crate::wg::AllowedIp;

// From <linux/rtnetlink.h>.
pub(super) const RTM_NEWROUTE: u16 = 24;
pub(super) const RTM_DELROUTE: u16 = 25;
const RTM_GETROUTE: u16 = 26;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const RTA_PRIORITY: u16 = 6;
const RTA_TABLE: u16 = 15;
pub const RT_TABLE_MAIN: u32 = 254;
/// The protocol warren's routes carry (`ip route` shows `proto 87`): they
/// are told apart from an administrator's routes through the same
/// interface, which warren never touches. 87 is 'W', unused by iproute2's
/// rt_protos.
pub const RTPROT_WARREN: u8 = 87;
const RT_SCOPE_LINK: u8 = 253;
const RTN_UNICAST: u8 = 1;
/// `struct rtmsg`: family, dst_len, src_len, tos, table, protocol, scope,
/// type (u8 each), flags (u32).
const RTMSG_LEN: usize = 12;

/// A route as the kernel lists it (of one table).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RouteEntry {
    pub dst: AllowedIp,
    pub oif: Option<u32>,
    /// The next hop, for routes through a router (the default route's is
    /// where port-mapping requests go).
    pub gateway: Option<IpAddr>,
    /// Lower wins among routes to the same destination.
    pub metric: u32,
    /// Who added it (RTPROT_*: kernel, boot, static, [`RTPROT_WARREN`], ...).
    pub protocol: u8,
}

/// The header's table field is 8 bits: larger tables go in RTA_TABLE only
/// (as `ip route` does); RTA_TABLE is always sent, so the kernel uses it.
pub(super) fn header_table(table: u32) -> u8 {
    u8::try_from(table).unwrap_or(0)
}

fn rtmsg(family: u8, dst_len: u8, table: u32, kind: u8) -> [u8; RTMSG_LEN] {
    let mut h = [0u8; RTMSG_LEN];
    h[0] = family;
    h[1] = dst_len;
    h[4] = header_table(table);
    if kind != 0 {
        h[5] = RTPROT_WARREN;
        h[6] = RT_SCOPE_LINK;
        h[7] = kind;
    }
    h
}

fn route_request(kind: u16, table: u32, dst: AllowedIp, index: u32) -> Request {
    let mut req = Request::new(kind, &rtmsg(family(dst.addr), dst.cidr, table, RTN_UNICAST));
    req.u32(RTA_TABLE, table)
        .ip(RTA_DST, dst.addr)
        .u32(RTA_OIF, index);
    req
}

/// A unicast route of an RTM_NEWROUTE/RTM_DELROUTE message and its table;
/// `None` for other route types and families.
pub(super) fn parse_route(payload: &[u8]) -> Result<Option<(u32, RouteEntry)>, NlError> {
    let (header, rest) = split_header::<RTMSG_LEN>(payload, "rtmsg")?;
    let mut table = header[4] as u32;
    let mut dst: Option<IpAddr> = None;
    let mut oif = None;
    let mut gateway = None;
    let mut metric = 0;
    for attr in attrs(rest, "route") {
        let attr = attr?;
        match attr.kind {
            RTA_DST => dst = Some(attr.ip("RTA_DST")?),
            RTA_OIF => oif = Some(attr.u32("RTA_OIF")?),
            RTA_GATEWAY => gateway = Some(attr.ip("RTA_GATEWAY")?),
            RTA_PRIORITY => metric = attr.u32("RTA_PRIORITY")?,
            RTA_TABLE => table = attr.u32("RTA_TABLE")?,
            _ => {}
        }
    }
    if header[7] != RTN_UNICAST {
        return Ok(None);
    }
    let dst = match (dst, header[0]) {
        (Some(d), _) => d,
        // The default route carries no destination attribute.
        (None, AF_INET) => IpAddr::V4(0.into()),
        (None, AF_INET6) => IpAddr::V6(0.into()),
        (None, _) => return Ok(None),
    };
    let Ok(dst) = AllowedIp::new(dst, header[1]) else {
        return Ok(None);
    };
    Ok(Some((
        table,
        RouteEntry {
            dst,
            oif,
            gateway,
            metric,
            protocol: header[5],
        },
    )))
}

/// A unicast route of the main table (what the monitor reports).
pub(super) fn main_route(payload: &[u8]) -> Option<RouteEntry> {
    match parse_route(payload) {
        Ok(Some((RT_TABLE_MAIN, r))) => Some(r),
        _ => None,
    }
}

impl Rtnl {
    /// Adds or replaces a route to `dst` through link `index` (main table).
    pub fn replace_route(&mut self, dst: AllowedIp, index: u32) -> Result<()> {
        self.replace_route_in(RT_TABLE_MAIN, dst, index)
    }

    pub fn del_route(&mut self, dst: AllowedIp, index: u32) -> Result<()> {
        self.del_route_in(RT_TABLE_MAIN, dst, index)
    }

    /// Unicast routes of the main table (IPv4 and IPv6).
    pub fn routes(&mut self) -> Result<Vec<RouteEntry>> {
        self.routes_in(RT_TABLE_MAIN)
    }

    /// Adds or replaces a route to `dst` through link `index` in `table`.
    pub fn replace_route_in(&mut self, table: u32, dst: AllowedIp, index: u32) -> Result<()> {
        let req = route_request(RTM_NEWROUTE, table, dst, index);
        self.request(req, NLM_F_CREATE | NLM_F_REPLACE).map_err(|e| {
            let what = self.describe(index);
            anyhow!("adding route {dst} via {what}{}: {e}", table_suffix(table))
        })?;
        Ok(())
    }

    pub fn del_route_in(&mut self, table: u32, dst: AllowedIp, index: u32) -> Result<()> {
        let req = route_request(RTM_DELROUTE, table, dst, index);
        self.request(req, 0).map_err(|e| {
            let what = self.describe(index);
            anyhow!("removing route {dst} via {what}{}: {e}", table_suffix(table))
        })?;
        Ok(())
    }

    /// Unicast routes of `table` (IPv4 and IPv6).
    pub fn routes_in(&mut self, table: u32) -> Result<Vec<RouteEntry>> {
        let mut out = Vec::new();
        for fam in [AF_INET, AF_INET6] {
            // The kernel dumps every table; the filter is ours.
            let req = Request::new(RTM_GETROUTE, &rtmsg(fam, 0, 0, 0));
            let msgs = self
                .request(req, NLM_F_DUMP)
                .map_err(|e| anyhow!("listing routes{}: {e}", table_suffix(table)))?;
            for m in msgs.iter().filter(|m| m.kind == RTM_NEWROUTE) {
                match parse_route(&m.payload) {
                    Ok(Some((t, r))) if t == table => out.push(r),
                    Ok(_) => {}
                    Err(e) => return Err(anyhow!("listing routes{}: {e}", table_suffix(table))),
                }
            }
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

/// " in table N" for errors about a table other than main.
fn table_suffix(table: u32) -> String {
    if table == RT_TABLE_MAIN {
        String::new()
    } else {
        format!(" in table {table}")
    }
}
