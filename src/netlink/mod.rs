//! rtnetlink: links, addresses, routes, and a monitor a mio loop can own.
//!
//! CONTRACT (replaced by the real implementation): the signatures below are
//! what the rest of warren calls; every method is idempotent where the
//! name says so, and errors name the interface and the object.

use std::net::IpAddr;

use anyhow::{Result, bail};

use crate::wg::AllowedIp;

pub struct Rtnl {}

impl Rtnl {
    pub fn open() -> Result<Rtnl> {
        bail!("rtnetlink is not built yet")
    }
    /// Interface index by name, `None` when there is no such link.
    pub fn link_index(&mut self, _name: &str) -> Result<Option<u32>> {
        bail!("rtnetlink is not built yet")
    }
    /// Creates a link of kind `wireguard` (kernel backend only).
    pub fn create_wireguard_link(&mut self, _name: &str) -> Result<u32> {
        bail!("rtnetlink is not built yet")
    }
    pub fn delete_link(&mut self, _index: u32) -> Result<()> {
        bail!("rtnetlink is not built yet")
    }
    pub fn set_link_up(&mut self, _index: u32, _up: bool) -> Result<()> {
        bail!("rtnetlink is not built yet")
    }
    pub fn set_mtu(&mut self, _index: u32, _mtu: u32) -> Result<()> {
        bail!("rtnetlink is not built yet")
    }
    /// Addresses on a link as (address, prefix length).
    pub fn addresses(&mut self, _index: u32) -> Result<Vec<(IpAddr, u8)>> {
        bail!("rtnetlink is not built yet")
    }
    /// Adds an address; succeeds if it is already there.
    pub fn add_address(&mut self, _index: u32, _addr: IpAddr, _prefix: u8) -> Result<()> {
        bail!("rtnetlink is not built yet")
    }
    pub fn del_address(&mut self, _index: u32, _addr: IpAddr, _prefix: u8) -> Result<()> {
        bail!("rtnetlink is not built yet")
    }
    /// Adds or replaces a route to `dst` through link `index`.
    pub fn replace_route(&mut self, _dst: AllowedIp, _index: u32) -> Result<()> {
        bail!("rtnetlink is not built yet")
    }
    pub fn del_route(&mut self, _dst: AllowedIp, _index: u32) -> Result<()> {
        bail!("rtnetlink is not built yet")
    }
}
