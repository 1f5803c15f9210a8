//! Network change events (links, addresses, routes) for a mio loop: the
//! agent re-checks paths after every change.

use std::net::IpAddr;

use anyhow::{Context, Result};
use netlink_sys::protocols::NETLINK_ROUTE;

use super::addr::{AddressMsg, RTM_DELADDR, RTM_NEWADDR};
use super::link::{LinkState, RTM_DELLINK, RTM_NEWLINK};
use super::route::{RTM_DELROUTE, RTM_NEWROUTE, RouteEntry, main_route};
use super::socket::{NlSocket, split_messages};

// Multicast group numbers from <linux/rtnetlink.h> (enum rtnetlink_groups).
const RTNLGRP_LINK: u32 = 1;
const RTNLGRP_IPV4_IFADDR: u32 = 5;
const RTNLGRP_IPV4_ROUTE: u32 = 7;
const RTNLGRP_IPV6_IFADDR: u32 = 9;
const RTNLGRP_IPV6_ROUTE: u32 = 11;

/// One change in the network configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NetEvent {
    /// A link appeared or changed (up/down, MTU, name).
    LinkChanged(LinkState),
    LinkRemoved {
        index: u32,
        name: String,
    },
    AddressAdded {
        index: u32,
        addr: IpAddr,
        prefix: u8,
    },
    AddressRemoved {
        index: u32,
        addr: IpAddr,
        prefix: u8,
    },
    RouteAdded(RouteEntry),
    RouteRemoved(RouteEntry),
    /// The kernel dropped events (socket buffer full): re-read everything.
    Resync,
}

/// A netlink socket subscribed to link, address and route changes.
pub struct Monitor {
    sock: NlSocket,
}

impl Monitor {
    pub fn open() -> Result<Monitor> {
        let groups = [
            RTNLGRP_LINK,
            RTNLGRP_IPV4_IFADDR,
            RTNLGRP_IPV6_IFADDR,
            RTNLGRP_IPV4_ROUTE,
            RTNLGRP_IPV6_ROUTE,
        ];
        let sock = NlSocket::open_subscribed(NETLINK_ROUTE, &groups).context("opening rtnetlink monitor")?;
        Ok(Monitor { sock })
    }

    /// Drains every queued event without blocking; an empty list means
    /// nothing happened since the last call.
    pub fn read_events(&mut self) -> Result<Vec<NetEvent>> {
        let mut events = Vec::new();
        loop {
            let datagram = match self.sock.try_recv() {
                Ok(Some(d)) => d,
                Ok(None) => break,
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    events.push(NetEvent::Resync);
                    continue;
                }
                Err(e) => return Err(e).context("reading rtnetlink events"),
            };
            // A malformed datagram is skipped, not fatal: the next one is independent.
            let Ok(msgs) = split_messages(datagram) else {
                continue;
            };
            // So is a malformed message: the kernel's next event about the
            // same object says everything again.
            events.extend(msgs.iter().filter_map(|m| event_of(m.message_type, m.payload)));
        }
        Ok(events)
    }
}

/// The event an rtnetlink notification (type and payload) stands for, if any.
pub(super) fn event_of(kind: u16, payload: &[u8]) -> Option<NetEvent> {
    Some(match kind {
        RTM_NEWLINK => NetEvent::LinkChanged(LinkState::parse(payload).ok()?),
        RTM_DELLINK => {
            let state = LinkState::parse(payload).ok()?;
            NetEvent::LinkRemoved {
                index: state.index,
                name: state.name,
            }
        }
        RTM_NEWADDR | RTM_DELADDR => {
            let a = AddressMsg::parse(payload).ok()?;
            let (index, addr, prefix) = (a.index, a.addr?, a.prefix);
            if kind == RTM_NEWADDR {
                NetEvent::AddressAdded { index, addr, prefix }
            } else {
                NetEvent::AddressRemoved { index, addr, prefix }
            }
        }
        RTM_NEWROUTE => NetEvent::RouteAdded(main_route(payload)?),
        RTM_DELROUTE => NetEvent::RouteRemoved(main_route(payload)?),
        _ => return None,
    })
}

super::socket::delegate_to_nl_socket!(Monitor, sock);
