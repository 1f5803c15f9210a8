//! Noise IK for the control channel, sans-IO.
//!
//! The node initiates with its WireGuard private key as the static key, so the
//! handshake itself proves which node is talking; the coordinator's static
//! public key comes from the join token and is pinned. The prologue separates
//! this use of the WireGuard key from every other use.

use anyhow::{Context, Result, anyhow, bail};
use snow::{HandshakeState, TransportState};

use super::frame::{self, Frame, FrameKind, MAX_PAYLOAD_LEN};
use crate::keys::Key;

pub const NOISE_PARAMS: &str = "Noise_IK_25519_ChaChaPoly_BLAKE2s";
pub const PROLOGUE: &[u8] = b"warren control v1";
/// ChaChaPoly authentication tag added to every sealed fragment.
const TAG_LEN: usize = 16;
const MAX_FRAGMENT_LEN: usize = MAX_PAYLOAD_LEN - TAG_LEN;
/// Largest reassembled control message. A full peer map of 10,000 nodes is a
/// few MB; anything far beyond that is a peer trying to exhaust memory.
pub const MAX_MESSAGE_LEN: usize = 16 * 1024 * 1024;

/// What separates one use of this channel from another: the Noise prologue
/// (so a handshake for one service never completes with another) and the
/// largest message the receiver will reassemble.
#[derive(Clone, Copy, Debug)]
pub struct Profile {
    pub prologue: &'static [u8],
    pub max_message: usize,
}

pub const CONTROL: Profile = Profile {
    prologue: PROLOGUE,
    max_message: MAX_MESSAGE_LEN,
};

fn builder<'a>(local_private: &'a Key, profile: &Profile) -> Result<snow::Builder<'a>> {
    let params = NOISE_PARAMS
        .parse()
        .map_err(|e| anyhow!("noise parameters: {e}"))?;
    snow::Builder::new(params)
        .local_private_key(&local_private.0)
        .and_then(|b| b.prologue(profile.prologue))
        .map_err(|e| anyhow!("setting up noise: {e}"))
}

/// The node's half-done handshake, waiting for the coordinator's answer.
pub struct Initiating {
    hs: HandshakeState,
    max_message: usize,
}

/// Starts a handshake; returns the state and the first handshake message.
pub fn initiate(local_private: &Key, server_public: &Key) -> Result<(Initiating, Vec<u8>)> {
    initiate_with(&CONTROL, local_private, server_public)
}

pub fn initiate_with(
    profile: &Profile,
    local_private: &Key,
    server_public: &Key,
) -> Result<(Initiating, Vec<u8>)> {
    let mut hs = builder(local_private, profile)?
        .remote_public_key(&server_public.0)
        .and_then(|b| b.build_initiator())
        .map_err(|e| anyhow!("setting up noise initiator: {e}"))?;
    let mut msg = vec![0u8; 256];
    let n = hs
        .write_message(&[], &mut msg)
        .map_err(|e| anyhow!("writing handshake: {e}"))?;
    msg.truncate(n);
    Ok((
        Initiating {
            hs,
            max_message: profile.max_message,
        },
        msg,
    ))
}

impl Initiating {
    pub fn complete(mut self, reply: &[u8]) -> Result<Session> {
        let mut payload = vec![0u8; reply.len()];
        self.hs.read_message(reply, &mut payload).map_err(|e| {
            anyhow!("coordinator handshake failed ({e}): its key does not match the join token")
        })?;
        let ts = self
            .hs
            .into_transport_mode()
            .map_err(|e| anyhow!("finishing handshake: {e}"))?;
        Ok(Session::new(ts, self.max_message))
    }
}

/// Answers a node's first handshake message. Returns the session, the node's
/// proven static public key and the reply to send.
pub fn respond(local_private: &Key, first: &[u8]) -> Result<(Session, Key, Vec<u8>)> {
    respond_with(&CONTROL, local_private, first)
}

pub fn respond_with(profile: &Profile, local_private: &Key, first: &[u8]) -> Result<(Session, Key, Vec<u8>)> {
    let mut hs = builder(local_private, profile)?
        .build_responder()
        .map_err(|e| anyhow!("setting up noise responder: {e}"))?;
    let mut payload = vec![0u8; first.len()];
    hs.read_message(first, &mut payload)
        .map_err(|e| anyhow!("reading handshake: {e}"))?;
    let remote = hs
        .get_remote_static()
        .context("handshake carried no static key")?;
    let remote = Key(remote
        .try_into()
        .map_err(|_| anyhow!("handshake static key is not 32 bytes"))?);
    let mut reply = vec![0u8; 256];
    let n = hs
        .write_message(&[], &mut reply)
        .map_err(|e| anyhow!("writing handshake reply: {e}"))?;
    reply.truncate(n);
    let ts = hs
        .into_transport_mode()
        .map_err(|e| anyhow!("finishing handshake: {e}"))?;
    Ok((Session::new(ts, profile.max_message), remote, reply))
}

/// An established channel: seals messages into frames, opens frames into messages.
pub struct Session {
    ts: TransportState,
    partial: Vec<u8>,
    max_message: usize,
}

impl Session {
    fn new(ts: TransportState, max_message: usize) -> Session {
        Session {
            ts,
            partial: Vec::new(),
            max_message,
        }
    }

    /// Appends the frames carrying `message` to `out`, fragmenting as needed.
    pub fn seal(&mut self, message: &[u8], out: &mut Vec<u8>) -> Result<()> {
        if message.len() > self.max_message {
            bail!("message of {} bytes exceeds {}", message.len(), self.max_message);
        }
        let mut chunks = message.chunks(MAX_FRAGMENT_LEN).peekable();
        // Sized to the message, not the largest frame: a relayed datagram is
        // ~1.4 KB, and zeroing 64 KiB per datagram was a measurable cost.
        let mut buf = vec![0u8; message.len().min(MAX_FRAGMENT_LEN) + TAG_LEN];
        if chunks.peek().is_none() {
            let n = self
                .ts
                .write_message(&[], &mut buf)
                .map_err(|e| anyhow!("sealing: {e}"))?;
            frame::encode(FrameKind::Sealed, &buf[..n], out);
        }
        while let Some(chunk) = chunks.next() {
            let n = self
                .ts
                .write_message(chunk, &mut buf)
                .map_err(|e| anyhow!("sealing: {e}"))?;
            let kind = if chunks.peek().is_some() {
                FrameKind::SealedMore
            } else {
                FrameKind::Sealed
            };
            frame::encode(kind, &buf[..n], out);
        }
        Ok(())
    }

    /// Opens one frame. Returns a whole message once its last fragment arrived.
    pub fn open(&mut self, frame: &Frame) -> Result<Option<Vec<u8>>> {
        if frame.kind == FrameKind::Handshake {
            bail!("handshake frame after the handshake finished");
        }
        let mut buf = vec![0u8; frame.payload.len()];
        let n = self
            .ts
            .read_message(&frame.payload, &mut buf)
            .map_err(|e| anyhow!("opening sealed frame: {e}"))?;
        if self.partial.len() + n > self.max_message {
            bail!("message exceeds {} bytes", self.max_message);
        }
        self.partial.extend_from_slice(&buf[..n]);
        if frame.kind == FrameKind::SealedMore {
            return Ok(None);
        }
        Ok(Some(std::mem::take(&mut self.partial)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::frame::FrameDecoder;

    fn frames(bytes: &[u8]) -> Vec<Frame> {
        let mut dec = FrameDecoder::new();
        dec.push(bytes);
        std::iter::from_fn(|| dec.next_frame().unwrap()).collect()
    }

    fn pair() -> (Session, Session, Key) {
        let node = Key::generate_private();
        let server = Key::generate_private();
        let (init, m1) = initiate(&node, &server.public_key()).unwrap();
        let (resp, seen, m2) = respond(&server, &m1).unwrap();
        assert_eq!(seen, node.public_key());
        (init.complete(&m2).unwrap(), resp, node)
    }

    #[test]
    fn handshake_proves_node_key_and_messages_flow_both_ways() {
        let (mut a, mut b, _) = pair();
        let mut wire = Vec::new();
        a.seal(b"join please", &mut wire).unwrap();
        let fs = frames(&wire);
        assert_eq!(b.open(&fs[0]).unwrap().unwrap(), b"join please");
        wire.clear();
        b.seal(b"", &mut wire).unwrap();
        assert_eq!(a.open(&frames(&wire)[0]).unwrap().unwrap(), b"");
    }

    #[test]
    fn large_messages_are_fragmented_and_reassembled() {
        let (mut a, mut b, _) = pair();
        let big: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        let mut wire = Vec::new();
        a.seal(&big, &mut wire).unwrap();
        let fs = frames(&wire);
        assert_eq!(fs.len(), 4);
        let mut got = None;
        for f in &fs {
            got = b.open(f).unwrap();
        }
        assert_eq!(got.unwrap(), big);
    }

    #[test]
    fn wrong_pinned_server_key_fails_the_handshake() {
        let node = Key::generate_private();
        let server = Key::generate_private();
        let impostor = Key::generate_private();
        let (init, m1) = initiate(&node, &server.public_key()).unwrap();
        // The impostor cannot even read the first message: it is encrypted to the pinned key.
        assert!(respond(&impostor, &m1).is_err());
        // And a reply from a different handshake does not complete ours.
        let (_, m1b) = initiate(&node, &impostor.public_key()).unwrap();
        let (_, _, m2b) = respond(&impostor, &m1b).unwrap();
        let err = init.complete(&m2b).err().unwrap().to_string();
        assert!(err.contains("does not match the join token"), "{err}");
    }

    #[test]
    fn tampered_frame_is_rejected() {
        let (mut a, mut b, _) = pair();
        let mut wire = Vec::new();
        a.seal(b"hello", &mut wire).unwrap();
        let mut f = frames(&wire).remove(0);
        f.payload[0] ^= 1;
        assert!(b.open(&f).is_err());
    }

    #[test]
    fn garbage_handshakes_do_not_panic() {
        let server = Key::generate_private();
        for len in [0usize, 1, 31, 32, 47, 48, 95, 96, 200, 1000] {
            let junk: Vec<u8> = (0..len).map(|i| (i * 31 + 7) as u8).collect();
            assert!(respond(&server, &junk).is_err());
        }
    }
}
