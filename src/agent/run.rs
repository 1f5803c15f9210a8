//! `warren agent`: one thread, one mio loop. It owns the coordinator TCP
//! connection, the local control socket, the netlink monitor and the timers;
//! [`ControlConn`] and [`Paths`] decide, the WireGuard driver and rtnetlink act.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};
use mio::net::{TcpStream, UnixListener, UnixStream};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};

use super::api::{self, PairStatus, PeerStatus, Request, Response, Status};
use super::cache::{self, AgentState, Store};
use super::control::{ControlConfig, ControlConn, Event, Phase};
use super::direct::{self, DirectPath, Received};
use super::dns::{Dns, DnsConfig};
use super::metrics::Counters;
use super::paths::{self, PathKind};
use super::peer_msg::PeerMessages;
use super::portmap::PortMap;
use super::relay_path::RelayPath;
use super::resolve::{Lookup, Resolver};
use crate::control::messages::{ErrorCode, PeerInfo, WgStunInfo};
use crate::coord::admin::{peer_uid, uid_allowed};
use crate::coord::invite::JoinToken;
use crate::keys::Key;
use crate::metrics::serve::Responder;
use crate::nat::candidate;
use crate::nat::path::{Desired, Mute, Sample, Via};
use crate::nat::traversal::Traversal;
use crate::netlink::{Monitor, NetEvent, Rtnl};
use crate::outgoing::write_pending;
use crate::signals::StopSignals;
use crate::wg::select::{self, BackendChoice};
use crate::wg::{
    AllowedIp, Backend, DeviceConfig, DeviceState, DeviceUpdate, PeerConfig, PeerUpdate, reconcile,
};

mod firewall;
mod metrics;
mod network;
mod report;
mod traversal;
mod wireguard;

const TCP: Token = Token(0);
const API: Token = Token(1);
const MONITOR: Token = Token(2);
/// The resolver's or the UPnP worker's answers are in (src/agent/direct.rs has 3 and 4).
const RESOLVER: Token = Token(5);
/// SIGTERM / SIGINT (src/agent/portmap.rs has 6).
const SIGNALS: Token = Token(8);
/// The metrics listener; its connections take the tokens from [`METRICS_CONNS`].
const METRICS: Token = Token(9);
/// Far above the API clients' tokens (from 16, one per `warren` command) and
/// below the relay path's (from `usize::MAX / 2`).
const METRICS_CONNS: usize = usize::MAX / 4;
const FIRST_CLIENT: usize = 16;
/// How often a sample also checks the interface and its address (see `Agent::reconcile`).
const FULL_CHECK_INTERVAL: Duration = Duration::from_secs(60);
/// Prefix of the mesh; the interface address carries it so the kernel adds the route.
pub const MESH_PREFIX_LEN: u8 = 10;
const LOCK_FILE: &str = "agent.lock";

pub struct AgentConfig {
    pub state_dir: PathBuf,
    /// Where the peer map is kept (see `cache`): the state directory, or a
    /// tmpfs on a router whose state directory is on flash.
    pub cache_dir: PathBuf,
    pub ifname: String,
    pub listen_port: u16,
    pub join: Option<String>,
    pub name: Option<String>,
    pub socket: PathBuf,
    pub backend: Option<BackendChoice>,
    /// Ask the home router to map our two ports (PCP, NAT-PMP, UPnP).
    pub portmap: bool,
    /// Serve Prometheus metrics here; off when `None`.
    pub metrics_listen: Option<SocketAddr>,
    /// The name server for the mesh's names (src/agent/dns.rs).
    pub dns: DnsConfig,
    /// Subnet routes and exit nodes (src/route).
    pub routes: crate::route::RouteConfig,
}

struct Client {
    stream: UnixStream,
    input: Vec<u8>,
    output: Vec<u8>,
    /// Its request is answered later (a ping in flight).
    waiting: Option<PingWait>,
}

struct PingWait {
    name: String,
    mesh_addr: Ipv4Addr,
    relay: String,
}

/// A peer sending sealed messages that fail to open is logged at most this often.
const SEALED_DROP_LOG_INTERVAL: Duration = Duration::from_secs(10);

struct Agent {
    cfg: AgentConfig,
    state: AgentState,
    store: Store,
    ctrl: ControlConn,
    nat: Traversal,
    direct: DirectPath,
    dns: Dns,
    /// What WireGuard was last told per peer, and what of its relay traffic is muted.
    applied: Vec<(Key, Desired, Mute)>,
    /// Peers' mesh addresses: the tunnel's senders and the probes' destinations.
    mesh_of: HashMap<Key, Ipv4Addr>,
    /// Where a peer's last `warren ping` came from over the check socket: its answer goes there.
    reply_to: HashMap<Key, SocketAddr>,
    relay: RelayPath,
    portmap: PortMap,
    signals: StopSignals,
    resolver: Resolver,
    /// The coordinator address whose dial waits for the resolver.
    dial_waiting: Option<String>,
    msgs: PeerMessages,
    /// The Prometheus endpoint, when `--metrics-listen` is given.
    metrics: Option<Responder>,
    counters: Counters,
    last_sealed_drop_log: Option<Instant>,
    backend: Box<dyn Backend>,
    rtnl: Rtnl,
    /// Subnet routes and exit nodes (src/route).
    routing: crate::route::Routing,
    monitor: Monitor,
    poll: Poll,
    tcp: Option<TcpStream>,
    tcp_connected: bool,
    api: UnixListener,
    clients: HashMap<usize, Client>,
    next_client: usize,
    need_apply: bool,
    /// A local address went away: set every endpoint again (see `rebind`).
    rebind_endpoints: bool,
    next_full_check: Instant,
    stop: Option<Result<()>>,
    /// A join token the cached membership made unnecessary is in hand.
    can_rejoin: bool,
    /// Stopped to enroll again with that token (this node was removed).
    rejoin: bool,
    last_error: Option<String>,
    /// The access policy's nftables table on the mesh interface.
    firewall: crate::firewall::Firewall,
}

pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Where per-interface locks live: one agent per WireGuard interface, whatever its state directory.
const INTERFACE_LOCK_DIR: &str = "/run/warren";

/// An exclusive lock on `path`, `None` if another process holds it. The
/// file may be unlinked by its holder on the way out ([`InterfaceLock`]):
/// a lock taken on a file that is no longer at `path` guards nothing, so
/// that case opens the path again.
fn flock(path: &Path) -> Result<Option<std::fs::File>> {
    loop {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Ok(None);
        }
        let held = f
            .metadata()
            .with_context(|| format!("reading {}", path.display()))?;
        match std::fs::metadata(path) {
            Ok(now) if now.dev() == held.dev() && now.ino() == held.ino() => return Ok(Some(f)),
            _ => continue,
        }
    }
}

/// The per-interface lock, whose file goes with the agent: interface names
/// come and go (every lab test has its own), so keeping them would pile up
/// files in /run/warren. The state directory's lock stays: one per node.
struct InterfaceLock {
    path: PathBuf,
    _file: std::fs::File,
}

impl Drop for InterfaceLock {
    fn drop(&mut self) {
        // Unlinked while still held, so a new agent locks a fresh file (see `flock`).
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Holds the state directory and the interface for this agent; a second
/// agent on either fails here with a clear error. The kernel drops the locks
/// when the process dies, so a crash leaves nothing stale but an unlocked file.
fn lock(state_dir: &Path, ifname: &str) -> Result<(std::fs::File, InterfaceLock)> {
    let dir = flock(&state_dir.join(LOCK_FILE))?.with_context(|| {
        format!(
            "another warren agent is already running with state directory {}",
            state_dir.display()
        )
    })?;
    private_dir(Path::new(INTERFACE_LOCK_DIR))?;
    let path = Path::new(INTERFACE_LOCK_DIR).join(format!("{ifname}.lock"));
    let file =
        flock(&path)?.with_context(|| format!("another warren agent already manages interface {ifname}"))?;
    Ok((dir, InterfaceLock { path, _file: file }))
}

fn private_dir(dir: &Path) -> Result<()> {
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    Ok(())
}

/// The agent's identity and coordinator: from the cache, or from a join
/// token. A token for the mesh the cache is already a member of changes
/// nothing and is handed back: if the coordinator has removed this node
/// meanwhile (while its agent was down), the agent joins with it at once.
fn prepare_state(cfg: &AgentConfig, cached: Option<AgentState>) -> Result<(AgentState, Option<JoinToken>)> {
    let Some(token) = &cfg.join else {
        let state = cached.with_context(|| {
            format!(
                "this node has not joined a mesh yet (no {}); give it a join token \
                 (--join-file FILE, or `warren up --join TOKEN`)",
                cache::path(&cfg.state_dir).display()
            )
        })?;
        return Ok((state, None));
    };
    let token = JoinToken::parse(token)?;
    if let Some(mut c) = cached
        && c.server_key == token.server_key
        && (c.me.is_some() || c.join_secret.as_deref() == Some(token.secret.as_str()))
    {
        // The same mesh (the coordinator's key) at a new address: the
        // coordinator moved; the token says where it is now.
        if let Some(before) = c.follow_token_address(&token) {
            log!(
                "agent: coordinator address changed from {} to {} (new token for the same mesh)",
                before.join(","),
                token.servers.join(",")
            );
        }
        let spare = c.me.is_some().then_some(token);
        return Ok((c, spare));
    }
    Ok((joining_state(token, cfg.name.clone()), None))
}

/// A fresh identity that enrolls with `token`.
fn joining_state(token: JoinToken, requested_name: Option<String>) -> AgentState {
    let mut state = AgentState {
        private_key: Key::generate_private(),
        server_key: token.server_key,
        servers: token.servers.clone(),
        join_secret: Some(token.secret.clone()),
        requested_name,
        me: None,
        peers: Vec::new(),
        pending_private_key: None,
        relays: Vec::new(),
        wgstun: Vec::new(),
        address_tokens: Vec::new(),
    };
    // So that this token, still in the token file, never moves the node back
    // after a later token has moved it.
    state.follow_token_address(&token);
    state
}

pub fn run(cfg: AgentConfig) -> Result<()> {
    if cfg.listen_port == 0 {
        // Peers dial it as a candidate and the relay path delivers to it.
        anyhow::bail!("WireGuard listen port 0: the agent needs a fixed port (e.g. --port 51820)");
    }
    // Before any thread starts, so that every thread has them blocked.
    let signals = StopSignals::open().context("blocking SIGTERM and SIGINT for a clean stop")?;
    // The UPnP client would send the router's SOAP calls to an HTTP proxy
    // set in the environment; the agent makes no other HTTP requests.
    for var in ["http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"] {
        // SAFETY: no other thread exists yet that could read the environment.
        unsafe { std::env::remove_var(var) };
    }
    private_dir(&cfg.state_dir)?;
    if cfg.routes.exit_node.is_some() {
        // Before any socket exists: the agent's own connections stay off the exit's tunnel.
        crate::sockopt::set_own_mark(crate::route::WG_FWMARK);
    }
    crate::netlink::check_name(&cfg.ifname)?;
    let _locks = lock(&cfg.state_dir, &cfg.ifname)?;
    // A relayed peer costs a loopback socket: a large mesh needs more than the default 1024.
    crate::rlimit::raise_fd_limit();
    let (mut store, cached) = Store::open(&cfg.state_dir, &cfg.cache_dir)?;
    let (mut state, mut spare) = prepare_state(&cfg, cached)?;
    let (mut cfg, mut signals) = (cfg, signals);
    loop {
        store.save_all(Instant::now(), &state)?;
        let mut agent = start(cfg, state, store, signals, spare.is_some())?;
        let result = agent.run();
        if !agent.rejoin {
            return result;
        }
        let Some(token) = spare.take() else {
            return result;
        };
        let Agent {
            cfg: c,
            signals: sig,
            store: st,
            ..
        } = agent;
        log!("agent: joining again with the token given");
        state = joining_state(token, c.name.clone());
        (cfg, signals, store) = (c, sig, st);
    }
}

/// Everything the agent's loop owns, set up for `state`. `can_rejoin`: a
/// token is in hand should the coordinator say this node was removed.
fn start(
    cfg: AgentConfig,
    state: AgentState,
    store: Store,
    signals: StopSignals,
    can_rejoin: bool,
) -> Result<Agent> {
    let choice = BackendChoice::resolve(cfg.backend)?;
    let backend = match select::backend_for_existing(choice, &cfg.ifname)? {
        Some(b) => b,
        None => select::open_backend(choice, None)?,
    };
    let rtnl = Rtnl::open()?;
    let mut monitor = Monitor::open()?;
    let poll = Poll::new().context("creating poll")?;
    if let Some(parent) = cfg.socket.parent() {
        private_dir(parent)?;
    }
    // We hold the lock, so a socket file left here is from an agent that died.
    let _ = std::fs::remove_file(&cfg.socket);
    let mut api =
        UnixListener::bind(&cfg.socket).with_context(|| format!("creating {}", cfg.socket.display()))?;
    std::fs::set_permissions(&cfg.socket, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting {}", cfg.socket.display()))?;
    poll.registry().register(&mut api, API, Interest::READABLE)?;
    let mon_fd: RawFd = monitor.as_raw_fd();
    poll.registry()
        .register(&mut SourceFd(&mon_fd), MONITOR, Interest::READABLE)?;
    let _ = monitor.read_events();
    let sig_fd: RawFd = signals.as_raw_fd();
    poll.registry()
        .register(&mut SourceFd(&sig_fd), SIGNALS, Interest::READABLE)?;

    let now = Instant::now();
    let seed = u64::from_le_bytes(
        state.private_key.public_key().0[..8]
            .try_into()
            .unwrap_or_default(),
    ) ^ SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut ctrl = ControlConn::new(
        ControlConfig {
            private_key: state.private_key,
            server_key: state.server_key,
            servers: state.servers.clone(),
            join_secret: state.join_secret.clone(),
            requested_name: state.requested_name.clone(),
            hostname: hostname(),
            advertise: cfg.routes.advertise.clone(),
        },
        now,
        seed,
    );
    if let Some(me) = state.me.clone() {
        log!(
            "agent: restoring {} ({}) with {} peers from the cache",
            me.name,
            me.mesh_addr,
            state.peers.len()
        );
        ctrl.restore(me, state.peers.clone());
    }
    if let Some(pending) = state.pending_private_key {
        ctrl.restore_pending_key(pending);
    }
    let relay = RelayPath::new(state.private_key, cfg.listen_port);
    let resolver = Resolver::new(poll.registry(), RESOLVER)?;
    let epoch = crate::peer::seal::epoch_from_clock();
    let msgs = PeerMessages::new(state.private_key, epoch);
    let check_port = cfg
        .listen_port
        .checked_add(1)
        .context("WireGuard listen port 65535: the check socket takes the port after it")?;
    let direct = DirectPath::open(poll.registry(), check_port)?;
    let nat = Traversal::new(now, state.private_key.public_key(), direct.port, epoch, seed);
    let portmap = PortMap::new(
        resolver.waker(),
        now,
        cfg.portmap,
        cfg.listen_port,
        direct.port,
        // Stable across restarts, secret to the LAN: see `PortMapper::new`.
        state.private_key.0,
    )?;
    let metrics = match cfg.metrics_listen {
        Some(addr) => {
            let m = Responder::bind(poll.registry(), addr, METRICS, METRICS_CONNS)?;
            crate::metrics::warn_if_exposed("agent", addr);
            log!("agent: metrics on http://{}/metrics", m.local_addr()?);
            Some(m)
        }
        None => None,
    };
    let mut routing = crate::route::Routing::new(cfg.routes.clone());
    routing.start(&cfg.ifname)?;
    let (cfg_ifname, cfg_cache_dir) = (cfg.ifname.clone(), cfg.cache_dir.clone());
    let mut dns = Dns::new(cfg.dns.clone());
    dns.set_nodes(state.me.as_ref(), state.peers.iter());
    let mut agent = Agent {
        metrics,
        counters: Counters::default(),
        dns,
        relay,
        portmap,
        signals,
        resolver,
        dial_waiting: None,
        msgs,
        nat,
        direct,
        applied: Vec::new(),
        mesh_of: HashMap::new(),
        reply_to: HashMap::new(),
        last_sealed_drop_log: None,
        cfg,
        state,
        store,
        ctrl,
        backend,
        rtnl,
        routing,
        monitor,
        poll,
        tcp: None,
        tcp_connected: false,
        api,
        clients: HashMap::new(),
        next_client: FIRST_CLIENT,
        need_apply: true,
        rebind_endpoints: false,
        next_full_check: now,
        stop: None,
        can_rejoin,
        rejoin: false,
        last_error: None,
        firewall: crate::firewall::Firewall::new(&cfg_ifname, cfg_cache_dir),
    };
    agent.update_candidates(now);
    agent.configure_stun(now);
    agent.refresh_router(now);
    Ok(agent)
}

impl Agent {
    fn run(&mut self) -> Result<()> {
        let mut events = Events::with_capacity(64);
        loop {
            let now = Instant::now();
            let wake = [
                self.ctrl.poll_timeout(),
                self.nat.poll_timeout(now),
                self.relay.poll_timeout(),
                self.msgs.poll_timeout(),
                self.portmap.poll_timeout(),
                self.store.poll_timeout(),
                self.metrics.as_ref().and_then(Responder::poll_timeout),
            ]
            .into_iter()
            .flatten()
            .min();
            let unread = self.direct.unread();
            let timeout = if unread.is_empty() && !self.dns.unread() {
                wake.map(|t| t.saturating_duration_since(now))
            } else {
                Some(Duration::ZERO)
            };
            if let Err(e) = self.poll.poll(&mut events, timeout)
                && e.kind() != ErrorKind::Interrupted
            {
                return Err(e).context("waiting for events");
            }
            let now = Instant::now();
            for ev in events.iter() {
                match ev.token() {
                    TCP => self.tcp_ready(now),
                    API => self.accept_clients(),
                    MONITOR => self.net_changed(now),
                    RESOLVER => {
                        self.resolved(now);
                        self.portmap.worker_ready(now);
                    }
                    SIGNALS => {
                        if let Some(sig) = self.signals.read() {
                            log!("agent: stopping on {sig}");
                            self.stop = Some(Ok(()));
                        }
                    }
                    t if self.metrics.as_ref().is_some_and(|m| m.owns(t)) => {
                        if let Some(m) = self.metrics.as_mut() {
                            m.ready(self.poll.registry(), now, t);
                        }
                    }
                    t if PortMap::owns(t) => self.portmap.ready(now),
                    t if Dns::owns(t) => self.dns.ready(now),
                    t if DirectPath::owns(t) => self.direct_ready(now, t),
                    t if self.relay.owns(t) => {
                        self.relay.ready(self.poll.registry(), &mut self.resolver, now, t)
                    }
                    Token(t) => self.client_io(t),
                }
            }
            for t in unread {
                self.direct_ready(now, t);
            }
            if self.dns.unread() {
                self.dns.ready(now);
            }
            self.ctrl.handle_timeout(now);
            self.drain_control(now);
            self.write_tcp(now);
            self.relay
                .handle_timeout(self.poll.registry(), &mut self.resolver, now);
            if self.relay.take_changed() {
                self.need_apply = true;
                self.nat.resend_soon(now);
            }
            self.peer_messages(now);
            self.portmap.handle_timeout(now);
            self.nat.set_portmap(now, self.portmap.candidate());
            self.nat.handle_timeout(now);
            self.drive_nat(now);
            if self.need_apply || self.nat.sample_due(now) {
                // Now and then the whole interface too: someone may have
                // removed its address or the interface itself.
                let full = std::mem::take(&mut self.need_apply) || now >= self.next_full_check;
                if full {
                    self.next_full_check = now + FULL_CHECK_INTERVAL;
                }
                if let Err(e) = self.reconcile(now, full) {
                    let msg = format!("{e:#}");
                    if self.last_error.as_deref() != Some(&msg) {
                        log_warn!("agent: {msg}");
                    }
                    self.last_error = Some(msg);
                } else {
                    self.last_error = None;
                    // The mesh address is on the interface now: the name server can bind it.
                    if let Some(me) = &self.state.me {
                        self.dns
                            .ensure_bound(self.poll.registry(), me.mesh_addr, &self.cfg.ifname);
                    }
                }
            }
            if let Err(e) = self.store.write_due(now, &self.state) {
                log_error!("agent: {e:#}");
            }
            self.serve_metrics(now);
            if let Some(result) = self.stop.take() {
                // The latest map, so a restart begins where this agent ended.
                if let Err(e) = self.store.flush(now, &self.state) {
                    log_error!("agent: {e:#}");
                }
                self.portmap.release();
                self.dns.stop();
                self.routing.stop(&mut self.rtnl, &self.cfg.ifname);
                self.firewall.stop();
                self.release_interface();
                let _ = std::fs::remove_file(&self.cfg.socket);
                return result;
            }
        }
    }

    fn drain_control(&mut self, now: Instant) {
        while let Some(ev) = self.ctrl.poll_event() {
            match ev {
                Event::Dial(server) => self.dial(now, &server),
                Event::HangUp => {
                    if let Some(mut s) = self.tcp.take() {
                        let _ = self.poll.registry().deregister(&mut s);
                    }
                    self.tcp_connected = false;
                }
                Event::Welcome {
                    me,
                    enrolled,
                    relays,
                    wgstun,
                } => {
                    if enrolled {
                        log!("agent: joined the mesh as {} ({})", me.name, me.mesh_addr);
                    } else {
                        log!(
                            "agent: connected to the coordinator as {} ({})",
                            me.name,
                            me.mesh_addr
                        );
                    }
                    self.state.me = Some(me);
                    self.state.relays = relays;
                    self.state.wgstun = wgstun;
                    self.state.join_secret = None;
                    self.dns
                        .set_nodes(self.state.me.as_ref(), self.state.peers.iter());
                    self.save_identity();
                    self.store.map_changed(now);
                    self.configure_stun(now);
                    self.need_apply = true;
                }
                Event::MapChanged => {
                    self.state.me = self.ctrl.me().cloned();
                    self.state.peers = self.ctrl.peers().cloned().collect();
                    self.dns
                        .set_nodes(self.state.me.as_ref(), self.state.peers.iter());
                    // A rename of this node changes its identity file too.
                    self.save_identity();
                    self.store.map_changed(now);
                    self.need_apply = true;
                }
                Event::Policy(p) => {
                    if self.firewall.set_policy(p) {
                        self.need_apply = true;
                    }
                }
                Event::KeyRotated => {
                    self.state.private_key = *self.ctrl.private_key();
                    self.state.pending_private_key = None;
                    self.save_identity();
                    self.store.map_changed(now);
                    log!(
                        "agent: now using key {}",
                        self.state.private_key.public_key().short()
                    );
                    self.need_apply = true;
                }
                Event::Refused {
                    code,
                    reason,
                    permanent,
                } => {
                    log_warn!("agent: coordinator refused: {reason}");
                    if permanent {
                        self.refused_for_good(code, &reason);
                    }
                }
            }
        }
    }

    /// Sealed messages in (through the relays) and out, and pings answered.
    fn peer_messages(&mut self, now: Instant) {
        while let Some((from, msg)) = self.relay.take_sealed() {
            let result = self.msgs.open_relayed(from, &msg).and_then(|payload| {
                if payload
                    .first()
                    .is_some_and(|t| *t >= crate::nat::message::FIRST_TYPE)
                {
                    match crate::nat::message::Message::decode(&payload) {
                        Ok(Some(m)) => self.nat.handle_message(now, from, Via::Relay, m),
                        Ok(None) => {}
                        Err(e) => return Err(e.to_string()),
                    }
                    Ok(())
                } else {
                    self.msgs.handle_payload(now, from, &payload)
                }
            });
            if let Err(why) = result
                && self
                    .last_sealed_drop_log
                    .is_none_or(|t| now.saturating_duration_since(t) >= SEALED_DROP_LOG_INTERVAL)
            {
                self.last_sealed_drop_log = Some(now);
                log_warn!(
                    "agent: dropped a peer message from {}: {why}",
                    self.peer_label(&from)
                );
            }
        }
        self.msgs.handle_timeout(now);
        while let Some((peer, msg)) = self.msgs.poll_transmit() {
            // Over the direct path when there is one: it is the path traffic takes.
            if let Some(src) = self.reply_to.remove(&peer) {
                self.direct.send_sealed(src, &msg);
            } else if let Some(check) = self.direct_check_addr(now, &peer) {
                self.direct.send_sealed(check, &msg);
            } else if !self.relay.send_sealed(now, &peer, &msg) {
                self.msgs
                    .unsent(&peer, "no connection to the relay that reaches it");
            }
        }
        self.relay.flush(now);
        while let Some((id, result)) = self.msgs.poll_answer() {
            let Some(wait) = self.clients.get_mut(&id).and_then(|c| c.waiting.take()) else {
                continue;
            };
            let resp = match result {
                Ok(rtt) => Response::Pong {
                    name: wait.name,
                    mesh_addr: wait.mesh_addr,
                    relay: wait.relay,
                    rtt_us: rtt.as_micros() as u64,
                },
                Err(why) => Response::Error {
                    reason: format!("pinging {} ({}): {why}", wait.name, wait.mesh_addr),
                },
            };
            self.answer(id, &resp);
        }
    }

    fn peer_label(&self, key: &Key) -> String {
        match self.ctrl.peers().find(|p| p.public_key == *key) {
            Some(p) => format!("{} ({})", p.name, key.short()),
            None => format!("unknown key {}", key.short()),
        }
    }

    fn start_ping(&mut self, id: usize, peer: &str) -> Result<()> {
        let p = self
            .ctrl
            .peers()
            .find(|p| p.name == peer || p.mesh_addr.to_string() == peer || p.public_key.to_base64() == peer)
            .cloned()
            .with_context(|| format!("no peer named {peer:?} in the mesh"))?;
        let now = Instant::now();
        let relay = match self.direct_check_addr(now, &p.public_key) {
            Some(check) => format!("direct {check}"),
            None => self
                .relay
                .relay_for_peer(&p.public_key)
                .map(|r| format!("relay {r}"))
                .with_context(|| {
                    format!(
                        "pinging {}: no direct path and the mesh publishes no relay for it",
                        p.name
                    )
                })?,
        };
        self.msgs.ping(now, p.public_key, id)?;
        if let Some(c) = self.clients.get_mut(&id) {
            c.waiting = Some(PingWait {
                name: p.name,
                mesh_addr: p.mesh_addr,
                relay,
            });
        }
        Ok(())
    }

    fn answer(&mut self, id: usize, resp: &Response) {
        let Some(c) = self.clients.get_mut(&id) else {
            return;
        };
        c.output = serde_json::to_vec(resp).unwrap_or_default();
        c.output.push(b'\n');
        self.client_io(id);
    }

    /// On the way out: a userspace implementation is a process this agent
    /// started, which nothing would supervise or stop once the agent is gone,
    /// so it is stopped and the interface goes with it. A kernel interface is
    /// kept: it costs no process, and across a restart (an upgrade, systemd's
    /// restart) the mesh keeps carrying traffic on the last configuration.
    fn release_interface(&mut self) {
        if self.backend.kind() != crate::wg::BackendKind::Userspace {
            return;
        }
        let ifname = self.cfg.ifname.clone();
        match self.backend.exists(&ifname) {
            Ok(true) => match self.backend.delete(&ifname) {
                Ok(()) => log!("agent: stopped the userspace WireGuard of {ifname}"),
                Err(e) => log_warn!("agent: stopping the userspace WireGuard of {ifname}: {e:#}"),
            },
            Ok(false) => {}
            Err(e) => log_warn!("agent: {ifname}: {e:#}"),
        }
    }

    fn refused_for_good(&mut self, code: ErrorCode, reason: &str) {
        match code {
            ErrorCode::Removed | ErrorCode::UnknownNode => {
                // Out of the mesh: take its interface down and forget the membership.
                if self.backend.exists(&self.cfg.ifname).unwrap_or(false)
                    && let Err(e) = self.backend.delete(&self.cfg.ifname)
                {
                    log_warn!("agent: removing {}: {e:#}", self.cfg.ifname);
                }
                self.store.forget();
                // Nor does this mesh's policy stay for the next membership.
                self.firewall.set_policy(None);
                if self.can_rejoin {
                    // Removed while the agent was down, and started with a new token: use it.
                    self.rejoin = true;
                    self.stop = Some(Ok(()));
                } else {
                    self.stop = Some(Err(anyhow::anyhow!("coordinator: {reason}")));
                }
            }
            ErrorCode::InviteUnknown
            | ErrorCode::InviteExpired
            | ErrorCode::InviteUsed
            | ErrorCode::Version => {
                if self.state.me.is_none() {
                    self.store.forget();
                }
                self.stop = Some(Err(anyhow::anyhow!("joining the mesh: {reason}")));
            }
            _ => self.stop = Some(Err(anyhow::anyhow!("coordinator: {reason}"))),
        }
    }

    /// The identity is written at once (see `cache`); the map is coalesced.
    fn save_identity(&mut self) {
        if let Err(e) = self.store.save_identity(&self.state) {
            log_error!("agent: {e:#}");
        }
    }

    fn dial(&mut self, now: Instant, server: &str) {
        let addr = match self.resolver.lookup(now, server) {
            Lookup::Ready(a) => a,
            // Dialled when the answer is in (`resolved`); one that never
            // comes runs into ControlConn's connect deadline.
            Lookup::Pending => {
                self.dial_waiting = Some(server.to_string());
                return;
            }
            Lookup::Failed(why) => {
                return self
                    .ctrl
                    .handle_disconnected(now, &format!("coordinator address: {why}"));
            }
        };
        match crate::sockopt::connect_tcp(addr) {
            Ok(mut s) => {
                if let Err(e) =
                    self.poll
                        .registry()
                        .register(&mut s, TCP, Interest::READABLE | Interest::WRITABLE)
                {
                    return self
                        .ctrl
                        .handle_disconnected(now, &format!("registering socket: {e}"));
                }
                self.tcp = Some(s);
                self.tcp_connected = false;
            }
            Err(e) => self
                .ctrl
                .handle_disconnected(now, &format!("connecting to {addr}: {e}")),
        }
    }

    fn tcp_ready(&mut self, now: Instant) {
        let Some(s) = self.tcp.as_mut() else { return };
        if !self.tcp_connected {
            if let Ok(Some(e)) | Err(e) = s.take_error() {
                return self.lost_tcp(now, &format!("connecting: {e}"));
            }
            match s.peer_addr() {
                Ok(_) => {
                    self.tcp_connected = true;
                    let _ = s.set_nodelay(true);
                    self.ctrl.handle_connected(now);
                }
                Err(e) if e.kind() == ErrorKind::NotConnected => return,
                Err(e) => return self.lost_tcp(now, &format!("connecting: {e}")),
            }
        }
        let mut buf = [0u8; 65536];
        loop {
            let Some(s) = self.tcp.as_mut() else { return };
            match s.read(&mut buf) {
                Ok(0) => return self.closed_tcp(now),
                Ok(n) => self.ctrl.handle_input(now, &buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == ErrorKind::ConnectionReset => return self.closed_tcp(now),
                Err(e) => return self.lost_tcp(now, &format!("reading: {e}")),
            }
        }
    }

    fn closed_tcp(&mut self, now: Instant) {
        if let Some(mut s) = self.tcp.take() {
            let _ = self.poll.registry().deregister(&mut s);
        }
        self.tcp_connected = false;
        self.ctrl.handle_closed(now);
    }

    fn lost_tcp(&mut self, now: Instant, why: &str) {
        if let Some(mut s) = self.tcp.take() {
            let _ = self.poll.registry().deregister(&mut s);
        }
        self.tcp_connected = false;
        self.ctrl.handle_disconnected(now, why);
    }

    fn write_tcp(&mut self, now: Instant) {
        if !self.tcp_connected {
            return;
        }
        let Some(s) = self.tcp.as_mut() else { return };
        if let Err(e) = write_pending(s, &mut self.ctrl) {
            self.lost_tcp(now, &format!("writing: {e}"));
        }
    }

    fn accept_clients(&mut self) {
        loop {
            match self.api.accept() {
                Ok((mut stream, _)) => {
                    if !peer_uid(stream.as_raw_fd()).is_ok_and(uid_allowed) {
                        // One line that fits the empty socket buffer of a fresh
                        // connection, so the refusal is said rather than a reset.
                        let refusal = Response::Error {
                            reason: api::NOT_ROOT.into(),
                        };
                        let mut line = serde_json::to_vec(&refusal).unwrap_or_default();
                        line.push(b'\n');
                        let _ = stream.write(&line);
                        continue;
                    }
                    let id = self.next_client;
                    self.next_client += 1;
                    if self
                        .poll
                        .registry()
                        .register(&mut stream, Token(id), Interest::READABLE | Interest::WRITABLE)
                        .is_ok()
                    {
                        self.clients.insert(
                            id,
                            Client {
                                stream,
                                input: Vec::new(),
                                output: Vec::new(),
                                waiting: None,
                            },
                        );
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return,
            }
        }
    }

    fn client_io(&mut self, id: usize) {
        let Some(c) = self.clients.get_mut(&id) else {
            return;
        };
        if c.waiting.is_some() && c.output.is_empty() {
            // Already asked; the answer comes with the pong or the timeout.
            return;
        }
        if c.output.is_empty() {
            let eof = crate::nonblock::read_available(&mut c.stream, &mut c.input, api::MAX_REQUEST_LEN)
                || c.input.len() > api::MAX_REQUEST_LEN;
            let line = c
                .input
                .iter()
                .position(|&b| b == b'\n')
                .map(|end| c.input[..end].to_vec());
            match line {
                Some(line) => {
                    let resp = match serde_json::from_slice::<Request>(&line) {
                        Ok(Request::Ping { peer }) => match self.start_ping(id, &peer) {
                            Ok(()) => return,
                            Err(e) => Response::Error {
                                reason: format!("{e:#}"),
                            },
                        },
                        Ok(req) => self.handle_request(req),
                        Err(e) => Response::Error {
                            reason: format!("bad request: {e}"),
                        },
                    };
                    let Some(c) = self.clients.get_mut(&id) else {
                        return;
                    };
                    c.output = serde_json::to_vec(&resp).unwrap_or_default();
                    c.output.push(b'\n');
                }
                None if eof => {
                    self.clients.remove(&id);
                    return;
                }
                None => return,
            }
        }
        let Some(c) = self.clients.get_mut(&id) else {
            return;
        };
        while !c.output.is_empty() {
            match c.stream.write(&c.output) {
                Ok(n) if n > 0 => {
                    c.output.drain(..n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                _ => break,
            }
        }
        if let Some(mut c) = self.clients.remove(&id) {
            let _ = self.poll.registry().deregister(&mut c.stream);
        }
    }

    fn handle_request(&mut self, req: Request) -> Response {
        match req {
            Request::Status => match self.status() {
                Ok(s) => Response::Status { status: Box::new(s) },
                Err(e) => Response::Error {
                    reason: format!("{e:#}"),
                },
            },
            Request::Ping { .. } => Response::Error {
                reason: "ping: answered by the caller of start_ping".into(),
            },
            Request::Netcheck => Response::Netcheck {
                report: Box::new(self.netcheck()),
            },
            Request::RotateKey => match self.ctrl.phase() {
                Phase::Connected => {
                    // On disk before it is announced: see `AgentState::pending_private_key`.
                    let new = Key::generate_private();
                    self.state.pending_private_key = Some(new);
                    if let Err(e) = self.store.save_identity(&self.state) {
                        return Response::Error {
                            reason: format!("rotating key: {e:#}"),
                        };
                    }
                    let _ = self.ctrl.rotate_key(new);
                    self.write_tcp(Instant::now());
                    Response::Done
                }
                _ => Response::Error {
                    reason: "rotating key: not connected to the coordinator; try again when it is reachable"
                        .into(),
                },
            },
            Request::Down => {
                self.ctrl.goodbye();
                self.write_tcp(Instant::now());
                let ifname = self.cfg.ifname.clone();
                let result = match self.backend.exists(&ifname) {
                    Ok(true) => self.backend.delete(&ifname),
                    Ok(false) => Ok(()),
                    Err(e) => Err(e),
                };
                self.stop = Some(Ok(()));
                match result {
                    Ok(()) => {
                        log!("agent: down: removed {ifname}");
                        Response::Done
                    }
                    Err(e) => Response::Error {
                        reason: format!("removing {ifname}: {e:#}"),
                    },
                }
            }
        }
    }
}

fn in_mesh(ip: Ipv4Addr) -> bool {
    let o = ip.octets();
    o[0] == 100 && (o[1] & 0xc0) == 64
}
