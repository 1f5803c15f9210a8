//! Node-to-node messages (candidates, pings): sealed end to end so that relays
//! and networks on the path carry them without reading or forging them.

pub mod seal;
