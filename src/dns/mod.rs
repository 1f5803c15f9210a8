//! Names for mesh nodes: `NAME.DOMAIN` answered by every agent, sans-IO.
//! `names` is the table the peer map gives, `responder` turns one query
//! datagram into one answer, `hosts` and `resolved` point the system's own
//! resolver at it. The socket is the agent's (src/agent/dns.rs).

pub mod hosts;
pub mod message;
pub mod names;
pub mod resolved;
pub mod responder;

pub use names::NameTable;
pub use responder::answer;
