//! NAT-PMP (RFC 6886): the external address and UDP mappings, sans IO.
//!
//! Wire format (integers big-endian, version 0 throughout; a response's op
//! is 128 + the request's op):
//!
//! ```text
//! op 0   request   version (1) | op (1)
//! op 1   request   version | op | reserved (2) | internal port (2)
//!                  | suggested external port (2) | lifetime (4)
//! op 128 response  version | op | result (2) | epoch (4) | external IPv4 (4)
//! op 129 response  version | op | result (2) | epoch (4) | internal port (2)
//!                  | external port (2) | lifetime (4)
//! error  response  version | op | result (2) | epoch (4)     result non-zero
//! ```
//!
//! An error response is decoded from its first 8 bytes: a server refusing an
//! unsupported version sends only those (RFC 6886 §3.5), others send the full
//! length with the rest zeroed, and the rest means nothing either way.
//!
//! Bytes after a message's defined length are ignored, in requests and in
//! responses. The RFC fixes every length but says nothing of extra bytes;
//! every field sits at a fixed offset, so padding cannot change what a
//! message means, and refusing it would only lose a mapping to a sloppy
//! router. [`fuzz_decode`] checks the canonical prefix.
//!
//! Op 2 maps TCP, which warren never asks for: a successful op 2 request or
//! op 130 response decodes to [`DecodeError::TcpMapping`], never to a UDP
//! mapping. A refusal of op 2 is still a [`Response::Error`] with `op: 2`.

use std::net::Ipv4Addr;

pub const SERVER_PORT: u16 = 5351;
pub const VERSION: u8 = 0;

pub const OP_EXTERNAL_ADDRESS: u8 = 0;
pub const OP_MAP_UDP: u8 = 1;
pub const OP_MAP_TCP: u8 = 2;
/// Set on every response's op.
pub const RESPONSE_BIT: u8 = 0x80;

pub const RESULT_SUCCESS: u16 = 0;
pub const RESULT_UNSUPPORTED_VERSION: u16 = 1;
pub const RESULT_NOT_AUTHORIZED: u16 = 2;
pub const RESULT_NETWORK_FAILURE: u16 = 3;
pub const RESULT_OUT_OF_RESOURCES: u16 = 4;
pub const RESULT_UNSUPPORTED_OPCODE: u16 = 5;

const EXTERNAL_ADDRESS_REQUEST_LEN: usize = 2;
const MAP_REQUEST_LEN: usize = 12;
/// Version, op, result and epoch: all an error response is sure to carry.
const RESPONSE_HEADER_LEN: usize = 8;
const EXTERNAL_ADDRESS_RESPONSE_LEN: usize = 12;
const MAP_RESPONSE_LEN: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    ExternalAddress,
    /// Lifetime 0 with suggested port 0 deletes the mapping of `internal_port`.
    MapUdp {
        internal_port: u16,
        suggested_external_port: u16,
        lifetime_secs: u32,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Response {
    ExternalAddress {
        epoch_secs: u32,
        ip: Ipv4Addr,
    },
    MapUdp {
        epoch_secs: u32,
        internal_port: u16,
        external_port: u16,
        lifetime_secs: u32,
    },
    /// A non-zero result code for request op `op` (0, 1 or 2).
    Error {
        op: u8,
        result: u16,
        epoch_secs: u32,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DecodeError {
    Truncated,
    /// Not NAT-PMP's version 0. A PCP-only server refuses our request with
    /// its own version (2) here.
    BadVersion(u8),
    /// An op below 128 where a response was expected: a request, perhaps our
    /// own looped back.
    NotResponse(u8),
    UnknownOp(u8),
    /// Op 2 or 130: a TCP mapping, which is not ours.
    TcpMapping,
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::Truncated => write!(f, "truncated NAT-PMP message"),
            DecodeError::BadVersion(v) => write!(f, "NAT-PMP message with version {v}"),
            DecodeError::NotResponse(op) => write!(f, "NAT-PMP op {op} is not a response"),
            DecodeError::UnknownOp(op) => write!(f, "unknown NAT-PMP op {op}"),
            DecodeError::TcpMapping => write!(f, "NAT-PMP TCP mapping"),
        }
    }
}

impl std::error::Error for DecodeError {}

impl Request {
    pub fn encode(&self) -> Vec<u8> {
        match *self {
            Request::ExternalAddress => vec![VERSION, OP_EXTERNAL_ADDRESS],
            Request::MapUdp {
                internal_port,
                suggested_external_port,
                lifetime_secs,
            } => {
                let mut out = Vec::with_capacity(MAP_REQUEST_LEN);
                out.extend_from_slice(&[VERSION, OP_MAP_UDP, 0, 0]);
                out.extend_from_slice(&internal_port.to_be_bytes());
                out.extend_from_slice(&suggested_external_port.to_be_bytes());
                out.extend_from_slice(&lifetime_secs.to_be_bytes());
                out
            }
        }
    }

    /// For tests and a lab responder; the agent only sends requests.
    pub fn decode(bytes: &[u8]) -> Result<Request, DecodeError> {
        if bytes.len() < EXTERNAL_ADDRESS_REQUEST_LEN {
            return Err(DecodeError::Truncated);
        }
        if bytes[0] != VERSION {
            return Err(DecodeError::BadVersion(bytes[0]));
        }
        match bytes[1] {
            OP_EXTERNAL_ADDRESS => Ok(Request::ExternalAddress),
            OP_MAP_UDP | OP_MAP_TCP if bytes.len() < MAP_REQUEST_LEN => Err(DecodeError::Truncated),
            // Bytes 2..4 are reserved: ignored on reception (RFC 6886 §3.3).
            OP_MAP_UDP => Ok(Request::MapUdp {
                internal_port: be16(bytes, 4),
                suggested_external_port: be16(bytes, 6),
                lifetime_secs: be32(bytes, 8),
            }),
            OP_MAP_TCP => Err(DecodeError::TcpMapping),
            op => Err(DecodeError::UnknownOp(op)),
        }
    }
}

impl Response {
    /// For tests and a lab responder. An `Error` is written in its short
    /// 8-byte form; one with result 0 or an op above 2 is not a value
    /// [`Response::decode`] returns and does not come back as itself.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(MAP_RESPONSE_LEN);
        let mut header = |op: u8, result: u16, epoch_secs: u32| {
            out.extend_from_slice(&[VERSION, RESPONSE_BIT | op]);
            out.extend_from_slice(&result.to_be_bytes());
            out.extend_from_slice(&epoch_secs.to_be_bytes());
        };
        match *self {
            Response::ExternalAddress { epoch_secs, ip } => {
                header(OP_EXTERNAL_ADDRESS, RESULT_SUCCESS, epoch_secs);
                out.extend_from_slice(&ip.octets());
            }
            Response::MapUdp {
                epoch_secs,
                internal_port,
                external_port,
                lifetime_secs,
            } => {
                header(OP_MAP_UDP, RESULT_SUCCESS, epoch_secs);
                out.extend_from_slice(&internal_port.to_be_bytes());
                out.extend_from_slice(&external_port.to_be_bytes());
                out.extend_from_slice(&lifetime_secs.to_be_bytes());
            }
            Response::Error {
                op,
                result,
                epoch_secs,
            } => header(op, result, epoch_secs),
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Response, DecodeError> {
        if bytes.len() < RESPONSE_HEADER_LEN {
            return Err(DecodeError::Truncated);
        }
        if bytes[0] != VERSION {
            return Err(DecodeError::BadVersion(bytes[0]));
        }
        let op = bytes[1];
        if op & RESPONSE_BIT == 0 {
            return Err(DecodeError::NotResponse(op));
        }
        let request_op = op & !RESPONSE_BIT;
        let result = be16(bytes, 2);
        let epoch_secs = be32(bytes, 4);
        if result != RESULT_SUCCESS {
            return match request_op {
                OP_EXTERNAL_ADDRESS | OP_MAP_UDP | OP_MAP_TCP => Ok(Response::Error {
                    op: request_op,
                    result,
                    epoch_secs,
                }),
                _ => Err(DecodeError::UnknownOp(op)),
            };
        }
        match request_op {
            OP_EXTERNAL_ADDRESS if bytes.len() < EXTERNAL_ADDRESS_RESPONSE_LEN => Err(DecodeError::Truncated),
            OP_EXTERNAL_ADDRESS => Ok(Response::ExternalAddress {
                epoch_secs,
                ip: Ipv4Addr::from(be32(bytes, 8)),
            }),
            OP_MAP_UDP if bytes.len() < MAP_RESPONSE_LEN => Err(DecodeError::Truncated),
            OP_MAP_UDP => Ok(Response::MapUdp {
                epoch_secs,
                internal_port: be16(bytes, 8),
                external_port: be16(bytes, 10),
                lifetime_secs: be32(bytes, 12),
            }),
            OP_MAP_TCP => Err(DecodeError::TcpMapping),
            _ => Err(DecodeError::UnknownOp(op)),
        }
    }
}

/// The RFC 6886 §3.5 meaning of a result code, for logs.
pub fn result_text(code: u16) -> &'static str {
    match code {
        RESULT_SUCCESS => "success",
        RESULT_UNSUPPORTED_VERSION => "unsupported version",
        RESULT_NOT_AUTHORIZED => "not authorized or refused",
        RESULT_NETWORK_FAILURE => "network failure",
        RESULT_OUT_OF_RESOURCES => "out of resources",
        RESULT_UNSUPPORTED_OPCODE => "unsupported opcode",
        _ => "unknown result code",
    }
}

/// Callers have checked the length.
fn be16(bytes: &[u8], at: usize) -> u16 {
    u16::from_be_bytes(bytes[at..at + 2].try_into().expect("2 bytes"))
}

fn be32(bytes: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

/// Entry for the fuzz target and the no-panic tests: the input is decoded
/// both as a request and as a response. Decoding never panics; whatever
/// decodes encodes to the input's prefix (reserved bytes aside) and decodes
/// back to itself. True if either decoded.
pub fn fuzz_decode(data: &[u8]) -> bool {
    let request = Request::decode(data).ok();
    if let Some(r) = request {
        let enc = r.encode();
        let mut want = data[..enc.len()].to_vec();
        if let Request::MapUdp { .. } = r {
            want[2..4].fill(0);
        }
        assert_eq!(enc, want, "re-encoding {r:?}");
        assert_eq!(Request::decode(&enc), Ok(r));
    }
    let response = Response::decode(data).ok();
    if let Some(r) = response {
        let enc = r.encode();
        assert_eq!(enc, data[..enc.len()], "re-encoding {r:?}");
        assert_eq!(Response::decode(&enc), Ok(r));
    }
    request.is_some() || response.is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn requests() -> Vec<Request> {
        vec![
            Request::ExternalAddress,
            Request::MapUdp {
                internal_port: 51820,
                suggested_external_port: 51820,
                lifetime_secs: 7200,
            },
            Request::MapUdp {
                internal_port: 51820,
                suggested_external_port: 0,
                lifetime_secs: 0,
            },
        ]
    }

    fn responses() -> Vec<Response> {
        vec![
            Response::ExternalAddress {
                epoch_secs: 1234,
                ip: Ipv4Addr::new(203, 0, 113, 7),
            },
            Response::MapUdp {
                epoch_secs: u32::MAX,
                internal_port: 51820,
                external_port: 61000,
                lifetime_secs: 3600,
            },
            Response::Error {
                op: OP_EXTERNAL_ADDRESS,
                result: RESULT_NETWORK_FAILURE,
                epoch_secs: 9,
            },
            Response::Error {
                op: OP_MAP_UDP,
                result: RESULT_OUT_OF_RESOURCES,
                epoch_secs: 10,
            },
            Response::Error {
                op: OP_MAP_TCP,
                result: RESULT_NOT_AUTHORIZED,
                epoch_secs: 11,
            },
        ]
    }

    #[test]
    fn round_trips_and_truncations() {
        for r in requests() {
            let bytes = r.encode();
            assert_eq!(Request::decode(&bytes), Ok(r));
            assert!(fuzz_decode(&bytes));
            for n in 0..bytes.len() {
                assert_eq!(
                    Request::decode(&bytes[..n]),
                    Err(DecodeError::Truncated),
                    "{r:?} cut at {n}"
                );
            }
        }
        for r in responses() {
            let bytes = r.encode();
            assert_eq!(Response::decode(&bytes), Ok(r));
            assert!(fuzz_decode(&bytes));
            for n in 0..bytes.len() {
                assert_eq!(
                    Response::decode(&bytes[..n]),
                    Err(DecodeError::Truncated),
                    "{r:?} cut at {n}"
                );
            }
        }
    }

    #[test]
    fn request_layout() {
        assert_eq!(Request::ExternalAddress.encode(), [0, 0]);
        let map = [
            0, 1, // version, op
            0, 0, // reserved
            0xca, 0x6c, // internal port 51820
            0x04, 0xd2, // suggested external port 1234
            0x00, 0x00, 0x1c, 0x20, // lifetime 7200
        ];
        let r = Request::MapUdp {
            internal_port: 51820,
            suggested_external_port: 1234,
            lifetime_secs: 7200,
        };
        assert_eq!(r.encode(), map);
        assert_eq!(Request::decode(&map), Ok(r));
        // Reserved bits are ignored on reception.
        let mut reserved = map;
        reserved[2] = 0xff;
        assert_eq!(Request::decode(&reserved), Ok(r));
        let mut tcp = map;
        tcp[1] = OP_MAP_TCP;
        assert_eq!(Request::decode(&tcp), Err(DecodeError::TcpMapping));
        assert_eq!(Request::decode(&[1, 0]), Err(DecodeError::BadVersion(1)));
        assert_eq!(Request::decode(&[0, 3]), Err(DecodeError::UnknownOp(3)));
        assert_eq!(Request::decode(&[0, 128]), Err(DecodeError::UnknownOp(128)));
    }

    #[test]
    fn response_layout() {
        let external = [
            0, 128, // version, op
            0, 0, // result
            0, 0, 0x30, 0x39, // epoch 12345
            198, 51, 100, 9, // external address
        ];
        assert_eq!(
            Response::decode(&external),
            Ok(Response::ExternalAddress {
                epoch_secs: 12345,
                ip: Ipv4Addr::new(198, 51, 100, 9),
            })
        );
        let map = [
            0, 129, // version, op
            0, 0, // result
            0, 1, 0, 0, // epoch 65536
            0xca, 0x6c, // internal port 51820
            0xee, 0x48, // external port 61000
            0, 0, 0x0e, 0x10, // lifetime 3600
        ];
        let r = Response::MapUdp {
            epoch_secs: 65536,
            internal_port: 51820,
            external_port: 61000,
            lifetime_secs: 3600,
        };
        assert_eq!(Response::decode(&map), Ok(r));
        assert_eq!(r.encode(), map);
        // A TCP mapping answer is never taken for ours.
        let mut tcp = map;
        tcp[1] = 130;
        assert_eq!(Response::decode(&tcp), Err(DecodeError::TcpMapping));
    }

    #[test]
    fn error_responses_short_and_full() {
        // The 8-byte refusal a server sends to a version it does not speak.
        let short = [0, 128, 0, 1, 0, 0, 0, 42];
        let want = Response::Error {
            op: 0,
            result: RESULT_UNSUPPORTED_VERSION,
            epoch_secs: 42,
        };
        assert_eq!(Response::decode(&short), Ok(want));
        assert_eq!(want.encode(), short);
        // A full-length refusal of a mapping; the zeroed fields mean nothing.
        let full = [0, 129, 0, 2, 0, 0, 1, 0, 0xca, 0x6c, 0, 0, 0, 0, 0, 0];
        assert_eq!(
            Response::decode(&full),
            Ok(Response::Error {
                op: OP_MAP_UDP,
                result: RESULT_NOT_AUTHORIZED,
                epoch_secs: 256,
            })
        );
        assert!(fuzz_decode(&full));
        // Only ops 0-2 have errors; result code is the whole 16 bits.
        assert_eq!(
            Response::decode(&[0, 131, 0, 5, 0, 0, 0, 0]),
            Err(DecodeError::UnknownOp(131))
        );
        assert!(matches!(
            Response::decode(&[0, 129, 1, 0, 0, 0, 0, 0]),
            Ok(Response::Error { result: 256, .. })
        ));
    }

    #[test]
    fn trailing_bytes_are_ignored() {
        for r in responses() {
            let mut bytes = r.encode();
            bytes.extend_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
            assert_eq!(Response::decode(&bytes), Ok(r));
            assert!(fuzz_decode(&bytes));
        }
        for r in requests() {
            let mut bytes = r.encode();
            bytes.push(7);
            assert_eq!(Request::decode(&bytes), Ok(r));
        }
    }

    #[test]
    fn not_a_response() {
        let request = Request::MapUdp {
            internal_port: 1,
            suggested_external_port: 1,
            lifetime_secs: 1,
        }
        .encode();
        assert_eq!(Response::decode(&request), Err(DecodeError::NotResponse(1)));
        // A PCP server's UNSUPP_VERSION header to our version 0 request.
        let mut pcp = [0u8; 24];
        pcp[..4].copy_from_slice(&[2, 0x80, 0, 1]);
        assert_eq!(Response::decode(&pcp), Err(DecodeError::BadVersion(2)));
    }

    #[test]
    fn result_texts() {
        assert_eq!(result_text(RESULT_UNSUPPORTED_VERSION), "unsupported version");
        assert_eq!(result_text(RESULT_NOT_AUTHORIZED), "not authorized or refused");
        assert_eq!(result_text(RESULT_NETWORK_FAILURE), "network failure");
        assert_eq!(result_text(RESULT_OUT_OF_RESOURCES), "out of resources");
        assert_eq!(result_text(RESULT_UNSUPPORTED_OPCODE), "unsupported opcode");
        assert_eq!(result_text(6), "unknown result code");
        assert_eq!(result_text(u16::MAX), "unknown result code");
    }

    #[test]
    fn random_and_mutated_input_never_panics() {
        let mut next = crate::testutil::xorshift(0x6886);
        for _ in 0..5_000 {
            let len = (next() % 24) as usize;
            let mut data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            // Mostly version 0 and a known op, so decoding gets past the first checks.
            if len >= 2 && !next().is_multiple_of(4) {
                data[0] = VERSION;
                data[1] = [0, 1, 2, 3, 128, 129, 130, 131][(next() % 8) as usize];
            }
            fuzz_decode(&data);
        }
        let seeds: Vec<Vec<u8>> = requests()
            .iter()
            .map(Request::encode)
            .chain(responses().iter().map(Response::encode))
            .collect();
        let decoded = crate::testutil::mutated_accepted(&seeds, 1_000, &mut next, fuzz_decode);
        // The mutations must reach the success paths, not only the errors.
        assert!(decoded > 1_000, "only {decoded} mutated inputs decoded");
    }
}
