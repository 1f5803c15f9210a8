//! The coordinator: enrollment, names, addresses, and the peer map it pushes to nodes.

pub mod admin;
pub mod admission;
pub mod conn;
pub mod flood;
pub mod hub;
pub mod inbound;
pub mod invite;
pub mod load;
pub mod metrics;
pub mod names;
pub mod pacer;
pub mod peermap;
pub mod relayfeed;
pub mod server;
pub mod store;
pub mod tally;
