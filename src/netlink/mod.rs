//! rtnetlink: links, addresses, routes, policy rules, and a monitor a mio
//! loop can own.
//!
//! An in-tree codec ([`attr`]) for exactly the messages warren sends and
//! reads, over a non-blocking netlink-sys socket (netlink-packet-route parsed
//! every rtnetlink kind, tc included: it cost 522 KB of the stripped binary;
//! the async `rtnetlink` crate would bring tokio). Every call is one request
//! and its answer, bounded by [`socket::REQUEST_DEADLINE`]. Errors
//! name the object and the interface, e.g.
//! `adding 10.9.0.1/24 to wg-a (index 7): File exists`.

mod addr;
pub mod attr;
mod link;
mod monitor;
mod route;
mod rule;
pub mod socket;

use anyhow::{Context, Result};
use netlink_packet_core::{NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST};
use netlink_sys::protocols::NETLINK_ROUTE;

use attr::Request;

pub use link::{LinkState, check_name};
pub use monitor::{Monitor, NetEvent};
pub use route::{RTPROT_WARREN, RouteEntry};
pub use rule::RuleSpec;
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

    /// Sends one request and collects the messages of its answer (type and
    /// payload after the netlink header). `flags` are added to
    /// NLM_F_REQUEST; without NLM_F_DUMP an ACK is requested so that success
    /// is confirmed, not assumed.
    fn request(&mut self, req: Request, flags: u16) -> Result<Vec<Reply>, NlError> {
        let seq = self.sock.next_seq();
        let mut flags = NLM_F_REQUEST | flags;
        if flags & NLM_F_DUMP != NLM_F_DUMP {
            flags |= NLM_F_ACK;
        }
        self.sock.send(&req.finish(flags, seq))?;
        let mut out = Vec::new();
        self.sock.answer(seq, |m| {
            out.push(Reply {
                kind: m.message_type,
                payload: m.payload.to_vec(),
            });
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

/// Entry for the fuzz target and the no-panic tests: splits `data` into
/// netlink messages and reads each one's payload with every parser (link,
/// address, route, rule, monitor event), whatever its type says. Never
/// panics; returns how many parses succeeded.
pub fn fuzz_decode(data: &[u8]) -> usize {
    let Ok(msgs) = socket::split_messages(data) else {
        return 0;
    };
    msgs.iter().map(|m| parse_all(m.message_type, m.payload)).sum()
}

/// One payload through every parser; how many accepted it.
fn parse_all(kind: u16, payload: &[u8]) -> usize {
    [
        LinkState::parse(payload).is_ok(),
        addr::AddressMsg::parse(payload).is_ok(),
        route::parse_route(payload).is_ok(),
        rule::parse_rule(payload).is_ok(),
        monitor::event_of(kind, payload).is_some(),
    ]
    .into_iter()
    .filter(|&ok| ok)
    .count()
}

/// One message of an answer: its RTM_* type and what follows the netlink header.
struct Reply {
    kind: u16,
    payload: Vec<u8>,
}

socket::delegate_to_nl_socket!(Rtnl, sock);

#[cfg(test)]
mod tests;
