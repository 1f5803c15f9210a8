//! The agent's connection to the coordinator as a sans-IO state machine:
//! connect, authenticate (join once, hello afterwards), keep the peer map,
//! ping, and reconnect with exponential backoff and jitter. The shell owns
//! the TCP socket and the clock.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::control::channel::Channel;
use crate::control::messages::{
    self, ClientMessage, ErrorCode, PROTOCOL_VERSION, PeerInfo, RelayInfo, ServerMessage, WgStunInfo,
};
use crate::keys::Key;

/// Keeps NAT and firewall state for the TCP connection alive and notices a dead coordinator.
pub const PING_INTERVAL: Duration = Duration::from_secs(25);
/// No answer for this long after a ping's due time: the connection is dead.
pub const PONG_TIMEOUT: Duration = Duration::from_secs(10);
/// From dialling until the coordinator's welcome.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// First retry delay, doubled per failure up to [`BACKOFF_MAX`].
pub const BACKOFF_MIN: Duration = Duration::from_secs(1);
pub const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// A node that has not joined yet and sees this many handshakes hung up,
/// none completed, gives up: the key pinned from its token is not the
/// coordinator's (an IK responder that cannot decrypt just hangs up). More
/// than one, so a coordinator that drops one connection (restarting, shedding
/// load) is not mistaken for the wrong one. A member keeps retrying: the key
/// it pinned has worked before.
pub const JOIN_HANDSHAKE_HANGUPS: u32 = 3;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Waiting until `retry_at` to dial.
    Waiting {
        retry_at: Instant,
    },
    /// Dialled `server`; waiting for TCP, the handshake and the welcome.
    Connecting {
        server: String,
        deadline: Instant,
    },
    Connected,
    /// The coordinator refused us for good (removed, invite spent, ...).
    Failed {
        code: ErrorCode,
        reason: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// Open a TCP connection to this `host:port`; report with
    /// [`ControlConn::handle_connected`] or [`ControlConn::handle_disconnected`].
    Dial(String),
    /// Close the TCP connection (the state machine already moved on).
    HangUp,
    /// The coordinator accepted the node; `enrolled` is true the first time (a join).
    Welcome {
        me: PeerInfo,
        enrolled: bool,
        relays: Vec<RelayInfo>,
        wgstun: Vec<WgStunInfo>,
    },
    /// The peer map changed; read it with [`ControlConn::peers`].
    MapChanged,
    /// The coordinator recorded our new key; WireGuard must switch to it now.
    KeyRotated,
    /// The access policy in force (`None`: none); sent after each Welcome and on a change.
    Policy(Option<crate::control::policy::Policy>),
    /// The coordinator refused or failed us; `permanent` means no retry.
    Refused {
        code: ErrorCode,
        reason: String,
        permanent: bool,
    },
}

pub struct ControlConfig {
    pub private_key: Key,
    pub server_key: Key,
    pub servers: Vec<String>,
    /// Invite secret until the node is enrolled.
    pub join_secret: Option<String>,
    pub requested_name: Option<String>,
    pub hostname: String,
    /// Subnet routes and exit offer, sent with every Hello and Join.
    pub advertise: crate::control::messages::Advertised,
}

pub struct ControlConn {
    cfg: ControlConfig,
    phase: Phase,
    channel: Option<Channel>,
    failures: u32,
    next_server: usize,
    next_ping: Instant,
    ping_due_since: Option<Instant>,
    ping_nonce: u64,
    rng: u64,
    me: Option<PeerInfo>,
    peers: BTreeMap<u64, PeerInfo>,
    map_version: Option<u64>,
    candidates: Vec<SocketAddr>,
    /// A new private key announced to the coordinator but not yet confirmed.
    pending_key: Option<Key>,
    /// Why the last connection ended or failed, for `warren status` and `warren up`.
    last_error: Option<String>,
    /// Handshakes the coordinator hung up on since one last completed.
    handshake_hangups: u32,
    events: VecDeque<Event>,
}

impl ControlConn {
    /// `seed` drives the jitter, so tests are deterministic.
    pub fn new(cfg: ControlConfig, now: Instant, seed: u64) -> ControlConn {
        ControlConn {
            cfg,
            phase: Phase::Waiting { retry_at: now },
            channel: None,
            failures: 0,
            next_server: 0,
            next_ping: now,
            ping_due_since: None,
            ping_nonce: 0,
            rng: seed | 1,
            me: None,
            peers: BTreeMap::new(),
            map_version: None,
            candidates: Vec::new(),
            pending_key: None,
            last_error: None,
            handshake_hangups: 0,
            events: VecDeque::new(),
        }
    }

    /// Starts from a cached map (after a restart), so WireGuard can be
    /// configured before the coordinator answers, or if it never does.
    pub fn restore(&mut self, me: PeerInfo, peers: Vec<PeerInfo>) {
        self.me = Some(me);
        self.peers = peers.into_iter().map(|p| (p.id, p)).collect();
    }

    pub fn phase(&self) -> &Phase {
        &self.phase
    }

    /// Why the last connection attempt ended, until one succeeds.
    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }

    pub fn me(&self) -> Option<&PeerInfo> {
        self.me.as_ref()
    }

    /// Every other node of the mesh.
    pub fn peers(&self) -> impl Iterator<Item = &PeerInfo> {
        let me = self.me.as_ref().map(|m| m.id);
        self.peers.values().filter(move |p| Some(p.id) != me)
    }

    pub fn private_key(&self) -> &Key {
        &self.cfg.private_key
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        match &self.phase {
            Phase::Waiting { retry_at } => Some(*retry_at),
            Phase::Connecting { deadline, .. } => Some(*deadline),
            Phase::Connected => Some(match self.ping_due_since {
                Some(due) => due + PONG_TIMEOUT,
                None => self.next_ping,
            }),
            Phase::Failed { .. } => None,
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        match self.phase.clone() {
            Phase::Waiting { retry_at } if now >= retry_at => self.dial(now),
            Phase::Connecting { server, deadline } if now >= deadline => {
                self.lost(now, &format!("connecting to {server} timed out"))
            }
            Phase::Connected => {
                if let Some(due) = self.ping_due_since {
                    if now >= due + PONG_TIMEOUT {
                        self.lost(now, "coordinator stopped answering");
                    }
                } else if now >= self.next_ping {
                    self.ping_nonce += 1;
                    self.send(&ClientMessage::Ping {
                        nonce: self.ping_nonce,
                    });
                    self.ping_due_since = Some(now);
                }
            }
            _ => {}
        }
    }

    fn dial(&mut self, now: Instant) {
        if self.cfg.servers.is_empty() {
            self.fail(ErrorCode::Protocol, "no coordinator address known".into());
            return;
        }
        let server = self.cfg.servers[self.next_server % self.cfg.servers.len()].clone();
        self.next_server += 1;
        let mut channel = match Channel::client(&self.cfg.private_key, &self.cfg.server_key) {
            Ok(c) => c,
            Err(e) => return self.fail(ErrorCode::Internal, format!("{e:#}")),
        };
        let first = match &self.cfg.join_secret {
            Some(secret) => ClientMessage::Join {
                version: PROTOCOL_VERSION,
                secret: secret.clone(),
                name: self.cfg.requested_name.clone(),
                hostname: self.cfg.hostname.clone(),
                candidates: self.candidates.clone(),
                online_by_id: true,
                advertise: self.cfg.advertise.clone(),
                policy: true,
            },
            None => ClientMessage::Hello {
                version: PROTOCOL_VERSION,
                hostname: self.cfg.hostname.clone(),
                candidates: self.candidates.clone(),
                online_by_id: true,
                advertise: self.cfg.advertise.clone(),
                policy: true,
            },
        };
        // Queued in the channel; it goes out right after the handshake.
        let _ = channel.send(&messages::encode(&first));
        self.channel = Some(channel);
        self.phase = Phase::Connecting {
            server: server.clone(),
            deadline: now + CONNECT_TIMEOUT,
        };
        self.events.push_back(Event::Dial(server));
    }

    /// TCP is up. Nothing to do but note it: the first handshake message is already queued.
    pub fn handle_connected(&mut self, _now: Instant) {}

    /// The coordinator closed the TCP connection (EOF or reset). During the
    /// handshake that is how a coordinator answers a node that pinned the wrong
    /// server key: the IK responder cannot decrypt the first message and hangs up.
    pub fn handle_closed(&mut self, now: Instant) {
        let reason = match &self.phase {
            Phase::Connecting { server, .. } if !self.channel.as_ref().is_some_and(Channel::is_open) => {
                self.handshake_hangups += 1;
                if self.cfg.join_secret.is_some() && self.handshake_hangups >= JOIN_HANDSHAKE_HANGUPS {
                    // Final: ErrorCode's "wrong server or forged token" case.
                    let reason = format!(
                        "coordinator {server} hung up during the handshake {} times: \
                         the token's server key is wrong (or it is not a warren coordinator)",
                        self.handshake_hangups
                    );
                    return self.fail(ErrorCode::InviteUnknown, reason);
                }
                format!(
                    "coordinator {server} closed the connection during the handshake: \
                     the token's server key may be wrong, or it is not a warren coordinator"
                )
            }
            Phase::Connecting { server, .. } => {
                format!("coordinator {server} closed the connection before welcoming this node")
            }
            _ => "coordinator closed the connection".to_string(),
        };
        self.handle_disconnected(now, &reason);
    }

    /// TCP failed or closed.
    pub fn handle_disconnected(&mut self, now: Instant, reason: &str) {
        if matches!(self.phase, Phase::Connecting { .. } | Phase::Connected) {
            self.lost(now, reason);
        }
    }

    pub fn handle_input(&mut self, now: Instant, bytes: &[u8]) {
        let Some(channel) = self.channel.as_mut() else {
            return;
        };
        if let Err(e) = channel.receive(bytes) {
            return self.lost(now, &format!("{e:#}"));
        }
        if channel.is_open() {
            self.handshake_hangups = 0;
        }
        while let Some(raw) = self.channel.as_mut().and_then(Channel::next_message) {
            match messages::decode_server(&raw) {
                Ok(msg) => self.on_message(now, msg),
                Err(e) => return self.lost(now, &format!("{e:#}")),
            }
        }
    }

    fn on_message(&mut self, now: Instant, msg: ServerMessage) {
        self.ping_due_since = None;
        self.next_ping = now + PING_INTERVAL;
        match msg {
            ServerMessage::Welcome {
                node, relays, wgstun, ..
            } => {
                let enrolled = self.cfg.join_secret.take().is_some();
                self.failures = 0;
                self.last_error = None;
                // Stick with the server that worked.
                self.next_server = self.next_server.saturating_sub(1);
                self.phase = Phase::Connected;
                self.me = Some(node.clone());
                self.events.push_back(Event::Welcome {
                    me: node,
                    enrolled,
                    relays,
                    wgstun,
                });
            }
            ServerMessage::Policy { policy } => self.events.push_back(Event::Policy(policy)),
            ServerMessage::PeerMap { version, nodes } => {
                self.map_version = Some(version);
                let peers: BTreeMap<u64, PeerInfo> = nodes.into_iter().map(|n| (n.id, n)).collect();
                if peers != self.peers {
                    self.peers = peers;
                    self.update_me();
                    self.events.push_back(Event::MapChanged);
                }
            }
            ServerMessage::PeerMapDelta {
                version,
                upsert,
                remove,
                online,
                offline,
            } => {
                if self.map_version.is_some_and(|v| v + 1 != version) {
                    // A gap means we missed something: reconnect for a full map.
                    return self.lost(now, "peer map delta out of order");
                }
                self.map_version = Some(version);
                let mut changed = false;
                for id in remove {
                    changed |= self.peers.remove(&id).is_some();
                }
                for p in upsert {
                    changed |= self.peers.get(&p.id) != Some(&p);
                    self.peers.insert(p.id, p);
                }
                let flags = online
                    .iter()
                    .map(|id| (id, true))
                    .chain(offline.iter().map(|id| (id, false)));
                for (id, up) in flags {
                    if let Some(p) = self.peers.get_mut(id) {
                        changed |= p.online != up;
                        p.online = up;
                    }
                }
                if changed {
                    self.update_me();
                    self.events.push_back(Event::MapChanged);
                }
            }
            ServerMessage::Error {
                code: ErrorCode::UnknownNode,
                ..
            } if self.pending_key.is_some() => {
                // The rotation went through but its confirmation was lost with
                // the connection: our old key is gone, the new one is enrolled.
                self.adopt_pending_key();
                self.lost(now, "switched to the rotated key");
            }
            ServerMessage::Error { code, reason } => {
                if code.is_permanent() {
                    self.fail(code, reason);
                } else {
                    self.events.push_back(Event::Refused {
                        code,
                        reason: reason.clone(),
                        permanent: false,
                    });
                    self.lost(now, &reason);
                }
            }
            ServerMessage::Pong { .. } => {}
            // For relays only (the member feed); a node never subscribes.
            ServerMessage::Members { .. } | ServerMessage::MembersDelta { .. } => {}
        }
    }

    fn update_me(&mut self) {
        if let Some(me) = &self.me
            && let Some(fresh) = self.peers.get(&me.id)
        {
            self.me = Some(fresh.clone());
            if let Some(new) = self.pending_key
                && fresh.public_key == new.public_key()
            {
                self.adopt_pending_key();
            }
        }
    }

    fn adopt_pending_key(&mut self) {
        if let Some(new) = self.pending_key.take() {
            self.cfg.private_key = new;
            self.events.push_back(Event::KeyRotated);
        }
    }

    /// A rotation announced before a restart: adopted if the coordinator no longer knows the old key.
    pub fn restore_pending_key(&mut self, new_private: Key) {
        self.pending_key = Some(new_private);
    }

    /// Switches to a new WireGuard key: announced over this connection (the
    /// old key vouches for it), adopted once the coordinator's map shows it.
    pub fn rotate_key(&mut self, new_private: Key) -> Result<(), String> {
        if self.phase != Phase::Connected {
            return Err("not connected to the coordinator; try again when it is reachable".into());
        }
        self.pending_key = Some(new_private);
        self.send(&ClientMessage::RotateKey {
            new_public_key: new_private.public_key(),
        });
        Ok(())
    }

    fn fail(&mut self, code: ErrorCode, reason: String) {
        self.channel = None;
        self.phase = Phase::Failed {
            code,
            reason: reason.clone(),
        };
        self.events.push_back(Event::HangUp);
        self.events.push_back(Event::Refused {
            code,
            reason,
            permanent: true,
        });
    }

    /// Connection lost: hang up and schedule the next attempt.
    fn lost(&mut self, now: Instant, reason: &str) {
        if matches!(self.phase, Phase::Failed { .. }) {
            return;
        }
        self.channel = None;
        self.map_version = None;
        self.ping_due_since = None;
        self.last_error = Some(reason.to_string());
        let delay = self.backoff();
        self.failures = self.failures.saturating_add(1);
        log_warn!(
            "agent: coordinator connection lost ({reason}); retrying in {} ms",
            delay.as_millis()
        );
        self.phase = Phase::Waiting {
            retry_at: now + delay,
        };
        self.events.push_back(Event::HangUp);
    }

    /// Exponential backoff with "equal jitter": half fixed, half random, so a
    /// coordinator restart does not see every node return in the same instant.
    fn backoff(&mut self) -> Duration {
        let base = BACKOFF_MIN
            .saturating_mul(1u32 << self.failures.min(16))
            .min(BACKOFF_MAX);
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let frac = (self.rng % 1000) as f64 / 1000.0;
        base / 2 + base.mul_f64(frac / 2.0)
    }

    fn send(&mut self, msg: &ClientMessage) {
        if let Some(c) = self.channel.as_mut() {
            let _ = c.send(&messages::encode(msg));
        }
    }

    /// Reports the node's endpoint candidates now (if connected) and on every reconnect.
    pub fn set_candidates(&mut self, candidates: Vec<SocketAddr>) {
        if candidates == self.candidates {
            return;
        }
        self.candidates = candidates.clone();
        if self.phase == Phase::Connected {
            self.send(&ClientMessage::Candidates {
                endpoints: candidates,
            });
        }
    }

    /// Tells the coordinator the node leaves on purpose (`warren down`).
    pub fn goodbye(&mut self) {
        if self.phase == Phase::Connected {
            self.send(&ClientMessage::Goodbye);
        }
    }

    pub fn outgoing(&self) -> &[u8] {
        self.channel.as_ref().map(|c| c.outgoing()).unwrap_or(&[])
    }

    pub fn consume_outgoing(&mut self, n: usize) {
        if let Some(c) = self.channel.as_mut() {
            c.consume_outgoing(n);
        }
    }
}

impl crate::outgoing::Outgoing for ControlConn {
    fn outgoing(&self) -> &[u8] {
        ControlConn::outgoing(self)
    }

    fn consume_outgoing(&mut self, n: usize) {
        ControlConn::consume_outgoing(self, n)
    }
}
