//! The secure control channel as a sans-IO state machine: bytes in, bytes out,
//! whole messages out. Both the coordinator's connections and the agent's
//! connection drive one of these over a TCP stream.

use std::collections::VecDeque;

use anyhow::{Context, Result, anyhow, bail};

use super::frame::{self, FrameDecoder, FrameKind};
use super::noise::{self, CONTROL, Initiating, Profile, Session};
use crate::keys::Key;

/// Buffer capacity a connection may keep between messages.
const IDLE_BUFFER_CAPACITY: usize = 16 * 1024;

enum State {
    /// Node side: first handshake message sent, waiting for the reply.
    Initiating(Box<Initiating>),
    /// Coordinator side: waiting for the node's first handshake message.
    Responding(Key, Profile),
    Open(Session),
    Broken,
}

pub struct Channel {
    state: State,
    decoder: FrameDecoder,
    outgoing: Vec<u8>,
    /// Messages the node queued before the handshake finished.
    pending: Vec<Vec<u8>>,
    received: VecDeque<Vec<u8>>,
    peer: Option<Key>,
}

impl Channel {
    /// Node side. The first handshake message is queued for sending at once.
    pub fn client(local_private: &Key, server_public: &Key) -> Result<Channel> {
        Channel::client_with(&CONTROL, local_private, server_public)
    }

    /// Node side of another service's channel (its own prologue and message limit).
    pub fn client_with(profile: &Profile, local_private: &Key, server_public: &Key) -> Result<Channel> {
        let (init, first) = noise::initiate_with(profile, local_private, server_public)?;
        let mut ch = Channel::with_state(State::Initiating(Box::new(init)));
        ch.peer = Some(*server_public);
        frame::encode(FrameKind::Handshake, &first, &mut ch.outgoing);
        Ok(ch)
    }

    /// Coordinator side.
    pub fn server(local_private: &Key) -> Channel {
        Channel::server_with(&CONTROL, local_private)
    }

    pub fn server_with(profile: &Profile, local_private: &Key) -> Channel {
        Channel::with_state(State::Responding(*local_private, *profile))
    }

    fn with_state(state: State) -> Channel {
        Channel {
            state,
            decoder: FrameDecoder::new(),
            outgoing: Vec::new(),
            pending: Vec::new(),
            received: VecDeque::new(),
            peer: None,
        }
    }

    pub fn is_open(&self) -> bool {
        matches!(self.state, State::Open(_))
    }

    /// The other side's static public key, once proven (or pinned, on the node side).
    pub fn peer(&self) -> Option<Key> {
        self.peer
    }

    /// Feeds received bytes. An error means the stream is unusable: close it.
    pub fn receive(&mut self, bytes: &[u8]) -> Result<()> {
        if matches!(self.state, State::Broken) {
            bail!("channel already failed");
        }
        self.decoder.push(bytes);
        let result = self.drain_frames();
        if result.is_err() {
            self.state = State::Broken;
        }
        result
    }

    fn drain_frames(&mut self) -> Result<()> {
        while let Some(f) = self.decoder.next_frame().context("reading control frame")? {
            match std::mem::replace(&mut self.state, State::Broken) {
                State::Responding(local, profile) => {
                    if f.kind != FrameKind::Handshake {
                        bail!("expected a handshake frame first");
                    }
                    let (session, peer, reply) = noise::respond_with(&profile, &local, &f.payload)?;
                    frame::encode(FrameKind::Handshake, &reply, &mut self.outgoing);
                    self.peer = Some(peer);
                    self.state = State::Open(session);
                }
                State::Initiating(init) => {
                    if f.kind != FrameKind::Handshake {
                        bail!("expected the coordinator's handshake reply");
                    }
                    let mut session = init.complete(&f.payload)?;
                    for msg in self.pending.drain(..) {
                        session.seal(&msg, &mut self.outgoing)?;
                    }
                    self.state = State::Open(session);
                }
                State::Open(mut session) => {
                    let msg = session.open(&f)?;
                    self.state = State::Open(session);
                    self.received.extend(msg);
                }
                State::Broken => return Err(anyhow!("channel already failed")),
            }
        }
        Ok(())
    }

    /// Queues a message; on the node side before the handshake finished it is
    /// sent right after.
    pub fn send(&mut self, message: &[u8]) -> Result<()> {
        match &mut self.state {
            State::Open(session) => session.seal(message, &mut self.outgoing),
            State::Initiating(_) => {
                self.pending.push(message.to_vec());
                Ok(())
            }
            State::Responding(..) => bail!("cannot send before the node's handshake"),
            State::Broken => bail!("channel already failed"),
        }
    }

    /// Bytes of messages queued until the handshake finishes (not yet in [`Channel::outgoing`]).
    pub fn pending_bytes(&self) -> usize {
        self.pending.iter().map(Vec::len).sum()
    }

    pub fn next_message(&mut self) -> Option<Vec<u8>> {
        self.received.pop_front()
    }

    /// Bytes waiting to be written to the stream.
    pub fn outgoing(&self) -> &[u8] {
        &self.outgoing
    }

    /// Marks `n` bytes of [`Channel::outgoing`] as written.
    pub fn consume_outgoing(&mut self, n: usize) {
        self.outgoing.drain(..n.min(self.outgoing.len()));
        // A full peer map can be megabytes; do not keep that much per idle connection.
        if self.outgoing.is_empty() && self.outgoing.capacity() > IDLE_BUFFER_CAPACITY {
            self.outgoing = Vec::new();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Moves bytes between two channels in small pieces until neither has anything to say.
    fn pump(a: &mut Channel, b: &mut Channel) {
        for _ in 0..100 {
            let (ab, ba) = (a.outgoing().to_vec(), b.outgoing().to_vec());
            if ab.is_empty() && ba.is_empty() {
                return;
            }
            a.consume_outgoing(ab.len());
            b.consume_outgoing(ba.len());
            for piece in ab.chunks(7) {
                b.receive(piece).unwrap();
            }
            for piece in ba.chunks(7) {
                a.receive(piece).unwrap();
            }
        }
        panic!("channels never went quiet");
    }

    #[test]
    fn client_messages_queued_before_the_handshake_arrive() {
        let node = Key::generate_private();
        let server = Key::generate_private();
        let mut c = Channel::client(&node, &server.public_key()).unwrap();
        let mut s = Channel::server(&server);
        c.send(b"first").unwrap();
        c.send(b"second").unwrap();
        pump(&mut c, &mut s);
        assert!(c.is_open() && s.is_open());
        assert_eq!(s.peer(), Some(node.public_key()));
        assert_eq!(s.next_message().unwrap(), b"first");
        assert_eq!(s.next_message().unwrap(), b"second");
        s.send(b"welcome").unwrap();
        pump(&mut c, &mut s);
        assert_eq!(c.next_message().unwrap(), b"welcome");
    }

    #[test]
    fn garbage_breaks_only_this_channel_and_never_panics() {
        let server = Key::generate_private();
        let mut seed = 12345u32;
        for _ in 0..500 {
            let mut s = Channel::server(&server);
            let len = (seed % 200) as usize;
            let junk: Vec<u8> = (0..len)
                .map(|_| {
                    seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
                    (seed >> 16) as u8
                })
                .collect();
            let _ = s.receive(&junk);
        }
        let mut s = Channel::server(&server);
        assert!(s.receive(b"GET / HTTP/1.1\r\n\r\n").is_err());
        assert!(s.receive(b"more").is_err());
    }
}
