//! The node agent: keeps WireGuard configured from the coordinator's peer map.

pub mod api;
pub mod cache;
pub mod control;
pub mod direct;
pub mod dns;
pub mod metrics;
pub mod paths;
pub mod peer_msg;
pub mod portmap;
pub mod relay_path;
pub mod resolve;
pub mod run;

// Agents against a real coordinator hub and store.
#[cfg(all(test, feature = "server"))]
mod sim_tests;
