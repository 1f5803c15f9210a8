//! Network change events (links, addresses, routes) for a mio loop: the
//! agent re-checks paths after every change.

use std::net::IpAddr;

use anyhow::{Context, Result};
use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::protocols::NETLINK_ROUTE;

use super::addr::address_of;
use super::link::LinkState;
use super::route::{RouteEntry, route_of};
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
            for m in msgs {
                if let Ok(parsed) = NetlinkMessage::<RouteNetlinkMessage>::deserialize(m.bytes)
                    && let NetlinkPayload::InnerMessage(inner) = parsed.payload
                    && let Some(ev) = event_of(inner)
                {
                    events.push(ev);
                }
            }
        }
        Ok(events)
    }
}

fn event_of(msg: RouteNetlinkMessage) -> Option<NetEvent> {
    Some(match msg {
        RouteNetlinkMessage::NewLink(l) => NetEvent::LinkChanged(LinkState::from_message(&l)),
        RouteNetlinkMessage::DelLink(l) => {
            let state = LinkState::from_message(&l);
            NetEvent::LinkRemoved {
                index: state.index,
                name: state.name,
            }
        }
        RouteNetlinkMessage::NewAddress(a) => {
            let (addr, prefix) = address_of(&a)?;
            NetEvent::AddressAdded {
                index: a.header.index,
                addr,
                prefix,
            }
        }
        RouteNetlinkMessage::DelAddress(a) => {
            let (addr, prefix) = address_of(&a)?;
            NetEvent::AddressRemoved {
                index: a.header.index,
                addr,
                prefix,
            }
        }
        RouteNetlinkMessage::NewRoute(r) => NetEvent::RouteAdded(route_of(&r)?),
        RouteNetlinkMessage::DelRoute(r) => NetEvent::RouteRemoved(route_of(&r)?),
        _ => return None,
    })
}

super::socket::delegate_to_nl_socket!(Monitor, sock);
