//! A deterministic simulated network of hosts and NAT boxes (RFC 4787 terms),
//! for driving whole sans-IO agents in `cargo test`.
//!
//! Each packet takes one random delay from send to delivery. Outbound
//! translation happens when the packet is sent; inbound filtering and
//! translation happen when it arrives, so two sends that cross on the wire
//! can punch a hole in each other's NAT as they would on a real network.
//! Crossing a NAT adds no time of its own; same-LAN packets take the same
//! one delay.
//!
//! Host IPs are unique across the whole simulation (even private ones):
//! `send` knows a host by its IP alone.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

pub type NatId = usize;

/// Internet-like one-way delay; the spread reorders packets.
const DEFAULT_LATENCY_MIN: Duration = Duration::from_millis(5);
const DEFAULT_LATENCY_MAX: Duration = Duration::from_millis(15);
/// Beyond this many packets in flight, sends are dropped: a runaway test
/// fails on its assertions instead of eating memory.
const MAX_IN_FLIGHT: usize = 100_000;
/// External ports a NAT allocates when it cannot (or will not) keep the
/// internal one, as Linux masquerade does.
const FIRST_EPHEMERAL_PORT: u16 = 1024;
/// Random picks before a NAT gives up on a new mapping (its table is then
/// nearly full, which no sane test reaches).
const PORT_PICK_TRIES: usize = 64;
/// Keeps xorshift away from its all-zero fixed point whatever the seed.
const SEED_MIX: u64 = 0x9e37_79b9_7f4a_7c15;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    EndpointIndependent,
    AddressDependent,
    AddressAndPortDependent,
}

#[derive(Debug, Clone)]
pub struct NatConfig {
    /// EIM ≈ "cone" NATs; APDM = symmetric.
    pub mapping: Behaviour,
    /// Which inbound packets a mapping accepts.
    pub filtering: Behaviour,
    pub public_ip: Ipv4Addr,
    /// An idle mapping expires; only outbound traffic refreshes it.
    pub mapping_timeout: Duration,
    /// A LAN host sending to this NAT's public ip:port reaches the mapped LAN host.
    pub hairpin: bool,
    /// Drops all UDP crossing the NAT, both directions.
    pub block_udp: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// The receiving host's own ip:port.
    pub to: SocketAddr,
    /// The source as the receiver sees it, after NAT.
    pub from: SocketAddr,
    pub payload: Vec<u8>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SimStats {
    pub delivered: u64,
    /// Refused by a NAT: filtering, expired or no mapping, no hairpin, UDP blocked.
    pub filtered: u64,
    /// Dropped by `block`.
    pub blocked: u64,
    /// Dropped by random loss.
    pub lost: u64,
    /// No host or NAT owns the address (unknown, or a host that moved away).
    pub unroutable: u64,
    /// Dropped because `MAX_IN_FLIGHT` packets were already queued.
    pub overflowed: u64,
}

/// Why a packet went nowhere; each reason has its counter in `SimStats`.
enum Dropped {
    Filtered,
    Blocked,
    Lost,
    Unroutable,
    Overflowed,
}

impl SimStats {
    fn count(&mut self, why: Dropped) {
        *match why {
            Dropped::Filtered => &mut self.filtered,
            Dropped::Blocked => &mut self.blocked,
            Dropped::Lost => &mut self.lost,
            Dropped::Unroutable => &mut self.unroutable,
            Dropped::Overflowed => &mut self.overflowed,
        } += 1;
    }
}

/// Where a host or NAT sits: the internet (`None`) or the LAN of a NAT.
type Segment = Option<NatId>;

/// (internal ip:port, remote with the parts the mapping behaviour ignores zeroed).
type MapKey = (SocketAddrV4, SocketAddrV4);

struct Mapping {
    port: u16,
    last_out: Instant,
    /// Every remote this mapping has sent to: what address/port filtering checks.
    sent_to: BTreeSet<SocketAddrV4>,
}

struct Nat {
    cfg: NatConfig,
    segment: Segment,
    // BTreeMaps, not HashMaps: iteration order must not depend on a random hasher.
    mappings: BTreeMap<MapKey, Mapping>,
    by_port: BTreeMap<u16, MapKey>,
}

struct InFlight {
    /// The segment the packet travels on; `from`/`to` are as seen there.
    segment: Segment,
    from: SocketAddrV4,
    to: SocketAddrV4,
    payload: Vec<u8>,
}

enum Owner {
    Host,
    Nat(NatId),
}

pub struct SimNet {
    rng: Box<dyn FnMut() -> u64 + Send>,
    latency: (Duration, Duration),
    loss: f64,
    hosts: BTreeMap<Ipv4Addr, Segment>,
    nats: Vec<Nat>,
    blocks: BTreeSet<(Ipv4Addr, Ipv4Addr)>,
    /// Keyed by (due, send order): equal due times deliver in send order.
    queue: BTreeMap<(Instant, u64), InFlight>,
    sent: u64,
    stats: SimStats,
}

/// Block pairs are unordered: one key for both directions.
fn pair(a: Ipv4Addr, b: Ipv4Addr) -> (Ipv4Addr, Ipv4Addr) {
    (a.min(b), a.max(b))
}

impl Nat {
    fn live(&self, m: &Mapping, at: Instant) -> bool {
        at < m.last_out + self.cfg.mapping_timeout
    }

    /// The external port for `internal` sending to `remote`, creating the
    /// mapping if needed; `None` drops the packet.
    fn map_outbound(
        &mut self,
        now: Instant,
        internal: SocketAddrV4,
        remote: SocketAddrV4,
        rng: &mut dyn FnMut() -> u64,
    ) -> Option<u16> {
        if self.cfg.block_udp {
            return None;
        }
        let masked = match self.cfg.mapping {
            Behaviour::EndpointIndependent => SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0),
            Behaviour::AddressDependent => SocketAddrV4::new(*remote.ip(), 0),
            Behaviour::AddressAndPortDependent => remote,
        };
        let key = (internal, masked);
        let timeout = self.cfg.mapping_timeout;
        if let Some(m) = self.mappings.get_mut(&key)
            && now < m.last_out + timeout
        {
            m.last_out = now;
            m.sent_to.insert(remote);
            return Some(m.port);
        }
        // Sweep on creation only: keeps the tables bounded by live use
        // without a scan on every packet.
        self.mappings.retain(|_, m| now < m.last_out + timeout);
        let mappings = &self.mappings;
        self.by_port.retain(|_, key| mappings.contains_key(key));
        let free = |p: &u16| !self.by_port.contains_key(p);
        let preserve = self.cfg.mapping != Behaviour::AddressAndPortDependent;
        let port = if preserve && free(&internal.port()) {
            internal.port()
        } else {
            let span = u64::from(u16::MAX - FIRST_EPHEMERAL_PORT) + 1;
            (0..PORT_PICK_TRIES)
                .map(|_| FIRST_EPHEMERAL_PORT + (rng() % span) as u16)
                .find(free)?
        };
        let sent_to = BTreeSet::from([remote]);
        self.mappings.insert(
            key,
            Mapping {
                port,
                last_out: now,
                sent_to,
            },
        );
        self.by_port.insert(port, key);
        Some(port)
    }

    /// The internal address an inbound packet to `port` from `from` goes to, if accepted.
    fn map_inbound(&self, at: Instant, port: u16, from: SocketAddrV4) -> Option<SocketAddrV4> {
        if self.cfg.block_udp {
            return None;
        }
        let key = self.by_port.get(&port)?;
        let m = &self.mappings[key];
        let accepted = self.live(m, at)
            && match self.cfg.filtering {
                Behaviour::EndpointIndependent => true,
                Behaviour::AddressDependent => m.sent_to.iter().any(|s| s.ip() == from.ip()),
                Behaviour::AddressAndPortDependent => m.sent_to.contains(&from),
            };
        accepted.then_some(key.0)
    }
}

impl SimNet {
    pub fn new(seed: u64) -> SimNet {
        SimNet {
            rng: Box::new(crate::testutil::xorshift((seed ^ SEED_MIX).max(1))),
            latency: (DEFAULT_LATENCY_MIN, DEFAULT_LATENCY_MAX),
            loss: 0.0,
            hosts: BTreeMap::new(),
            nats: Vec::new(),
            blocks: BTreeSet::new(),
            queue: BTreeMap::new(),
            sent: 0,
            stats: SimStats::default(),
        }
    }

    /// Every packet's delay is drawn uniformly from [min, max].
    pub fn set_latency(&mut self, min: Duration, max: Duration) {
        assert!(min <= max, "latency range {min:?}..{max:?} is empty");
        self.latency = (min, max);
    }

    pub fn set_loss(&mut self, probability: f64) {
        self.loss = probability;
    }

    /// `behind: None` puts the NAT's public IP on the internet; `Some(outer)`
    /// makes it a private address on `outer`'s LAN (double NAT).
    pub fn add_nat(&mut self, cfg: NatConfig, behind: Option<NatId>) -> NatId {
        assert!(behind.is_none_or(|n| n < self.nats.len()), "no NAT {behind:?}");
        let segment = behind;
        self.nats.push(Nat {
            cfg,
            segment,
            mappings: BTreeMap::new(),
            by_port: BTreeMap::new(),
        });
        self.nats.len() - 1
    }

    pub fn add_host(&mut self, ip: Ipv4Addr, behind: Option<NatId>) {
        assert!(behind.is_none_or(|n| n < self.nats.len()), "no NAT {behind:?}");
        let previous = self.hosts.insert(ip, behind);
        assert!(previous.is_none(), "host IPs must be unique: {ip} added twice");
    }

    /// Roaming: the host's sockets are addressed by `new` from now on. Packets
    /// to `old` (including replies through its old mappings) become unroutable.
    pub fn move_host(&mut self, old: Ipv4Addr, new: Ipv4Addr, behind: Option<NatId>) {
        self.hosts.remove(&old).unwrap_or_else(|| panic!("no host {old}"));
        self.add_host(new, behind);
    }

    /// Drops every packet between `a` and `b` (both directions) as seen on
    /// the wire they share; checked when a packet arrives.
    pub fn block(&mut self, a: Ipv4Addr, b: Ipv4Addr) {
        self.blocks.insert(pair(a, b));
    }

    pub fn unblock(&mut self, a: Ipv4Addr, b: Ipv4Addr) {
        self.blocks.remove(&pair(a, b));
    }

    pub fn stats(&self) -> SimStats {
        self.stats
    }

    /// Who answers to `ip` on `segment`.
    fn owner(&self, segment: Segment, ip: Ipv4Addr) -> Option<Owner> {
        if self.hosts.get(&ip) == Some(&segment) {
            return Some(Owner::Host);
        }
        let nat = self
            .nats
            .iter()
            .position(|n| n.segment == segment && n.cfg.public_ip == ip);
        nat.map(Owner::Nat)
    }

    /// A host sends from its own `from` (ip:port it owns) to `to`. Unknown
    /// sources and destinations are dropped.
    pub fn send(&mut self, now: Instant, from: SocketAddr, to: SocketAddr, payload: Vec<u8>) {
        if let Err(why) = self.try_send(now, from, to, payload) {
            self.stats.count(why);
        }
    }

    fn try_send(
        &mut self,
        now: Instant,
        from: SocketAddr,
        to: SocketAddr,
        payload: Vec<u8>,
    ) -> Result<(), Dropped> {
        let (SocketAddr::V4(from), SocketAddr::V4(to)) = (from, to) else {
            return Err(Dropped::Unroutable);
        };
        let mut segment = *self.hosts.get(from.ip()).ok_or(Dropped::Unroutable)?;
        let (mut src, dst_ip) = (from, *to.ip());
        // Climb out through NATs until the destination is on the same segment.
        while self.owner(segment, dst_ip).is_none() {
            let nat = &mut self.nats[segment.ok_or(Dropped::Unroutable)?];
            let port = (nat.map_outbound(now, src, to, &mut *self.rng)).ok_or(Dropped::Filtered)?;
            src = SocketAddrV4::new(nat.cfg.public_ip, port);
            segment = nat.segment;
            if dst_ip == nat.cfg.public_ip {
                // Hairpin: the packet turns back at this NAT's public side;
                // on its outer segment it arrives at this NAT's inbound path.
                if !nat.cfg.hairpin {
                    return Err(Dropped::Filtered);
                }
                break;
            }
        }
        if self.queue.len() >= MAX_IN_FLIGHT {
            return Err(Dropped::Overflowed);
        }
        // Draw for loss only when it is enabled: a lossless run's delays do
        // not depend on a loss setting it never uses.
        if self.loss > 0.0 && (((self.rng)() >> 11) as f64 / (1u64 << 53) as f64) < self.loss {
            return Err(Dropped::Lost);
        }
        let (min, max) = self.latency;
        let span = (max - min).as_nanos() as u64 + 1;
        let delay = min + Duration::from_nanos((self.rng)() % span);
        self.sent += 1;
        let packet = InFlight {
            segment,
            from: src,
            to,
            payload,
        };
        self.queue.insert((now + delay, self.sent), packet);
        Ok(())
    }

    /// The next packet due at or before `now`, in due order.
    pub fn poll_delivery(&mut self, now: Instant) -> Option<Delivery> {
        while let Some(entry) = self.queue.first_entry() {
            let at = entry.key().0;
            if at > now {
                return None;
            }
            let packet = entry.remove();
            match self.arrive(at, packet) {
                Ok(delivery) => {
                    self.stats.delivered += 1;
                    return Some(delivery);
                }
                Err(why) => self.stats.count(why),
            }
        }
        None
    }

    /// When the next packet is due.
    pub fn next_delivery(&self) -> Option<Instant> {
        self.queue.first_key_value().map(|((at, _), _)| *at)
    }

    /// Walks an arriving packet down through NATs to its host, judged at its due time.
    fn arrive(&self, at: Instant, p: InFlight) -> Result<Delivery, Dropped> {
        if self.blocks.contains(&pair(*p.from.ip(), *p.to.ip())) {
            return Err(Dropped::Blocked);
        }
        let (mut segment, mut to) = (p.segment, p.to);
        loop {
            match self.owner(segment, *to.ip()).ok_or(Dropped::Unroutable)? {
                Owner::Host => {
                    let (to, from) = (to.into(), p.from.into());
                    return Ok(Delivery {
                        to,
                        from,
                        payload: p.payload,
                    });
                }
                Owner::Nat(n) => {
                    let nat = &self.nats[n];
                    to = nat.map_inbound(at, to.port(), p.from).ok_or(Dropped::Filtered)?;
                    segment = Some(n);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Behaviour::{
        AddressAndPortDependent as Apd, AddressDependent as Ad, EndpointIndependent as Ei,
    };
    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(30);
    /// Longer than any delivery takes, so `run` drains everything sent.
    const SETTLE: Duration = Duration::from_secs(1);
    /// `home`'s LAN host, its NAT's public IP, and two public servers.
    const HOST: &str = "192.168.1.2:5000";
    const NAT_IP: &str = "203.0.113.1";
    const S1: &str = "198.51.100.1:3478";
    const S2: &str = "198.51.100.2:3478";

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn nat(mapping: Behaviour, filtering: Behaviour, public_ip: &str) -> NatConfig {
        NatConfig {
            mapping,
            filtering,
            public_ip: ip(public_ip),
            mapping_timeout: TIMEOUT,
            hairpin: false,
            block_udp: false,
        }
    }

    /// Everything delivered up to `until`.
    fn run(net: &mut SimNet, until: Instant) -> Vec<Delivery> {
        std::iter::from_fn(|| net.poll_delivery(until)).collect()
    }

    /// Sends one empty packet at `at` and returns what arrives by `at + SETTLE`.
    fn exchange(net: &mut SimNet, at: Instant, from: &str, to: &str) -> Vec<Delivery> {
        net.send(at, sa(from), sa(to), vec![]);
        run(net, at + SETTLE)
    }

    /// HOST behind a NAT (id 0) at NAT_IP; S1 and S2 on the internet.
    fn home(seed: u64, cfg: NatConfig) -> SimNet {
        let mut net = SimNet::new(seed);
        let n = net.add_nat(cfg, None);
        net.add_host(ip("192.168.1.2"), Some(n));
        net.add_host(ip("198.51.100.1"), None);
        net.add_host(ip("198.51.100.2"), None);
        net
    }

    #[test]
    fn mapping_kinds_reuse_external_ports_as_rfc4787_says() {
        let t0 = Instant::now();
        // Same IP other port, then other IP same port.
        for (mapping, same_ip, other_ip) in [(Ei, true, true), (Ad, true, false), (Apd, false, false)] {
            let mut net = home(1, nat(mapping, Ei, NAT_IP));
            let ports: Vec<u16> = [S1, "198.51.100.1:3479", S2]
                .iter()
                .map(|to| exchange(&mut net, t0, HOST, to)[0].from.port())
                .collect();
            assert_eq!(ports[0] == ports[1], same_ip, "{mapping:?}: {ports:?}");
            assert_eq!(ports[0] == ports[2], other_ip, "{mapping:?}: {ports:?}");
            // Port preservation, except for APDM's fully random ports.
            assert_eq!(ports[0] == 5000, mapping != Apd, "{mapping:?}: {ports:?}");
        }
    }

    #[test]
    fn filtering_kinds_accept_inbound_as_rfc4787_says() {
        let t0 = Instant::now();
        let mapped = "203.0.113.1:5000";
        // From: the remote HOST sent to, its other port, another IP; then an unmapped port.
        let probes = [
            (S1, mapped),
            ("198.51.100.1:9999", mapped),
            (S2, mapped),
            (S1, "203.0.113.1:6000"),
        ];
        for (filtering, accepted) in [
            (Ei, [true, true, true, false]),
            (Ad, [true, true, false, false]),
            (Apd, [true, false, false, false]),
        ] {
            let mut net = home(1, nat(Ei, filtering, NAT_IP));
            exchange(&mut net, t0, HOST, S1);
            for ((from, to), accepted) in probes.into_iter().zip(accepted) {
                let got = exchange(&mut net, t0 + SETTLE, from, to);
                let expected = accepted.then(|| (sa(HOST), sa(from)));
                assert_eq!(
                    got.first().map(|d| (d.to, d.from)),
                    expected,
                    "{filtering:?} {from} -> {to}"
                );
            }
            let refused = accepted.iter().filter(|a| !**a).count() as u64;
            assert_eq!(net.stats().filtered, refused, "{filtering:?}");
        }
    }

    /// Two hosts behind their own APDF NATs learn their public endpoints
    /// from a STUN-like server, then send to each other (both at once, or
    /// only A); returns how many punches got through.
    fn punch(mapping: Behaviour, both: bool) -> usize {
        let t0 = Instant::now();
        let mut net = SimNet::new(7);
        let a = net.add_nat(nat(mapping, Apd, "203.0.113.1"), None);
        let b = net.add_nat(nat(mapping, Apd, "203.0.113.2"), None);
        net.add_host(ip("192.168.1.2"), Some(a));
        net.add_host(ip("192.168.2.2"), Some(b));
        net.add_host(ip("198.51.100.1"), None);
        let (host_a, host_b) = ("192.168.1.2:51820", "192.168.2.2:51820");
        let pub_a = exchange(&mut net, t0, host_a, S1)[0].from;
        let pub_b = exchange(&mut net, t0, host_b, S1)[0].from;
        let t1 = t0 + SETTLE;
        net.send(t1, sa(host_a), pub_b, b"from a".to_vec());
        if both {
            net.send(t1, sa(host_b), pub_a, b"from b".to_vec());
        }
        run(&mut net, t1 + SETTLE).len()
    }

    #[test]
    fn hole_punching_works_between_cone_nats_and_fails_between_symmetric_ones() {
        assert_eq!(punch(Ei, true), 2);
        assert_eq!(punch(Ei, false), 0, "an unsolicited packet must not get in");
        assert_eq!(punch(Apd, true), 0);
    }

    #[test]
    fn double_nat_translates_twice() {
        let t0 = Instant::now();
        let mut net = SimNet::new(3);
        let outer = net.add_nat(nat(Ei, Apd, NAT_IP), None);
        let inner = net.add_nat(nat(Ei, Apd, "192.168.1.10"), Some(outer));
        net.add_host(ip("10.0.0.2"), Some(inner));
        net.add_host(ip("198.51.100.1"), None);
        let out = exchange(&mut net, t0, "10.0.0.2:4000", S1);
        assert_eq!(out[0].from.ip(), ip(NAT_IP));
        let back = exchange(&mut net, t0 + SETTLE, S1, &out[0].from.to_string());
        let expected = Delivery {
            to: sa("10.0.0.2:4000"),
            from: sa(S1),
            payload: vec![],
        };
        assert_eq!(back, [expected]);
    }

    #[test]
    fn same_lan_hosts_talk_directly_by_private_ip() {
        let t0 = Instant::now();
        // The NAT blocks UDP, so a packet that gets through never crossed it.
        let mut net = home(
            4,
            NatConfig {
                block_udp: true,
                ..nat(Apd, Apd, NAT_IP)
            },
        );
        net.add_host(ip("192.168.1.3"), Some(0));
        let got = exchange(&mut net, t0, HOST, "192.168.1.3:2000");
        assert_eq!((got[0].from, got[0].to), (sa(HOST), sa("192.168.1.3:2000")));
        assert!(exchange(&mut net, t0, HOST, S1).is_empty());
        assert_eq!(net.stats().filtered, 1);
    }

    #[test]
    fn mappings_expire_without_outbound_traffic() {
        let t0 = Instant::now();
        let mut net = home(1, nat(Ei, Apd, NAT_IP));
        exchange(&mut net, t0, HOST, S1);
        // Inbound replies do not refresh the mapping: the second one, past
        // the timeout since the last outbound packet, is dropped.
        let replies: Vec<usize> = [TIMEOUT / 2, TIMEOUT + SETTLE]
            .iter()
            .map(|after| exchange(&mut net, t0 + *after, S1, "203.0.113.1:5000").len())
            .collect();
        assert_eq!((replies, net.stats().filtered), (vec![1, 0], 1));
        // The expired mapping freed its port: a new one preserves it again.
        let again = exchange(&mut net, t0 + TIMEOUT * 2, HOST, S1);
        assert_eq!(again[0].from, sa("203.0.113.1:5000"));
    }

    #[test]
    fn block_cuts_one_path_and_unblock_restores_it() {
        let t0 = Instant::now();
        let mut net = home(1, nat(Ei, Apd, NAT_IP));
        net.block(ip("198.51.100.1"), ip(NAT_IP));
        assert!(exchange(&mut net, t0, HOST, S1).is_empty());
        assert_eq!(exchange(&mut net, t0, HOST, S2).len(), 1, "other paths stay up");
        assert_eq!(net.stats().blocked, 1);
        net.unblock(ip(NAT_IP), ip("198.51.100.1"));
        assert_eq!(exchange(&mut net, t0 + SETTLE, HOST, S1).len(), 1);
    }

    #[test]
    fn moved_host_sends_from_its_new_place_and_old_mappings_lead_nowhere() {
        let t0 = Instant::now();
        let mut net = home(1, nat(Ei, Ei, NAT_IP));
        let cafe = net.add_nat(nat(Ei, Ei, "203.0.113.9"), None);
        exchange(&mut net, t0, HOST, S1);
        net.move_host(ip("192.168.1.2"), ip("10.9.0.5"), Some(cafe));
        let got = exchange(&mut net, t0 + SETTLE, "10.9.0.5:5000", S1);
        assert_eq!(got[0].from, sa("203.0.113.9:5000"));
        assert!(exchange(&mut net, t0 + SETTLE, S1, "203.0.113.1:5000").is_empty());
        assert_eq!(net.stats().unroutable, 1);
    }

    #[test]
    fn hairpin_reaches_a_lan_neighbour_through_the_public_address_only_if_enabled() {
        let t0 = Instant::now();
        for hairpin in [true, false] {
            let mut net = home(
                1,
                NatConfig {
                    hairpin,
                    ..nat(Ei, Ei, NAT_IP)
                },
            );
            net.add_host(ip("192.168.1.3"), Some(0));
            exchange(&mut net, t0, "192.168.1.3:7000", S1);
            let got = exchange(&mut net, t0, HOST, "203.0.113.1:7000");
            // The neighbour sees the sender's public mapping (RFC 4787 REQ-9).
            let expected = (sa("192.168.1.3:7000"), sa("203.0.113.1:5000"));
            assert_eq!(got.first().map(|d| (d.to, d.from)), hairpin.then_some(expected));
        }
    }

    /// 200 numbered packets with 20% loss: the delivery log with due times.
    fn scenario(seed: u64) -> Vec<(Duration, Delivery)> {
        let t0 = Instant::now();
        let mut net = home(seed, nat(Apd, Ei, NAT_IP));
        net.set_loss(0.2);
        for i in 0..200u32 {
            let at = t0 + Duration::from_millis(u64::from(i));
            net.send(at, sa(HOST), sa(S1), i.to_be_bytes().to_vec());
        }
        std::iter::from_fn(|| {
            let at = net.next_delivery()?;
            Some((at - t0, net.poll_delivery(at).expect("due now")))
        })
        .collect()
    }

    #[test]
    fn same_seed_gives_the_same_deliveries() {
        let log = scenario(42);
        assert_eq!(log, scenario(42));
        assert_ne!(log, scenario(43));
        assert!(
            (100..200).contains(&log.len()),
            "20% loss delivered {}",
            log.len()
        );
    }

    #[test]
    fn latency_range_reorders_packets() {
        let t0 = Instant::now();
        let mut net = home(1, nat(Ei, Ei, NAT_IP));
        for i in 0..100u8 {
            net.send(t0, sa(HOST), sa(S1), vec![i]);
        }
        assert!(
            net.poll_delivery(t0 + DEFAULT_LATENCY_MIN - Duration::from_nanos(1))
                .is_none()
        );
        let order: Vec<u8> = run(&mut net, t0 + DEFAULT_LATENCY_MAX)
            .iter()
            .map(|d| d.payload[0])
            .collect();
        assert_eq!(order.len(), 100, "all due within the latency range");
        assert!(order.windows(2).any(|w| w[0] > w[1]), "no reordering: {order:?}");
    }
}
