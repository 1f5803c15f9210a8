//! Links: look up, create (wireguard, veth), delete, up/down, MTU.

use anyhow::{Result, anyhow};
use netlink_packet_core::{NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL};

use super::attr::{Request, attrs, split_header, u32_at};
use super::socket::NlError;
use super::{Reply, Rtnl};

// Message types and attributes from <linux/rtnetlink.h> and <linux/if_link.h>.
pub(super) const RTM_NEWLINK: u16 = 16;
pub(super) const RTM_DELLINK: u16 = 17;
const RTM_GETLINK: u16 = 18;
const RTM_SETLINK: u16 = 19;
const IFLA_IFNAME: u16 = 3;
const IFLA_MTU: u16 = 4;
const IFLA_LINKINFO: u16 = 18;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_INFO_DATA: u16 = 2;
const VETH_INFO_PEER: u16 = 1;
const IFF_UP: u32 = 1;
/// `struct ifinfomsg`: family, pad, type (u16), index (i32), flags, change mask.
const IFINFOMSG_LEN: usize = 16;

/// What rtnetlink says about one link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkState {
    pub index: u32,
    pub name: String,
    /// Administratively up (IFF_UP).
    pub up: bool,
    pub mtu: u32,
    /// The link kind ("wireguard", "veth", ...), when it has one.
    pub kind: Option<String>,
}

impl LinkState {
    /// Parses an RTM_NEWLINK/RTM_DELLINK payload (`ifinfomsg` and attributes).
    pub(super) fn parse(payload: &[u8]) -> Result<LinkState, NlError> {
        let (header, rest) = split_header::<IFINFOMSG_LEN>(payload, "ifinfomsg")?;
        let mut state = LinkState {
            index: u32_at(header, 4),
            name: String::new(),
            up: u32_at(header, 8) & IFF_UP != 0,
            mtu: 0,
            kind: None,
        };
        for attr in attrs(rest, "link") {
            let attr = attr?;
            match attr.kind {
                IFLA_IFNAME => state.name = attr.string(),
                IFLA_MTU => state.mtu = attr.u32("IFLA_MTU")?,
                IFLA_LINKINFO => {
                    for info in attrs(attr.value, "IFLA_LINKINFO") {
                        let info = info?;
                        if info.kind == IFLA_INFO_KIND {
                            state.kind = Some(info.string());
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(state)
    }
}

/// `struct ifinfomsg` for link `index` (0: by name) with these flags.
fn ifinfomsg(index: u32, flags: u32, change: u32) -> [u8; IFINFOMSG_LEN] {
    let mut h = [0u8; IFINFOMSG_LEN];
    h[4..8].copy_from_slice(&index.to_ne_bytes());
    h[8..12].copy_from_slice(&flags.to_ne_bytes());
    h[12..16].copy_from_slice(&change.to_ne_bytes());
    h
}

fn link_by_name(kind: u16, name: &str) -> Request {
    let mut req = Request::new(kind, &ifinfomsg(0, 0, 0));
    req.str(IFLA_IFNAME, name);
    req
}

fn link_by_index(kind: u16, index: u32) -> Request {
    Request::new(kind, &ifinfomsg(index, 0, 0))
}

/// What a new link is: its kind, and for veth the peer's name.
enum NewLink<'a> {
    Wireguard,
    Veth { peer: &'a str },
}

impl NewLink<'_> {
    fn kind(&self) -> &'static str {
        match self {
            NewLink::Wireguard => "wireguard",
            NewLink::Veth { .. } => "veth",
        }
    }
}

impl Rtnl {
    /// Interface index by name, `None` when there is no such link.
    pub fn link_index(&mut self, name: &str) -> Result<Option<u32>> {
        Ok(self.link(name)?.map(|l| l.index))
    }

    /// The link of this name, `None` when there is none.
    pub fn link(&mut self, name: &str) -> Result<Option<LinkState>> {
        check_name(name)?;
        match self.request(link_by_name(RTM_GETLINK, name), 0) {
            Ok(msgs) => first_link(&msgs).map_err(|e| anyhow!("looking up link {name}: {e}")),
            Err(NlError::Kernel(e)) if e == libc::ENODEV => Ok(None),
            Err(e) => Err(anyhow!("looking up link {name}: {e}")),
        }
    }

    /// The link with this index, `None` when there is none.
    pub fn link_by_index(&mut self, index: u32) -> Result<Option<LinkState>> {
        match self.request(link_by_index(RTM_GETLINK, index), 0) {
            Ok(msgs) => first_link(&msgs).map_err(|e| anyhow!("looking up link index {index}: {e}")),
            Err(NlError::Kernel(e)) if e == libc::ENODEV => Ok(None),
            Err(e) => Err(anyhow!("looking up link index {index}: {e}")),
        }
    }

    pub(super) fn link_name(&mut self, index: u32) -> Result<Option<String>> {
        Ok(self.link_by_index(index)?.map(|l| l.name))
    }

    /// Every link in this network namespace.
    pub fn links(&mut self) -> Result<Vec<LinkState>> {
        let msgs = self
            .request(link_by_index(RTM_GETLINK, 0), NLM_F_DUMP)
            .map_err(|e| anyhow!("listing links: {e}"))?;
        msgs.iter()
            .filter(|m| m.kind == RTM_NEWLINK)
            .map(|m| LinkState::parse(&m.payload))
            .collect::<Result<_, _>>()
            .map_err(|e| anyhow!("listing links: {e}"))
    }

    /// Creates a link of kind `wireguard` (kernel backend only).
    pub fn create_wireguard_link(&mut self, name: &str) -> Result<u32> {
        self.create_link(name, NewLink::Wireguard)
    }

    /// Creates a veth pair `name` <-> `peer` (both in this namespace).
    pub fn create_veth(&mut self, name: &str, peer: &str) -> Result<u32> {
        check_name(peer)?;
        self.create_link(name, NewLink::Veth { peer })
    }

    fn create_link(&mut self, name: &str, new: NewLink<'_>) -> Result<u32> {
        check_name(name)?;
        let kind = new.kind();
        let mut req = link_by_name(RTM_NEWLINK, name);
        let info = req.begin_nest(IFLA_LINKINFO);
        req.str(IFLA_INFO_KIND, kind);
        if let NewLink::Veth { peer } = new {
            let data = req.begin_nest(IFLA_INFO_DATA);
            let p = req.begin_nest(VETH_INFO_PEER);
            req.raw(&ifinfomsg(0, 0, 0)).str(IFLA_IFNAME, peer);
            req.end_nest(p);
            req.end_nest(data);
        }
        req.end_nest(info);
        self.request(req, NLM_F_CREATE | NLM_F_EXCL)
            .map_err(|e| match e.errno() {
                Some(libc::EOPNOTSUPP) => {
                    anyhow!("creating {kind} link {name}: link kind {kind:?} is not supported by this kernel")
                }
                _ => anyhow!("creating {kind} link {name}: {e}"),
            })?;
        self.link_index(name)?
            .ok_or_else(|| anyhow!("creating {kind} link {name}: created but not found afterwards"))
    }

    pub fn delete_link(&mut self, index: u32) -> Result<()> {
        let what = self.describe(index);
        self.request(link_by_index(RTM_DELLINK, index), 0)
            .map_err(|e| anyhow!("deleting link {what}: {e}"))?;
        Ok(())
    }

    pub fn set_link_up(&mut self, index: u32, up: bool) -> Result<()> {
        let flags = if up { IFF_UP } else { 0 };
        let req = Request::new(RTM_SETLINK, &ifinfomsg(index, flags, IFF_UP));
        self.request(req, 0).map_err(|e| {
            let what = self.describe(index);
            anyhow!("setting link {what} {}: {e}", if up { "up" } else { "down" })
        })?;
        Ok(())
    }

    pub fn set_mtu(&mut self, index: u32, mtu: u32) -> Result<()> {
        let mut req = link_by_index(RTM_SETLINK, index);
        req.u32(IFLA_MTU, mtu);
        self.request(req, 0).map_err(|e| {
            let what = self.describe(index);
            anyhow!("setting MTU {mtu} on {what}: {e}")
        })?;
        Ok(())
    }
}

fn first_link(msgs: &[Reply]) -> Result<Option<LinkState>, NlError> {
    msgs.iter()
        .find(|m| m.kind == RTM_NEWLINK)
        .map(|m| LinkState::parse(&m.payload))
        .transpose()
}

/// Interface names are at most 15 bytes (IFNAMSIZ - 1), no '/', no spaces.
pub fn check_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > 15 {
        return Err(anyhow!("invalid interface name {name:?}: must be 1 to 15 bytes"));
    }
    if name
        .bytes()
        .any(|b| b == b'/' || b == 0 || b.is_ascii_whitespace())
        || name == "."
        || name == ".."
    {
        return Err(anyhow!("invalid interface name {name:?}"));
    }
    Ok(())
}
