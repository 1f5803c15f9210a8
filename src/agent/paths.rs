//! Which endpoint to give WireGuard for each peer, until NAT traversal and
//! relays arrive: keep an endpoint that works, otherwise cycle through the
//! peer's reported candidates. Pure: the caller passes WireGuard's state and the time.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

use crate::control::messages::PeerInfo;
use crate::keys::Key;
use crate::wg::{AllowedIp, DeviceConfig, PeerConfig, PeerState};

/// WireGuard re-handshakes every 2 minutes while traffic flows and keepalives
/// keep it flowing; no handshake for 3 minutes means the path is gone.
pub const HANDSHAKE_FRESH: Duration = Duration::from_secs(180);
/// How long one candidate gets to produce a handshake before the next is tried.
pub const CANDIDATE_DWELL: Duration = Duration::from_secs(6);
/// Keeps NAT mappings open and makes both sides handshake without traffic.
pub const PERSISTENT_KEEPALIVE: u16 = 25;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PathKind {
    Direct,
    Relay,
    None,
}

struct Trying {
    index: usize,
    since: Instant,
}

#[derive(Default)]
pub struct Paths {
    trying: HashMap<Key, Trying>,
}

/// Whether WireGuard has a fresh handshake with this peer.
pub fn is_fresh(state: Option<&PeerState>, wall: SystemTime) -> bool {
    state
        .and_then(|s| s.last_handshake)
        .and_then(|t| wall.duration_since(t).ok())
        .is_some_and(|age| age < HANDSHAKE_FRESH)
}

pub fn path_kind(state: Option<&PeerState>, wall: SystemTime) -> PathKind {
    if is_fresh(state, wall) {
        PathKind::Direct
    } else {
        PathKind::None
    }
}

impl Paths {
    /// The endpoint to configure for `peer`.
    pub fn choose(
        &mut self,
        now: Instant,
        wall: SystemTime,
        peer: &PeerInfo,
        state: Option<&PeerState>,
    ) -> Option<SocketAddr> {
        if is_fresh(state, wall)
            && let Some(ep) = state.and_then(|s| s.endpoint)
        {
            // Working, possibly roamed to a NAT mapping no candidate names: keep it.
            self.trying.remove(&peer.public_key);
            return Some(ep);
        }
        let candidates = ordered(&peer.candidates);
        if candidates.is_empty() {
            // Nothing to dial; the peer may still reach us, and WireGuard learns its endpoint then.
            return state.and_then(|s| s.endpoint);
        }
        let t = self
            .trying
            .entry(peer.public_key)
            .or_insert(Trying { index: 0, since: now });
        if now.saturating_duration_since(t.since) >= CANDIDATE_DWELL {
            t.index += 1;
            t.since = now;
        }
        Some(candidates[t.index % candidates.len()])
    }

    /// Forgets peers that left the map.
    pub fn retain(&mut self, keys: &[Key]) {
        self.trying.retain(|k, _| keys.contains(k));
    }
}

/// Public addresses first (reachable from anywhere), private ones after.
fn ordered(c: &[SocketAddr]) -> Vec<SocketAddr> {
    let private = |a: &SocketAddr| match a.ip() {
        IpAddr::V4(v4) => v4.is_private() || v4.is_link_local(),
        IpAddr::V6(v6) => v6.is_unicast_link_local() || (v6.segments()[0] & 0xfe00) == 0xfc00,
    };
    let mut out: Vec<SocketAddr> = c.iter().copied().filter(|a| !private(a)).collect();
    out.extend(c.iter().copied().filter(private));
    out
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
                persistent_keepalive: Some(PERSISTENT_KEEPALIVE),
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(cands: &[&str]) -> PeerInfo {
        PeerInfo {
            id: 1,
            name: "p".into(),
            mesh_addr: "100.64.0.9".parse().unwrap(),
            public_key: Key([1; 32]),
            candidates: cands.iter().map(|c| c.parse().unwrap()).collect(),
            online: true,
            home_relay: None,
        }
    }

    fn state(ep: &str, age: Option<u64>, wall: SystemTime) -> PeerState {
        PeerState {
            public_key: Key([1; 32]),
            preshared_key: None,
            endpoint: Some(ep.parse().unwrap()),
            allowed_ips: vec![],
            persistent_keepalive: None,
            last_handshake: age.map(|a| wall - Duration::from_secs(a)),
            rx_bytes: 0,
            tx_bytes: 0,
        }
    }

    #[test]
    fn cycles_candidates_public_first_until_a_handshake_then_keeps_the_working_endpoint() {
        let (now, wall) = (Instant::now(), SystemTime::now());
        let mut paths = Paths::default();
        let p = peer(&["10.1.0.2:51820", "203.0.113.7:51820"]);
        let pick = |paths: &mut Paths, t: Duration, s: Option<&PeerState>| paths.choose(now + t, wall, &p, s);
        assert_eq!(
            pick(&mut paths, Duration::ZERO, None),
            Some("203.0.113.7:51820".parse().unwrap())
        );
        assert_eq!(
            pick(&mut paths, Duration::from_secs(1), None),
            Some("203.0.113.7:51820".parse().unwrap())
        );
        assert_eq!(
            pick(&mut paths, CANDIDATE_DWELL, None),
            Some("10.1.0.2:51820".parse().unwrap())
        );
        assert_eq!(
            pick(&mut paths, CANDIDATE_DWELL * 2, None),
            Some("203.0.113.7:51820".parse().unwrap())
        );
        // A fresh handshake through a NAT mapping nobody reported wins.
        let roamed = state("198.51.100.3:40000", Some(5), wall);
        assert_eq!(
            pick(&mut paths, CANDIDATE_DWELL * 2, Some(&roamed)),
            roamed.endpoint
        );
        // A stale one does not.
        let stale = state("198.51.100.3:40000", Some(600), wall);
        assert_ne!(
            pick(&mut paths, CANDIDATE_DWELL * 3, Some(&stale)),
            stale.endpoint
        );
        assert_eq!(path_kind(Some(&roamed), wall), PathKind::Direct);
        assert_eq!(path_kind(Some(&stale), wall), PathKind::None);
    }

    #[test]
    fn no_candidates_keeps_what_wireguard_learned() {
        let (now, wall) = (Instant::now(), SystemTime::now());
        let mut paths = Paths::default();
        assert_eq!(paths.choose(now, wall, &peer(&[]), None), None);
        let s = state("198.51.100.3:40000", None, wall);
        assert_eq!(paths.choose(now, wall, &peer(&[]), Some(&s)), s.endpoint);
    }
}
