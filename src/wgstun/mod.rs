//! WG-STUN: a WireGuard peer at 100.64.0.4 that tells any vanilla WireGuard
//! client the outer address its WireGuard packets arrive from, plus plain
//! STUN on a second socket.
//!
//! `responder` is the sans-IO core, `peers` its bounded session table,
//! `budget` the handshakes it takes on per second (in total, per source),
//! `inner` the packets inside the tunnel, `server` the mio shell that owns
//! the sockets, `key` the persistent server key. Only `inner`'s addresses
//! are in an agent-only build (the agent sends STUN to them); the server is
//! the `wgstun-server` feature.

#[cfg(feature = "wgstun-server")]
pub mod budget;
pub mod inner;
// The server key file, also the relay server's.
#[cfg(any(feature = "relay-server", feature = "wgstun-server"))]
pub mod key;
#[cfg(feature = "wgstun-server")]
pub mod load;
#[cfg(feature = "wgstun-server")]
pub mod metrics;
#[cfg(feature = "wgstun-server")]
pub mod peers;
#[cfg(feature = "wgstun-server")]
pub mod responder;
#[cfg(feature = "wgstun-server")]
pub mod server;

#[cfg(feature = "wgstun-server")]
use std::net::SocketAddr;
#[cfg(feature = "wgstun-server")]
use std::time::Duration;

#[cfg(feature = "wgstun-server")]
pub use responder::{Responder, ResponderConfig, Stats, Transmit};
#[cfg(feature = "wgstun-server")]
pub use server::Server;

#[cfg(feature = "wgstun-server")]
use crate::keys::Key;

#[cfg(feature = "wgstun-server")]
pub const DEFAULT_LISTEN: &str = "0.0.0.0:3479";
#[cfg(feature = "wgstun-server")]
pub const DEFAULT_STUN_LISTEN: &str = "0.0.0.0:3478";

#[cfg(feature = "wgstun-server")]
/// Everything a WG-STUN server needs; `warren server` builds one of these too.
#[derive(Clone, Debug)]
pub struct Config {
    pub listen: SocketAddr,
    /// Plain STUN socket; `None` runs WG-STUN only.
    pub stun_listen: Option<SocketAddr>,
    pub private_key: Key,
    pub max_sessions: usize,
    /// Sessions one source (IPv4 address, IPv6 /64) may hold.
    pub max_sessions_per_source: usize,
    pub handshakes_per_sec: u64,
    /// Proven handshakes per source per second (half as many without proof).
    pub handshakes_per_source: u32,
    /// Per source IP per second on the plain STUN socket; 0 = unlimited.
    pub stun_requests_per_source: u32,
    /// Log a stats line this often (also on SIGUSR1); `None` only on SIGUSR1.
    pub stats_interval: Option<Duration>,
}

#[cfg(feature = "wgstun-server")]
/// Binds the sockets and serves until an I/O error.
pub fn run(config: Config) -> anyhow::Result<()> {
    Server::bind(&config)?.run()
}

#[cfg(feature = "wgstun-server")]
/// For running inside another process (`warren server`): binds now, so a busy
/// port is the caller's error, then serves on a thread of its own. Returns the
/// bound WireGuard and STUN addresses and the thread, which only ends on an I/O error.
pub fn spawn(
    config: Config,
) -> anyhow::Result<(
    SocketAddr,
    Option<SocketAddr>,
    std::thread::JoinHandle<anyhow::Result<()>>,
)> {
    let (wg, stun, thread, _) = spawn_watched(config)?;
    Ok((wg, stun, thread))
}

#[cfg(feature = "wgstun-server")]
/// [`spawn`], and the handle its counters are read from (for metrics).
#[allow(clippy::type_complexity)]
pub fn spawn_watched(
    config: Config,
) -> anyhow::Result<(
    SocketAddr,
    Option<SocketAddr>,
    std::thread::JoinHandle<anyhow::Result<()>>,
    metrics::StatsHandle,
)> {
    let server = Server::bind(&config)?;
    let (wg, stun) = (server.wg_addr()?, server.stun_addr());
    let stats = server.stats_handle();
    let thread = std::thread::Builder::new()
        .name("wgstun".into())
        .spawn(move || server.run())
        .map_err(|e| anyhow::anyhow!("starting the WG-STUN thread: {e}"))?;
    Ok((wg, stun, thread, stats))
}

#[cfg(feature = "wgstun-server")]
/// The `[Peer]` stanza a vanilla WireGuard client adds to use this server.
pub fn peer_stanza(public_key: &Key, endpoint: &str) -> String {
    format!(
        "[Peer]\n# warren WG-STUN: STUN to {addr}:{port} inside the tunnel returns this interface's public address\n\
         PublicKey = {public_key}\nEndpoint = {endpoint}\nAllowedIPs = {addr}/32\n",
        addr = inner::WGSTUN_ADDR,
        port = inner::STUN_PORT,
    )
}

#[cfg(all(test, feature = "wgstun-server"))]
mod tests;
