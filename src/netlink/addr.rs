//! IPv4 and IPv6 addresses on a link.

use std::net::IpAddr;

use anyhow::{Result, anyhow};
use netlink_packet_core::{NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL};

use super::Rtnl;
use super::attr::{Request, attrs, split_header, u32_at};
use super::socket::NlError;

// From <linux/rtnetlink.h> and <linux/if_addr.h>.
pub(super) const RTM_NEWADDR: u16 = 20;
pub(super) const RTM_DELADDR: u16 = 21;
const RTM_GETADDR: u16 = 22;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
/// `struct ifaddrmsg`: family, prefix length, flags, scope (u8 each), index (u32).
const IFADDRMSG_LEN: usize = 8;
pub(super) const AF_INET: u8 = libc::AF_INET as u8;
pub(super) const AF_INET6: u8 = libc::AF_INET6 as u8;

fn ifaddrmsg(family: u8, prefix: u8, index: u32) -> [u8; IFADDRMSG_LEN] {
    let mut h = [0u8; IFADDRMSG_LEN];
    h[0] = family;
    h[1] = prefix;
    h[4..8].copy_from_slice(&index.to_ne_bytes());
    h
}

fn address_request(kind: u16, index: u32, addr: IpAddr, prefix: u8) -> Request {
    let mut req = Request::new(kind, &ifaddrmsg(family(addr), prefix, index));
    // IPv4 needs IFA_LOCAL (the address itself) as well as IFA_ADDRESS
    // (the peer on point-to-point links, the same address otherwise).
    if addr.is_ipv4() {
        req.ip(IFA_LOCAL, addr);
    }
    req.ip(IFA_ADDRESS, addr);
    req
}

pub(super) fn family(addr: IpAddr) -> u8 {
    if addr.is_ipv4() { AF_INET } else { AF_INET6 }
}

/// An address as an RTM_NEWADDR/RTM_DELADDR message carries it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct AddressMsg {
    pub index: u32,
    /// IFA_LOCAL for IPv4 (IFA_ADDRESS is the peer on point-to-point links),
    /// IFA_ADDRESS otherwise; `None` when the message has neither.
    pub addr: Option<IpAddr>,
    pub prefix: u8,
}

impl AddressMsg {
    pub(super) fn parse(payload: &[u8]) -> Result<AddressMsg, NlError> {
        let (header, rest) = split_header::<IFADDRMSG_LEN>(payload, "ifaddrmsg")?;
        let mut address = None;
        let mut local = None;
        for attr in attrs(rest, "address") {
            let attr = attr?;
            match attr.kind {
                IFA_LOCAL => local = Some(attr.ip("IFA_LOCAL")?),
                IFA_ADDRESS => address = Some(attr.ip("IFA_ADDRESS")?),
                _ => {}
            }
        }
        Ok(AddressMsg {
            index: u32_at(header, 4),
            addr: local.or(address),
            prefix: header[1],
        })
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

impl Rtnl {
    /// Addresses on a link as (address, prefix length).
    pub fn addresses(&mut self, index: u32) -> Result<Vec<(IpAddr, u8)>> {
        let listed = self
            .request(Request::new(RTM_GETADDR, &ifaddrmsg(0, 0, 0)), NLM_F_DUMP)
            .and_then(|msgs| {
                msgs.iter()
                    .filter(|m| m.kind == RTM_NEWADDR)
                    .map(|m| AddressMsg::parse(&m.payload))
                    .collect::<Result<Vec<_>, _>>()
            });
        let listed = listed.map_err(|e| {
            let what = self.describe(index);
            anyhow!("listing addresses of {what}: {e}")
        })?;
        Ok(listed
            .iter()
            .filter(|a| a.index == index)
            .filter_map(|a| Some((a.addr?, a.prefix)))
            .collect())
    }

    /// Adds an address; succeeds if it is already there.
    pub fn add_address(&mut self, index: u32, addr: IpAddr, prefix: u8) -> Result<()> {
        check_prefix(addr, prefix)?;
        let req = address_request(RTM_NEWADDR, index, addr, prefix);
        match self.request(req, NLM_F_CREATE | NLM_F_EXCL) {
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
        let req = address_request(RTM_DELADDR, index, addr, prefix);
        self.request(req, 0).map_err(|e| {
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
