//! The WG-STUN core (sans-IO): WireGuard datagrams in, WireGuard datagrams
//! out. A boringtun `Tunn` per client acts as responder for any client key;
//! inside the tunnel only STUN Binding to 100.64.0.4:3478 and ICMP echo to
//! 100.64.0.4 are answered. The STUN answer carries the *outer* address of
//! the datagram that brought the request: the client's WireGuard mapping.
//!
//! A handshake passes `budget` (how many per second, in total and per source;
//! past it, WireGuard's cookie reply demands proof of the source address)
//! before any DH, and `peers` decides who gives way when a session is added.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};

use super::budget::{Budget, Gate};
use super::inner::{self, Inner, STUN_PORT};
use super::peers::{Admission, ClientKey, Sessions, Source};
use crate::keys::Key;
use crate::stun::Message;
use crate::stun::server::answer_binding;

/// Sessions kept at most by default. About 11 KB each (boringtun keeps eight
/// key-pair slots per peer inline), measured by integration/bench-wgstun, so
/// about 45 MB at the ceiling, which bounds memory under a flood.
pub const DEFAULT_MAX_SESSIONS: usize = 4_096;
/// Handshake initiations per second accepted before WireGuard's cookie reply
/// (proof of source address) is demanded from every initiator.
pub const DEFAULT_HANDSHAKES_PER_SEC: u64 = 100;
/// Sessions one source (IPv4 address, IPv6 /64) may hold; beyond it a new
/// one replaces one of its own. A home or office NAT holds a handful of
/// nodes; at 64, one address can take at most 1/64 of the default table.
pub const DEFAULT_MAX_SESSIONS_PER_SOURCE: usize = 64;
/// Proven handshakes per source per second (see `budget`).
pub const DEFAULT_HANDSHAKES_PER_SOURCE: u32 = super::budget::DEFAULT_PROVEN_PER_SOURCE;
/// boringtun's RateLimiter compares its count with these limits.
const NEVER_UNDER_LOAD: u64 = u64::MAX;
const ALWAYS_UNDER_LOAD: u64 = 0;
/// Housekeeping period: the handshake budget's window and the session sweep.
const TICK: Duration = Duration::from_secs(1);
/// A session that received nothing for this long holds no usable keys:
/// WireGuard rejects keys older than REJECT_AFTER_TIME (180 s), and the last
/// thing received is at least as new as the keys.
pub const SESSION_IDLE_TIMEOUT: Duration = Duration::from_secs(180);
/// Room for any datagram boringtun may hand back (max UDP payload).
const SCRATCH_LEN: usize = 65_536;
/// Header and tag boringtun adds when sealing a data packet.
const WG_DATA_OVERHEAD: usize = 32;
/// Bound on queued outgoing datagrams; beyond it new answers are dropped and counted.
const MAX_QUEUED_TRANSMITS: usize = 4_096;

#[derive(Clone, Debug)]
pub struct ResponderConfig {
    pub private_key: Key,
    pub max_sessions: usize,
    pub max_sessions_per_source: usize,
    pub handshakes_per_sec: u64,
    /// Proven handshakes per source per second (half as many without proof).
    pub handshakes_per_source: u32,
}

impl ResponderConfig {
    pub fn new(private_key: Key) -> Self {
        ResponderConfig {
            private_key,
            max_sessions: DEFAULT_MAX_SESSIONS,
            max_sessions_per_source: DEFAULT_MAX_SESSIONS_PER_SOURCE,
            handshakes_per_sec: DEFAULT_HANDSHAKES_PER_SEC,
            handshakes_per_source: DEFAULT_HANDSHAKES_PER_SOURCE,
        }
    }
}

/// A datagram to send from the WireGuard socket.
#[derive(Debug)]
pub struct Transmit {
    pub dst: SocketAddr,
    pub payload: Vec<u8>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub handshakes: u64,
    pub sessions_created: u64,
    pub sessions_evicted: u64,
    /// Evictions of a source's own session because it was at its cap.
    pub evicted_at_source_cap: u64,
    /// Evictions of a session that had asked a STUN question (a real client).
    pub evicted_asked: u64,
    pub sessions_expired: u64,
    pub cookie_replies: u64,
    /// Proven initiations dropped: their source used its handshakes for this second.
    pub source_over_budget: u64,
    /// Not a WireGuard message at all (wrong type or size).
    pub not_wireguard: u64,
    /// Handshake with a bad mac1 (not meant for our key).
    pub bad_mac: u64,
    /// mac1 fine but the handshake did not decrypt, or was a replay.
    pub handshake_rejected: u64,
    /// Data / response / cookie for a receiver index we do not have.
    pub unknown_session: u64,
    pub decrypt_failed: u64,
    pub keepalives: u64,
    pub stun_answered: u64,
    pub echo_answered: u64,
    /// Inner packets dropped: malformed / bad checksum / fragment / not to 100.64.0.4 /
    /// something not served (TCP, other ports, non-Binding STUN, IPv6).
    pub inner_malformed: u64,
    pub inner_bad_checksum: u64,
    pub inner_fragment: u64,
    pub inner_not_for_us: u64,
    pub inner_not_served: u64,
    pub transmit_overflow: u64,
}

/// Outgoing datagrams, with their buffers reused once sent.
#[derive(Default)]
struct Outbox {
    transmits: VecDeque<Transmit>,
    spare: Vec<Vec<u8>>,
    overflow: u64,
}

impl Outbox {
    fn push(&mut self, dst: SocketAddr, bytes: &[u8]) {
        if self.transmits.len() >= MAX_QUEUED_TRANSMITS {
            self.overflow += 1;
            return;
        }
        let mut payload = self.spare.pop().unwrap_or_default();
        payload.clear();
        payload.extend_from_slice(bytes);
        self.transmits.push_back(Transmit { dst, payload });
    }

    fn recycle(&mut self, mut payload: Vec<u8>) {
        const MAX_SPARE_BUFFERS: usize = 64;
        if self.spare.len() < MAX_SPARE_BUFFERS {
            payload.clear();
            self.spare.push(payload);
        }
    }
}

pub struct Responder {
    private: StaticSecret,
    public: PublicKey,
    /// boringtun's limiter used for its mac1 check only (it is never under
    /// load); every session's `Tunn` re-checks mac1 with it.
    mac1: Arc<RateLimiter>,
    /// boringtun's limiter used for its mac2 check only (always under load):
    /// the one cookie secret, so a cookie a client got stays good whatever
    /// made us demand it.
    cookie: Arc<RateLimiter>,
    /// Load is decided here, on our clock, not inside boringtun.
    budget: Budget,
    sessions: Sessions,
    outbox: Outbox,
    scratch: Box<[u8]>,
    sealed: Box<[u8]>,
    inner_out: Vec<u8>,
    stun_out: Vec<u8>,
    next_tick: Option<Instant>,
    stats: Stats,
}

impl Responder {
    pub fn new(config: &ResponderConfig) -> Responder {
        let private = StaticSecret::from(config.private_key.0);
        let public = PublicKey::from(&private);
        Responder {
            mac1: Arc::new(RateLimiter::new(&public, NEVER_UNDER_LOAD)),
            cookie: Arc::new(RateLimiter::new(&public, ALWAYS_UNDER_LOAD)),
            private,
            public,
            budget: Budget::new(config.handshakes_per_sec, config.handshakes_per_source),
            sessions: Sessions::new(config.max_sessions, config.max_sessions_per_source),
            outbox: Outbox::default(),
            scratch: vec![0u8; SCRATCH_LEN].into_boxed_slice(),
            sealed: vec![0u8; SCRATCH_LEN + WG_DATA_OVERHEAD].into_boxed_slice(),
            inner_out: Vec::with_capacity(1500),
            stun_out: Vec::with_capacity(64),
            next_tick: None,
            stats: Stats::default(),
        }
    }

    pub fn public_key(&self) -> Key {
        Key(self.public.to_bytes())
    }

    pub fn stats(&self) -> Stats {
        Stats {
            transmit_overflow: self.outbox.overflow,
            ..self.stats
        }
    }

    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    pub fn session_capacity(&self) -> usize {
        self.sessions.capacity()
    }

    pub fn session_capacity_per_source(&self) -> usize {
        self.sessions.capacity_per_source()
    }

    /// One datagram that arrived on the WireGuard socket from `from`.
    pub fn handle_input(&mut self, now: Instant, from: SocketAddr, bytes: &[u8]) {
        if self.next_tick.is_none() {
            self.next_tick = Some(now + TICK);
        }
        let receiver_index = match Tunn::parse_incoming_packet(bytes) {
            Err(_) => {
                self.stats.not_wireguard += 1;
                return;
            }
            Ok(Packet::HandshakeInit(_)) => return self.handle_initiation(now, from, bytes),
            Ok(Packet::PacketData(p)) => p.receiver_idx,
            Ok(Packet::HandshakeResponse(p)) => p.receiver_idx,
            Ok(Packet::PacketCookieReply(p)) => p.receiver_idx,
        };
        self.handle_for_session(now, from, receiver_index, bytes);
    }

    /// Cookies before state: the cheap mac1 check, then (under load) proof of
    /// the source address before any DH, then the DH to learn the key, then
    /// (if a new session would cost someone theirs) proof again, and only then
    /// a session.
    fn handle_initiation(&mut self, now: Instant, from: SocketAddr, bytes: &[u8]) {
        let mut cookie = [0u8; 64];
        let init = match self.mac1.verify_packet(Some(from.ip()), bytes, &mut cookie) {
            Ok(Packet::HandshakeInit(init)) => init,
            Ok(_) => {
                self.stats.not_wireguard += 1;
                return;
            }
            Err(_) => {
                self.stats.bad_mac += 1;
                return;
            }
        };
        let source = Source::of(from.ip());
        let mut proven = false;
        if self.budget.unproven(source) == Gate::ProofNeeded {
            if !self.prove_source(from, bytes) {
                return;
            }
            proven = true;
        }
        let Ok(half) = parse_handshake_anon(&self.private, &self.public, &init) else {
            self.stats.handshake_rejected += 1;
            return;
        };
        let key: ClientKey = half.peer_static_public;
        let (id, fresh) = match self.sessions.id_of(&key) {
            Some(id) => (id, false),
            None => {
                let admission = self.sessions.admission(from);
                if admission != Admission::Free && !proven && !self.prove_source(from, bytes) {
                    return;
                }
                let (private, mac1) = (self.private.clone(), self.mac1.clone());
                let (id, evicted) = self.sessions.insert(key, now, from, |id| {
                    Tunn::new(private, PublicKey::from(key), None, None, id, Some(mac1))
                });
                if let Some(e) = evicted {
                    self.stats.sessions_evicted += 1;
                    if e.admission == Admission::EvictsOwn {
                        self.stats.evicted_at_source_cap += 1;
                    }
                    if e.asked {
                        self.stats.evicted_asked += 1;
                    }
                }
                (id, true)
            }
        };
        let Some(session) = self.sessions.get_mut(id) else {
            return;
        };
        let out = match session
            .tunn
            .decapsulate(Some(from.ip()), bytes, &mut self.scratch)
        {
            TunnResult::WriteToNetwork(p) => Some(p.to_vec()),
            _ => None,
        };
        match out {
            Some(p) => {
                self.stats.handshakes += 1;
                if fresh {
                    self.stats.sessions_created += 1;
                }
                self.sessions.touch(id, now, from);
                self.queue(from, &p);
            }
            None => {
                self.stats.handshake_rejected += 1;
                if fresh {
                    self.sessions.remove(id);
                }
            }
        }
    }

    /// WireGuard's cookie mechanism: true if the initiation's mac2 proves that
    /// its sender receives at `from` and that source has budget left (else it
    /// is dropped); without mac2 a cookie reply is queued, so a real client's
    /// next initiation (wireguard-go retries after REKEY_TIMEOUT) carries the
    /// proof, and a spoofed source never does.
    fn prove_source(&mut self, from: SocketAddr, bytes: &[u8]) -> bool {
        let mut cookie = [0u8; 64];
        match self.cookie.verify_packet(Some(from.ip()), bytes, &mut cookie) {
            Ok(_) if self.budget.proven(Source::of(from.ip())) => true,
            Ok(_) => {
                self.stats.source_over_budget += 1;
                false
            }
            Err(TunnResult::WriteToNetwork(reply)) => {
                self.stats.cookie_replies += 1;
                let reply = reply.to_vec();
                self.queue(from, &reply);
                false
            }
            Err(_) => {
                self.stats.bad_mac += 1;
                false
            }
        }
    }

    fn handle_for_session(&mut self, now: Instant, from: SocketAddr, receiver_index: u32, bytes: &[u8]) {
        let id = Sessions::id_for_receiver_index(receiver_index);
        let Some(session) = self.sessions.get_mut(id) else {
            self.stats.unknown_session += 1;
            return;
        };
        let mut authenticated = true;
        let mut asked = false;
        match session
            .tunn
            .decapsulate(Some(from.ip()), bytes, &mut self.scratch)
        {
            TunnResult::WriteToTunnelV4(packet, _) => {
                self.inner_out.clear();
                asked = answer_inner(
                    packet,
                    from,
                    &mut self.inner_out,
                    &mut self.stun_out,
                    &mut self.stats,
                );
                if !self.inner_out.is_empty()
                    && let TunnResult::WriteToNetwork(p) =
                        session.tunn.encapsulate(&self.inner_out, &mut self.sealed)
                {
                    self.outbox.push(from, p);
                }
            }
            TunnResult::WriteToTunnelV6(..) => self.stats.inner_not_served += 1,
            TunnResult::Done => self.stats.keepalives += 1,
            TunnResult::WriteToNetwork(p) => {
                // Handshake confirmed or cookie processed: boringtun may have packets queued.
                self.outbox.push(from, p);
                for _ in 0..MAX_QUEUED_TRANSMITS {
                    match session.tunn.decapsulate(None, &[], &mut self.scratch) {
                        TunnResult::WriteToNetwork(p) => self.outbox.push(from, p),
                        _ => break,
                    }
                }
            }
            TunnResult::Err(e) => {
                authenticated = false;
                match e {
                    WireGuardError::InvalidPacket => self.stats.not_wireguard += 1,
                    _ => self.stats.decrypt_failed += 1,
                }
            }
        }
        if authenticated {
            self.sessions.touch(id, now, from);
        }
        if asked {
            self.sessions.mark_asked(id);
        }
    }

    fn queue(&mut self, dst: SocketAddr, bytes: &[u8]) {
        self.outbox.push(dst, bytes);
    }

    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.outbox.transmits.pop_front()
    }

    /// Hands a sent transmit's buffer back for reuse (optional).
    pub fn recycle(&mut self, payload: Vec<u8>) {
        self.outbox.recycle(payload);
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.next_tick
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        match self.next_tick {
            Some(t) if now >= t => {}
            _ => return,
        }
        self.next_tick = Some(now + TICK);
        self.budget.tick();
        let expired = self.sessions.expire_idle(now, SESSION_IDLE_TIMEOUT);
        self.stats.sessions_expired += expired as u64;

        // WireGuard's own timers: passive keepalives, key expiry.
        let mut out = Vec::new();
        let mut dead = Vec::new();
        for (id, s) in self.sessions.iter_mut_with_ids() {
            match s.tunn.update_timers(&mut self.scratch) {
                TunnResult::WriteToNetwork(p) => out.push((s.endpoint, p.to_vec())),
                TunnResult::Err(WireGuardError::ConnectionExpired) => dead.push(id),
                _ => {}
            }
        }
        for id in dead {
            if self.sessions.remove(id).is_some() {
                self.stats.sessions_expired += 1;
            }
        }
        for (dst, p) in out {
            self.queue(dst, &p);
        }
    }

    /// One line for logs: every counter that is not zero.
    pub fn stats_line(&self) -> String {
        let s = &self.stats;
        let fields = [
            ("sessions", self.sessions.len() as u64),
            ("handshakes", s.handshakes),
            ("created", s.sessions_created),
            ("evicted", s.sessions_evicted),
            ("evicted_at_source_cap", s.evicted_at_source_cap),
            ("evicted_asked", s.evicted_asked),
            ("expired", s.sessions_expired),
            ("cookie_replies", s.cookie_replies),
            ("source_over_budget", s.source_over_budget),
            ("not_wireguard", s.not_wireguard),
            ("bad_mac", s.bad_mac),
            ("handshake_rejected", s.handshake_rejected),
            ("unknown_session", s.unknown_session),
            ("decrypt_failed", s.decrypt_failed),
            ("keepalives", s.keepalives),
            ("stun_answered", s.stun_answered),
            ("echo_answered", s.echo_answered),
            ("inner_malformed", s.inner_malformed),
            ("inner_bad_checksum", s.inner_bad_checksum),
            ("inner_fragment", s.inner_fragment),
            ("inner_not_for_us", s.inner_not_for_us),
            ("inner_not_served", s.inner_not_served),
            ("transmit_overflow", self.outbox.overflow),
        ];
        fields
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// Decides the answer to one decrypted inner packet; writes it to `out` (empty = no answer).
/// Returns whether it was a STUN Binding request (what marks a session as a real client's).
fn answer_inner(
    packet: &[u8],
    outer_from: SocketAddr,
    out: &mut Vec<u8>,
    stun: &mut Vec<u8>,
    stats: &mut Stats,
) -> bool {
    match inner::parse(packet) {
        Ok(Inner::EchoRequest { src, rest }) => {
            inner::build_echo_reply(out, src, rest);
            stats.echo_answered += 1;
            return false;
        }
        Ok(Inner::Udp {
            src,
            src_port,
            payload,
            ..
        }) => match Message::decode(payload) {
            Ok(m) => {
                stun.clear();
                if answer_binding(&m, outer_from, stun) {
                    inner::build_udp(out, STUN_PORT, src, src_port, stun);
                    stats.stun_answered += 1;
                    return true;
                } else {
                    stats.inner_not_served += 1;
                }
            }
            Err(_) => stats.inner_not_served += 1,
        },
        Err(inner::Drop::Malformed) => stats.inner_malformed += 1,
        Err(inner::Drop::BadChecksum) => stats.inner_bad_checksum += 1,
        Err(inner::Drop::Fragment) => stats.inner_fragment += 1,
        Err(inner::Drop::NotForUs) => stats.inner_not_for_us += 1,
        Err(inner::Drop::NotServed) => stats.inner_not_served += 1,
    }
    false
}
