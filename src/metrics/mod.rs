//! Prometheus metrics, off unless `--metrics-listen ADDR` is given: the
//! text format ([`encode`]), the HTTP a scrape needs ([`http`]) and the
//! non-blocking endpoint that serves it ([`serve`]). What each role exports
//! is read from the counters its status, summary lines and budgets already
//! keep (see `agent/metrics.rs`, `coord/metrics.rs`, `relay/metrics.rs`,
//! `wgstun/metrics.rs`), so a figure has one source.

pub mod encode;
pub mod http;
pub mod serve;

pub use encode::{Exposition, Kind};

use std::net::{IpAddr, SocketAddr};

/// Says once, at start, that metrics bound beyond this machine and the mesh
/// are readable by anyone who reaches the address: they name peers, their
/// short keys and traffic.
pub fn warn_if_exposed(role: &str, addr: SocketAddr) {
    let private = match addr.ip() {
        IpAddr::V4(ip) => ip.is_loopback() || (ip.octets()[0] == 100 && (ip.octets()[1] & 0xc0) == 64),
        IpAddr::V6(ip) => ip.is_loopback(),
    };
    if !private {
        log_warn!(
            "{role}: metrics on {addr} are open to anyone who can reach it (no authentication); \
             bind to 127.0.0.1 or the mesh address unless a firewall covers it"
        );
    }
}

/// Serves a server role's metrics from a thread of their own (their loops
/// are busy with strangers' traffic) and says where.
pub fn serve_role(
    role: &str,
    addr: SocketAddr,
    render: impl FnMut() -> String + Send + 'static,
) -> anyhow::Result<()> {
    let bound = serve::spawn(addr, render)?;
    warn_if_exposed(role, addr);
    log!("{role}: metrics on http://{bound}/metrics");
    Ok(())
}
