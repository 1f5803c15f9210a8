//! The direct path, shell side: the plain UDP check socket. It carries
//! connectivity checks and plain STUN on the underlay, and — because it is
//! bound to every address, the mesh address included — STUN to WG-STUN and
//! probes to peers through WireGuard: a datagram to a mesh address is routed
//! into the tunnel, and one from a mesh address came out of it (WireGuard
//! only delivers a peer's packets from its allowed IPs). It moves bytes
//! between the socket and [`Traversal`], sealing and opening on the way;
//! every decision is the traversal's.

use std::collections::HashMap;
use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Instant;

use anyhow::{Context, Result};
use mio::net::UdpSocket;
use mio::{Interest, Registry, Token};

use super::peer_msg::PeerMessages;
use crate::keys::Key;
use crate::nat::gather::Socket;
use crate::nat::message::{FIRST_TYPE, Message};
use crate::nat::path::Via;
use crate::nat::traversal::Traversal;
use crate::peer::seal::SEAL_VERSION;
use crate::stun::message::looks_like_stun;
use crate::wgstun::inner::{STUN_PORT, WGSTUN_ADDR};

pub const CHECK4: Token = Token(3);
pub const CHECK6: Token = Token(4);
/// Largest datagram we read: sealed messages and STUN answers are small.
const MAX_DATAGRAM: usize = 2048;
/// Datagrams read per socket per loop turn, so a flood cannot starve the loop.
const READS_PER_TURN: usize = 256;

/// Where WG-STUN answers STUN inside the tunnel.
pub const WGSTUN_STUN: SocketAddr = SocketAddr::new(IpAddr::V4(WGSTUN_ADDR), STUN_PORT);

pub struct DirectPath {
    pub port: u16,
    check4: UdpSocket,
    check6: Option<UdpSocket>,
    buf: Vec<u8>,
    /// The last failure to send or bind, logged once.
    last_error: Option<String>,
    /// Dropped datagrams that looked sealed but did not open.
    pub dropped: u64,
    /// Sockets with datagrams left over from the last read (see `ready`).
    unread: std::collections::HashSet<Token>,
}

/// A message opened from a socket, for the caller to route.
pub enum Received {
    /// NAT traversal's.
    Traversal { from: Key, via: Via, msg: Message },
    /// `warren ping`'s (a direct ping answered over the check socket); `src`
    /// is where it came from when it came over the underlay.
    Other {
        from: Key,
        payload: Vec<u8>,
        src: Option<SocketAddr>,
    },
}

impl DirectPath {
    /// Binds the check sockets on every address, IPv6 where the machine has it.
    /// `port` is the one to prefer (a port mapping asks the router for it);
    /// when another process holds it, any free port does: peers learn it from
    /// the candidates.
    pub fn open(registry: &Registry, port: u16) -> Result<DirectPath> {
        let mut check4 = match UdpSocket::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))) {
            Ok(s) => s,
            Err(e) if e.kind() == ErrorKind::AddrInUse => {
                let s = UdpSocket::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)))
                    .context("binding the check socket to any UDP port")?;
                log_warn!(
                    "agent: check socket: UDP port {port} is in use by another process; using {}",
                    s.local_addr().map(|a| a.port()).unwrap_or(0)
                );
                s
            }
            Err(e) => return Err(e).with_context(|| format!("binding the check socket to UDP port {port}")),
        };
        // Checks and STUN go to peers' public addresses: not into an exit node's tunnel.
        crate::sockopt::mark_own(&check4);
        let port = check4
            .local_addr()
            .context("reading the check socket's port")?
            .port();
        registry
            .register(&mut check4, CHECK4, Interest::READABLE)
            .context("registering the check socket")?;
        let check6 = match bind_v6_only(port) {
            Ok(mut s) => registry
                .register(&mut s, CHECK6, Interest::READABLE)
                .ok()
                .map(|_| s),
            Err(_) => None,
        };
        Ok(DirectPath {
            port,
            check4,
            check6,
            buf: vec![0; MAX_DATAGRAM],
            last_error: None,
            dropped: 0,
            unread: std::collections::HashSet::new(),
        })
    }

    fn note_error(&mut self, msg: String) {
        if self.last_error.as_deref() != Some(&msg) {
            log_warn!("agent: direct path: {msg}");
        }
        self.last_error = Some(msg);
    }

    /// Sockets to read again without waiting for an event.
    pub fn unread(&self) -> Vec<Token> {
        self.unread.iter().copied().collect()
    }

    pub fn owns(token: Token) -> bool {
        token == CHECK4 || token == CHECK6
    }

    /// Reads what arrived on `token`'s socket; STUN answers go to the
    /// traversal at once, sealed messages are opened and returned.
    /// `mesh_of` tells a peer's mesh address, to check the tunnel's sender.
    pub fn ready(
        &mut self,
        now: Instant,
        token: Token,
        traversal: &mut Traversal,
        msgs: &mut PeerMessages,
        mesh_of: &HashMap<Key, Ipv4Addr>,
    ) -> Vec<Received> {
        let mut out = Vec::new();
        // Cleared when the socket is drained; left set when the read budget
        // ran out first (the readiness is edge-triggered: no new event comes
        // for what is already queued), so the loop reads again next turn.
        self.unread.insert(token);
        for _ in 0..READS_PER_TURN {
            let socket = match token {
                CHECK4 => Some(&self.check4),
                CHECK6 => self.check6.as_ref(),
                _ => None,
            };
            let Some(socket) = socket else { break };
            let (n, src) = match socket.recv_from(&mut self.buf) {
                Ok(r) => r,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    self.unread.remove(&token);
                    break;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                // ICMP errors of earlier sends (port unreachable): keep reading.
                Err(_) => continue,
            };
            let bytes = &self.buf[..n];
            let tunnel = is_mesh(src.ip());
            if looks_like_stun(bytes) {
                let which = if tunnel { Socket::Tunnel } else { Socket::Check };
                traversal.handle_stun(now, which, bytes);
                continue;
            }
            if bytes.first() != Some(&SEAL_VERSION) {
                self.dropped += 1;
                continue;
            }
            let Ok((from, payload)) = msgs.open(bytes) else {
                self.dropped += 1;
                continue;
            };
            let via = if tunnel {
                // Through WireGuard, the source is the peer's mesh address
                // (its allowed IP); anything else is not from that peer.
                if mesh_of.get(&from).map(|a| IpAddr::V4(*a)) != Some(src.ip()) {
                    self.dropped += 1;
                    continue;
                }
                Via::Tunnel
            } else {
                Via::Check(unmap(src))
            };
            if payload.first().is_some_and(|t| *t >= FIRST_TYPE) {
                match Message::decode(&payload) {
                    Ok(Some(msg)) => out.push(Received::Traversal { from, via, msg }),
                    Ok(None) => {}
                    Err(_) => self.dropped += 1,
                }
            } else {
                let src = match via {
                    Via::Check(a) => Some(a),
                    _ => None,
                };
                out.push(Received::Other { from, payload, src });
            }
        }
        out
    }

    /// Sends one traversal message over a socket (not the relay); `tunnel_to`
    /// is the peer's check socket on its mesh address, for `Via::Tunnel`.
    pub fn send(
        &mut self,
        msgs: &mut PeerMessages,
        peer: &Key,
        via: Via,
        msg: &Message,
        tunnel_to: Option<SocketAddr>,
    ) {
        let sealed = match msgs.seal_payload(peer, &msg.encode()) {
            Ok(s) => s,
            Err(e) => return self.note_error(format!("sealing for {}: {e:#}", peer.short())),
        };
        let result = match via {
            Via::Check(to) => self.send_check(to, &sealed),
            Via::Tunnel => match tunnel_to {
                Some(to) => self.check4.send_to(&sealed, to).map(|_| ()),
                None => Ok(()),
            },
            Via::Relay => Ok(()),
        };
        if let Err(e) = result
            && e.kind() != ErrorKind::WouldBlock
        {
            // Unreachable candidates are normal while checking; log the kind once.
            self.note_error(format!("sending a check: {e}"));
        }
    }

    /// Sends an already sealed message to a peer's check socket.
    pub fn send_sealed(&mut self, to: SocketAddr, bytes: &[u8]) {
        if let Err(e) = self.send_check(to, bytes)
            && e.kind() != ErrorKind::WouldBlock
        {
            self.note_error(format!("sending to {to}: {e}"));
        }
    }

    fn send_check(&self, to: SocketAddr, bytes: &[u8]) -> std::io::Result<()> {
        let s = match to {
            SocketAddr::V4(_) => &self.check4,
            SocketAddr::V6(_) => match &self.check6 {
                Some(s) => s,
                None => return Ok(()),
            },
        };
        s.send_to(bytes, to).map(|_| ())
    }

    /// Sends a STUN request from the socket it is about.
    pub fn send_stun(&mut self, socket: Socket, to: SocketAddr, bytes: &[u8]) {
        let result = match socket {
            Socket::Check => self.send_check(to, bytes),
            Socket::Tunnel => self.send_check(to, bytes),
        };
        if let Err(e) = result
            && e.kind() != ErrorKind::WouldBlock
        {
            self.note_error(format!("sending STUN to {to}: {e}"));
        }
    }
}

/// Mesh addresses (100.64.0.0/10) are only reachable through WireGuard.
fn is_mesh(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            o[0] == 100 && (o[1] & 0xc0) == 64
        }
        IpAddr::V6(_) => false,
    }
}

/// IPv4 peers reached over the IPv6 socket show as ::ffff:a.b.c.d.
fn unmap(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => a,
        },
        SocketAddr::V4(_) => a,
    }
}

fn bind_v6_only(port: u16) -> std::io::Result<UdpSocket> {
    // The IPv4 socket has the port; this one must not claim it for IPv4 too.
    // SAFETY: plain socket calls on a descriptor we own and hand to UdpSocket.
    unsafe {
        let fd = libc::socket(
            libc::AF_INET6,
            libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        );
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let one: libc::c_int = 1;
        libc::setsockopt(
            fd,
            libc::IPPROTO_IPV6,
            libc::IPV6_V6ONLY,
            &one as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
        let mut sin6: libc::sockaddr_in6 = std::mem::zeroed();
        sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
        sin6.sin6_port = port.to_be();
        if libc::bind(
            fd,
            &sin6 as *const _ as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
        ) != 0
        {
            let e = std::io::Error::last_os_error();
            libc::close(fd);
            return Err(e);
        }
        use std::os::fd::FromRawFd;
        Ok(UdpSocket::from_std(std::net::UdpSocket::from_raw_fd(fd)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn a_flood_is_read_in_bounded_turns_and_nothing_is_left_behind() {
        let poll = mio::Poll::new().unwrap();
        let mut d = DirectPath::open(poll.registry(), 0).unwrap();
        let key = Key::generate_private();
        let mut msgs = PeerMessages::new(key, 1);
        let now = Instant::now();
        let mut nat = Traversal::new(now, key.public_key(), d.port, 1, 7);
        // Room for the whole flood (FORCE lifts rmem_max for root, as tests run here).
        crate::sockopt::set_buffer(&d.check4, libc::SO_RCVBUF, 4 << 20);
        crate::sockopt::set_buffer(&d.check4, libc::SO_RCVBUFFORCE, 4 << 20);
        let stranger = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = SocketAddr::from((Ipv4Addr::LOCALHOST, d.port));
        let sent = READS_PER_TURN * 3 + 10;
        for i in 0..sent {
            // Garbage, a forged sealed box, and a bare version byte.
            let junk: &[u8] = match i % 3 {
                0 => b"hello",
                1 => &[SEAL_VERSION; 80],
                _ => &[SEAL_VERSION],
            };
            stranger.send_to(junk, to).unwrap();
        }
        let mut turns = 0;
        loop {
            let got = d.ready(now, CHECK4, &mut nat, &mut msgs, &HashMap::new());
            assert!(got.is_empty(), "a stranger's datagram was accepted");
            turns += 1;
            if d.unread().is_empty() {
                break;
            }
            assert!(turns < 100, "never drained");
        }
        // The socket buffer may have dropped some of the flood; what arrived
        // took one turn per budget, and all of it was read and dropped.
        let arrived = d.dropped as usize;
        assert!(
            arrived > READS_PER_TURN && arrived <= sent,
            "{arrived} of {sent} arrived"
        );
        assert!(
            turns >= arrived.div_ceil(READS_PER_TURN),
            "read {arrived} datagrams in {turns} turns: the per-turn budget is not applied"
        );
        let mut buf = [0u8; 16];
        assert!(d.check4.recv_from(&mut buf).is_err(), "datagrams left unread");
    }
}
