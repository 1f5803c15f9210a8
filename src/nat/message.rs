//! NAT traversal's node-to-node messages, carried inside sealed boxes
//! ([`crate::peer::seal`]): through the relay (candidates, upgrade,
//! downgrade), between check sockets (check ping and pong) and through the
//! tunnel (probe and reply). The box authenticates the sender and stops
//! replays; this codec only bounds and parses what is inside.
//!
//! Wire format (integers big-endian; an address is `family (1: 4 or 6, 0 for
//! none) | ip (4 or 16) | port (2)`):
//!
//! ```text
//! 16 candidates   generation (8) | known (8): the generation of the receiver's list
//!                 the sender has, 0 for none | count (1) | count × (kind (1) | wg addr | check addr)
//! 17 check ping   txid (8)
//! 18 check pong   txid (8) | observed source of the ping (addr)
//! 19 upgrade      id (8) | dial (addr): the receiver's endpoint the sender sets
//!                         | suggest (addr): the sender's endpoint for the receiver
//! 20 downgrade    id (8)
//! 21 probe        txid (8)
//! 22 probe reply  txid (8)
//! ```
//!
//! Types below 16 belong to other peer messages (`warren ping`); unknown
//! types at or above 16 decode to `None` so newer agents can add messages.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::candidate::{Candidate, Kind};

/// Most candidates a node announces; more would only slow the checks.
pub const MAX_CANDIDATES: usize = 16;
/// First message type of NAT traversal.
pub const FIRST_TYPE: u8 = 16;

const CANDIDATES: u8 = 16;
const CHECK_PING: u8 = 17;
const CHECK_PONG: u8 = 18;
const UPGRADE: u8 = 19;
const DOWNGRADE: u8 = 20;
const PROBE: u8 = 21;
const PROBE_REPLY: u8 = 22;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// The sender's whole candidate list; a higher generation replaces a lower one.
    Candidates {
        generation: u64,
        known: u64,
        list: Vec<Candidate>,
    },
    CheckPing {
        txid: u64,
    },
    CheckPong {
        txid: u64,
        observed: SocketAddr,
    },
    /// The sender moves this peer to a direct path now.
    Upgrade {
        id: u64,
        dial: Option<SocketAddr>,
        suggest: Option<SocketAddr>,
    },
    /// The sender's direct path to us failed; it is back on the relay.
    Downgrade {
        id: u64,
    },
    Probe {
        txid: u64,
    },
    ProbeReply {
        txid: u64,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DecodeError {
    Truncated,
    TooManyCandidates(usize),
    BadFamily(u8),
    BadKind(u8),
    TrailingBytes(usize),
    Empty,
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::Truncated => write!(f, "truncated traversal message"),
            DecodeError::TooManyCandidates(n) => {
                write!(f, "{n} candidates exceed the limit of {MAX_CANDIDATES}")
            }
            DecodeError::BadFamily(b) => write!(f, "unknown address family {b}"),
            DecodeError::BadKind(b) => write!(f, "unknown candidate kind {b}"),
            DecodeError::TrailingBytes(n) => write!(f, "{n} bytes after the message"),
            DecodeError::Empty => write!(f, "empty message"),
        }
    }
}

impl std::error::Error for DecodeError {}

impl Message {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        match self {
            Message::Candidates {
                generation,
                known,
                list,
            } => {
                out.push(CANDIDATES);
                out.extend_from_slice(&generation.to_be_bytes());
                out.extend_from_slice(&known.to_be_bytes());
                let list = &list[..list.len().min(MAX_CANDIDATES)];
                out.push(list.len() as u8);
                for c in list {
                    out.push(c.kind.to_wire());
                    put_addr(&mut out, Some(c.wg));
                    put_addr(&mut out, Some(c.check));
                }
            }
            Message::CheckPing { txid } => put_id(&mut out, CHECK_PING, *txid),
            Message::CheckPong { txid, observed } => {
                put_id(&mut out, CHECK_PONG, *txid);
                put_addr(&mut out, Some(*observed));
            }
            Message::Upgrade { id, dial, suggest } => {
                put_id(&mut out, UPGRADE, *id);
                put_addr(&mut out, *dial);
                put_addr(&mut out, *suggest);
            }
            Message::Downgrade { id } => put_id(&mut out, DOWNGRADE, *id),
            Message::Probe { txid } => put_id(&mut out, PROBE, *txid),
            Message::ProbeReply { txid } => put_id(&mut out, PROBE_REPLY, *txid),
        }
        out
    }

    /// `Ok(None)` for a type this agent does not know.
    pub fn decode(bytes: &[u8]) -> Result<Option<Message>, DecodeError> {
        let (&kind, rest) = bytes.split_first().ok_or(DecodeError::Empty)?;
        let mut r = Reader(rest);
        let msg = match kind {
            CANDIDATES => {
                let generation = r.u64()?;
                let known = r.u64()?;
                let n = r.u8()? as usize;
                if n > MAX_CANDIDATES {
                    return Err(DecodeError::TooManyCandidates(n));
                }
                let mut list = Vec::with_capacity(n);
                for _ in 0..n {
                    let k = r.u8()?;
                    let kind = Kind::from_wire(k).ok_or(DecodeError::BadKind(k))?;
                    let wg = r.addr()?.ok_or(DecodeError::BadFamily(0))?;
                    let check = r.addr()?.ok_or(DecodeError::BadFamily(0))?;
                    list.push(Candidate { kind, wg, check });
                }
                Message::Candidates {
                    generation,
                    known,
                    list,
                }
            }
            CHECK_PING => Message::CheckPing { txid: r.u64()? },
            CHECK_PONG => Message::CheckPong {
                txid: r.u64()?,
                observed: r.addr()?.ok_or(DecodeError::BadFamily(0))?,
            },
            UPGRADE => Message::Upgrade {
                id: r.u64()?,
                dial: r.addr()?,
                suggest: r.addr()?,
            },
            DOWNGRADE => Message::Downgrade { id: r.u64()? },
            PROBE => Message::Probe { txid: r.u64()? },
            PROBE_REPLY => Message::ProbeReply { txid: r.u64()? },
            _ => return Ok(None),
        };
        if !r.0.is_empty() {
            return Err(DecodeError::TrailingBytes(r.0.len()));
        }
        Ok(Some(msg))
    }
}

fn put_id(out: &mut Vec<u8>, kind: u8, id: u64) {
    out.push(kind);
    out.extend_from_slice(&id.to_be_bytes());
}

fn put_addr(out: &mut Vec<u8>, addr: Option<SocketAddr>) {
    match addr.map(|a| (a.ip(), a.port())) {
        None => out.push(0),
        Some((IpAddr::V4(ip), port)) => {
            out.push(4);
            out.extend_from_slice(&ip.octets());
            out.extend_from_slice(&port.to_be_bytes());
        }
        Some((IpAddr::V6(ip), port)) => {
            out.push(6);
            out.extend_from_slice(&ip.octets());
            out.extend_from_slice(&port.to_be_bytes());
        }
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.0.len() < n {
            return Err(DecodeError::Truncated);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }

    fn addr(&mut self) -> Result<Option<SocketAddr>, DecodeError> {
        let ip = match self.u8()? {
            0 => return Ok(None),
            4 => IpAddr::V4(Ipv4Addr::from(
                <[u8; 4]>::try_from(self.take(4)?).expect("4 bytes"),
            )),
            6 => IpAddr::V6(Ipv6Addr::from(
                <[u8; 16]>::try_from(self.take(16)?).expect("16 bytes"),
            )),
            f => return Err(DecodeError::BadFamily(f)),
        };
        let port = u16::from_be_bytes(self.take(2)?.try_into().expect("2 bytes"));
        Ok(Some(SocketAddr::new(ip, port)))
    }
}

/// Entry for the fuzz target and the no-panic test: decoding never panics,
/// and whatever decodes encodes back to the same bytes.
pub fn fuzz_decode(data: &[u8]) -> bool {
    match Message::decode(data) {
        Ok(Some(m)) => {
            assert_eq!(m.encode(), data, "re-encoding {m:?}");
            true
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<Message> {
        let c = |k, wg: &str, check: &str| Candidate {
            kind: k,
            wg: wg.parse().unwrap(),
            check: check.parse().unwrap(),
        };
        vec![
            Message::Candidates {
                generation: 7,
                known: 3,
                list: vec![
                    c(Kind::Local, "10.1.0.2:51820", "10.1.0.2:51821"),
                    c(Kind::WgStun, "[2001:db8::1]:4000", "[2001:db8::1]:4001"),
                ],
            },
            Message::Candidates {
                generation: 0,
                known: 0,
                list: vec![],
            },
            Message::CheckPing { txid: u64::MAX },
            Message::CheckPong {
                txid: 1,
                observed: "198.51.100.3:61000".parse().unwrap(),
            },
            Message::Upgrade {
                id: 9,
                dial: Some("203.0.113.7:51820".parse().unwrap()),
                suggest: None,
            },
            Message::Downgrade { id: 9 },
            Message::Probe { txid: 3 },
            Message::ProbeReply { txid: 3 },
        ]
    }

    #[test]
    fn round_trips() {
        for m in samples() {
            let bytes = m.encode();
            assert_eq!(Message::decode(&bytes), Ok(Some(m.clone())));
            assert!(fuzz_decode(&bytes));
            // Every truncation is an error, never a panic or a shorter message.
            for n in 0..bytes.len() {
                assert!(Message::decode(&bytes[..n]).is_err(), "{m:?} cut at {n}");
            }
        }
    }

    #[test]
    fn bounds_and_unknown_types() {
        let mut big = vec![CANDIDATES];
        big.extend_from_slice(&1u64.to_be_bytes());
        big.extend_from_slice(&0u64.to_be_bytes());
        big.push(MAX_CANDIDATES as u8 + 1);
        assert_eq!(
            Message::decode(&big),
            Err(DecodeError::TooManyCandidates(MAX_CANDIDATES + 1))
        );
        assert_eq!(Message::decode(&[200, 1, 2, 3]), Ok(None));
        let mut extra = Message::Probe { txid: 1 }.encode();
        extra.push(0);
        assert_eq!(Message::decode(&extra), Err(DecodeError::TrailingBytes(1)));
        let too_many: Vec<Candidate> = (0..40)
            .map(|i| Candidate {
                kind: Kind::Local,
                wg: SocketAddr::from(([10, 0, 0, i], 1)),
                check: SocketAddr::from(([10, 0, 0, i], 2)),
            })
            .collect();
        let enc = Message::Candidates {
            generation: 1,
            known: 0,
            list: too_many,
        }
        .encode();
        match Message::decode(&enc) {
            Ok(Some(Message::Candidates { list, .. })) => assert_eq!(list.len(), MAX_CANDIDATES),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn random_input_never_panics() {
        let mut next = crate::testutil::xorshift(0x5eed);
        for _ in 0..20_000 {
            let len = (next() % 80) as usize;
            let mut data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if let Some(b) = data.first_mut() {
                *b = FIRST_TYPE + (*b % 8);
            }
            fuzz_decode(&data);
        }
    }
}
