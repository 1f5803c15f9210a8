//! What a node may send the coordinator, checked on the clear frame headers
//! as bytes arrive, before the channel buffers or decrypts anything.
//!
//! Until its first message a connection proves nothing (see `admission.rs`),
//! so it may send exactly one handshake frame and then one small sealed
//! message in a single frame: "more fragments follow" is refused, and so is
//! any frame whose announced length would take it past
//! [`MAX_BYTES_BEFORE_AUTH`], as soon as its header arrives. A connection
//! holding a nearly complete 64 KiB frame therefore never exists.
//!
//! After the first message the hub knows the node (or is closing the
//! connection). Nodes send the coordinator small messages only (Hello, Join,
//! candidates, pings; the megabyte peer maps flow the other way), so a
//! message may span fragments but not exceed [`MAX_NODE_MESSAGE`].

use std::fmt;

use crate::control::frame::{FRAME_VERSION, FrameKind, HEADER_LEN, MAX_FRAME_LEN};

/// A Noise IK first message with an empty payload is 96 bytes; some slack for
/// a payload a later version may carry.
pub const MAX_HANDSHAKE_FRAME: usize = 256;
/// Everything a connection may send before its first message is complete:
/// the handshake frame and a Hello or Join. The largest valid Join (255-byte
/// fields, 32 IPv6 candidates) is under 3 KiB of JSON.
pub const MAX_BYTES_BEFORE_AUTH: usize = 4 * 1024;
/// Largest message a node may send once it is known: its sealed fragments
/// together, tags included.
pub const MAX_NODE_MESSAGE: usize = 64 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Violation {
    /// Not a control frame at all (version, kind or length field).
    BadFrame,
    /// The first frame is not a (small) handshake, or the second not a sealed frame.
    BadOpening,
    /// "More fragments follow" before the first message.
    FragmentBeforeAuth,
    /// The opening would exceed [`MAX_BYTES_BEFORE_AUTH`].
    TooMuchBeforeAuth,
    /// A known node's message exceeds [`MAX_NODE_MESSAGE`].
    MessageTooLong,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Violation::BadFrame => "not a control frame",
            Violation::BadOpening => "expected a handshake and then one sealed message",
            Violation::FragmentBeforeAuth => "fragmented message before hello or join",
            Violation::TooMuchBeforeAuth => "more than 4 KiB before hello or join",
            Violation::MessageTooLong => "message longer than 64 KiB",
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    Handshake,
    FirstMessage,
    Known,
}

/// Follows the frame boundaries of one connection's input.
#[derive(Debug)]
pub struct Inbound {
    stage: Stage,
    header: [u8; HEADER_LEN],
    header_len: usize,
    /// Kind of the frame whose body is arriving.
    kind: FrameKind,
    /// Body bytes of the current frame still to come.
    body_left: usize,
    /// Bytes of the stream scanned so far, counted until the first message is complete.
    offset: usize,
    /// Sealed bytes (tags included) of the message being fragmented.
    message_bytes: usize,
    failed: Option<Violation>,
}

impl Default for Inbound {
    fn default() -> Inbound {
        Inbound::new()
    }
}

impl Inbound {
    pub fn new() -> Inbound {
        Inbound {
            stage: Stage::Handshake,
            header: [0; HEADER_LEN],
            header_len: 0,
            kind: FrameKind::Handshake,
            body_left: 0,
            offset: 0,
            message_bytes: 0,
            failed: None,
        }
    }

    /// Whether the first message is complete (the connection is the hub's now).
    pub fn opened(&self) -> bool {
        self.stage == Stage::Known
    }

    /// Checks received bytes. `Ok(Some(n))`: the first message ends after
    /// `bytes[..n]`, so hand those to the hub before the rest. An error means
    /// close the connection; none of these bytes may be used.
    pub fn scan(&mut self, bytes: &[u8]) -> Result<Option<usize>, Violation> {
        if let Some(v) = self.failed {
            return Err(v);
        }
        let r = self.scan_inner(bytes);
        if let Err(v) = r {
            self.failed = Some(v);
        }
        r
    }

    fn scan_inner(&mut self, bytes: &[u8]) -> Result<Option<usize>, Violation> {
        let mut split = None;
        let mut i = 0;
        while i < bytes.len() {
            let rest = &bytes[i..];
            let in_body = self.body_left > 0;
            let n = if in_body {
                self.body_left.min(rest.len())
            } else {
                (HEADER_LEN - self.header_len).min(rest.len())
            };
            if self.stage != Stage::Known {
                self.offset += n;
            }
            i += n;
            if in_body {
                self.body_left -= n;
            } else {
                self.header[self.header_len..self.header_len + n].copy_from_slice(&rest[..n]);
                self.header_len += n;
                if self.header_len < HEADER_LEN {
                    continue;
                }
                self.header_len = 0;
                self.frame_started()?;
            }
            if self.body_left == 0 && self.frame_ended() {
                split = Some(i);
            }
        }
        Ok(split)
    }

    fn frame_started(&mut self) -> Result<(), Violation> {
        let h = &self.header;
        let len = u32::from_be_bytes([h[0], h[1], h[2], h[3]]) as usize;
        if !(2..=MAX_FRAME_LEN).contains(&len) || h[4] != FRAME_VERSION {
            return Err(Violation::BadFrame);
        }
        self.kind = match h[5] {
            1 => FrameKind::Handshake,
            2 => FrameKind::Sealed,
            3 => FrameKind::SealedMore,
            _ => return Err(Violation::BadFrame),
        };
        let payload = len - 2;
        self.body_left = payload;
        match (self.stage, self.kind) {
            (Stage::Handshake, FrameKind::Handshake) if 4 + len <= MAX_HANDSHAKE_FRAME => Ok(()),
            (Stage::Handshake, _) => Err(Violation::BadOpening),
            (Stage::FirstMessage, FrameKind::Sealed) => {
                // Refused on the announced length, before the body is buffered.
                let frame_end = self.offset - HEADER_LEN + 4 + len;
                if frame_end > MAX_BYTES_BEFORE_AUTH {
                    return Err(Violation::TooMuchBeforeAuth);
                }
                Ok(())
            }
            (Stage::FirstMessage, FrameKind::SealedMore) => Err(Violation::FragmentBeforeAuth),
            (Stage::FirstMessage, FrameKind::Handshake) => Err(Violation::BadOpening),
            (Stage::Known, FrameKind::SealedMore | FrameKind::Sealed) => {
                self.message_bytes += payload;
                if self.message_bytes > MAX_NODE_MESSAGE {
                    return Err(Violation::MessageTooLong);
                }
                Ok(())
            }
            // A second handshake: the channel refuses it (and the hub knows the node).
            (Stage::Known, FrameKind::Handshake) => Ok(()),
        }
    }

    /// The current frame is complete; true if it completed the first message.
    fn frame_ended(&mut self) -> bool {
        match (self.stage, self.kind) {
            (Stage::Handshake, _) => {
                self.stage = Stage::FirstMessage;
                false
            }
            (Stage::FirstMessage, _) => {
                self.stage = Stage::Known;
                true
            }
            (Stage::Known, FrameKind::Sealed) => {
                self.message_bytes = 0;
                false
            }
            (Stage::Known, _) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::frame::{MAX_PAYLOAD_LEN, encode};

    fn frame(kind: FrameKind, len: usize) -> Vec<u8> {
        let mut out = Vec::new();
        encode(kind, &vec![7u8; len], &mut out);
        out
    }

    /// A real opening: a 96-byte handshake, then a Join-sized sealed frame.
    fn opening() -> Vec<u8> {
        [frame(FrameKind::Handshake, 96), frame(FrameKind::Sealed, 300)].concat()
    }

    #[test]
    fn a_real_opening_passes_byte_by_byte_and_splits_at_the_first_message() {
        let wire = [opening(), frame(FrameKind::Sealed, 40)].concat();
        let end = opening().len();
        let mut s = Inbound::new();
        for (i, b) in wire.iter().enumerate() {
            let r = s.scan(std::slice::from_ref(b)).unwrap();
            assert_eq!(r.is_some(), i + 1 == end, "byte {i}");
        }
        assert!(s.opened());
        let mut s = Inbound::new();
        assert_eq!(s.scan(&wire), Ok(Some(end)));
    }

    #[test]
    fn fragments_before_the_first_message_are_refused_on_the_header() {
        let mut s = Inbound::new();
        let wire = [
            frame(FrameKind::Handshake, 96),
            frame(FrameKind::SealedMore, 1000),
        ]
        .concat();
        assert_eq!(s.scan(&wire[..96 + 6 + 6]), Err(Violation::FragmentBeforeAuth));
        assert_eq!(s.scan(&wire), Err(Violation::FragmentBeforeAuth), "stays failed");
    }

    #[test]
    fn a_large_frame_before_the_first_message_is_refused_on_the_header() {
        let mut s = Inbound::new();
        let hs = frame(FrameKind::Handshake, 96);
        assert_eq!(s.scan(&hs), Ok(None));
        let big = frame(FrameKind::Sealed, MAX_PAYLOAD_LEN);
        assert_eq!(s.scan(&big[..HEADER_LEN]), Err(Violation::TooMuchBeforeAuth));
        // Exactly the allowance is fine.
        let mut s = Inbound::new();
        let fits = MAX_BYTES_BEFORE_AUTH - hs.len() - HEADER_LEN;
        let wire = [hs.clone(), frame(FrameKind::Sealed, fits)].concat();
        assert_eq!(s.scan(&wire), Ok(Some(MAX_BYTES_BEFORE_AUTH)));
        let mut s = Inbound::new();
        let wire = [hs, frame(FrameKind::Sealed, fits + 1)].concat();
        assert_eq!(s.scan(&wire), Err(Violation::TooMuchBeforeAuth));
    }

    #[test]
    fn the_opening_must_be_a_small_handshake_then_a_sealed_frame() {
        for wire in [
            frame(FrameKind::Sealed, 96),
            frame(FrameKind::Handshake, MAX_HANDSHAKE_FRAME),
            [frame(FrameKind::Handshake, 96), frame(FrameKind::Handshake, 96)].concat(),
        ] {
            assert_eq!(Inbound::new().scan(&wire), Err(Violation::BadOpening));
        }
        for wire in [
            b"GET / HTTP/1.1\r\n".to_vec(),
            vec![0xff, 0xff, 0xff, 0xff, 1, 1],
            vec![0, 0, 0, 9, 2, 1],
            vec![0, 0, 0, 9, 1, 9],
        ] {
            assert_eq!(Inbound::new().scan(&wire), Err(Violation::BadFrame), "{wire:?}");
        }
    }

    #[test]
    fn a_known_node_may_fragment_up_to_the_message_limit() {
        let mut s = Inbound::new();
        s.scan(&opening()).unwrap();
        let half = MAX_NODE_MESSAGE / 2;
        let ok = [frame(FrameKind::SealedMore, half), frame(FrameKind::Sealed, half)].concat();
        assert_eq!(s.scan(&ok), Ok(None));
        assert_eq!(s.scan(&ok), Ok(None), "the count starts over with each message");
        let more = [
            frame(FrameKind::SealedMore, half),
            frame(FrameKind::SealedMore, half),
        ]
        .concat();
        assert_eq!(s.scan(&more), Ok(None));
        assert_eq!(
            s.scan(&frame(FrameKind::Sealed, 1)[..HEADER_LEN]),
            Err(Violation::MessageTooLong)
        );
    }

    #[test]
    fn garbage_never_panics() {
        let mut next = crate::testutil::xorshift(0x5eed);
        for i in 0..5000 {
            let len = (next() % 400) as usize;
            let mut data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if i % 2 == 0 {
                data = [opening(), data].concat();
            }
            let mut s = Inbound::new();
            for piece in data.chunks((next() % 50 + 1) as usize) {
                if s.scan(piece).is_err() {
                    break;
                }
            }
        }
    }
}
