//! The port-mapping client, sans-IO: asks the home router for a fixed
//! mapping of exactly two UDP ports, WireGuard's and the check socket's, by
//! PCP, NAT-PMP or UPnP IGD (preferred in that order), keeps the leases
//! alive, notices a router that forgot them, and gives them back on stop.
//!
//! Datagrams for PCP and NAT-PMP (both on the gateway's port 5351) and
//! commands for the UPnP worker go out; answers and the time come in.

use std::collections::VecDeque;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use blake2::{Blake2s256, Digest};

use super::{natpmp, pcp, upnp};
use crate::nat::candidate::{Candidate, Kind};

/// The lifetime asked for; routers may grant less (or, UPnP, 0 = forever).
pub const LEASE: Duration = Duration::from_secs(2 * 3600);
/// First retransmission of a PCP or NAT-PMP request, doubling per try
/// (RFC 6886 §3.1: a router on the LAN answers within milliseconds).
pub const RETRANSMIT_INITIAL: Duration = Duration::from_millis(250);
/// Sends of a probe before that protocol counts as not answering: 0, 0.25,
/// 0.75 and 1.75 s, given up at 3.75 s.
pub const PROBE_TRIES: u32 = 4;
/// Sends of a renewal before the router counts as gone (about 16 s).
pub const RENEW_TRIES: u32 = 6;
/// How often a held mapping is confirmed between renewals: a router that
/// restarted has forgotten it (PCP/NAT-PMP epoch reset, UPnP entry gone).
pub const CONFIRM_INTERVAL: Duration = Duration::from_secs(60);
/// Probing a router where nothing answered starts again after this,
/// doubling up to `REPROBE_MAX`: no busy retry against a silent gateway.
pub const REPROBE_INITIAL: Duration = Duration::from_secs(60);
pub const REPROBE_MAX: Duration = Duration::from_secs(30 * 60);
/// A refused request (an error answer) is tried again after this, doubling.
pub const REFUSED_RETRY: Duration = Duration::from_secs(60);
/// UPnP tells the external address only when asked: asked again this often.
pub const UPNP_REDISCOVER: Duration = Duration::from_secs(10 * 60);
/// A UPnP command the worker has not answered in this long counts as failed.
pub const UPNP_DEADLINE: Duration = Duration::from_secs(15);
/// Shown on the router's UPnP mapping list.
pub const UPNP_DESCRIPTION: &str = "warren";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Pcp,
    NatPmp,
    Upnp,
}

pub const PROTOCOLS: [Protocol; 3] = [Protocol::Pcp, Protocol::NatPmp, Protocol::Upnp];

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Pcp => "pcp",
            Protocol::NatPmp => "natpmp",
            Protocol::Upnp => "upnp",
        }
    }

    pub fn kind(self) -> Kind {
        match self {
            Protocol::Pcp => Kind::Pcp,
            Protocol::NatPmp => Kind::NatPmp,
            Protocol::Upnp => Kind::Upnp,
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The two sockets we map, and nothing else.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Socket {
    WireGuard = 0,
    Check = 1,
}

impl Socket {
    pub fn as_str(self) -> &'static str {
        match self {
            Socket::WireGuard => "wireguard",
            Socket::Check => "check",
        }
    }
}

const SOCKETS: [Socket; 2] = [Socket::WireGuard, Socket::Check];

/// The router to ask: the default route's next hop, and our address toward it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gateway {
    pub router: Ipv4Addr,
    pub local: Ipv4Addr,
}

/// What one protocol's probe came to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Probe {
    NotTried,
    Waiting,
    Answered,
    /// A more preferred protocol answered first.
    NotNeeded,
    NoAnswer,
    /// The router speaks it but refused, or speaks another version.
    Refused(String),
}

impl Probe {
    fn finished(&self) -> bool {
        matches!(self, Probe::NoAnswer | Probe::Refused(_))
    }
}

impl fmt::Display for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Probe::NotTried => f.write_str("not tried"),
            Probe::Waiting => f.write_str("waiting for an answer"),
            Probe::Answered => f.write_str("answered"),
            Probe::NotNeeded => f.write_str("not needed"),
            Probe::NoAnswer => f.write_str("no answer"),
            Probe::Refused(why) => write!(f, "refused: {why}"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapping {
    pub external: SocketAddr,
    /// 0 = the router granted no expiry (UPnP permanent mapping).
    pub granted: Duration,
    pub obtained: Instant,
}

impl Mapping {
    /// Time left on the lease; None for a permanent one.
    pub fn left(&self, now: Instant) -> Option<Duration> {
        (!self.granted.is_zero()).then(|| (self.obtained + self.granted).saturating_duration_since(now))
    }
}

/// A PCP or NAT-PMP request in flight, retransmitted with doubling intervals.
#[derive(Clone, Debug)]
struct Retry {
    bytes: Vec<u8>,
    sent: u32,
    max: u32,
    next: Instant,
}

impl Retry {
    fn new(now: Instant, bytes: Vec<u8>, max: u32) -> Retry {
        Retry {
            bytes,
            sent: 0,
            max,
            next: now,
        }
    }

    /// The bytes to send now, if due; moves the timer on.
    fn due(&mut self, now: Instant) -> Option<Vec<u8>> {
        if now < self.next || self.sent >= self.max {
            return None;
        }
        self.sent += 1;
        self.next = now + RETRANSMIT_INITIAL * (1 << (self.sent - 1));
        Some(self.bytes.clone())
    }

    /// Every try sent and the last one's wait is over.
    fn exhausted(&self, now: Instant) -> bool {
        self.sent >= self.max && now >= self.next
    }
}

#[derive(Clone, Debug)]
struct Slot {
    internal: u16,
    mapping: Option<Mapping>,
    /// PCP: identifies the mapping to the router across renewals.
    nonce: [u8; 12],
    request: Option<Retry>,
    upnp: Option<(u64, Instant)>,
    /// When to map, renew or confirm next.
    next: Instant,
    refusals: u32,
    error: Option<String>,
}

/// The server's epoch and our time when we saw it (RFC 6887 §8.5).
#[derive(Clone, Copy, Debug)]
struct Epoch {
    server: u32,
    at: Instant,
}

/// Whether `server` secs at `now` continue what `prev` said: a router that
/// restarted (and forgot its mappings) starts its epoch over.
fn epoch_continues(prev: Option<Epoch>, server: u32, now: Instant) -> bool {
    let Some(p) = prev else { return true };
    if server < p.server {
        return false;
    }
    let server_delta = u64::from(server - p.server);
    let client_delta = now.saturating_duration_since(p.at).as_secs();
    // The RFC's tolerance: clocks drift by up to 1/16 plus 2 s either way.
    !(client_delta + 2 < server_delta - server_delta / 16
        || server_delta + 2 < client_delta - client_delta / 16)
}

#[derive(Clone, Debug)]
enum Phase {
    /// Turned off, or no default route.
    Off,
    Probing,
    Active(Protocol),
    /// Nothing answered: probe again then.
    Silent {
        retry_at: Instant,
    },
}

pub struct Status {
    pub enabled: bool,
    pub gateway: Option<Ipv4Addr>,
    pub protocol: Option<Protocol>,
    pub probes: Vec<(Protocol, String)>,
    pub external_ip: Option<IpAddr>,
    pub mappings: Vec<(Socket, u16, Mapping)>,
    pub error: Option<String>,
}

/// An event worth a log line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Chosen(Protocol),
    Mapped {
        protocol: Protocol,
        socket: Socket,
        internal: u16,
        external: SocketAddr,
        lease: Duration,
    },
    Lost {
        protocol: Protocol,
        why: String,
    },
    NothingAnswered {
        retry_in: Duration,
    },
    Refused {
        protocol: Protocol,
        socket: Socket,
        why: String,
    },
}

pub struct PortMapper {
    enabled: bool,
    gateway: Option<Gateway>,
    phase: Phase,
    probes: [Probe; 3],
    /// PCP probe (doubling as the WireGuard port's first MAP) and NAT-PMP's
    /// external-address request.
    pcp_probe: Option<Retry>,
    natpmp_ext: Option<Retry>,
    natpmp_ip: Option<Ipv4Addr>,
    next_ext: Instant,
    upnp_discover: Option<(u64, Instant)>,
    upnp_found: Option<(Ipv4Addr, Option<IpAddr>)>,
    next_rediscover: Instant,
    epoch: Option<Epoch>,
    slots: [Slot; 2],
    reprobe: Duration,
    next_id: u64,
    transmits: VecDeque<(SocketAddr, Vec<u8>)>,
    commands: VecDeque<(u64, upnp::Command)>,
    events: VecDeque<Event>,
}

impl PortMapper {
    /// `secret` makes the PCP nonces: the same across restarts (a router
    /// keeps a mapping for the nonce that made it, and refuses others until
    /// it expires, so an agent that crashed must ask with the same one),
    /// unguessable by other hosts on the LAN.
    pub fn new(now: Instant, enabled: bool, wg_port: u16, check_port: u16, secret: [u8; 32]) -> PortMapper {
        let slot = |internal: u16| Slot {
            internal,
            mapping: None,
            nonce: {
                let mut h = Blake2s256::new();
                h.update(b"warren pcp nonce");
                h.update(secret);
                h.update(internal.to_be_bytes());
                let mut n = [0; 12];
                n.copy_from_slice(&h.finalize()[..12]);
                n
            },
            request: None,
            upnp: None,
            next: now,
            refusals: 0,
            error: None,
        };
        PortMapper {
            enabled,
            gateway: None,
            phase: Phase::Off,
            probes: [Probe::NotTried, Probe::NotTried, Probe::NotTried],
            pcp_probe: None,
            natpmp_ext: None,
            natpmp_ip: None,
            next_ext: now,
            upnp_discover: None,
            upnp_found: None,
            next_rediscover: now,
            epoch: None,
            slots: [slot(wg_port), slot(check_port)],
            reprobe: REPROBE_INITIAL,
            next_id: 1,
            transmits: VecDeque::new(),
            commands: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// The default route's router (None: no IPv4 default route). A new one
    /// starts over: mappings on the old router cannot be reached to delete.
    pub fn set_gateway(&mut self, now: Instant, gateway: Option<Gateway>) {
        if gateway == self.gateway {
            return;
        }
        if self.gateway.is_some() && self.holds_any() {
            self.events.push_back(Event::Lost {
                protocol: self.protocol().unwrap_or(Protocol::Pcp),
                why: "the default route moved to another router".into(),
            });
        }
        self.gateway = gateway;
        self.reprobe = REPROBE_INITIAL;
        self.reset();
        if self.enabled && gateway.is_some() {
            self.start_probe(now);
        }
    }

    fn holds_any(&self) -> bool {
        self.slots.iter().any(|s| s.mapping.is_some())
    }

    fn reset(&mut self) {
        self.phase = Phase::Off;
        self.probes = [Probe::NotTried, Probe::NotTried, Probe::NotTried];
        self.pcp_probe = None;
        self.natpmp_ext = None;
        self.natpmp_ip = None;
        self.upnp_discover = None;
        self.upnp_found = None;
        self.epoch = None;
        for s in &mut self.slots {
            s.mapping = None;
            s.request = None;
            s.upnp = None;
            s.refusals = 0;
            s.error = None;
        }
    }

    fn start_probe(&mut self, now: Instant) {
        let Some(gw) = self.gateway else { return };
        self.phase = Phase::Probing;
        self.probes = [Probe::Waiting, Probe::Waiting, Probe::Waiting];
        let bytes = self.pcp_map(gw, Socket::WireGuard, LEASE);
        self.pcp_probe = Some(Retry::new(now, bytes, PROBE_TRIES));
        self.natpmp_ext = Some(Retry::new(
            now,
            natpmp::Request::ExternalAddress.encode(),
            PROBE_TRIES,
        ));
        let id = self.id();
        self.upnp_discover = Some((id, now));
        self.commands.push_back((id, upnp::Command::Discover));
        self.flush(now);
    }

    fn pcp_map(&self, gw: Gateway, socket: Socket, lease: Duration) -> Vec<u8> {
        let slot = &self.slots[socket as usize];
        let held = slot.mapping.map(|m| m.external);
        pcp::MapRequest {
            client_ip: IpAddr::V4(gw.local),
            nonce: slot.nonce,
            internal_port: slot.internal,
            suggested_external_port: held.map_or(slot.internal, |e| e.port()),
            suggested_external_ip: held.map(|e| e.ip()),
            lifetime_secs: lease.as_secs() as u32,
        }
        .encode()
    }

    fn natpmp_map(&self, socket: Socket, lease: Duration) -> Vec<u8> {
        let slot = &self.slots[socket as usize];
        natpmp::Request::MapUdp {
            internal_port: slot.internal,
            suggested_external_port: slot.mapping.map_or(slot.internal, |m| m.external.port()),
            lifetime_secs: lease.as_secs() as u32,
        }
        .encode()
    }

    pub fn protocol(&self) -> Option<Protocol> {
        match self.phase {
            Phase::Active(p) => Some(p),
            _ => None,
        }
    }

    fn server(&self) -> Option<SocketAddr> {
        self.gateway
            .map(|g| SocketAddr::V4(SocketAddrV4::new(g.router, pcp::SERVER_PORT)))
    }

    /// A datagram from the router's port 5351.
    pub fn handle_datagram(&mut self, now: Instant, from: SocketAddr, bytes: &[u8]) {
        if Some(from) != self.server() || bytes.is_empty() {
            return;
        }
        // A NAT-PMP box answers our PCP request as version 0, result 1.
        let version_answer = bytes.len() >= 4 && bytes[0] == 0 && bytes[2..4] == [0, 1];
        if bytes[0] == pcp::VERSION || version_answer {
            if let Ok(r) = pcp::decode_response(bytes) {
                self.pcp_answer(now, r);
            }
        } else if bytes[0] == 0
            && let Ok(r) = natpmp::Response::decode(bytes)
        {
            self.natpmp_answer(now, r);
        }
        self.decide(now);
        self.flush(now);
    }

    fn pcp_answer(&mut self, now: Instant, r: pcp::Response) {
        match r {
            pcp::Response::UnsupportedVersion { server_version } => {
                if self.pcp_probe.take().is_some() {
                    self.probes[Protocol::Pcp.index()] =
                        Probe::Refused(format!("the router speaks version {server_version}, not PCP"));
                }
            }
            pcp::Response::Other { .. } => {}
            pcp::Response::Map {
                result,
                lifetime_secs,
                epoch_secs,
                nonce,
                internal_port,
                external_port,
                external_ip,
            } => {
                let Some(i) = self
                    .slots
                    .iter()
                    .position(|s| s.nonce == nonce && s.internal == internal_port)
                else {
                    return;
                };
                let probing = matches!(self.phase, Phase::Probing);
                if probing {
                    if i != 0 || self.pcp_probe.take().is_none() {
                        return;
                    }
                    self.probes[Protocol::Pcp.index()] = if result == 0 {
                        Probe::Answered
                    } else {
                        Probe::Refused(pcp::result_text(result).into())
                    };
                } else if self.protocol() != Some(Protocol::Pcp) || self.slots[i].request.take().is_none() {
                    return;
                }
                self.check_epoch(now, Protocol::Pcp, epoch_secs);
                if result != 0 {
                    self.refused(now, Protocol::Pcp, i, pcp::result_text(result).into());
                    return;
                }
                let external = SocketAddr::new(external_ip, external_port);
                self.mapped(
                    now,
                    Protocol::Pcp,
                    i,
                    external,
                    Duration::from_secs(lifetime_secs.into()),
                );
            }
        }
    }

    fn natpmp_answer(&mut self, now: Instant, r: natpmp::Response) {
        match r {
            natpmp::Response::ExternalAddress { epoch_secs, ip } => {
                if self.natpmp_ext.take().is_none() {
                    return;
                }
                if matches!(self.phase, Phase::Probing) {
                    self.probes[Protocol::NatPmp.index()] = Probe::Answered;
                }
                self.check_epoch(now, Protocol::NatPmp, epoch_secs);
                self.next_ext = now + CONFIRM_INTERVAL;
                if self.natpmp_ip != Some(ip) && self.protocol() == Some(Protocol::NatPmp) {
                    // The router's public address changed: the mappings carry the new one.
                    for s in &mut self.slots {
                        if let Some(m) = &mut s.mapping {
                            m.external = SocketAddr::new(IpAddr::V4(ip), m.external.port());
                        }
                    }
                }
                self.natpmp_ip = Some(ip);
            }
            natpmp::Response::MapUdp {
                epoch_secs,
                internal_port,
                external_port,
                lifetime_secs,
            } => {
                if self.protocol() != Some(Protocol::NatPmp) {
                    return;
                }
                let Some(i) = self.slots.iter().position(|s| s.internal == internal_port) else {
                    return;
                };
                if self.slots[i].request.take().is_none() {
                    return;
                }
                self.check_epoch(now, Protocol::NatPmp, epoch_secs);
                let Some(ip) = self.natpmp_ip else { return };
                let external = SocketAddr::new(IpAddr::V4(ip), external_port);
                self.mapped(
                    now,
                    Protocol::NatPmp,
                    i,
                    external,
                    Duration::from_secs(lifetime_secs.into()),
                );
            }
            natpmp::Response::Error {
                op,
                result,
                epoch_secs,
            } => {
                if op == 0 && self.natpmp_ext.take().is_some() {
                    if matches!(self.phase, Phase::Probing) {
                        self.probes[Protocol::NatPmp.index()] =
                            Probe::Refused(natpmp::result_text(result).into());
                    }
                    return;
                }
                if op != 1 || self.protocol() != Some(Protocol::NatPmp) {
                    return;
                }
                self.check_epoch(now, Protocol::NatPmp, epoch_secs);
                // NAT-PMP errors do not name the port: the request in flight gets it.
                if let Some(i) = self.slots.iter().position(|s| s.request.is_some()) {
                    self.slots[i].request = None;
                    self.refused(now, Protocol::NatPmp, i, natpmp::result_text(result).into());
                }
            }
        }
    }

    /// A router whose epoch starts over lost its mappings: map everything again.
    fn check_epoch(&mut self, now: Instant, protocol: Protocol, server: u32) {
        let continues = epoch_continues(self.epoch, server, now);
        self.epoch = Some(Epoch { server, at: now });
        if continues || self.protocol() != Some(protocol) {
            return;
        }
        if self.holds_any() {
            self.events.push_back(Event::Lost {
                protocol,
                why: "the router restarted (its epoch went back) and forgot the mappings".into(),
            });
        }
        for s in &mut self.slots {
            s.mapping = None;
            s.next = now;
        }
    }

    fn mapped(
        &mut self,
        now: Instant,
        protocol: Protocol,
        i: usize,
        external: SocketAddr,
        granted: Duration,
    ) {
        let slot = &mut self.slots[i];
        let changed = slot.mapping.is_none_or(|m| m.external != external);
        slot.mapping = Some(Mapping {
            external,
            granted,
            obtained: now,
        });
        slot.refusals = 0;
        slot.error = None;
        slot.next = now + renew_after(granted, i);
        let internal = slot.internal;
        if changed {
            // The router's public address changed: ask again for the other
            // socket too, so the candidate's two halves agree.
            for (j, other) in self.slots.iter_mut().enumerate() {
                if j != i && other.mapping.is_some_and(|m| m.external.ip() != external.ip()) {
                    other.next = now;
                }
            }
            self.events.push_back(Event::Mapped {
                protocol,
                socket: SOCKETS[i],
                internal,
                external,
                lease: granted,
            });
        }
    }

    fn refused(&mut self, now: Instant, protocol: Protocol, i: usize, why: String) {
        let slot = &mut self.slots[i];
        slot.mapping = None;
        let wait = REFUSED_RETRY
            .saturating_mul(1 << slot.refusals.min(5))
            .min(REPROBE_MAX);
        slot.refusals += 1;
        slot.next = now + wait;
        if slot.error.as_deref() != Some(&why) {
            self.events.push_back(Event::Refused {
                protocol,
                socket: SOCKETS[i],
                why: why.clone(),
            });
        }
        slot.error = Some(why);
    }

    /// ICMP port unreachable from the router's 5351: it runs neither PCP nor
    /// NAT-PMP, no need to wait out their probes. Ignored once a protocol
    /// is chosen (a daemon restarting; renewals go on and time out if not).
    pub fn handle_port_closed(&mut self, now: Instant) {
        if !matches!(self.phase, Phase::Probing) {
            return;
        }
        for p in [Protocol::Pcp, Protocol::NatPmp] {
            if self.probes[p.index()] == Probe::Waiting {
                self.probes[p.index()] = Probe::Refused(format!("port {} closed", pcp::SERVER_PORT));
            }
        }
        self.pcp_probe = None;
        self.natpmp_ext = None;
        self.decide(now);
        self.flush(now);
    }

    /// An answer from the UPnP worker.
    pub fn handle_upnp(&mut self, now: Instant, reply: upnp::Reply) {
        if self.upnp_discover.is_some_and(|(id, _)| id == reply.id) {
            self.upnp_discover = None;
            match reply.outcome {
                upnp::Outcome::Discovered { local, external, .. } => {
                    let before = self.upnp_found.and_then(|(_, e)| e);
                    self.upnp_found = Some((local, external));
                    self.next_rediscover = now + UPNP_REDISCOVER;
                    if matches!(self.phase, Phase::Probing) {
                        self.probes[Protocol::Upnp.index()] = Probe::Answered;
                    } else if let Some(ip) = external.filter(|e| Some(*e) != before) {
                        // The router's public address changed under the mappings.
                        for (i, s) in self.slots.iter_mut().enumerate() {
                            if let Some(m) = &mut s.mapping {
                                m.external = SocketAddr::new(ip, m.external.port());
                                self.events.push_back(Event::Mapped {
                                    protocol: Protocol::Upnp,
                                    socket: SOCKETS[i],
                                    internal: s.internal,
                                    external: m.external,
                                    lease: m.granted,
                                });
                            }
                        }
                    }
                }
                upnp::Outcome::Failed(why) => {
                    if matches!(self.phase, Phase::Probing) {
                        self.probes[Protocol::Upnp.index()] = Probe::Refused(why);
                    } else if self.protocol() == Some(Protocol::Upnp) {
                        self.lose(now, Protocol::Upnp, why);
                    }
                }
                _ => {}
            }
        } else if let Some(i) = self
            .slots
            .iter()
            .position(|s| s.upnp.is_some_and(|(id, _)| id == reply.id))
        {
            self.slots[i].upnp = None;
            if self.protocol() != Some(Protocol::Upnp) {
                return;
            }
            match reply.outcome {
                upnp::Outcome::Mapped {
                    external_port,
                    lease_secs,
                    ..
                } => match self.upnp_found.and_then(|(_, e)| e) {
                    Some(ip) => self.mapped(
                        now,
                        Protocol::Upnp,
                        i,
                        SocketAddr::new(ip, external_port),
                        Duration::from_secs(lease_secs.into()),
                    ),
                    None => self.refused(
                        now,
                        Protocol::Upnp,
                        i,
                        "the router mapped the port but does not tell its external address".into(),
                    ),
                },
                upnp::Outcome::Checked { present: true, .. } => {
                    let granted = self.slots[i].mapping.map_or(Duration::ZERO, |m| m.granted);
                    let slot = &mut self.slots[i];
                    slot.next = now + confirm_or_renew(slot.mapping, granted, now);
                }
                upnp::Outcome::Checked { present: false, .. } => {
                    self.events.push_back(Event::Lost {
                        protocol: Protocol::Upnp,
                        why: format!(
                            "the router no longer has the {} port's mapping (restarted?)",
                            SOCKETS[i].as_str()
                        ),
                    });
                    // A router that lost one lost both: map both again.
                    for s in &mut self.slots {
                        s.mapping = None;
                        s.next = now;
                    }
                }
                upnp::Outcome::Failed(why) => {
                    if self.slots[i].mapping.is_some() {
                        // Lost the router (or it refuses now): discover it again.
                        self.lose(now, Protocol::Upnp, why);
                    } else {
                        self.refused(now, Protocol::Upnp, i, why);
                    }
                }
                _ => {}
            }
        }
        self.decide(now);
        self.flush(now);
    }

    /// The chosen protocol stopped answering: drop what it held, probe again.
    fn lose(&mut self, now: Instant, protocol: Protocol, why: String) {
        self.events.push_back(Event::Lost { protocol, why });
        self.reset();
        self.start_probe(now);
    }

    /// Probing is over when the most preferred protocol that answered has
    /// every more preferred one finished without answering.
    fn decide(&mut self, now: Instant) {
        if !matches!(self.phase, Phase::Probing) {
            return;
        }
        for p in PROTOCOLS {
            match &self.probes[p.index()] {
                Probe::Answered => {
                    self.phase = Phase::Active(p);
                    self.reprobe = REPROBE_INITIAL;
                    for probe in &mut self.probes {
                        if *probe == Probe::Waiting {
                            *probe = Probe::NotNeeded;
                        }
                    }
                    // Late answers of the others are ignored from now on.
                    self.pcp_probe = None;
                    if p != Protocol::NatPmp {
                        self.natpmp_ext = None;
                    }
                    self.upnp_discover = None;
                    self.events.push_back(Event::Chosen(p));
                    self.activate(now, p);
                    return;
                }
                s if s.finished() => continue,
                _ => return,
            }
        }
        let retry_in = self.reprobe;
        self.phase = Phase::Silent {
            retry_at: now + retry_in,
        };
        self.reprobe = (self.reprobe * 2).min(REPROBE_MAX);
        self.events.push_back(Event::NothingAnswered { retry_in });
    }

    fn activate(&mut self, now: Instant, p: Protocol) {
        for (i, s) in self.slots.iter_mut().enumerate() {
            // PCP's probe already mapped the WireGuard port (its answer was
            // taken as the first mapping); the rest starts now.
            if !(p == Protocol::Pcp && i == 0 && s.mapping.is_some()) {
                s.next = now;
                s.error = None;
                s.refusals = 0;
            }
        }
        if p == Protocol::NatPmp {
            self.next_ext = now + CONFIRM_INTERVAL;
        }
        self.active_timeout(now, p);
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if !self.enabled {
            return;
        }
        match self.phase {
            Phase::Off => {}
            Phase::Silent { retry_at } => {
                if now >= retry_at {
                    self.reset();
                    self.start_probe(now);
                }
            }
            Phase::Probing => {
                if self.pcp_probe.as_ref().is_some_and(|r| r.exhausted(now)) {
                    self.pcp_probe = None;
                    self.probes[Protocol::Pcp.index()] = Probe::NoAnswer;
                }
                if self.natpmp_ext.as_ref().is_some_and(|r| r.exhausted(now)) {
                    self.natpmp_ext = None;
                    self.probes[Protocol::NatPmp.index()] = Probe::NoAnswer;
                }
                if self
                    .upnp_discover
                    .is_some_and(|(_, at)| now >= at + UPNP_DEADLINE)
                {
                    self.upnp_discover = None;
                    self.probes[Protocol::Upnp.index()] = Probe::NoAnswer;
                }
                self.decide(now);
            }
            Phase::Active(p) => self.active_timeout(now, p),
        }
        self.flush(now);
    }

    fn active_timeout(&mut self, now: Instant, p: Protocol) {
        let Some(gw) = self.gateway else { return };
        // A renewal nobody answers: the router is gone or rebooting.
        let silent = self
            .slots
            .iter()
            .any(|s| s.request.as_ref().is_some_and(|r| r.exhausted(now)))
            || self.natpmp_ext.as_ref().is_some_and(|r| r.exhausted(now));
        if silent {
            self.lose(now, p, format!("the router stopped answering {p}"));
            return;
        }
        if p == Protocol::Upnp && self.upnp_discover.is_none() && now >= self.next_rediscover {
            let id = self.id();
            self.upnp_discover = Some((id, now));
            self.commands.push_back((id, upnp::Command::Discover));
        }
        if p == Protocol::NatPmp && self.natpmp_ext.is_none() && now >= self.next_ext {
            self.natpmp_ext = Some(Retry::new(
                now,
                natpmp::Request::ExternalAddress.encode(),
                RENEW_TRIES,
            ));
        }
        for (i, socket) in SOCKETS.into_iter().enumerate() {
            let s = &self.slots[i];
            if now < s.next || s.request.is_some() || s.upnp.is_some() {
                continue;
            }
            match p {
                Protocol::Pcp => {
                    let bytes = self.pcp_map(gw, socket, LEASE);
                    self.slots[i].request = Some(Retry::new(now, bytes, RENEW_TRIES));
                }
                Protocol::NatPmp => {
                    // Its mapping answers lack the address: wait for it.
                    if self.natpmp_ip.is_none() {
                        continue;
                    }
                    let bytes = self.natpmp_map(socket, LEASE);
                    self.slots[i].request = Some(Retry::new(now, bytes, RENEW_TRIES));
                }
                Protocol::Upnp => self.upnp_step(now, i),
            }
        }
        for i in 0..self.slots.len() {
            if self.slots[i]
                .upnp
                .is_some_and(|(_, at)| now >= at + UPNP_DEADLINE)
            {
                self.slots[i].upnp = None;
                self.lose(now, p, "the UPnP router did not answer in time".into());
                return;
            }
        }
    }

    fn upnp_step(&mut self, now: Instant, i: usize) {
        let Some((local, _)) = self.upnp_found else {
            return;
        };
        let s = &self.slots[i];
        let renew = s
            .mapping
            .is_some_and(|m| m.left(now).is_some_and(|l| l <= m.granted / 2));
        let command = match s.mapping {
            Some(m) if !renew => upnp::Command::Check {
                internal: SocketAddrV4::new(local, s.internal),
                external_port: m.external.port(),
            },
            held => upnp::Command::Map {
                internal: SocketAddrV4::new(local, s.internal),
                external_port: held.map_or(s.internal, |m| m.external.port()),
                lease_secs: LEASE.as_secs() as u32,
                description: format!("{UPNP_DESCRIPTION} {}", SOCKETS[i].as_str()),
            },
        };
        let id = self.id();
        self.slots[i].upnp = Some((id, now));
        self.commands.push_back((id, command));
    }

    /// Moves due retransmissions to the send queue.
    fn flush(&mut self, now: Instant) {
        let Some(server) = self.server() else { return };
        let mut out = Vec::new();
        for r in [&mut self.pcp_probe, &mut self.natpmp_ext].into_iter().flatten() {
            out.extend(r.due(now));
        }
        for s in &mut self.slots {
            if let Some(r) = &mut s.request {
                out.extend(r.due(now));
            }
        }
        self.transmits.extend(out.into_iter().map(|b| (server, b)));
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        if !self.enabled {
            return None;
        }
        let retries = [&self.pcp_probe, &self.natpmp_ext]
            .into_iter()
            .flatten()
            .chain(self.slots.iter().filter_map(|s| s.request.as_ref()))
            .map(|r| r.next);
        let upnp = self
            .upnp_discover
            .iter()
            .chain(self.slots.iter().filter_map(|s| s.upnp.as_ref()))
            .map(|(_, at)| *at + UPNP_DEADLINE);
        let phase = match self.phase {
            Phase::Off | Phase::Probing => None,
            Phase::Silent { retry_at } => Some(retry_at),
            Phase::Active(p) => {
                let slots = self
                    .slots
                    .iter()
                    .filter(|s| s.request.is_none() && s.upnp.is_none())
                    .map(|s| s.next);
                let ext = (p == Protocol::NatPmp && self.natpmp_ext.is_none()).then_some(self.next_ext);
                let rediscover =
                    (p == Protocol::Upnp && self.upnp_discover.is_none()).then_some(self.next_rediscover);
                slots.chain(ext).chain(rediscover).min()
            }
        };
        retries.chain(upnp).chain(phase).min()
    }

    pub fn poll_transmit(&mut self) -> Option<(SocketAddr, Vec<u8>)> {
        self.transmits.pop_front()
    }

    pub fn poll_upnp(&mut self) -> Option<(u64, upnp::Command)> {
        self.commands.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Both sockets mapped on one external address: a candidate for peers.
    pub fn candidate(&self) -> Option<Candidate> {
        let p = self.protocol()?;
        let wg = self.slots[0].mapping?.external;
        let check = self.slots[1].mapping?.external;
        (wg.ip() == check.ip()).then_some(Candidate {
            kind: p.kind(),
            wg,
            check,
        })
    }

    /// What to send to give the mappings back (a clean stop): PCP and
    /// NAT-PMP requests with lifetime 0, and UPnP ports to delete.
    pub fn release(&mut self) -> (Vec<(SocketAddr, Vec<u8>)>, Vec<u16>) {
        let (Some(gw), Some(p), Some(server)) = (self.gateway, self.protocol(), self.server()) else {
            return (Vec::new(), Vec::new());
        };
        let mut datagrams = Vec::new();
        let mut ports = Vec::new();
        for (i, s) in self.slots.iter().enumerate() {
            let Some(m) = s.mapping else { continue };
            match p {
                Protocol::Pcp => datagrams.push((server, self.pcp_map(gw, SOCKETS[i], Duration::ZERO))),
                // RFC 6886 §3.4: delete = lifetime 0 and suggested port 0.
                Protocol::NatPmp => datagrams.push((
                    server,
                    natpmp::Request::MapUdp {
                        internal_port: s.internal,
                        suggested_external_port: 0,
                        lifetime_secs: 0,
                    }
                    .encode(),
                )),
                Protocol::Upnp => ports.push(m.external.port()),
            }
        }
        self.reset();
        (datagrams, ports)
    }

    pub fn status(&self) -> Status {
        let protocol = self.protocol();
        let external_ip = self.slots[0]
            .mapping
            .map(|m| m.external.ip())
            .or(self.natpmp_ip.map(IpAddr::V4))
            .or(self.upnp_found.and_then(|(_, e)| e));
        Status {
            enabled: self.enabled,
            gateway: self.gateway.map(|g| g.router),
            protocol,
            probes: PROTOCOLS
                .iter()
                .map(|p| (*p, self.probes[p.index()].to_string()))
                .collect(),
            external_ip,
            mappings: SOCKETS
                .iter()
                .filter_map(|s| {
                    let slot = &self.slots[*s as usize];
                    slot.mapping.map(|m| (*s, slot.internal, m))
                })
                .collect(),
            error: if !self.enabled {
                Some("turned off (--no-portmap)".into())
            } else if self.gateway.is_none() {
                Some("no IPv4 default route through a router".into())
            } else {
                self.slots.iter().find_map(|s| s.error.clone())
            },
        }
    }
}

/// When a fresh mapping is next touched: the WireGuard port's is confirmed
/// every `CONFIRM_INTERVAL` (for PCP a renewal is the only question the
/// router answers with its epoch), the check port's at half its lease.
fn renew_after(granted: Duration, slot: usize) -> Duration {
    let half = granted / 2;
    if granted.is_zero() || slot == 0 {
        if half.is_zero() {
            CONFIRM_INTERVAL
        } else {
            half.min(CONFIRM_INTERVAL)
        }
    } else {
        half.max(Duration::from_secs(1))
    }
}

/// UPnP: the next check, or the renewal if that comes first.
fn confirm_or_renew(mapping: Option<Mapping>, granted: Duration, now: Instant) -> Duration {
    match mapping.and_then(|m| m.left(now)) {
        Some(left) if !granted.is_zero() => left.saturating_sub(granted / 2).min(CONFIRM_INTERVAL),
        _ => CONFIRM_INTERVAL,
    }
}

#[cfg(test)]
#[path = "mapper_tests.rs"]
mod tests;
