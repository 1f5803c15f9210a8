//! `warren server` (alias `warren coord`): run the coordinator, or administer a running one.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use super::out::outln;
use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};

use crate::control::messages::{RelayInfo, WgStunInfo};
use crate::coord::admin::{self, AdminRequest, AdminResponse, NodeView};
use crate::coord::invite;
use crate::coord::server::{ADMIN_SOCKET, DB_FILE, DEFAULT_PORT, Server, ServerConfig};
use crate::coord::store::human_duration;
use crate::keys::Key;
use crate::relay::server::{RelayConfig, RelayHandle, RelayServer};

mod policy;

#[derive(Args, Debug)]
pub struct ServerArgs {
    #[command(flatten)]
    pub daemon: super::daemon::DaemonArgs,
    /// Address for node connections.
    #[arg(long, default_value_t = SocketAddr::from(([0, 0, 0, 0], DEFAULT_PORT)))]
    pub listen: SocketAddr,
    /// Directory for the server key, the database and the admin socket.
    #[arg(long, global = true, default_value = "/var/lib/warren")]
    pub state_dir: PathBuf,
    /// Database file (default: STATE_DIR/server.db).
    #[arg(long)]
    pub db: Option<PathBuf>,
    /// Address nodes should dial, put into join tokens (repeatable). Default:
    /// the listen address, or every local IPv4 address when listening on all.
    #[arg(long = "advertise", value_name = "HOST:PORT")]
    pub advertise: Vec<String>,
    /// WG-STUN (WireGuard peer 100.64.0.4 answering STUN inside the tunnel) address.
    #[arg(long, default_value = crate::wgstun::DEFAULT_LISTEN)]
    pub wgstun_listen: SocketAddr,
    /// Plain STUN address (outside any tunnel).
    #[arg(long, default_value = crate::wgstun::DEFAULT_STUN_LISTEN)]
    pub stun_listen: SocketAddr,
    /// Do not run WG-STUN (nor plain STUN) in this process.
    #[arg(long)]
    pub no_wgstun: bool,
    /// Do not answer plain STUN (WG-STUN still runs).
    #[arg(long)]
    pub no_stun: bool,
    /// Relay address (TCP) for nodes that cannot reach each other directly.
    #[arg(long, default_value_t = SocketAddr::from(([0, 0, 0, 0], crate::relay::DEFAULT_PORT)))]
    pub relay_listen: SocketAddr,
    /// Address nodes should dial for this server's relay (repeatable). Default:
    /// the relay listen address, or each advertised coordinator host with the relay port.
    #[arg(long, value_name = "HOST:PORT")]
    pub relay_advertise: Vec<String>,
    /// Do not run a relay in this process (nodes then use only the --relay ones, if any).
    #[arg(long)]
    pub no_relay: bool,
    /// Another relay to publish to nodes, as KEY@HOST:PORT (repeatable); its
    /// key is what `warren relay --show-key` prints there.
    #[arg(long = "relay", value_name = "KEY@HOST:PORT")]
    pub relays: Vec<String>,
    /// Another WG-STUN server to publish to nodes, as KEY@HOST:PORT (repeatable);
    /// its key is what `warren wgstun --print-peer` prints there, and its plain
    /// STUN is assumed on HOST:3478 (`warren wgstun`'s default).
    #[arg(long = "wgstun", value_name = "KEY@HOST:PORT")]
    pub wgstuns: Vec<String>,
    /// Serve Prometheus metrics (the coordinator's, and those of the relay
    /// and WG-STUN running here) on ADDR at /metrics; off when absent.
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
    #[command(subcommand)]
    pub action: Option<ServerAction>,
}

#[derive(Args, Debug)]
pub struct FloodArgs {
    #[arg(long)]
    server: SocketAddr,
    /// The coordinator's public key (as in a join token).
    #[arg(long)]
    key: Key,
    /// fragments, big-frame, hold, mix or garbage.
    #[arg(long, default_value = "mix")]
    mode: crate::coord::flood::Mode,
    /// Hostile connections kept open at once (not for garbage).
    #[arg(long, default_value_t = 2000)]
    connections: usize,
    /// Loopback source addresses to spread over (127.1.0.1 on).
    #[arg(long, default_value_t = 200)]
    sources: usize,
    #[arg(long, default_value_t = 10)]
    seconds: u64,
}

#[derive(Subcommand, Debug)]
pub enum ServerAction {
    /// List the mesh's nodes.
    Nodes {
        /// A JSON array of nodes (errors as `{"error": ...}`).
        #[arg(long)]
        json: bool,
    },
    /// Remove a node (by name, mesh address, key or id); it cannot reconnect.
    Remove {
        node: String,
        /// The removed node as `server nodes --json` shows one.
        #[arg(long)]
        json: bool,
    },
    /// Rename a node.
    Rename {
        node: String,
        new_name: String,
        /// The renamed node as `server nodes --json` shows one.
        #[arg(long)]
        json: bool,
    },
    /// The access policy: who may open connections to whom (README "Permissions").
    Policy {
        #[command(subcommand)]
        action: policy::PolicyAction,
    },
    /// Benchmark: N light nodes join through the admin socket's invite, then one change is timed.
    #[command(hide = true)]
    Load {
        #[arg(long)]
        server: SocketAddr,
        #[arg(long, default_value_t = 10_000)]
        nodes: usize,
        /// Keep the nodes connected until killed instead of timing a change.
        #[arg(long)]
        hold: bool,
    },
    /// Benchmark: hostile connections to a coordinator (see `coord/flood.rs`).
    #[command(hide = true)]
    Flood(Box<FloodArgs>),
    /// Subnet routes and exit nodes: list, approve, revoke.
    #[command(subcommand)]
    Routes(super::server_routes::RoutesAction),
    /// Print a join token for `warren up --join TOKEN`.
    Invite {
        /// The token may enroll any number of nodes until it expires.
        #[arg(long)]
        reusable: bool,
        /// Lifetime, e.g. 30m, 24h, 7d (default: never expires).
        #[arg(long)]
        expires: Option<String>,
        /// Name for the node that joins with this token.
        #[arg(long)]
        name: Option<String>,
        /// `{"token", "expires", "reusable", "name"}` (errors as `{"error": ...}`).
        #[arg(long)]
        json: bool,
    },
}

impl ServerArgs {
    /// Whether an admin command was asked for JSON.
    pub fn json(&self) -> bool {
        if let Some(ServerAction::Policy { action }) = &self.action {
            return action.json();
        }
        matches!(
            self.action,
            Some(
                ServerAction::Nodes { json: true }
                    | ServerAction::Invite { json: true, .. }
                    | ServerAction::Remove { json: true, .. }
                    | ServerAction::Rename { json: true, .. }
            )
        ) || matches!(&self.action, Some(ServerAction::Routes(r)) if r.json())
    }
}

pub fn run(args: ServerArgs) -> Result<()> {
    args.daemon.start();
    let socket = args.state_dir.join(ADMIN_SOCKET);
    let Some(action) = args.action else {
        let cfg = ServerConfig {
            listen: args.listen,
            db: args.db.unwrap_or_else(|| args.state_dir.join(DB_FILE)),
            state_dir: args.state_dir,
            advertise: args.advertise,
        };
        let mut relays = args
            .relays
            .iter()
            .map(|r| parse_relay(r))
            .collect::<Result<Vec<_>>>()?;
        let mut wgstuns = args
            .wgstuns
            .iter()
            .map(|w| parse_wgstun(w))
            .collect::<Result<Vec<_>>>()?;
        // Bind the coordinator first: a busy coordinator port fails before any thread starts.
        let mut server = Server::bind(&cfg)?;
        let mut relay_stats = None;
        let mut wgstun_stats = None;
        if !args.no_relay {
            let addrs = if !args.relay_advertise.is_empty() {
                args.relay_advertise.clone()
            } else {
                advertised_addrs(args.relay_listen, server.advertise())
            };
            let (key, relay) = start_relay(&cfg.state_dir, args.relay_listen)?;
            relay_stats = Some(relay.clone());
            // Removed nodes lose the relay at once, not only their peers.
            server.set_on_removed(move |k| relay.refuse_key(k))?;
            relays.insert(
                0,
                RelayInfo {
                    public_key: key,
                    addrs,
                },
            );
        }
        if relays.is_empty() {
            log!("warren: no relay: nodes that cannot reach each other directly stay apart");
        }
        server.set_relays(relays);
        if !args.no_wgstun {
            let (key, wg, stun, stats) = start_wgstun(
                &cfg.state_dir,
                args.wgstun_listen,
                (!args.no_stun).then_some(args.stun_listen),
            )?;
            wgstun_stats = Some(stats);
            match own_wgstun(key, wg, stun, server.advertise()) {
                Some(own) => wgstuns.insert(0, own),
                None => log_warn!(
                    "warren: WG-STUN runs but is not published: no address to give nodes (pass --advertise HOST:PORT)"
                ),
            }
        }
        server.set_wgstun(wgstuns);
        if let Some(addr) = args.metrics_listen {
            let coord = server.stats_handle();
            crate::metrics::serve_role("warren server", addr, move || {
                let mut e = crate::metrics::Exposition::new();
                crate::coord::metrics::render(&mut e, &coord.get());
                if let Some(r) = &relay_stats {
                    crate::relay::metrics::render(&mut e, &r.stats());
                }
                if let Some(w) = &wgstun_stats {
                    crate::wgstun::metrics::render(&mut e, &w.get());
                }
                e.finish()
            })?;
        }
        return server.run();
    };
    match action {
        ServerAction::Nodes { json } => {
            let AdminResponse::Nodes { nodes } = admin::request(&socket, &AdminRequest::Nodes)? else {
                bail!("unexpected answer from the coordinator");
            };
            if json {
                super::out::json(&nodes)?;
            } else {
                print_nodes(&nodes)?;
            }
        }
        ServerAction::Remove { node, json } => {
            let r = admin::request(&socket, &AdminRequest::Remove { node })?;
            match r {
                AdminResponse::Node { node } if json => super::out::json(&node)?,
                AdminResponse::Node { node } => outln!("removed {} ({})", node.name, node.mesh_addr)?,
                _ => bail!("unexpected answer from the coordinator"),
            }
        }
        ServerAction::Rename { node, new_name, json } => {
            let r = admin::request(&socket, &AdminRequest::Rename { node, new_name })?;
            match r {
                AdminResponse::Node { node } if json => super::out::json(&node)?,
                AdminResponse::Node { node } => outln!("renamed to {} ({})", node.name, node.mesh_addr)?,
                _ => bail!("unexpected answer from the coordinator"),
            }
        }
        ServerAction::Routes(r) => super::server_routes::run(&socket, r)?,
        ServerAction::Policy { action } => policy::run(&socket, action)?,
        ServerAction::Load { server, nodes, hold } => {
            let r = crate::coord::load::run(&socket, server, nodes, hold)?;
            outln!("coordinator: nodes connected | {} |", r.nodes)?;
            outln!(
                "coordinator: time to connect all nodes | {:.1} s |",
                r.connect_all.as_secs_f64()
            )?;
            outln!(
                "coordinator: one change reaches all, p50 | {} ms |",
                r.change_p50.as_millis()
            )?;
            outln!(
                "coordinator: one change reaches all, p99 | {} ms | <= 2000 ms",
                r.change_p99.as_millis()
            )?;
            outln!(
                "coordinator: one change reaches all, max | {} ms |",
                r.change_max.as_millis()
            )?;
        }
        ServerAction::Flood(a) => {
            let cfg = crate::coord::flood::FloodConfig {
                server: a.server,
                server_key: a.key,
                mode: a.mode,
                connections: a.connections,
                sources: a.sources,
                duration: std::time::Duration::from_secs(a.seconds),
            };
            let stats = std::sync::Arc::new(crate::coord::flood::FloodStats::default());
            crate::coord::flood::run(&cfg, &stats)?;
            outln!("{}", stats.line())?;
        }
        ServerAction::Invite {
            reusable,
            expires,
            name,
            json,
        } => {
            let expires_in = expires.as_deref().map(invite::parse_duration).transpose()?;
            let r = admin::request(
                &socket,
                &AdminRequest::Invite {
                    reusable,
                    expires_in,
                    name: name.clone(),
                },
            )?;
            let AdminResponse::Invite { token, expires } = r else {
                bail!("unexpected answer from the coordinator");
            };
            if json {
                super::out::json(&serde_json::json!({
                    "token": token,
                    "expires": expires,
                    "reusable": reusable,
                    "name": name,
                }))?;
            } else {
                outln!("{token}")?;
            }
        }
    }
    Ok(())
}

/// Plain STUN port assumed for a `--wgstun` server: `warren wgstun`'s default.
const WGSTUN_STUN_PORT: u16 = 3478;

/// `KEY@HOST:PORT` given to `flag` for a server running elsewhere (a `what`
/// server): its key, host and port. Errors name the flag and the value.
fn parse_key_at<'a>(flag: &str, what: &str, s: &'a str) -> Result<(Key, &'a str, u16)> {
    let expected = || format!("{flag} {s:?}: expected KEY@HOST:PORT");
    let (key, addr) = s.split_once('@').with_context(expected)?;
    let public_key: Key = key
        .parse()
        .with_context(|| format!("{flag} {s:?}: bad {what} key"))?;
    match addr.rsplit_once(':').map(|(h, p)| (h, p.parse::<u16>())) {
        Some((host, Ok(port))) if !host.is_empty() && port != 0 => Ok((public_key, host, port)),
        _ => bail!("{}", expected()),
    }
}

/// `KEY@HOST:PORT` of a relay running elsewhere.
fn parse_relay(s: &str) -> Result<RelayInfo> {
    let (public_key, host, port) = parse_key_at("--relay", "relay", s)?;
    Ok(RelayInfo {
        public_key,
        addrs: vec![format!("{host}:{port}")],
    })
}

/// `KEY@HOST:PORT` of a WG-STUN server running elsewhere; its plain STUN is
/// assumed on the same host at [`WGSTUN_STUN_PORT`].
fn parse_wgstun(s: &str) -> Result<WgStunInfo> {
    let (public_key, host, port) = parse_key_at("--wgstun", "WG-STUN", s)?;
    Ok(WgStunInfo {
        public_key,
        endpoint: format!("{host}:{port}"),
        stun: Some(format!("{host}:{WGSTUN_STUN_PORT}")),
    })
}

/// This server's own WG-STUN as published to nodes: on the first address of
/// [`advertised_addrs`], plain STUN (if it runs) on the same host unless it
/// listens on a specific address. `None` when there is no address to give.
fn own_wgstun(
    public_key: Key,
    wg: SocketAddr,
    stun: Option<SocketAddr>,
    coordinator: &[String],
) -> Option<WgStunInfo> {
    let endpoint = advertised_addrs(wg, coordinator).into_iter().next()?;
    let host = endpoint.rsplit_once(':').map_or(endpoint.as_str(), |(h, _)| h);
    let stun = stun.map(|s| {
        if s.ip().is_unspecified() {
            format!("{host}:{}", s.port())
        } else {
            s.to_string()
        }
    });
    Some(WgStunInfo {
        public_key,
        endpoint,
        stun,
    })
}

/// Where nodes reach a service of this server (relay, WG-STUN): its listen
/// address if specific, else each host nodes already dial for the
/// coordinator, with the service's port.
fn advertised_addrs(listen: SocketAddr, coordinator: &[String]) -> Vec<String> {
    if !listen.ip().is_unspecified() {
        return vec![listen.to_string()];
    }
    coordinator
        .iter()
        .filter_map(|a| a.rsplit_once(':'))
        .map(|(host, _)| format!("{host}:{}", listen.port()))
        .collect()
}

/// Runs the relay beside the coordinator, as `warren relay` would with its
/// defaults; returns its public key and handle. If it stops on an I/O error the
/// coordinator keeps serving; the error is logged.
fn start_relay(state_dir: &Path, listen: SocketAddr) -> Result<(Key, RelayHandle)> {
    let private_key =
        crate::wgstun::key::load_or_create_file(state_dir, crate::relay::KEY_FILE, "relay key")?;
    // The relay's own defaults bound its memory; a mesh that outgrows them
    // runs `warren relay` on its own and sizes it.
    let relay = RelayServer::bind(RelayConfig::new(listen, private_key))
        .context("starting the relay beside the coordinator (or pass --no-relay)")?;
    let key = relay.public_key();
    let handle = relay.handle();
    std::thread::Builder::new()
        .name("relay".into())
        .spawn(move || match relay.run() {
            Ok(()) => log!("warren: relay stopped"),
            Err(e) => log_error!("warren: relay stopped: {e:#}"),
        })
        .context("starting the relay thread")?;
    Ok((key, handle))
}

/// Runs WG-STUN beside the coordinator, as `warren wgstun` would with its defaults;
/// returns its public key and the bound WireGuard and plain STUN addresses.
/// If it stops on an I/O error the coordinator keeps serving; the error is logged.
fn start_wgstun(
    state_dir: &Path,
    listen: SocketAddr,
    stun_listen: Option<SocketAddr>,
) -> Result<(
    Key,
    SocketAddr,
    Option<SocketAddr>,
    crate::wgstun::metrics::StatsHandle,
)> {
    let private_key = crate::wgstun::key::load_or_create(state_dir)?;
    let public_key = private_key.public_key();
    let (wg, stun, thread, stats) = crate::wgstun::spawn_watched(crate::wgstun::Config {
        listen,
        stun_listen,
        private_key,
        max_sessions: crate::wgstun::responder::DEFAULT_MAX_SESSIONS,
        max_sessions_per_source: crate::wgstun::responder::DEFAULT_MAX_SESSIONS_PER_SOURCE,
        handshakes_per_sec: crate::wgstun::responder::DEFAULT_HANDSHAKES_PER_SEC,
        handshakes_per_source: crate::wgstun::responder::DEFAULT_HANDSHAKES_PER_SOURCE,
        stun_requests_per_source: crate::stun::server::DEFAULT_REQUESTS_PER_SOURCE,
        stats_interval: None,
    })
    .context("starting WG-STUN beside the coordinator (or pass --no-wgstun)")?;
    match stun {
        Some(stun) => log!("warren: WG-STUN on {wg}, plain STUN on {stun}"),
        None => log!("warren: WG-STUN on {wg}"),
    }
    std::thread::Builder::new()
        .name("wgstun-watch".into())
        .spawn(move || match thread.join() {
            Ok(Ok(())) => log!("warren: WG-STUN stopped"),
            Ok(Err(e)) => log_error!("warren: WG-STUN stopped: {e:#}"),
            Err(_) => log_error!("warren: WG-STUN stopped: its thread panicked"),
        })
        .context("starting the WG-STUN watcher thread")?;
    Ok((public_key, wg, stun, stats))
}

fn print_nodes(nodes: &[NodeView]) -> Result<()> {
    let now = crate::coord::hub::unix_now();
    outln!(
        "{:<20} {:<15} {:<10} {:<8} LAST SEEN",
        "NAME",
        "ADDRESS",
        "KEY",
        "STATE"
    )?;
    for n in nodes {
        let seen = match (n.online, n.last_seen) {
            (true, _) => "now".to_string(),
            (false, Some(t)) => format!("{} ago", human_duration(now - t)),
            (false, None) => "never".to_string(),
        };
        let state = if n.online { "online" } else { "offline" };
        outln!(
            "{:<20} {:<15} {:<10} {:<8} {seen}",
            n.name,
            n.mesh_addr,
            n.public_key.short(),
            state
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "GcbKAmy+RA8n13X7BCHypTgmoU2KfpEaSlT6odWM6wc=";

    #[test]
    fn wgstun_flag_assumes_plain_stun_on_the_wgstun_default_port() {
        let default: SocketAddr = crate::wgstun::DEFAULT_STUN_LISTEN.parse().unwrap();
        assert_eq!(default.port(), WGSTUN_STUN_PORT);
        let w = parse_wgstun(&format!("{KEY}@stun.example.org:3479")).unwrap();
        assert_eq!(
            w,
            WgStunInfo {
                public_key: KEY.parse().unwrap(),
                endpoint: "stun.example.org:3479".into(),
                stun: Some("stun.example.org:3478".into()),
            }
        );
        let w = parse_wgstun(&format!("{KEY}@[2001:db8::1]:4000")).unwrap();
        assert_eq!(
            (w.endpoint.as_str(), w.stun.as_deref()),
            ("[2001:db8::1]:4000", Some("[2001:db8::1]:3478"))
        );
    }

    #[test]
    fn malformed_wgstun_and_relay_values_name_the_flag_and_the_value() {
        for (flag, what) in [("--wgstun", "WG-STUN"), ("--relay", "relay")] {
            let parse = |v: &str| match flag {
                "--wgstun" => parse_wgstun(v).map(|_| ()),
                _ => parse_relay(v).map(|_| ()),
            };
            for (value, why) in [
                (
                    "203.0.113.7:3479".to_string(),
                    "expected KEY@HOST:PORT".to_string(),
                ),
                ("nokey@203.0.113.7:3479".into(), format!("bad {what} key")),
                (format!("{KEY}@203.0.113.7"), "expected KEY@HOST:PORT".into()),
                (format!("{KEY}@:3479"), "expected KEY@HOST:PORT".into()),
                (format!("{KEY}@203.0.113.7:0"), "expected KEY@HOST:PORT".into()),
            ] {
                let err = format!("{:#}", parse(&value).unwrap_err());
                assert!(err.starts_with(&format!("{flag} {value:?}: {why}")), "{err}");
                assert_eq!(err.lines().count(), 1, "{err}");
            }
        }
    }

    #[test]
    fn own_wgstun_is_published_on_the_first_coordinator_host_when_listening_on_all() {
        let key: Key = KEY.parse().unwrap();
        let coord = ["198.51.100.1:7777".to_string(), "203.0.113.9:7777".to_string()];
        let any = |port| SocketAddr::from(([0, 0, 0, 0], port));
        let w = own_wgstun(key, any(3479), Some(any(3478)), &coord).unwrap();
        assert_eq!(
            w,
            WgStunInfo {
                public_key: key,
                endpoint: "198.51.100.1:3479".into(),
                stun: Some("198.51.100.1:3478".into()),
            }
        );
        // --no-stun: no plain STUN published.
        let w = own_wgstun(key, any(3479), None, &coord).unwrap();
        assert_eq!(w.stun, None);
        // A specific listen address is published as it is.
        let wg: SocketAddr = "192.0.2.5:4479".parse().unwrap();
        let stun: SocketAddr = "192.0.2.6:4478".parse().unwrap();
        let w = own_wgstun(key, wg, Some(stun), &coord).unwrap();
        assert_eq!(
            (w.endpoint.as_str(), w.stun.as_deref()),
            ("192.0.2.5:4479", Some("192.0.2.6:4478"))
        );
        let w = own_wgstun(key, wg, Some(any(3478)), &[]).unwrap();
        assert_eq!(w.stun.as_deref(), Some("192.0.2.5:3478"));
        // Nothing to tell nodes: not published.
        assert_eq!(own_wgstun(key, any(3479), Some(any(3478)), &[]), None);
    }
}
