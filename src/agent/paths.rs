//! The WireGuard device the agent wants: one peer per mesh node with its
//! mesh /32 and the endpoint NAT traversal ([`crate::nat`]) chose, and the
//! path kind `warren status` reports.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::control::messages::PeerInfo;
use crate::keys::Key;
use crate::wg::{AllowedIp, DeviceConfig, PeerConfig, PeerState};

/// WireGuard re-handshakes every 2 minutes while traffic flows and keepalives
/// keep it flowing; no handshake for 3 minutes means the path is gone.
pub const HANDSHAKE_FRESH: Duration = Duration::from_secs(180);
/// Keeps NAT mappings open and makes both sides handshake without traffic.
pub const PERSISTENT_KEEPALIVE: u16 = 25;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PathKind {
    Direct,
    Relay,
    None,
}

/// Whether WireGuard has a fresh handshake with this peer.
pub fn is_fresh(state: Option<&PeerState>, wall: SystemTime) -> bool {
    state
        .and_then(|s| s.last_handshake)
        .and_then(|t| wall.duration_since(t).ok())
        .is_some_and(|age| age < HANDSHAKE_FRESH)
}

/// The path a peer's traffic takes now, for `warren status`: `relayed` says
/// whether its endpoint is our relay socket.
pub fn path_kind(state: Option<&PeerState>, wall: SystemTime, relayed: bool) -> PathKind {
    // An idle relayed peer sends no keepalives, so its handshake ages out;
    // the relay is still its path (the relay connection's own state says
    // whether it works).
    match (relayed, is_fresh(state, wall)) {
        (true, _) => PathKind::Relay,
        (false, true) => PathKind::Direct,
        (false, false) => PathKind::None,
    }
}

/// Keepalives hold NAT mappings open on a direct path. The relay path needs
/// none (the relay connection has its own), and there each keepalive would
/// wake the agent: 100 idle relayed peers made 18 wake-ups a second.
fn keepalive_for(endpoint: Option<SocketAddr>) -> Option<u16> {
    match endpoint {
        Some(e) if e.ip().is_loopback() => None,
        _ => Some(PERSISTENT_KEEPALIVE),
    }
}

/// The WireGuard device for this node and its peers.
pub fn device_config(
    private_key: Key,
    listen_port: u16,
    peers: &[(PeerInfo, Option<SocketAddr>)],
) -> DeviceConfig {
    DeviceConfig {
        private_key,
        listen_port: Some(listen_port),
        fwmark: None,
        peers: peers
            .iter()
            .map(|(p, endpoint)| PeerConfig {
                public_key: p.public_key,
                preshared_key: None,
                endpoint: *endpoint,
                allowed_ips: vec![AllowedIp {
                    addr: IpAddr::V4(p.mesh_addr),
                    cidr: 32,
                }],
                persistent_keepalive: keepalive_for(*endpoint),
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> PeerInfo {
        PeerInfo {
            id: 1,
            name: "p".into(),
            mesh_addr: "100.64.0.9".parse().unwrap(),
            public_key: Key([1; 32]),
            candidates: vec![],
            online: true,
            home_relay: None,
            routes: Vec::new(),
            exit: false,
        }
    }

    fn state(ep: &str, age: Option<u64>, wall: SystemTime) -> PeerState {
        PeerState {
            last_handshake: age.map(|a| wall - Duration::from_secs(a)),
            endpoint: Some(ep.parse().unwrap()),
            ..PeerState::new(Key([1; 32]))
        }
    }

    const RELAY: &str = "127.0.0.1:40001";

    #[test]
    fn relayed_peers_have_no_keepalive_and_path_kinds_follow_the_endpoint() {
        let wall = SystemTime::now();
        assert_eq!(
            path_kind(Some(&state(RELAY, Some(3), wall)), wall, true),
            PathKind::Relay
        );
        assert_eq!(
            path_kind(Some(&state(RELAY, Some(600), wall)), wall, true),
            PathKind::Relay
        );
        assert_eq!(
            path_kind(Some(&state("203.0.113.7:51820", Some(600), wall)), wall, false),
            PathKind::None
        );
        assert_eq!(
            path_kind(Some(&state("203.0.113.7:51820", Some(3), wall)), wall, false),
            PathKind::Direct
        );
        let relayed = device_config(Key([2; 32]), 51820, &[(peer(), Some(RELAY.parse().unwrap()))]);
        assert_eq!(relayed.peers[0].persistent_keepalive, None);
        let direct = device_config(
            Key([2; 32]),
            51820,
            &[(peer(), Some("203.0.113.7:51820".parse().unwrap()))],
        );
        assert_eq!(direct.peers[0].persistent_keepalive, Some(PERSISTENT_KEEPALIVE));
        // Left to WireGuard's roaming: keepalives hold the NAT mapping.
        let kept = device_config(Key([2; 32]), 51820, &[(peer(), None)]);
        assert_eq!(kept.peers[0].persistent_keepalive, Some(PERSISTENT_KEEPALIVE));
        assert_eq!(kept.peers[0].endpoint, None);
    }
}
