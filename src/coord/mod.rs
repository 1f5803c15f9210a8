//! The coordinator: enrollment, names, addresses, and the peer map it pushes to nodes.
//!
//! `admin` (the admin socket's messages and client) and `invite` (join
//! tokens) are in every build: agents parse tokens and the CLI's peer-uid
//! check is shared. The rest is the `server` feature.

pub mod admin;
#[cfg(feature = "server")]
pub mod admission;
#[cfg(feature = "server")]
pub mod conn;
#[cfg(feature = "server")]
pub mod flood;
#[cfg(feature = "server")]
pub mod hub;
#[cfg(feature = "server")]
pub mod inbound;
pub mod invite;
#[cfg(feature = "server")]
pub mod load;
#[cfg(feature = "server")]
pub mod metrics;
#[cfg(feature = "server")]
pub mod names;
#[cfg(feature = "server")]
pub mod pacer;
#[cfg(feature = "server")]
pub mod peermap;
#[cfg(feature = "server")]
pub mod policy;
#[cfg(feature = "server")]
pub mod relayfeed;
#[cfg(feature = "server")]
pub mod routes;
#[cfg(feature = "server")]
pub mod server;
#[cfg(feature = "server")]
pub mod store;
#[cfg(feature = "server")]
pub mod tally;
