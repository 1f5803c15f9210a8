//! NAT traversal for the whole agent: our candidates (gathered locally and
//! by STUN), their exchange with every peer, and one [`PeerPath`] per peer.
//! The agent's mio loop feeds it sockets' input, WireGuard samples and the
//! time, seals what it emits and applies the endpoints it asks for.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::candidate::{Candidate, Kind};
use super::gather::{Gather, Mappings, Socket, StunRequest};
use super::message::{MAX_CANDIDATES, Message};
use super::path::{CheckCounts, Desired, Mute, Out, PathEvent, PathStatus, PeerPath, Sample, Transmit, Via};
use crate::keys::Key;

/// WireGuard is sampled this often when nothing is in progress: it drives
/// re-checks of relayed peers and the idle check of direct ones, and it
/// bounds how long traffic that starts on a path that died while idle goes
/// unnoticed (then about 1.2 s more to fall back). It is the agent's main
/// periodic wake-up, and reading 100 peers from wireguard-go costs several
/// blocking reads: at 5 s an agent with direct peers measured 0.57 wake-ups
/// per second against a budget of 0.5 in all.
pub const SAMPLE_IDLE: Duration = Duration::from_secs(10);
/// The same when no peer is direct or has candidates to check (alone in
/// the mesh, or only peers that are not agents): samples decide nothing then,
/// and the agent's own full check of the interface runs at this pace.
pub const SAMPLE_NOTHING_TO_DO: Duration = Duration::from_secs(60);
/// Our candidates go again to a peer whose own we have not received yet:
/// the first copy may have met a relay that was still connecting. The
/// interval doubles up to [`CANDIDATE_RESEND_MAX`] for peers that never
/// answer (an agent too old to, or a node that is not an agent).
pub const CANDIDATE_RESEND: Duration = Duration::from_secs(5);
pub const CANDIDATE_RESEND_MAX: Duration = Duration::from_secs(120);

pub struct Traversal {
    me: Key,
    check_port: u16,
    local: Vec<Candidate>,
    /// The router's mapping of both sockets, when port mapping holds one.
    portmap: Option<Candidate>,
    gather: Gather,
    generation: u64,
    peers: HashMap<Key, PeerPath>,
    /// Node id → its current key, to follow a key rotation.
    ids: HashMap<u64, Key>,
    io: Shared,
    last_sample: Instant,
    /// A decision was made that a sample proves or refutes: sample now.
    sample_now: bool,
    next_resend: Instant,
    resend_interval: Duration,
}

/// What every peer's path writes to: the queues, the id source, our
/// candidates and the re-check grid (apart from `peers`, so a path can be
/// borrowed next to it).
struct Shared {
    transmits: VecDeque<Transmit>,
    events: VecDeque<PathEvent>,
    checks: CheckCounts,
    rng: u64,
    announced: Vec<Candidate>,
    grid: Instant,
}

impl Shared {
    fn out(&mut self) -> Out<'_> {
        Out {
            transmits: &mut self.transmits,
            events: &mut self.events,
            checks: &mut self.checks,
            rng: &mut self.rng,
            local: &self.announced,
            grid: self.grid,
        }
    }
}

impl Traversal {
    /// `generation` must grow across restarts (a wall-clock epoch), so peers
    /// take a restarted agent's candidates over the old ones.
    pub fn new(now: Instant, me: Key, check_port: u16, generation: u64, seed: u64) -> Traversal {
        Traversal {
            me,
            check_port,
            local: Vec::new(),
            portmap: None,
            gather: Gather::new(seed ^ 0x9e37_79b9_7f4a_7c15),
            generation,
            peers: HashMap::new(),
            ids: HashMap::new(),
            io: Shared {
                transmits: VecDeque::new(),
                events: VecDeque::new(),
                checks: CheckCounts::default(),
                rng: seed | 1,
                announced: Vec::new(),
                grid: now,
            },
            last_sample: now,
            sample_now: true,
            next_resend: now + CANDIDATE_RESEND,
            resend_interval: CANDIDATE_RESEND,
        }
    }

    pub fn public_key(&self) -> Key {
        self.me
    }

    /// Our key changed (rotation): peers see a new node.
    /// WireGuard starts new sessions under the new key, so every path starts
    /// over; what peers announced stays valid (checks start at once, without
    /// waiting for the relay), and they get our list again, under the new key.
    pub fn rekey(&mut self, now: Instant, me: Key) {
        self.me = me;
        self.generation += 1;
        for p in self.peers.values_mut() {
            let mut fresh = PeerPath::new(now, &me, p.key);
            fresh.inherit(now, p);
            *p = fresh;
        }
        let keys: Vec<Key> = self.peers.keys().copied().collect();
        for k in keys {
            let msg = self.candidates_message(&k);
            self.io.transmits.push_back(Transmit {
                peer: k,
                via: Via::Relay,
                msg,
            });
        }
    }

    /// The peer map, by node id and key: paths for new peers, who also get
    /// our candidates. A node that rotated its key is a new WireGuard peer,
    /// but its candidates carry over, so it can go direct again even with
    /// the relay gone.
    pub fn set_peers(&mut self, now: Instant, peers: &[(u64, Key)]) {
        let mut inherited = Vec::new();
        for (id, key) in peers {
            if let Some(old) = self.ids.insert(*id, *key)
                && old != *key
                && let Some(path) = self.peers.remove(&old)
            {
                inherited.push((*key, path));
            }
        }
        self.ids.retain(|id, _| peers.iter().any(|(i, _)| i == id));
        self.peers.retain(|k, _| peers.iter().any(|(_, key)| key == k));
        for (_, k) in peers {
            if !self.peers.contains_key(k) {
                let mut path = PeerPath::new(now, &self.me, *k);
                if let Some((_, old)) = inherited.iter().find(|(key, _)| key == k) {
                    path.inherit(now, old);
                }
                self.peers.insert(*k, path);
                let msg = self.candidates_message(k);
                self.io.transmits.push_back(Transmit {
                    peer: *k,
                    via: Via::Relay,
                    msg,
                });
            }
        }
    }

    /// Where to ask STUN: the WG-STUN server inside the tunnel and its plain STUN address.
    pub fn set_stun_servers(&mut self, now: Instant, tunnel: Option<SocketAddr>, check: Option<SocketAddr>) {
        self.gather.configure(now, tunnel, check);
    }

    /// The addresses of our interfaces changed (or were read for the first time).
    pub fn set_local(&mut self, now: Instant, local: Vec<Candidate>) {
        if local == self.local {
            return;
        }
        self.local = local;
        self.resend_interval = CANDIDATE_RESEND;
        self.next_resend = self.next_resend.min(now + CANDIDATE_RESEND);
        self.gather.refresh(now);
        for p in self.peers.values_mut() {
            p.network_changed(now);
        }
        self.announce(now);
    }

    /// The router mapped our sockets, changed the mapping or lost it:
    /// peers hear of it at once (they check the new candidate; a lost one
    /// simply stops passing).
    pub fn set_portmap(&mut self, now: Instant, mapped: Option<Candidate>) {
        if mapped == self.portmap {
            return;
        }
        self.portmap = mapped;
        self.announce(now);
    }

    /// Routes changed without an address change (a new default route, say).
    pub fn network_changed(&mut self, now: Instant) {
        self.gather.refresh(now);
        for p in self.peers.values_mut() {
            p.network_changed(now);
        }
    }

    fn candidates(&self) -> Vec<Candidate> {
        let mut out = self.local.clone();
        if let Some(p) = self.portmap
            && !out.iter().any(|c| c.wg == p.wg)
        {
            out.push(p);
        }
        let m = self.gather.mappings();
        if let Some(wg) = m.wg {
            // Without a plain STUN answer, assume the router keeps the
            // check socket's port as it kept WireGuard's.
            let check = m
                .check
                .filter(|c| c.ip() == wg.ip())
                .unwrap_or(SocketAddr::new(wg.ip(), self.check_port));
            // An open host's public address is already a local one; a
            // router that maps the port it keeps anyway gave it already.
            if !out.iter().any(|c| c.wg == wg) {
                out.push(Candidate {
                    kind: Kind::WgStun,
                    wg,
                    check,
                });
            }
        }
        out.truncate(MAX_CANDIDATES);
        out
    }

    fn candidates_message(&self, to: &Key) -> Message {
        Message::Candidates {
            generation: self.generation,
            known: self.peers.get(to).map_or(0, |p| p.remote_generation()),
            list: self.io.announced.clone(),
        }
    }

    /// A relay connection opened: copies sent while it was down were lost.
    pub fn resend_soon(&mut self, now: Instant) {
        self.resend_interval = CANDIDATE_RESEND;
        self.next_resend = self.next_resend.min(now);
    }

    /// Sends our candidates to every peer when they changed.
    fn announce(&mut self, now: Instant) {
        let c = self.candidates();
        if c == self.io.announced {
            return;
        }
        if super::path::debug() {
            log!("nat {:.3}: announcing {c:?}", super::path::stamp());
        }
        self.io.announced = c;
        self.generation += 1;
        self.resend_interval = CANDIDATE_RESEND;
        self.next_resend = self.next_resend.min(now + CANDIDATE_RESEND);
        for k in self.peers.keys() {
            self.io.transmits.push_back(Transmit {
                peer: *k,
                via: Via::Relay,
                msg: self.candidates_message(k),
            });
        }
    }

    pub fn local_candidates(&self) -> &[Candidate] {
        &self.io.announced
    }

    pub fn mappings(&self) -> Mappings {
        self.gather.mappings()
    }

    fn settled(&self) -> bool {
        !self.peers.is_empty() && self.peers.values().all(|p| p.is_direct())
    }

    /// A STUN answer arrived on one of our sockets.
    pub fn handle_stun(&mut self, now: Instant, socket: Socket, bytes: &[u8]) {
        let settled = self.settled();
        if self.gather.handle_response(now, socket, bytes, settled) {
            self.announce(now);
        }
    }

    /// A STUN request to send, from the tunnel socket or the check socket.
    pub fn poll_stun(&mut self, now: Instant) -> Option<StunRequest> {
        let settled = self.settled();
        self.gather.poll_request(now, settled)
    }

    /// A message from `from` (already opened and authenticated by the seal).
    pub fn handle_message(&mut self, now: Instant, from: Key, via: Via, msg: Message) {
        let Some(p) = self.peers.get_mut(&from) else {
            return;
        };
        // A new list is answered with ours: that tells the sender we hold its
        // list (ours carries the generation we know), and gives ours to a
        // peer that lacks it (it restarted, or a copy was lost).
        let answer = matches!(&msg, Message::Candidates { known, generation, .. }
            if *known < self.generation || p.has_remote_older(*generation));
        p.handle_message(now, via, msg, &mut self.io.out());
        if answer {
            let msg = self.candidates_message(&from);
            self.io.transmits.push_back(Transmit {
                peer: from,
                via: Via::Relay,
                msg,
            });
        }
    }

    /// WireGuard's state for the peers, read by the caller when [`Traversal::sample_due`].
    pub fn handle_samples(&mut self, now: Instant, samples: &[(Key, Sample)]) {
        for (k, s) in samples {
            if let Some(p) = self.peers.get_mut(k) {
                p.handle_sample(now, *s, &mut self.io.out());
            }
        }
        self.last_sample = now;
        self.sample_now = false;
    }

    /// When WireGuard should be read next: soon while a peer is being
    /// checked, upgraded or doubted, rarely otherwise.
    fn next_sample(&self) -> Instant {
        if self.sample_now {
            return self.last_sample;
        }
        let idle = if self.peers.values().any(|p| p.is_direct() || p.has_candidates()) {
            SAMPLE_IDLE
        } else {
            SAMPLE_NOTHING_TO_DO
        };
        let interval = self
            .peers
            .values()
            .filter_map(|p| p.sample_interval())
            .min()
            .unwrap_or(idle);
        self.last_sample + interval
    }

    pub fn sample_due(&self, now: Instant) -> bool {
        now >= self.next_sample()
    }

    /// Sample WireGuard at the next turn (a decision was just made).
    pub fn sample_soon(&mut self) {
        self.sample_now = true;
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        for p in self.peers.values_mut() {
            p.handle_timeout(now, &mut self.io.out());
        }
        if now >= self.next_resend {
            self.next_resend = now + self.resend_interval;
            self.resend_interval = (self.resend_interval * 2).min(CANDIDATE_RESEND_MAX);
            for (k, p) in &self.peers {
                if !p.acked(self.generation) {
                    self.io.transmits.push_back(Transmit {
                        peer: *k,
                        via: Via::Relay,
                        msg: self.candidates_message(k),
                    });
                }
            }
        }
    }

    pub fn poll_timeout(&self, now: Instant) -> Option<Instant> {
        let mut t = self.next_sample().min(self.next_resend);
        if let Some(g) = self.gather.poll_timeout() {
            t = t.min(g);
        }
        for p in self.peers.values() {
            if let Some(pt) = p.poll_timeout(now) {
                t = t.min(pt);
            }
        }
        Some(t)
    }

    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.io.transmits.pop_front()
    }

    pub fn check_counts(&self) -> CheckCounts {
        self.io.checks
    }

    pub fn poll_event(&mut self) -> Option<PathEvent> {
        self.io.events.pop_front()
    }

    /// The port of the peer's check socket itself (its local candidates
    /// name it; a mapping's port is the router's).
    pub fn peer_check_port(&self, peer: &Key) -> Option<u16> {
        self.peers.get(peer)?.check_port()
    }

    pub fn desired(&self, peer: &Key) -> Desired {
        self.peers.get(peer).map_or(Desired::Relay, |p| p.desired())
    }

    pub fn mute(&self, peer: &Key) -> Mute {
        self.peers.get(peer).map_or(Mute::None, |p| p.mute())
    }

    pub fn status(&self, now: Instant, peer: &Key) -> Option<PathStatus> {
        self.peers.get(peer).map(|p| p.status(now))
    }
}
