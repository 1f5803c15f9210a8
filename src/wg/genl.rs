//! The kernel `wireguard` generic netlink codec: SET_DEVICE messages split to
//! a size budget, and a parser for GET_DEVICE dumps.
//!
//! Encoding uses netlink-packet-wireguard's attribute types (their sizes are
//! exact, which the splitter relies on). Decoding is our own, on
//! netlink-packet-core's attribute iterator: the crate's parser indexes into
//! attributes without checking their length (a zero-length
//! WGALLOWEDIP_A_CIDR_MASK panics), and a dump parser must never panic.
//! Both sides stay on the one rust-netlink packet stack.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::time::{Duration, SystemTime};

use netlink_packet_core::{Emitable, NetlinkHeader, NetlinkMessage, NetlinkPayload, NlaBuffer, NlasIterator};
use netlink_packet_generic::GenlMessage;
use netlink_packet_wireguard::{
    WireguardAddressFamily, WireguardAllowedIp, WireguardAllowedIpAttr, WireguardAttribute, WireguardCmd,
    WireguardMessage, WireguardPeer, WireguardPeerAttribute, WireguardPeerFlags,
};

use super::model::{AllowedIp, DeviceState, DeviceUpdate, PeerState, PeerUpdate};
use crate::keys::Key;
use crate::netlink::socket::split_messages;

/// The generic netlink family the kernel module registers.
pub const WG_GENL_NAME: &str = "wireguard";

/// Largest SET_DEVICE message we build. The kernel would take more (up to
/// the socket's send buffer), but messages of this size keep each kernel
/// call short and match what dumps use, and 10,000 peers need only ~60.
pub const MAX_SET_MESSAGE: usize = 32 * 1024;

const NETLINK_HEADER_LEN: usize = 16;
const GENL_HEADER_LEN: usize = 4;
const NLA_HEADER_LEN: usize = 4;

// Attribute numbers from <linux/wireguard.h>, for the parser.
const WGDEVICE_A_IFINDEX: u16 = 1;
const WGDEVICE_A_IFNAME: u16 = 2;
const WGDEVICE_A_PRIVATE_KEY: u16 = 3;
const WGDEVICE_A_PUBLIC_KEY: u16 = 4;
const WGDEVICE_A_LISTEN_PORT: u16 = 6;
const WGDEVICE_A_FWMARK: u16 = 7;
const WGDEVICE_A_PEERS: u16 = 8;
const WGPEER_A_PUBLIC_KEY: u16 = 1;
const WGPEER_A_PRESHARED_KEY: u16 = 2;
const WGPEER_A_ENDPOINT: u16 = 4;
const WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL: u16 = 5;
const WGPEER_A_LAST_HANDSHAKE_TIME: u16 = 6;
const WGPEER_A_RX_BYTES: u16 = 7;
const WGPEER_A_TX_BYTES: u16 = 8;
const WGPEER_A_ALLOWEDIPS: u16 = 9;
const WGALLOWEDIP_A_FAMILY: u16 = 1;
const WGALLOWEDIP_A_IPADDR: u16 = 2;
const WGALLOWEDIP_A_CIDR_MASK: u16 = 3;

// ---------------------------------------------------------------- encoding

fn allowed_ip_attr(ip: &AllowedIp) -> WireguardAllowedIp {
    let family = if ip.addr.is_ipv4() {
        WireguardAddressFamily::Ipv4
    } else {
        WireguardAddressFamily::Ipv6
    };
    WireguardAllowedIp(vec![
        WireguardAllowedIpAttr::Family(family),
        WireguardAllowedIpAttr::IpAddr(ip.addr),
        WireguardAllowedIpAttr::Cidr(ip.cidr),
    ])
}

/// A peer's attributes other than its allowed IPs. A continuation (the rest
/// of a peer's allowed IPs in a later message) is only the public key: no
/// replace flag, or it would drop the IPs the earlier message added.
fn peer_base(peer: &PeerUpdate, continuation: bool) -> Vec<WireguardPeerAttribute> {
    let mut attrs = vec![WireguardPeerAttribute::PublicKey(peer.public_key.0)];
    if continuation {
        return attrs;
    }
    if peer.remove {
        attrs.push(WireguardPeerAttribute::Flags(WireguardPeerFlags::RemoveMe));
        return attrs;
    }
    if peer.replace_allowed_ips.is_some() {
        attrs.push(WireguardPeerAttribute::Flags(
            WireguardPeerFlags::ReplaceAllowedIps,
        ));
    }
    if let Some(psk) = peer.preshared_key {
        attrs.push(WireguardPeerAttribute::PresharedKey(psk.0));
    }
    if let Some(ep) = peer.endpoint {
        attrs.push(WireguardPeerAttribute::Endpoint(ep));
    }
    if let Some(ka) = peer.persistent_keepalive {
        attrs.push(WireguardPeerAttribute::PersistentKeepalive(ka));
    }
    attrs
}

fn attrs_len<T: Emitable>(attrs: &[T]) -> usize {
    attrs.iter().map(Emitable::buffer_len).sum()
}

/// Fills messages up to a size budget, in order.
struct Splitter<'a> {
    ifname: &'a str,
    budget: usize,
    out: Vec<WireguardMessage>,
    /// Attributes of the message being built, before its peers.
    device: Vec<WireguardAttribute>,
    peers: Vec<WireguardPeer>,
    /// Framed size of the message being built, Peers header included.
    used: usize,
}

impl Splitter<'_> {
    fn reset_size(&mut self) {
        self.used = NETLINK_HEADER_LEN + GENL_HEADER_LEN + attrs_len(&self.device) + NLA_HEADER_LEN;
    }

    /// Whether the message being built carries anything besides the name.
    fn has_content(&self) -> bool {
        !self.peers.is_empty() || self.device.len() > 1
    }

    fn flush(&mut self) {
        let next = vec![WireguardAttribute::IfName(self.ifname.to_string())];
        let mut attributes = std::mem::replace(&mut self.device, next);
        if !self.peers.is_empty() {
            attributes.push(WireguardAttribute::Peers(std::mem::take(&mut self.peers)));
        }
        self.out.push(WireguardMessage {
            cmd: WireguardCmd::SetDevice,
            attributes,
        });
        self.reset_size();
    }

    fn add_peer(&mut self, peer: &PeerUpdate) {
        let ips: &[AllowedIp] = match (&peer.replace_allowed_ips, peer.remove) {
            (Some(list), false) => list,
            _ => &[],
        };
        let mut next = 0;
        let mut continuation = false;
        loop {
            let base = peer_base(peer, continuation);
            let base_len = NLA_HEADER_LEN + attrs_len(&base);
            let first_ip = ips
                .get(next)
                .map(|ip| NLA_HEADER_LEN + allowed_ip_attr(ip).buffer_len());
            if self.used + base_len + first_ip.unwrap_or(0) > self.budget && self.has_content() {
                self.flush();
                continue;
            }
            // As many allowed IPs as fit; at least one, so that even an
            // absurdly small budget makes progress.
            let mut attrs = base;
            let mut size = base_len;
            if next < ips.len() {
                let mut list = Vec::new();
                size += NLA_HEADER_LEN;
                while let Some(ip) = ips.get(next) {
                    let a = allowed_ip_attr(ip);
                    if !list.is_empty() && self.used + size + a.buffer_len() > self.budget {
                        break;
                    }
                    size += a.buffer_len();
                    list.push(a);
                    next += 1;
                }
                attrs.push(WireguardPeerAttribute::AllowedIps(list));
            }
            self.peers.push(WireguardPeer(attrs));
            self.used += size;
            if next >= ips.len() {
                return;
            }
            self.flush();
            continuation = true;
        }
    }
}

/// Builds the SET_DEVICE payloads for `update`, each (framed) at most
/// `budget` bytes: device attributes go in the first message, peers follow
/// in order, and a peer whose allowed IPs do not fit continues in the next
/// message. An empty update gives no messages.
pub fn encode_set(ifname: &str, update: &DeviceUpdate, budget: usize) -> Vec<WireguardMessage> {
    if update.is_empty() {
        return Vec::new();
    }
    let mut device = vec![WireguardAttribute::IfName(ifname.to_string())];
    if let Some(k) = update.private_key {
        device.push(WireguardAttribute::PrivateKey(k.0));
    }
    if let Some(p) = update.listen_port {
        device.push(WireguardAttribute::ListenPort(p));
    }
    if let Some(m) = update.fwmark {
        device.push(WireguardAttribute::Fwmark(m));
    }
    let mut s = Splitter {
        ifname,
        budget,
        out: Vec::new(),
        device,
        peers: Vec::new(),
        used: 0,
    };
    s.reset_size();
    for peer in &update.peers {
        s.add_peer(peer);
    }
    if s.has_content() {
        s.flush();
    }
    s.out
}

/// The GET_DEVICE dump request for one interface.
pub fn get_request(ifname: &str) -> WireguardMessage {
    WireguardMessage {
        cmd: WireguardCmd::GetDevice,
        attributes: vec![WireguardAttribute::IfName(ifname.to_string())],
    }
}

/// Frames a wireguard payload as a complete netlink message.
pub fn frame(msg: WireguardMessage, family: u16, flags: u16, seq: u32) -> Vec<u8> {
    let mut genl = GenlMessage::from_payload(msg);
    genl.set_resolved_family_id(family);
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    header.sequence_number = seq;
    let mut nl = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(genl));
    nl.finalize();
    let mut bytes = vec![0u8; nl.buffer_len()];
    nl.serialize(&mut bytes);
    bytes
}

// ---------------------------------------------------------------- decoding

/// Builds a `DeviceState` from the parts of a GET_DEVICE dump. The kernel
/// splits a big device across messages; a peer whose allowed IPs did not
/// fit is repeated (same public key) at the start of the next message.
#[derive(Default)]
pub struct DumpParser {
    state: DeviceState,
}

fn nlas(buf: &[u8]) -> impl Iterator<Item = Result<NlaBuffer<&[u8]>, String>> {
    NlasIterator::new(buf).map(|r| r.map_err(|e| e.to_string()))
}

fn key(v: &[u8], what: &str) -> Result<Key, String> {
    let arr: [u8; 32] = v
        .try_into()
        .map_err(|_| format!("{what}: expected 32 bytes, got {}", v.len()))?;
    Ok(Key(arr))
}

fn u16_ne(v: &[u8], what: &str) -> Result<u16, String> {
    let arr: [u8; 2] = v
        .try_into()
        .map_err(|_| format!("{what}: expected 2 bytes, got {}", v.len()))?;
    Ok(u16::from_ne_bytes(arr))
}

fn u32_ne(v: &[u8], what: &str) -> Result<u32, String> {
    let arr: [u8; 4] = v
        .try_into()
        .map_err(|_| format!("{what}: expected 4 bytes, got {}", v.len()))?;
    Ok(u32::from_ne_bytes(arr))
}

fn u64_ne(v: &[u8], what: &str) -> Result<u64, String> {
    let arr: [u8; 8] = v
        .try_into()
        .map_err(|_| format!("{what}: expected 8 bytes, got {}", v.len()))?;
    Ok(u64::from_ne_bytes(arr))
}

/// struct sockaddr_in / sockaddr_in6 as the kernel stores them.
fn sockaddr(v: &[u8]) -> Result<SocketAddr, String> {
    let family = v.get(..2).map(|b| u16::from_ne_bytes([b[0], b[1]]));
    match (family, v.len()) {
        (Some(f), 16..) if f == libc::AF_INET as u16 => {
            let port = u16::from_be_bytes([v[2], v[3]]);
            let ip = Ipv4Addr::new(v[4], v[5], v[6], v[7]);
            Ok(SocketAddr::V4(SocketAddrV4::new(ip, port)))
        }
        (Some(f), 28..) if f == libc::AF_INET6 as u16 => {
            let port = u16::from_be_bytes([v[2], v[3]]);
            let flow = u32::from_be_bytes([v[4], v[5], v[6], v[7]]);
            let mut ip = [0u8; 16];
            ip.copy_from_slice(&v[8..24]);
            let scope = u32::from_ne_bytes([v[24], v[25], v[26], v[27]]);
            Ok(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(ip),
                port,
                flow,
                scope,
            )))
        }
        _ => Err(format!("endpoint: unknown address family or length {}", v.len())),
    }
}

fn allowed_ip(buf: &[u8]) -> Result<AllowedIp, String> {
    let mut family = None;
    let mut addr = None;
    let mut cidr = None;
    for nla in nlas(buf) {
        let nla = nla?;
        let v = nla.value();
        match nla.kind() {
            WGALLOWEDIP_A_FAMILY => family = Some(u16_ne(v, "allowed IP family")?),
            WGALLOWEDIP_A_IPADDR => {
                addr = Some(match v.len() {
                    4 => IpAddr::V4(Ipv4Addr::new(v[0], v[1], v[2], v[3])),
                    16 => {
                        let mut a = [0u8; 16];
                        a.copy_from_slice(v);
                        IpAddr::V6(Ipv6Addr::from(a))
                    }
                    n => return Err(format!("allowed IP address: {n} bytes")),
                })
            }
            WGALLOWEDIP_A_CIDR_MASK => {
                cidr = Some(*v.first().ok_or("allowed IP prefix length: empty")?);
            }
            _ => {}
        }
    }
    let addr = addr.ok_or("allowed IP without address")?;
    let cidr = cidr.ok_or("allowed IP without prefix length")?;
    if let Some(f) = family {
        let expected = if addr.is_ipv4() {
            libc::AF_INET
        } else {
            libc::AF_INET6
        } as u16;
        if f != expected {
            return Err(format!("allowed IP {addr}: family {f} does not match"));
        }
    }
    AllowedIp::new(addr, cidr).map_err(|e| e.to_string())
}

fn peer(buf: &[u8]) -> Result<PeerState, String> {
    let mut public_key = None;
    let mut p = PeerState::new(Key([0; 32]));
    for nla in nlas(buf) {
        let nla = nla?;
        let v = nla.value();
        match nla.kind() {
            WGPEER_A_PUBLIC_KEY => public_key = Some(key(v, "peer public key")?),
            WGPEER_A_PRESHARED_KEY => {
                let k = key(v, "preshared key")?;
                p.preshared_key = (!k.is_zero()).then_some(k);
            }
            WGPEER_A_ENDPOINT => p.endpoint = Some(sockaddr(v)?),
            WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL => {
                let ka = u16_ne(v, "persistent keepalive")?;
                p.persistent_keepalive = (ka != 0).then_some(ka);
            }
            WGPEER_A_LAST_HANDSHAKE_TIME => {
                if v.len() < 16 {
                    return Err(format!("last handshake: {} bytes", v.len()));
                }
                let secs = i64::from_ne_bytes(v[..8].try_into().map_err(|_| "last handshake")?);
                let nanos = i64::from_ne_bytes(v[8..16].try_into().map_err(|_| "last handshake")?);
                if secs > 0 || nanos > 0 {
                    let d = Duration::new(secs.max(0) as u64, nanos.clamp(0, 999_999_999) as u32);
                    p.last_handshake = SystemTime::UNIX_EPOCH.checked_add(d);
                }
            }
            WGPEER_A_RX_BYTES => p.rx_bytes = u64_ne(v, "rx bytes")?,
            WGPEER_A_TX_BYTES => p.tx_bytes = u64_ne(v, "tx bytes")?,
            WGPEER_A_ALLOWEDIPS => {
                for ip in nlas(v) {
                    p.allowed_ips.push(allowed_ip(ip?.value())?);
                }
            }
            _ => {}
        }
    }
    p.public_key = public_key.ok_or("peer without public key")?;
    Ok(p)
}

impl DumpParser {
    pub fn new() -> DumpParser {
        DumpParser::default()
    }

    /// Feeds one dump message's generic netlink payload (genl header first).
    pub fn feed(&mut self, genl_payload: &[u8]) -> Result<(), String> {
        let attrs = genl_payload
            .get(GENL_HEADER_LEN..)
            .ok_or("short generic netlink header")?;
        let mut first_peer_of_message = true;
        for nla in nlas(attrs) {
            let nla = nla?;
            let v = nla.value();
            match nla.kind() {
                WGDEVICE_A_PRIVATE_KEY => {
                    let k = key(v, "private key")?;
                    self.state.private_key = (!k.is_zero()).then_some(k);
                }
                WGDEVICE_A_PUBLIC_KEY => {
                    let k = key(v, "public key")?;
                    self.state.public_key = (!k.is_zero()).then_some(k);
                }
                WGDEVICE_A_LISTEN_PORT => self.state.listen_port = u16_ne(v, "listen port")?,
                WGDEVICE_A_FWMARK => self.state.fwmark = u32_ne(v, "fwmark")?,
                WGDEVICE_A_IFINDEX | WGDEVICE_A_IFNAME => {}
                WGDEVICE_A_PEERS => {
                    for p in nlas(v) {
                        let p = peer(p?.value())?;
                        let continues = first_peer_of_message
                            && self
                                .state
                                .peers
                                .last()
                                .is_some_and(|last| last.public_key == p.public_key);
                        first_peer_of_message = false;
                        if continues {
                            if let Some(last) = self.state.peers.last_mut() {
                                last.allowed_ips.extend(p.allowed_ips);
                            }
                        } else {
                            self.state.peers.push(p);
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    pub fn finish(self) -> DeviceState {
        self.state
    }
}

/// Parses a buffer of netlink messages (a dump as received) into a device.
/// The fuzz target's entry point: must return, never panic, on any input.
pub fn parse_dump(buf: &[u8]) -> Result<DeviceState, String> {
    let mut parser = DumpParser::new();
    for m in split_messages(buf).map_err(|e| e.to_string())? {
        if m.message_type < 0x10 {
            continue; // NOOP, ERROR, DONE, OVERRUN: control messages
        }
        parser.feed(m.payload)?;
    }
    Ok(parser.finish())
}

#[cfg(test)]
#[path = "genl_tests.rs"]
mod tests;
