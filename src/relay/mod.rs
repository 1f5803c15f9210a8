//! The relay: forwards WireGuard datagrams and sealed peer messages between
//! nodes, addressed by WireGuard public key, over TCP + Noise IK. The client's
//! Noise static key is its WireGuard key, so registering proves ownership.

// Per-source token buckets: the relay's, the coordinator's, WG-STUN's and the agent's DNS.
pub mod admission;
#[cfg(feature = "relay-server")]
pub mod budget;
pub mod client;
#[cfg(feature = "relay-server")]
pub mod client_conn;
#[cfg(feature = "relay-server")]
pub mod feed;
pub mod frame;
#[cfg(feature = "relay-server")]
pub mod load;
#[cfg(feature = "relay-server")]
pub mod members;
#[cfg(feature = "relay-server")]
pub mod metrics;
#[cfg(feature = "relay-server")]
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

// The end-to-end tests run a coordinator with its embedded relay.
#[cfg(all(test, feature = "server"))]
mod tests;
