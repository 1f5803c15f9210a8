//! One node's connection to the coordinator, as a sans-IO state machine:
//! the secure channel plus the limits that keep one bad client from hurting
//! the others (handshake deadline, idle deadline, rate limit, output cap).
//!
//! Before a connection has said Hello or Join it is a stranger's: whatever
//! goes wrong then (a failed handshake, an unreadable or unexpected first
//! message, the handshake deadline) closes it without an error to the hub,
//! which would log it. The server counts those in its summary line instead
//! (`tally.rs`); what a stranger may send is bounded there too (`inbound.rs`).

use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use crate::control::channel::Channel;
use crate::control::messages::{self, ClientMessage, ErrorCode, ServerMessage};
use crate::keys::Key;

/// From accept until the node is authenticated and has said Hello or Join.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Nodes ping every 25 s; three missed pings and the node counts as gone.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// After an error is queued, how long the node gets to read it before we hang up.
pub const CLOSE_LINGER: Duration = Duration::from_secs(2);
/// Sustained input allowed per connection, in bytes per second; every message
/// costs at least [`MIN_MESSAGE_COST`], so this also caps the message rate.
pub const RATE_BYTES_PER_SEC: f64 = 128.0 * 1024.0;
/// Input a connection may send in one burst (a reconnecting node sends a few messages at once).
pub const RATE_BURST_BYTES: f64 = 1024.0 * 1024.0;
pub const MIN_MESSAGE_COST: f64 = 1024.0;
/// A node that does not read its peer map updates is cut off rather than buffered forever.
pub const MAX_OUTGOING: usize = 64 * 1024 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Noise handshake or first message still outstanding.
    Opening,
    /// Authenticated as this node.
    Node(u64),
    /// A separate relay subscribed to the member feed (`relayfeed.rs`).
    Relay,
    /// An error was queued; flushing it, then hanging up.
    Closing,
}

pub struct Conn {
    channel: Channel,
    pub phase: Phase,
    /// The node this connection authenticated as; kept while closing so the
    /// hub can mark the node offline when the socket finally goes.
    node: Option<u64>,
    deadline: Instant,
    tokens: f64,
    refilled: Instant,
}

impl Conn {
    pub fn new(server_private: &Key, now: Instant) -> Conn {
        Conn {
            channel: Channel::server(server_private),
            phase: Phase::Opening,
            node: None,
            deadline: now + HANDSHAKE_TIMEOUT,
            tokens: RATE_BURST_BYTES,
            refilled: now,
        }
    }

    /// The node's key, proven by the Noise handshake.
    pub fn peer(&self) -> Option<Key> {
        if self.channel.is_open() {
            self.channel.peer()
        } else {
            None
        }
    }

    fn spend(&mut self, now: Instant, cost: f64) -> Result<()> {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * RATE_BYTES_PER_SEC).min(RATE_BURST_BYTES) - cost;
        self.refilled = now;
        if self.tokens < 0.0 {
            bail!("rate limit exceeded");
        }
        Ok(())
    }

    /// Feeds received bytes; returns the messages they completed. An error
    /// means this connection must close (see [`Conn::fail`]).
    pub fn receive(&mut self, now: Instant, bytes: &[u8]) -> Result<Vec<ClientMessage>, (ErrorCode, String)> {
        if self.phase == Phase::Closing {
            return Ok(Vec::new());
        }
        match self.receive_inner(now, bytes) {
            Err(_) if self.phase == Phase::Opening => {
                self.drop_stranger(now);
                Ok(Vec::new())
            }
            Err(e) => Err(e),
            Ok(out) if self.phase == Phase::Opening && out.first().is_some_and(|m| !is_opening(m)) => {
                self.drop_stranger(now);
                Ok(Vec::new())
            }
            Ok(out) => Ok(out),
        }
    }

    fn receive_inner(
        &mut self,
        now: Instant,
        bytes: &[u8],
    ) -> Result<Vec<ClientMessage>, (ErrorCode, String)> {
        self.spend(now, bytes.len() as f64)
            .map_err(|e| (ErrorCode::RateLimited, e.to_string()))?;
        self.channel
            .receive(bytes)
            .map_err(|e| (ErrorCode::Protocol, format!("{e:#}")))?;
        let mut out = Vec::new();
        while let Some(raw) = self.channel.next_message() {
            self.spend(now, MIN_MESSAGE_COST)
                .map_err(|e| (ErrorCode::RateLimited, e.to_string()))?;
            let msg = messages::decode_client(&raw).map_err(|e| (ErrorCode::Protocol, format!("{e:#}")))?;
            out.push(msg);
        }
        if matches!(self.phase, Phase::Node(_) | Phase::Relay) {
            self.deadline = now + IDLE_TIMEOUT;
        }
        Ok(out)
    }

    /// Closes a connection that never said who it is: no error (it would go
    /// to someone unknown), and finished at once.
    fn drop_stranger(&mut self, now: Instant) {
        self.phase = Phase::Closing;
        self.deadline = now;
        self.channel.consume_outgoing(self.channel.outgoing().len());
    }

    pub fn authenticated(&mut self, node: u64, now: Instant) {
        self.phase = Phase::Node(node);
        self.node = Some(node);
        self.deadline = now + IDLE_TIMEOUT;
    }

    /// A relay subscribed to the member feed; it pings like a node.
    pub fn subscribed(&mut self, now: Instant) {
        self.phase = Phase::Relay;
        self.deadline = now + IDLE_TIMEOUT;
    }

    pub fn node(&self) -> Option<u64> {
        self.node
    }

    pub fn send(&mut self, msg: &ServerMessage) {
        self.send_encoded(&messages::encode(msg));
    }

    /// Seals an already-encoded message: a broadcast is encoded once for everyone.
    pub fn send_encoded(&mut self, encoded: &[u8]) {
        if self.phase == Phase::Closing {
            return;
        }
        if self.channel.send(encoded).is_err() || self.channel.outgoing().len() > MAX_OUTGOING {
            self.phase = Phase::Closing;
        }
    }

    /// Queues the error for the node (if the channel can still carry it) and starts closing.
    pub fn fail(&mut self, now: Instant, code: ErrorCode, reason: &str) {
        if self.channel.is_open() && self.phase != Phase::Closing {
            self.send(&ServerMessage::Error {
                code,
                reason: reason.to_string(),
            });
        }
        self.phase = Phase::Closing;
        self.deadline = now + CLOSE_LINGER;
    }

    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Whether the shell should hang up now.
    pub fn is_finished(&self, now: Instant) -> bool {
        match self.phase {
            Phase::Closing => self.channel.outgoing().is_empty() || now >= self.deadline,
            // A stranger's handshake deadline: hung up on without a word (see the module docs).
            Phase::Opening => now >= self.deadline,
            Phase::Node(_) | Phase::Relay => false,
        }
    }

    /// What a passed deadline means, if it has passed. Not for a connection
    /// still opening: the server hangs up on it (see [`Conn::is_finished`]).
    pub fn expired(&self, now: Instant) -> Option<&'static str> {
        if now < self.deadline {
            return None;
        }
        match self.phase {
            Phase::Opening => None,
            Phase::Node(_) | Phase::Relay => Some("idle timeout"),
            Phase::Closing => Some("close linger over"),
        }
    }

    pub fn outgoing(&self) -> &[u8] {
        self.channel.outgoing()
    }

    pub fn consume_outgoing(&mut self, n: usize) {
        self.channel.consume_outgoing(n);
    }
}

/// The messages that may open a connection.
fn is_opening(m: &ClientMessage) -> bool {
    matches!(
        m,
        ClientMessage::Hello { .. } | ClientMessage::Join { .. } | ClientMessage::SubscribeMembers { .. }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limit_trips_on_a_flood_and_refills_over_time() {
        let now = Instant::now();
        let mut c = Conn::new(&Key::generate_private(), now);
        c.authenticated(1, now);
        // A burst within the allowance is fine (it is garbage, so it fails the channel, not the limit).
        let big = vec![0u8; RATE_BURST_BYTES as usize + 1];
        let (code, _) = c.receive(now, &big).unwrap_err();
        assert_eq!(code, ErrorCode::RateLimited);
        let mut c = Conn::new(&Key::generate_private(), now);
        c.spend(now, RATE_BURST_BYTES).unwrap();
        assert!(c.spend(now, 1.0).is_err());
        c.tokens = 0.0;
        c.spend(now + Duration::from_secs(1), RATE_BYTES_PER_SEC - 1.0)
            .unwrap();
    }

    /// Before Hello or Join nothing is reported to the hub (it would log it):
    /// the connection is just finished, with nothing queued for the stranger.
    #[test]
    fn a_strangers_failures_close_silently() {
        use crate::control::channel::Channel;
        let now = Instant::now();
        let server = Key::generate_private();
        let mut c = Conn::new(&server, now);
        assert!(c.receive(now, b"GET / HTTP/1.1\r\n\r\n").unwrap().is_empty());
        assert!(c.is_finished(now) && c.outgoing().is_empty());

        // A proper handshake, then a first message that is not Hello or Join.
        let mut client = Channel::client(&Key::generate_private(), &server.public_key()).unwrap();
        client
            .send(&messages::encode(&ClientMessage::Ping { nonce: 1 }))
            .unwrap();
        let mut c = Conn::new(&server, now);
        assert!(c.receive(now, client.outgoing()).unwrap().is_empty());
        client.consume_outgoing(client.outgoing().len());
        client.receive(c.outgoing()).unwrap();
        c.consume_outgoing(c.outgoing().len());
        assert!(!c.is_finished(now));
        assert!(c.receive(now, client.outgoing()).unwrap().is_empty());
        assert!(c.is_finished(now) && c.outgoing().is_empty());

        // The handshake deadline: finished, and not an expiry for the hub to log.
        let c = Conn::new(&server, now);
        assert!(!c.is_finished(now));
        assert_eq!(c.expired(now + HANDSHAKE_TIMEOUT), None);
        assert!(c.is_finished(now + HANDSHAKE_TIMEOUT));
    }

    #[test]
    fn deadlines_follow_the_phase() {
        let now = Instant::now();
        let mut c = Conn::new(&Key::generate_private(), now);
        c.authenticated(1, now);
        assert_eq!(c.expired(now + HANDSHAKE_TIMEOUT), None);
        assert_eq!(c.expired(now + IDLE_TIMEOUT), Some("idle timeout"));
        c.fail(now, ErrorCode::Protocol, "bye");
        assert!(
            c.is_finished(now),
            "nothing queued on an unopened channel: close at once"
        );
    }
}
