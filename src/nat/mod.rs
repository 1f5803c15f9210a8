//! NAT traversal (DESIGN.md "Path lifecycle"): candidates, their sealed
//! exchange, connectivity checks between check sockets, and the path state
//! machine that moves a peer between the relay and a direct WireGuard
//! endpoint. Sans-IO throughout; `agent/direct.rs` is the socket side.

pub mod candidate;
pub mod check;
pub mod gather;
pub mod message;
pub mod path;
#[cfg(test)]
pub mod sim;
#[cfg(test)]
mod sim_tests;
pub mod traversal;
