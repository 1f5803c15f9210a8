//! `warren agent`, `warren up`, `warren down`, `warren status`.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::out::outln;
use anyhow::{Context, Result, bail};
use clap::Args;

use crate::agent::api::{self, DEFAULT_SOCKET, Request, Response, Status};
use crate::agent::dns::{DnsConfig, Listen};
use crate::agent::run::{self, AgentConfig};
use crate::wg::select::BackendChoice;

/// How long `warren up` waits for the agent to join or reconnect.
const UP_TIMEOUT: Duration = Duration::from_secs(30);
const UP_POLL: Duration = Duration::from_millis(100);

#[derive(Args, Debug, Clone)]
pub struct AgentArgs {
    #[command(flatten)]
    pub daemon: super::daemon::DaemonArgs,
    /// Join token from `warren server invite` (needed once; remembered after);
    /// `-` reads it from stdin. Given here it is in this process's command
    /// line, which every local user can read: prefer `-` or --join-file.
    #[arg(long, value_name = "TOKEN", conflicts_with = "join_file")]
    pub join: Option<String>,
    /// Read the join token from FILE (keep it mode 0600; `-` is stdin). For
    /// `warren agent`, a missing file is no token once the node has joined.
    #[arg(long, value_name = "FILE")]
    pub join_file: Option<PathBuf>,
    /// Name to ask for (default: the hostname; an invite's name wins).
    #[arg(long)]
    pub name: Option<String>,
    /// Where the key and the last peer map are kept.
    #[arg(long, default_value = "/var/lib/warren")]
    pub state_dir: PathBuf,
    /// Where the last peer map is kept (default: the state directory). A
    /// router with its state directory on flash points this at a tmpfs
    /// (e.g. /tmp/warren): the map changes often and the coordinator resends it.
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// WireGuard interface the agent owns.
    #[arg(long, default_value = "warren0")]
    pub interface: String,
    /// WireGuard listen port.
    #[arg(long, default_value_t = 51820)]
    pub port: u16,
    /// Local control socket.
    #[arg(long, default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// WireGuard implementation (default: $WARREN_WG_BACKEND, else auto).
    #[arg(long)]
    pub backend: Option<BackendChoice>,
    /// Do not ask the home router (PCP, NAT-PMP, UPnP IGD) to map the
    /// WireGuard and check ports.
    #[arg(long)]
    pub no_portmap: bool,
    /// Serve Prometheus metrics on ADDR (e.g. 127.0.0.1:9101, or the mesh
    /// address) at /metrics; off when absent.
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
    /// Where the name server for mesh names listens: `:PORT` (the mesh
    /// address, another port: where a local resolver such as dnsmasq holds
    /// 53) or `ADDR:PORT` with a mesh or loopback address. Default: the
    /// mesh address, port 53.
    #[arg(long, value_name = "ADDR", value_parser = parse_dns_listen, conflicts_with = "no_dns")]
    pub dns_listen: Option<Listen>,
    /// Do not answer DNS for mesh names.
    #[arg(long)]
    pub no_dns: bool,
    /// The domain of mesh names: NAME.DOMAIN.
    #[arg(long, value_name = "DOMAIN", default_value = crate::dns::names::DEFAULT_DOMAIN)]
    pub dns_domain: String,
    /// Keep the mesh's names in a `# BEGIN warren` block of FILE (e.g.
    /// /etc/hosts, where no systemd-resolved or dnsmasq asks the agent);
    /// removed on a clean stop. Off by default.
    #[arg(long, value_name = "FILE")]
    pub hosts_file: Option<PathBuf>,
    #[command(flatten)]
    pub routes: super::agent_routes::RouteArgs,
}

/// `:PORT`, `PORT` or `ADDR:PORT`; an address must be the mesh's or
/// loopback, so that the name server never answers on a WAN address.
fn parse_dns_listen(s: &str) -> std::result::Result<Listen, String> {
    let port_only = s.strip_prefix(':').unwrap_or(s);
    if let Ok(port) = port_only.parse::<u16>() {
        return Ok(Listen::Mesh(port));
    }
    let addr: std::net::SocketAddr = s
        .parse()
        .map_err(|_| format!("{s:?} is not :PORT or ADDR:PORT"))?;
    let allowed = match addr.ip() {
        std::net::IpAddr::V4(v4) => v4.is_loopback() || crate::dns::names::in_mesh(v4),
        std::net::IpAddr::V6(v6) => v6.is_loopback(),
    };
    if !allowed {
        return Err(format!(
            "{addr}: the name server listens only on a mesh (100.64.0.0/10) or loopback address"
        ));
    }
    Ok(Listen::At(addr))
}

#[derive(Args, Debug)]
pub struct SocketArgs {
    #[arg(long, default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Config file whose [agent] section says where the agent is (its
    /// `socket`; the agent's other keys are its own). Default:
    /// /etc/warren/warren.toml, when it exists and this user may read it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Print JSON, errors too (`{"error": ...}`); see README "JSON output".
    #[arg(long)]
    pub json: bool,
}

/// Where `warren up` hands the token to the agent it starts: its stdin, a
/// pipe, so the token is never in a command line (/proc/PID/cmdline).
const JOIN_FROM_STDIN: &str = "-";

/// The join token given by --join or --join-file, read from stdin or the file.
/// `missing_ok`: a --join-file that does not exist is no token.
fn read_token(a: &AgentArgs, missing_ok: bool) -> Result<Option<String>> {
    let token = match (&a.join, &a.join_file) {
        (Some(t), _) if t == JOIN_FROM_STDIN => read_stdin_token()?,
        (Some(t), _) => t.clone(),
        (None, Some(f)) if f.as_os_str() == JOIN_FROM_STDIN => read_stdin_token()?,
        (None, Some(f)) => match read_token_file(f)? {
            Some(t) => t,
            None if missing_ok => return Ok(None),
            None => bail!("reading the join token: {} does not exist", f.display()),
        },
        (None, None) => return Ok(None),
    };
    Ok(Some(token.trim().to_string()))
}

fn read_stdin_token() -> Result<String> {
    let mut token = String::new();
    // A token is at most MAX_TOKEN_LEN; more is not a token (parse says so).
    std::io::stdin()
        .take(crate::coord::invite::MAX_TOKEN_LEN as u64 + 1)
        .read_to_string(&mut token)
        .context("reading the join token from stdin")?;
    if token.trim().is_empty() {
        bail!("reading the join token from stdin: nothing there");
    }
    Ok(token)
}

/// The token in `path`, `None` if there is no such file. A file other local
/// users can read is used, with a warning: they can add nodes with it.
fn read_token_file(path: &Path) -> Result<Option<String>> {
    let what = || format!("reading the join token from {}", path.display());
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(what),
    };
    let mode = file.metadata().with_context(what)?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        log_warn!(
            "warren: warning: {} is readable by other users (mode {mode:04o}); \
             anyone who reads the token can add nodes: chmod 600 it",
            path.display()
        );
    }
    let mut token = String::new();
    file.take(crate::coord::invite::MAX_TOKEN_LEN as u64 + 1)
        .read_to_string(&mut token)
        .with_context(what)?;
    Ok(Some(token))
}

fn config(a: AgentArgs, join: Option<String>) -> AgentConfig {
    AgentConfig {
        cache_dir: a.cache_dir.unwrap_or_else(|| a.state_dir.clone()),
        state_dir: a.state_dir,
        ifname: a.interface,
        listen_port: a.port,
        join,
        name: a.name,
        socket: a.socket,
        backend: a.backend,
        portmap: !a.no_portmap,
        metrics_listen: a.metrics_listen,
        dns: DnsConfig {
            listen: match (a.no_dns, a.dns_listen) {
                (true, _) => Listen::Off,
                (false, Some(l)) => l,
                (false, None) => Listen::Mesh(crate::agent::dns::DEFAULT_PORT),
            },
            domain: a.dns_domain,
            hosts_file: a.hosts_file,
        },
        routes: a.routes.config(),
    }
}

pub fn agent(a: AgentArgs) -> Result<()> {
    a.daemon.start();
    let joined = crate::agent::cache::path(&a.state_dir).exists();
    let join = match read_token(&a, joined) {
        Ok(t) => t,
        // The file is where a service manager's unit says; the node needs it once.
        Err(_) if a.join_file.as_ref().is_some_and(|f| !f.exists()) => bail!(
            "this node has not joined a mesh yet and {} does not exist: put the token from \
             `warren server invite` there (mode 0600)",
            a.join_file
                .as_ref()
                .map(|f| f.display().to_string())
                .unwrap_or_default()
        ),
        Err(e) => return Err(e),
    };
    if a.join.as_deref().is_some_and(|t| t != JOIN_FROM_STDIN) {
        log_warn!(
            "agent: warning: --join TOKEN leaves the token in the process list for every local \
             user to read; use --join-file FILE"
        );
    }
    run::run(config(a, join))
}

/// Starts the agent in the background and waits until it is in the mesh.
pub fn up(a: AgentArgs) -> Result<()> {
    a.daemon.start();
    if api::request(&a.socket, &Request::Status).is_ok() {
        bail!(
            "warren is already up (agent answering on {}); see `warren status`",
            a.socket.display()
        );
    }
    // A joined node needs no token: the config file's join_token_file may
    // name a file removed after joining.
    let joined = crate::agent::cache::path(&a.state_dir).exists();
    let token = read_token(&a, joined)?;
    if let Some(j) = &token {
        // A mistyped token is reported here, before anything is started.
        crate::coord::invite::JoinToken::parse(j)?;
    }
    std::fs::create_dir_all(&a.state_dir).with_context(|| format!("creating {}", a.state_dir.display()))?;
    let log_path = a.state_dir.join("agent.log");
    let log = std::fs::File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
    let exe = std::env::current_exe().context("finding the warren binary")?;
    let mut cmd = Command::new(exe);
    cmd.arg("agent")
        .arg("--state-dir")
        .arg(&a.state_dir)
        .arg("--interface")
        .arg(&a.interface)
        .arg("--port")
        .arg(a.port.to_string())
        .arg("--socket")
        .arg(&a.socket);
    if token.is_some() {
        cmd.arg("--join-file").arg(JOIN_FROM_STDIN);
    }
    if let Some(d) = &a.cache_dir {
        cmd.arg("--cache-dir").arg(d);
    }
    if let Some(n) = &a.name {
        cmd.arg("--name").arg(n);
    }
    if let Some(b) = a.backend {
        cmd.arg("--backend").arg(format!("{b:?}").to_lowercase());
    }
    if a.no_portmap {
        cmd.arg("--no-portmap");
    }
    if let Some(m) = a.metrics_listen {
        cmd.arg("--metrics-listen").arg(m.to_string());
    }
    // The agent reads the same file again, for the keys `up` has no use for.
    if let Some(c) = &a.daemon.config {
        cmd.arg("--config").arg(c);
    }
    cmd.arg("--log-level").arg(a.daemon.log_level.name());
    match a.dns_listen {
        Some(Listen::Mesh(port)) => {
            cmd.arg("--dns-listen").arg(format!(":{port}"));
        }
        Some(Listen::At(addr)) => {
            cmd.arg("--dns-listen").arg(addr.to_string());
        }
        Some(Listen::Off) | None => {}
    }
    if a.no_dns {
        cmd.arg("--no-dns");
    }
    cmd.arg("--dns-domain").arg(&a.dns_domain);
    if let Some(f) = &a.hosts_file {
        cmd.arg("--hosts-file").arg(f);
    }
    a.routes.forward(&mut cmd);
    let stdin = if token.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    };
    cmd.stdin(stdin).stdout(log.try_clone()?).stderr(log);
    // SAFETY: setsid is async-signal-safe; it detaches the agent from our terminal.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("starting the agent")?;
    if let (Some(t), Some(mut pipe)) = (&token, child.stdin.take()) {
        // Far less than a pipe's buffer, so this never blocks; an agent that
        // died before reading it is reported below, from its log.
        let _ = pipe.write_all(t.as_bytes());
    }
    let deadline = Instant::now() + UP_TIMEOUT;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait()? {
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            let last = text
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("")
                .trim_start_matches("warren: ");
            bail!("the agent stopped ({status}): {last}");
        }
        if let Ok(Response::Status { status }) = api::request(&a.socket, &Request::Status)
            && status.coordinator == "connected"
            && let (Some(name), Some(addr)) = (&status.name, status.mesh_addr)
        {
            outln!(
                "warren is up: {name} ({addr}), {} peer(s) in the mesh",
                status.peers.len()
            )?;
            return Ok(());
        }
        std::thread::sleep(UP_POLL);
    }
    let why = match api::request(&a.socket, &Request::Status) {
        Ok(Response::Status { status }) => status.coordinator_error.map(|e| format!(": {e}")),
        _ => None,
    };
    bail!(
        "the agent did not reach the coordinator within {} s{}; it keeps trying (log: {})",
        UP_TIMEOUT.as_secs(),
        why.unwrap_or_default(),
        log_path.display()
    )
}

#[derive(Args, Debug)]
pub struct PingArgs {
    /// The peer: its name, mesh address or public key.
    pub peer: String,
    /// How many pings, one per second.
    #[arg(short, long, default_value_t = 3)]
    pub count: u32,
    #[arg(long, default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Config file whose [agent] section says where the agent is (its
    /// `socket`; the agent's other keys are its own). Default:
    /// /etc/warren/warren.toml, when it exists and this user may read it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// One JSON document after the last ping (see README "JSON output").
    #[arg(long)]
    pub json: bool,
}

/// Time between two pings of `warren ping`.
const PING_INTERVAL: Duration = Duration::from_secs(1);

/// `warren ping --json`: every ping, answered or lost.
#[derive(serde::Serialize, Default)]
struct PingReport {
    peer: String,
    name: Option<String>,
    mesh_addr: Option<std::net::Ipv4Addr>,
    sent: u32,
    received: u32,
    pings: Vec<PingResult>,
}

#[derive(serde::Serialize)]
struct PingResult {
    seq: u32,
    /// direct, relay, or absent when lost.
    path: Option<String>,
    /// The direct endpoint or the relay's address.
    via: Option<String>,
    rtt_us: Option<u64>,
    error: Option<String>,
}

/// "direct ADDR" / "relay ADDR" as the agent words a pong's path: (path, via).
fn split_path(relay: &str) -> (String, Option<String>) {
    match relay.split_once(' ') {
        Some((p, via)) => (p.to_string(), Some(via.to_string())),
        None => (relay.to_string(), None),
    }
}

/// One line per ping (or one JSON document); fails if none came back. A
/// wrong peer name or a missing agent fails at once instead of repeating the
/// same error.
pub fn ping(a: PingArgs) -> Result<()> {
    let mut report = PingReport {
        peer: a.peer.clone(),
        ..PingReport::default()
    };
    let mut lost = None;
    for seq in 1..=a.count {
        if seq > 1 {
            std::thread::sleep(PING_INTERVAL);
        }
        report.sent += 1;
        match api::request(&a.socket, &Request::Ping { peer: a.peer.clone() }) {
            Ok(Response::Pong {
                name,
                mesh_addr,
                relay,
                rtt_us,
            }) => {
                report.received += 1;
                let (path, via) = split_path(&relay);
                if !a.json {
                    let words = match (path.as_str(), &via) {
                        ("relay", Some(r)) => format!("through relay {r}"),
                        ("direct", Some(d)) => format!("direct to {d}"),
                        _ => relay.clone(),
                    };
                    outln!(
                        "pong from {name} ({mesh_addr}) {words}: {:.1} ms",
                        rtt_us as f64 / 1000.0
                    )?;
                }
                report.name = Some(name);
                report.mesh_addr = Some(mesh_addr);
                report.pings.push(PingResult {
                    seq,
                    path: Some(path),
                    via,
                    rtt_us: Some(rtt_us),
                    error: None,
                });
            }
            Ok(_) => bail!("unexpected answer from the agent"),
            Err(e) if format!("{e:#}").contains(PING_LOST) => {
                if !a.json {
                    outln!("{e:#}")?;
                }
                report.pings.push(PingResult {
                    seq,
                    path: None,
                    via: None,
                    rtt_us: None,
                    error: Some(format!("{e:#}")),
                });
                lost = Some(e);
            }
            Err(e) => return Err(e),
        }
    }
    match lost {
        Some(e) if report.received == 0 => Err(e),
        _ if a.json => super::out::json(&report),
        _ => Ok(()),
    }
}

/// How the agent words a ping that got no answer in time.
const PING_LOST: &str = "no answer within";

/// `warren netcheck`: what the agent learned about this node's network.
pub fn netcheck(a: SocketArgs) -> Result<()> {
    let Response::Netcheck { report } = api::request(&a.socket, &Request::Netcheck)? else {
        bail!("unexpected answer from the agent");
    };
    if a.json {
        return super::out::json(&report);
    }
    let or_why = |v: Option<std::net::SocketAddr>, why: &Option<String>| match (v, why) {
        (Some(v), _) => v.to_string(),
        (None, Some(w)) => format!("not learned: {w}"),
        (None, None) => "not learned yet".to_string(),
    };
    outln!(
        "WireGuard socket, public mapping (WG-STUN {}): {}",
        report.wgstun.as_deref().unwrap_or("none"),
        or_why(report.wg_mapping, &report.wg_mapping_error)
    )?;
    outln!(
        "check socket, public mapping (plain STUN): {}",
        or_why(report.check_mapping, &report.check_mapping_error)
    )?;
    let varies = match report.mapping_varies {
        Some(true) => "yes (symmetric NAT: peers behind NAT cannot dial this node directly)".to_string(),
        Some(false) => "no".to_string(),
        None => report.mapping_varies_detail.clone(),
    };
    outln!("mapping varies by destination: {varies}")?;
    if report.candidates.is_empty() {
        outln!("candidates: none (no usable interface address)")?;
    }
    for c in &report.candidates {
        outln!(
            "candidate {:<7} WireGuard {:<24} check {}",
            c.kind,
            c.wg.to_string(),
            c.check
        )?;
    }
    let pm = &report.portmap;
    match (&pm.protocol, pm.gateway) {
        (Some(p), Some(g)) => outln!(
            "port mapping: {p} on router {g}, external address {}",
            pm.external_ip.map_or("unknown".to_string(), |a| a.to_string())
        )?,
        (None, Some(g)) => outln!(
            "port mapping: none on router {g}{}",
            pm.error.as_ref().map(|e| format!(" ({e})")).unwrap_or_default()
        )?,
        (_, None) => outln!(
            "port mapping: {}",
            pm.error.as_deref().unwrap_or("no router to ask")
        )?,
    }
    if pm.enabled && pm.gateway.is_some() {
        // In the order they are preferred.
        let probes: Vec<String> = ["pcp", "natpmp", "upnp"]
            .iter()
            .filter_map(|p| pm.probes.get(*p).map(|s| format!("{p} {s}")))
            .collect();
        outln!("  asked: {}", probes.join("; "))?;
    }
    for m in &pm.mappings {
        let lease = m
            .lease_secs_left
            .map_or("no expiry".to_string(), |s| format!("lease {s} s left"));
        outln!(
            "  mapped {} port {} -> external port {}, {lease}",
            m.socket,
            m.internal_port,
            m.external_port
        )?;
    }
    if report.relays.is_empty() {
        outln!("relays: none published")?;
    }
    for r in &report.relays {
        let addr = r.addr.as_deref().unwrap_or("-");
        let home = if r.home { " (home)" } else { "" };
        match r.connect_us {
            Some(us) => outln!(
                "relay {addr}{home}: {}, connect + handshake {:.1} ms",
                r.state,
                us as f64 / 1000.0
            )?,
            None => outln!(
                "relay {addr}{home}: {}{}",
                r.state,
                r.detail.as_deref().map(|d| format!(" ({d})")).unwrap_or_default()
            )?,
        }
    }
    Ok(())
}

pub fn down(a: SocketArgs) -> Result<()> {
    api::request(&a.socket, &Request::Down)?;
    if a.json {
        return super::out::json(&serde_json::json!({ "down": true }));
    }
    outln!("warren is down")?;
    Ok(())
}

pub fn status(a: SocketArgs) -> Result<()> {
    let Response::Status { status } = api::request(&a.socket, &Request::Status)? else {
        bail!("unexpected answer from the agent");
    };
    if a.json {
        return super::out::json(&status);
    }
    super::out::write(&format_status(&status))
}

fn format_status(s: &Status) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let name = s.name.as_deref().unwrap_or("(not joined)");
    let addr = s.mesh_addr.map(|a| a.to_string()).unwrap_or_else(|| "-".into());
    let _ = writeln!(
        out,
        "{name} {addr} key {} on {} ({})",
        s.public_key.short(),
        s.interface,
        s.backend
    );
    match &s.coordinator_detail {
        Some(d) => {
            let _ = writeln!(out, "coordinator: {} ({d})", s.coordinator);
        }
        None => {
            let _ = writeln!(out, "coordinator: {}", s.coordinator);
        }
    }
    if let Some(r) = &s.routing {
        super::agent_routes::format_status(&mut out, r);
    }
    let _ = match (&s.policy.digest, &s.policy.error) {
        (None, _) => writeln!(out, "policy: none (every node may reach this one)"),
        (Some(d), None) if s.policy.applied => writeln!(out, "policy: {d} in force"),
        (Some(d), Some(e)) => writeln!(out, "policy: {d} NOT applied: {e}"),
        (Some(d), None) => writeln!(out, "policy: {d} not applied yet"),
    };
    if s.log_lines_dropped > 0 {
        let _ = writeln!(
            out,
            "log: {} lines dropped (the reader of the agent's stderr went away)",
            s.log_lines_dropped
        );
    }
    for r in &s.relays {
        let addr = r.addr.as_deref().unwrap_or("-");
        let home = if r.home { " (home)" } else { "" };
        let _ = match &r.detail {
            Some(d) if r.state != "connected" => writeln!(out, "relay: {addr}{home} {} ({d})", r.state),
            _ => writeln!(out, "relay: {addr}{home} {}", r.state),
        };
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<20} {:<15} {:<8} {:<22} {:<15} {:<10} {:>10} {:>10}  DETAIL",
        "PEER", "ADDRESS", "STATE", "ENDPOINT", "PATH", "HANDSHAKE", "RX", "TX"
    );
    for p in &s.peers {
        // A relayed peer's WireGuard endpoint is our loopback socket; the relay says more.
        let ep = match (&p.relay, p.endpoint) {
            (Some(relay), _) => relay.clone(),
            (None, Some(e)) => e.to_string(),
            (None, None) => "-".into(),
        };
        let hs = p
            .last_handshake_secs
            .map(|s| format!("{s}s ago"))
            .unwrap_or_else(|| "never".into());
        let state = if p.online { "online" } else { "offline" };
        let mut path = format!("{:?}", p.path).to_lowercase();
        // A direct path through a router's port mapping names the protocol.
        if let Some(pair) = &p.pair
            && let Some(k) = [&pair.remote_kind, &pair.local_kind]
                .into_iter()
                .find(|k| ["pcp", "natpmp", "upnp"].contains(&k.as_str()))
        {
            path = format!("{path} ({k})");
        }
        // Direct: which candidates met (ours -> theirs), the check's RTT and
        // the time on the path; relayed: why.
        let detail = match (&p.pair, &p.reason) {
            (Some(pair), _) => {
                let rtt = p
                    .rtt_us
                    .map(|us| format!(", rtt {:.1} ms", us as f64 / 1000.0))
                    .unwrap_or_default();
                let since = p.path_secs.map(|s| format!(", for {s} s")).unwrap_or_default();
                format!("{} -> {}{rtt}{since}", pair.local_kind, pair.remote_kind)
            }
            (None, Some(r)) => r.clone(),
            (None, None) => String::new(),
        };
        let _ = writeln!(
            out,
            "{:<20} {:<15} {:<8} {:<22} {:<15} {:<10} {:>10} {:>10}  {detail}",
            p.name, p.mesh_addr, state, ep, path, hs, p.rx_bytes, p.tx_bytes
        );
    }
    out
}

/// How long `warren rotate-key` waits for the coordinator to confirm the new key.
const ROTATE_TIMEOUT: Duration = Duration::from_secs(10);

fn current_status(socket: &std::path::Path) -> Result<Status> {
    match api::request(socket, &Request::Status)? {
        Response::Status { status } => Ok(*status),
        _ => bail!("unexpected answer from the agent"),
    }
}

pub fn rotate_key(a: SocketArgs) -> Result<()> {
    let old = current_status(&a.socket)?.public_key;
    api::request(&a.socket, &Request::RotateKey)?;
    let deadline = Instant::now() + ROTATE_TIMEOUT;
    while Instant::now() < deadline {
        let now = current_status(&a.socket)?.public_key;
        if now != old && a.json {
            return super::out::json(&serde_json::json!({ "public_key": now, "old_public_key": old }));
        }
        if now != old {
            outln!(
                "new key {} (was {}); name and address unchanged",
                now.short(),
                old.short()
            )?;
            return Ok(());
        }
        std::thread::sleep(UP_POLL);
    }
    bail!(
        "the coordinator did not confirm the new key within {} s",
        ROTATE_TIMEOUT.as_secs()
    )
}
