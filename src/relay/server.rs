//! The relay server: one mio loop over a TCP listener and its clients. Each
//! client is a [`ClientConn`]; this file only moves bytes and routes frames.
//!
//! Presence: a client learns about the keys it sends to. Sending to a key that
//! is not connected gets one `PeerGone`; from then on the client is told
//! `PeerPresent` when that key connects and `PeerGone` when it leaves. This
//! costs nothing for keys nobody talks to and needs no extra request frame.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::io::{ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};

use super::admission::{Admission, Refusal, Source, SourceLimits};
use super::budget::{DEFAULT_TOTAL_QUEUE_BYTES, QueueBudget};
use super::client_conn::{ClientConn, Limits, Request};
use super::frame::RelayFrame;
use super::members::{MemberSet, MemberUpdate};
use crate::keys::Key;
use crate::sockopt;

const LISTENER: Token = Token(0);
const WAKER: Token = Token(1);
const FIRST_CLIENT: usize = 2;
/// How often every client's timers run. Keepalives and idle timeouts are tens
/// of seconds, so a coarse sweep is exact enough and costs one pass a second.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// Reads per client per loop turn: a client that never stops sending cannot
/// keep the loop from serving the others.
const READS_PER_TURN: usize = 8;
/// Connections accepted per loop turn, for the same reason: a flood of
/// connection attempts (each refused cheaply) cannot keep the loop accepting.
const ACCEPTS_PER_TURN: usize = 64;
const READ_BUF_LEN: usize = 64 * 1024;
/// Connections the kernel completes and queues for `accept` (capped by
/// `net.core.somaxconn`). mio listens with 128: under a connect flood that
/// queue overflows, the kernel drops SYNs, and a real client's dropped SYN
/// is retried only after 1 s, then 3 s: it misses its registration deadline
/// although the relay would have taken it. The relay drains the queue far
/// faster than it fills; a longer one only absorbs bursts (about 2 KiB of
/// kernel memory per queued connection).
const LISTEN_BACKLOG: libc::c_int = 4096;
/// Unsent bytes the kernel may hold per client: more only delays the
/// tunnel's packets (TCP inside the tunnel slows down with the delay).
const UNSENT_LIMIT: libc::c_int = 64 * 1024;
/// Kernel send buffer per client. Left to autotuning it grows to several MB
/// per socket, which a slow reader would pin; fixed, it bounds the kernel's
/// share of a client's memory next to `Limits::queue_bytes`. 512 KiB still
/// carries about 5 MB/s per client at 100 ms round trip.
const SOCKET_SEND_BUFFER: libc::c_int = 512 * 1024;
/// Keys one client may follow for presence; past it, sends still work. Each
/// followed key costs about 220 bytes (measured: the client's set plus the
/// relay's watcher map), and a client can name any keys, so this is part of a
/// client's fixed cost: 256 keys, about 60 KiB (4096 would be 900 KiB). A
/// node sends through one relay to far fewer peers at once.
const MAX_WATCHED_PER_CLIENT: usize = 256;

/// Registered clients a relay accepts by default, sized so the worst case stays under
/// 256 MiB. A client can make the relay hold, besides its queue:
///   - a partial frame plus one read in the frame decoder:  128 KiB
///   - a partial Noise message (a frame over two fragments): 64 KiB
///   - the presence keys it follows:                          60 KiB
///   - connection state (Noise, structs, socket):              2 KiB
///
/// about 254 KiB; 700 clients x 254 KiB = 174 MiB, plus the 64 MiB all
/// queues together may hold (`budget.rs`): 238 MiB. An idle client costs a
/// few KiB (bench-relay), so a relay with more memory can raise
/// `--max-clients` by that arithmetic. Kernel socket buffers (up to twice
/// `SOCKET_SEND_BUFFER` per slow reader) are the kernel's and bounded by its
/// own `tcp_mem` pressure limits. Connections still in their handshake do
/// not take these slots: they wait in a pool of their own
/// ([`DEFAULT_MAX_PENDING`]).
pub const DEFAULT_MAX_CLIENTS: usize = 700;
/// Connections in their handshake, all sources together. Before it registers
/// a connection holds at most 1 KiB of input and its Noise state (a few KiB
/// in all), so the pool costs about 1 MiB. When it is full the oldest
/// pending connection is closed for the newest: a stranger who keeps
/// connections open without finishing the handshake only ever pushes out his
/// own (or anyone's) oldest, never a registered client, and a real client,
/// which finishes within a round trip, is long registered before that many
/// newer ones arrive.
pub const DEFAULT_MAX_PENDING: usize = 512;
/// Refused connections are summed up in one log line at most this often, so a
/// flood does not become a flood of log lines.
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Clone, Debug)]
pub struct RelayConfig {
    pub listen: SocketAddr,
    pub private_key: Key,
    pub limits: Limits,
    pub max_clients: usize,
}

impl RelayConfig {
    /// A relay on `listen` with the default limits and [`DEFAULT_MAX_CLIENTS`].
    pub fn new(listen: SocketAddr, private_key: Key) -> RelayConfig {
        RelayConfig {
            listen,
            private_key,
            limits: Limits::default(),
            max_clients: DEFAULT_MAX_CLIENTS,
        }
    }
}

/// Relay-wide limits beside the per-client [`Limits`]: the memory all queues
/// together may take, and what one source address may open.
#[derive(Clone, Copy, Debug)]
pub struct RelayGuards {
    /// Bytes queued for all clients together (see `budget.rs`).
    pub total_queue_bytes: usize,
    /// Connections in their handshake, all sources together (see [`DEFAULT_MAX_PENDING`]).
    pub max_pending: usize,
    pub per_source: SourceLimits,
}

impl RelayGuards {
    /// The defaults for a relay of `max_clients` clients.
    pub fn for_relay(max_clients: usize) -> RelayGuards {
        RelayGuards {
            total_queue_bytes: DEFAULT_TOTAL_QUEUE_BYTES,
            max_pending: DEFAULT_MAX_PENDING,
            per_source: SourceLimits::for_relay(max_clients),
        }
    }
}

/// Counters for tests, benchmarks and the periodic log line.
#[derive(Clone, Debug, Default)]
pub struct RelayStats {
    pub clients: usize,
    pub registered: usize,
    pub forwarded: u64,
    pub dropped_queue_full: u64,
    pub dropped_rate: u64,
    pub dropped_no_peer: u64,
    /// Datagrams dropped because all queues together reached the budget.
    pub dropped_budget: u64,
    /// Largest number of bytes ever queued for one client.
    pub max_queued_bytes: usize,
    /// Bytes queued for all clients now, the most ever, and the budget.
    pub total_queued_bytes: usize,
    pub max_total_queued_bytes: usize,
    pub queue_budget_bytes: usize,
    pub closed_bad_input: u64,
    /// Handshakes refused because the relay had no queue room left to answer.
    pub closed_budget: u64,
    /// Connections refused because the relay had `max_clients` registered.
    pub rejected_full: u64,
    /// Connections in their handshake now, and those closed because the
    /// pending pool was full and they were the oldest.
    pub pending: usize,
    pub evicted_pending: u64,
    /// Unregistered connections closed for any reason (summed in the log).
    pub closed_unregistered: u64,
    /// Connections closed, or registrations refused, because the key was
    /// removed from the mesh.
    pub refused_removed: u64,
    /// Connections refused by the per-source limits: too fast, too many
    /// handshakes in progress, too many connections.
    pub refused_rate: u64,
    pub refused_pending: u64,
    pub refused_source_full: u64,
    pub replaced: u64,
}

struct Conn {
    stream: TcpStream,
    addr: SocketAddr,
    source: Source,
    state: ClientConn,
    /// This client's queued bytes as last counted in the budget.
    charged: usize,
    /// Told to the admission as registered (no longer a pending handshake).
    registered: bool,
    /// Keys this client sent to, and so hears presence changes of.
    watching: HashSet<Key>,
    in_ready: bool,
    in_dirty: bool,
}

pub struct RelayServer {
    poll: Poll,
    listener: TcpListener,
    waker: Arc<Waker>,
    stop: Arc<AtomicBool>,
    shared_stats: Arc<Mutex<RelayStats>>,
    /// Keys handed over by [`RelayHandle::refuse_key`], taken in on the next wake.
    refuse_inbox: Arc<Mutex<Vec<Key>>>,
    /// Keys removed from the mesh: never registered again. Only grows, by
    /// what the coordinator removes, so it stays small.
    refused: HashSet<Key>,
    /// Member keys from the coordinator's feed (`feed.rs`), for a separate
    /// relay; open (any key) until a set is known.
    members: MemberSet,
    /// Updates handed over by [`RelayHandle::update_members`], taken in on the next wake.
    member_inbox: Arc<Mutex<Vec<MemberUpdate>>>,
    stats: RelayStats,
    cfg: RelayConfig,
    max_pending: usize,
    /// Connections in their handshake, oldest first (tokens only grow).
    pending: BTreeSet<Token>,
    budget: QueueBudget,
    admission: Admission,
    /// Refusals counted when the last summary was logged, and when.
    refusals_logged: u64,
    next_refusal_log: Instant,
    conns: HashMap<Token, Conn>,
    by_key: HashMap<Key, Token>,
    watchers: HashMap<Key, HashSet<Token>>,
    next_token: usize,
    /// Clients with unread input left after their read budget.
    ready: Vec<Token>,
    /// Connections possibly left in the listen queue after the accept budget.
    accept_ready: bool,
    /// Clients with queued output to flush at the end of this turn.
    dirty: Vec<Token>,
    read_buf: Vec<u8>,
}

/// Stops a running server and reads its counters from another thread.
#[derive(Clone)]
pub struct RelayHandle {
    stop: Arc<AtomicBool>,
    waker: Arc<Waker>,
    stats: Arc<Mutex<RelayStats>>,
    refuse_inbox: Arc<Mutex<Vec<Key>>>,
    member_inbox: Arc<Mutex<Vec<MemberUpdate>>>,
}

impl RelayHandle {
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.waker.wake();
    }

    pub fn stats(&self) -> RelayStats {
        self.stats.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// `key` was removed from the mesh: close its connection now and refuse
    /// it from then on.
    pub fn refuse_key(&self, key: Key) {
        if let Ok(mut inbox) = self.refuse_inbox.lock() {
            inbox.push(key);
        }
        let _ = self.waker.wake();
    }

    /// The coordinator's member set changed: refuse keys outside it from
    /// now on and close their connections.
    pub fn update_members(&self, update: MemberUpdate) {
        if let Ok(mut inbox) = self.member_inbox.lock() {
            inbox.push(update);
        }
        let _ = self.waker.wake();
    }
}

impl RelayServer {
    /// A relay with the default [`RelayGuards`] for its `max_clients`.
    pub fn bind(cfg: RelayConfig) -> Result<RelayServer> {
        let guards = RelayGuards::for_relay(cfg.max_clients);
        RelayServer::bind_guarded(cfg, guards)
    }

    pub fn bind_guarded(cfg: RelayConfig, guards: RelayGuards) -> Result<RelayServer> {
        // Below that, one slow reader alone could take the whole budget.
        if guards.total_queue_bytes < 2 * cfg.limits.queue_bytes {
            anyhow::bail!(
                "relay: the queue budget ({} KiB) must be at least twice one client's queue ({} KiB)",
                guards.total_queue_bytes >> 10,
                cfg.limits.queue_bytes >> 10
            );
        }
        crate::rlimit::raise_fd_limit();
        let poll = Poll::new().context("creating relay poll")?;
        let mut listener =
            TcpListener::bind(cfg.listen).with_context(|| format!("relay: listening on {}", cfg.listen))?;
        // SAFETY: listen on the descriptor the listener owns; calling it again
        // only changes the backlog.
        if unsafe { libc::listen(std::os::fd::AsRawFd::as_raw_fd(&listener), LISTEN_BACKLOG) } != 0 {
            let e = std::io::Error::last_os_error();
            log!("warren relay: raising the listen backlog on {}: {e}", cfg.listen);
        }
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)
            .context("relay: registering listener")?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER).context("relay: creating waker")?);
        Ok(RelayServer {
            poll,
            listener,
            waker,
            stop: Arc::new(AtomicBool::new(false)),
            shared_stats: Arc::new(Mutex::new(RelayStats::default())),
            refuse_inbox: Arc::new(Mutex::new(Vec::new())),
            refused: HashSet::new(),
            members: MemberSet::open(),
            member_inbox: Arc::new(Mutex::new(Vec::new())),
            stats: RelayStats {
                queue_budget_bytes: guards.total_queue_bytes,
                ..RelayStats::default()
            },
            cfg,
            max_pending: guards.max_pending.max(1),
            pending: BTreeSet::new(),
            budget: QueueBudget::new(guards.total_queue_bytes),
            admission: Admission::new(guards.per_source),
            refusals_logged: 0,
            next_refusal_log: Instant::now(),
            conns: HashMap::new(),
            by_key: HashMap::new(),
            watchers: HashMap::new(),
            next_token: FIRST_CLIENT,
            ready: Vec::new(),
            accept_ready: false,
            dirty: Vec::new(),
            read_buf: vec![0; READ_BUF_LEN],
        })
    }

    pub fn local_addr(&self) -> Result<SocketAddr> {
        self.listener.local_addr().context("relay: listener address")
    }

    pub fn public_key(&self) -> Key {
        self.cfg.private_key.public_key()
    }

    pub fn handle(&self) -> RelayHandle {
        RelayHandle {
            stop: self.stop.clone(),
            waker: self.waker.clone(),
            stats: self.shared_stats.clone(),
            refuse_inbox: self.refuse_inbox.clone(),
            member_inbox: self.member_inbox.clone(),
        }
    }

    /// The member set to start with (persisted by an earlier run), before [`RelayServer::run`].
    pub fn set_members(&mut self, members: MemberSet) {
        self.members = members;
    }

    pub fn run(mut self) -> Result<()> {
        log!(
            "warren relay: listening on {} (key {}), max {} clients and {} in the handshake, {} MiB for queues",
            self.local_addr()?,
            self.public_key().to_base64(),
            self.cfg.max_clients,
            self.max_pending,
            self.budget.limit() >> 20
        );
        let mut events = Events::with_capacity(1024);
        let mut next_sweep = Instant::now() + SWEEP_INTERVAL;
        while !self.stop.load(Ordering::SeqCst) {
            let timeout = if self.ready.is_empty() && !self.accept_ready {
                next_sweep.saturating_duration_since(Instant::now())
            } else {
                Duration::ZERO
            };
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() == ErrorKind::Interrupted {
                    continue;
                }
                return Err(e).context("relay: polling");
            }
            let now = Instant::now();
            for ev in events.iter() {
                match ev.token() {
                    LISTENER => self.accept_ready = true,
                    WAKER => {
                        self.take_refused_keys();
                        self.take_member_updates();
                    }
                    t => {
                        if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                            self.mark_ready(t);
                        }
                        if ev.is_writable() {
                            self.mark_dirty(t);
                        }
                    }
                }
            }
            if std::mem::take(&mut self.accept_ready) {
                self.accept(now);
            }
            for t in std::mem::take(&mut self.ready) {
                if let Some(c) = self.conns.get_mut(&t) {
                    c.in_ready = false;
                    self.read_conn(now, t);
                }
            }
            if now >= next_sweep {
                self.sweep(now);
                next_sweep = now + SWEEP_INTERVAL;
            }
            for t in std::mem::take(&mut self.dirty) {
                self.flush(t);
            }
            self.stats.clients = self.conns.len();
            self.stats.pending = self.pending.len();
            self.stats.registered = self.by_key.len();
            self.stats.total_queued_bytes = self.budget.used();
            self.stats.max_total_queued_bytes = self.budget.peak();
            if let Ok(mut s) = self.shared_stats.lock() {
                *s = self.stats.clone();
            }
        }
        Ok(())
    }

    fn mark_ready(&mut self, t: Token) {
        if let Some(c) = self.conns.get_mut(&t)
            && !c.in_ready
        {
            c.in_ready = true;
            self.ready.push(t);
        }
    }

    fn mark_dirty(&mut self, t: Token) {
        if let Some(c) = self.conns.get_mut(&t)
            && !c.in_dirty
        {
            c.in_dirty = true;
            self.dirty.push(t);
        }
    }

    fn accept(&mut self, now: Instant) {
        for _ in 0..ACCEPTS_PER_TURN {
            let (mut stream, addr) = match self.listener.accept() {
                Ok(s) => s,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Out of file descriptors and the like: keep serving the connected clients.
                    log!("warren relay: accepting a connection: {e}");
                    return;
                }
            };
            // Dropping the stream closes it at once: a refused connection costs
            // neither a slot nor a handshake, and costs its source a token.
            let source = Source::of(addr.ip());
            if self.registered_count() >= self.cfg.max_clients {
                self.stats.rejected_full += 1;
                self.admission.charge(now, source);
                continue;
            }
            match self.admission.admit(now, source) {
                Ok(()) => {}
                Err(Refusal::Rate) => {
                    self.stats.refused_rate += 1;
                    continue;
                }
                Err(Refusal::Pending) => {
                    self.stats.refused_pending += 1;
                    continue;
                }
                Err(Refusal::Clients) => {
                    self.stats.refused_source_full += 1;
                    continue;
                }
            }
            if self.pending.len() >= self.max_pending {
                self.evict_oldest_pending(now);
            }
            let _ = stream.set_nodelay(true);
            sockopt::set_buffer(&stream, libc::SO_SNDBUF, SOCKET_SEND_BUFFER);
            // The queue a client's datagrams wait in is ours (bounded, budgeted), not the kernel's.
            sockopt::set_unsent_limit(&stream, UNSENT_LIMIT);
            let token = Token(self.next_token);
            self.next_token += 1;
            if let Err(e) =
                self.poll
                    .registry()
                    .register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)
            {
                log!("warren relay: registering connection from {addr}: {e}");
                self.admission.closed(source, false);
                continue;
            }
            self.conns.insert(
                token,
                Conn {
                    stream,
                    addr,
                    source,
                    state: ClientConn::new(&self.cfg.private_key, self.cfg.limits, now),
                    charged: 0,
                    registered: false,
                    watching: HashSet::new(),
                    in_ready: false,
                    in_dirty: false,
                },
            );
            self.pending.insert(token);
        }
        // Budget used up before the queue ran dry: the listener's readiness
        // edge is spent, so come back next turn without waiting for another.
        self.accept_ready = true;
    }

    /// Connections that finished their handshake (the rest wait in `pending`).
    fn registered_count(&self) -> usize {
        self.conns.len() - self.pending.len()
    }

    /// The pending pool is full: the oldest connection in it goes, and its
    /// source pays a token for the slot it held.
    fn evict_oldest_pending(&mut self, now: Instant) {
        let Some(&oldest) = self.pending.first() else {
            return;
        };
        if let Some(c) = self.conns.get(&oldest) {
            self.admission.charge(now, c.source);
        }
        self.stats.evicted_pending += 1;
        self.close(oldest, "pushed out of the full pending pool");
    }

    /// Takes in keys the coordinator removed and closes their connections.
    fn take_refused_keys(&mut self) {
        let keys = match self.refuse_inbox.lock() {
            Ok(mut inbox) => std::mem::take(&mut *inbox),
            Err(_) => return,
        };
        for key in keys {
            if !self.refused.insert(key) {
                continue;
            }
            if let Some(&t) = self.by_key.get(&key) {
                self.stats.refused_removed += 1;
                self.close(t, "key removed from the mesh");
            }
        }
    }

    /// Takes in the coordinator's member changes and closes the connections
    /// of keys no longer members (after a full set, any key outside it).
    fn take_member_updates(&mut self) {
        let updates = match self.member_inbox.lock() {
            Ok(mut inbox) => std::mem::take(&mut *inbox),
            Err(_) => return,
        };
        if updates.is_empty() {
            return;
        }
        for u in &updates {
            self.members.apply(u);
        }
        let gone: Vec<Token> = self
            .by_key
            .iter()
            .filter(|(k, _)| !self.members.allows(k))
            .map(|(_, &t)| t)
            .collect();
        for t in gone {
            self.stats.refused_removed += 1;
            self.close(t, "key removed from the mesh");
        }
    }

    fn read_conn(&mut self, now: Instant, t: Token) {
        let mut requests = Vec::new();
        for _ in 0..READS_PER_TURN {
            let Some(c) = self.conns.get_mut(&t) else { return };
            match c.stream.read(&mut self.read_buf) {
                Ok(0) => return self.close(t, "connection closed by the client"),
                Ok(n) => {
                    let rate_drops = c.state.dropped_rate;
                    let received = c.state.receive(now, &self.read_buf[..n], &mut requests);
                    self.stats.dropped_rate += c.state.dropped_rate - rate_drops;
                    if let Err(e) = received {
                        self.stats.closed_bad_input += 1;
                        return self.close(t, &format!("{e:#}"));
                    }
                    // The handshake reply is the only output a read makes.
                    let grown = c.state.queued_bytes().saturating_sub(c.charged);
                    if grown > 0 {
                        if !self.budget.admits(c.charged, grown, self.cfg.limits.queue_bytes) {
                            self.stats.closed_budget += 1;
                            return self.close(t, "no queue room left to answer the handshake");
                        }
                        settle(&mut self.budget, c);
                        self.mark_dirty(t);
                    }
                    for r in requests.drain(..) {
                        self.route(now, t, r);
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return self.close(t, &format!("reading: {e}")),
            }
        }
        // Budget used up with input possibly left: come back next turn.
        self.mark_ready(t);
    }

    fn route(&mut self, now: Instant, from: Token, req: Request) {
        match req {
            Request::Registered(key) => {
                self.pending.remove(&from);
                let source = self.conns.get(&from).map(|c| c.source);
                if self.refused.contains(&key) || !self.members.allows(&key) {
                    self.stats.refused_removed += 1;
                    return self.close(from, "key removed from the mesh");
                }
                // A key that replaces its own connection takes no new slot.
                let replacing = self.by_key.contains_key(&key);
                if !replacing && self.registered_count() > self.cfg.max_clients {
                    self.stats.rejected_full += 1;
                    if let Some(source) = source {
                        self.admission.charge(now, source);
                    }
                    return self.close(from, "relay full");
                }
                if let Some(old) = self.by_key.insert(key, from)
                    && old != from
                {
                    self.stats.replaced += 1;
                    self.close(old, "replaced by a new connection with the same key");
                }
                if let Some(c) = self.conns.get_mut(&from) {
                    c.registered = true;
                    self.admission.registered(c.source);
                    log!("warren relay: {} connected from {}", key.short(), c.addr);
                }
                self.tell_watchers(now, key, RelayFrame::PeerPresent { key });
            }
            Request::SendTo { to, payload } => {
                let Some(sender) = self.conns.get_mut(&from) else {
                    return;
                };
                let Some(from_key) = sender.state.key() else {
                    return;
                };
                let newly_watching =
                    sender.watching.len() < MAX_WATCHED_PER_CLIENT && sender.watching.insert(to);
                if newly_watching {
                    self.watchers.entry(to).or_default().insert(from);
                }
                let Some(&dest) = self.by_key.get(&to) else {
                    self.stats.dropped_no_peer += 1;
                    if newly_watching {
                        self.queue(now, from, &RelayFrame::PeerGone { key: to });
                    }
                    return;
                };
                let frame = RelayFrame::RecvFrom {
                    key: from_key,
                    payload,
                };
                if self.queue(now, dest, &frame) {
                    self.stats.forwarded += 1;
                }
            }
        }
    }

    /// Queues a frame for a client; false if it was dropped (its queue full,
    /// or the relay's budget) or the client is gone.
    fn queue(&mut self, now: Instant, t: Token, frame: &RelayFrame) -> bool {
        let Some(c) = self.conns.get_mut(&t) else {
            return false;
        };
        let per_client = self.cfg.limits.queue_bytes;
        let cap = self.budget.cap_for(c.charged, per_client);
        let cost = ClientConn::cost(frame);
        // The client's own limit first: a slow reader is its own problem
        // before it is everyone's.
        if c.charged + cost <= per_client && c.charged + cost > cap {
            self.stats.dropped_budget += 1;
            return false;
        }
        match c.state.queue_within(now, frame, cap) {
            Ok(true) => {
                settle(&mut self.budget, c);
                self.stats.max_queued_bytes = self.stats.max_queued_bytes.max(c.charged);
                self.mark_dirty(t);
                true
            }
            Ok(false) => {
                self.stats.dropped_queue_full += 1;
                false
            }
            Err(e) => {
                self.close(t, &format!("queueing: {e:#}"));
                false
            }
        }
    }

    fn tell_watchers(&mut self, now: Instant, key: Key, frame: RelayFrame) {
        let Some(watchers) = self.watchers.get(&key) else {
            return;
        };
        for t in watchers.iter().copied().collect::<Vec<_>>() {
            self.queue(now, t, &frame);
        }
    }

    fn flush(&mut self, t: Token) {
        let Some(c) = self.conns.get_mut(&t) else { return };
        c.in_dirty = false;
        while !c.state.outgoing().is_empty() {
            match c.stream.write(c.state.outgoing()) {
                Ok(0) => return self.close(t, "connection closed while writing"),
                Ok(n) => {
                    c.state.consume_outgoing(n);
                    settle(&mut self.budget, c);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return self.close(t, &format!("writing: {e}")),
            }
        }
    }

    fn sweep(&mut self, now: Instant) {
        let mut expired = Vec::new();
        let mut wrote = Vec::new();
        let per_client = self.cfg.limits.queue_bytes;
        for (&t, c) in self.conns.iter_mut() {
            let cap = self.budget.cap_for(c.charged, per_client);
            match c.state.handle_timeout_within(now, cap) {
                Ok(()) if c.state.queued_bytes() > c.charged => {
                    settle(&mut self.budget, c);
                    wrote.push(t);
                }
                Ok(()) => {}
                Err(e) => expired.push((t, format!("{e:#}"))),
            }
        }
        for t in wrote {
            self.mark_dirty(t);
        }
        for (t, why) in expired {
            self.close(t, &why);
        }
        self.log_refusals(now);
    }

    fn log_refusals(&mut self, now: Instant) {
        let s = &self.stats;
        let refused = s.rejected_full + s.refused_rate + s.refused_pending + s.refused_source_full;
        let seen = refused + s.closed_unregistered + s.refused_removed;
        if seen == self.refusals_logged || now < self.next_refusal_log {
            return;
        }
        log!(
            "warren relay: refused {} connections (relay full {}, source too fast {}, too many handshakes {}, \
             too many connections {}), closed {} before registering ({} pushed out of the pending pool), \
             {} of removed keys, in total",
            refused,
            s.rejected_full,
            s.refused_rate,
            s.refused_pending,
            s.refused_source_full,
            s.closed_unregistered,
            s.evicted_pending,
            s.refused_removed
        );
        self.refusals_logged = seen;
        self.next_refusal_log = now + REFUSAL_LOG_INTERVAL;
    }

    fn close(&mut self, t: Token, why: &str) {
        let Some(mut c) = self.conns.remove(&t) else {
            return;
        };
        let _ = self.poll.registry().deregister(&mut c.stream);
        self.pending.remove(&t);
        self.budget.adjust(c.charged, 0);
        self.admission.closed(c.source, c.registered);
        for k in &c.watching {
            if let Some(w) = self.watchers.get_mut(k) {
                w.remove(&t);
                if w.is_empty() {
                    self.watchers.remove(k);
                }
            }
        }
        // Strangers' connections are counted and summed up in the periodic
        // line, never logged one by one: a flood must not become a log flood.
        if c.registered
            && let Some(key) = c.state.key()
        {
            log!("warren relay: {} from {} closed: {why}", key.short(), c.addr);
        } else {
            self.stats.closed_unregistered += 1;
        }
        if let Some(key) = c.state.key()
            && self.by_key.get(&key) == Some(&t)
        {
            self.by_key.remove(&key);
            self.tell_watchers(Instant::now(), key, RelayFrame::PeerGone { key });
        }
    }
}

/// Brings the budget in line with what `c` has queued now.
fn settle(budget: &mut QueueBudget, c: &mut Conn) {
    let queued = c.state.queued_bytes();
    budget.adjust(c.charged, queued);
    c.charged = queued;
}
