//! warren: a WireGuard mesh for machines that run unattended.
//!
//! The layout follows the architecture: `wg/` drives WireGuard, `cli/` is the
//! command-line surface; each module has one concern.
//!
//! Cargo features (Cargo.toml `[features]`) choose the server roles built in:
//! `server` (coordinator), `relay-server`, `wgstun-server`, and `upnp` for
//! UPnP IGD port mapping. The agent, its CLI and the clients of every server
//! protocol (control channel, relay client, STUN) are in every build.

#[cfg(not(feature = "agent"))]
compile_error!("warren needs the `agent` feature: the node agent and CLI are in every build");

// First, so that `log!` is in scope in every module below.
#[macro_use]
pub mod logline;

pub mod agent;
pub mod cli;
pub mod config;
pub mod control;
pub mod coord;
pub mod dns;
pub mod firewall;
pub mod ifaddrs;
pub mod keys;
pub mod metrics;
pub mod nat;
pub mod netlink;
pub mod nonblock;
pub mod outgoing;
pub mod peer;
pub mod peercred;
pub mod portmap;
pub mod relay;
pub mod rlimit;
pub mod route;
pub mod signals;
pub mod sockopt;
pub mod stun;
#[cfg(test)]
mod testutil;
pub mod wg;
pub mod wgstun;
