//! Whole agents' NAT traversal over a simulated network of NATs
//! ([`super::sim`]) with a simulated clock: each node is a [`Traversal`]
//! plus a model of WireGuard (endpoint, roaming, counters, keepalives) and
//! of the relay (reliable, muted as the traversal says), and a STUN/WG-STUN
//! server on the internet. Thousands of seeded scenarios per run assert the
//! outcome per pair of NAT kinds: direct where the design allows it, relay
//! otherwise, no flapping, and no direct path while checks fail.

use std::collections::{HashMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use super::candidate::{Candidate, Kind};
use super::gather::Socket;
use super::message::Message;
use super::path::{Desired, Mute, Sample, Via};
use super::sim::{Behaviour, NatConfig, NatId, SimNet};
use super::traversal::Traversal;
use crate::keys::Key;
use crate::stun::message as stun;

const TICK: Duration = Duration::from_millis(10);
const WG_PORT: u16 = 51820;
const CHECK_PORT: u16 = 51821;
const STUN_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 250);
const RELAY_LATENCY: Duration = Duration::from_millis(20);
const KEEPALIVE: Duration = Duration::from_secs(25);
const APP_INTERVAL: Duration = Duration::from_millis(100);

#[derive(Clone, Debug)]
enum Inner {
    Keepalive,
    App,
    Tunnel(Message),
}

#[derive(Clone, Debug)]
enum Packet {
    Wg {
        from: Key,
        inner: Inner,
    },
    Check {
        from: Key,
        msg: Message,
    },
    Stun(Vec<u8>),
    /// A STUN request carried to WG-STUN inside a WireGuard datagram, and its answer.
    WgStun(Vec<u8>),
}

/// How an answer goes back: plain STUN or inside WireGuard.
type Wrap = fn(Vec<u8>) -> Packet;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Endpoint {
    Relay,
    Addr(SocketAddr),
}

struct WgPeer {
    endpoint: Option<Endpoint>,
    rx: u64,
    tx: u64,
    last_send: Instant,
}

struct Node {
    key: Key,
    ip: Ipv4Addr,
    nat: Traversal,
    wg: HashMap<Key, WgPeer>,
    traffic: bool,
    next_app: Instant,
    app_direct: u64,
    app_relayed: u64,
    direct_events: u32,
    relay_events: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NatKind {
    Open,
    FullCone,
    Restricted,
    PortRestricted,
    AddressMapping,
    Symmetric,
    /// Port-restricted cone behind another.
    Double,
    UdpBlocked,
}

const KINDS: [NatKind; 8] = [
    NatKind::Open,
    NatKind::FullCone,
    NatKind::Restricted,
    NatKind::PortRestricted,
    NatKind::AddressMapping,
    NatKind::Symmetric,
    NatKind::Double,
    NatKind::UdpBlocked,
];

impl NatKind {
    /// One mapping per internal socket, whatever the destination (or no NAT).
    fn independent_mapping(self) -> bool {
        // An address-dependent mapping toward the peer is a new one, on
        // another port than the mapping STUN saw (which still holds its port).
        !matches!(
            self,
            NatKind::Symmetric | NatKind::AddressMapping | NatKind::UdpBlocked
        )
    }

    /// Accepts anyone on a mapping: a symmetric peer's new ports get in.
    fn open_inbound(self) -> bool {
        matches!(self, NatKind::Open | NatKind::FullCone)
    }
}

/// The design's promise for a pair: direct when both NATs keep one mapping
/// per socket, or when one side accepts any sender (it learns the other by
/// roaming); never with UDP blocked.
fn expect_direct(a: NatKind, b: NatKind) -> bool {
    if a == NatKind::UdpBlocked || b == NatKind::UdpBlocked {
        return false;
    }
    (a.independent_mapping() && b.independent_mapping()) || a.open_inbound() || b.open_inbound()
}

struct World {
    net: SimNet,
    nodes: Vec<Node>,
    packets: Vec<Packet>,
    relay: VecDeque<(Instant, usize, Key, Result<Message, Inner>)>,
    relay_up: bool,
    /// A firewall that drops WireGuard's port but not the check socket's:
    /// checks pass, yet WireGuard can never use the pair.
    wg_blackhole: bool,
    now: Instant,
    /// Router number → the NAT its LAN hosts sit behind.
    routers: HashMap<u8, NatId>,
}

fn nat_config(b: (Behaviour, Behaviour), ip: Ipv4Addr, block: bool) -> NatConfig {
    NatConfig {
        mapping: b.0,
        filtering: b.1,
        public_ip: ip,
        mapping_timeout: Duration::from_secs(60),
        hairpin: false,
        block_udp: block,
    }
}

impl World {
    fn new(seed: u64) -> World {
        let mut net = SimNet::new(seed);
        net.add_host(STUN_IP, None);
        World {
            net,
            nodes: Vec::new(),
            packets: Vec::new(),
            relay: VecDeque::new(),
            relay_up: true,
            wg_blackhole: false,
            now: Instant::now(),
            routers: HashMap::new(),
        }
    }

    /// Adds a node of `kind` behind router number `i` (made on first use;
    /// a second node with the same `i` shares its LAN).
    fn add(&mut self, kind: NatKind, i: u8, seed: u64) -> usize {
        use Behaviour::*;
        let public = Ipv4Addr::new(198, 51, 100, 10 + i);
        let private = Ipv4Addr::new(10, i, 0, 2 + self.nodes.len() as u8);
        let behaviour = match kind {
            NatKind::Open => None,
            NatKind::FullCone => Some((EndpointIndependent, EndpointIndependent)),
            NatKind::Restricted => Some((EndpointIndependent, AddressDependent)),
            NatKind::PortRestricted | NatKind::Double | NatKind::UdpBlocked => {
                Some((EndpointIndependent, AddressAndPortDependent))
            }
            NatKind::AddressMapping => Some((AddressDependent, AddressAndPortDependent)),
            NatKind::Symmetric => Some((AddressAndPortDependent, AddressAndPortDependent)),
        };
        let ip = match behaviour {
            None => {
                self.net.add_host(public, None);
                public
            }
            Some(b) => {
                let nat = match self.routers.get(&i) {
                    Some(n) => *n,
                    None => {
                        let outer = self
                            .net
                            .add_nat(nat_config(b, public, kind == NatKind::UdpBlocked), None);
                        let n = if kind == NatKind::Double {
                            let inner_ip = Ipv4Addr::new(10, 200, i, 1);
                            self.net.add_nat(nat_config(b, inner_ip, false), Some(outer))
                        } else {
                            outer
                        };
                        self.routers.insert(i, n);
                        n
                    }
                };
                self.net.add_host(private, Some(nat));
                private
            }
        };
        let mut key = [0u8; 32];
        key[..8].copy_from_slice(
            &(seed.wrapping_mul(31).wrapping_add(self.nodes.len() as u64 * 7919)).to_le_bytes(),
        );
        key[8] = self.nodes.len() as u8;
        let key = Key(key);
        let mut nat = Traversal::new(self.now, key, CHECK_PORT, 1000, seed ^ key.0[0] as u64);
        nat.set_stun_servers(
            self.now,
            Some(SocketAddr::from(([100, 64, 0, 4], 3478))),
            Some(SocketAddr::from((STUN_IP, 3478))),
        );
        nat.set_local(self.now, vec![local(ip)]);
        self.nodes.push(Node {
            key,
            ip,
            nat,
            wg: HashMap::new(),
            traffic: false,
            next_app: self.now,
            app_direct: 0,
            app_relayed: 0,
            direct_events: 0,
            relay_events: 0,
        });
        self.nodes.len() - 1
    }

    /// Every node knows every other (the coordinator's map), relay endpoints first.
    fn mesh(&mut self) {
        let keys: Vec<Key> = self.nodes.iter().map(|n| n.key).collect();
        let now = self.now;
        for n in &mut self.nodes {
            let others: Vec<Key> = keys.iter().copied().filter(|k| *k != n.key).collect();
            for k in &others {
                n.wg.insert(
                    *k,
                    WgPeer {
                        endpoint: Some(Endpoint::Relay),
                        rx: 0,
                        tx: 0,
                        last_send: now,
                    },
                );
            }
            let ids: Vec<(u64, Key)> = others.iter().map(|k| (k.0[8] as u64, *k)).collect();
            n.nat.set_peers(now, &ids);
        }
    }

    fn index_of(&self, key: &Key) -> Option<usize> {
        self.nodes.iter().position(|n| n.key == *key)
    }

    fn send_net(&mut self, from: SocketAddr, to: SocketAddr, p: Packet) {
        let id = self.packets.len() as u64;
        self.packets.push(p);
        self.net.send(self.now, from, to, id.to_le_bytes().to_vec());
    }

    /// WireGuard of node `i` sends `inner` to peer `to`.
    fn wg_send(&mut self, i: usize, to: Key, inner: Inner) {
        let now = self.now;
        let from_key = self.nodes[i].key;
        let ip = self.nodes[i].ip;
        let Some(peer) = self.nodes[i].wg.get_mut(&to) else {
            return;
        };
        peer.last_send = now;
        peer.tx += 100;
        match peer.endpoint {
            Some(Endpoint::Relay) => {
                if self.relay_up
                    && let Some(j) = self.index_of(&to)
                {
                    self.relay
                        .push_back((now + RELAY_LATENCY, j, from_key, Err(inner)));
                }
            }
            Some(Endpoint::Addr(_)) if self.wg_blackhole => {}
            Some(Endpoint::Addr(a)) => self.send_net(
                SocketAddr::from((ip, WG_PORT)),
                a,
                Packet::Wg {
                    from: from_key,
                    inner,
                },
            ),
            None => {}
        }
    }

    /// WireGuard of node `j` receives an authenticated packet from `from`.
    fn wg_receive(&mut self, j: usize, from: Key, src: Endpoint, inner: Inner) {
        let now = self.now;
        let node = &mut self.nodes[j];
        let Some(peer) = node.wg.get_mut(&from) else {
            return;
        };
        // WireGuard roams to wherever authenticated packets come from.
        peer.endpoint = Some(src);
        peer.rx += 100;
        match inner {
            Inner::App => match src {
                Endpoint::Relay => node.app_relayed += 1,
                Endpoint::Addr(_) => node.app_direct += 1,
            },
            Inner::Keepalive => {}
            Inner::Tunnel(msg) => node.nat.handle_message(now, from, Via::Tunnel, msg),
        }
    }

    fn deliver(&mut self) {
        for _ in 0..100_000 {
            match self.net.next_delivery() {
                Some(t) if t <= self.now => {}
                _ => break,
            }
            let Some(d) = self.net.poll_delivery(self.now) else {
                continue;
            };
            let id = u64::from_le_bytes(d.payload[..8].try_into().unwrap()) as usize;
            let p = self.packets[id].clone();
            let to_ip = match d.to.ip() {
                std::net::IpAddr::V4(v4) => v4,
                _ => continue,
            };
            if to_ip == STUN_IP {
                // The STUN server answers with the source it saw.
                let (bytes, wrap): (Vec<u8>, Wrap) = match p {
                    Packet::Stun(b) => (b, Packet::Stun),
                    Packet::WgStun(b) => (b, Packet::WgStun),
                    _ => continue,
                };
                let msg = stun::Message::decode(&bytes).unwrap();
                let mut out = Vec::new();
                stun::binding_success(&mut out, &msg.transaction_id, d.from);
                self.send_net(d.to, d.from, wrap(out));
                continue;
            }
            let Some(j) = self.nodes.iter().position(|n| n.ip == to_ip) else {
                continue;
            };
            let now = self.now;
            match (d.to.port(), p) {
                (WG_PORT, Packet::Wg { from, inner }) => {
                    self.wg_receive(j, from, Endpoint::Addr(d.from), inner)
                }
                (WG_PORT, Packet::WgStun(b)) => self.nodes[j].nat.handle_stun(now, Socket::Tunnel, &b),
                (CHECK_PORT, Packet::Check { from, msg }) => {
                    self.nodes[j]
                        .nat
                        .handle_message(now, from, Via::Check(d.from), msg)
                }
                (CHECK_PORT, Packet::Stun(b)) => self.nodes[j].nat.handle_stun(now, Socket::Check, &b),
                _ => {}
            }
        }
        while self.relay.front().is_some_and(|(t, ..)| *t <= self.now) {
            let (_, j, from, item) = self.relay.pop_front().unwrap();
            match item {
                Ok(msg) => {
                    let now = self.now;
                    self.nodes[j].nat.handle_message(now, from, Via::Relay, msg)
                }
                Err(inner) => {
                    // Muted peers' relayed data never reaches WireGuard (no handshakes modelled).
                    if self.nodes[j].nat.mute(&from) == Mute::None {
                        self.wg_receive(j, from, Endpoint::Relay, inner);
                    }
                }
            }
        }
    }

    /// One node's turn: timers, transmits, samples, endpoints.
    fn turn(&mut self, i: usize) {
        let now = self.now;
        self.nodes[i].nat.handle_timeout(now);
        let ip = self.nodes[i].ip;
        let key = self.nodes[i].key;
        while let Some(req) = self.nodes[i].nat.poll_stun(now) {
            match req.socket {
                Socket::Check => self.send_net(
                    SocketAddr::from((ip, CHECK_PORT)),
                    req.to,
                    Packet::Stun(req.bytes.to_vec()),
                ),
                Socket::Tunnel => self.send_net(
                    SocketAddr::from((ip, WG_PORT)),
                    SocketAddr::from((STUN_IP, 3479)),
                    Packet::WgStun(req.bytes.to_vec()),
                ),
            }
        }
        while let Some(t) = self.nodes[i].nat.poll_transmit() {
            match t.via {
                Via::Relay => {
                    if self.relay_up
                        && let Some(j) = self.index_of(&t.peer)
                    {
                        self.relay.push_back((now + RELAY_LATENCY, j, key, Ok(t.msg)));
                    }
                }
                Via::Check(to) => self.send_net(
                    SocketAddr::from((ip, CHECK_PORT)),
                    to,
                    Packet::Check {
                        from: key,
                        msg: t.msg,
                    },
                ),
                Via::Tunnel => self.wg_send(i, t.peer, Inner::Tunnel(t.msg)),
            }
        }
        while let Some(ev) = self.nodes[i].nat.poll_event() {
            if ev.to.starts_with("direct") {
                self.nodes[i].direct_events += 1;
            } else {
                self.nodes[i].relay_events += 1;
            }
        }
        if self.nodes[i].nat.sample_due(now) {
            let samples: Vec<(Key, Sample)> = self.nodes[i]
                .wg
                .iter()
                .map(|(k, p)| {
                    (
                        *k,
                        Sample {
                            endpoint: match p.endpoint {
                                Some(Endpoint::Addr(a)) => Some(a),
                                Some(Endpoint::Relay) => Some(SocketAddr::from(([127, 0, 0, 1], 40000))),
                                None => None,
                            },
                            relayed: p.endpoint == Some(Endpoint::Relay),
                            rx_bytes: p.rx,
                            tx_bytes: p.tx,
                            handshake_age: Some(Duration::from_secs(1)),
                        },
                    )
                })
                .collect();
            self.nodes[i].nat.handle_samples(now, &samples);
        }
        // The reconcile: endpoints as the traversal wants them.
        let keys: Vec<Key> = self.nodes[i].wg.keys().copied().collect();
        for k in keys {
            let want = self.nodes[i].nat.desired(&k);
            let peer = self.nodes[i].wg.get_mut(&k).unwrap();
            let before = peer.endpoint;
            match want {
                Desired::Relay => peer.endpoint = Some(Endpoint::Relay),
                Desired::Dial(a) => peer.endpoint = Some(Endpoint::Addr(a)),
                Desired::Keep => {}
            }
            let direct = matches!(peer.endpoint, Some(Endpoint::Addr(_)));
            // Turning persistent keepalive on sends one at once, as WireGuard does.
            let turned_on = !matches!(before, Some(Endpoint::Addr(_)));
            if direct && (turned_on || now.saturating_duration_since(peer.last_send) >= KEEPALIVE) {
                self.wg_send(i, k, Inner::Keepalive);
            }
        }
        if self.nodes[i].traffic && now >= self.nodes[i].next_app {
            self.nodes[i].next_app = now + APP_INTERVAL;
            let keys: Vec<Key> = self.nodes[i].wg.keys().copied().collect();
            for k in keys {
                self.wg_send(i, k, Inner::App);
            }
        }
    }

    fn run_for(&mut self, d: Duration, mut each: impl FnMut(&World)) {
        let end = self.now + d;
        while self.now < end {
            self.now += TICK;
            self.deliver();
            for i in 0..self.nodes.len() {
                self.turn(i);
            }
            each(self);
        }
    }

    /// Runs until `done` holds or `limit` passes; returns the time it took.
    fn run_until(&mut self, limit: Duration, done: impl Fn(&World) -> bool) -> Option<Duration> {
        let start = self.now;
        while self.now < start + limit {
            if done(self) {
                return Some(self.now - start);
            }
            self.run_for(TICK, |_| {});
        }
        None
    }

    fn direct(&self, a: usize, b: usize) -> bool {
        let (ka, kb) = (self.nodes[a].key, self.nodes[b].key);
        let st = |x: usize, k: &Key| self.nodes[x].nat.status(self.now, k).is_some_and(|s| s.direct);
        let wg = |x: usize, k: &Key| matches!(self.nodes[x].wg[k].endpoint, Some(Endpoint::Addr(_)));
        st(a, &kb) && st(b, &ka) && wg(a, &kb) && wg(b, &ka)
    }

    fn relayed(&self, a: usize, b: usize) -> bool {
        let (ka, kb) = (self.nodes[a].key, self.nodes[b].key);
        let st = |x: usize, k: &Key| self.nodes[x].nat.status(self.now, k).is_some_and(|s| !s.direct);
        st(a, &kb) && st(b, &ka)
    }
}

fn local(ip: Ipv4Addr) -> Candidate {
    Candidate {
        kind: Kind::Local,
        wg: SocketAddr::from((ip, WG_PORT)),
        check: SocketAddr::from((ip, CHECK_PORT)),
    }
}

/// Two nodes on one port-restricted router's LAN, meshed.
fn lan_pair(seed: u64) -> World {
    let mut w = World::new(seed);
    w.add(NatKind::PortRestricted, 1, seed);
    w.add(NatKind::PortRestricted, 1, seed);
    w.mesh();
    w
}

/// Two nodes of the given kinds, each behind its own router, meshed.
fn pair(a: NatKind, b: NatKind, seed: u64, loss: f64) -> World {
    let mut w = World::new(seed);
    if loss > 0.0 {
        w.net.set_loss(loss);
    }
    w.add(a, 1, seed);
    w.add(b, 2, seed);
    w.mesh();
    w
}

#[test]
fn every_pair_of_nat_kinds_over_many_seeds_goes_direct_exactly_where_expected() {
    let mut scenarios = 0;
    let mut wrong = Vec::new();
    for seed in 0..40u64 {
        for (ia, a) in KINDS.iter().enumerate() {
            for b in &KINDS[ia..] {
                let loss = if seed % 4 == 3 { 0.03 } else { 0.0 };
                let mut w = pair(*a, *b, seed * 1000 + ia as u64, loss);
                w.nodes[0].traffic = seed % 2 == 0;
                let want = expect_direct(*a, *b);
                let took = w.run_until(Duration::from_secs(15), |w| w.direct(0, 1));
                // Then it must hold (no flapping), or never happen at all.
                let mut flapped = false;
                w.run_for(Duration::from_secs(20), |w| {
                    if want && !w.direct(0, 1) {
                        flapped = true;
                    }
                });
                let direct_events = w.nodes[0].direct_events + w.nodes[1].direct_events;
                let ok = if want {
                    took.is_some() && !flapped && w.nodes[0].relay_events + w.nodes[1].relay_events == 0
                } else {
                    took.is_none() && direct_events == 0 && w.relayed(0, 1)
                };
                if !ok {
                    wrong.push(format!(
                        "{a:?}-{b:?} seed {seed} loss {loss}: want direct {want}, took {took:?}, flapped {flapped}, events {:?}",
                        (w.nodes[0].direct_events, w.nodes[0].relay_events, w.nodes[1].direct_events, w.nodes[1].relay_events)
                    ));
                }
                scenarios += 1;
            }
        }
    }
    assert!(scenarios >= 1000, "{scenarios}");
    assert!(
        wrong.is_empty(),
        "{} of {scenarios} wrong:\n{}",
        wrong.len(),
        wrong[..wrong.len().min(20)].join("\n")
    );
}

#[test]
fn two_nodes_on_one_lan_go_direct_by_their_lan_addresses() {
    for seed in 0..50 {
        let mut w = lan_pair(seed);
        assert!(
            w.run_until(Duration::from_secs(10), |w| w.direct(0, 1)).is_some(),
            "seed {seed}"
        );
        let kb = w.nodes[1].key;
        let st = w.nodes[0].nat.status(w.now, &kb).unwrap();
        assert_eq!(
            st.remote.map(|(a, k)| (a.ip(), k)),
            Some((w.nodes[1].ip.into(), Kind::Local))
        );
        // What the metrics export: checks sent and answered, a round passed.
        let counts = [w.nodes[0].nat.check_counts(), w.nodes[1].nat.check_counts()];
        // (The side that upgrades first may leave the other's checks unanswered.)
        assert!(
            counts.iter().all(|c| c.pings_sent >= 1),
            "seed {seed}: {counts:?}"
        );
        assert!(
            counts.iter().map(|c| c.pongs_valid).sum::<u64>() >= 1,
            "seed {seed}: {counts:?}"
        );
        assert!(
            counts.iter().map(|c| c.rounds_passed).sum::<u64>() >= 1,
            "seed {seed}: {counts:?}"
        );
    }
}

#[test]
fn a_cut_direct_path_falls_back_to_the_relay_within_3_s_and_heals_within_10_s() {
    for seed in 0..20 {
        let mut w = pair(NatKind::PortRestricted, NatKind::PortRestricted, seed, 0.0);
        w.nodes[0].traffic = true;
        w.nodes[1].traffic = true;
        assert!(w.run_until(Duration::from_secs(10), |w| w.direct(0, 1)).is_some());
        let (pa, pb) = (Ipv4Addr::new(198, 51, 100, 11), Ipv4Addr::new(198, 51, 100, 12));
        // Cut after cut: healing must not slow down (no growing ban on a path that worked).
        for round in 0..3 {
            w.run_for(Duration::from_secs(2), |_| {});
            w.net.block(pa, pb);
            let before = w.nodes[1].app_relayed;
            let down = w
                .run_until(Duration::from_secs(10), |w| {
                    w.relayed(0, 1) && w.nodes[1].app_relayed > before
                })
                .expect("fell back to the relay");
            assert!(
                down <= Duration::from_secs(3),
                "seed {seed} round {round}: fallback took {down:?}"
            );
            // While cut, checks fail: it must stay relayed.
            let mut upgraded = false;
            w.run_for(Duration::from_secs(15), |w| upgraded |= w.direct(0, 1));
            assert!(
                !upgraded,
                "seed {seed} round {round}: went direct across a cut path"
            );
            w.net.unblock(pa, pb);
            let up = w
                .run_until(Duration::from_secs(20), |w| w.direct(0, 1))
                .expect("direct again");
            assert!(
                up <= Duration::from_secs(10),
                "seed {seed} round {round}: healing took {up:?}"
            );
        }
    }
}

#[test]
fn a_node_that_changes_its_lan_address_is_direct_again_by_itself() {
    for seed in 0..20 {
        let mut w = lan_pair(seed);
        w.nodes[0].traffic = true;
        assert!(w.run_until(Duration::from_secs(10), |w| w.direct(0, 1)).is_some());
        let old = w.nodes[1].ip;
        let new = Ipv4Addr::new(10, 1, 0, 77);
        let nat = w.routers.get(&1).copied();
        w.net.move_host(old, new, nat);
        w.nodes[1].ip = new;
        let now = w.now;
        w.nodes[1].nat.set_local(now, vec![local(new)]);
        let ka = w.nodes[0].key;
        let kb = w.nodes[1].key;
        let took = w.run_until(Duration::from_secs(15), |w| {
            w.direct(0, 1)
                && w.nodes[0].wg[&kb].endpoint == Some(Endpoint::Addr(SocketAddr::from((new, WG_PORT))))
                && w.nodes[1].wg[&ka].endpoint.is_some()
        });
        assert!(took.is_some(), "seed {seed}: not direct to the new address");
    }
}

#[test]
fn a_pair_whose_checks_pass_but_wireguard_cannot_use_it_is_banned_with_backoff_and_never_direct() {
    for seed in 0..10 {
        let mut w = pair(NatKind::Open, NatKind::PortRestricted, seed, 0.0);
        w.wg_blackhole = true;
        w.nodes[0].traffic = true;
        let kb = w.nodes[1].key;
        let mut direct = false;
        let mut banned_seen = false;
        // Upgrade attempts: times at which node 0 set a direct endpoint.
        let mut attempts: Vec<Instant> = Vec::new();
        let mut was_dialling = false;
        w.run_for(Duration::from_secs(120), |w| {
            direct |= w.direct(0, 1);
            let st = w.nodes[0].nat.status(w.now, &kb).unwrap();
            banned_seen |= st
                .reason
                .as_deref()
                .is_some_and(|r| r.starts_with("banned until"));
            let dialling = matches!(w.nodes[0].nat.desired(&kb), Desired::Dial(_));
            if dialling && !was_dialling {
                attempts.push(w.now);
            }
            was_dialling = dialling;
        });
        assert!(!direct, "seed {seed}: went direct on a pair WireGuard cannot use");
        assert!(
            banned_seen,
            "seed {seed}: the status never said the pair is banned"
        );
        // Retried (never given up), with growing gaps.
        assert!(attempts.len() >= 3, "seed {seed}: {} attempts", attempts.len());
        let gaps: Vec<Duration> = attempts.windows(2).map(|a| a[1] - a[0]).collect();
        assert!(
            gaps.last().unwrap() > gaps.first().unwrap(),
            "seed {seed}: gaps {gaps:?}"
        );
        // The relay carried the traffic throughout.
        assert!(w.nodes[1].app_relayed > 1000, "seed {seed}");
        // Rounds whose only passing pair is banned count as failed.
        let c = w.nodes[0].nat.check_counts();
        assert!(c.rounds_failed >= 1 && c.pongs_valid >= 1, "seed {seed}: {c:?}");
    }
}

#[test]
fn a_key_rotation_keeps_the_pair_direct_even_with_the_relay_gone() {
    for seed in 0..10 {
        let mut w = lan_pair(seed);
        w.nodes[0].traffic = true;
        assert!(w.run_until(Duration::from_secs(10), |w| w.direct(0, 1)).is_some());
        // Node 1 rotates its key while the relay (and coordinator) are gone:
        // both sides see a new WireGuard peer, with no way to exchange candidates.
        w.relay_up = false;
        let (old, new) = (w.nodes[1].key, Key([0xee; 32]));
        let now = w.now;
        w.nodes[1].key = new;
        w.nodes[1].nat.rekey(now, new);
        let k0 = w.nodes[0].key;
        let p = w.nodes[0].wg.remove(&old).unwrap();
        w.nodes[0].wg.insert(new, WgPeer { endpoint: None, ..p });
        w.nodes[0].nat.set_peers(now, &[(1, new)]);
        w.nodes[1].wg.get_mut(&k0).unwrap().endpoint = None;
        let took = w.run_until(Duration::from_secs(15), |w| w.direct(0, 1));
        assert!(took.is_some(), "seed {seed}: not direct again after the rotation");
    }
}
