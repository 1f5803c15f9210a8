//! `warren server`: the coordinator's mio loop. It owns the sockets and the
//! clock; every decision about nodes is made by [`Hub`]. Before a connection
//! reaches the hub as a node, the loop decides whether to take it at all
//! ([`Admission`]), checks what it sends ([`Inbound`]), and counts what
//! strangers did in one summary line per interval ([`Tally`]).

use std::collections::{BTreeSet, HashMap};
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use mio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use mio::{Events, Interest, Poll, Token, Waker};

use super::admin::{self, AdminRequest, AdminResponse, MAX_REQUEST_LEN};
use super::admission::{self, Admission, Source};
use super::conn::HANDSHAKE_TIMEOUT;
use super::hub::{ConnId, Hub};
use super::inbound::{Inbound, Violation};
use super::store::Store;
use super::tally::{Ending, Tally};
use crate::keys::Key;

pub const DEFAULT_PORT: u16 = 7777;
pub const KEY_FILE: &str = "server.key";
pub const DB_FILE: &str = "server.db";
pub const ADMIN_SOCKET: &str = "admin.sock";

const LISTENER: Token = Token(0);
const ADMIN: Token = Token(1);
const WAKER: Token = Token(2);
const FIRST_CONN: usize = 3;
/// Connections the kernel queues until they are accepted. The default of
/// 128 overflows under a burst of reconnecting nodes or a flood, and each
/// dropped SYN costs a legitimate node a retransmission (1 s, then 3 s).
const LISTEN_BACKLOG: libc::c_int = 4096;
/// Bytes read from a socket per call.
const READ_CHUNK: usize = 64 * 1024;
/// Connections accepted per loop turn: a flood of connection attempts (each
/// refused cheaply) cannot keep the loop from serving the nodes.
const ACCEPTS_PER_TURN: usize = 64;
/// Descriptors kept free of node connections: the listeners, the database,
/// admin clients, and one to accept and refuse with when full.
const FD_RESERVE: usize = 64;
/// Connections of every kind at most, when descriptors allow more.
pub const DEFAULT_MAX_CONNECTIONS: usize = 50_000;

pub struct ServerConfig {
    pub listen: SocketAddr,
    pub state_dir: PathBuf,
    pub db: PathBuf,
    /// `host:port` strings for join tokens; empty = the listen address, or
    /// every local address when listening on all of them.
    pub advertise: Vec<String>,
}

impl ServerConfig {
    pub fn admin_socket(&self) -> PathBuf {
        self.state_dir.join(ADMIN_SOCKET)
    }
}

struct AdminConn {
    stream: UnixStream,
    input: Vec<u8>,
    output: Vec<u8>,
    answered: bool,
}

/// Stops a running server from another thread.
#[derive(Clone)]
pub struct Stopper {
    flag: Arc<AtomicBool>,
    waker: Arc<Waker>,
}

impl Stopper {
    pub fn stop(&self) {
        self.flag.store(true, Ordering::SeqCst);
        let _ = self.waker.wake();
    }
}

/// What the loop knows of a node connection besides its socket.
struct Peer {
    stream: TcpStream,
    source: Source,
    inbound: Inbound,
    /// When its first message reached the hub.
    opened: Option<Instant>,
}

/// Why the loop closes a node connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cause {
    /// The hub is done with it (refused, failed, goodbye, flushed).
    Hub,
    /// The other side hung up or the socket failed.
    Gone,
    Violation(Violation),
    Evicted,
    TimedOut,
}

pub struct Server {
    poll: Poll,
    listener: TcpListener,
    admin: UnixListener,
    admin_path: PathBuf,
    hub: Hub,
    streams: HashMap<ConnId, Peer>,
    admission: Admission,
    tally: Tally,
    /// Connections possibly left in the listen queue after the accept budget.
    accept_ready: bool,
    admins: HashMap<usize, AdminConn>,
    next: usize,
    stopper: Stopper,
    local_addr: SocketAddr,
    /// What the loop counted as of its last turn, for the metrics thread.
    metrics: super::metrics::StatsHandle,
}

/// Reads the coordinator's static key, creating it (mode 0600) on first start.
pub fn load_or_create_key(path: &Path) -> Result<Key> {
    match std::fs::read_to_string(path) {
        Ok(s) => s
            .parse()
            .with_context(|| format!("reading server key {}", path.display())),
        Err(e) if e.kind() == ErrorKind::NotFound => {
            let key = Key::generate_private();
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .with_context(|| format!("creating server key {}", path.display()))?;
            writeln!(f, "{key}").with_context(|| format!("writing server key {}", path.display()))?;
            Ok(key)
        }
        Err(e) => Err(e).with_context(|| format!("reading server key {}", path.display())),
    }
}

impl Server {
    pub fn bind(cfg: &ServerConfig) -> Result<Server> {
        if !cfg.state_dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&cfg.state_dir)
                .with_context(|| format!("creating state directory {}", cfg.state_dir.display()))?;
        }
        let key = load_or_create_key(&cfg.state_dir.join(KEY_FILE))?;
        // One descriptor per node connection.
        super::load::raise_fd_limit();
        let max_connections = fd_limit()
            .saturating_sub(FD_RESERVE)
            .clamp(1, DEFAULT_MAX_CONNECTIONS);
        let store = Store::open(&cfg.db)?;
        let poll = Poll::new().context("creating poll")?;
        let mut listener =
            TcpListener::bind(cfg.listen).with_context(|| format!("listening on {}", cfg.listen))?;
        // Listening again only changes the backlog (capped by net.core.somaxconn).
        // SAFETY: listen on the descriptor the listener owns.
        unsafe { libc::listen(listener.as_raw_fd(), LISTEN_BACKLOG) };
        let local_addr = listener.local_addr().context("reading listen address")?;
        let admin_path = cfg.admin_socket();
        let mut admin = bind_admin(&admin_path)?;
        let advertise = if cfg.advertise.is_empty() {
            default_advertise(local_addr)
        } else {
            cfg.advertise.clone()
        };
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        poll.registry().register(&mut admin, ADMIN, Interest::READABLE)?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER).context("creating waker")?);
        Ok(Server {
            poll,
            listener,
            admin,
            admin_path,
            hub: Hub::new(store, key, advertise),
            streams: HashMap::new(),
            admission: Admission::new(admission::Limits::coordinator(max_connections)),
            tally: Tally::new(Instant::now()),
            accept_ready: false,
            admins: HashMap::new(),
            next: FIRST_CONN,
            stopper: Stopper {
                flag: Arc::new(AtomicBool::new(false)),
                waker,
            },
            local_addr,
            metrics: Default::default(),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn public_key(&self) -> Key {
        self.hub.public_key()
    }

    /// The `host:port` addresses nodes dial (as in join tokens).
    pub fn advertise(&self) -> &[String] {
        self.hub.advertise()
    }

    /// Relays to publish in the peer map.
    pub fn set_relays(&mut self, relays: Vec<crate::control::messages::RelayInfo>) {
        self.hub.set_relays(relays);
    }

    /// Tells `f` every removed node's key, past and future (see [`Hub::set_on_removed`]).
    pub fn set_on_removed(&mut self, f: impl FnMut(Key) + Send + 'static) -> Result<()> {
        self.hub.set_on_removed(f)
    }

    /// WG-STUN servers to publish in every Welcome.
    pub fn set_wgstun(&mut self, wgstun: Vec<crate::control::messages::WgStunInfo>) {
        self.hub.set_wgstun(wgstun);
    }

    /// Where the metrics thread reads the coordinator's counters.
    pub fn stats_handle(&self) -> super::metrics::StatsHandle {
        self.metrics.clone()
    }

    fn publish(&self) {
        if let Ok(mut s) = self.metrics.0.lock() {
            s.nodes_connected = self.hub.online_count();
            s.connections = self.streams.len();
            s.tally.clone_from(self.tally.total());
        }
    }

    pub fn stopper(&self) -> Stopper {
        self.stopper.clone()
    }

    pub fn run(&mut self) -> Result<()> {
        log!(
            "coordinator: listening on {} with key {}, admin socket {}",
            self.local_addr,
            self.public_key(),
            self.admin_path.display()
        );
        let mut events = Events::with_capacity(1024);
        while !self.stopper.flag.load(Ordering::SeqCst) {
            let now = Instant::now();
            let timeout = if self.accept_ready {
                Some(Duration::ZERO)
            } else {
                [
                    self.hub.poll_timeout(),
                    self.admission.next_deadline(),
                    self.tally.poll_timeout(),
                ]
                .into_iter()
                .flatten()
                .min()
                .map(|t| t.saturating_duration_since(now))
            };
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == ErrorKind::Interrupted {
                    continue;
                }
                return Err(e).context("waiting for events");
            }
            let now = Instant::now();
            let mut writable = BTreeSet::new();
            for ev in events.iter() {
                match ev.token() {
                    LISTENER => self.accept_ready = true,
                    ADMIN => self.accept_admins(),
                    WAKER => {}
                    Token(t) if self.streams.contains_key(&t) => {
                        if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                            self.read_node(t, now);
                        }
                        writable.insert(t);
                    }
                    Token(t) => self.admin_io(t, now),
                }
            }
            if std::mem::take(&mut self.accept_ready) {
                self.accept_nodes(now);
            }
            self.hub.handle_timeout(now);
            for id in self.admission.expired(now) {
                self.close_node(id, now, Cause::TimedOut);
            }
            // Writing can close connections, which changes the map again: repeat
            // until nothing is left, so no change waits for the next event.
            loop {
                self.hub.flush();
                writable.extend(self.hub.take_dirty());
                if writable.is_empty() {
                    break;
                }
                for id in std::mem::take(&mut writable) {
                    self.write_node(id, now);
                }
            }
            if let Some(line) = self.tally.summary(now) {
                log!("{line}");
            }
            self.publish();
        }
        let _ = std::fs::remove_file(&self.admin_path);
        Ok(())
    }

    fn accept_nodes(&mut self, now: Instant) {
        for _ in 0..ACCEPTS_PER_TURN {
            let (mut stream, from) = match self.listener.accept() {
                Ok(s) => s,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => {
                    // Out of file descriptors and the like: counted (a flood must
                    // not become a log line each), and tried again on the next
                    // connection's event rather than in a busy loop. The
                    // connection cap keeps descriptors for refusing, so this is rare.
                    self.tally.accept_error();
                    return;
                }
            };
            let source = Source::of(from.ip());
            if let Err(why) = self.admission.check(now, source) {
                // Reset at once: no handshake, no buffer, no TIME_WAIT left here.
                reset_on_close(&stream);
                self.tally.refused(why);
                continue;
            }
            let id = self.next;
            self.next += 1;
            if self
                .poll
                .registry()
                .register(&mut stream, Token(id), Interest::READABLE | Interest::WRITABLE)
                .is_err()
            {
                self.tally.accept_error();
                continue;
            }
            let _ = stream.set_nodelay(true);
            self.streams.insert(
                id,
                Peer {
                    stream,
                    source,
                    inbound: Inbound::new(),
                    opened: None,
                },
            );
            self.hub.accept(id, now);
            for old in self.admission.opened(id, source, now + HANDSHAKE_TIMEOUT) {
                self.close_node(old, now, Cause::Evicted);
            }
        }
        // Budget used up with connections possibly still queued: the
        // listener's readiness edge is spent, so come back next turn.
        self.accept_ready = true;
    }

    fn read_node(&mut self, id: ConnId, now: Instant) {
        let mut buf = vec![0u8; READ_CHUNK];
        loop {
            let Some(peer) = self.streams.get_mut(&id) else {
                return;
            };
            match peer.stream.read(&mut buf) {
                Ok(0) => return self.close_node(id, now, Cause::Gone),
                Ok(n) => self.receive(id, now, &buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return self.close_node(id, now, Cause::Gone),
            }
        }
    }

    /// Checks received bytes against what this connection may send yet, then
    /// hands them to the hub: the first message alone first, so the hub
    /// decides who this is before it sees anything else.
    fn receive(&mut self, id: ConnId, now: Instant, bytes: &[u8]) {
        let Some(peer) = self.streams.get_mut(&id) else {
            return;
        };
        let was_opening = !peer.inbound.opened();
        let split = match peer.inbound.scan(bytes) {
            Ok(split) => split,
            Err(v) => return self.close_node(id, now, Cause::Violation(v)),
        };
        if was_opening {
            let held = split.unwrap_or(bytes.len());
            let evict = self.admission.hold(id, held);
            let this_one = evict.contains(&id);
            for old in evict {
                self.close_node(old, now, Cause::Evicted);
            }
            if this_one {
                return;
            }
        }
        match split {
            Some(n) => {
                self.hub.receive(id, now, &bytes[..n]);
                self.admission.authenticated(id);
                if let Some(peer) = self.streams.get_mut(&id) {
                    peer.opened = Some(now);
                }
                if n < bytes.len() {
                    self.hub.receive(id, now, &bytes[n..]);
                }
            }
            None => self.hub.receive(id, now, bytes),
        }
    }

    fn write_node(&mut self, id: ConnId, now: Instant) {
        loop {
            let Some(peer) = self.streams.get_mut(&id) else {
                return;
            };
            let out = self.hub.outgoing(id);
            if out.is_empty() {
                break;
            }
            match peer.stream.write(out) {
                Ok(0) => return self.close_node(id, now, Cause::Gone),
                Ok(n) => self.hub.consume_outgoing(id, n),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return self.close_node(id, now, Cause::Gone),
            }
        }
        if self.hub.finished(id, now) {
            self.close_node(id, now, Cause::Hub);
        }
    }

    fn close_node(&mut self, id: ConnId, now: Instant, cause: Cause) {
        let Some(mut peer) = self.streams.remove(&id) else {
            return;
        };
        let _ = self.poll.registry().deregister(&mut peer.stream);
        let _ = peer.stream.shutdown(Shutdown::Both);
        self.hub.closed(id);
        let ending = match (peer.opened, cause) {
            (None, Cause::Violation(v)) => Some(Ending::Violation(v)),
            (None, Cause::Hub) => Some(Ending::Refused),
            (None, Cause::Gone) => Some(Ending::HungUp),
            (None, Cause::Evicted) => Some(Ending::Evicted),
            (None, Cause::TimedOut) => Some(Ending::TimedOut),
            (Some(_), Cause::Violation(v)) => Some(Ending::Violation(v)),
            (Some(at), Cause::Hub) if now.saturating_duration_since(at) < admission::REFUSED_WITHIN => {
                Some(Ending::RefusedByHub)
            }
            (Some(_), _) => None,
        };
        if let Some(how) = ending {
            self.tally.ended(how);
        }
        self.admission.closed(now, id, peer.source, ending.is_some());
    }

    fn accept_admins(&mut self) {
        loop {
            match self.admin.accept() {
                Ok((mut stream, _)) => {
                    let uid = admin::peer_uid(stream.as_raw_fd());
                    if !uid.as_ref().is_ok_and(|&u| admin::uid_allowed(u)) {
                        log!("coordinator: refused admin client (uid {uid:?})");
                        continue;
                    }
                    let id = self.next;
                    self.next += 1;
                    if self
                        .poll
                        .registry()
                        .register(&mut stream, Token(id), Interest::READABLE | Interest::WRITABLE)
                        .is_ok()
                    {
                        self.admins.insert(
                            id,
                            AdminConn {
                                stream,
                                input: Vec::new(),
                                output: Vec::new(),
                                answered: false,
                            },
                        );
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    log!("coordinator: accepting admin connection: {e}");
                    return;
                }
            }
        }
    }

    fn admin_io(&mut self, id: usize, now: Instant) {
        let Some(conn) = self.admins.get_mut(&id) else {
            return;
        };
        let mut buf = [0u8; 4096];
        let mut eof = false;
        while !conn.answered {
            match conn.stream.read(&mut buf) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => conn.input.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => {
                    eof = true;
                    break;
                }
            }
            if conn.input.len() > MAX_REQUEST_LEN {
                break;
            }
        }
        if !conn.answered {
            let response = if let Some(end) = conn.input.iter().position(|&b| b == b'\n') {
                Some(match serde_json::from_slice::<AdminRequest>(&conn.input[..end]) {
                    Ok(req) => self.hub.admin(req, now),
                    Err(e) => AdminResponse::Error {
                        reason: format!("bad admin request: {e}"),
                    },
                })
            } else if conn.input.len() > MAX_REQUEST_LEN {
                Some(AdminResponse::Error {
                    reason: "admin request too long".into(),
                })
            } else {
                None
            };
            let Some(conn) = self.admins.get_mut(&id) else {
                return;
            };
            if let Some(r) = response {
                conn.output = serde_json::to_vec(&r).unwrap_or_default();
                conn.output.push(b'\n');
                conn.answered = true;
            } else if eof {
                self.admins.remove(&id);
                return;
            }
        }
        let Some(conn) = self.admins.get_mut(&id) else {
            return;
        };
        while !conn.output.is_empty() {
            match conn.stream.write(&conn.output) {
                Ok(n) if n > 0 => {
                    conn.output.drain(..n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                _ => break,
            }
        }
        if conn.answered
            && let Some(mut c) = self.admins.remove(&id)
        {
            let _ = self.poll.registry().deregister(&mut c.stream);
        }
    }
}

/// The open-file limit (after [`super::load::raise_fd_limit`]).
fn fd_limit() -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills a struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 1024;
    }
    usize::try_from(lim.rlim_cur).unwrap_or(usize::MAX)
}

/// `SO_LINGER` 0: closing sends a reset instead of a FIN, so a refused
/// connection leaves no TIME_WAIT state behind on the coordinator.
fn reset_on_close(stream: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on a descriptor we own, with a pointer to a live struct of the stated size.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &linger as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

fn bind_admin(path: &Path) -> Result<UnixListener> {
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!(
                "another warren server is running: its admin socket {} answers",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing stale admin socket {}", path.display()))?;
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("creating admin socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting admin socket {}", path.display()))?;
    Ok(listener)
}

/// The listen address if it is a specific one, else every non-loopback IPv4
/// address of this machine with the listen port.
fn default_advertise(listen: SocketAddr) -> Vec<String> {
    if !listen.ip().is_unspecified() {
        return vec![listen.to_string()];
    }
    let mut out: Vec<String> = crate::ifaddrs::ipv4_addresses()
        .into_iter()
        .filter(|(_, ip)| !ip.is_loopback())
        .map(|(_, ip)| SocketAddr::new(ip.into(), listen.port()).to_string())
        .collect();
    out.dedup();
    out
}
