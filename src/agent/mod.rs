//! The node agent: keeps WireGuard configured from the coordinator's peer map.

pub mod cache;
pub mod control;

#[cfg(test)]
mod sim_tests;
