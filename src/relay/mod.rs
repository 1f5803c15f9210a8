//! The relay: forwards WireGuard datagrams and sealed peer messages between
//! nodes, addressed by WireGuard public key, over TCP + Noise IK. The client's
//! Noise static key is its WireGuard key, so registering proves ownership.

pub mod admission;
pub mod budget;
pub mod client;
pub mod client_conn;
pub mod feed;
pub mod frame;
pub mod load;
pub mod members;
pub mod server;

use crate::control::noise::Profile;

/// The relay's Noise use of a WireGuard key, kept apart from the control channel's.
pub const RELAY_PROFILE: Profile = Profile {
    prologue: b"warren relay v1",
    max_message: frame::MAX_FRAME_LEN,
};

pub const DEFAULT_PORT: u16 = 7778;
/// The relay's key file in its state directory.
pub const KEY_FILE: &str = "relay.key";

#[cfg(test)]
mod tests;
