//! PCP (RFC 6887), the MAP opcode for UDP only, sans IO.
//!
//! Wire format (integers big-endian; every address is 16 bytes, IPv4 as
//! IPv4-mapped IPv6 `::ffff:a.b.c.d`, decoded back to [`IpAddr::V4`]):
//!
//! ```text
//! request header   0 version (1) | 1 R=0 | opcode (1) | 2 reserved (2) | 4 lifetime (4)
//!                  | 8 client IP (16)                                              24 bytes
//! response header  0 version | 1 R=1 | opcode | 2 reserved (1) | 3 result (1) | 4 lifetime (4)
//!                  | 8 epoch (4) | 12 reserved (12)                                24 bytes
//! MAP body         24 nonce (12) | 36 protocol (1) | 37 reserved (3) | 40 internal port (2)
//!                  | 42 external port (2) | 44 external IP (16)                    36 bytes
//! option           code (1) | reserved (1) | length (2) | data, padded to 4
//! ```
//!
//! In a request the MAP body carries the suggested port and address; in a
//! response, the assigned ones. Options may follow the body; they are
//! checked for shape and skipped: warren sends none, and the MAP options
//! (RFC 6887 §13) come back only when the request carried them.
//!
//! Decoding a response, in order (RFC 6887 §8.3, §9):
//! - fewer than 4 bytes or more than 1100 is an error;
//! - version 0 is a NAT-PMP server: with result 1 (8 bytes at least) it is
//!   [`Response::UnsupportedVersion`] `{ server_version: 0 }`, whatever the op
//!   (≥ 128, or 0 as RFC 6886 printed before erratum 3618 and some servers
//!   still send); anything else from it is an error;
//! - otherwise the message is a PCP header: shorter than 24 bytes, not a
//!   multiple of 4 or with the R bit clear is an error; result 1
//!   (UNSUPP_VERSION) is `UnsupportedVersion` with the header's version, the
//!   one the server offers instead; any version but 2 is then an error;
//! - MAP with the full body is [`Response::Map`], error results included
//!   (the server copies the request's nonce and ports into them, so they can
//!   be matched); a header-only MAP error (exactly 24 bytes) is
//!   [`Response::Other`]; a success without its body, or a body cut short, is
//!   an error;
//! - a MAP response for any protocol but UDP is an error
//!   ([`DecodeError::NotUdp`]), not `Other`: we only map UDP, so it answers
//!   some other client and must not be taken for news about ours;
//! - any other opcode (ANNOUNCE from a server that restarted, PEER) is
//!   `Other`, its body unread.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub const SERVER_PORT: u16 = 5351;
pub const VERSION: u8 = 2;
pub const PROTOCOL_UDP: u8 = 17;
/// Longest PCP message; anything longer is invalid (RFC 6887 §7).
pub const MAX_MESSAGE_LEN: usize = 1100;

pub const OPCODE_ANNOUNCE: u8 = 0;
pub const OPCODE_MAP: u8 = 1;
const RESPONSE_BIT: u8 = 0x80;

// Result codes, RFC 6887 §7.4.
pub const SUCCESS: u8 = 0;
pub const UNSUPP_VERSION: u8 = 1;
pub const NOT_AUTHORIZED: u8 = 2;
pub const MALFORMED_REQUEST: u8 = 3;
pub const UNSUPP_OPCODE: u8 = 4;
pub const UNSUPP_OPTION: u8 = 5;
pub const MALFORMED_OPTION: u8 = 6;
pub const NETWORK_FAILURE: u8 = 7;
pub const NO_RESOURCES: u8 = 8;
pub const UNSUPP_PROTOCOL: u8 = 9;
pub const USER_EX_QUOTA: u8 = 10;
pub const CANNOT_PROVIDE_EXTERNAL: u8 = 11;
pub const ADDRESS_MISMATCH: u8 = 12;
pub const EXCESSIVE_REMOTE_PEERS: u8 = 13;

/// Anything shorter has no result code and is dropped (RFC 6887 §8.3).
const MIN_RESPONSE_LEN: usize = 4;
/// A NAT-PMP server's refusal: version, op, 16-bit result, epoch.
const NATPMP_REFUSAL_LEN: usize = 8;
const HEADER_LEN: usize = 24;
const MAP_LEN: usize = HEADER_LEN + 36;
const OPTION_HEADER_LEN: usize = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapRequest {
    /// Our own address toward the server: the server compares it with the
    /// packet's source to detect a NAT between us (RFC 6887 §8.1).
    pub client_ip: IpAddr,
    /// Ties responses to this mapping; keep it for the mapping's life so a
    /// renewal is recognised as the same mapping (RFC 6887 §11.1).
    pub nonce: [u8; 12],
    pub internal_port: u16,
    pub suggested_external_port: u16,
    /// None is sent as the all-zero address of `client_ip`'s family.
    pub suggested_external_ip: Option<IpAddr>,
    /// 0 deletes the mapping.
    pub lifetime_secs: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Response {
    /// An answer to a MAP request, `result` 0 or an error (never 1, which is
    /// `UnsupportedVersion`). On an error, `lifetime_secs` is how long the
    /// server expects the error to last.
    Map {
        result: u8,
        lifetime_secs: u32,
        epoch_secs: u32,
        nonce: [u8; 12],
        internal_port: u16,
        external_port: u16,
        external_ip: IpAddr,
    },
    /// The server speaks another version: a NAT-PMP box answers a PCP request with version 0, result 1 (RFC 6887 §9, RFC 6886 §3.5);
    /// a PCP server may answer version 2 with UNSUPP_VERSION (result 1).
    UnsupportedVersion { server_version: u8 },
    /// Any other opcode (ANNOUNCE = 0 from a server that restarted), or an error with a body too short for MAP.
    Other { opcode: u8, result: u8, epoch_secs: u32 },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DecodeError {
    Truncated,
    TooLong(usize),
    /// PCP messages are padded to a multiple of 4 bytes.
    NotPadded(usize),
    BadVersion(u8),
    /// R bit clear where a response was expected.
    NotResponse,
    /// R bit set where a request was expected.
    NotRequest,
    /// A request with an opcode other than MAP.
    NotMap(u8),
    /// A MAP for a protocol other than UDP: not one of ours.
    NotUdp(u8),
    /// The option at this offset runs past the end of the message.
    BadOption(usize),
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::Truncated => write!(f, "truncated PCP message"),
            DecodeError::TooLong(n) => write!(f, "{n}-byte PCP message exceeds {MAX_MESSAGE_LEN}"),
            DecodeError::NotPadded(n) => write!(f, "{n}-byte PCP message is not a multiple of 4"),
            DecodeError::BadVersion(v) => write!(f, "PCP message with version {v}"),
            DecodeError::NotResponse => write!(f, "PCP request where a response was expected"),
            DecodeError::NotRequest => write!(f, "PCP response where a request was expected"),
            DecodeError::NotMap(op) => write!(f, "PCP request with opcode {op}, not MAP"),
            DecodeError::NotUdp(p) => write!(f, "PCP MAP for protocol {p}, not UDP"),
            DecodeError::BadOption(at) => write!(f, "malformed PCP option at byte {at}"),
        }
    }
}

impl std::error::Error for DecodeError {}

impl MapRequest {
    /// 60 bytes, no options; the protocol is always UDP.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(MAP_LEN);
        out.extend_from_slice(&[VERSION, OPCODE_MAP, 0, 0]);
        out.extend_from_slice(&self.lifetime_secs.to_be_bytes());
        out.extend_from_slice(&ip_to_wire(self.client_ip));
        out.extend_from_slice(&self.nonce);
        out.extend_from_slice(&[PROTOCOL_UDP, 0, 0, 0]);
        out.extend_from_slice(&self.internal_port.to_be_bytes());
        out.extend_from_slice(&self.suggested_external_port.to_be_bytes());
        let unspecified = match self.client_ip {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        };
        out.extend_from_slice(&ip_to_wire(self.suggested_external_ip.unwrap_or(unspecified)));
        out
    }

    /// For tests and a lab responder. Both all-zero forms (`::` and
    /// `::ffff:0.0.0.0`) of the suggested address decode to None; options
    /// are checked and skipped.
    pub fn decode(bytes: &[u8]) -> Result<MapRequest, DecodeError> {
        if bytes.len() > MAX_MESSAGE_LEN {
            return Err(DecodeError::TooLong(bytes.len()));
        }
        if bytes.len() < MAP_LEN {
            return Err(DecodeError::Truncated);
        }
        if !bytes.len().is_multiple_of(4) {
            return Err(DecodeError::NotPadded(bytes.len()));
        }
        if bytes[0] != VERSION {
            return Err(DecodeError::BadVersion(bytes[0]));
        }
        if bytes[1] & RESPONSE_BIT != 0 {
            return Err(DecodeError::NotRequest);
        }
        if bytes[1] != OPCODE_MAP {
            return Err(DecodeError::NotMap(bytes[1]));
        }
        if bytes[36] != PROTOCOL_UDP {
            return Err(DecodeError::NotUdp(bytes[36]));
        }
        skip_options(bytes, MAP_LEN)?;
        let suggested = ip_from_wire(&bytes[44..60]);
        Ok(MapRequest {
            client_ip: ip_from_wire(&bytes[8..24]),
            nonce: bytes[24..36].try_into().expect("12 bytes"),
            internal_port: be16(bytes, 40),
            suggested_external_port: be16(bytes, 42),
            suggested_external_ip: (!suggested.is_unspecified()).then_some(suggested),
            lifetime_secs: be32(bytes, 4),
        })
    }
}

pub fn decode_response(bytes: &[u8]) -> Result<Response, DecodeError> {
    if bytes.len() < MIN_RESPONSE_LEN {
        return Err(DecodeError::Truncated);
    }
    if bytes.len() > MAX_MESSAGE_LEN {
        return Err(DecodeError::TooLong(bytes.len()));
    }
    let version = bytes[0];
    if version == 0 {
        return decode_natpmp_refusal(bytes);
    }
    if bytes.len() < HEADER_LEN {
        return Err(DecodeError::Truncated);
    }
    if !bytes.len().is_multiple_of(4) {
        return Err(DecodeError::NotPadded(bytes.len()));
    }
    if bytes[1] & RESPONSE_BIT == 0 {
        return Err(DecodeError::NotResponse);
    }
    let result = bytes[3];
    if result == UNSUPP_VERSION {
        return Ok(Response::UnsupportedVersion {
            server_version: version,
        });
    }
    if version != VERSION {
        return Err(DecodeError::BadVersion(version));
    }
    let opcode = bytes[1] & !RESPONSE_BIT;
    let epoch_secs = be32(bytes, 8);
    if opcode != OPCODE_MAP {
        return Ok(Response::Other {
            opcode,
            result,
            epoch_secs,
        });
    }
    if bytes.len() == HEADER_LEN && result != SUCCESS {
        return Ok(Response::Other {
            opcode,
            result,
            epoch_secs,
        });
    }
    if bytes.len() < MAP_LEN {
        return Err(DecodeError::Truncated);
    }
    if bytes[36] != PROTOCOL_UDP {
        return Err(DecodeError::NotUdp(bytes[36]));
    }
    skip_options(bytes, MAP_LEN)?;
    Ok(Response::Map {
        result,
        lifetime_secs: be32(bytes, 4),
        epoch_secs,
        nonce: bytes[24..36].try_into().expect("12 bytes"),
        internal_port: be16(bytes, 40),
        external_port: be16(bytes, 42),
        external_ip: ip_from_wire(&bytes[44..60]),
    })
}

/// Version 0: only a NAT-PMP server's "unsupported version" is meaningful.
fn decode_natpmp_refusal(bytes: &[u8]) -> Result<Response, DecodeError> {
    if bytes.len() < NATPMP_REFUSAL_LEN {
        return Err(DecodeError::Truncated);
    }
    let op = bytes[1];
    let response_op = op & RESPONSE_BIT != 0 || op == 0;
    if response_op && be16(bytes, 2) == u16::from(UNSUPP_VERSION) {
        Ok(Response::UnsupportedVersion { server_version: 0 })
    } else {
        Err(DecodeError::BadVersion(0))
    }
}

/// For tests, the fuzz round trip and a lab responder. `Map` is written
/// without options, `UnsupportedVersion { server_version: 0 }` as NAT-PMP's
/// 8-byte refusal (op 128, epoch 0), any other `UnsupportedVersion` and
/// `Other` as a bare 24-byte header (lifetime 0; a refusal's opcode MAP).
/// A value [`decode_response`] never returns (`Map` with result 1, `Other`
/// for MAP with result 0 or 1, an opcode above 127) does not come back as
/// itself.
pub fn encode_response(r: &Response) -> Vec<u8> {
    let mut out = Vec::with_capacity(MAP_LEN);
    match *r {
        Response::Map {
            result,
            lifetime_secs,
            epoch_secs,
            nonce,
            internal_port,
            external_port,
            external_ip,
        } => {
            put_response_header(&mut out, VERSION, OPCODE_MAP, result, lifetime_secs, epoch_secs);
            out.extend_from_slice(&nonce);
            out.extend_from_slice(&[PROTOCOL_UDP, 0, 0, 0]);
            out.extend_from_slice(&internal_port.to_be_bytes());
            out.extend_from_slice(&external_port.to_be_bytes());
            out.extend_from_slice(&ip_to_wire(external_ip));
        }
        Response::UnsupportedVersion { server_version: 0 } => {
            out.extend_from_slice(&[0, RESPONSE_BIT, 0, UNSUPP_VERSION]);
            out.extend_from_slice(&0u32.to_be_bytes());
        }
        Response::UnsupportedVersion { server_version } => {
            put_response_header(&mut out, server_version, OPCODE_MAP, UNSUPP_VERSION, 0, 0)
        }
        Response::Other {
            opcode,
            result,
            epoch_secs,
        } => put_response_header(&mut out, VERSION, opcode, result, 0, epoch_secs),
    }
    out
}

fn put_response_header(
    out: &mut Vec<u8>,
    version: u8,
    opcode: u8,
    result: u8,
    lifetime_secs: u32,
    epoch_secs: u32,
) {
    out.extend_from_slice(&[version, RESPONSE_BIT | opcode, 0, result]);
    out.extend_from_slice(&lifetime_secs.to_be_bytes());
    out.extend_from_slice(&epoch_secs.to_be_bytes());
    out.extend_from_slice(&[0; 12]);
}

/// The RFC 6887 §7.4 result codes in plain words, for logs.
pub fn result_text(code: u8) -> &'static str {
    match code {
        SUCCESS => "success",
        UNSUPP_VERSION => "unsupported version",
        NOT_AUTHORIZED => "not authorized",
        MALFORMED_REQUEST => "malformed request",
        UNSUPP_OPCODE => "unsupported opcode",
        UNSUPP_OPTION => "unsupported option",
        MALFORMED_OPTION => "malformed option",
        NETWORK_FAILURE => "network failure",
        NO_RESOURCES => "out of resources",
        UNSUPP_PROTOCOL => "unsupported protocol",
        USER_EX_QUOTA => "user exceeded quota",
        CANNOT_PROVIDE_EXTERNAL => "cannot provide the external address or port",
        ADDRESS_MISMATCH => "address mismatch",
        EXCESSIVE_REMOTE_PEERS => "excessive remote peers",
        _ => "unknown result code",
    }
}

/// Walks the options from `at` to the end. Each step consumes at least 4
/// bytes of a message already bounded by [`MAX_MESSAGE_LEN`], so the walk is
/// bounded too.
fn skip_options(bytes: &[u8], mut at: usize) -> Result<(), DecodeError> {
    while at < bytes.len() {
        if bytes.len() - at < OPTION_HEADER_LEN {
            return Err(DecodeError::BadOption(at));
        }
        let padded = (usize::from(be16(bytes, at + 2)) + 3) & !3;
        if bytes.len() - at - OPTION_HEADER_LEN < padded {
            return Err(DecodeError::BadOption(at));
        }
        at += OPTION_HEADER_LEN + padded;
    }
    Ok(())
}

fn ip_to_wire(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// `::ffff:a.b.c.d` comes back as IPv4; everything else, IPv4-compatible
/// `::a.b.c.d` included, stays IPv6.
fn ip_from_wire(b: &[u8]) -> IpAddr {
    let v6 = Ipv6Addr::from(<[u8; 16]>::try_from(b).expect("16 bytes"));
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

/// Callers have checked the length.
fn be16(bytes: &[u8], at: usize) -> u16 {
    u16::from_be_bytes(bytes[at..at + 2].try_into().expect("2 bytes"))
}

fn be32(bytes: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

/// The canonical encoding `r` must have if it was decoded from `data`: the
/// decoded prefix, with what decoding ignores (reserved bytes, and the fields
/// a variant does not keep) set to what [`encode_response`] writes.
fn canonical_response(r: &Response, data: &[u8]) -> Vec<u8> {
    let mut want = data[..encode_response(r).len()].to_vec();
    match r {
        Response::Map { .. } => {
            want[2] = 0;
            want[12..24].fill(0);
            want[37..40].fill(0);
        }
        Response::UnsupportedVersion { server_version: 0 } => {
            want[1] = RESPONSE_BIT;
            want[4..8].fill(0);
        }
        Response::UnsupportedVersion { .. } => {
            want[1] = RESPONSE_BIT | OPCODE_MAP;
            want[2] = 0;
            want[4..].fill(0);
        }
        Response::Other { .. } => {
            want[2] = 0;
            want[4..8].fill(0);
            want[12..24].fill(0);
        }
    }
    want
}

/// Entry for the fuzz target and the no-panic tests: the input is decoded as
/// a response and as a MAP request. Decoding never panics; whatever decodes
/// encodes to the input's canonical prefix and decodes back to itself. True
/// if either decoded.
pub fn fuzz_decode(data: &[u8]) -> bool {
    let response = decode_response(data).ok();
    if let Some(r) = response {
        let enc = encode_response(&r);
        assert_eq!(enc, canonical_response(&r, data), "re-encoding {r:?}");
        assert_eq!(decode_response(&enc), Ok(r));
    }
    let request = MapRequest::decode(data).ok();
    if let Some(r) = request {
        let enc = r.encode();
        let mut want = data[..MAP_LEN].to_vec();
        want[2..4].fill(0);
        want[37..40].fill(0);
        if r.suggested_external_ip.is_none() {
            want[44..60].copy_from_slice(&enc[44..60]);
        }
        assert_eq!(enc, want, "re-encoding {r:?}");
        assert_eq!(MapRequest::decode(&enc), Ok(r));
    }
    response.is_some() || request.is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    const NONCE: [u8; 12] = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12];

    fn v4(s: &str) -> IpAddr {
        IpAddr::V4(s.parse().unwrap())
    }

    fn v6(s: &str) -> IpAddr {
        IpAddr::V6(s.parse().unwrap())
    }

    fn requests() -> Vec<MapRequest> {
        let base = MapRequest {
            client_ip: v4("192.168.1.20"),
            nonce: NONCE,
            internal_port: 51820,
            suggested_external_port: 51820,
            suggested_external_ip: None,
            lifetime_secs: 7200,
        };
        vec![
            base,
            MapRequest {
                suggested_external_ip: Some(v4("203.0.113.7")),
                ..base
            },
            MapRequest {
                client_ip: v6("2001:db8::20"),
                suggested_external_ip: None,
                ..base
            },
            MapRequest {
                client_ip: v6("2001:db8::20"),
                suggested_external_ip: Some(v6("2001:db8::20")),
                ..base
            },
            MapRequest {
                suggested_external_port: 0,
                lifetime_secs: 0,
                ..base
            },
        ]
    }

    fn map(result: u8, external_ip: IpAddr) -> Response {
        Response::Map {
            result,
            lifetime_secs: 3600,
            epoch_secs: 77,
            nonce: NONCE,
            internal_port: 51820,
            external_port: 61000,
            external_ip,
        }
    }

    fn responses() -> Vec<Response> {
        vec![
            map(SUCCESS, v4("203.0.113.7")),
            map(SUCCESS, v6("2001:db8::20")),
            map(NO_RESOURCES, v4("0.0.0.0")),
            Response::UnsupportedVersion { server_version: 0 },
            Response::UnsupportedVersion { server_version: 2 },
            Response::UnsupportedVersion { server_version: 1 },
            Response::Other {
                opcode: OPCODE_ANNOUNCE,
                result: SUCCESS,
                epoch_secs: 0,
            },
            Response::Other {
                opcode: OPCODE_MAP,
                result: NOT_AUTHORIZED,
                epoch_secs: 5,
            },
        ]
    }

    /// A response header as RFC 6887 §7.2 draws it.
    fn header(version: u8, op: u8, result: u8, lifetime: u32, epoch: u32) -> Vec<u8> {
        let mut h = vec![version, op, 0, result];
        h.extend_from_slice(&lifetime.to_be_bytes());
        h.extend_from_slice(&epoch.to_be_bytes());
        h.extend_from_slice(&[0; 12]);
        h
    }

    /// Appends options as RFC 6887 §7.3 draws them.
    fn with_options(mut m: Vec<u8>, options: &[(u8, &[u8])]) -> Vec<u8> {
        for (code, data) in options {
            m.extend_from_slice(&[*code, 0]);
            m.extend_from_slice(&(data.len() as u16).to_be_bytes());
            m.extend_from_slice(data);
            m.resize(m.len().next_multiple_of(4), 0);
        }
        m
    }

    #[test]
    fn round_trips_and_truncations() {
        for r in requests() {
            let bytes = r.encode();
            assert_eq!(bytes.len(), 60);
            assert_eq!(MapRequest::decode(&bytes), Ok(r));
            assert!(fuzz_decode(&bytes));
            for n in 0..bytes.len() {
                assert!(MapRequest::decode(&bytes[..n]).is_err(), "{r:?} cut at {n}");
            }
        }
        for r in responses() {
            let bytes = encode_response(&r);
            assert_eq!(decode_response(&bytes), Ok(r));
            assert!(fuzz_decode(&bytes));
            for n in 0..bytes.len() {
                let cut = decode_response(&bytes[..n]);
                match r {
                    // The one exception, by design: a MAP error cut to its
                    // header is the header-only form of the same error.
                    Response::Map {
                        result, epoch_secs, ..
                    } if result != SUCCESS && n == HEADER_LEN => {
                        assert_eq!(
                            cut,
                            Ok(Response::Other {
                                opcode: OPCODE_MAP,
                                result,
                                epoch_secs
                            })
                        )
                    }
                    _ => assert!(cut.is_err(), "{r:?} cut at {n}: {cut:?}"),
                }
            }
        }
    }

    #[test]
    fn map_request_layout() {
        #[rustfmt::skip]
        let want = [
            2, 1, 0, 0,                                         // version, R=0 | MAP, reserved
            0, 0, 0x1c, 0x20,                                   // lifetime 7200
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 192, 168, 1, 20, // client ::ffff:192.168.1.20
            1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,              // nonce
            17, 0, 0, 0,                                        // UDP, reserved
            0xca, 0x6c,                                         // internal port 51820
            0xca, 0x6c,                                         // suggested external port
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0, 0, 0, 0, // ::ffff:0.0.0.0
        ];
        assert_eq!(requests()[0].encode(), want);
        assert_eq!(MapRequest::decode(&want), Ok(requests()[0]));
        let v6_none = requests()[2].encode();
        assert_eq!(v6_none[44..60], [0; 16], "IPv6 none is ::");
        let mut tcp = want;
        tcp[36] = 6;
        assert_eq!(MapRequest::decode(&tcp), Err(DecodeError::NotUdp(6)));
        let mut peer = want;
        peer[1] = 2;
        assert_eq!(MapRequest::decode(&peer), Err(DecodeError::NotMap(2)));
        let mut response = want;
        response[1] = 0x81;
        assert_eq!(MapRequest::decode(&response), Err(DecodeError::NotRequest));
    }

    #[test]
    fn map_response_layout() {
        let mut bytes = header(2, 0x81, 0, 3600, 77);
        bytes.extend_from_slice(&NONCE);
        bytes.extend_from_slice(&[17, 0, 0, 0, 0xca, 0x6c, 0xee, 0x48]);
        bytes.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 203, 0, 113, 7]);
        assert_eq!(bytes.len(), 60);
        assert_eq!(decode_response(&bytes), Ok(map(SUCCESS, v4("203.0.113.7"))));
        assert_eq!(encode_response(&map(SUCCESS, v4("203.0.113.7"))), bytes);
        // Reserved bytes are ignored on reception.
        let mut reserved = bytes.clone();
        reserved[2] = 0xff;
        reserved[12..24].fill(0xaa);
        reserved[37..40].fill(0x55);
        assert_eq!(decode_response(&reserved), Ok(map(SUCCESS, v4("203.0.113.7"))));
        assert!(fuzz_decode(&reserved));
        // Someone else's TCP mapping is not news about ours.
        let mut tcp = bytes.clone();
        tcp[36] = 6;
        assert_eq!(decode_response(&tcp), Err(DecodeError::NotUdp(6)));
        // R clear: a request, perhaps our own looped back.
        let mut request = bytes;
        request[1] = 1;
        assert_eq!(decode_response(&request), Err(DecodeError::NotResponse));
    }

    #[test]
    fn unsupported_version_in_both_forms() {
        let unsupported = Ok(Response::UnsupportedVersion { server_version: 0 });
        // NAT-PMP's 8-byte refusal (RFC 6886 §3.5 with erratum 3618).
        assert_eq!(decode_response(&[0, 128, 0, 1, 0, 0, 0x12, 0x34]), unsupported);
        assert_eq!(decode_response(&[0, 129, 0, 1, 0, 0, 0, 0]), unsupported);
        // As the RFC printed it before the erratum, with op 0.
        assert_eq!(decode_response(&[0, 0, 0, 1, 0, 0, 0, 0]), unsupported);
        // Sent at full length: the rest is ignored.
        assert_eq!(
            decode_response(&[0, 129, 0, 1, 0, 0, 0, 9, 0, 0, 0, 0]),
            unsupported
        );
        assert!(fuzz_decode(&[0, 129, 0, 1, 0, 0, 0, 9, 0, 0, 0, 0]));
        assert_eq!(
            encode_response(&Response::UnsupportedVersion { server_version: 0 }),
            [0, 128, 0, 1, 0, 0, 0, 0]
        );
        // Any other NAT-PMP answer is not PCP's business.
        assert_eq!(
            decode_response(&[0, 128, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4]),
            Err(DecodeError::BadVersion(0))
        );
        assert_eq!(
            decode_response(&[0, 129, 1, 1, 0, 0, 0, 0]),
            Err(DecodeError::BadVersion(0))
        );
        assert_eq!(
            decode_response(&[0, 5, 0, 1, 0, 0, 0, 0]),
            Err(DecodeError::BadVersion(0))
        );
        assert_eq!(
            decode_response(&[0, 128, 0, 1, 0, 0, 0]),
            Err(DecodeError::Truncated)
        );

        // A PCP header with UNSUPP_VERSION names the server's version.
        let v2 = header(2, 0x81, UNSUPP_VERSION, 0, 3);
        assert_eq!(
            decode_response(&v2),
            Ok(Response::UnsupportedVersion { server_version: 2 })
        );
        let v1 = header(1, 0x81, UNSUPP_VERSION, 0, 3);
        assert_eq!(
            decode_response(&v1),
            Ok(Response::UnsupportedVersion { server_version: 1 })
        );
        // Another version with anything but UNSUPP_VERSION is an error.
        let v3 = header(3, 0x81, SUCCESS, 0, 3);
        assert_eq!(decode_response(&v3), Err(DecodeError::BadVersion(3)));
    }

    #[test]
    fn other_opcodes_and_short_errors() {
        // ANNOUNCE from a server that lost its state.
        let announce = header(2, 0x80, SUCCESS, 0, 1);
        assert_eq!(
            decode_response(&announce),
            Ok(Response::Other {
                opcode: OPCODE_ANNOUNCE,
                result: SUCCESS,
                epoch_secs: 1
            })
        );
        // A header-only MAP refusal.
        let refused = header(2, 0x81, NOT_AUTHORIZED, 30, 9);
        assert_eq!(
            decode_response(&refused),
            Ok(Response::Other {
                opcode: OPCODE_MAP,
                result: NOT_AUTHORIZED,
                epoch_secs: 9
            })
        );
        assert!(fuzz_decode(&refused));
        // A header-only MAP success has lost its body.
        assert_eq!(
            decode_response(&header(2, 0x81, SUCCESS, 30, 9)),
            Err(DecodeError::Truncated)
        );
        // PEER: body unread, whatever its length.
        let mut peer = header(2, 0x82, SUCCESS, 30, 9);
        peer.extend_from_slice(&[0xee; 56]);
        assert!(matches!(
            decode_response(&peer),
            Ok(Response::Other { opcode: 2, .. })
        ));
        assert!(fuzz_decode(&peer));
    }

    #[test]
    fn ipv4_mapped_addresses() {
        let mut bytes = encode_response(&map(SUCCESS, v4("198.51.100.1")));
        assert_eq!(
            bytes[44..60],
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 198, 51, 100, 1]
        );
        // IPv4-compatible (deprecated) is not IPv4-mapped: it stays IPv6.
        bytes[44..60].copy_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 198, 51, 100, 1]);
        assert!(matches!(
            decode_response(&bytes),
            Ok(Response::Map {
                external_ip: IpAddr::V6(_),
                ..
            })
        ));
        // An IPv6 value that is IPv4-mapped comes back as IPv4.
        let mapped = v6("::ffff:198.51.100.1");
        let bytes = encode_response(&map(SUCCESS, mapped));
        assert_eq!(decode_response(&bytes), Ok(map(SUCCESS, v4("198.51.100.1"))));
        // Both all-zero forms of the suggested address mean none.
        let mut req = requests()[0].encode();
        assert_eq!(MapRequest::decode(&req).unwrap().suggested_external_ip, None);
        req[44..60].fill(0);
        assert_eq!(MapRequest::decode(&req).unwrap().suggested_external_ip, None);
        assert!(fuzz_decode(&req));
        assert_eq!(MapRequest::decode(&req).unwrap().client_ip, v4("192.168.1.20"));
        let v6_req = requests()[3].encode();
        assert_eq!(MapRequest::decode(&v6_req).unwrap().client_ip, v6("2001:db8::20"));
    }

    #[test]
    fn options_are_skipped() {
        let plain = encode_response(&map(SUCCESS, v4("203.0.113.7")));
        let one = with_options(plain.clone(), &[(1, &[0xab; 16])]);
        assert_eq!(one.len(), 60 + 20);
        assert_eq!(decode_response(&one), Ok(map(SUCCESS, v4("203.0.113.7"))));
        // Empty (PREFER_FAILURE), odd-length (padded) and several in a row.
        let many = with_options(
            plain.clone(),
            &[(2, &[]), (3, &[1; 5]), (0x80, &[7; 3]), (0xff, &[0; 20])],
        );
        assert_eq!(decode_response(&many), Ok(map(SUCCESS, v4("203.0.113.7"))));
        assert!(fuzz_decode(&many));
        let req = with_options(requests()[0].encode(), &[(2, &[]), (1, &[9; 16])]);
        assert_eq!(MapRequest::decode(&req), Ok(requests()[0]));
        assert!(fuzz_decode(&req));

        // Malformed: a length past the end, a header cut short.
        let mut over = one.clone();
        over[62..64].copy_from_slice(&17u16.to_be_bytes());
        assert_eq!(decode_response(&over), Err(DecodeError::BadOption(60)));
        let mut unpadded = plain.clone();
        unpadded.extend_from_slice(&[1, 0, 0, 5, 1, 2, 3, 4, 5, 0, 0]);
        assert_eq!(decode_response(&unpadded), Err(DecodeError::NotPadded(71)));
        unpadded.truncate(68);
        assert_eq!(decode_response(&unpadded), Err(DecodeError::BadOption(60)));
        let mut second_bad = with_options(plain.clone(), &[(2, &[])]);
        second_bad.extend_from_slice(&[3, 0, 0xff, 0xff]);
        assert_eq!(decode_response(&second_bad), Err(DecodeError::BadOption(64)));
        let mut req_bad = requests()[0].encode();
        req_bad.extend_from_slice(&[1, 0, 0, 4]);
        assert_eq!(MapRequest::decode(&req_bad), Err(DecodeError::BadOption(60)));
    }

    #[test]
    fn length_limits() {
        let plain = encode_response(&map(SUCCESS, v4("203.0.113.7")));
        // Exactly the maximum, filled with options, is fine; 4 more is not.
        let mut max = plain.clone();
        while max.len() < MAX_MESSAGE_LEN {
            max = with_options(max, &[(0x80, &[0; 4])]);
        }
        assert_eq!(max.len(), MAX_MESSAGE_LEN);
        assert!(decode_response(&max).is_ok());
        let too_long = with_options(max, &[(0x80, &[])]);
        assert_eq!(
            decode_response(&too_long),
            Err(DecodeError::TooLong(MAX_MESSAGE_LEN + 4))
        );
        let mut big_request = requests()[0].encode();
        big_request.resize(MAX_MESSAGE_LEN + 4, 0);
        assert_eq!(
            MapRequest::decode(&big_request),
            Err(DecodeError::TooLong(MAX_MESSAGE_LEN + 4))
        );
        // Not a multiple of 4.
        let mut odd = plain;
        odd.push(0);
        assert_eq!(decode_response(&odd), Err(DecodeError::NotPadded(61)));
        assert_eq!(decode_response(&[2, 0x81, 0]), Err(DecodeError::Truncated));
    }

    #[test]
    fn result_texts() {
        assert_eq!(result_text(SUCCESS), "success");
        assert_eq!(result_text(UNSUPP_VERSION), "unsupported version");
        assert_eq!(result_text(NO_RESOURCES), "out of resources");
        assert_eq!(result_text(EXCESSIVE_REMOTE_PEERS), "excessive remote peers");
        assert_eq!(result_text(14), "unknown result code");
        for code in 0..=EXCESSIVE_REMOTE_PEERS {
            assert_ne!(result_text(code), "unknown result code", "{code}");
        }
    }

    #[test]
    fn random_and_mutated_input_never_panics() {
        let mut next = crate::testutil::xorshift(0x6887);
        for _ in 0..5_000 {
            let len = 4 * (next() % 20) as usize;
            let mut data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            // Mostly plausible headers, so decoding gets past the first checks.
            if len >= 4 && !next().is_multiple_of(4) {
                data[0] = [0, 2, 2, 2][(next() % 4) as usize];
                data[1] = [0, 1, 0x80, 0x81, 0x82][(next() % 5) as usize];
                data[3] = (next() % 4) as u8;
            }
            fuzz_decode(&data);
        }
        let seeds: Vec<Vec<u8>> = requests()
            .iter()
            .map(MapRequest::encode)
            .chain(responses().iter().map(encode_response))
            .chain([with_options(
                encode_response(&map(SUCCESS, v4("203.0.113.7"))),
                &[(2, &[]), (3, &[1; 5])],
            )])
            .collect();
        let decoded = crate::testutil::mutated_accepted(&seeds, 500, &mut next, fuzz_decode);
        // The mutations must reach the success paths, not only the errors.
        assert!(decoded > 1_000, "only {decoded} mutated inputs decoded");
    }
}
