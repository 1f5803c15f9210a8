//! `warren wgstun`: run the WG-STUN server, or print the `[Peer]` stanza for it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::out::outln;
use anyhow::{Context, Result};
use clap::Args;

use crate::wgstun::{self, key, responder};

#[derive(Args, Debug)]
pub struct WgstunArgs {
    #[command(flatten)]
    pub daemon: super::daemon::DaemonArgs,
    /// UDP address for WireGuard.
    #[arg(long, default_value = wgstun::DEFAULT_LISTEN)]
    listen: SocketAddr,
    /// UDP address for plain STUN.
    #[arg(long, default_value = wgstun::DEFAULT_STUN_LISTEN)]
    stun_listen: SocketAddr,
    /// Serve WG-STUN only, no plain STUN socket.
    #[arg(long)]
    no_stun: bool,
    /// Directory holding the server key (wgstun.key, mode 0600).
    #[arg(long, default_value = "/var/lib/warren")]
    state_dir: PathBuf,
    /// Most sessions kept; beyond this a new one evicts a session that never
    /// asked a STUN question, from the source holding most, before any other.
    #[arg(long, default_value_t = responder::DEFAULT_MAX_SESSIONS)]
    max_sessions: usize,
    /// Most sessions one source (IPv4 address, IPv6 /64) holds; beyond this a
    /// new one from it replaces one of its own.
    #[arg(long, default_value_t = responder::DEFAULT_MAX_SESSIONS_PER_SOURCE)]
    max_sessions_per_source: usize,
    /// Handshakes per second before cookie replies are demanded.
    #[arg(long, default_value_t = responder::DEFAULT_HANDSHAKES_PER_SEC)]
    handshake_rate: u64,
    /// Handshakes per second one source gets with a proven address (cookie);
    /// half as many without proof, the rest must prove or are dropped.
    #[arg(long, default_value_t = responder::DEFAULT_HANDSHAKES_PER_SOURCE)]
    source_handshake_rate: u32,
    /// Plain STUN requests per source IP per second (0 = unlimited).
    #[arg(long, default_value_t = crate::stun::server::DEFAULT_REQUESTS_PER_SOURCE)]
    stun_rate: u32,
    /// Log a counters line every SECS seconds (always on SIGUSR1).
    #[arg(long, value_name = "SECS")]
    stats_interval: Option<u64>,
    /// Print the [Peer] stanza for a WireGuard client and exit.
    #[arg(long)]
    print_peer: bool,
    /// Endpoint to put in the stanza (default: the listen address, or this host's name).
    #[arg(long, value_name = "HOST:PORT", requires = "print_peer")]
    endpoint: Option<String>,
    /// With --print-peer: `{"public_key", "endpoint", "allowed_ips"}` (errors
    /// as `{"error": ...}`).
    #[arg(long, requires = "print_peer")]
    json: bool,
    /// Serve Prometheus metrics on ADDR at /metrics; off when absent.
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,
}

impl WgstunArgs {
    /// Whether `--print-peer` was asked for JSON.
    pub fn json(&self) -> bool {
        self.json
    }
}

pub fn run(args: WgstunArgs) -> Result<()> {
    args.daemon.start();
    let private_key = key::load_or_create(&args.state_dir)?;
    if args.print_peer {
        let endpoint = match args.endpoint {
            Some(e) => e,
            None if !args.listen.ip().is_unspecified() => args.listen.to_string(),
            None => {
                let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .context("reading this host's name for the Endpoint (or pass --endpoint HOST:PORT)")?;
                format!("{}:{}", host.trim(), args.listen.port())
            }
        };
        if args.json {
            return super::out::json(&serde_json::json!({
                "public_key": private_key.public_key(),
                "endpoint": endpoint,
                "allowed_ips": [format!("{}/32", wgstun::inner::WGSTUN_ADDR)],
            }));
        }
        super::out::write(&wgstun::peer_stanza(&private_key.public_key(), &endpoint))?;
        return Ok(());
    }
    let server = wgstun::Server::bind(&wgstun::Config {
        listen: args.listen,
        stun_listen: (!args.no_stun).then_some(args.stun_listen),
        private_key,
        max_sessions: args.max_sessions,
        max_sessions_per_source: args.max_sessions_per_source,
        handshakes_per_sec: args.handshake_rate,
        handshakes_per_source: args.source_handshake_rate,
        stun_requests_per_source: args.stun_rate,
        stats_interval: args.stats_interval.map(Duration::from_secs),
    })?;
    if let Some(addr) = args.metrics_listen {
        let stats = server.stats_handle();
        crate::metrics::serve_role("warren wgstun", addr, move || {
            let mut e = crate::metrics::Exposition::new();
            wgstun::metrics::render(&mut e, &stats.get());
            e.finish()
        })?;
    }
    server.run()
}

/// Hidden `warren wgstun-load`: drives a WG-STUN server for lab tests and the benchmark.
#[derive(clap::Subcommand, Debug)]
pub enum LoadCommand {
    /// Handshake initiations from fresh keys over many source ports.
    Flood {
        #[arg(long)]
        server: SocketAddr,
        #[arg(long)]
        key: crate::keys::Key,
        #[arg(long, default_value_t = 1000)]
        count: usize,
        #[arg(long, default_value_t = 64)]
        ports: usize,
    },
    /// Fresh keys from one source that answer cookie replies and confirm their
    /// sessions, as fast as the server lets them (issue 12's flood).
    ProvingFlood {
        #[arg(long)]
        server: SocketAddr,
        #[arg(long)]
        key: crate::keys::Key,
        /// Fresh keys in flight at once.
        #[arg(long, default_value_t = 256)]
        window: usize,
        /// Each session also asks one STUN question, as a client would.
        #[arg(long)]
        ask: bool,
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
    },
    /// Connect clients, then send STUN Binding requests inside their tunnels.
    Tunnel {
        #[arg(long)]
        server: SocketAddr,
        #[arg(long)]
        key: crate::keys::Key,
        #[arg(long, default_value_t = 16)]
        clients: usize,
        #[arg(long, default_value_t = 64)]
        window: usize,
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
    },
    /// Plain STUN Binding requests (works against any STUN server).
    Stun {
        #[arg(long)]
        server: SocketAddr,
        #[arg(long, default_value_t = 64)]
        window: usize,
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
    },
}

pub fn load(cmd: LoadCommand) -> Result<()> {
    use crate::wgstun::load;
    match cmd {
        LoadCommand::Flood {
            server,
            key,
            count,
            ports,
        } => {
            let r = load::flood(server, key, count, ports)?;
            outln!(
                "sent={} handshake_responses={} cookie_replies={}",
                r.sent,
                r.handshake_responses,
                r.cookie_replies
            )?;
        }
        LoadCommand::ProvingFlood {
            server,
            key,
            window,
            ask,
            seconds,
        } => {
            let r = load::proving_flood(server, key, window, ask, Duration::from_secs_f64(seconds))?;
            outln!(
                "initiations={} cookie_replies={} sessions={}",
                r.initiations,
                r.cookie_replies,
                r.sessions
            )?;
        }
        LoadCommand::Tunnel {
            server,
            key,
            clients,
            window,
            seconds,
        } => {
            let mut c = load::Clients::new(server, key, clients)?;
            let t = std::time::Instant::now();
            let deadline = t + Duration::from_secs(60 + clients as u64 / 100);
            let connected = c.connect_all(window.max(1), deadline)?;
            let connect_s = t.elapsed().as_secs_f64();
            let (answered, wrong, elapsed) = if seconds > 0.0 {
                c.stun_rounds(window.max(1), Duration::from_secs_f64(seconds))?
            } else {
                (0, 0, Duration::ZERO)
            };
            outln!(
                "connected={connected} connect_seconds={connect_s:.2} answered={answered} wrong={wrong} rate={:.0}",
                answered as f64 / elapsed.as_secs_f64().max(1e-9)
            )?;
        }
        LoadCommand::Stun {
            server,
            window,
            seconds,
        } => {
            let (answered, elapsed) =
                load::plain_stun_rounds(server, window.max(1), Duration::from_secs_f64(seconds))?;
            outln!(
                "answered={answered} rate={:.0}",
                answered as f64 / elapsed.as_secs_f64().max(1e-9)
            )?;
        }
    }
    Ok(())
}
