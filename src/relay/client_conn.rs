//! One client connection as the relay sees it, sans-IO: bytes in, decoded
//! requests out; frames in, bytes to write out; timers driven by `now`.
//!
//! The client's identity is the static key it proved in the Noise handshake
//! (its WireGuard key); nothing it sends later can change it.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::RELAY_PROFILE;
use super::frame::RelayFrame;
use crate::control::channel::Channel;
use crate::keys::Key;

/// Limits that keep one client from costing the relay more than its share.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Bytes waiting to be written to one client. Past it, datagrams for that
    /// client are dropped (drop-newest: the bytes already queued are sealed in
    /// Noise's nonce order and cannot be taken back). WireGuard retransmits and
    /// TCP inside the tunnel backs off, so dropping is the right signal.
    pub queue_bytes: usize,
    /// Sustained bytes per second one client may send through the relay.
    pub rate_bytes_per_sec: u64,
    /// Bytes one client may send in a burst above the rate.
    pub burst_bytes: u64,
    /// Nothing received for this long (keepalives included): the client is gone.
    pub idle_timeout: Duration,
    /// The handshake must finish within this after the TCP connection opened.
    /// It takes a real client one round trip, so a short deadline costs it
    /// nothing and frees a pending slot held by one that never finishes.
    pub handshake_timeout: Duration,
    /// Nothing sent for this long: send a keepalive so the client can tell a live relay from a dead one.
    pub keepalive_interval: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            queue_bytes: 256 * 1024,
            // About 540 Mbit/s: a relayed path should carry at least half of a
            // typical direct one, yet one client cannot take a whole core.
            rate_bytes_per_sec: 64 * 1024 * 1024,
            burst_bytes: 8 * 1024 * 1024,
            idle_timeout: Duration::from_secs(75),
            handshake_timeout: Duration::from_secs(3),
            keepalive_interval: Duration::from_secs(30),
        }
    }
}

/// Bytes a connection may send before it is registered. A Noise IK first
/// message is 96 bytes; without this cap every unauthenticated connection could
/// make the relay buffer a whole 64 KiB frame.
const MAX_BYTES_BEFORE_REGISTERED: usize = 1024;

/// What a client asked for, in order. Clients send a keepalive right after
/// the handshake so they are registered without waiting for traffic.
#[derive(Debug, PartialEq, Eq)]
pub enum Request {
    /// The handshake finished: the client holds this key's private half.
    Registered(Key),
    SendTo {
        to: Key,
        payload: Vec<u8>,
    },
}

/// Token bucket over bytes, refilled from `now`.
#[derive(Debug)]
struct Bucket {
    tokens: u64,
    refilled: Instant,
}

pub struct ClientConn {
    channel: Channel,
    limits: Limits,
    key: Option<Key>,
    opened: Instant,
    last_received: Instant,
    last_sent: Instant,
    bucket: Bucket,
    unregistered_bytes: usize,
    /// Datagrams for this client dropped because its queue was full.
    pub dropped_queue_full: u64,
    /// Datagrams from this client dropped by its rate limit.
    pub dropped_rate: u64,
}

impl ClientConn {
    pub fn new(server_private: &Key, limits: Limits, now: Instant) -> ClientConn {
        ClientConn {
            channel: Channel::server_with(&RELAY_PROFILE, server_private),
            limits,
            key: None,
            opened: now,
            last_received: now,
            last_sent: now,
            bucket: Bucket {
                tokens: limits.burst_bytes,
                refilled: now,
            },
            unregistered_bytes: 0,
            dropped_queue_full: 0,
            dropped_rate: 0,
        }
    }

    /// The client's proven key, once the handshake finished.
    pub fn key(&self) -> Option<Key> {
        self.key
    }

    /// Feeds bytes read from the socket. An error means close this connection
    /// (garbage, a bad handshake, an invalid frame); other clients are unaffected.
    pub fn receive(&mut self, now: Instant, bytes: &[u8], out: &mut Vec<Request>) -> Result<()> {
        self.last_received = now;
        self.channel.receive(bytes)?;
        while let Some(msg) = self.channel.next_message() {
            // Register on the first transport message, not on the first handshake
            // message: an IK first message can be replayed by anyone who saw it,
            // but only the holder of its ephemeral key can finish the handshake
            // and seal a message. A replay thus cannot take over a client's key.
            if self.key.is_none()
                && let Some(key) = self.channel.peer()
            {
                self.key = Some(key);
                out.push(Request::Registered(key));
            }
            match RelayFrame::decode(&msg).context("decoding relay frame")? {
                RelayFrame::SendTo { key, payload } => {
                    if self.take_tokens(now, payload.len() as u64) {
                        out.push(Request::SendTo { to: key, payload });
                    } else {
                        self.dropped_rate += 1;
                    }
                }
                RelayFrame::KeepAlive => {}
                other => bail!("client sent a relay-to-client frame ({other:?})"),
            }
        }
        if self.key.is_none() {
            self.unregistered_bytes += bytes.len();
            if self.unregistered_bytes > MAX_BYTES_BEFORE_REGISTERED {
                bail!(
                    "{} bytes without completing the handshake",
                    self.unregistered_bytes
                );
            }
        }
        Ok(())
    }

    fn take_tokens(&mut self, now: Instant, n: u64) -> bool {
        let elapsed = now.saturating_duration_since(self.bucket.refilled);
        let refill = (elapsed.as_nanos() * self.limits.rate_bytes_per_sec as u128 / 1_000_000_000) as u64;
        if refill > 0 {
            self.bucket.tokens = (self.bucket.tokens + refill).min(self.limits.burst_bytes);
            self.bucket.refilled = now;
        }
        if self.bucket.tokens < n {
            return false;
        }
        self.bucket.tokens -= n;
        true
    }

    /// Bytes `frame` adds to the queue once sealed: the frame, plus a Noise
    /// frame header and tag per fragment (a frame over one Noise message is
    /// split), so the bounds are on real bytes.
    pub fn cost(frame: &RelayFrame) -> usize {
        const NOISE_TAG: usize = 16;
        const FRAGMENT: usize = crate::control::frame::MAX_PAYLOAD_LEN - NOISE_TAG;
        let len = frame.encoded_len();
        len + len.div_ceil(FRAGMENT).max(1) * (crate::control::frame::HEADER_LEN + NOISE_TAG)
    }

    /// Queues a frame for the client. Returns false if it was dropped because
    /// the queue is full (see [`Limits::queue_bytes`]).
    pub fn queue(&mut self, now: Instant, frame: &RelayFrame) -> Result<bool> {
        self.queue_within(now, frame, self.limits.queue_bytes)
    }

    /// Like [`ClientConn::queue`] with the queue limited to `cap` bytes, when
    /// the relay as a whole is short of room (see `budget.rs`).
    pub fn queue_within(&mut self, now: Instant, frame: &RelayFrame, cap: usize) -> Result<bool> {
        if self.queued_bytes() + ClientConn::cost(frame) > cap.min(self.limits.queue_bytes) {
            self.dropped_queue_full += 1;
            return Ok(false);
        }
        let bytes = frame.encode().context("encoding relay frame")?;
        self.channel.send(&bytes)?;
        self.last_sent = now;
        Ok(true)
    }

    /// Bytes queued for the client and not yet written.
    pub fn queued_bytes(&self) -> usize {
        self.channel.outgoing().len()
    }

    pub fn outgoing(&self) -> &[u8] {
        self.channel.outgoing()
    }

    pub fn consume_outgoing(&mut self, n: usize) {
        self.channel.consume_outgoing(n);
    }

    /// Runs timers. An error means close the connection (it timed out).
    pub fn handle_timeout(&mut self, now: Instant) -> Result<()> {
        self.handle_timeout_within(now, self.limits.queue_bytes)
    }

    /// Like [`ClientConn::handle_timeout`], queueing a keepalive only within `queue_cap` bytes.
    pub fn handle_timeout_within(&mut self, now: Instant, queue_cap: usize) -> Result<()> {
        if self.key.is_none() && now.saturating_duration_since(self.opened) >= self.limits.handshake_timeout {
            bail!("no handshake within {:?}", self.limits.handshake_timeout);
        }
        if now.saturating_duration_since(self.last_received) >= self.limits.idle_timeout {
            bail!("nothing received for {:?}", self.limits.idle_timeout);
        }
        if self.key.is_some()
            && now.saturating_duration_since(self.last_sent) >= self.limits.keepalive_interval
        {
            self.queue_within(now, &RelayFrame::KeepAlive, queue_cap)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::RELAY_PROFILE;

    struct Pair {
        server: ClientConn,
        client: Channel,
        client_key: Key,
    }

    fn connect(limits: Limits, now: Instant) -> Pair {
        let server_key = Key::generate_private();
        let client_key = Key::generate_private();
        let mut server = ClientConn::new(&server_key, limits, now);
        let mut client = Channel::client_with(&RELAY_PROFILE, &client_key, &server_key.public_key()).unwrap();
        client.send(&RelayFrame::KeepAlive.encode().unwrap()).unwrap();
        let mut reqs = Vec::new();
        let first = client.outgoing().to_vec();
        server.receive(now, &first, &mut reqs).unwrap();
        client.consume_outgoing(first.len());
        assert_eq!(reqs, vec![], "a handshake alone does not register");
        client.receive(server.outgoing()).unwrap();
        server.consume_outgoing(server.outgoing().len());
        assert!(client.is_open());
        let ka = client.outgoing().to_vec();
        client.consume_outgoing(ka.len());
        server.receive(now, &ka, &mut reqs).unwrap();
        assert_eq!(reqs, vec![Request::Registered(client_key.public_key())]);
        Pair {
            server,
            client,
            client_key,
        }
    }

    fn send(p: &mut Pair, now: Instant, f: &RelayFrame) -> Result<Vec<Request>> {
        p.client.send(&f.encode().unwrap()).unwrap();
        let bytes = p.client.outgoing().to_vec();
        p.client.consume_outgoing(bytes.len());
        let mut reqs = Vec::new();
        p.server.receive(now, &bytes, &mut reqs)?;
        Ok(reqs)
    }

    #[test]
    fn handshake_registers_the_proven_key_and_send_to_is_decoded() {
        let now = Instant::now();
        let mut p = connect(Limits::default(), now);
        assert_eq!(p.server.key(), Some(p.client_key.public_key()));
        let to = Key([7; 32]);
        let reqs = send(
            &mut p,
            now,
            &RelayFrame::SendTo {
                key: to,
                payload: b"dgram".to_vec(),
            },
        )
        .unwrap();
        assert_eq!(
            reqs,
            vec![Request::SendTo {
                to,
                payload: b"dgram".to_vec()
            }]
        );
        assert!(send(&mut p, now, &RelayFrame::KeepAlive).unwrap().is_empty());
    }

    #[test]
    fn unregistered_connection_cannot_make_the_relay_buffer_a_frame() {
        let now = Instant::now();
        let mut c = ClientConn::new(&Key::generate_private(), Limits::default(), now);
        // A valid-looking header announcing a 60 KB handshake, then the body trickling in.
        let mut reqs = Vec::new();
        c.receive(now, &[0, 0, 0xea, 0x62, 1, 1], &mut reqs).unwrap();
        let mut closed = false;
        for _ in 0..100 {
            if c.receive(now, &[0u8; 100], &mut reqs).is_err() {
                closed = true;
                break;
            }
        }
        assert!(closed, "closed after about {MAX_BYTES_BEFORE_REGISTERED} bytes");
        assert!(reqs.is_empty());
    }

    #[test]
    fn client_sending_server_frames_is_closed() {
        let now = Instant::now();
        let mut p = connect(Limits::default(), now);
        let err = send(
            &mut p,
            now,
            &RelayFrame::RecvFrom {
                key: Key([1; 32]),
                payload: vec![],
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("relay-to-client"), "{err}");
    }

    #[test]
    fn queue_is_bounded_and_drops_newest() {
        let now = Instant::now();
        let limits = Limits {
            queue_bytes: 10_000,
            ..Limits::default()
        };
        let mut p = connect(limits, now);
        let f = RelayFrame::RecvFrom {
            key: Key([1; 32]),
            payload: vec![0; 1000],
        };
        let mut accepted = 0;
        for _ in 0..100 {
            if p.server.queue(now, &f).unwrap() {
                accepted += 1;
            }
            assert!(p.server.queued_bytes() <= 10_000);
        }
        assert_eq!(accepted, 9);
        assert_eq!(p.server.dropped_queue_full, 91);
        // Once the client reads, there is room again.
        let n = p.server.queued_bytes();
        p.server.consume_outgoing(n);
        assert!(p.server.queue(now, &f).unwrap());
    }

    #[test]
    fn rate_limit_drops_excess_and_refills_with_time() {
        let t0 = Instant::now();
        let limits = Limits {
            rate_bytes_per_sec: 10_000,
            burst_bytes: 5_000,
            ..Limits::default()
        };
        let mut p = connect(limits, t0);
        let f = RelayFrame::SendTo {
            key: Key([2; 32]),
            payload: vec![0; 1000],
        };
        let sent: usize = (0..10).map(|_| send(&mut p, t0, &f).unwrap().len()).sum();
        assert_eq!(sent, 5);
        assert_eq!(p.server.dropped_rate, 5);
        // 300 ms later 3,000 bytes of credit came back.
        let t1 = t0 + Duration::from_millis(300);
        let sent: usize = (0..10).map(|_| send(&mut p, t1, &f).unwrap().len()).sum();
        assert_eq!(sent, 3);
    }

    #[test]
    fn timers_keepalive_idle_and_handshake() {
        let t0 = Instant::now();
        let limits = Limits::default();
        let mut p = connect(limits, t0);
        p.server.handle_timeout(t0 + Duration::from_secs(1)).unwrap();
        assert_eq!(p.server.queued_bytes(), 0);
        p.server.handle_timeout(t0 + limits.keepalive_interval).unwrap();
        assert!(p.server.queued_bytes() > 0, "keepalive queued");
        assert!(p.server.handle_timeout(t0 + limits.idle_timeout).is_err());

        let mut silent = ClientConn::new(&Key::generate_private(), limits, t0);
        silent.handle_timeout(t0 + Duration::from_secs(1)).unwrap();
        assert!(silent.handle_timeout(t0 + limits.handshake_timeout).is_err());
    }
}
