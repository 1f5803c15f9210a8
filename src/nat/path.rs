//! The path to one peer (DESIGN.md "Path lifecycle"): relay first; checks
//! out of band; an upgrade agreed with the peer and proven by WireGuard's own
//! counters; a fast fall back to the relay when a direct path stops
//! answering; checks again, sooner while traffic flows.
//!
//! Sans-IO: WireGuard samples, peer messages and the time come in; messages
//! to send, path events and the endpoint WireGuard should have go out.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::candidate::{Candidate, Kind};
use super::check::CheckList;
use super::message::Message;
use crate::keys::Key;

/// From the upgrade until WireGuard must show packets arriving directly.
pub const UPGRADE_DEADLINE: Duration = Duration::from_secs(3);
/// Tunnel probes while an upgrade is being proven or a direct path is in doubt:
/// they make both WireGuards send on the new path (and punch their NATs).
pub const PROBE_INTERVAL: Duration = Duration::from_millis(200);
/// Outgoing traffic with nothing received for this long puts a direct path in doubt.
pub const DIRECT_SILENCE: Duration = Duration::from_secs(1);
/// In doubt this long with nothing received (probes unanswered): back to the relay.
pub const SUSPECT_DEADLINE: Duration = Duration::from_secs(1);
/// An idle direct peer still sends a WireGuard keepalive every 25 s; two
/// missing ones and some slack put the path in doubt without traffic.
pub const KEEPALIVE_SILENCE: Duration = Duration::from_secs(60);
/// Re-check interval on the relay while traffic flows.
pub const RECHECK_ACTIVE: Duration = Duration::from_secs(5);
/// Idle peers on the relay back off to this between checks.
pub const RECHECK_IDLE_MAX: Duration = Duration::from_secs(60);
/// Idle re-checks start on multiples of this (see `PeerPath::next_check`).
pub const RECHECK_GRID: Duration = Duration::from_secs(5);
/// First ban of a pair whose upgrade failed or whose direct path died; doubles per failure.
pub const BAN_INITIAL: Duration = Duration::from_secs(5);
pub const BAN_MAX: Duration = Duration::from_secs(60);
/// WireGuard's session must be younger than this to move a peer without a
/// new handshake. Both sides send the moment their endpoints change; two
/// handshake initiations that cross leave both WireGuards waiting as
/// responders until the 5 s retry (seen with wireguard-go), and keys older
/// than 120 s are renewed on the next send.
pub const SESSION_FRESH: Duration = Duration::from_secs(110);
/// How long a passing check waits for that session before upgrading anyway.
pub const WARM_DEADLINE: Duration = Duration::from_secs(3);
/// More than keepalives and handshakes (about 3 B/s): the peer carries traffic.
pub const ACTIVE_BYTES_PER_SEC: u64 = 40;

/// WARREN_NAT_DEBUG=1 logs every state change of every peer's path.
pub(crate) fn debug() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("WARREN_NAT_DEBUG").is_some())
}

/// Wall-clock seconds for debug lines, to line them up with a test's own stamps.
pub(crate) fn stamp() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Which channel a message goes over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// Sealed, through the peer's home relay.
    Relay,
    /// Sealed, from our check socket to this address (or received from it).
    Check(SocketAddr),
    /// Sealed, through WireGuard to the peer's mesh address.
    Tunnel,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transmit {
    pub peer: Key,
    pub via: Via,
    pub msg: Message,
}

/// One sample of WireGuard's view of the peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sample {
    pub endpoint: Option<SocketAddr>,
    /// The endpoint is our relay socket for this peer.
    pub relayed: bool,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    /// Time since WireGuard's last handshake with the peer.
    pub handshake_age: Option<Duration>,
}

/// Which relayed datagrams from a peer reach WireGuard.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mute {
    None,
    /// WireGuard transport data is dropped; handshakes pass.
    Data,
    All,
}

/// What WireGuard's endpoint for the peer should be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Desired {
    Relay,
    Dial(SocketAddr),
    /// Leave WireGuard's endpoint alone: it follows the peer by roaming.
    Keep,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathEvent {
    pub peer: Key,
    pub from: String,
    pub to: String,
    pub why: String,
}

/// Why a peer is on the relay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reason {
    NoCandidates,
    ChecksFailing,
    Banned(Instant),
    Lost,
    PeerFailed,
}

#[derive(Clone, Copy, Debug)]
struct Pair {
    /// Our kind as the peer reaches us, when known.
    local: Option<(SocketAddr, Kind)>,
    /// The peer's candidate we dial; None when WireGuard learns it by roaming.
    remote: Option<Candidate>,
    rtt: Option<Duration>,
}

enum State {
    Relay {
        reason: Reason,
        next_check: Option<Instant>,
    },
    Checking {
        list: CheckList,
    },
    Upgrading {
        pair: Pair,
        started: Instant,
        baseline: Option<u64>,
        next_probe: Instant,
    },
    Direct {
        pair: Pair,
        rx_changed: Instant,
        suspect: Option<Instant>,
        next_probe: Instant,
    },
}

struct Ban {
    until: Instant,
    length: Duration,
}

pub struct PeerPath {
    pub key: Key,
    /// Deterministic tie-break: the side with the larger key decides the pair.
    controlling: bool,
    remote: Vec<Candidate>,
    remote_generation: Option<u64>,
    state: State,
    since: Instant,
    bans: HashMap<SocketAddr, Ban>,
    idle_backoff: Duration,
    last_sample: Option<(Instant, Sample)>,
    active: bool,
    /// The peer's upgrade we acted on last, so a copy over a second channel is ignored.
    peer_upgrade: Option<u64>,
    checking_since: Instant,
    /// The generation of our candidates the peer last said it holds.
    acked: u64,
    /// The last network change here or at the peer.
    network_changed_at: Option<Instant>,
    /// Next tunnel probe over the relay that makes WireGuard handshake
    /// before an upgrade (sent by the controlling side only, so the two
    /// handshakes never cross).
    next_warm: Instant,
}

/// Connectivity checks of all peers since start: what an operator reads
/// to tell "checks never answered" (a firewall) from "checks pass but no
/// upgrade" (WireGuard not following).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CheckCounts {
    pub pings_sent: u64,
    /// Pongs that proved a round trip to the address checked.
    pub pongs_valid: u64,
    /// Check rounds that found a pair and started an upgrade.
    pub rounds_passed: u64,
    /// Check rounds that ended without a usable pair.
    pub rounds_failed: u64,
}

/// What a path emits; the caller owns the queues.
pub struct Out<'a> {
    pub transmits: &'a mut VecDeque<Transmit>,
    pub events: &'a mut VecDeque<PathEvent>,
    pub checks: &'a mut CheckCounts,
    /// Seed of transaction and message ids (xorshift).
    pub rng: &'a mut u64,
    /// Our own candidates: to tell which one the peer reached.
    pub local: &'a [Candidate],
    /// Origin of the grid idle re-checks are aligned to.
    pub grid: Instant,
}

impl Out<'_> {
    pub fn next_id(&mut self) -> u64 {
        *self.rng ^= *self.rng << 13;
        *self.rng ^= *self.rng >> 7;
        *self.rng ^= *self.rng << 17;
        *self.rng
    }
}

impl PeerPath {
    pub fn new(now: Instant, me: &Key, key: Key) -> PeerPath {
        PeerPath {
            key,
            controlling: me.0 > key.0,
            remote: Vec::new(),
            remote_generation: None,
            state: State::Relay {
                reason: Reason::NoCandidates,
                next_check: None,
            },
            since: now,
            bans: HashMap::new(),
            idle_backoff: RECHECK_ACTIVE,
            last_sample: None,
            active: false,
            peer_upgrade: None,
            checking_since: now,
            acked: 0,
            network_changed_at: None,
            next_warm: now,
        }
    }

    fn session_fresh(&self) -> bool {
        self.last_sample
            .and_then(|(_, s)| s.handshake_age)
            .is_some_and(|a| a < SESSION_FRESH)
    }

    /// Whether a candidate list of `generation` would be news.
    pub fn has_remote_older(&self, generation: u64) -> bool {
        self.remote_generation.is_none_or(|g| g < generation)
    }

    /// Whether the peer has told us it holds our list of `generation`.
    pub fn acked(&self, generation: u64) -> bool {
        self.acked >= generation
    }

    pub fn remote_generation(&self) -> u64 {
        self.remote_generation.unwrap_or(0)
    }

    /// Takes over what `old` knew of the peer's candidates (a key rotation
    /// on either side) and checks them at once.
    pub fn inherit(&mut self, now: Instant, old: &PeerPath) {
        self.remote = old.remote.clone();
        self.remote_generation = old.remote_generation;
        self.start_checks(now);
    }

    /// The port the peer's check socket is bound to, from its local candidates.
    pub fn check_port(&self) -> Option<u16> {
        self.remote
            .iter()
            .find(|c| c.kind == Kind::Local)
            .map(|c| c.check.port())
    }

    /// The peer announced somewhere to check.
    pub fn has_candidates(&self) -> bool {
        !self.remote.is_empty()
    }

    pub fn has_remote(&self) -> bool {
        self.remote_generation.is_some()
    }

    pub fn is_direct(&self) -> bool {
        matches!(self.state, State::Direct { .. })
    }

    /// Relayed datagrams must not reach WireGuard once the peer is direct:
    /// they would pull its endpoint straight back to the relay socket
    /// (WireGuard roams to wherever authenticated packets come from). While
    /// an upgrade is being proven, handshake messages still pass: one in
    /// flight over the relay would otherwise be lost, and WireGuard retries
    /// only after 5 s. The endpoint they pull back is set again at once.
    pub fn mute(&self) -> Mute {
        match self.state {
            State::Upgrading { .. } => Mute::Data,
            State::Direct { .. } => Mute::All,
            _ => Mute::None,
        }
    }

    pub fn desired(&self) -> Desired {
        match &self.state {
            State::Upgrading {
                pair: Pair { remote: Some(c), .. },
                ..
            } => Desired::Dial(c.wg),
            State::Upgrading { .. } | State::Direct { .. } => Desired::Keep,
            _ => Desired::Relay,
        }
    }

    fn label_debug(&self) -> String {
        match &self.state {
            State::Relay { reason, .. } => format!("relay {reason:?}"),
            State::Checking { list } => format!("checking {} targets", list.targets.len()),
            _ => self.label(),
        }
    }

    fn label(&self) -> String {
        match &self.state {
            State::Direct { pair, .. } => format!("direct {}", describe(pair)),
            State::Upgrading { pair, .. } => format!("upgrading {}", describe(pair)),
            _ => "relay".into(),
        }
    }

    fn set_state(&mut self, now: Instant, state: State, why: String, out: &mut Out) {
        let was_direct = self.is_direct();
        let from = self.label();
        self.state = state;
        let is_direct = self.is_direct();
        if debug() {
            log!(
                "nat {:.3}: {}: {} -> {} {why}",
                stamp(),
                self.key.short(),
                from,
                self.label_debug()
            );
        }
        if was_direct != is_direct {
            self.since = now;
            out.events.push_back(PathEvent {
                peer: self.key,
                from,
                to: self.label(),
                why,
            });
        }
    }

    fn banned(&self, now: Instant, c: &Candidate) -> bool {
        self.bans.get(&c.wg).is_some_and(|b| now < b.until)
    }

    fn ban(&mut self, now: Instant, addr: SocketAddr) {
        let length = match self.bans.get(&addr) {
            Some(b) => (b.length * 2).min(BAN_MAX),
            None => BAN_INITIAL,
        };
        self.bans.insert(
            addr,
            Ban {
                until: now + length,
                length,
            },
        );
    }

    /// When to check again from the relay. Long-idle peers' re-checks land on a
    /// grid shared by all peers ([`RECHECK_GRID`] from `out.grid`), so a
    /// hundred relayed peers wake the agent for one round of checks, not a hundred.
    fn next_check(&mut self, now: Instant, out: &Out) -> Instant {
        if self.active {
            self.idle_backoff = RECHECK_ACTIVE;
            return now + RECHECK_ACTIVE;
        }
        let d = self.idle_backoff;
        self.idle_backoff = (self.idle_backoff * 2).min(RECHECK_IDLE_MAX);
        // The first retries stay prompt: a round often fails only because the
        // peer's mapping was not known yet.
        if d < RECHECK_IDLE_MAX / 2 {
            return now + d;
        }
        let at = (now + d).saturating_duration_since(out.grid);
        let step = RECHECK_GRID.as_millis();
        let slots = at.as_millis().div_ceil(step);
        out.grid + Duration::from_millis((slots * step) as u64)
    }

    fn start_checks(&mut self, now: Instant) {
        if self.remote.is_empty() {
            self.state = State::Relay {
                reason: Reason::NoCandidates,
                next_check: None,
            };
            return;
        }
        self.state = State::Checking {
            list: CheckList::new(now, &self.remote),
        };
        self.checking_since = now;
        if debug() {
            log!(
                "nat {:.3}: {}: checking {} candidates",
                stamp(),
                self.key.short(),
                self.remote.len()
            );
        }
    }

    /// The network changed here or at the peer: check again now, and
    /// confirm a direct path still answers.
    pub fn network_changed(&mut self, now: Instant) {
        self.idle_backoff = RECHECK_ACTIVE;
        self.network_changed_at = Some(now);
        match &mut self.state {
            // A check run on the old lists would fail and wait for the next
            // round: start over on the new ones.
            State::Relay { .. } | State::Checking { .. } => self.start_checks(now),
            State::Direct {
                suspect, next_probe, ..
            } => {
                suspect.get_or_insert(now);
                *next_probe = now;
            }
            _ => {}
        }
    }

    pub fn handle_message(&mut self, now: Instant, via: Via, msg: Message, out: &mut Out) {
        match msg {
            Message::Candidates {
                generation,
                known,
                list,
            } => {
                self.acked = self.acked.max(known);
                if self.remote_generation.is_some_and(|g| g >= generation) {
                    return;
                }
                if debug() {
                    log!(
                        "nat {:.3}: {}: candidates {generation}: {list:?}",
                        stamp(),
                        self.key.short()
                    );
                }
                self.remote_generation = Some(generation);
                self.remote = list;
                self.bans.clear();
                // The peer's network changed: what failed may work now.
                self.network_changed(now);
            }
            Message::CheckPing { txid } => {
                let Via::Check(src) = via else { return };
                out.transmits.push_back(Transmit {
                    peer: self.key,
                    via: Via::Check(src),
                    msg: Message::CheckPong { txid, observed: src },
                });
                // The peer is checking: check back, so our pings open our NAT for its.
                if let State::Relay { reason, .. } = self.state
                    && !matches!(reason, Reason::Banned(until) if now < until)
                {
                    self.start_checks(now);
                }
                if let State::Checking { list } = &mut self.state {
                    list.learn(src);
                }
            }
            Message::CheckPong { txid, observed } => {
                let Via::Check(src) = via else { return };
                if let State::Checking { list } = &mut self.state
                    && list.handle_pong(now, txid, src, observed)
                {
                    out.checks.pongs_valid += 1;
                }
                self.decide(now, out);
            }
            Message::Upgrade { id, dial, suggest } => self.peer_upgraded(now, id, dial, suggest, out),
            Message::Downgrade { .. } => {
                if self.mute() != Mute::None {
                    // The peer banned the pair if its upgrade failed; a lost
                    // path needs no ban: checks fail for as long as it is down.
                    let next = self.next_check(now, out);
                    self.set_state(
                        now,
                        State::Relay {
                            reason: Reason::PeerFailed,
                            next_check: Some(next),
                        },
                        "the peer's direct path stopped working".into(),
                        out,
                    );
                }
            }
            Message::Probe { txid } => out.transmits.push_back(Transmit {
                peer: self.key,
                via: Via::Tunnel,
                msg: Message::ProbeReply { txid },
            }),
            // The answer comes through WireGuard, so the next sample shows it.
            Message::ProbeReply { .. } => {}
        }
    }

    fn current_remote(&self) -> Option<Candidate> {
        match &self.state {
            State::Upgrading { pair, .. } | State::Direct { pair, .. } => pair.remote,
            _ => None,
        }
    }

    /// Our candidate the peer reached, told by how it saw our check socket.
    fn local_for(observed: SocketAddr, local: &[Candidate]) -> Option<(SocketAddr, Kind)> {
        local
            .iter()
            .find(|c| c.check == observed)
            .map(|c| (c.wg, c.kind))
            .or(Some((observed, Kind::PeerReflexive)))
    }

    /// Checks produced a result (or ran out): upgrade, or wait on the relay.
    fn decide(&mut self, now: Instant, out: &mut Out) {
        let State::Checking { list } = &self.state else {
            return;
        };
        if !list.ready(now) {
            return;
        }
        let best = list.best(|c| !self.banned(now, c)).map(|(t, s)| (t.candidate, s));
        match best {
            Some(_) if !self.session_fresh() && now < self.checking_since + WARM_DEADLINE => {}
            Some((remote, success)) => {
                let local = Self::local_for(success.observed, out.local);
                let suggest = local.filter(|(_, k)| *k != Kind::PeerReflexive).map(|(a, _)| a);
                let pair = Pair {
                    local,
                    remote: Some(remote),
                    rtt: Some(success.rtt),
                };
                let id = out.next_id();
                let upgrade = Message::Upgrade {
                    id,
                    dial: Some(remote.wg),
                    suggest,
                };
                // Over the path just checked (fast, works without the relay) and the relay.
                for via in [Via::Check(remote.check), Via::Relay] {
                    out.transmits.push_back(Transmit {
                        peer: self.key,
                        via,
                        msg: upgrade.clone(),
                    });
                }
                out.checks.rounds_passed += 1;
                self.begin_upgrade(now, pair, out);
            }
            None if list.finished(now) => {
                out.checks.rounds_failed += 1;
                // Every passing pair is banned: say so rather than "failing".
                let banned_until = list
                    .targets
                    .iter()
                    .filter(|t| t.success.is_some() && t.dialable())
                    .filter_map(|t| self.bans.get(&t.candidate.wg).map(|b| b.until))
                    .max();
                let reason = match banned_until {
                    Some(until) => Reason::Banned(until),
                    None => Reason::ChecksFailing,
                };
                let next = self.next_check(now, out);
                let next = match banned_until {
                    Some(u) => next.max(u),
                    None => next,
                };
                self.set_state(
                    now,
                    State::Relay {
                        reason,
                        next_check: Some(next),
                    },
                    "checks done".into(),
                    out,
                );
            }
            None => {}
        }
    }

    fn begin_upgrade(&mut self, now: Instant, pair: Pair, out: &mut Out) {
        self.set_state(
            now,
            State::Upgrading {
                pair,
                started: now,
                baseline: None,
                next_probe: now,
            },
            String::new(),
            out,
        );
    }

    fn peer_upgraded(
        &mut self,
        now: Instant,
        id: u64,
        dial: Option<SocketAddr>,
        suggest: Option<SocketAddr>,
        out: &mut Out,
    ) {
        if self.peer_upgrade == Some(id) {
            return;
        }
        self.peer_upgrade = Some(id);
        let ours_stands =
            matches!(self.state, State::Upgrading { .. } | State::Direct { .. }) && self.controlling;
        if ours_stands {
            return;
        }
        // The peer dials `dial` (one of our candidates); we dial what it
        // suggests unless banned, else our own best, else learn by roaming.
        let local = dial.map(|d| {
            let kind = out
                .local
                .iter()
                .find(|c| c.wg == d)
                .map_or(Kind::PeerReflexive, |c| c.kind);
            (d, kind)
        });
        let suggested = suggest.and_then(|s| {
            self.remote
                .iter()
                .find(|c| c.wg == s)
                .copied()
                .or(Some(Candidate {
                    kind: Kind::PeerReflexive,
                    wg: s,
                    check: s,
                }))
        });
        let own_best = match &self.state {
            State::Checking { list } => list
                .best(|c| !self.banned(now, c))
                .map(|(t, s)| (t.candidate, s.rtt)),
            _ => None,
        };
        let (remote, rtt) = match suggested.filter(|c| !self.banned(now, c)) {
            Some(c) => (Some(c), own_best.filter(|(b, _)| b.wg == c.wg).map(|(_, r)| r)),
            None => match own_best {
                Some((c, r)) => (Some(c), Some(r)),
                None => (None, None),
            },
        };
        self.begin_upgrade(now, Pair { local, remote, rtt }, out);
    }

    pub fn handle_sample(&mut self, now: Instant, s: Sample, out: &mut Out) {
        let prev = self.last_sample.replace((now, s));
        let prev_at = prev.map(|(t, _)| t);
        let (rx_grew, active_tx) = match prev {
            Some((t, p)) => {
                let secs = now.saturating_duration_since(t).as_secs_f64().max(0.001);
                let dtx = s.tx_bytes.saturating_sub(p.tx_bytes);
                let drx = s.rx_bytes.saturating_sub(p.rx_bytes);
                let rate = |d: u64| (d as f64 / secs) as u64;
                self.active = rate(dtx) > ACTIVE_BYTES_PER_SEC || rate(drx) > ACTIVE_BYTES_PER_SEC;
                (s.rx_bytes > p.rx_bytes, rate(dtx) > ACTIVE_BYTES_PER_SEC)
            }
            None => (false, false),
        };
        if debug() && matches!(self.state, State::Direct { .. }) {
            log!(
                "nat {:.3}: {}: direct sample rx {} tx {} active {}",
                stamp(),
                self.key.short(),
                s.rx_bytes,
                s.tx_bytes,
                self.active
            );
        }
        match &mut self.state {
            State::Upgrading {
                pair,
                started,
                baseline,
                ..
            } => {
                if debug() {
                    log!(
                        "nat {:.3}: {}: upgrade sample {s:?} baseline {baseline:?}",
                        stamp(),
                        self.key.short()
                    );
                }
                let Some(base) = *baseline else {
                    // Taken after the relay was muted: later bytes came directly.
                    *baseline = Some(s.rx_bytes);
                    return;
                };
                if s.relayed {
                    // A relayed handshake came through: count only what arrives after it.
                    *baseline = Some(s.rx_bytes);
                } else if s.endpoint.is_some() && s.rx_bytes > base {
                    let mut pair = *pair;
                    if pair.remote.is_none_or(|c| Some(c.wg) != s.endpoint) {
                        // WireGuard follows the peer to where its packets come from.
                        pair.remote = s.endpoint.map(|e| remote_for(&self.remote, e));
                    }
                    let why = match pair.rtt {
                        Some(rtt) => format!(
                            "checks passed (rtt {:.1} ms), WireGuard receives on it",
                            rtt.as_secs_f64() * 1e3
                        ),
                        None => "the peer dialled us, WireGuard receives on it".into(),
                    };
                    self.idle_backoff = RECHECK_ACTIVE;
                    // Proven: whatever failed on this pair before is forgiven.
                    if let Some(c) = pair.remote {
                        self.bans.remove(&c.wg);
                    }
                    self.set_state(
                        now,
                        State::Direct {
                            pair,
                            rx_changed: now,
                            suspect: None,
                            next_probe: now,
                        },
                        why,
                        out,
                    );
                } else if now >= *started + UPGRADE_DEADLINE {
                    self.fail_upgrade(now, out);
                }
            }
            State::Direct {
                pair,
                rx_changed,
                suspect,
                next_probe,
            } => {
                if s.relayed {
                    // Only we set the relay socket, and only on the relay path.
                    self.lose(now, "WireGuard's endpoint is the relay socket again", out);
                    return;
                }
                if let Some(e) = s.endpoint
                    && pair.remote.is_none_or(|c| c.wg != e)
                {
                    pair.remote = Some(remote_for(&self.remote, e));
                }
                if rx_grew {
                    // After a long gap between samples the bytes may be seconds
                    // old (traffic that started on a path that died since): count
                    // them from the previous sample, so outgoing traffic with
                    // nothing newer puts the path in doubt at once; a probe
                    // clears it within a sample if the path is fine.
                    let since = prev_at.unwrap_or(now);
                    if now.saturating_duration_since(since) <= DIRECT_SILENCE || !active_tx {
                        *rx_changed = now;
                        *suspect = None;
                        return;
                    }
                    *rx_changed = since;
                }
                let silent = now.saturating_duration_since(*rx_changed);
                if suspect.is_none()
                    && ((active_tx && silent >= DIRECT_SILENCE) || silent >= KEEPALIVE_SILENCE)
                {
                    *suspect = Some(now);
                    *next_probe = now;
                }
                if suspect.is_some_and(|t| now >= t + SUSPECT_DEADLINE) {
                    self.lose(
                        now,
                        &format!("nothing received for {:.1} s", silent.as_secs_f64()),
                        out,
                    );
                }
            }
            _ => {}
        }
    }

    /// Leaving a direct or upgrading path: ban the pair and tell the peer,
    /// whose relay socket is muted and would drop what we now relay.
    fn abandon_pair(&mut self, out: &mut Out) {
        let id = out.next_id();
        out.transmits.push_back(Transmit {
            peer: self.key,
            via: Via::Relay,
            msg: Message::Downgrade { id },
        });
    }

    /// Checks passed but WireGuard received nothing: the pair is banned (a
    /// firewall that passes the check port but not WireGuard's, say), with
    /// a longer ban each time, so checks that keep passing cannot make it flap.
    fn fail_upgrade(&mut self, now: Instant, out: &mut Out) {
        if let Some(c) = self.current_remote() {
            self.ban(now, c.wg);
        }
        self.abandon_pair(out);
        let next = self.next_check(now, out);
        self.set_state(
            now,
            State::Relay {
                reason: Reason::ChecksFailing,
                next_check: Some(next),
            },
            "WireGuard received nothing on the new endpoint in time".into(),
            out,
        );
    }

    /// A direct path that worked stopped answering. No ban: checks fail for
    /// as long as it is down, and pass again the moment it heals.
    fn lose(&mut self, now: Instant, why: &str, out: &mut Out) {
        self.abandon_pair(out);
        // Traffic was flowing: re-check at the active pace; at once when the
        // network just changed (the path died of it, a new one may be there).
        self.active = true;
        let mut next = self.next_check(now, out);
        if self
            .network_changed_at
            .is_some_and(|t| now.saturating_duration_since(t) < RECHECK_ACTIVE)
        {
            next = now;
        }
        self.set_state(
            now,
            State::Relay {
                reason: Reason::Lost,
                next_check: Some(next),
            },
            why.to_string(),
            out,
        );
    }

    pub fn handle_timeout(&mut self, now: Instant, out: &mut Out) {
        match &mut self.state {
            State::Relay {
                next_check: Some(t), ..
            } if now >= *t => self.start_checks(now),
            State::Upgrading {
                started, next_probe, ..
            } => {
                if now >= *next_probe {
                    *next_probe = now + PROBE_INTERVAL;
                    let id = out.next_id();
                    out.transmits.push_back(Transmit {
                        peer: self.key,
                        via: Via::Tunnel,
                        msg: Message::Probe { txid: id },
                    });
                }
                // Without a sample in time (WireGuard unreadable), give up too.
                if now >= *started + UPGRADE_DEADLINE + PROBE_INTERVAL * 5 {
                    self.fail_upgrade(now, out);
                }
            }
            State::Direct {
                suspect: Some(_),
                next_probe,
                ..
            } if now >= *next_probe => {
                *next_probe = now + PROBE_INTERVAL;
                let id = out.next_id();
                out.transmits.push_back(Transmit {
                    peer: self.key,
                    via: Via::Tunnel,
                    msg: Message::Probe { txid: id },
                });
            }
            _ => {}
        }
        if matches!(self.state, State::Checking { .. })
            && self.controlling
            && !self.session_fresh()
            && now >= self.next_warm
        {
            self.next_warm = now + PROBE_INTERVAL;
            let id = out.next_id();
            out.transmits.push_back(Transmit {
                peer: self.key,
                via: Via::Tunnel,
                msg: Message::Probe { txid: id },
            });
        }
        if let State::Checking { list } = &mut self.state {
            let txid = out.next_id();
            if let Some(p) = list.poll_ping(now, txid) {
                out.checks.pings_sent += 1;
                out.transmits.push_back(Transmit {
                    peer: self.key,
                    via: Via::Check(p.to),
                    msg: Message::CheckPing { txid: p.txid },
                });
            }
            self.decide(now, out);
        }
    }

    pub fn poll_timeout(&self, now: Instant) -> Option<Instant> {
        match &self.state {
            State::Relay { next_check, .. } => *next_check,
            State::Checking { list } => {
                let mut t = list.poll_timeout(now);
                if !self.session_fresh() {
                    let warm = if self.controlling {
                        self.next_warm
                    } else {
                        self.checking_since + WARM_DEADLINE
                    };
                    t = Some(t.map_or(warm, |x| x.min(warm)));
                }
                t
            }
            State::Upgrading {
                next_probe, started, ..
            } => Some((*next_probe).min(*started + UPGRADE_DEADLINE + PROBE_INTERVAL * 5)),
            State::Direct {
                suspect: Some(_),
                next_probe,
                ..
            } => Some(*next_probe),
            State::Direct { .. } => None,
        }
    }

    /// How soon WireGuard should be sampled for this peer.
    pub fn sample_interval(&self) -> Option<Duration> {
        match &self.state {
            // Each sample blocks the loop for a WireGuard read, and the loop
            // carries relayed traffic: sample fast only while it decides something.
            State::Checking { .. } if !self.session_fresh() => Some(PROBE_INTERVAL),
            State::Upgrading { .. } | State::Direct { suspect: Some(_), .. } => Some(PROBE_INTERVAL),
            State::Direct { .. } if self.active => Some(Duration::from_millis(500)),
            _ => None,
        }
    }

    pub fn status(&self, now: Instant) -> PathStatus {
        let reason = match &self.state {
            State::Relay { reason, .. } => Some(match reason {
                Reason::NoCandidates if !self.has_remote() => "no candidates yet".to_string(),
                Reason::NoCandidates => "no candidates: the peer announced none".to_string(),
                Reason::ChecksFailing => "checks failing".to_string(),
                Reason::Banned(until) => format!(
                    "banned until {} s from now: its direct path failed",
                    until.saturating_duration_since(now).as_secs()
                ),
                Reason::Lost => "checks failing: the direct path stopped answering".to_string(),
                Reason::PeerFailed => "checks failing: the peer's direct path stopped answering".to_string(),
            }),
            State::Checking { .. } => Some("checking".to_string()),
            State::Upgrading { .. } => Some("checking: upgrading".to_string()),
            State::Direct { .. } => None,
        };
        let pair = match &self.state {
            State::Direct { pair, .. } => Some(*pair),
            _ => None,
        };
        PathStatus {
            direct: self.is_direct(),
            local: pair.and_then(|p| p.local),
            remote: pair.and_then(|p| p.remote).map(|c| (c.wg, c.kind)),
            remote_check: pair
                .and_then(|p| p.remote)
                .filter(|c| c.kind != Kind::PeerReflexive)
                .map(|c| c.check),
            rtt: pair.and_then(|p| p.rtt),
            since: self.since,
            reason,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathStatus {
    pub direct: bool,
    pub local: Option<(SocketAddr, Kind)>,
    pub remote: Option<(SocketAddr, Kind)>,
    /// The peer's check socket on the direct path, when it announced it.
    pub remote_check: Option<SocketAddr>,
    pub rtt: Option<Duration>,
    pub since: Instant,
    pub reason: Option<String>,
}

/// The peer's candidate behind WireGuard endpoint `e`, or a peer-reflexive
/// one (whose check endpoint is unknown: `check` is then only a placeholder
/// and never used, see [`PathStatus::remote_check`]).
fn remote_for(remote: &[Candidate], e: SocketAddr) -> Candidate {
    remote.iter().find(|c| c.wg == e).copied().unwrap_or(Candidate {
        kind: Kind::PeerReflexive,
        wg: e,
        check: e,
    })
}

fn describe(p: &Pair) -> String {
    let remote = match p.remote {
        Some(c) => format!("{} ({})", c.wg, c.kind),
        None => "learned by roaming".into(),
    };
    let local = p.local.map_or("?".to_string(), |(_, k)| k.to_string());
    match p.rtt {
        Some(rtt) => format!("to {remote}, ours {local}, rtt {:.1} ms", rtt.as_secs_f64() * 1e3),
        None => format!("to {remote}, ours {local}"),
    }
}
