//! Load generator and test client for a WG-STUN server, used by the lab tests
//! and `integration/bench-wgstun` through the hidden `warren wgstun-load`.
//! Clients are boringtun `Tunn`s multiplexed on one UDP socket and told apart
//! by the receiver index the server puts in its replies.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};

use super::inner::{self, STUN_PORT};
use crate::keys::Key;
use crate::stun::Message;
use crate::stun::message::binding_request;

const WG_HANDSHAKE_RESPONSE: u8 = 2;
const WG_COOKIE_REPLY: u8 = 3;
/// How long a round waits for the answers it expects before counting the rest lost.
const ROUND_TIMEOUT: Duration = Duration::from_millis(200);
const CLIENT_INNER: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 200);

fn bind_any(server: SocketAddr) -> Result<UdpSocket> {
    let local: SocketAddr = if server.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse()?;
    let s = UdpSocket::bind(local).context("binding a client socket")?;
    s.set_read_timeout(Some(Duration::from_millis(20)))
        .context("setting a socket timeout")?;
    Ok(s)
}

fn le32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

#[derive(Debug, Default)]
pub struct FloodReport {
    pub sent: usize,
    pub handshake_responses: usize,
    pub cookie_replies: usize,
}

/// Sends `count` handshake initiations, each from a fresh client key, spread
/// over `ports` source sockets; counts what comes back.
pub fn flood(server: SocketAddr, server_key: Key, count: usize, ports: usize) -> Result<FloodReport> {
    let sockets: Vec<UdpSocket> = (0..ports.max(1))
        .map(|_| bind_any(server))
        .collect::<Result<_>>()?;
    for s in &sockets {
        s.set_nonblocking(true)
            .context("making a flood socket non-blocking")?;
    }
    let server_public = PublicKey::from(server_key.0);
    let mut report = FloodReport::default();
    let mut buf = vec![0u8; 2048];
    let drain = |report: &mut FloodReport, buf: &mut [u8]| {
        for s in &sockets {
            while let Ok((n, _)) = s.recv_from(buf) {
                match buf[..n].first() {
                    Some(&WG_HANDSHAKE_RESPONSE) => report.handshake_responses += 1,
                    Some(&WG_COOKIE_REPLY) => report.cookie_replies += 1,
                    _ => {}
                }
            }
        }
    };
    for i in 0..count {
        let private = StaticSecret::from(Key::generate_private().0);
        let mut t = Tunn::new(private, server_public, None, None, 1, None);
        if let TunnResult::WriteToNetwork(p) = t.format_handshake_initiation(&mut buf, true) {
            let p = p.to_vec();
            let s = &sockets[i % sockets.len()];
            // A full socket buffer is the flood working; keep going.
            if s.send_to(&p, server).is_ok() {
                report.sent += 1;
            }
        }
        if i % 64 == 0 {
            drain(&mut report, &mut buf);
        }
    }
    let end = Instant::now() + Duration::from_millis(500);
    while Instant::now() < end {
        drain(&mut report, &mut buf);
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(report)
}

#[derive(Debug, Default)]
pub struct ProvingFloodReport {
    pub initiations: u64,
    pub cookie_replies: u64,
    /// Handshake responses: sessions the server created (or re-keyed) for us.
    pub sessions: u64,
}

/// How long a proving-flood slot waits for an answer before it sends its
/// initiation again (the server drops what is over its per-source budget).
const PROVING_RETRY: Duration = Duration::from_millis(50);

/// One in-flight fresh key of a proving flood.
struct Slot {
    tunn: Tunn,
    sent: Instant,
}

/// The flood of issue 12: one source creating sessions as fast as the server
/// lets it, as a determined attacker would. `window` fresh keys are in flight
/// at once; each answers its cookie reply (so it proves its address), confirms
/// the session the server gives it, optionally asks one STUN question inside
/// it (so it looks like a client), and is replaced by a fresh key. Runs for
/// `duration`.
pub fn proving_flood(
    server: SocketAddr,
    server_key: Key,
    window: usize,
    ask: bool,
    duration: Duration,
) -> Result<ProvingFloodReport> {
    let sock = bind_any(server)?;
    sock.set_nonblocking(true)
        .context("making the flood socket non-blocking")?;
    let server_public = PublicKey::from(server_key.0);
    let fresh = |i: usize| {
        let private = StaticSecret::from(Key::generate_private().0);
        Tunn::new(private, server_public, None, None, i as u32, None)
    };
    let mut report = ProvingFloodReport::default();
    let mut buf = vec![0u8; 65_536];
    let mut out = vec![0u8; 2048];
    let mut stun = Vec::new();
    let mut inner_pkt = Vec::new();
    // A full socket buffer is the flood working; sends that fail are retried by the timer.
    let initiate = |slot: &mut Slot, buf: &mut [u8], report: &mut ProvingFloodReport| {
        if let TunnResult::WriteToNetwork(p) = slot.tunn.format_handshake_initiation(buf, true) {
            let _ = sock.send_to(p, server);
            report.initiations += 1;
        }
        slot.sent = Instant::now();
    };
    let mut slots: Vec<Slot> = (0..window.max(1))
        .map(|i| Slot {
            tunn: fresh(i),
            sent: Instant::now(),
        })
        .collect();
    for slot in &mut slots {
        initiate(slot, &mut buf, &mut report);
    }
    let end = Instant::now() + duration;
    while Instant::now() < end {
        let mut idle = true;
        while let Ok((n, _)) = sock.recv_from(&mut buf) {
            idle = false;
            let packet = buf[..n].to_vec();
            let at = if packet.first() == Some(&WG_HANDSHAKE_RESPONSE) {
                8
            } else {
                4
            };
            let Some(i) = le32(&packet, at).map(|x| (x >> 8) as usize) else {
                continue;
            };
            let Some(slot) = slots.get_mut(i) else {
                continue;
            };
            match (
                packet[0],
                slot.tunn.decapsulate(Some(server.ip()), &packet, &mut out),
            ) {
                (WG_COOKIE_REPLY, TunnResult::Done) => {
                    report.cookie_replies += 1;
                    initiate(slot, &mut buf, &mut report);
                }
                (WG_HANDSHAKE_RESPONSE, TunnResult::WriteToNetwork(keepalive)) => {
                    report.sessions += 1;
                    let _ = sock.send_to(keepalive, server);
                    if ask {
                        stun.clear();
                        binding_request(&mut stun, &[7; 12], true);
                        inner_pkt.clear();
                        inner::build_udp_to_server(&mut inner_pkt, CLIENT_INNER, 40_000, STUN_PORT, &stun);
                        if let TunnResult::WriteToNetwork(p) = slot.tunn.encapsulate(&inner_pkt, &mut out) {
                            let _ = sock.send_to(p, server);
                        }
                        // The answer comes back for the key this slot drops now: the
                        // server counts it (stun_answered), the flood does not.
                    }
                    slot.tunn = fresh(i);
                    initiate(slot, &mut buf, &mut report);
                }
                _ => {}
            }
        }
        let now = Instant::now();
        for slot in &mut slots {
            if now.duration_since(slot.sent) >= PROVING_RETRY {
                idle = false;
                initiate(slot, &mut buf, &mut report);
            }
        }
        if idle {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    Ok(report)
}

struct Client {
    tunn: Tunn,
    connected: bool,
}

/// Many clients on one socket.
pub struct Clients {
    sock: UdpSocket,
    server: SocketAddr,
    clients: Vec<Client>,
    buf: Vec<u8>,
    out: Vec<u8>,
}

impl Clients {
    pub fn new(server: SocketAddr, server_key: Key, n: usize) -> Result<Clients> {
        let server_public = PublicKey::from(server_key.0);
        let clients = (0..n)
            .map(|i| {
                let private = StaticSecret::from(Key::generate_private().0);
                Client {
                    tunn: Tunn::new(private, server_public, None, None, i as u32, None),
                    connected: false,
                }
            })
            .collect();
        Ok(Clients {
            sock: bind_any(server)?,
            server,
            clients,
            buf: vec![0u8; 65_536],
            out: Vec::new(),
        })
    }

    pub fn local_addr(&self) -> Result<SocketAddr> {
        self.sock
            .local_addr()
            .context("reading the client socket address")
    }

    fn send(&self, bytes: &[u8]) {
        // Loss is measured by missing answers, not by send errors.
        let _ = self.sock.send_to(bytes, self.server);
    }

    /// Handshakes every client, `window` at a time, retrying after cookie replies.
    /// Returns how many are connected.
    pub fn connect_all(&mut self, window: usize, deadline: Instant) -> Result<usize> {
        let n = self.clients.len();
        let mut next = 0;
        while Instant::now() < deadline {
            let pending: Vec<usize> = (0..n)
                .map(|k| (next + k) % n)
                .filter(|&i| !self.clients[i].connected)
                .take(window)
                .collect();
            if pending.is_empty() {
                break;
            }
            next = (pending[pending.len() - 1] + 1) % n;
            for &i in &pending {
                if let TunnResult::WriteToNetwork(p) = self.clients[i]
                    .tunn
                    .format_handshake_initiation(&mut self.buf, true)
                {
                    let p = p.to_vec();
                    self.send(&p);
                }
            }
            let round_end = Instant::now() + ROUND_TIMEOUT;
            let mut answered = 0;
            while answered < pending.len() && Instant::now() < round_end {
                let Ok((len, _)) = self.sock.recv_from(&mut self.buf) else {
                    continue;
                };
                let packet = self.buf[..len].to_vec();
                let Some(i) = self.client_for(&packet) else {
                    continue;
                };
                match self.clients[i]
                    .tunn
                    .decapsulate(Some(self.server.ip()), &packet, &mut self.buf)
                {
                    TunnResult::WriteToNetwork(keepalive) => {
                        let k = keepalive.to_vec();
                        if packet[0] == WG_HANDSHAKE_RESPONSE {
                            self.clients[i].connected = true;
                        }
                        self.send(&k);
                        answered += 1;
                    }
                    // A cookie reply: the next initiation carries the cookie.
                    TunnResult::Done => answered += 1,
                    _ => {}
                }
            }
        }
        Ok(self.clients.iter().filter(|c| c.connected).count())
    }

    fn client_for(&self, packet: &[u8]) -> Option<usize> {
        // Handshake responses carry our index at 8, cookie replies and data at 4.
        let at = if packet.first() == Some(&WG_HANDSHAKE_RESPONSE) {
            8
        } else {
            4
        };
        let i = (le32(packet, at)? >> 8) as usize;
        (i < self.clients.len()).then_some(i)
    }

    /// Sends Binding requests inside the tunnels for `duration`, `window` in
    /// flight per round. Returns (answered, wrong answers, elapsed).
    pub fn stun_rounds(&mut self, window: usize, duration: Duration) -> Result<(u64, u64, Duration)> {
        let connected: Vec<usize> = (0..self.clients.len())
            .filter(|&i| self.clients[i].connected)
            .collect();
        if connected.is_empty() {
            bail!("no client is connected to {}", self.server);
        }
        let me = self.local_addr()?;
        let (mut answered, mut wrong) = (0u64, 0u64);
        let start = Instant::now();
        let mut next = 0;
        let mut stun = Vec::new();
        while start.elapsed() < duration {
            let mut expected = 0;
            for _ in 0..window.min(connected.len()) {
                let i = connected[next % connected.len()];
                next += 1;
                stun.clear();
                let tid = [(next % 251) as u8; 12];
                binding_request(&mut stun, &tid, true);
                self.out.clear();
                inner::build_udp_to_server(&mut self.out, CLIENT_INNER, 40_000, STUN_PORT, &stun);
                if let TunnResult::WriteToNetwork(p) =
                    self.clients[i].tunn.encapsulate(&self.out, &mut self.buf)
                {
                    let p = p.to_vec();
                    self.send(&p);
                    expected += 1;
                }
            }
            let round_end = Instant::now() + ROUND_TIMEOUT;
            let mut got = 0;
            while got < expected && Instant::now() < round_end {
                let Ok((len, _)) = self.sock.recv_from(&mut self.buf) else {
                    continue;
                };
                let packet = self.buf[..len].to_vec();
                let Some(i) = self.client_for(&packet) else {
                    continue;
                };
                if let TunnResult::WriteToTunnelV4(p, _) =
                    self.clients[i]
                        .tunn
                        .decapsulate(Some(self.server.ip()), &packet, &mut self.buf)
                {
                    got += 1;
                    let mapped = inner::parse_udp_from_server(p)
                        .and_then(|(_, _, payload)| Message::decode(payload).ok()?.xor_mapped_address());
                    // Loopback: the server sees our socket's own address (0.0.0.0 bound → 127.0.0.1).
                    if mapped.map(|a| a.port()) == Some(me.port()) {
                        answered += 1;
                    } else {
                        wrong += 1;
                    }
                }
            }
        }
        Ok((answered, wrong, start.elapsed()))
    }
}

/// Plain STUN Binding requests, `window` in flight per round, for `duration`.
/// Returns (answered, elapsed). Works against any STUN server.
pub fn plain_stun_rounds(server: SocketAddr, window: usize, duration: Duration) -> Result<(u64, Duration)> {
    let sock = bind_any(server)?;
    let mut req = Vec::new();
    let mut buf = vec![0u8; 2048];
    let mut answered = 0u64;
    let start = Instant::now();
    let mut n: u32 = 0;
    while start.elapsed() < duration {
        for _ in 0..window {
            n = n.wrapping_add(1);
            let mut tid = [0u8; 12];
            tid[..4].copy_from_slice(&n.to_be_bytes());
            req.clear();
            binding_request(&mut req, &tid, false);
            let _ = sock.send_to(&req, server);
        }
        let round_end = Instant::now() + ROUND_TIMEOUT;
        let mut got = 0;
        while got < window && Instant::now() < round_end {
            if let Ok((len, _)) = sock.recv_from(&mut buf)
                && Message::decode(&buf[..len]).is_ok_and(|m| m.xor_mapped_address().is_some())
            {
                got += 1;
            }
        }
        answered += got as u64;
    }
    Ok((answered, start.elapsed()))
}
