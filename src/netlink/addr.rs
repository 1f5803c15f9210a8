//! IPv4 and IPv6 addresses on a link.

use std::net::IpAddr;

use anyhow::{Result, anyhow};
use netlink_packet_core::{NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

use super::Rtnl;
use super::socket::NlError;

fn address_message(index: u32, addr: IpAddr, prefix: u8) -> AddressMessage {
    let mut msg = AddressMessage::default();
    msg.header.family = family(addr);
    msg.header.prefix_len = prefix;
    msg.header.index = index;
    // IPv4 needs IFA_LOCAL (the address itself) as well as IFA_ADDRESS
    // (the peer on point-to-point links, the same address otherwise).
    if addr.is_ipv4() {
        msg.attributes.push(AddressAttribute::Local(addr));
    }
    msg.attributes.push(AddressAttribute::Address(addr));
    msg
}

pub(super) fn family(addr: IpAddr) -> AddressFamily {
    if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    }
}

fn check_prefix(addr: IpAddr, prefix: u8) -> Result<()> {
    let max = if addr.is_ipv4() { 32 } else { 128 };
    if prefix > max {
        return Err(anyhow!(
            "invalid address {addr}/{prefix}: prefix length at most /{max}"
        ));
    }
    Ok(())
}

/// The (address, prefix) an address message carries: IFA_LOCAL for IPv4
/// (IFA_ADDRESS is the peer on point-to-point links), IFA_ADDRESS otherwise.
pub(super) fn address_of(msg: &AddressMessage) -> Option<(IpAddr, u8)> {
    let mut address = None;
    let mut local = None;
    for attr in &msg.attributes {
        match attr {
            AddressAttribute::Local(a) => local = Some(*a),
            AddressAttribute::Address(a) => address = Some(*a),
            _ => {}
        }
    }
    local.or(address).map(|a| (a, msg.header.prefix_len))
}

impl Rtnl {
    /// Addresses on a link as (address, prefix length).
    pub fn addresses(&mut self, index: u32) -> Result<Vec<(IpAddr, u8)>> {
        let msgs = self
            .request(
                RouteNetlinkMessage::GetAddress(AddressMessage::default()),
                NLM_F_DUMP,
            )
            .map_err(|e| {
                let what = self.describe(index);
                anyhow!("listing addresses of {what}: {e}")
            })?;
        Ok(msgs
            .iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewAddress(a) if a.header.index == index => address_of(a),
                _ => None,
            })
            .collect())
    }

    /// Adds an address; succeeds if it is already there.
    pub fn add_address(&mut self, index: u32, addr: IpAddr, prefix: u8) -> Result<()> {
        check_prefix(addr, prefix)?;
        let msg = address_message(index, addr, prefix);
        match self.request(RouteNetlinkMessage::NewAddress(msg), NLM_F_CREATE | NLM_F_EXCL) {
            Ok(_) => Ok(()),
            Err(NlError::Kernel(e)) if e == libc::EEXIST && self.has_address(index, addr, prefix) => Ok(()),
            Err(e) => {
                let what = self.describe(index);
                Err(anyhow!("adding {addr}/{prefix} to {what}: {e}"))
            }
        }
    }

    pub fn del_address(&mut self, index: u32, addr: IpAddr, prefix: u8) -> Result<()> {
        check_prefix(addr, prefix)?;
        let msg = address_message(index, addr, prefix);
        self.request(RouteNetlinkMessage::DelAddress(msg), 0)
            .map_err(|e| {
                let what = self.describe(index);
                anyhow!("removing {addr}/{prefix} from {what}: {e}")
            })?;
        Ok(())
    }

    /// EEXIST also comes back when the address exists with another prefix
    /// length; only the exact (address, prefix) counts as already there.
    fn has_address(&mut self, index: u32, addr: IpAddr, prefix: u8) -> bool {
        self.addresses(index)
            .map(|list| list.contains(&(addr, prefix)))
            .unwrap_or(false)
    }
}
