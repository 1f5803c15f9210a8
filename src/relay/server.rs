//! The relay server: one mio loop over a TCP listener and its clients. Each
//! client is a [`ClientConn`]; this file only moves bytes and routes frames.
//!
//! Presence: a client learns about the keys it sends to. Sending to a key that
//! is not connected gets one `PeerGone`; from then on the client is told
//! `PeerPresent` when that key connects and `PeerGone` when it leaves. This
//! costs nothing for keys nobody talks to and needs no extra request frame.

use std::collections::{HashMap, HashSet};
use std::io::{ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};

use super::client_conn::{ClientConn, Limits, Request};
use super::frame::RelayFrame;
use crate::keys::Key;

const LISTENER: Token = Token(0);
const WAKER: Token = Token(1);
const FIRST_CLIENT: usize = 2;
/// How often every client's timers run. Keepalives and idle timeouts are tens
/// of seconds, so a coarse sweep is exact enough and costs one pass a second.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// Reads per client per loop turn: a client that never stops sending cannot
/// keep the loop from serving the others.
const READS_PER_TURN: usize = 8;
const READ_BUF_LEN: usize = 64 * 1024;
/// Kernel send buffer per client. Left to autotuning it grows to several MB
/// per socket, which a slow reader would pin; fixed, it bounds the kernel's
/// share of a client's memory next to `Limits::queue_bytes`. 512 KiB still
/// carries about 5 MB/s per client at 100 ms round trip.
const SOCKET_SEND_BUFFER: libc::c_int = 512 * 1024;
/// Keys one client may follow for presence; past it, sends still work.
const MAX_WATCHED_PER_CLIENT: usize = 4096;

#[derive(Clone, Debug)]
pub struct RelayConfig {
    pub listen: SocketAddr,
    pub private_key: Key,
    pub limits: Limits,
    pub max_clients: usize,
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
    /// Largest number of bytes ever queued for one client.
    pub max_queued_bytes: usize,
    pub closed_bad_input: u64,
    pub rejected_full: u64,
    pub replaced: u64,
}

struct Conn {
    stream: TcpStream,
    addr: SocketAddr,
    state: ClientConn,
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
    stats: RelayStats,
    cfg: RelayConfig,
    conns: HashMap<Token, Conn>,
    by_key: HashMap<Key, Token>,
    watchers: HashMap<Key, HashSet<Token>>,
    next_token: usize,
    /// Clients with unread input left after their read budget.
    ready: Vec<Token>,
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
}

impl RelayHandle {
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.waker.wake();
    }

    pub fn stats(&self) -> RelayStats {
        self.stats.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

impl RelayServer {
    pub fn bind(cfg: RelayConfig) -> Result<RelayServer> {
        crate::coord::load::raise_fd_limit();
        let poll = Poll::new().context("creating relay poll")?;
        let mut listener =
            TcpListener::bind(cfg.listen).with_context(|| format!("relay: listening on {}", cfg.listen))?;
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
            stats: RelayStats::default(),
            cfg,
            conns: HashMap::new(),
            by_key: HashMap::new(),
            watchers: HashMap::new(),
            next_token: FIRST_CLIENT,
            ready: Vec::new(),
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
        }
    }

    pub fn run(mut self) -> Result<()> {
        eprintln!(
            "warren relay: listening on {} (key {}), max {} clients",
            self.local_addr()?,
            self.public_key().to_base64(),
            self.cfg.max_clients
        );
        let mut events = Events::with_capacity(1024);
        let mut next_sweep = Instant::now() + SWEEP_INTERVAL;
        while !self.stop.load(Ordering::SeqCst) {
            let timeout = if self.ready.is_empty() {
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
                    LISTENER => self.accept(now),
                    WAKER => {}
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
            self.stats.registered = self.by_key.len();
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
        loop {
            let (mut stream, addr) = match self.listener.accept() {
                Ok(s) => s,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Out of file descriptors and the like: keep serving the connected clients.
                    eprintln!("warren relay: accepting a connection: {e}");
                    return;
                }
            };
            if self.conns.len() >= self.cfg.max_clients {
                self.stats.rejected_full += 1;
                continue;
            }
            let _ = stream.set_nodelay(true);
            set_send_buffer(&stream, SOCKET_SEND_BUFFER);
            let token = Token(self.next_token);
            self.next_token += 1;
            if let Err(e) =
                self.poll
                    .registry()
                    .register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)
            {
                eprintln!("warren relay: registering connection from {addr}: {e}");
                continue;
            }
            self.conns.insert(
                token,
                Conn {
                    stream,
                    addr,
                    state: ClientConn::new(&self.cfg.private_key, self.cfg.limits, now),
                    watching: HashSet::new(),
                    in_ready: false,
                    in_dirty: false,
                },
            );
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
                if let Some(old) = self.by_key.insert(key, from)
                    && old != from
                {
                    self.stats.replaced += 1;
                    self.close(old, "replaced by a new connection with the same key");
                }
                if let Some(c) = self.conns.get(&from) {
                    eprintln!("warren relay: {} connected from {}", key.short(), c.addr);
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

    /// Queues a frame for a client; false if it was dropped (queue full) or the client is gone.
    fn queue(&mut self, now: Instant, t: Token, frame: &RelayFrame) -> bool {
        let Some(c) = self.conns.get_mut(&t) else {
            return false;
        };
        match c.state.queue(now, frame) {
            Ok(true) => {
                self.stats.max_queued_bytes = self.stats.max_queued_bytes.max(c.state.queued_bytes());
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
                Ok(n) => c.state.consume_outgoing(n),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return self.close(t, &format!("writing: {e}")),
            }
        }
    }

    fn sweep(&mut self, now: Instant) {
        let mut expired = Vec::new();
        let mut wrote = Vec::new();
        for (&t, c) in self.conns.iter_mut() {
            let before = c.state.queued_bytes();
            match c.state.handle_timeout(now) {
                Ok(()) if c.state.queued_bytes() > before => wrote.push(t),
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
    }

    fn close(&mut self, t: Token, why: &str) {
        let Some(mut c) = self.conns.remove(&t) else {
            return;
        };
        let _ = self.poll.registry().deregister(&mut c.stream);
        for k in &c.watching {
            if let Some(w) = self.watchers.get_mut(k) {
                w.remove(&t);
                if w.is_empty() {
                    self.watchers.remove(k);
                }
            }
        }
        let who = c
            .state
            .key()
            .map(|k| k.short())
            .unwrap_or_else(|| "unregistered".into());
        eprintln!("warren relay: {who} from {} closed: {why}", c.addr);
        if let Some(key) = c.state.key()
            && self.by_key.get(&key) == Some(&t)
        {
            self.by_key.remove(&key);
            self.tell_watchers(Instant::now(), key, RelayFrame::PeerGone { key });
        }
    }
}

/// Best effort: a socket that keeps the default buffer still works.
pub(crate) fn set_send_buffer(stream: &impl std::os::fd::AsRawFd, bytes: libc::c_int) {
    set_buffer(stream, libc::SO_SNDBUF, bytes);
}

pub(crate) fn set_buffer(stream: &impl std::os::fd::AsRawFd, option: libc::c_int, bytes: libc::c_int) {
    // SAFETY: setsockopt on a descriptor we own, with a pointer to a live c_int of the stated size.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            &bytes as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}
