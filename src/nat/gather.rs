//! Server-reflexive candidates: what NAT makes of our two sockets. WireGuard's
//! own socket is asked about through the tunnel — a STUN Binding request to
//! the WG-STUN server at 100.64.0.4, sent from a socket on our mesh address,
//! leaves inside a WireGuard datagram, and the answer is the outer source of
//! that datagram: the public mapping of WireGuard's socket, whatever
//! WireGuard implementation runs. The check socket is asked with plain STUN.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::stun::message::{self as stun, TransactionId};

/// Between retries while an answer is missing.
pub const STUN_RETRY: Duration = Duration::from_millis(500);
/// Retries before waiting a whole refresh interval: the server may be down.
pub const STUN_TRIES: u32 = 6;
/// How often mappings are asked again while some peer is not direct: home
/// routers drop idle UDP mappings after 30 s to a few minutes, and a changed
/// mapping must reach peers before they need it.
pub const STUN_REFRESH: Duration = Duration::from_secs(60);
/// The same while every peer is direct: nothing waits for the answer.
pub const STUN_REFRESH_IDLE: Duration = Duration::from_secs(300);

/// Which of our sockets a STUN exchange is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Socket {
    /// The mesh-address socket: the request goes through WireGuard.
    Tunnel,
    Check,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StunRequest {
    pub socket: Socket,
    pub to: SocketAddr,
    pub bytes: [u8; stun::HEADER_LEN],
}

#[derive(Default)]
struct Exchange {
    server: Option<SocketAddr>,
    mapped: Option<SocketAddr>,
    pending: Option<TransactionId>,
    tries: u32,
    next: Option<Instant>,
    error: Option<String>,
}

impl Exchange {
    fn configure(&mut self, now: Instant, server: Option<SocketAddr>) {
        if self.server != server {
            *self = Exchange {
                server,
                next: server.map(|_| now),
                ..Exchange::default()
            };
        }
    }
}

/// Keeps both mappings known and fresh. Sans-IO: requests out, answers in.
pub struct Gather {
    tunnel: Exchange,
    check: Exchange,
    rng: u64,
}

/// What was learned, for `warren netcheck`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Mappings {
    pub wg: Option<SocketAddr>,
    pub check: Option<SocketAddr>,
    pub wg_error: Option<String>,
    pub check_error: Option<String>,
}

impl Gather {
    pub fn new(seed: u64) -> Gather {
        Gather {
            tunnel: Exchange::default(),
            check: Exchange::default(),
            rng: seed | 1,
        }
    }

    /// Where to ask: the WG-STUN server's address inside the tunnel (None
    /// without a WG-STUN server) and its plain STUN address.
    pub fn configure(&mut self, now: Instant, tunnel: Option<SocketAddr>, check: Option<SocketAddr>) {
        self.tunnel.configure(now, tunnel);
        self.check.configure(now, check);
    }

    /// The network changed: every mapping may have too. Forget them (a
    /// stale mapping announced to peers only fails their checks) and ask again now.
    pub fn refresh(&mut self, now: Instant) {
        for e in [&mut self.tunnel, &mut self.check] {
            if e.server.is_some() {
                e.tries = 0;
                e.next = Some(now);
                e.mapped = None;
                e.pending = None;
            }
        }
    }

    pub fn mappings(&self) -> Mappings {
        Mappings {
            wg: self.tunnel.mapped,
            check: self.check.mapped,
            wg_error: self.tunnel.error.clone(),
            check_error: self.check.error.clone(),
        }
    }

    fn txid(&mut self) -> TransactionId {
        let mut id = [0u8; 12];
        for chunk in id.chunks_mut(4) {
            self.rng ^= self.rng << 13;
            self.rng ^= self.rng >> 7;
            self.rng ^= self.rng << 17;
            chunk.copy_from_slice(&(self.rng as u32).to_be_bytes());
        }
        id
    }

    /// The next request due at `now`. `settled` is true while every peer is
    /// direct (mappings then refresh slowly).
    pub fn poll_request(&mut self, now: Instant, settled: bool) -> Option<StunRequest> {
        for socket in [Socket::Tunnel, Socket::Check] {
            let txid = self.txid();
            let e = match socket {
                Socket::Tunnel => &mut self.tunnel,
                Socket::Check => &mut self.check,
            };
            let (Some(server), Some(next)) = (e.server, e.next) else {
                continue;
            };
            if now < next {
                continue;
            }
            e.tries += 1;
            if e.tries > STUN_TRIES {
                e.tries = 0;
                e.pending = None;
                e.error = Some(format!("no answer from {server} after {STUN_TRIES} tries"));
                e.next = Some(now + if settled { STUN_REFRESH_IDLE } else { STUN_REFRESH });
                continue;
            }
            e.pending = Some(txid);
            e.next = Some(now + STUN_RETRY);
            let mut buf = Vec::with_capacity(stun::HEADER_LEN);
            stun::binding_request(&mut buf, &txid, false);
            let mut bytes = [0u8; stun::HEADER_LEN];
            bytes.copy_from_slice(&buf[..stun::HEADER_LEN]);
            return Some(StunRequest {
                socket,
                to: server,
                bytes,
            });
        }
        None
    }

    /// A datagram that looks like STUN arrived on `socket`. Returns true when
    /// a mapping changed.
    pub fn handle_response(&mut self, now: Instant, socket: Socket, bytes: &[u8], settled: bool) -> bool {
        let Ok(msg) = stun::Message::decode(bytes) else {
            return false;
        };
        let e = match socket {
            Socket::Tunnel => &mut self.tunnel,
            Socket::Check => &mut self.check,
        };
        if e.pending != Some(msg.transaction_id) {
            return false;
        }
        let Some(mapped) = msg.xor_mapped_address() else {
            return false;
        };
        e.pending = None;
        e.tries = 0;
        e.error = None;
        e.next = Some(now + if settled { STUN_REFRESH_IDLE } else { STUN_REFRESH });
        let changed = e.mapped != Some(mapped);
        e.mapped = Some(mapped);
        changed
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        [self.tunnel.next, self.check.next].into_iter().flatten().min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(req: &StunRequest, mapped: &str) -> Vec<u8> {
        let msg = stun::Message::decode(&req.bytes).unwrap();
        let mut out = Vec::new();
        stun::binding_success(&mut out, &msg.transaction_id, mapped.parse().unwrap());
        out
    }

    #[test]
    fn asks_both_retries_and_learns_both_mappings() {
        let t0 = Instant::now();
        let mut g = Gather::new(7);
        let tunnel: SocketAddr = "100.64.0.4:3478".parse().unwrap();
        let plain: SocketAddr = "203.0.113.5:3478".parse().unwrap();
        g.configure(t0, Some(tunnel), Some(plain));
        let a = g.poll_request(t0, false).unwrap();
        let b = g.poll_request(t0, false).unwrap();
        assert_eq!((a.socket, a.to), (Socket::Tunnel, tunnel));
        assert_eq!((b.socket, b.to), (Socket::Check, plain));
        assert!(g.poll_request(t0, false).is_none());
        // The tunnel answer is lost: asked again after the retry interval.
        assert!(g.handle_response(t0, Socket::Check, &answer(&b, "198.51.100.10:61000"), false));
        let a2 = g.poll_request(t0 + STUN_RETRY, false).unwrap();
        assert_eq!(a2.socket, Socket::Tunnel);
        // The stale answer to the first request is ignored.
        assert!(!g.handle_response(t0, Socket::Tunnel, &answer(&a, "198.51.100.10:1"), false));
        assert!(g.handle_response(t0, Socket::Tunnel, &answer(&a2, "198.51.100.10:51820"), false));
        let m = g.mappings();
        assert_eq!(m.wg, Some("198.51.100.10:51820".parse().unwrap()));
        assert_eq!(m.check, Some("198.51.100.10:61000".parse().unwrap()));
        assert_eq!(g.poll_timeout(), Some(t0 + STUN_REFRESH));
        // A network change asks at once.
        g.refresh(t0 + Duration::from_secs(1));
        assert!(g.poll_request(t0 + Duration::from_secs(1), false).is_some());
    }

    #[test]
    fn a_silent_server_is_reported_and_asked_again_later() {
        let t0 = Instant::now();
        let mut g = Gather::new(7);
        g.configure(t0, Some("100.64.0.4:3478".parse().unwrap()), None);
        let mut now = t0;
        let mut sent = 0;
        for _ in 0..50 {
            if g.poll_request(now, false).is_some() {
                sent += 1;
            }
            now += STUN_RETRY;
        }
        assert_eq!(sent, STUN_TRIES as usize);
        assert!(g.mappings().wg_error.unwrap().contains("no answer"));
        assert!(g.poll_timeout().unwrap() > now);
    }
}
