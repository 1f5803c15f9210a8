//! Plain STUN Binding server core (sans-IO): a datagram in, maybe a response
//! out. A per-source-address rate limit keeps it from being a cheap reflector.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use super::message::{Builder, Class, METHOD_BINDING, Message, attr, binding_success};

/// Default Binding requests answered per source IP per second. A client needs
/// a handful per minute; anything near this is a scan or a flood.
pub const DEFAULT_REQUESTS_PER_SOURCE: u32 = 20;
const RATE_WINDOW: Duration = Duration::from_secs(1);
/// Bound on the per-source table, so a spoofed-source flood cannot grow it:
/// past this many sources in one window, new sources are refused until the window ends.
const MAX_TRACKED_SOURCES: usize = 65_536;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StunStats {
    pub answered: u64,
    pub malformed: u64,
    pub bad_fingerprint: u64,
    /// Well-formed STUN that is not a Binding request (responses, indications, other methods).
    pub ignored: u64,
    pub rate_limited: u64,
}

/// Fixed one-second window counter per source IP.
struct SourceLimiter {
    limit: u32,
    window_start: Option<Instant>,
    counts: HashMap<IpAddr, u32>,
}

impl SourceLimiter {
    fn allow(&mut self, now: Instant, ip: IpAddr) -> bool {
        if self.limit == 0 {
            return true;
        }
        match self.window_start {
            Some(start) if now.saturating_duration_since(start) < RATE_WINDOW => {}
            _ => {
                self.counts.clear();
                self.window_start = Some(now);
            }
        }
        let tracked = self.counts.len();
        match self.counts.get_mut(&ip) {
            Some(n) => {
                *n = n.saturating_add(1);
                *n <= self.limit
            }
            None if tracked >= MAX_TRACKED_SOURCES => false,
            None => {
                self.counts.insert(ip, 1);
                true
            }
        }
    }
}

/// Comprehension-required attributes (type < 0x8000) RFC 8489 defines: a Binding
/// server understands them by ignoring them (no authentication here). Any other
/// one, such as RFC 5780's CHANGE-REQUEST, gets 420 Unknown Attribute, so a
/// client never mistakes a plain answer for one that honoured its request.
const KNOWN_REQUIRED: [u16; 11] = [
    attr::MAPPED_ADDRESS,
    0x0006, // USERNAME
    attr::MESSAGE_INTEGRITY,
    0x0009, // ERROR-CODE
    0x000a, // UNKNOWN-ATTRIBUTES
    0x0014, // REALM
    0x0015, // NONCE
    0x001c, // MESSAGE-INTEGRITY-SHA256
    0x001d, // PASSWORD-ALGORITHM
    0x001e, // USERHASH
    attr::XOR_MAPPED_ADDRESS,
];
const ERROR_UNKNOWN_ATTRIBUTE: u16 = 420;
/// At most this many unknown types are listed back, keeping the error small.
const MAX_UNKNOWN_LISTED: usize = 8;

/// Writes the answer to a Binding request into `out`: success with
/// XOR-MAPPED-ADDRESS = `mapped`, or 420 listing the unknown required attributes.
/// Returns false (and writes nothing) if `msg` is not a Binding request.
pub fn answer_binding(msg: &Message, mapped: SocketAddr, out: &mut Vec<u8>) -> bool {
    if !msg.is_binding_request() {
        return false;
    }
    let mut unknown = Vec::new();
    for (kind, _) in msg.attributes() {
        if kind < 0x8000 && !KNOWN_REQUIRED.contains(&kind) && unknown.len() < MAX_UNKNOWN_LISTED {
            unknown.push(kind);
        }
    }
    // A client behind a dual-stack socket shows up as ::ffff:a.b.c.d; it wants a.b.c.d.
    let mapped = SocketAddr::new(mapped.ip().to_canonical(), mapped.port());
    if unknown.is_empty() {
        binding_success(out, &msg.transaction_id, mapped);
    } else {
        let reason = b"Unknown Attribute";
        let mut code = vec![
            0,
            0,
            (ERROR_UNKNOWN_ATTRIBUTE / 100) as u8,
            (ERROR_UNKNOWN_ATTRIBUTE % 100) as u8,
        ];
        code.extend_from_slice(reason);
        let list: Vec<u8> = unknown.iter().flat_map(|k| k.to_be_bytes()).collect();
        Builder::new(out, Class::Error, METHOD_BINDING, &msg.transaction_id)
            .attribute(0x0009, &code)
            .attribute(0x000a, &list)
            .finish_with_fingerprint();
    }
    true
}

pub struct StunServer {
    limiter: SourceLimiter,
    response: Vec<u8>,
    stats: StunStats,
}

impl StunServer {
    /// `requests_per_source`: per IP per second; 0 turns the limit off (benchmarks).
    pub fn new(requests_per_source: u32) -> Self {
        StunServer {
            limiter: SourceLimiter {
                limit: requests_per_source,
                window_start: None,
                counts: HashMap::new(),
            },
            response: Vec::with_capacity(64),
            stats: StunStats::default(),
        }
    }

    /// One datagram from `from`; returns the response to send back to `from`, if any.
    pub fn handle_input(&mut self, now: Instant, from: SocketAddr, bytes: &[u8]) -> Option<&[u8]> {
        let msg = match Message::decode(bytes) {
            Ok(m) => m,
            Err(super::DecodeError::BadFingerprint) => {
                self.stats.bad_fingerprint += 1;
                return None;
            }
            Err(_) => {
                self.stats.malformed += 1;
                return None;
            }
        };
        if !msg.is_binding_request() {
            self.stats.ignored += 1;
            return None;
        }
        if !self.limiter.allow(now, from.ip()) {
            self.stats.rate_limited += 1;
            return None;
        }
        self.stats.answered += 1;
        self.response.clear();
        answer_binding(&msg, from, &mut self.response);
        Some(&self.response)
    }

    pub fn stats(&self) -> StunStats {
        self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stun::message::binding_request;

    #[test]
    fn answers_with_the_source_address() {
        let mut s = StunServer::new(DEFAULT_REQUESTS_PER_SOURCE);
        let from: SocketAddr = "198.51.100.9:40000".parse().unwrap();
        let mut req = Vec::new();
        binding_request(&mut req, &[3; 12], true);
        let resp = s.handle_input(Instant::now(), from, &req).unwrap().to_vec();
        let m = Message::decode(&resp).unwrap();
        assert_eq!(m.transaction_id, [3; 12]);
        assert_eq!(m.xor_mapped_address(), Some(from));
        assert_eq!(s.stats().answered, 1);
    }

    #[test]
    fn unknown_required_attribute_gets_420_and_mapped_v4_is_canonical() {
        let mut s = StunServer::new(0);
        let mut req = Vec::new();
        // RFC 5780 CHANGE-REQUEST (0x0003) asking for a changed IP and port.
        Builder::new(&mut req, Class::Request, METHOD_BINDING, &[5; 12])
            .attribute(0x0003, &[0, 0, 0, 6])
            .attribute(attr::SOFTWARE, b"ignored, optional")
            .finish_with_fingerprint();
        let from: SocketAddr = "198.51.100.9:40000".parse().unwrap();
        let resp = s.handle_input(Instant::now(), from, &req).unwrap().to_vec();
        let m = Message::decode(&resp).unwrap();
        assert_eq!(m.class, Class::Error);
        assert_eq!(m.attribute(0x0009).map(|v| (v[2], v[3])), Some((4, 20)));
        assert_eq!(m.attribute(0x000a), Some(&[0u8, 3][..]));

        let mut req = Vec::new();
        binding_request(&mut req, &[6; 12], true);
        let v4_mapped: SocketAddr = "[::ffff:198.51.100.9]:40000".parse().unwrap();
        let resp = s.handle_input(Instant::now(), v4_mapped, &req).unwrap().to_vec();
        assert_eq!(Message::decode(&resp).unwrap().xor_mapped_address(), Some(from));
    }

    #[test]
    fn bad_input_is_counted_not_answered() {
        let mut s = StunServer::new(DEFAULT_REQUESTS_PER_SOURCE);
        let from: SocketAddr = "198.51.100.9:40000".parse().unwrap();
        let now = Instant::now();
        assert!(s.handle_input(now, from, b"hello").is_none());
        let mut req = Vec::new();
        binding_request(&mut req, &[3; 12], true);
        let last = req.len() - 1;
        req[last] ^= 0xff;
        assert!(s.handle_input(now, from, &req).is_none());
        let mut resp = Vec::new();
        binding_success(&mut resp, &[3; 12], from);
        assert!(s.handle_input(now, from, &resp).is_none());
        assert_eq!(
            s.stats(),
            StunStats {
                malformed: 1,
                bad_fingerprint: 1,
                ignored: 1,
                ..Default::default()
            }
        );
    }

    #[test]
    fn per_source_rate_limit_applies_per_ip_and_resets() {
        let mut s = StunServer::new(5);
        let mut req = Vec::new();
        binding_request(&mut req, &[3; 12], false);
        let now = Instant::now();
        let answered = (0..50u16)
            .filter(|p| {
                let from = SocketAddr::new("198.51.100.9".parse().unwrap(), 1000 + p);
                s.handle_input(now, from, &req).is_some()
            })
            .count();
        assert_eq!(answered, 5, "ports of one IP share the limit");
        let other: SocketAddr = "198.51.100.10:1".parse().unwrap();
        assert!(s.handle_input(now, other, &req).is_some());
        let later = now + RATE_WINDOW;
        let from: SocketAddr = "198.51.100.9:1".parse().unwrap();
        assert!(s.handle_input(later, from, &req).is_some());
        assert_eq!(s.stats().rate_limited, 45);
    }
}
