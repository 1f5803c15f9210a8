//! warren: a WireGuard mesh for machines that run unattended.
//!
//! The layout follows the architecture: `wg/` drives WireGuard, `cli/` is the
//! command-line surface; each module has one concern.

// First, so that `log!` is in scope in every module below.
#[macro_use]
pub mod logline;

pub mod agent;
pub mod cli;
pub mod config;
pub mod control;
pub mod coord;
pub mod ifaddrs;
pub mod keys;
pub mod nat;
pub mod netlink;
pub mod outgoing;
pub mod peer;
pub mod peercred;
pub mod portmap;
pub mod relay;
pub mod signals;
pub mod sockopt;
pub mod stun;
#[cfg(test)]
mod testutil;
pub mod wg;
pub mod wgstun;
