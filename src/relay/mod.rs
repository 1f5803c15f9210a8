//! The relay: forwards WireGuard datagrams and sealed peer messages between
//! nodes, addressed by WireGuard public key, over TCP + Noise.

pub mod frame;
