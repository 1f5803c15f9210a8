//! `warren relay`: run the relay on its own (it is also meant to run inside `warren server`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use anyhow::{Context, Result};
use clap::Args;

use super::out::outln;
use crate::keys::Key;
use crate::relay::admission::SourceLimits;
use crate::relay::client_conn::Limits;
use crate::relay::feed::{self, Coordinator, FeedConfig};
use crate::relay::members::{MEMBERS_FILE, MemberSet};
use crate::relay::server::{DEFAULT_MAX_CLIENTS, DEFAULT_MAX_PENDING, RelayConfig, RelayGuards, RelayServer};
use crate::relay::{DEFAULT_PORT, KEY_FILE};
use crate::wgstun::key;

#[derive(Args, Debug)]
pub struct RelayArgs {
    #[command(flatten)]
    pub daemon: super::daemon::DaemonArgs,
    /// Address for client connections (TCP).
    #[arg(long, default_value_t = SocketAddr::from(([0, 0, 0, 0], DEFAULT_PORT)))]
    pub listen: SocketAddr,
    /// Directory holding the relay key (relay.key, mode 0600).
    #[arg(long, default_value = "/var/lib/warren")]
    pub state_dir: PathBuf,
    /// Most registered clients at once; further connections are refused
    /// (connections still in the handshake wait in --max-pending). Each
    /// client can make the relay hold up to about 254 KiB besides its queue
    /// (partial frames, presence keys; an idle one a few KiB), so the default
    /// 700 clients plus --max-queue-mib 64 stay near 256 MiB in the worst case.
    /// Raise both by that arithmetic on a bigger machine.
    #[arg(long, default_value_t = DEFAULT_MAX_CLIENTS, verbatim_doc_comment)]
    pub max_clients: usize,
    /// Connections still in their handshake, all sources together. They do
    /// not take --max-clients slots; when this pool is full the oldest
    /// pending connection is closed for the new one.
    #[arg(long, default_value_t = DEFAULT_MAX_PENDING)]
    pub max_pending: usize,
    /// Sustained rate one client may send through the relay, in MiB/s.
    #[arg(long, default_value_t = 64)]
    pub client_rate_mib: u64,
    /// Memory for datagrams waiting to be sent, all clients together, in MiB.
    /// Each client also has its own 256 KiB queue limit; once the total is
    /// half used, clients with long queues (slow readers) get less room, so
    /// clients that keep up still get through, and at the total new
    /// datagrams are dropped (counted) instead of memory growing.
    #[arg(long, default_value_t = 64, verbatim_doc_comment)]
    pub max_queue_mib: usize,
    /// New connections per second one source address (IPv4 address, IPv6 /64)
    /// may open, sustained; more are closed at once. 0: no limit.
    #[arg(long, default_value_t = SourceLimits::for_relay(DEFAULT_MAX_CLIENTS).connects_per_sec)]
    pub source_connect_rate: u32,
    /// New connections one source may open at once above that rate.
    #[arg(long, default_value_t = SourceLimits::for_relay(DEFAULT_MAX_CLIENTS).connect_burst)]
    pub source_connect_burst: u32,
    /// Connections from one source still in the handshake. 0: no limit.
    #[arg(long, default_value_t = SourceLimits::for_relay(DEFAULT_MAX_CLIENTS).max_pending)]
    pub source_max_pending: usize,
    /// Connections from one source in total (default: a quarter of --max-clients,
    /// at least 64). 0: no limit.
    #[arg(long)]
    pub source_max_clients: Option<usize>,
    /// The coordinator to learn the mesh's members from, as KEY@HOST:PORT
    /// (its public key, as in join tokens, and its control address). The
    /// coordinator must list this relay with --relay. Keys that are not
    /// members are refused, and a removed node's connection is closed at
    /// once. Until the first member set arrives every key is served; the
    /// last set is kept (in STATE_DIR/relay-members) while the coordinator
    /// is unreachable, also across restarts. Without it: every key is served.
    #[arg(long, value_name = "KEY@HOST:PORT", verbatim_doc_comment)]
    pub coordinator: Option<Coordinator>,
    /// Print the relay's public key and exit.
    #[arg(long)]
    pub show_key: bool,
    /// With --show-key: `{"public_key": KEY}` (errors as `{"error": ...}`).
    #[arg(long, requires = "show_key")]
    pub json: bool,
    /// Serve Prometheus metrics on ADDR at /metrics; off when absent.
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
}

impl RelayArgs {
    /// Whether `--show-key` was asked for JSON.
    pub fn json(&self) -> bool {
        self.json
    }
}

pub fn run(args: RelayArgs) -> Result<()> {
    args.daemon.start();
    let private_key = key::load_or_create_file(&args.state_dir, KEY_FILE, "relay key")?;
    if args.show_key && args.json {
        return super::out::json(&serde_json::json!({ "public_key": private_key.public_key() }));
    }
    if args.show_key {
        return super::out::write(&format!("{}\n", private_key.public_key()));
    }
    let defaults = SourceLimits::for_relay(args.max_clients);
    let guards = RelayGuards {
        total_queue_bytes: args.max_queue_mib.saturating_mul(1024 * 1024),
        max_pending: args.max_pending,
        per_source: SourceLimits {
            connects_per_sec: args.source_connect_rate,
            connect_burst: args.source_connect_burst,
            max_pending: args.source_max_pending,
            max_clients: args.source_max_clients.unwrap_or(defaults.max_clients),
        },
    };
    let mut relay = RelayServer::bind_guarded(
        RelayConfig {
            limits: Limits {
                rate_bytes_per_sec: args.client_rate_mib.saturating_mul(1024 * 1024),
                ..Limits::default()
            },
            max_clients: args.max_clients,
            ..RelayConfig::new(args.listen, private_key)
        },
        guards,
    )?;
    match args.coordinator {
        None => log!(
            "warren relay: no --coordinator: serving every key that completes the handshake (removed nodes are not refused)"
        ),
        Some(coordinator) => start_feed(&mut relay, coordinator, &args.state_dir, private_key)?,
    }
    if let Some(addr) = args.metrics_listen {
        let handle = relay.handle();
        crate::metrics::serve_role("warren relay", addr, move || {
            let mut e = crate::metrics::Exposition::new();
            crate::relay::metrics::render(&mut e, &handle.stats());
            e.finish()
        })?;
    }
    relay.run()
}

/// Loads the persisted member set into the relay and starts the thread that
/// keeps it current from the coordinator.
fn start_feed(relay: &mut RelayServer, coordinator: Coordinator, state_dir: &Path, key: Key) -> Result<()> {
    let members = MemberSet::load(state_dir).unwrap_or_else(|e| {
        log!("warren relay: {e:#}: ignoring it until the coordinator sends the members");
        MemberSet::open()
    });
    let who = format!("coordinator {} at {}", coordinator.key.short(), coordinator.addr);
    match members.known_len() {
        Some(n) => log!(
            "warren relay: member keys from {who}; until it answers, the {n} members in {MEMBERS_FILE} (other keys refused)"
        ),
        None => log!("warren relay: member keys from {who}; until it answers, every key is served"),
    }
    relay.set_members(members.clone());
    let cfg = FeedConfig {
        relay_private: key,
        coordinator,
        state_dir: state_dir.to_path_buf(),
        members,
    };
    let handle = relay.handle();
    // The relay runs until the process ends; so does its feed.
    let stop = Arc::new(AtomicBool::new(false));
    std::thread::Builder::new()
        .name("relay-feed".into())
        .spawn(move || feed::run(cfg, handle, stop))
        .context("starting the relay's member feed thread")?;
    Ok(())
}

#[derive(clap::Subcommand, Debug)]
pub enum LoadCommand {
    /// Connect N idle registered clients and hold them for --hold seconds.
    Idle {
        #[arg(long)]
        relay: SocketAddr,
        #[arg(long)]
        key: crate::keys::Key,
        #[arg(long, default_value_t = 1000)]
        clients: usize,
        #[arg(long, default_value_t = 60)]
        hold: u64,
    },
    /// Echo every datagram back to its sender; prints `key=PUBLIC` once registered.
    Echo {
        #[arg(long)]
        relay: SocketAddr,
        #[arg(long)]
        key: crate::keys::Key,
        /// Connect with the private key in this file (base64) instead of a fresh one.
        #[arg(long)]
        key_file: Option<PathBuf>,
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
    /// Send numbered datagrams to an echoing key; prints the time to register,
    /// sent, received and the worst round trip.
    Ping {
        #[arg(long)]
        relay: SocketAddr,
        #[arg(long)]
        key: crate::keys::Key,
        #[arg(long)]
        to: crate::keys::Key,
        #[arg(long, default_value_t = 10)]
        count: u32,
    },
    /// A stranger's flood: from each --source address, --hold connections that
    /// never handshake (reopened when closed) and connections opened and
    /// dropped as fast as possible, for --seconds; prints the attempts.
    Flood {
        #[arg(long)]
        relay: SocketAddr,
        /// Source address to connect from (repeatable); must be local.
        #[arg(long = "source", required = true)]
        sources: Vec<std::net::Ipv4Addr>,
        #[arg(long, default_value_t = 128)]
        hold: usize,
        #[arg(long, default_value_t = 30.0)]
        seconds: f64,
    },
    /// One pair forwards datagrams as fast as it can; prints sent, received and packets/s.
    Forward {
        #[arg(long)]
        relay: SocketAddr,
        #[arg(long)]
        key: crate::keys::Key,
        #[arg(long, default_value_t = 1200)]
        payload: usize,
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
    },
}

pub fn load(cmd: LoadCommand) -> Result<()> {
    use crate::relay::load;
    match cmd {
        LoadCommand::Idle {
            relay,
            key,
            clients,
            hold,
        } => {
            let started = std::time::Instant::now();
            let held = load::idle(relay, &key, clients)?;
            outln!(
                "connected={} seconds={:.2}",
                held.len(),
                started.elapsed().as_secs_f64()
            )?;
            std::thread::sleep(std::time::Duration::from_secs(hold));
            drop(held);
        }
        LoadCommand::Flood {
            relay,
            sources,
            hold,
            seconds,
        } => {
            let started = std::time::Instant::now();
            let r = load::flood(relay, &sources, hold, seconds, || {
                outln!(
                    "holding={} ms={}",
                    hold * sources.len(),
                    started.elapsed().as_millis()
                )
            })?;
            outln!("attempts={} reopened={}", r.attempts, r.reopened)?;
        }
        LoadCommand::Echo {
            relay,
            key,
            key_file,
            seconds,
        } => {
            let own = match key_file {
                Some(f) => Some(
                    std::fs::read_to_string(&f)
                        .with_context(|| format!("reading {}", f.display()))?
                        .trim()
                        .parse::<Key>()
                        .with_context(|| format!("{}: bad private key", f.display()))?,
                ),
                None => None,
            };
            // Handshake done and first sealed message sent: the relay registers on it.
            let started = std::time::Instant::now();
            let echoed = load::echo(relay, &key, own, seconds, |me| {
                outln!("key={me} registered_ms={}", started.elapsed().as_millis())
            })?;
            outln!("echoed={echoed}")?;
        }
        LoadCommand::Ping {
            relay,
            key,
            to,
            count,
        } => {
            let r = load::ping(relay, &key, to, count)?;
            outln!(
                "registered_ms={} sent={} received={} max_rtt_ms={:.1}",
                r.registered.as_millis(),
                r.sent,
                r.received,
                r.max_rtt.as_secs_f64() * 1000.0
            )?;
        }
        LoadCommand::Forward {
            relay,
            key,
            payload,
            seconds,
        } => {
            let r = load::forward(relay, &key, payload, seconds)?;
            outln!(
                "sent={} received={} seconds={:.2} pps={:.0}",
                r.sent,
                r.received,
                r.seconds,
                r.received as f64 / r.seconds
            )?;
        }
    }
    Ok(())
}
