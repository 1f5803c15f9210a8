//! A node's connection to one relay, sans-IO. The shell owns the TCP socket:
//! it opens one when asked ([`Event::Connect`]), drops it when asked
//! ([`Event::Close`]), feeds received bytes in and writes [`RelayClient::outgoing`].
//! Everything else — handshake, registration, keepalives, dead-relay
//! detection, reconnect backoff — is decided here from the `now` passed in.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::RELAY_PROFILE;
use super::frame::{MAX_PAYLOAD_LEN, RelayFrame};
use crate::control::channel::Channel;
use crate::keys::Key;

/// Nothing sent for this long: send a keepalive, so the relay's idle timeout
/// (75 s) never fires for a live node and NAT/firewall TCP state stays fresh.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(15);
/// Nothing received for this long: the relay is gone. The relay sends a
/// keepalive after 30 s of silence, so this allows one lost keepalive and slack.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(65);
/// TCP connect plus Noise handshake must finish within this.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// First reconnect delay; doubles per failure up to [`MAX_BACKOFF`].
pub const MIN_BACKOFF: Duration = Duration::from_secs(1);
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Bytes queued toward the relay (handshake pending or socket full); past it,
/// sends are dropped (newest first), as a congested UDP path would.
pub const SEND_QUEUE_LIMIT: usize = 256 * 1024;

#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// Open a TCP connection to the relay and call [`RelayClient::on_tcp_connected`].
    Connect,
    /// Drop the current TCP connection (no further `on_tcp_closed` needed).
    Close(String),
    /// Handshake done: the relay knows us by our key.
    Open,
    Received {
        from: Key,
        payload: Vec<u8>,
    },
    PeerPresent(Key),
    PeerGone(Key),
}

enum State {
    /// No connection; the next attempt is due at `until`.
    Waiting { until: Instant },
    /// Asked the shell for a TCP connection at `since`.
    Connecting { since: Instant },
    /// TCP up, handshake in flight (`open == false`) or done.
    Connected {
        channel: Box<Channel>,
        since: Instant,
        open: bool,
        last_received: Instant,
        last_sent: Instant,
    },
}

pub struct RelayClient {
    private_key: Key,
    relay_key: Key,
    state: State,
    /// Failed attempts since the last successful handshake.
    failures: u32,
    jitter_seed: u64,
    events: VecDeque<Event>,
    /// Datagrams dropped because the queue toward the relay was full or there was no connection.
    pub dropped: u64,
}

impl RelayClient {
    /// Starts disconnected with the first attempt due at `now`.
    pub fn new(private_key: Key, relay_key: Key, now: Instant) -> RelayClient {
        // Jitter spreads reconnects of many nodes after a relay restart; seeding
        // it from the key keeps each node's schedule deterministic in tests.
        let seed = u64::from_le_bytes(private_key.public_key().0[..8].try_into().expect("8 bytes")) | 1;
        RelayClient {
            private_key,
            relay_key,
            state: State::Waiting { until: now },
            failures: 0,
            jitter_seed: seed,
            events: VecDeque::new(),
            dropped: 0,
        }
    }

    pub fn is_open(&self) -> bool {
        matches!(self.state, State::Connected { open: true, .. })
    }

    /// The shell's TCP connect succeeded.
    pub fn on_tcp_connected(&mut self, now: Instant) {
        if !matches!(self.state, State::Connecting { .. }) {
            return;
        }
        let mut channel = match Channel::client_with(&RELAY_PROFILE, &self.private_key, &self.relay_key) {
            Ok(c) => c,
            Err(e) => return self.fail(now, format!("starting relay handshake: {e:#}")),
        };
        // The relay registers us on our first sealed message, so send one right away.
        let keepalive = RelayFrame::KeepAlive.encode().expect("keepalive encodes");
        if let Err(e) = channel.send(&keepalive) {
            return self.fail(now, format!("queueing relay keepalive: {e:#}"));
        }
        self.state = State::Connected {
            channel: Box::new(channel),
            since: now,
            open: false,
            last_received: now,
            last_sent: now,
        };
    }

    /// The TCP connection failed or closed.
    pub fn on_tcp_closed(&mut self, now: Instant, why: &str) {
        if !matches!(self.state, State::Waiting { .. }) {
            self.disconnect(now, why.to_string(), false);
        }
    }

    /// Bytes read from the relay.
    pub fn on_bytes(&mut self, now: Instant, bytes: &[u8]) {
        if let Err(e) = self.receive(now, bytes) {
            self.fail(now, format!("{e:#}"));
        }
    }

    fn receive(&mut self, now: Instant, bytes: &[u8]) -> Result<()> {
        let State::Connected {
            channel,
            open,
            last_received,
            ..
        } = &mut self.state
        else {
            return Ok(());
        };
        *last_received = now;
        channel.receive(bytes).context("relay connection")?;
        if !*open && channel.is_open() {
            *open = true;
            self.failures = 0;
            self.events.push_back(Event::Open);
        }
        while let Some(msg) = channel.next_message() {
            match RelayFrame::decode(&msg).context("decoding relay frame")? {
                RelayFrame::RecvFrom { key, payload } => {
                    self.events.push_back(Event::Received { from: key, payload })
                }
                RelayFrame::PeerPresent { key } => self.events.push_back(Event::PeerPresent(key)),
                RelayFrame::PeerGone { key } => self.events.push_back(Event::PeerGone(key)),
                RelayFrame::KeepAlive => {}
                RelayFrame::SendTo { .. } => bail!("relay sent a client-to-relay frame"),
            }
        }
        Ok(())
    }

    /// Sends a datagram or sealed message to `to` through the relay. Returns
    /// false if it was dropped (not connected, or the queue is full).
    pub fn send_to(&mut self, now: Instant, to: Key, payload: &[u8]) -> bool {
        if payload.len() > MAX_PAYLOAD_LEN {
            self.dropped += 1;
            return false;
        }
        let frame = RelayFrame::SendTo {
            key: to,
            payload: payload.to_vec(),
        };
        match self.queue(now, &frame) {
            Ok(sent) => sent,
            Err(e) => {
                self.fail(now, format!("sending through the relay: {e:#}"));
                false
            }
        }
    }

    fn queue(&mut self, now: Instant, frame: &RelayFrame) -> Result<bool> {
        let State::Connected {
            channel, last_sent, ..
        } = &mut self.state
        else {
            self.dropped += 1;
            return Ok(false);
        };
        if channel.outgoing().len() + channel.pending_bytes() + frame.encoded_len() > SEND_QUEUE_LIMIT {
            self.dropped += 1;
            return Ok(false);
        }
        channel.send(&frame.encode().context("encoding relay frame")?)?;
        *last_sent = now;
        Ok(true)
    }

    /// Bytes to write to the TCP connection.
    pub fn outgoing(&self) -> &[u8] {
        match &self.state {
            State::Connected { channel, .. } => channel.outgoing(),
            _ => &[],
        }
    }

    pub fn consume_outgoing(&mut self, n: usize) {
        if let State::Connected { channel, .. } = &mut self.state {
            channel.consume_outgoing(n);
        }
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        Some(match &self.state {
            State::Waiting { until } => *until,
            State::Connecting { since } => *since + CONNECT_TIMEOUT,
            State::Connected {
                since, open: false, ..
            } => *since + CONNECT_TIMEOUT,
            State::Connected {
                last_received,
                last_sent,
                ..
            } => (*last_received + IDLE_TIMEOUT).min(*last_sent + KEEPALIVE_INTERVAL),
        })
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        match &self.state {
            State::Waiting { until } if now >= *until => {
                self.state = State::Connecting { since: now };
                self.events.push_back(Event::Connect);
            }
            State::Waiting { .. } => {}
            State::Connecting { since }
            | State::Connected {
                since, open: false, ..
            } => {
                if now >= *since + CONNECT_TIMEOUT {
                    self.fail(now, format!("no relay handshake within {CONNECT_TIMEOUT:?}"));
                }
            }
            State::Connected {
                last_received,
                last_sent,
                ..
            } => {
                if now >= *last_received + IDLE_TIMEOUT {
                    return self.fail(now, format!("nothing from the relay for {IDLE_TIMEOUT:?}"));
                }
                if now >= *last_sent + KEEPALIVE_INTERVAL
                    && let Err(e) = self.queue(now, &RelayFrame::KeepAlive)
                {
                    self.fail(now, format!("queueing relay keepalive: {e:#}"));
                }
            }
        }
    }

    /// Our side gives up on the connection: tell the shell to drop it.
    fn fail(&mut self, now: Instant, why: String) {
        self.disconnect(now, why, true);
    }

    fn disconnect(&mut self, now: Instant, why: String, tell_shell: bool) {
        self.failures = self.failures.saturating_add(1);
        let until = now + self.backoff();
        self.state = State::Waiting { until };
        if tell_shell {
            self.events.push_back(Event::Close(why));
        }
    }

    /// Delay before the next attempt: exponential in the failures, between half and all of it.
    fn backoff(&mut self) -> Duration {
        let exp = self.failures.saturating_sub(1).min(16);
        let full = (MIN_BACKOFF * (1u32 << exp)).min(MAX_BACKOFF);
        self.jitter_seed ^= self.jitter_seed << 13;
        self.jitter_seed ^= self.jitter_seed >> 7;
        self.jitter_seed ^= self.jitter_seed << 17;
        let fraction = 0.5 + (self.jitter_seed % 1000) as f64 / 2000.0;
        full.mul_f64(fraction)
    }
}

impl crate::outgoing::Outgoing for RelayClient {
    fn outgoing(&self) -> &[u8] {
        RelayClient::outgoing(self)
    }

    fn consume_outgoing(&mut self, n: usize) {
        RelayClient::consume_outgoing(self, n)
    }
}

// Against the server side of the connection.
#[cfg(all(test, feature = "relay-server"))]
mod tests {
    use super::*;
    use crate::relay::client_conn::{ClientConn, Limits, Request};

    struct Sim {
        now: Instant,
        client: RelayClient,
        client_key: Key,
        relay_private: Key,
        /// The relay's side of the current connection, if the shell opened one.
        server: Option<ClientConn>,
        requests: Vec<Request>,
        events: Vec<Event>,
    }

    impl Sim {
        fn new() -> Sim {
            let now = Instant::now();
            let client_key = Key::generate_private();
            let relay_private = Key::generate_private();
            Sim {
                now,
                client: RelayClient::new(client_key, relay_private.public_key(), now),
                client_key,
                relay_private,
                server: None,
                requests: Vec::new(),
                events: Vec::new(),
            }
        }

        /// The shell: runs due timers, acts on connect/close, moves bytes both ways.
        fn step(&mut self) {
            for _ in 0..20 {
                if self.client.poll_timeout().is_some_and(|t| t <= self.now) {
                    self.client.handle_timeout(self.now);
                }
                while let Some(ev) = self.client.poll_event() {
                    match ev {
                        Event::Connect => {
                            self.server =
                                Some(ClientConn::new(&self.relay_private, Limits::default(), self.now));
                            self.client.on_tcp_connected(self.now);
                        }
                        Event::Close(_) => self.server = None,
                        _ => {}
                    }
                    self.events.push(ev);
                }
                let up = self.client.outgoing().to_vec();
                self.client.consume_outgoing(up.len());
                let mut down = Vec::new();
                if let Some(s) = &mut self.server {
                    if !up.is_empty() {
                        s.receive(self.now, &up, &mut self.requests).unwrap();
                    }
                    down = s.outgoing().to_vec();
                    s.consume_outgoing(down.len());
                }
                if !down.is_empty() {
                    self.client.on_bytes(self.now, &down);
                }
                if up.is_empty()
                    && down.is_empty()
                    && self.client.poll_timeout().is_some_and(|t| t > self.now)
                {
                    return;
                }
            }
        }

        /// Moves the clock to the client's next timer.
        fn advance_to_timer(&mut self) {
            self.now = self.now.max(self.client.poll_timeout().unwrap());
            self.step();
        }

        fn take_events(&mut self) -> Vec<Event> {
            std::mem::take(&mut self.events)
        }
    }

    #[test]
    fn connects_registers_and_carries_traffic_both_ways() {
        let mut sim = Sim::new();
        sim.step();
        assert_eq!(sim.take_events(), vec![Event::Connect, Event::Open]);
        assert!(sim.client.is_open());
        assert_eq!(
            sim.requests,
            vec![Request::Registered(sim.client_key.public_key())]
        );

        let peer = Key([9; 32]);
        assert!(sim.client.send_to(sim.now, peer, b"wg datagram"));
        sim.step();
        assert_eq!(
            sim.requests[1],
            Request::SendTo {
                to: peer,
                payload: b"wg datagram".to_vec()
            }
        );
        let s = sim.server.as_mut().unwrap();
        s.queue(
            sim.now,
            &RelayFrame::RecvFrom {
                key: peer,
                payload: b"reply".to_vec(),
            },
        )
        .unwrap();
        s.queue(sim.now, &RelayFrame::PeerGone { key: peer }).unwrap();
        sim.step();
        assert_eq!(
            sim.take_events(),
            vec![
                Event::Received {
                    from: peer,
                    payload: b"reply".to_vec()
                },
                Event::PeerGone(peer)
            ]
        );
    }

    #[test]
    fn keepalives_while_idle_and_dead_relay_is_detected() {
        let mut sim = Sim::new();
        sim.step();
        sim.take_events();
        let t0 = sim.now;
        // The relay answers nothing; keepalives go out every interval until the idle timeout.
        let mut keepalive_times = Vec::new();
        for _ in 0..10 {
            let before = sim.requests.len();
            sim.now = sim.client.poll_timeout().unwrap();
            sim.client.handle_timeout(sim.now);
            let up = sim.client.outgoing().to_vec();
            sim.client.consume_outgoing(up.len());
            if !up.is_empty() {
                let s = sim.server.as_mut().unwrap();
                s.receive(sim.now, &up, &mut sim.requests).unwrap();
                assert_eq!(sim.requests.len(), before, "keepalives are not requests");
                keepalive_times.push(sim.now - t0);
            }
            if let Some(Event::Close(why)) = sim.client.poll_event() {
                assert!(why.contains("nothing from the relay"), "{why}");
                break;
            }
        }
        assert_eq!(
            keepalive_times,
            (1..=4).map(|i| KEEPALIVE_INTERVAL * i).collect::<Vec<_>>()
        );
        assert_eq!(sim.now - t0, IDLE_TIMEOUT);
        assert!(!sim.client.is_open());
    }

    #[test]
    fn relay_keepalives_keep_the_connection_up() {
        let mut sim = Sim::new();
        sim.step();
        sim.take_events();
        for _ in 0..20 {
            sim.now += Duration::from_secs(30);
            let s = sim.server.as_mut().unwrap();
            s.handle_timeout(sim.now).unwrap();
            sim.step();
        }
        assert!(sim.client.is_open());
        assert_eq!(sim.take_events(), vec![]);
    }

    #[test]
    fn reconnects_with_growing_jittered_backoff_and_resets_after_success() {
        let mut sim = Sim::new();
        // The relay is unreachable: every TCP connect fails.
        let mut delays = Vec::new();
        let mut last = sim.now;
        for _ in 0..9 {
            sim.client.handle_timeout(sim.now);
            assert_eq!(sim.client.poll_event(), Some(Event::Connect));
            delays.push(sim.now - last);
            last = sim.now;
            sim.client.on_tcp_closed(sim.now, "connection refused");
            sim.now = sim.client.poll_timeout().unwrap();
        }
        for (i, d) in delays[1..].iter().enumerate() {
            let full = (MIN_BACKOFF * (1 << i)).min(MAX_BACKOFF);
            assert!(
                *d >= full / 2 && *d <= full,
                "attempt {}: {d:?} vs {full:?}",
                i + 1
            );
        }
        // The relay comes back: one successful handshake resets the backoff.
        sim.step();
        assert!(sim.client.is_open());
        sim.client.on_tcp_closed(sim.now, "relay restarted");
        let next = sim.client.poll_timeout().unwrap() - sim.now;
        assert!(next <= MIN_BACKOFF, "{next:?}");
        sim.advance_to_timer();
        assert!(sim.client.is_open(), "reconnected after the restart");
    }

    #[test]
    fn handshake_that_never_finishes_times_out() {
        let mut sim = Sim::new();
        sim.client.handle_timeout(sim.now);
        assert_eq!(sim.client.poll_event(), Some(Event::Connect));
        sim.client.on_tcp_connected(sim.now);
        assert!(!sim.client.outgoing().is_empty());
        sim.now += CONNECT_TIMEOUT;
        sim.client.handle_timeout(sim.now);
        assert!(matches!(sim.client.poll_event(), Some(Event::Close(w)) if w.contains("handshake")));
    }

    #[test]
    fn wrong_relay_key_or_garbage_closes_and_backs_off() {
        let mut sim = Sim::new();
        sim.relay_private = Key::generate_private(); // not the key the client pins
        sim.client.handle_timeout(sim.now);
        assert_eq!(sim.client.poll_event(), Some(Event::Connect));
        sim.client.on_tcp_connected(sim.now);
        let up = sim.client.outgoing().to_vec();
        let mut impostor = ClientConn::new(&sim.relay_private, Limits::default(), sim.now);
        // The impostor cannot even read the handshake: it is encrypted to the pinned key.
        assert!(impostor.receive(sim.now, &up, &mut Vec::new()).is_err());
        sim.client.on_bytes(sim.now, b"\x00\x00\x00\x05\x01\x01junk");
        assert!(matches!(sim.client.poll_event(), Some(Event::Close(_))));
        assert!(!sim.client.is_open());
        assert!(sim.client.poll_timeout().unwrap() > sim.now);
    }

    #[test]
    fn sends_are_dropped_when_disconnected_or_the_queue_is_full() {
        let mut sim = Sim::new();
        assert!(!sim.client.send_to(sim.now, Key([1; 32]), b"x"));
        sim.step();
        assert!(sim.client.is_open());
        let big = vec![0u8; 60_000];
        let sent = (0..10)
            .filter(|_| sim.client.send_to(sim.now, Key([1; 32]), &big))
            .count();
        assert_eq!(sent, 4, "256 KiB holds four 60 KB datagrams");
        assert!(sim.client.outgoing().len() <= SEND_QUEUE_LIMIT);
        assert_eq!(sim.client.dropped, 7);
        assert!(
            !sim.client
                .send_to(sim.now, Key([1; 32]), &vec![0u8; MAX_PAYLOAD_LEN + 1])
        );
    }
}
