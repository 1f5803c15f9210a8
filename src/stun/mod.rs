//! STUN (RFC 8489), Binding method only: the codec and a plain STUN server core.
//!
//! warren needs exactly one thing from STUN: "what address did this datagram
//! come from". So the codec decodes any well-formed message far enough to
//! answer a Binding request, and encodes Binding requests and success
//! responses. No authentication, no TURN.

pub mod fingerprint;
pub mod message;
// The plain STUN server core, run by the WG-STUN server.
#[cfg(feature = "wgstun-server")]
pub mod server;

pub use message::{Class, DecodeError, Message, TransactionId};
