//! Links: look up, create (wireguard, veth), delete, up/down, MTU.

use anyhow::{Result, anyhow};
use netlink_packet_core::{NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};

use super::Rtnl;
use super::socket::NlError;

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
    pub(super) fn from_message(msg: &LinkMessage) -> LinkState {
        let mut state = LinkState {
            index: msg.header.index,
            name: String::new(),
            up: msg.header.flags.contains(LinkFlags::Up),
            mtu: 0,
            kind: None,
        };
        for attr in &msg.attributes {
            match attr {
                LinkAttribute::IfName(n) => state.name = n.clone(),
                LinkAttribute::Mtu(m) => state.mtu = *m,
                LinkAttribute::LinkInfo(infos) => {
                    for info in infos {
                        if let LinkInfo::Kind(k) = info {
                            state.kind = Some(k.to_string());
                        }
                    }
                }
                _ => {}
            }
        }
        state
    }
}

fn link_by_name(name: &str) -> LinkMessage {
    let mut msg = LinkMessage::default();
    msg.attributes.push(LinkAttribute::IfName(name.to_string()));
    msg
}

fn link_by_index(index: u32) -> LinkMessage {
    let mut msg = LinkMessage::default();
    msg.header.index = index;
    msg
}

impl Rtnl {
    /// Interface index by name, `None` when there is no such link.
    pub fn link_index(&mut self, name: &str) -> Result<Option<u32>> {
        Ok(self.link(name)?.map(|l| l.index))
    }

    /// The link of this name, `None` when there is none.
    pub fn link(&mut self, name: &str) -> Result<Option<LinkState>> {
        check_name(name)?;
        match self.request(RouteNetlinkMessage::GetLink(link_by_name(name)), 0) {
            Ok(msgs) => Ok(first_link(&msgs)),
            Err(NlError::Kernel(e)) if e == libc::ENODEV => Ok(None),
            Err(e) => Err(anyhow!("looking up link {name}: {e}")),
        }
    }

    /// The link with this index, `None` when there is none.
    pub fn link_by_index(&mut self, index: u32) -> Result<Option<LinkState>> {
        match self.request(RouteNetlinkMessage::GetLink(link_by_index(index)), 0) {
            Ok(msgs) => Ok(first_link(&msgs)),
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
            .request(RouteNetlinkMessage::GetLink(LinkMessage::default()), NLM_F_DUMP)
            .map_err(|e| anyhow!("listing links: {e}"))?;
        Ok(msgs
            .iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(LinkState::from_message(l)),
                _ => None,
            })
            .collect())
    }

    /// Creates a link of kind `wireguard` (kernel backend only).
    pub fn create_wireguard_link(&mut self, name: &str) -> Result<u32> {
        self.create_link(name, vec![LinkInfo::Kind(InfoKind::Wireguard)])
    }

    /// Creates a veth pair `name` <-> `peer` (both in this namespace).
    pub fn create_veth(&mut self, name: &str, peer: &str) -> Result<u32> {
        check_name(peer)?;
        let info = vec![
            LinkInfo::Kind(InfoKind::Veth),
            LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(link_by_name(peer)))),
        ];
        self.create_link(name, info)
    }

    fn create_link(&mut self, name: &str, info: Vec<LinkInfo>) -> Result<u32> {
        check_name(name)?;
        let kind = info
            .iter()
            .find_map(|i| match i {
                LinkInfo::Kind(k) => Some(k.to_string()),
                _ => None,
            })
            .unwrap_or_default();
        let mut msg = link_by_name(name);
        msg.attributes.push(LinkAttribute::LinkInfo(info));
        self.request(RouteNetlinkMessage::NewLink(msg), NLM_F_CREATE | NLM_F_EXCL)
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
        self.request(RouteNetlinkMessage::DelLink(link_by_index(index)), 0)
            .map_err(|e| anyhow!("deleting link {what}: {e}"))?;
        Ok(())
    }

    pub fn set_link_up(&mut self, index: u32, up: bool) -> Result<()> {
        let mut msg = link_by_index(index);
        msg.header.change_mask = LinkFlags::Up;
        if up {
            msg.header.flags = LinkFlags::Up;
        }
        self.request(RouteNetlinkMessage::SetLink(msg), 0).map_err(|e| {
            let what = self.describe(index);
            anyhow!("setting link {what} {}: {e}", if up { "up" } else { "down" })
        })?;
        Ok(())
    }

    pub fn set_mtu(&mut self, index: u32, mtu: u32) -> Result<()> {
        let mut msg = link_by_index(index);
        msg.attributes.push(LinkAttribute::Mtu(mtu));
        self.request(RouteNetlinkMessage::SetLink(msg), 0).map_err(|e| {
            let what = self.describe(index);
            anyhow!("setting MTU {mtu} on {what}: {e}")
        })?;
        Ok(())
    }
}

fn first_link(msgs: &[RouteNetlinkMessage]) -> Option<LinkState> {
    msgs.iter().find_map(|m| match m {
        RouteNetlinkMessage::NewLink(l) => Some(LinkState::from_message(l)),
        _ => None,
    })
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
