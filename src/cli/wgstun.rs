//! `warren wgstun`: run the WG-STUN server, or print the `[Peer]` stanza for it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;

use crate::wgstun::{self, key, responder};

#[derive(Args, Debug)]
pub struct WgstunArgs {
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
    /// Most sessions kept; the least recently used is evicted beyond this.
    #[arg(long, default_value_t = responder::DEFAULT_MAX_SESSIONS)]
    max_sessions: usize,
    /// Handshakes per second before cookie replies are demanded.
    #[arg(long, default_value_t = responder::DEFAULT_HANDSHAKES_PER_SEC)]
    handshake_rate: u64,
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
}

pub fn run(args: WgstunArgs) -> Result<()> {
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
        print!("{}", wgstun::peer_stanza(&private_key.public_key(), &endpoint));
        return Ok(());
    }
    wgstun::run(wgstun::Config {
        listen: args.listen,
        stun_listen: (!args.no_stun).then_some(args.stun_listen),
        private_key,
        max_sessions: args.max_sessions,
        handshakes_per_sec: args.handshake_rate,
        stun_requests_per_source: args.stun_rate,
        stats_interval: args.stats_interval.map(Duration::from_secs),
    })
}
