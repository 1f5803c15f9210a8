//! `warren server`: the coordinator's mio loop. It owns the sockets and the
//! clock; every decision is made by [`Hub`].

use std::collections::{BTreeSet, HashMap};
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use mio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use mio::{Events, Interest, Poll, Token, Waker};

use super::admin::{self, AdminRequest, AdminResponse, MAX_REQUEST_LEN};
use super::hub::{ConnId, Hub};
use super::store::Store;
use crate::keys::Key;

pub const DEFAULT_PORT: u16 = 7777;
pub const KEY_FILE: &str = "server.key";
pub const DB_FILE: &str = "server.db";
pub const ADMIN_SOCKET: &str = "admin.sock";

const LISTENER: Token = Token(0);
const ADMIN: Token = Token(1);
const WAKER: Token = Token(2);
const FIRST_CONN: usize = 3;
/// Bytes read from a socket per call.
const READ_CHUNK: usize = 64 * 1024;

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

pub struct Server {
    poll: Poll,
    listener: TcpListener,
    admin: UnixListener,
    admin_path: PathBuf,
    hub: Hub,
    streams: HashMap<ConnId, TcpStream>,
    admins: HashMap<usize, AdminConn>,
    next: usize,
    stopper: Stopper,
    local_addr: SocketAddr,
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
        let store = Store::open(&cfg.db)?;
        let poll = Poll::new().context("creating poll")?;
        let mut listener =
            TcpListener::bind(cfg.listen).with_context(|| format!("listening on {}", cfg.listen))?;
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
            admins: HashMap::new(),
            next: FIRST_CONN,
            stopper: Stopper {
                flag: Arc::new(AtomicBool::new(false)),
                waker,
            },
            local_addr,
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

    pub fn stopper(&self) -> Stopper {
        self.stopper.clone()
    }

    pub fn run(&mut self) -> Result<()> {
        eprintln!(
            "coordinator: listening on {} with key {}, admin socket {}",
            self.local_addr,
            self.public_key(),
            self.admin_path.display()
        );
        let mut events = Events::with_capacity(1024);
        while !self.stopper.flag.load(Ordering::SeqCst) {
            let now = Instant::now();
            let timeout = self.hub.poll_timeout().map(|t| t.saturating_duration_since(now));
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
                    LISTENER => self.accept_nodes(now),
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
            self.hub.handle_timeout(now);
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
        }
        let _ = std::fs::remove_file(&self.admin_path);
        Ok(())
    }

    fn accept_nodes(&mut self, now: Instant) {
        loop {
            match self.listener.accept() {
                Ok((mut stream, _from)) => {
                    let id = self.next;
                    self.next += 1;
                    if let Err(e) = self.poll.registry().register(
                        &mut stream,
                        Token(id),
                        Interest::READABLE | Interest::WRITABLE,
                    ) {
                        eprintln!("coordinator: registering connection: {e}");
                        continue;
                    }
                    let _ = stream.set_nodelay(true);
                    self.streams.insert(id, stream);
                    self.hub.accept(id, now);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Out of file descriptors and the like: try again on the next event.
                    eprintln!("coordinator: accepting connection: {e}");
                    return;
                }
            }
        }
    }

    fn read_node(&mut self, id: ConnId, now: Instant) {
        let mut buf = vec![0u8; READ_CHUNK];
        loop {
            let Some(stream) = self.streams.get_mut(&id) else {
                return;
            };
            match stream.read(&mut buf) {
                Ok(0) => return self.close_node(id),
                Ok(n) => self.hub.receive(id, now, &buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return self.close_node(id),
            }
        }
    }

    fn write_node(&mut self, id: ConnId, now: Instant) {
        loop {
            let Some(stream) = self.streams.get_mut(&id) else {
                return;
            };
            let out = self.hub.outgoing(id);
            if out.is_empty() {
                break;
            }
            match stream.write(out) {
                Ok(0) => return self.close_node(id),
                Ok(n) => self.hub.consume_outgoing(id, n),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return self.close_node(id),
            }
        }
        if self.hub.finished(id, now) {
            self.close_node(id);
        }
    }

    fn close_node(&mut self, id: ConnId) {
        if let Some(mut stream) = self.streams.remove(&id) {
            let _ = self.poll.registry().deregister(&mut stream);
            let _ = stream.shutdown(Shutdown::Both);
        }
        self.hub.closed(id);
    }

    fn accept_admins(&mut self) {
        loop {
            match self.admin.accept() {
                Ok((mut stream, _)) => {
                    let uid = admin::peer_uid(stream.as_raw_fd());
                    if !uid.as_ref().is_ok_and(|&u| admin::uid_allowed(u)) {
                        eprintln!("coordinator: refused admin client (uid {uid:?})");
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
                    eprintln!("coordinator: accepting admin connection: {e}");
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
