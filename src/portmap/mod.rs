//! Port mapping on the home router (UPnP IGD, NAT-PMP, PCP): a fixed public
//! mapping of the WireGuard and check ports, so a node behind a NAT that
//! gives every destination a new port still goes direct.

pub mod mapper;
pub mod natpmp;
pub mod pcp;
pub mod upnp;
