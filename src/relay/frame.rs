//! Relay protocol frames. Each frame is one message of the Noise channel
//! (`control::channel` with the relay prologue), so the framing here only
//! names the message and its fields:
//!
//! ```text
//! version (1) | type (1) | body
//!   SendTo      1  key (32) | payload      client → relay: deliver payload to key
//!   RecvFrom    2  key (32) | payload      relay → client: payload from key (proven by its handshake)
//!   PeerPresent 3  key (32)                relay → client: key is connected here
//!   PeerGone    4  key (32)                relay → client: key is not connected here
//!   KeepAlive   5  (empty)                 either way
//! ```

use std::fmt;

use crate::keys::{KEY_LEN, Key};

pub const RELAY_VERSION: u8 = 1;
/// Largest encoded frame: a WireGuard datagram or a sealed peer message fits with room to spare.
pub const MAX_FRAME_LEN: usize = 64 * 1024;
const HEADER_LEN: usize = 2;
pub const MAX_PAYLOAD_LEN: usize = MAX_FRAME_LEN - HEADER_LEN - KEY_LEN;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RelayFrame {
    SendTo { key: Key, payload: Vec<u8> },
    RecvFrom { key: Key, payload: Vec<u8> },
    PeerPresent { key: Key },
    PeerGone { key: Key },
    KeepAlive,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RelayFrameError {
    Empty,
    Version(u8),
    Type(u8),
    TooLong(usize),
    /// The body does not have the length its type requires.
    Length {
        kind: &'static str,
        len: usize,
    },
}

impl fmt::Display for RelayFrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RelayFrameError::Empty => write!(f, "relay frame is empty"),
            RelayFrameError::Version(v) => {
                write!(
                    f,
                    "unsupported relay frame version {v} (expected {RELAY_VERSION})"
                )
            }
            RelayFrameError::Type(t) => write!(f, "unknown relay frame type {t}"),
            RelayFrameError::TooLong(n) => write!(f, "relay frame of {n} bytes exceeds {MAX_FRAME_LEN}"),
            RelayFrameError::Length { kind, len } => write!(f, "{kind} frame with a body of {len} bytes"),
        }
    }
}

impl std::error::Error for RelayFrameError {}

impl RelayFrame {
    fn type_byte(&self) -> u8 {
        match self {
            RelayFrame::SendTo { .. } => 1,
            RelayFrame::RecvFrom { .. } => 2,
            RelayFrame::PeerPresent { .. } => 3,
            RelayFrame::PeerGone { .. } => 4,
            RelayFrame::KeepAlive => 5,
        }
    }

    /// Encoded length, to check a payload before building the frame.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN
            + match self {
                RelayFrame::SendTo { payload, .. } | RelayFrame::RecvFrom { payload, .. } => {
                    KEY_LEN + payload.len()
                }
                RelayFrame::PeerPresent { .. } | RelayFrame::PeerGone { .. } => KEY_LEN,
                RelayFrame::KeepAlive => 0,
            }
    }

    /// Encodes the frame; a payload over [`MAX_PAYLOAD_LEN`] is the caller's error, not the network's.
    pub fn encode(&self) -> Result<Vec<u8>, RelayFrameError> {
        let len = self.encoded_len();
        if len > MAX_FRAME_LEN {
            return Err(RelayFrameError::TooLong(len));
        }
        let mut out = Vec::with_capacity(len);
        out.push(RELAY_VERSION);
        out.push(self.type_byte());
        match self {
            RelayFrame::SendTo { key, payload } | RelayFrame::RecvFrom { key, payload } => {
                out.extend_from_slice(&key.0);
                out.extend_from_slice(payload);
            }
            RelayFrame::PeerPresent { key } | RelayFrame::PeerGone { key } => out.extend_from_slice(&key.0),
            RelayFrame::KeepAlive => {}
        }
        Ok(out)
    }

    pub fn decode(bytes: &[u8]) -> Result<RelayFrame, RelayFrameError> {
        if bytes.len() > MAX_FRAME_LEN {
            return Err(RelayFrameError::TooLong(bytes.len()));
        }
        let (&version, rest) = bytes.split_first().ok_or(RelayFrameError::Empty)?;
        if version != RELAY_VERSION {
            return Err(RelayFrameError::Version(version));
        }
        let (&kind, body) = rest.split_first().ok_or(RelayFrameError::Type(0))?;
        let key_of = |kind: &'static str, exact: bool| -> Result<Key, RelayFrameError> {
            if body.len() < KEY_LEN || (exact && body.len() != KEY_LEN) {
                return Err(RelayFrameError::Length {
                    kind,
                    len: body.len(),
                });
            }
            Ok(Key(body[..KEY_LEN].try_into().expect("KEY_LEN bytes")))
        };
        Ok(match kind {
            1 => RelayFrame::SendTo {
                key: key_of("send-to", false)?,
                payload: body[KEY_LEN..].to_vec(),
            },
            2 => RelayFrame::RecvFrom {
                key: key_of("recv-from", false)?,
                payload: body[KEY_LEN..].to_vec(),
            },
            3 => RelayFrame::PeerPresent {
                key: key_of("peer-present", true)?,
            },
            4 => RelayFrame::PeerGone {
                key: key_of("peer-gone", true)?,
            },
            5 if body.is_empty() => RelayFrame::KeepAlive,
            5 => {
                return Err(RelayFrameError::Length {
                    kind: "keepalive",
                    len: body.len(),
                });
            }
            t => return Err(RelayFrameError::Type(t)),
        })
    }
}

/// Decodes arbitrary bytes and checks that what decodes re-encodes to the
/// same bytes; the fuzz target and the no-panic test share it.
pub fn fuzz_decode(data: &[u8]) {
    if let Ok(frame) = RelayFrame::decode(data) {
        assert_eq!(frame.encode().as_deref(), Ok(data), "decode/encode round trip");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(b: u8) -> Key {
        Key([b; 32])
    }

    #[test]
    fn every_frame_round_trips() {
        let frames = [
            RelayFrame::SendTo {
                key: k(1),
                payload: b"wg datagram".to_vec(),
            },
            RelayFrame::SendTo {
                key: k(1),
                payload: vec![],
            },
            RelayFrame::RecvFrom {
                key: k(2),
                payload: vec![9; MAX_PAYLOAD_LEN],
            },
            RelayFrame::PeerPresent { key: k(3) },
            RelayFrame::PeerGone { key: k(4) },
            RelayFrame::KeepAlive,
        ];
        for f in frames {
            let bytes = f.encode().unwrap();
            assert!(bytes.len() <= MAX_FRAME_LEN);
            assert_eq!(RelayFrame::decode(&bytes).unwrap(), f);
        }
    }

    #[test]
    fn exact_bytes() {
        let f = RelayFrame::SendTo {
            key: k(0xab),
            payload: b"hi".to_vec(),
        };
        let mut want = vec![1, 1];
        want.extend([0xab; 32]);
        want.extend(b"hi");
        assert_eq!(f.encode().unwrap(), want);
        assert_eq!(RelayFrame::KeepAlive.encode().unwrap(), vec![1, 5]);
    }

    #[test]
    fn strict_decoding() {
        use RelayFrameError::*;
        assert_eq!(RelayFrame::decode(&[]), Err(Empty));
        assert_eq!(RelayFrame::decode(&[2, 5]), Err(Version(2)));
        assert_eq!(RelayFrame::decode(&[1]), Err(Type(0)));
        assert_eq!(RelayFrame::decode(&[1, 9]), Err(Type(9)));
        assert_eq!(
            RelayFrame::decode(&[1, 5, 0]),
            Err(Length {
                kind: "keepalive",
                len: 1
            })
        );
        assert_eq!(
            RelayFrame::decode(&[1, 1, 7, 7]),
            Err(Length {
                kind: "send-to",
                len: 2
            })
        );
        let mut present = vec![1, 3];
        present.extend([0; 33]);
        assert_eq!(
            RelayFrame::decode(&present),
            Err(Length {
                kind: "peer-present",
                len: 33
            })
        );
        present.truncate(2 + 31);
        assert_eq!(
            RelayFrame::decode(&present),
            Err(Length {
                kind: "peer-present",
                len: 31
            })
        );
        let big = [&[1u8, 1][..], &vec![0u8; MAX_FRAME_LEN - 1]].concat();
        assert_eq!(RelayFrame::decode(&big), Err(TooLong(MAX_FRAME_LEN + 1)));
        let too_big = RelayFrame::RecvFrom {
            key: k(1),
            payload: vec![0; MAX_PAYLOAD_LEN + 1],
        };
        assert_eq!(too_big.encode(), Err(TooLong(MAX_FRAME_LEN + 1)));
    }

    #[test]
    fn random_input_never_panics() {
        let mut next = crate::testutil::xorshift(0x9e37_79b9_7f4a_7c15u64);
        for i in 0..20_000 {
            let len = (next() % 80) as usize;
            let mut data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if i % 2 == 0 && len >= 2 {
                // Valid header bytes reach the per-type checks.
                data[0] = RELAY_VERSION;
                data[1] = (next() % 7) as u8;
            }
            fuzz_decode(&data);
        }
    }
}
