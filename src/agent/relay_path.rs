//! The relayed data path, shell side: one TCP connection per relay we need
//! (our home relay, where peers send to us, and each peer's home relay, where
//! we send to them) and one loopback UDP socket per peer. A peer on the relay
//! path has that socket as its WireGuard endpoint, so WireGuard — kernel or
//! userspace alike — sends the peer's datagrams to us; we forward them over the
//! relay, and write what the relay delivers from that peer back to WireGuard
//! from the same socket, so WireGuard sees one stable endpoint per peer.
//!
//! Connection state, keepalives and reconnects are [`RelayClient`]'s; this
//! module only moves bytes between it and the sockets.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{ErrorKind, Read};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Instant;

use mio::net::{TcpStream, UdpSocket};
use mio::{Interest, Registry, Token};
use serde::{Deserialize, Serialize};

use super::resolve::{Lookup, Resolver};
use crate::control::messages::RelayInfo;
use crate::keys::Key;
use crate::nat::path::Mute;
use crate::outgoing::write_pending;
use crate::peer::seal::SEAL_VERSION;
use crate::relay::client::{Event, RelayClient};

/// WireGuard's message type for transport data (1–3 are handshake and cookie).
const WG_TRANSPORT_DATA: u8 = 4;

/// Tokens of relay connections and peer sockets start here, far above the
/// agent's own and its control clients' tokens (which count up from 16).
pub const FIRST_TOKEN: usize = usize::MAX / 2;
/// Datagrams held per relay while its first connection is being set up, so
/// WireGuard's first handshake goes out the moment it opens instead of after
/// WireGuard's 5 s retry.
const HELD_WHILE_CONNECTING: usize = 16;
/// Receive buffer of a peer's loopback socket. WireGuard hands over bursts
/// faster than one loop turn drains them; the 208 KiB default lost thousands
/// of datagrams per second under iperf3. Memory is only used while datagrams wait.
const PROXY_RECEIVE_BUFFER: libc::c_int = 1024 * 1024;
/// Unsent bytes the kernel may hold for a relay connection (TCP_NOTSENT_LOWAT).
/// Every byte waiting there delays the tunnel's packets, and TCP inside the
/// tunnel slows down with the delay; autotuning let megabytes wait. Bytes in
/// flight are not limited, so a distant relay still gets its bandwidth-delay product.
const RELAY_UNSENT_LIMIT: libc::c_int = 64 * 1024;
/// While draining a loopback socket, write to the relay whenever this much
/// is queued, rather than letting the relay queue fill and drop.
const FLUSH_EVERY: usize = 64 * 1024;
/// Largest datagram WireGuard sends (MTU 1420 plus headers, with room for jumbo links).
const MAX_DATAGRAM: usize = 65535;

/// What a relay connection looks like to `warren status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayStatus {
    pub public_key: Key,
    /// The address dialled last.
    pub addr: Option<String>,
    /// connected, connecting or waiting.
    pub state: String,
    /// Our home relay: where peers reach us.
    pub home: bool,
    /// Why the last connection ended, until one succeeds.
    pub detail: Option<String>,
    /// Datagrams to peers dropped because this relay was unreachable or congested.
    pub dropped: u64,
    /// TCP connect plus Noise handshake of the current connection (about two
    /// round trips), microseconds: what `warren netcheck` shows as latency.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_us: Option<u64>,
}

struct Link {
    info: RelayInfo,
    client: RelayClient,
    token: Token,
    stream: Option<TcpStream>,
    connected: bool,
    /// Index into `info.addrs` of the next address to dial.
    next_addr: usize,
    dialled: Option<String>,
    dialled_at: Option<Instant>,
    connect_time: Option<std::time::Duration>,
    /// Asked to connect, waiting for the resolver to answer for `dialled`.
    resolving: bool,
    last_error: Option<String>,
    /// Whether the link was usable when [`RelayPath::drive`] last looked.
    was_usable: bool,
    /// Datagrams to send once the connection opens: (peer, datagram).
    held: VecDeque<(Key, Vec<u8>)>,
}

impl Link {
    /// Peers reached through this relay stay on it while it opens for the
    /// first time or reconnects after a clean hand-over; once a connection
    /// attempt has failed, their direct candidates get a chance meanwhile.
    fn usable(&self) -> bool {
        self.client.is_open() || self.last_error.is_none()
    }

    fn send(&mut self, now: Instant, peer: Key, datagram: &[u8]) {
        if self.client.is_open() {
            self.client.send_to(now, peer, datagram);
        } else if self.last_error.is_none() && self.held.len() < HELD_WHILE_CONNECTING {
            self.held.push_back((peer, datagram.to_vec()));
        }
    }
}

struct Proxy {
    socket: UdpSocket,
    token: Token,
    addr: SocketAddr,
    /// The peer's home relay, through which we send to it.
    relay: Key,
}

#[derive(Clone, Copy)]
enum Owner {
    Link(Key),
    Proxy(Key),
}

pub struct RelayPath {
    private_key: Key,
    /// Where WireGuard listens; relayed datagrams are delivered here.
    wg_addr: SocketAddr,
    home: Option<Key>,
    links: HashMap<Key, Link>,
    proxies: HashMap<Key, Proxy>,
    owners: HashMap<Token, Owner>,
    next_token: usize,
    /// A relay connection opened or closed since the last [`RelayPath::take_changed`].
    changed: bool,
    /// Sealed messages received through a relay: (claimed sender, message).
    sealed: VecDeque<(Key, Vec<u8>)>,
    buf: Vec<u8>,
    /// The last failure to open a peer's socket, logged once rather than every reconcile.
    proxy_error: Option<String>,
    /// Peers being upgraded or on a direct path: what the relay still
    /// delivers from them is dropped, because a relayed datagram reaching
    /// WireGuard would pull its endpoint straight back to the relay socket.
    muted: HashMap<Key, Mute>,
    /// Datagrams dropped for that reason.
    pub muted_drops: u64,
    /// WireGuard datagram bytes handed to relays, and delivered from them to WireGuard.
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

impl RelayPath {
    pub fn new(private_key: Key, wg_port: u16) -> RelayPath {
        RelayPath {
            private_key,
            wg_addr: SocketAddr::from((Ipv4Addr::LOCALHOST, wg_port)),
            home: None,
            links: HashMap::new(),
            proxies: HashMap::new(),
            owners: HashMap::new(),
            next_token: FIRST_TOKEN,
            changed: false,
            sealed: VecDeque::new(),
            buf: vec![0; MAX_DATAGRAM],
            proxy_error: None,
            muted: HashMap::new(),
            muted_drops: 0,
            bytes_sent: 0,
            bytes_received: 0,
        }
    }

    /// The peers whose relayed datagrams must not reach WireGuard.
    pub fn set_muted(&mut self, muted: HashMap<Key, Mute>) {
        self.muted = muted;
    }

    pub fn owns(&self, token: Token) -> bool {
        self.owners.contains_key(&token)
    }

    fn token(&mut self) -> Token {
        let t = Token(self.next_token);
        self.next_token = self.next_token.wrapping_add(1).max(FIRST_TOKEN);
        t
    }

    /// Brings connections and sockets in line with the peer map: a connection
    /// to our home relay and to every peer's, a loopback socket per peer that
    /// has a home relay. A new private key (rotation) reconnects everything.
    pub fn configure(
        &mut self,
        registry: &Registry,
        now: Instant,
        private_key: Key,
        relays: &[RelayInfo],
        home: Option<Key>,
        peers: &[(Key, Option<Key>)],
    ) {
        if private_key != self.private_key {
            self.private_key = private_key;
            for key in self.links.keys().copied().collect::<Vec<_>>() {
                self.drop_link(registry, &key);
            }
        }
        let published: HashMap<Key, &RelayInfo> = relays.iter().map(|r| (r.public_key, r)).collect();
        self.home = home.filter(|h| published.contains_key(h));
        let mut wanted: HashSet<Key> = self.home.into_iter().collect();
        wanted.extend(
            peers
                .iter()
                .filter_map(|(_, r)| *r)
                .filter(|r| published.contains_key(r)),
        );
        for key in self.links.keys().copied().collect::<Vec<_>>() {
            let moved = published
                .get(&key)
                .is_some_and(|r| r.addrs != self.links[&key].info.addrs);
            if !wanted.contains(&key) || moved {
                self.drop_link(registry, &key);
            }
        }
        for key in &wanted {
            if !self.links.contains_key(key) {
                let token = self.token();
                self.owners.insert(token, Owner::Link(*key));
                self.links.insert(
                    *key,
                    Link {
                        info: published[key].clone(),
                        client: RelayClient::new(self.private_key, *key, now),
                        token,
                        stream: None,
                        connected: false,
                        next_addr: 0,
                        dialled: None,
                        dialled_at: None,
                        connect_time: None,
                        resolving: false,
                        last_error: None,
                        was_usable: true,
                        held: VecDeque::new(),
                    },
                );
            }
        }

        let want_proxy: HashMap<Key, Key> = peers
            .iter()
            .filter_map(|(p, r)| r.filter(|r| wanted.contains(r)).map(|r| (*p, r)))
            .collect();
        for key in self.proxies.keys().copied().collect::<Vec<_>>() {
            if !want_proxy.contains_key(&key)
                && let Some(mut p) = self.proxies.remove(&key)
            {
                let _ = registry.deregister(&mut p.socket);
                self.owners.remove(&p.token);
            }
        }
        for (peer, relay) in want_proxy {
            if let Some(p) = self.proxies.get_mut(&peer) {
                p.relay = relay;
                continue;
            }
            if let Err(e) = self.open_proxy(registry, peer, relay) {
                let msg = format!("{e:#}");
                if self.proxy_error.as_deref() != Some(&msg) {
                    log_warn!("agent: relay path for peer {}: {msg}", peer.short());
                }
                self.proxy_error = Some(msg);
            }
        }
    }

    fn open_proxy(&mut self, registry: &Registry, peer: Key, relay: Key) -> anyhow::Result<()> {
        use anyhow::Context;
        let mut socket = UdpSocket::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
            .context("opening a loopback UDP socket")?;
        let addr = socket
            .local_addr()
            .context("reading the loopback socket's address")?;
        // The plain option is capped by net.core.rmem_max; FORCE lifts the cap for root (the agent).
        crate::sockopt::set_buffer(&socket, libc::SO_RCVBUF, PROXY_RECEIVE_BUFFER);
        crate::sockopt::set_buffer(&socket, libc::SO_RCVBUFFORCE, PROXY_RECEIVE_BUFFER);
        // Connected to WireGuard's port: the kernel then delivers only
        // WireGuard's datagrams to it (no other local process can push
        // traffic into the relay path), and sends skip the route lookup.
        socket.connect(self.wg_addr).with_context(|| {
            format!(
                "connecting the loopback socket to WireGuard's port {}",
                self.wg_addr
            )
        })?;
        let token = self.token();
        registry
            .register(&mut socket, token, Interest::READABLE)
            .context("registering the loopback socket")?;
        self.owners.insert(token, Owner::Proxy(peer));
        self.proxies.insert(
            peer,
            Proxy {
                socket,
                token,
                addr,
                relay,
            },
        );
        Ok(())
    }

    fn drop_link(&mut self, registry: &Registry, key: &Key) {
        if let Some(mut l) = self.links.remove(key) {
            if let Some(mut s) = l.stream.take() {
                let _ = registry.deregister(&mut s);
            }
            self.owners.remove(&l.token);
            if l.usable() {
                self.changed = true;
            }
        }
    }

    /// The WireGuard endpoint that sends `peer`'s traffic over the relay, if
    /// the relay that reaches it is usable (see [`Link::usable`]).
    pub fn endpoint(&self, peer: &Key) -> Option<SocketAddr> {
        let p = self.proxies.get(peer)?;
        self.links.get(&p.relay).filter(|l| l.usable()).map(|_| p.addr)
    }

    /// Whether `addr` is one of our loopback sockets, and for which peer's relay.
    pub fn relay_of_endpoint(&self, peer: &Key, addr: SocketAddr) -> Option<&RelayInfo> {
        let p = self.proxies.get(peer).filter(|p| p.addr == addr)?;
        self.links.get(&p.relay).map(|l| &l.info)
    }

    /// A local address went away: connections bound to it are dead (TCP
    /// would only notice after minutes of retransmissions), so reconnect now.
    pub fn address_removed(
        &mut self,
        registry: &Registry,
        resolver: &mut Resolver,
        now: Instant,
        addr: std::net::IpAddr,
    ) {
        for l in self.links.values_mut() {
            let bound = l
                .stream
                .as_ref()
                .and_then(|s| s.local_addr().ok())
                .is_some_and(|a| a.ip() == addr);
            if bound {
                close(l, now, format!("local address {addr} went away"));
            }
        }
        self.drive(registry, resolver, now);
    }

    /// A relay became usable or unusable: paths need choosing again.
    pub fn take_changed(&mut self) -> bool {
        std::mem::take(&mut self.changed)
    }

    pub fn take_sealed(&mut self) -> Option<(Key, Vec<u8>)> {
        self.sealed.pop_front()
    }

    /// Sends a sealed message to `peer` through its home relay.
    pub fn send_sealed(&mut self, now: Instant, peer: &Key, msg: &[u8]) -> bool {
        let Some(relay) = self.proxies.get(peer).map(|p| p.relay) else {
            return false;
        };
        // Held like datagrams while the first connection opens: the first
        // candidates are sent before it has.
        self.links.get_mut(&relay).is_some_and(|l| {
            if l.client.is_open() {
                l.client.send_to(now, *peer, msg)
            } else if l.usable() && l.held.len() < HELD_WHILE_CONNECTING {
                l.held.push_back((*peer, msg.to_vec()));
                true
            } else {
                false
            }
        })
    }

    /// The address of the relay through which we reach `peer`.
    pub fn relay_for_peer(&self, peer: &Key) -> Option<String> {
        let l = self.links.get(&self.proxies.get(peer)?.relay)?;
        l.dialled.clone().or_else(|| l.info.addrs.first().cloned())
    }

    /// Writes what was queued toward the relays since the last turn.
    pub fn flush(&mut self, now: Instant) {
        for l in self.links.values_mut() {
            write_link(now, l);
        }
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.links.values().filter_map(|l| l.client.poll_timeout()).min()
    }

    pub fn handle_timeout(&mut self, registry: &Registry, resolver: &mut Resolver, now: Instant) {
        for l in self.links.values_mut() {
            if l.client.poll_timeout().is_some_and(|t| t <= now) {
                l.client.handle_timeout(now);
            }
        }
        self.drive(registry, resolver, now);
    }

    /// The resolver has answers: dial the relays that waited for one.
    pub fn resolved(&mut self, registry: &Registry, resolver: &mut Resolver, now: Instant) {
        for l in self.links.values_mut() {
            if l.resolving && l.stream.is_none() {
                dial(registry, resolver, now, l);
            }
        }
        self.drive(registry, resolver, now);
    }

    /// A socket of ours is ready.
    pub fn ready(&mut self, registry: &Registry, resolver: &mut Resolver, now: Instant, token: Token) {
        match self.owners.get(&token).copied() {
            Some(Owner::Link(key)) => {
                // Deliver after every read rather than after draining the
                // socket: a userspace WireGuard's 208 KiB socket buffer
                // overflows when megabytes arrive back to back.
                while self.link_ready(now, &key) {
                    self.drive(registry, resolver, now);
                }
            }
            Some(Owner::Proxy(peer)) => self.proxy_ready(now, &peer),
            None => {}
        }
        self.drive(registry, resolver, now);
    }

    /// Reads once from a relay connection; true if there may be more to read.
    fn link_ready(&mut self, now: Instant, key: &Key) -> bool {
        let Some(l) = self.links.get_mut(key) else {
            return false;
        };
        let Some(s) = l.stream.as_mut() else { return false };
        if !l.connected {
            if let Ok(Some(e)) | Err(e) = s.take_error() {
                close(l, now, format!("connecting: {e}"));
                return false;
            }
            match s.peer_addr() {
                Ok(_) => {
                    l.connected = true;
                    let _ = s.set_nodelay(true);
                    l.client.on_tcp_connected(now);
                }
                Err(e) if e.kind() == ErrorKind::NotConnected => return false,
                Err(e) => {
                    close(l, now, format!("connecting: {e}"));
                    return false;
                }
            }
        }
        loop {
            let Some(s) = l.stream.as_mut() else { return false };
            match s.read(&mut self.buf) {
                Ok(0) => close(l, now, "the relay closed the connection".into()),
                Ok(n) => {
                    l.client.on_bytes(now, &self.buf[..n]);
                    return true;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => close(l, now, format!("reading: {e}")),
            }
            return false;
        }
    }

    /// WireGuard sent datagrams to a peer on the relay path.
    fn proxy_ready(&mut self, now: Instant, peer: &Key) {
        let Some(p) = self.proxies.get(peer) else { return };
        let mut link = self.links.get_mut(&p.relay);
        loop {
            match p.socket.recv(&mut self.buf) {
                Ok(n) => {
                    if let Some(l) = link.as_mut() {
                        self.bytes_sent += n as u64;
                        l.send(now, *peer, &self.buf[..n]);
                        if l.client.outgoing().len() >= FLUSH_EVERY {
                            write_link(now, l);
                        }
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                // ICMP errors from a WireGuard that is being recreated: keep reading.
                Err(_) => continue,
            }
        }
    }

    /// Acts on what the relay clients decided and writes what they queued.
    fn drive(&mut self, registry: &Registry, resolver: &mut Resolver, now: Instant) {
        for l in self.links.values_mut() {
            while let Some(ev) = l.client.poll_event() {
                match ev {
                    Event::Connect => dial(registry, resolver, now, l),
                    Event::Close(why) => {
                        if let Some(mut s) = l.stream.take() {
                            let _ = registry.deregister(&mut s);
                        }
                        l.connected = false;
                        let why = match (std::mem::take(&mut l.resolving), &l.dialled) {
                            (true, Some(name)) => format!("{why} (still resolving {name})"),
                            _ => why,
                        };
                        if l.last_error.as_deref() != Some(&why) {
                            log_warn!("agent: relay {}: {why}", describe(l));
                        }
                        l.last_error = Some(why);
                        l.next_addr += 1;
                        l.held.clear();
                    }
                    Event::Open => {
                        l.connect_time = l.dialled_at.map(|t| now.saturating_duration_since(t));
                        log!("agent: relay {} connected", describe(l));
                        l.last_error = None;
                        for (peer, datagram) in std::mem::take(&mut l.held) {
                            l.client.send_to(now, peer, &datagram);
                        }
                    }
                    Event::Received { from, payload } => {
                        if payload.first() == Some(&SEAL_VERSION) {
                            self.sealed.push_back((from, payload));
                        } else if match self.muted.get(&from) {
                            Some(Mute::All) => true,
                            Some(Mute::Data) => payload.first() == Some(&WG_TRANSPORT_DATA),
                            _ => false,
                        } {
                            self.muted_drops += 1;
                        } else if let Some(p) = self.proxies.get(&from) {
                            // WireGuard drops anything that is not a valid message from this peer.
                            if p.socket.send(&payload).is_ok() {
                                self.bytes_received += payload.len() as u64;
                            }
                        }
                    }
                    Event::PeerPresent(_) | Event::PeerGone(_) => {}
                }
            }
            write_link(now, l);
            if l.usable() != l.was_usable {
                l.was_usable = l.usable();
                self.changed = true;
            }
        }
    }

    pub fn status(&self) -> Vec<RelayStatus> {
        let mut out: Vec<RelayStatus> = self
            .links
            .values()
            .map(|l| RelayStatus {
                public_key: l.info.public_key,
                addr: l.dialled.clone().or_else(|| l.info.addrs.first().cloned()),
                state: if l.client.is_open() {
                    "connected"
                } else if l.stream.is_some() || l.resolving {
                    "connecting"
                } else {
                    "waiting"
                }
                .to_string(),
                home: self.home == Some(l.info.public_key),
                detail: l.last_error.clone(),
                dropped: l.client.dropped,
                connect_us: l
                    .connect_time
                    .filter(|_| l.client.is_open())
                    .map(|d| d.as_micros() as u64),
            })
            .collect();
        out.sort_by(|a, b| b.home.cmp(&a.home).then(a.addr.cmp(&b.addr)));
        out
    }
}

fn describe(l: &Link) -> String {
    let addr = l.dialled.as_deref().or(l.info.addrs.first().map(String::as_str));
    format!("{} ({})", addr.unwrap_or("no address"), l.info.public_key.short())
}

/// The TCP connection failed or closed under us.
fn close(l: &mut Link, now: Instant, why: String) {
    // Deregistration happens when the stream is dropped.
    l.stream = None;
    l.connected = false;
    l.resolving = false;
    if l.last_error.as_deref() != Some(&why) {
        log_warn!("agent: relay {}: {why}", describe(l));
    }
    l.last_error = Some(why.clone());
    l.next_addr += 1;
    l.held.clear();
    l.client.on_tcp_closed(now, &why);
}

fn dial(registry: &Registry, resolver: &mut Resolver, now: Instant, l: &mut Link) {
    l.resolving = false;
    if l.info.addrs.is_empty() {
        return close(l, now, "the coordinator published no address for it".into());
    }
    let text = l.info.addrs[l.next_addr % l.info.addrs.len()].clone();
    l.dialled = Some(text.clone());
    l.dialled_at = Some(now);
    let addr = match resolver.lookup(now, &text) {
        Lookup::Ready(a) => a,
        // Dialled again from `RelayPath::resolved`; an answer that never
        // comes runs into the relay client's connect deadline.
        Lookup::Pending => {
            l.resolving = true;
            return;
        }
        Lookup::Failed(why) => return close(l, now, why),
    };
    match crate::sockopt::connect_tcp(addr) {
        Ok(mut s) => {
            crate::sockopt::set_unsent_limit(&s, RELAY_UNSENT_LIMIT);
            if let Err(e) = registry.register(&mut s, l.token, Interest::READABLE | Interest::WRITABLE) {
                return close(l, now, format!("registering the relay socket: {e}"));
            }
            l.stream = Some(s);
            l.connected = false;
        }
        Err(e) => close(l, now, format!("connecting to {addr}: {e}")),
    }
}

fn write_link(now: Instant, l: &mut Link) {
    if !l.connected {
        return;
    }
    let Some(s) = l.stream.as_mut() else { return };
    if let Err(e) = write_pending(s, &mut l.client) {
        close(l, now, format!("writing: {e}"));
    }
}

#[cfg(all(test, feature = "relay-server"))]
mod tests {
    //! Two agents' relay paths and a real relay server on loopback, with plain
    //! UDP sockets standing in for the two WireGuard interfaces.

    use super::*;
    use crate::relay::server::{RelayConfig, RelayHandle, RelayServer};
    use mio::{Events, Poll};
    use std::net::{ToSocketAddrs, UdpSocket as StdUdp};
    use std::time::Duration;

    const DEADLINE: Duration = Duration::from_secs(10);

    const RESOLVER: Token = Token(5);

    struct Node {
        poll: Poll,
        resolver: Resolver,
        path: RelayPath,
        /// Stands in for WireGuard: bound where the path delivers.
        wg: StdUdp,
        key: Key,
    }

    impl Node {
        fn new() -> Node {
            let wg = StdUdp::bind("127.0.0.1:0").unwrap();
            wg.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
            let key = Key::generate_private();
            let port = wg.local_addr().unwrap().port();
            let poll = Poll::new().unwrap();
            Node {
                resolver: Resolver::new(poll.registry(), RESOLVER).unwrap(),
                poll,
                path: RelayPath::new(key, port),
                wg,
                key,
            }
        }

        fn turn(&mut self) {
            let mut events = Events::with_capacity(16);
            self.poll
                .poll(&mut events, Some(Duration::from_millis(5)))
                .unwrap();
            let now = Instant::now();
            for ev in events.iter() {
                if ev.token() == RESOLVER {
                    if self.resolver.drain(now) {
                        self.path.resolved(self.poll.registry(), &mut self.resolver, now);
                    }
                } else {
                    self.path
                        .ready(self.poll.registry(), &mut self.resolver, now, ev.token());
                }
            }
            self.path
                .handle_timeout(self.poll.registry(), &mut self.resolver, now);
        }
    }

    fn relay() -> (RelayInfo, RelayHandle) {
        relay_at("127.0.0.1:0".parse().unwrap(), None)
    }

    /// A relay listening on `addr`, published as `name:port` if a name is given.
    fn relay_at(addr: SocketAddr, name: Option<&str>) -> (RelayInfo, RelayHandle) {
        let server = RelayServer::bind(RelayConfig::new(addr, Key::generate_private())).unwrap();
        let bound = server.local_addr().unwrap();
        let info = RelayInfo {
            public_key: server.public_key(),
            addrs: vec![match name {
                Some(n) => format!("{n}:{}", bound.port()),
                None => bound.to_string(),
            }],
        };
        let handle = server.handle();
        std::thread::spawn(move || server.run().unwrap());
        (info, handle)
    }

    /// Runs both nodes until `done` holds, or fails after the deadline.
    fn until(a: &mut Node, b: &mut Node, what: &str, mut done: impl FnMut(&mut Node, &mut Node) -> bool) {
        let end = Instant::now() + DEADLINE;
        while !done(a, b) {
            assert!(Instant::now() < end, "timed out waiting for {what}");
            a.turn();
            b.turn();
        }
    }

    fn received(wg: &StdUdp) -> Option<(Vec<u8>, SocketAddr)> {
        let mut buf = [0u8; 2048];
        wg.recv_from(&mut buf)
            .ok()
            .map(|(n, from)| (buf[..n].to_vec(), from))
    }

    #[test]
    fn datagrams_cross_the_relay_between_the_wireguard_sockets_and_strangers_are_ignored() {
        let (info, handle) = relay();
        let (mut a, mut b) = (Node::new(), Node::new());
        let (ka, kb) = (a.key.public_key(), b.key.public_key());
        let relays = [info.clone()];
        let home = Some(info.public_key);
        b.path.configure(
            b.poll.registry(),
            Instant::now(),
            b.key,
            &relays,
            home,
            &[(ka, home)],
        );
        until(&mut a, &mut b, "b at the relay", |_, b| {
            b.path.status()[0].state == "connected"
        });
        a.path.configure(
            a.poll.registry(),
            Instant::now(),
            a.key,
            &relays,
            home,
            &[(kb, home)],
        );
        // Relay first: the endpoint is offered while the connection is still being set up.
        let a_to_b = a.path.endpoint(&kb).expect("a relay endpoint for b at once");
        let b_to_a = b.path.endpoint(&ka).expect("a relay endpoint for a at once");
        assert!(a_to_b.ip().is_loopback() && b_to_a.ip().is_loopback());
        // The first datagram, sent before the connection is open, is held and delivered.
        let init = [1u8, 0, 0, 0, 42];
        a.wg.send_to(&init, a_to_b).unwrap();
        let mut got = None;
        until(&mut a, &mut b, "the held datagram at b", |_, b| {
            got = got.take().or_else(|| received(&b.wg));
            got.is_some()
        });
        let (bytes, from) = got.unwrap();
        assert_eq!(bytes, init);
        // b's WireGuard sees it from its relay socket for a: one stable endpoint per peer.
        assert_eq!(from, b_to_a);
        // And back.
        let reply = [2u8, 0, 0, 0, 7, 7];
        b.wg.send_to(&reply, b_to_a).unwrap();
        let mut got = None;
        until(&mut a, &mut b, "the reply at a", |a, _| {
            got = got.take().or_else(|| received(&a.wg));
            got.is_some()
        });
        assert_eq!(got.unwrap(), (reply.to_vec(), a_to_b));
        assert!(a.path.status().iter().all(|r| r.state == "connected" && r.home));

        // A local process other than WireGuard cannot push traffic into the relay path.
        let stranger = StdUdp::bind("127.0.0.1:0").unwrap();
        stranger.send_to(&[1, 0, 0, 0, 99], a_to_b).unwrap();
        a.wg.send_to(&[4, 0, 0, 0, 1], a_to_b).unwrap();
        let mut seen = Vec::new();
        until(&mut a, &mut b, "a's second datagram at b", |_, b| {
            seen.extend(received(&b.wg).map(|(d, _)| d));
            seen.contains(&vec![4, 0, 0, 0, 1])
        });
        assert!(
            !seen.contains(&vec![1, 0, 0, 0, 99]),
            "a stranger's datagram was relayed"
        );

        // The peer leaves the map: its socket closes and nothing is offered for it.
        a.path
            .configure(a.poll.registry(), Instant::now(), a.key, &relays, home, &[]);
        assert_eq!(a.path.endpoint(&kb), None);
        handle.stop();
    }

    #[test]
    fn an_unreachable_relay_gives_candidates_their_turn() {
        // A port nobody listens on: the connection is refused.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = closed.local_addr().unwrap();
        drop(closed);
        let info = RelayInfo {
            public_key: Key::generate_private().public_key(),
            addrs: vec![addr.to_string()],
        };
        let (mut a, mut b) = (Node::new(), Node::new());
        let kb = b.key.public_key();
        let home = Some(info.public_key);
        a.path.configure(
            a.poll.registry(),
            Instant::now(),
            a.key,
            &[info],
            home,
            &[(kb, home)],
        );
        assert!(a.path.endpoint(&kb).is_some());
        until(&mut a, &mut b, "the relay to be given up on", |a, _| {
            a.path.endpoint(&kb).is_none()
        });
        assert!(a.path.take_changed(), "paths were not told to change");
        let st = a.path.status();
        assert_eq!(st[0].state, "waiting");
        assert!(
            st[0].detail.as_deref().is_some_and(|d| d.contains("refused")),
            "{st:?}"
        );
    }

    #[test]
    fn a_relay_published_by_host_name_is_dialled_once_resolved() {
        // Listen where the system resolves localhost first, as the resolver will.
        let local = "localhost:0".to_socket_addrs().unwrap().next().unwrap();
        let (info, handle) = relay_at(local, Some("localhost"));
        let (mut a, mut b) = (Node::new(), Node::new());
        let kb = b.key.public_key();
        let home = Some(info.public_key);
        a.path.configure(
            a.poll.registry(),
            Instant::now(),
            a.key,
            std::slice::from_ref(&info),
            home,
            &[(kb, home)],
        );
        a.turn();
        until(&mut a, &mut b, "a at the relay by name", |a, _| {
            a.path.status()[0].state == "connected"
        });
        assert_eq!(a.path.status()[0].addr, info.addrs.first().cloned());
        assert!(a.path.status()[0].detail.is_none());
        handle.stop();
    }
}
