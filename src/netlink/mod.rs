//! rtnetlink: links, addresses, routes, and a monitor a mio loop can own.
//!
//! Built on netlink-packet-route messages over a non-blocking netlink-sys
//! socket (the async `rtnetlink` crate would bring tokio). Every call is one
//! request and its answer, bounded by [`socket::REQUEST_DEADLINE`]. Errors
//! name the object and the interface, e.g.
//! `adding 10.9.0.1/24 to wg-a (index 7): File exists`.

mod addr;
mod link;
mod monitor;
mod route;
pub mod socket;

use anyhow::{Context, Result};
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::protocols::NETLINK_ROUTE;

pub use link::{LinkState, check_name};
pub use monitor::{Monitor, NetEvent};
pub use route::RouteEntry;
use socket::{NlError, NlSocket};

/// A request/answer rtnetlink socket.
pub struct Rtnl {
    sock: NlSocket,
}

impl Rtnl {
    pub fn open() -> Result<Rtnl> {
        let sock = NlSocket::open(NETLINK_ROUTE).context("opening rtnetlink socket")?;
        Ok(Rtnl { sock })
    }

    /// Sends one request and collects the rtnetlink messages of its answer.
    /// `flags` are added to NLM_F_REQUEST; without NLM_F_DUMP an ACK is
    /// requested so that success is confirmed, not assumed.
    fn request(&mut self, msg: RouteNetlinkMessage, flags: u16) -> Result<Vec<RouteNetlinkMessage>, NlError> {
        let seq = self.sock.next_seq();
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        if flags & NLM_F_DUMP != NLM_F_DUMP {
            header.flags |= NLM_F_ACK;
        }
        header.sequence_number = seq;
        let mut nl = NetlinkMessage::new(header, NetlinkPayload::from(msg));
        nl.finalize();
        let mut bytes = vec![0u8; nl.buffer_len()];
        nl.serialize(&mut bytes);
        self.sock.send(&bytes)?;
        let mut out = Vec::new();
        self.sock.answer(seq, |m| {
            let parsed = NetlinkMessage::<RouteNetlinkMessage>::deserialize(m.bytes)
                .map_err(|e| NlError::Malformed(e.to_string()))?;
            if let NetlinkPayload::InnerMessage(inner) = parsed.payload {
                out.push(inner);
            }
            Ok(())
        })?;
        Ok(out)
    }

    /// "wg-a (index 7)" for error messages; just "index 7" when the link is
    /// gone or its name cannot be read.
    fn describe(&mut self, index: u32) -> String {
        match self.link_name(index) {
            Ok(Some(name)) => format!("{name} (index {index})"),
            _ => format!("index {index}"),
        }
    }
}

socket::delegate_to_nl_socket!(Rtnl, sock);

#[cfg(test)]
mod tests;
