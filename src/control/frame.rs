//! Control-protocol framing: `u32` big-endian length, version byte, kind byte, payload.
//!
//! The length counts the version and kind bytes plus the payload, so a frame
//! on the wire is `4 + length` bytes. The decoder checks the length before it
//! buffers a body, so a peer cannot make us allocate more than one frame.

use std::fmt;

/// Version of the framing and of everything sealed inside it.
pub const FRAME_VERSION: u8 = 1;
/// Largest payload: one Noise message (the Noise spec caps messages at 65535 bytes).
pub const MAX_PAYLOAD_LEN: usize = 65535;
/// Bytes before the payload: length, version, kind.
pub const HEADER_LEN: usize = 6;
/// Largest value the length field may carry.
pub const MAX_FRAME_LEN: usize = MAX_PAYLOAD_LEN + 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameKind {
    /// A Noise handshake message.
    Handshake = 1,
    /// A Noise transport message holding the last (or only) fragment of a control message.
    Sealed = 2,
    /// A Noise transport message holding a fragment; more fragments of the same message follow.
    SealedMore = 3,
}

impl FrameKind {
    fn from_byte(b: u8) -> Option<FrameKind> {
        match b {
            1 => Some(FrameKind::Handshake),
            2 => Some(FrameKind::Sealed),
            3 => Some(FrameKind::SealedMore),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub kind: FrameKind,
    pub payload: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FrameError {
    TooShort(usize),
    TooLong(usize),
    Version(u8),
    Kind(u8),
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::TooShort(n) => write!(f, "frame length {n} is shorter than its header"),
            FrameError::TooLong(n) => write!(f, "frame length {n} exceeds the maximum of {MAX_FRAME_LEN}"),
            FrameError::Version(v) => write!(f, "unsupported frame version {v} (expected {FRAME_VERSION})"),
            FrameError::Kind(k) => write!(f, "unknown frame kind {k}"),
        }
    }
}

impl std::error::Error for FrameError {}

/// Appends one encoded frame to `out`. Panics only on a programming error
/// (payload larger than [`MAX_PAYLOAD_LEN`]), never on input from the network.
pub fn encode(kind: FrameKind, payload: &[u8], out: &mut Vec<u8>) {
    assert!(
        payload.len() <= MAX_PAYLOAD_LEN,
        "frame payload of {} bytes",
        payload.len()
    );
    let len = (payload.len() + 2) as u32;
    out.extend_from_slice(&len.to_be_bytes());
    out.push(FRAME_VERSION);
    out.push(kind as u8);
    out.extend_from_slice(payload);
}

/// Streaming decoder: feed it whatever the socket returned, take whole frames out.
#[derive(Default, Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    /// Where the next frame starts in `buf`: frames are taken by moving this,
    /// and the consumed bytes are dropped once per push. Draining each frame
    /// from the front instead moved the rest of a 64 KiB read once per frame.
    start: usize,
    /// Once the stream is broken nothing after the bad frame can be trusted.
    failed: Option<FrameError>,
}

impl FrameDecoder {
    pub fn new() -> FrameDecoder {
        FrameDecoder::default()
    }

    /// Buffers received bytes. Call [`FrameDecoder::next_frame`] until it
    /// returns `Ok(None)` after each push, so the buffer never holds more than
    /// one partial frame plus the last read.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.failed.is_none() {
            self.buf.drain(..self.start);
            self.start = 0;
            self.buf.extend_from_slice(bytes);
        }
    }

    /// Bytes buffered but not yet returned as a frame.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        match self.try_decode() {
            Ok(f) => Ok(f),
            Err(e) => {
                self.buf = Vec::new();
                self.start = 0;
                self.failed = Some(e.clone());
                Err(e)
            }
        }
    }

    fn try_decode(&mut self) -> Result<Option<Frame>, FrameError> {
        let buf = &self.buf[self.start..];
        if buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if len < 2 {
            return Err(FrameError::TooShort(len));
        }
        if len > MAX_FRAME_LEN {
            return Err(FrameError::TooLong(len));
        }
        // Version and kind are checked as soon as they arrive, before waiting for the body.
        if buf.len() >= 5 && buf[4] != FRAME_VERSION {
            return Err(FrameError::Version(buf[4]));
        }
        if buf.len() < 6 {
            return Ok(None);
        }
        let kind = FrameKind::from_byte(buf[5]).ok_or(FrameError::Kind(buf[5]))?;
        if buf.len() < 4 + len {
            return Ok(None);
        }
        let payload = buf[HEADER_LEN..4 + len].to_vec();
        self.start += 4 + len;
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        Ok(Some(Frame { kind, payload }))
    }
}

/// Decodes every frame in `data`, fed in chunks of the given sizes, until the
/// stream ends or breaks. The fuzz target and the no-panic test share it.
pub fn fuzz_decode(data: &[u8]) -> Vec<Result<Frame, FrameError>> {
    let mut out = Vec::new();
    let mut dec = FrameDecoder::new();
    // The first byte chooses the read size so the fuzzer explores partial reads too.
    let (chunk, data) = match data.split_first() {
        Some((c, rest)) => ((*c as usize % 64) + 1, rest),
        None => return out,
    };
    for piece in data.chunks(chunk) {
        dec.push(piece);
        loop {
            match dec.next_frame() {
                Ok(Some(f)) => {
                    assert!(f.payload.len() <= MAX_PAYLOAD_LEN);
                    out.push(Ok(f));
                }
                Ok(None) => break,
                Err(e) => {
                    out.push(Err(e));
                    return out;
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(kind: FrameKind, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode(kind, payload, &mut out);
        out
    }

    #[test]
    fn round_trip_byte_by_byte() {
        let mut wire = encoded(FrameKind::Handshake, b"hello");
        wire.extend(encoded(FrameKind::Sealed, b""));
        wire.extend(encoded(FrameKind::SealedMore, &[7u8; MAX_PAYLOAD_LEN]));
        let mut dec = FrameDecoder::new();
        let mut frames = Vec::new();
        for b in &wire {
            dec.push(std::slice::from_ref(b));
            while let Some(f) = dec.next_frame().unwrap() {
                frames.push(f);
            }
        }
        assert_eq!(frames.len(), 3);
        assert_eq!(
            frames[0],
            Frame {
                kind: FrameKind::Handshake,
                payload: b"hello".to_vec()
            }
        );
        assert_eq!(frames[1].payload, b"");
        assert_eq!(frames[2].kind, FrameKind::SealedMore);
        assert_eq!(frames[2].payload.len(), MAX_PAYLOAD_LEN);
        assert_eq!(dec.buffered(), 0);
    }

    #[test]
    fn oversize_is_rejected_from_the_header_alone() {
        let mut dec = FrameDecoder::new();
        dec.push(&((MAX_FRAME_LEN + 1) as u32).to_be_bytes());
        assert_eq!(dec.next_frame(), Err(FrameError::TooLong(MAX_FRAME_LEN + 1)));
        // The stream stays broken: nothing after a bad frame is trusted.
        dec.push(&encoded(FrameKind::Sealed, b"x"));
        assert!(dec.next_frame().is_err());
    }

    #[test]
    fn bad_version_kind_and_length_are_errors() {
        let mut dec = FrameDecoder::new();
        dec.push(&[0, 0, 0, 9, 2]);
        assert_eq!(dec.next_frame(), Err(FrameError::Version(2)));
        let mut dec = FrameDecoder::new();
        dec.push(&[0, 0, 0, 2, FRAME_VERSION, 99]);
        assert_eq!(dec.next_frame(), Err(FrameError::Kind(99)));
        let mut dec = FrameDecoder::new();
        dec.push(&[0, 0, 0, 1, FRAME_VERSION]);
        assert_eq!(dec.next_frame(), Err(FrameError::TooShort(1)));
    }

    #[test]
    fn garbage_never_panics() {
        let mut next = crate::testutil::xorshift(0x9e37_79b9_7f4a_7c15u64);
        let valid = encoded(FrameKind::Sealed, b"payload");
        for i in 0..5000 {
            let len = (next() % 300) as usize;
            let mut data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if i % 3 == 0 {
                // Mostly-valid input reaches deeper than pure noise.
                data = [vec![next() as u8], valid.clone(), data].concat();
                let cut = (next() as usize) % data.len();
                data.truncate(cut.max(1));
            }
            let _ = fuzz_decode(&data);
        }
    }
}
