//! Plain data describing a WireGuard device: what we want (`DeviceConfig`),
//! what is there (`DeviceState`) and the change between them (`DeviceUpdate`).

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::time::SystemTime;

use anyhow::{Context, Result, bail};

use crate::keys::Key;

/// An allowed-IPs entry: an address and prefix length, stored normalised
/// (host bits cleared) so that `10.0.0.1/24` and `10.0.0.0/24` compare equal,
/// as WireGuard itself stores them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AllowedIp {
    pub addr: IpAddr,
    pub cidr: u8,
}

impl AllowedIp {
    pub fn new(addr: IpAddr, cidr: u8) -> Result<AllowedIp> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if cidr > max {
            bail!("invalid prefix length /{cidr} for {addr}: at most /{max}");
        }
        Ok(AllowedIp {
            addr: mask(addr, cidr),
            cidr,
        })
    }

    /// Whether two prefixes share any address.
    pub fn overlaps(&self, other: &AllowedIp) -> bool {
        if self.addr.is_ipv4() != other.addr.is_ipv4() {
            return false;
        }
        let shorter = self.cidr.min(other.cidr);
        mask(self.addr, shorter) == mask(other.addr, shorter)
    }
}

fn mask(addr: IpAddr, cidr: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let bits = u32::from(a);
            let m = if cidr == 0 {
                0
            } else {
                u32::MAX << (32 - cidr as u32)
            };
            IpAddr::V4((bits & m).into())
        }
        IpAddr::V6(a) => {
            let bits = u128::from(a);
            let m = if cidr == 0 {
                0
            } else {
                u128::MAX << (128 - cidr as u32)
            };
            IpAddr::V6((bits & m).into())
        }
    }
}

impl FromStr for AllowedIp {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<AllowedIp> {
        let s = s.trim();
        let (a, c) = match s.split_once('/') {
            Some((a, c)) => (a, Some(c)),
            None => (s, None),
        };
        let addr: IpAddr = a
            .parse()
            .with_context(|| format!("invalid allowed IP {s:?}: bad address"))?;
        let cidr = match c {
            Some(c) => c
                .parse::<u8>()
                .with_context(|| format!("invalid allowed IP {s:?}: bad prefix length"))?,
            None if addr.is_ipv4() => 32,
            None => 128,
        };
        AllowedIp::new(addr, cidr).with_context(|| format!("invalid allowed IP {s:?}"))
    }
}

impl fmt::Display for AllowedIp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.cidr)
    }
}

impl serde::Serialize for AllowedIp {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for AllowedIp {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<AllowedIp, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// The peer we want. `None` fields mean "none" (no endpoint, no keepalive,
/// no preshared key), not "leave as is": the config is declarative.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerConfig {
    pub public_key: Key,
    pub preshared_key: Option<Key>,
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<AllowedIp>,
    pub persistent_keepalive: Option<u16>,
}

/// The device we want. `listen_port: None` lets WireGuard pick (and keeps
/// whatever port it already picked); `fwmark: None` means no mark.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceConfig {
    pub private_key: Key,
    pub listen_port: Option<u16>,
    pub fwmark: Option<u32>,
    pub peers: Vec<PeerConfig>,
}

/// A peer as WireGuard reports it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PeerState {
    pub public_key: Key,
    #[serde(skip)]
    pub preshared_key: Option<Key>,
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<AllowedIp>,
    pub persistent_keepalive: Option<u16>,
    pub last_handshake: Option<SystemTime>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

impl PeerState {
    /// A peer as a decoder starts it: nothing known but its key.
    pub fn new(public_key: Key) -> PeerState {
        PeerState {
            public_key,
            preshared_key: None,
            endpoint: None,
            allowed_ips: Vec::new(),
            persistent_keepalive: None,
            last_handshake: None,
            rx_bytes: 0,
            tx_bytes: 0,
        }
    }
}

/// A device as WireGuard reports it. The private key is read only to compare
/// it with the desired one; it is never serialised.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct DeviceState {
    #[serde(skip)]
    pub private_key: Option<Key>,
    pub public_key: Option<Key>,
    pub listen_port: u16,
    pub fwmark: u32,
    pub peers: Vec<PeerState>,
}

/// A change to one peer. Fields that are `None` are left untouched.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerUpdate {
    pub public_key: Key,
    pub remove: bool,
    /// Set the preshared key; an all-zero key clears it.
    pub preshared_key: Option<Key>,
    pub endpoint: Option<SocketAddr>,
    /// Set the keepalive interval; `Some(0)` turns it off.
    pub persistent_keepalive: Option<u16>,
    /// When set, the peer's allowed IPs become exactly this list.
    pub replace_allowed_ips: Option<Vec<AllowedIp>>,
}

impl PeerUpdate {
    pub fn new(public_key: Key) -> PeerUpdate {
        PeerUpdate {
            public_key,
            remove: false,
            preshared_key: None,
            endpoint: None,
            persistent_keepalive: None,
            replace_allowed_ips: None,
        }
    }
}

/// A minimal change to a device. Fields that are `None` are left untouched.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceUpdate {
    pub private_key: Option<Key>,
    pub listen_port: Option<u16>,
    pub fwmark: Option<u32>,
    pub peers: Vec<PeerUpdate>,
}

impl DeviceUpdate {
    pub fn is_empty(&self) -> bool {
        self.private_key.is_none()
            && self.listen_port.is_none()
            && self.fwmark.is_none()
            && self.peers.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allowed_ip_is_normalised() {
        let a: AllowedIp = "10.1.2.3/24".parse().unwrap();
        assert_eq!(a.to_string(), "10.1.2.0/24");
        let b: AllowedIp = "fd00::1".parse().unwrap();
        assert_eq!(b.to_string(), "fd00::1/128");
    }

    #[test]
    fn overlap() {
        let a: AllowedIp = "10.0.0.0/8".parse().unwrap();
        let b: AllowedIp = "10.9.0.0/16".parse().unwrap();
        let c: AllowedIp = "11.0.0.0/8".parse().unwrap();
        assert!(a.overlaps(&b) && b.overlaps(&a));
        assert!(!a.overlaps(&c));
    }

    #[test]
    fn bad_prefix_rejected() {
        assert!("10.0.0.0/33".parse::<AllowedIp>().is_err());
        assert!("10.0.0/8".parse::<AllowedIp>().is_err());
    }
}
