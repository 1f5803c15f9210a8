//! Which endpoint to give WireGuard for each peer (DESIGN.md, "Path
//! lifecycle"): the relay first; a direct path once WireGuard shows one
//! works; the peer's reported candidates, one after another, while its relay
//! is unreachable. Pure: the caller passes WireGuard's state and the time.
//!
//! Proof that a direct path works is WireGuard's own: received bytes while
//! the endpoint is not our relay socket (WireGuard moves a peer's endpoint to
//! wherever its authenticated packets come from), or a handshake completed
//! after we switched to a candidate. Checking candidates out of band before
//! leaving a healthy relay is NAT traversal's job, not done here.

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
/// A direct path counts as working while packets arrived on it within this.
/// An idle peer still sends a keepalive every [`PERSISTENT_KEEPALIVE`] s; the
/// rest is slack for the reconcile interval that samples the counters.
pub const DIRECT_QUIET: Duration = Duration::from_secs(40);

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
    since_wall: SystemTime,
}

#[derive(Default)]
struct PeerPath {
    trying: Option<Trying>,
    last_rx: Option<u64>,
    /// Last time direct packets from the peer were seen.
    direct_seen: Option<Instant>,
}

#[derive(Default)]
pub struct Paths {
    peers: HashMap<Key, PeerPath>,
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

impl Paths {
    /// The endpoint to configure for `peer`; `relay` is its relay socket when
    /// the relay that reaches it is connected.
    pub fn choose(
        &mut self,
        now: Instant,
        wall: SystemTime,
        peer: &PeerInfo,
        state: Option<&PeerState>,
        relay: Option<SocketAddr>,
    ) -> Option<SocketAddr> {
        let pp = self.peers.entry(peer.public_key).or_default();
        let direct = state.and_then(|s| s.endpoint).filter(|a| !a.ip().is_loopback());
        if let Some(s) = state {
            let received = pp.last_rx.is_some_and(|r| s.rx_bytes > r);
            let handshook_since_switch = pp
                .trying
                .as_ref()
                .is_some_and(|t| s.last_handshake.is_some_and(|h| h > t.since_wall));
            if direct.is_some() && (received || handshook_since_switch) {
                pp.direct_seen = Some(now);
            }
            pp.last_rx = Some(s.rx_bytes);
        }
        let direct_works = pp
            .direct_seen
            .is_some_and(|t| now.saturating_duration_since(t) < DIRECT_QUIET);
        if direct.is_some() && direct_works {
            // Working, possibly roamed to a NAT mapping no candidate names: keep it.
            pp.trying = None;
            return direct;
        }
        if relay.is_some() {
            pp.trying = None;
            return relay;
        }
        let candidates = ordered(&peer.candidates);
        if candidates.is_empty() {
            // Nothing to dial; the peer may still reach us, and WireGuard learns its endpoint then.
            return direct;
        }
        let t = pp.trying.get_or_insert(Trying {
            index: 0,
            since: now,
            since_wall: wall,
        });
        if now.saturating_duration_since(t.since) >= CANDIDATE_DWELL {
            t.index += 1;
            t.since = now;
            t.since_wall = wall;
        }
        Some(candidates[t.index % candidates.len()])
    }

    /// Forgets peers that left the map.
    pub fn retain(&mut self, keys: &[Key]) {
        self.peers.retain(|k, _| keys.contains(k));
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

    fn state(ep: &str, age: Option<u64>, rx: u64, wall: SystemTime) -> PeerState {
        PeerState {
            rx_bytes: rx,
            last_handshake: age.map(|a| wall - Duration::from_secs(a)),
            endpoint: Some(ep.parse().unwrap()),
            ..PeerState::new(Key([1; 32]))
        }
    }

    const RELAY: &str = "127.0.0.1:40001";

    #[test]
    fn without_a_relay_cycles_candidates_public_first_until_one_handshakes() {
        let (now, wall) = (Instant::now(), SystemTime::now());
        let mut paths = Paths::default();
        let p = peer(&["10.1.0.2:51820", "203.0.113.7:51820"]);
        let mut pick = |t: Duration, s: Option<&PeerState>| paths.choose(now + t, wall, &p, s, None);
        let public = Some("203.0.113.7:51820".parse().unwrap());
        let private = Some("10.1.0.2:51820".parse().unwrap());
        assert_eq!(pick(Duration::ZERO, None), public);
        assert_eq!(pick(Duration::from_secs(1), None), public);
        assert_eq!(pick(CANDIDATE_DWELL, None), private);
        assert_eq!(pick(CANDIDATE_DWELL * 2, None), public);
        // A handshake from before the switch proves nothing: keep cycling.
        let old = state("203.0.113.7:51820", Some(5), 100, wall);
        assert_eq!(pick(CANDIDATE_DWELL * 3, Some(&old)), private);
        // One after it does, even through a NAT mapping nobody reported.
        let roamed = state("198.51.100.3:40000", Some(0), 100, wall + Duration::from_secs(1));
        for t in [4, 5, 6, 10] {
            assert_eq!(pick(CANDIDATE_DWELL * t, Some(&roamed)), roamed.endpoint);
        }
    }

    #[test]
    fn relay_first_then_direct_once_packets_arrive_directly_and_back_when_they_stop() {
        let (now, wall) = (Instant::now(), SystemTime::now());
        let mut paths = Paths::default();
        let p = peer(&["203.0.113.7:51820"]);
        let relay = Some(RELAY.parse().unwrap());
        let mut pick =
            |t: u64, s: Option<&PeerState>| paths.choose(now + Duration::from_secs(t), wall, &p, s, relay);
        assert_eq!(pick(0, None), relay);
        // Traffic over the relay: stays there.
        assert_eq!(pick(5, Some(&state(RELAY, Some(1), 100, wall))), relay);
        assert_eq!(pick(10, Some(&state(RELAY, Some(1), 900, wall))), relay);
        // The peer's packets start arriving directly (WireGuard roamed): direct it is.
        assert_eq!(
            pick(15, Some(&state("198.51.100.3:4000", Some(1), 1500, wall))),
            Some("198.51.100.3:4000".parse().unwrap())
        );
        assert_eq!(
            pick(20, Some(&state("198.51.100.3:4000", Some(1), 1600, wall))),
            Some("198.51.100.3:4000".parse().unwrap())
        );
        // Nothing more arrives: back to the relay once the quiet period is over.
        let silent = state("198.51.100.3:4000", Some(30), 1600, wall);
        assert_eq!(
            pick(20 + DIRECT_QUIET.as_secs() - 1, Some(&silent)),
            silent.endpoint
        );
        assert_eq!(pick(20 + DIRECT_QUIET.as_secs(), Some(&silent)), relay);
    }

    #[test]
    fn relay_gone_tries_candidates_not_the_dead_relay_socket() {
        let (now, wall) = (Instant::now(), SystemTime::now());
        let mut paths = Paths::default();
        let p = peer(&["203.0.113.7:51820"]);
        let on_relay = state(RELAY, Some(3), 500, wall);
        assert_eq!(
            paths.choose(now, wall, &p, Some(&on_relay), Some(RELAY.parse().unwrap())),
            Some(RELAY.parse().unwrap())
        );
        assert_eq!(
            paths.choose(now + Duration::from_secs(5), wall, &p, Some(&on_relay), None),
            Some("203.0.113.7:51820".parse().unwrap())
        );
        assert_eq!(path_kind(Some(&on_relay), wall, true), PathKind::Relay);
        assert_eq!(
            path_kind(Some(&state(RELAY, Some(600), 0, wall)), wall, true),
            PathKind::Relay
        );
        assert_eq!(
            path_kind(Some(&state("203.0.113.7:51820", Some(600), 0, wall)), wall, false),
            PathKind::None
        );
        let relayed = device_config(Key([2; 32]), 51820, &[(p.clone(), Some(RELAY.parse().unwrap()))]);
        assert_eq!(relayed.peers[0].persistent_keepalive, None);
        let direct = device_config(
            Key([2; 32]),
            51820,
            &[(p.clone(), Some("203.0.113.7:51820".parse().unwrap()))],
        );
        assert_eq!(direct.peers[0].persistent_keepalive, Some(PERSISTENT_KEEPALIVE));
        assert_eq!(
            path_kind(Some(&state("203.0.113.7:51820", Some(3), 0, wall)), wall, false),
            PathKind::Direct
        );
    }

    #[test]
    fn no_candidates_keeps_what_wireguard_learned() {
        let (now, wall) = (Instant::now(), SystemTime::now());
        let mut paths = Paths::default();
        assert_eq!(paths.choose(now, wall, &peer(&[]), None, None), None);
        let s = state("198.51.100.3:40000", None, 0, wall);
        assert_eq!(paths.choose(now, wall, &peer(&[]), Some(&s), None), s.endpoint);
    }
}
