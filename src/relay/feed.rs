//! A separate relay's subscription to its coordinator's member feed
//! (`warren relay --coordinator KEY@HOST:PORT`): the control channel, with
//! the relay's own key as its Noise static key, a `subscribe_members`
//! first message, then the set and its deltas (`coord/relayfeed.rs`).
//!
//! [`Feed`] is the sans-IO state machine (dial, backoff with jitter, pings,
//! messages in, [`MemberUpdate`]s out); [`run`] is its shell on a thread of
//! its own, handing updates to the relay's loop through [`RelayHandle`] and
//! persisting the set after each one.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;

use super::members::{MemberSet, MemberUpdate};
use super::server::RelayHandle;
use crate::control::channel::Channel;
use crate::control::messages::{self, ClientMessage, PROTOCOL_VERSION, ServerMessage};
use crate::keys::Key;

/// The coordinator drops a connection silent for 90 s; nodes ping every 25 s.
pub const PING_INTERVAL: Duration = Duration::from_secs(25);
/// An answer (the set after subscribing, a pong after a ping) later than
/// this means the connection is dead.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Reconnect backoff: doubles per failed attempt from the first to the
/// last, and each wait is drawn from its upper half, so relays that lost
/// the same coordinator do not all come back at the same instant.
pub const BACKOFF_MIN: Duration = Duration::from_secs(1);
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// How long the shell sleeps at most between looks at the stop flag.
const SHELL_TICK: Duration = Duration::from_millis(500);
/// Joins come in bursts (an enrolment wave, each a delta), and the whole set
/// is rewritten each time: changes that only add keys are written at most
/// this often. A set or a removal is written at once, so a restart right
/// after it still refuses the removed key.
const PERSIST_ADDITIONS_EVERY: Duration = Duration::from_secs(5);

/// `--coordinator KEY@HOST:PORT`.
#[derive(Clone, Debug)]
pub struct Coordinator {
    pub key: Key,
    /// `host:port`, resolved on every dial.
    pub addr: String,
}

impl std::str::FromStr for Coordinator {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Coordinator> {
        let expected = || {
            format!("--coordinator {s:?}: expected KEY@HOST:PORT (the coordinator's key and control address)")
        };
        let (key, addr) = s.split_once('@').ok_or_else(|| anyhow::anyhow!(expected()))?;
        let key: Key = key
            .parse()
            .map_err(|e| anyhow::anyhow!("--coordinator {s:?}: bad coordinator key: {e}"))?;
        match addr.rsplit_once(':').map(|(h, p)| (h, p.parse::<u16>())) {
            Some((host, Ok(port))) if !host.is_empty() && port != 0 => Ok(Coordinator {
                key,
                addr: addr.to_string(),
            }),
            _ => anyhow::bail!("{}", expected()),
        }
    }
}

struct Live {
    channel: Channel,
    /// The first set arrived on this connection.
    subscribed: bool,
    next_ping: Instant,
    /// When the outstanding answer (the set, or a pong) is overdue.
    answer_due: Option<Instant>,
}

pub struct Feed {
    relay_private: Key,
    coordinator: Key,
    live: Option<Live>,
    /// When to dial next, while not connected.
    retry_at: Option<Instant>,
    failures: u32,
    rng: u64,
    updates: VecDeque<MemberUpdate>,
}

impl Feed {
    /// Dials at once; `seed` feeds the jitter.
    pub fn new(relay_private: Key, coordinator: Key, now: Instant, seed: u64) -> Feed {
        Feed {
            relay_private,
            coordinator,
            live: None,
            retry_at: Some(now),
            failures: 0,
            rng: seed | 1,
            updates: VecDeque::new(),
        }
    }

    pub fn is_connected(&self) -> bool {
        self.live.is_some()
    }

    pub fn is_subscribed(&self) -> bool {
        self.live.as_ref().is_some_and(|l| l.subscribed)
    }

    /// Whether the shell should open a connection now.
    pub fn wants_dial(&self, now: Instant) -> bool {
        self.live.is_none() && self.retry_at.is_some_and(|t| now >= t)
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        match &self.live {
            None => self.retry_at,
            Some(l) => [Some(l.next_ping), l.answer_due].into_iter().flatten().min(),
        }
    }

    /// The TCP connection is up: handshake and subscribe (sent together).
    pub fn connected(&mut self, now: Instant) -> Result<()> {
        let mut channel = Channel::client(&self.relay_private, &self.coordinator)?;
        channel.send(&messages::encode(&ClientMessage::SubscribeMembers {
            version: PROTOCOL_VERSION,
        }))?;
        self.retry_at = None;
        self.live = Some(Live {
            channel,
            subscribed: false,
            next_ping: now + PING_INTERVAL,
            answer_due: Some(now + ANSWER_TIMEOUT),
        });
        Ok(())
    }

    /// Pings when due; an overdue answer is an error (the shell closes and
    /// reports it with [`Feed::closed`]).
    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), String> {
        let Some(l) = &mut self.live else { return Ok(()) };
        if l.answer_due.is_some_and(|t| now >= t) {
            return Err(if l.subscribed {
                "no pong from the coordinator".into()
            } else {
                "no member set from the coordinator".into()
            });
        }
        if now >= l.next_ping {
            l.channel
                .send(&messages::encode(&ClientMessage::Ping { nonce: 0 }))
                .map_err(|e| format!("{e:#}"))?;
            l.next_ping = now + PING_INTERVAL;
            l.answer_due.get_or_insert(now + ANSWER_TIMEOUT);
        }
        Ok(())
    }

    /// Bytes from the coordinator. An error means the connection is no use:
    /// the shell closes it and calls [`Feed::closed`] with the reason.
    pub fn handle_input(&mut self, _now: Instant, bytes: &[u8]) -> Result<(), String> {
        let Some(l) = &mut self.live else { return Ok(()) };
        l.channel.receive(bytes).map_err(|e| format!("{e:#}"))?;
        while let Some(raw) = l.channel.next_message() {
            let msg = messages::decode_server(&raw).map_err(|e| format!("{e:#}"))?;
            match msg {
                ServerMessage::Members { keys } => {
                    l.subscribed = true;
                    l.answer_due = None;
                    self.failures = 0;
                    self.updates.push_back(MemberUpdate::Full(keys));
                }
                ServerMessage::MembersDelta { added, removed } if l.subscribed => {
                    self.updates.push_back(MemberUpdate::Delta { added, removed });
                }
                ServerMessage::Pong { .. } => l.answer_due = None,
                ServerMessage::Error { code, reason } => {
                    return Err(format!("refused ({code:?}): {reason}"));
                }
                _ => return Err("unexpected message from the coordinator".into()),
            }
        }
        Ok(())
    }

    /// The connection ended (or never came up): try again after a backoff.
    /// Returns the wait.
    pub fn closed(&mut self, now: Instant) -> Duration {
        self.live = None;
        let ceiling = BACKOFF_MIN
            .saturating_mul(1u32 << self.failures.min(16))
            .min(BACKOFF_MAX);
        self.failures = self.failures.saturating_add(1);
        // xorshift64: jitter needs no more than spread.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let half = ceiling / 2;
        let wait = half + half.mul_f64((self.rng % 1000) as f64 / 1000.0);
        self.retry_at = Some(now + wait);
        wait
    }

    pub fn poll_update(&mut self) -> Option<MemberUpdate> {
        self.updates.pop_front()
    }

    pub fn outgoing(&self) -> &[u8] {
        self.live.as_ref().map_or(&[], |l| l.channel.outgoing())
    }

    pub fn consume_outgoing(&mut self, n: usize) {
        if let Some(l) = &mut self.live {
            l.channel.consume_outgoing(n);
        }
    }
}

/// When the shell writes the set to the state directory.
#[derive(Default)]
struct Persist {
    unsaved: bool,
    /// An unsaved change removed keys (or replaced the set).
    urgent: bool,
    saved_at: Option<Instant>,
}

impl Persist {
    fn note(&mut self, update: &MemberUpdate) {
        self.unsaved = true;
        self.urgent |= match update {
            MemberUpdate::Full(_) => true,
            MemberUpdate::Delta { removed, .. } => !removed.is_empty(),
        };
    }

    fn due(&self, now: Instant) -> bool {
        self.unsaved
            && (self.urgent
                || self
                    .saved_at
                    .is_none_or(|t| now.saturating_duration_since(t) >= PERSIST_ADDITIONS_EVERY))
    }

    fn saved(&mut self, now: Instant) {
        *self = Persist {
            saved_at: Some(now),
            ..Persist::default()
        };
    }
}

/// What the shell needs beside the relay's handle.
pub struct FeedConfig {
    pub relay_private: Key,
    pub coordinator: Coordinator,
    pub state_dir: PathBuf,
    /// The set the relay started with (loaded from the state directory).
    pub members: MemberSet,
}

/// Runs the subscription until `stop` is set: dials, reads, hands every
/// update to the relay and persists the set after it.
pub fn run(cfg: FeedConfig, relay: RelayHandle, stop: Arc<AtomicBool>) {
    let seed = u64::from_le_bytes(
        cfg.relay_private.public_key().0[..8]
            .try_into()
            .unwrap_or_default(),
    ) ^ std::process::id() as u64;
    let mut feed = Feed::new(cfg.relay_private, cfg.coordinator.key, Instant::now(), seed);
    let mut members = cfg.members;
    let who = format!(
        "coordinator {} at {}",
        cfg.coordinator.key.short(),
        cfg.coordinator.addr
    );
    let mut stream: Option<TcpStream> = None;
    let mut buf = vec![0u8; 64 * 1024];
    let mut was_subscribed = false;
    let mut persist = Persist::default();
    while !stop.load(Ordering::SeqCst) {
        let now = Instant::now();
        if feed.wants_dial(now) {
            match dial(&cfg.coordinator.addr) {
                Ok(s) => match feed.connected(now) {
                    Ok(()) => stream = Some(s),
                    Err(e) => lost(&mut feed, &who, &format!("{e:#}"), false),
                },
                Err(e) => lost(&mut feed, &who, &e, false),
            }
        }
        let outcome = match stream.as_mut() {
            Some(s) => serve(&mut feed, s, &mut buf),
            None => {
                let wake = feed.poll_timeout().unwrap_or(now + SHELL_TICK);
                std::thread::sleep(wake.saturating_duration_since(now).min(SHELL_TICK));
                Ok(())
            }
        };
        while let Some(update) = feed.poll_update() {
            members.apply(&update);
            if let MemberUpdate::Full(keys) = &update
                && !was_subscribed
            {
                log!(
                    "warren relay: member keys from {who}: {} members, refusing any other key",
                    keys.len()
                );
            }
            persist.note(&update);
            relay.update_members(update);
        }
        if persist.due(Instant::now()) {
            if let Err(e) = members.save(&cfg.state_dir) {
                log!("warren relay: {e:#} (the relay keeps the set in memory)");
            }
            persist.saved(Instant::now());
        }
        if let Err(why) = outcome {
            stream = None;
            lost(&mut feed, &who, &why, was_subscribed);
        }
        was_subscribed = feed.is_subscribed();
    }
}

fn dial(addr: &str) -> Result<TcpStream, String> {
    let addrs = addr
        .to_socket_addrs()
        .map_err(|e| format!("resolving {addr}: {e}"))?;
    let mut last = format!("resolving {addr}: no address");
    for a in addrs {
        match TcpStream::connect_timeout(&a, CONNECT_TIMEOUT) {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Err(e) => last = format!("connecting to {a}: {e}"),
        }
    }
    Err(last)
}

/// One turn on a live connection: write what is queued, read for up to a
/// tick or the next deadline, run the timers.
fn serve(feed: &mut Feed, s: &mut TcpStream, buf: &mut [u8]) -> Result<(), String> {
    while !feed.outgoing().is_empty() {
        match s.write(feed.outgoing()) {
            Ok(0) => return Err("connection closed while writing".into()),
            Ok(n) => feed.consume_outgoing(n),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("writing: {e}")),
        }
    }
    let now = Instant::now();
    let wait = feed
        .poll_timeout()
        .map_or(SHELL_TICK, |t| t.saturating_duration_since(now))
        .clamp(Duration::from_millis(1), SHELL_TICK);
    let _ = s.set_read_timeout(Some(wait));
    match s.read(buf) {
        Ok(0) => return Err("connection closed by the coordinator".into()),
        Ok(n) => feed.handle_input(Instant::now(), &buf[..n])?,
        Err(e)
            if matches!(
                e.kind(),
                ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
            ) => {}
        Err(e) => return Err(format!("reading: {e}")),
    }
    feed.handle_timeout(Instant::now())
}

fn lost(feed: &mut Feed, who: &str, why: &str, was_subscribed: bool) {
    let wait = feed.closed(Instant::now());
    let keeping = if was_subscribed {
        "; keeping the last member set"
    } else {
        ""
    };
    log!(
        "warren relay: member feed from {who}: {why}{keeping}; retrying in {:.1} s",
        wait.as_secs_f64()
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coord::conn::Conn;

    /// The coordinator's side of one connection, driven by hand.
    struct Coord {
        private: Key,
        conn: Conn,
    }

    impl Coord {
        fn new(now: Instant) -> Coord {
            let private = Key::generate_private();
            let conn = Conn::new(&private, now);
            Coord { private, conn }
        }

        /// Moves the feed's bytes over and returns what the coordinator read;
        /// the first time that includes the handshake's round trip.
        fn take(&mut self, now: Instant, feed: &mut Feed) -> Vec<ClientMessage> {
            let out = feed.outgoing().to_vec();
            feed.consume_outgoing(out.len());
            let got = self.conn.receive(now, &out).unwrap();
            if got.is_empty() && !self.conn.outgoing().is_empty() {
                self.give(now, feed).unwrap();
                return self.take(now, feed);
            }
            got
        }

        fn give(&mut self, now: Instant, feed: &mut Feed) -> Result<(), String> {
            let out = self.conn.outgoing().to_vec();
            self.conn.consume_outgoing(out.len());
            feed.handle_input(now, &out)
        }
    }

    fn key() -> Key {
        Key::generate_private().public_key()
    }

    #[test]
    fn subscribes_then_passes_on_the_set_and_deltas_and_pings() {
        let t0 = Instant::now();
        let mut c = Coord::new(t0);
        let mut feed = Feed::new(Key::generate_private(), c.private.public_key(), t0, 1);
        assert!(feed.wants_dial(t0));
        feed.connected(t0).unwrap();
        assert!(!feed.wants_dial(t0));
        let got = c.take(t0, &mut feed);
        assert_eq!(
            got,
            vec![ClientMessage::SubscribeMembers {
                version: PROTOCOL_VERSION
            }]
        );
        let (a, b) = (key(), key());
        c.conn.subscribed(t0);
        c.conn.send(&ServerMessage::Members { keys: vec![a, b] });
        c.give(t0, &mut feed).unwrap();
        assert!(feed.is_subscribed());
        assert_eq!(feed.poll_update(), Some(MemberUpdate::Full(vec![a, b])));
        c.conn.send(&ServerMessage::MembersDelta {
            added: vec![],
            removed: vec![a],
        });
        c.give(t0, &mut feed).unwrap();
        assert_eq!(
            feed.poll_update(),
            Some(MemberUpdate::Delta {
                added: vec![],
                removed: vec![a]
            })
        );
        // Quiet: a ping when due, and the pong clears the deadline.
        let t1 = t0 + PING_INTERVAL;
        assert_eq!(feed.poll_timeout(), Some(t1));
        feed.handle_timeout(t1).unwrap();
        assert_eq!(c.take(t1, &mut feed), vec![ClientMessage::Ping { nonce: 0 }]);
        c.conn.send(&ServerMessage::Pong { nonce: 0 });
        c.give(t1, &mut feed).unwrap();
        feed.handle_timeout(t1 + ANSWER_TIMEOUT).unwrap();
        assert!(feed.is_connected());
    }

    #[test]
    fn a_silent_coordinator_or_a_refusal_ends_the_connection() {
        let t0 = Instant::now();
        let mut c = Coord::new(t0);
        let mut feed = Feed::new(Key::generate_private(), c.private.public_key(), t0, 1);
        feed.connected(t0).unwrap();
        feed.handle_timeout(t0 + ANSWER_TIMEOUT - Duration::from_millis(1))
            .unwrap();
        let e = feed.handle_timeout(t0 + ANSWER_TIMEOUT).unwrap_err();
        assert!(e.contains("no member set"), "{e}");

        let mut feed = Feed::new(Key::generate_private(), c.private.public_key(), t0, 1);
        feed.connected(t0).unwrap();
        c.take(t0, &mut feed);
        c.conn
            .fail(t0, messages::ErrorCode::UnknownNode, "key x is not a relay");
        let e = c.give(t0, &mut feed).unwrap_err();
        assert!(e.contains("not a relay"), "{e}");
        assert_eq!(feed.poll_update(), None, "a refusal changes nothing");
    }

    /// Waits grow from about a second to at most the ceiling, each drawn from
    /// the upper half of its step; a set arriving resets them.
    #[test]
    fn reconnects_back_off_with_jitter_and_reset_once_subscribed() {
        let mut now = Instant::now();
        let server = Key::generate_private();
        let mut feed = Feed::new(Key::generate_private(), server.public_key(), now, 42);
        let mut waits = Vec::new();
        for _ in 0..12 {
            assert!(feed.wants_dial(now));
            let w = feed.closed(now);
            assert!(!feed.wants_dial(now + w - Duration::from_millis(1)));
            now += w;
            waits.push(w);
        }
        assert!(waits[0] >= BACKOFF_MIN / 2 && waits[0] <= BACKOFF_MIN);
        assert!(waits[3] >= Duration::from_secs(4) && waits[3] <= Duration::from_secs(8));
        assert!(waits.iter().all(|&w| w <= BACKOFF_MAX));
        assert!(waits[11] >= BACKOFF_MAX / 2);
        // Two relays with different seeds do not retry in step.
        let mut other = Feed::new(Key::generate_private(), server.public_key(), now, 7);
        let theirs: Vec<Duration> = (0..12).map(|_| other.closed(now)).collect();
        assert_ne!(waits, theirs);

        // Subscribed once: the next loss waits about a second again.
        let mut c = Coord::new(now);
        let mut feed = Feed::new(Key::generate_private(), c.private.public_key(), now, 3);
        for _ in 0..6 {
            feed.closed(now);
        }
        feed.connected(now).unwrap();
        c.take(now, &mut feed);
        c.conn.subscribed(now);
        c.conn.send(&ServerMessage::Members { keys: vec![] });
        c.give(now, &mut feed).unwrap();
        assert!(feed.closed(now) <= BACKOFF_MIN);
    }

    #[test]
    fn removals_are_persisted_at_once_and_bursts_of_joins_coalesced() {
        let t0 = Instant::now();
        let mut p = Persist::default();
        assert!(!p.due(t0), "nothing to write");
        p.note(&MemberUpdate::Full(vec![key()]));
        assert!(p.due(t0));
        p.saved(t0);
        let join = MemberUpdate::Delta {
            added: vec![key()],
            removed: vec![],
        };
        p.note(&join);
        assert!(!p.due(t0 + Duration::from_secs(1)), "a join waits");
        p.note(&join);
        assert!(
            p.due(t0 + PERSIST_ADDITIONS_EVERY),
            "joins are written within the interval"
        );
        p.note(&MemberUpdate::Delta {
            added: vec![],
            removed: vec![key()],
        });
        assert!(p.due(t0 + Duration::from_secs(1)), "a removal is written at once");
        p.saved(t0 + Duration::from_secs(1));
        assert!(!p.due(t0 + Duration::from_secs(60)));
    }

    #[test]
    fn coordinator_flag_parses_and_names_what_is_wrong() {
        let k = key();
        let c: Coordinator = format!("{k}@coord.example:7777").parse().unwrap();
        assert_eq!((c.key, c.addr.as_str()), (k, "coord.example:7777"));
        for bad in [
            "nokey".to_string(),
            format!("{k}@host"),
            format!("{k}@:7777"),
            "abc@host:1".to_string(),
        ] {
            let e = bad.parse::<Coordinator>().unwrap_err().to_string();
            assert!(e.starts_with("--coordinator"), "{e}");
        }
    }
}
