//! What the agent exports to Prometheus: the [`Status`] and [`Netcheck`]
//! that `warren status` and `warren netcheck` show, plus the few counters
//! only the loop sees ([`Counters`]). Rendered per scrape, so a figure here
//! is the same one the CLI prints. Peers are labelled by name and short key.

use super::api::{Netcheck, Status};
use super::paths::PathKind;
use crate::metrics::{Exposition, Kind};

/// Counted by the agent's loop since it started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Peers that went from the relay to a direct path, and back.
    pub upgrades: u64,
    pub downgrades: u64,
    /// WireGuard datagram bytes carried through relays, to and from peers.
    pub relay_bytes_sent: u64,
    pub relay_bytes_received: u64,
    /// Relayed datagrams dropped because their peer is (being) upgraded.
    pub relay_muted_drops: u64,
    pub checks: crate::nat::path::CheckCounts,
}

const PATHS: [(PathKind, &str); 3] = [
    (PathKind::Direct, "direct"),
    (PathKind::Relay, "relay"),
    (PathKind::None, "none"),
];
const COORDINATOR_STATES: [&str; 4] = ["connected", "connecting", "waiting", "failed"];
const PORTMAP_PROTOCOLS: [&str; 3] = ["pcp", "natpmp", "upnp"];

fn flag(b: bool) -> f64 {
    if b { 1.0 } else { 0.0 }
}

pub fn render(status: &Status, netcheck: &Netcheck, c: &Counters) -> String {
    let mut e = Exposition::new();
    let key = status.public_key.short();
    let name = status.name.clone().unwrap_or_default();
    let mesh = status.mesh_addr.map(|a| a.to_string()).unwrap_or_default();
    e.family(
        "warren_agent_info",
        Kind::Gauge,
        "This node: name, short key, mesh address, interface, WireGuard backend.",
    )
    .sample(
        &[
            ("name", &name),
            ("key", &key),
            ("mesh_addr", &mesh),
            ("interface", &status.interface),
            ("backend", &status.backend),
            ("version", env!("CARGO_PKG_VERSION")),
        ],
        1.0,
    );
    let mut f = e.family(
        "warren_agent_coordinator_state",
        Kind::Gauge,
        "The coordinator connection: 1 for its current state.",
    );
    for s in COORDINATOR_STATES {
        f.sample(&[("state", s)], flag(status.coordinator == s));
    }

    let mut f = e.family(
        "warren_agent_peers",
        Kind::Gauge,
        "Peers by the path their traffic takes.",
    );
    for (kind, label) in PATHS {
        let n = status.peers.iter().filter(|p| p.path == kind).count();
        f.sample(&[("path", label)], n as f64);
    }
    let mut f = e.family(
        "warren_agent_peer_path",
        Kind::Gauge,
        "Each peer's path: 1 for the current one.",
    );
    for p in &status.peers {
        let k = p.public_key.short();
        for (kind, label) in PATHS {
            f.sample(
                &[("peer", &p.name), ("key", &k), ("path", label)],
                flag(p.path == kind),
            );
        }
    }
    let mut f = e.family(
        "warren_agent_peer_online",
        Kind::Gauge,
        "Whether the coordinator sees the peer online.",
    );
    for p in &status.peers {
        f.sample(
            &[("peer", &p.name), ("key", &p.public_key.short())],
            flag(p.online),
        );
    }
    let mut f = e.family(
        "warren_agent_peer_rx_bytes_total",
        Kind::Counter,
        "Bytes WireGuard received from the peer (over any path).",
    );
    for p in &status.peers {
        f.sample(
            &[("peer", &p.name), ("key", &p.public_key.short())],
            p.rx_bytes as f64,
        );
    }
    let mut f = e.family(
        "warren_agent_peer_tx_bytes_total",
        Kind::Counter,
        "Bytes WireGuard sent to the peer (over any path).",
    );
    for p in &status.peers {
        f.sample(
            &[("peer", &p.name), ("key", &p.public_key.short())],
            p.tx_bytes as f64,
        );
    }
    let mut f = e.family(
        "warren_agent_peer_handshake_age_seconds",
        Kind::Gauge,
        "Seconds since the last WireGuard handshake with the peer (absent before the first).",
    );
    for p in &status.peers {
        if let Some(age) = p.last_handshake_secs {
            f.sample(&[("peer", &p.name), ("key", &p.public_key.short())], age as f64);
        }
    }
    let mut f = e.family(
        "warren_agent_peer_check_rtt_seconds",
        Kind::Gauge,
        "Round trip of the last connectivity check on the peer's direct pair.",
    );
    for p in &status.peers {
        if let Some(us) = p.rtt_us {
            f.sample(
                &[("peer", &p.name), ("key", &p.public_key.short())],
                us as f64 / 1e6,
            );
        }
    }
    e.single(
        "warren_agent_path_upgrades_total",
        Kind::Counter,
        "Peers moved from the relay to a direct path.",
        c.upgrades as f64,
    );
    e.single(
        "warren_agent_path_downgrades_total",
        Kind::Counter,
        "Peers that fell back from a direct path to the relay.",
        c.downgrades as f64,
    );
    e.single(
        "warren_agent_check_pings_sent_total",
        Kind::Counter,
        "Connectivity check pings sent to peers' candidates.",
        c.checks.pings_sent as f64,
    );
    e.single(
        "warren_agent_check_pongs_total",
        Kind::Counter,
        "Connectivity check answers that proved a round trip to the address checked.",
        c.checks.pongs_valid as f64,
    );
    let mut f = e.family(
        "warren_agent_check_rounds_total",
        Kind::Counter,
        "Connectivity check rounds by result: a pair found (upgrade begun) or none usable.",
    );
    f.sample(&[("result", "passed")], c.checks.rounds_passed as f64);
    f.sample(&[("result", "failed")], c.checks.rounds_failed as f64);

    let mut f = e.family(
        "warren_agent_nat_mapping_known",
        Kind::Gauge,
        "Whether STUN told this socket's public mapping (wireguard: WG-STUN in the tunnel; check: plain STUN).",
    );
    f.sample(&[("socket", "wireguard")], flag(netcheck.wg_mapping.is_some()));
    f.sample(&[("socket", "check")], flag(netcheck.check_mapping.is_some()));
    let mut f = e.family(
        "warren_agent_nat_candidates",
        Kind::Gauge,
        "Candidates announced to peers, by kind.",
    );
    let mut kinds: Vec<&str> = netcheck.candidates.iter().map(|c| c.kind.as_str()).collect();
    kinds.sort_unstable();
    kinds.dedup();
    for k in kinds {
        let n = netcheck.candidates.iter().filter(|c| c.kind == k).count();
        f.sample(&[("kind", k)], n as f64);
    }

    let relay_labels: Vec<(String, &str)> = status
        .relays
        .iter()
        .map(|r| (r.public_key.short(), if r.home { "true" } else { "false" }))
        .collect();
    let mut f = e.family(
        "warren_agent_relay_connected",
        Kind::Gauge,
        "Whether the relay connection is open.",
    );
    for (r, (k, home)) in status.relays.iter().zip(&relay_labels) {
        f.sample(&[("relay", k), ("home", home)], flag(r.state == "connected"));
    }
    let mut f = e.family(
        "warren_agent_relay_connect_seconds",
        Kind::Gauge,
        "TCP connect plus Noise handshake of the open relay connection.",
    );
    for (r, (k, home)) in status.relays.iter().zip(&relay_labels) {
        if let Some(us) = r.connect_us {
            f.sample(&[("relay", k), ("home", home)], us as f64 / 1e6);
        }
    }
    let mut f = e.family(
        "warren_agent_relay_dropped_total",
        Kind::Counter,
        "Datagrams to peers dropped because the relay was unreachable or congested.",
    );
    for (r, (k, home)) in status.relays.iter().zip(&relay_labels) {
        f.sample(&[("relay", k), ("home", home)], r.dropped as f64);
    }
    let mut f = e.family(
        "warren_agent_relay_bytes_total",
        Kind::Counter,
        "WireGuard datagram bytes carried through relays.",
    );
    f.sample(&[("direction", "sent")], c.relay_bytes_sent as f64);
    f.sample(&[("direction", "received")], c.relay_bytes_received as f64);
    e.single(
        "warren_agent_relay_muted_drops_total",
        Kind::Counter,
        "Relayed datagrams dropped because their peer is on (or moving to) a direct path.",
        c.relay_muted_drops as f64,
    );

    let pm = &netcheck.portmap;
    e.single(
        "warren_agent_portmap_enabled",
        Kind::Gauge,
        "Whether the agent asks the home router for port mappings.",
        flag(pm.enabled),
    );
    let mut f = e.family(
        "warren_agent_portmap_protocol",
        Kind::Gauge,
        "The port-mapping protocol in use: 1 for the one the router answered.",
    );
    for p in PORTMAP_PROTOCOLS {
        f.sample(&[("protocol", p)], flag(pm.protocol.as_deref() == Some(p)));
    }
    let mut f = e.family(
        "warren_agent_portmap_mapped",
        Kind::Gauge,
        "Whether the router holds a mapping for the socket.",
    );
    for socket in ["wireguard", "check"] {
        f.sample(
            &[("socket", socket)],
            flag(pm.mappings.iter().any(|m| m.socket == socket)),
        );
    }
    e.single(
        "warren_agent_log_lines_dropped_total",
        Kind::Counter,
        "Log lines stderr could not take.",
        status.log_lines_dropped as f64,
    );
    e.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::api::{PeerStatus, PortmapStatus};
    use crate::keys::Key;

    fn peer(name: &str, path: PathKind, rx: u64) -> PeerStatus {
        PeerStatus {
            name: name.into(),
            mesh_addr: "100.64.0.9".parse().unwrap(),
            public_key: Key::generate_private().public_key(),
            online: true,
            endpoint: None,
            path,
            relay: None,
            last_handshake_secs: Some(7),
            rx_bytes: rx,
            tx_bytes: 5,
            pair: None,
            rtt_us: Some(1500),
            path_secs: None,
            reason: None,
        }
    }

    #[test]
    fn the_status_is_what_is_exported() {
        let status = Status {
            name: Some("a".into()),
            mesh_addr: Some("100.64.0.8".parse().unwrap()),
            public_key: Key::generate_private().public_key(),
            interface: "wg0".into(),
            backend: "kernel".into(),
            coordinator: "connected".into(),
            coordinator_detail: None,
            coordinator_error: None,
            relays: Vec::new(),
            peers: vec![
                peer("b", PathKind::Direct, 1234),
                peer("c\"d", PathKind::Relay, 0),
            ],
            log_lines_dropped: 0,
            routing: None,
            policy: Default::default(),
        };
        let netcheck = Netcheck {
            wg_mapping: Some("203.0.113.1:51820".parse().unwrap()),
            wg_mapping_error: None,
            check_mapping: None,
            check_mapping_error: None,
            mapping_varies: None,
            mapping_varies_detail: String::new(),
            wgstun: None,
            candidates: Vec::new(),
            relays: Vec::new(),
            portmap: PortmapStatus {
                enabled: false,
                gateway: None,
                protocol: None,
                probes: Default::default(),
                external_ip: None,
                mappings: Vec::new(),
                error: None,
            },
        };
        let text = render(
            &status,
            &netcheck,
            &Counters {
                upgrades: 3,
                ..Counters::default()
            },
        );
        let b = status.peers[0].public_key.short();
        for want in [
            "warren_agent_coordinator_state{state=\"connected\"} 1\n".to_string(),
            "warren_agent_coordinator_state{state=\"waiting\"} 0\n".to_string(),
            "warren_agent_peers{path=\"direct\"} 1\n".to_string(),
            "warren_agent_peers{path=\"relay\"} 1\n".to_string(),
            format!("warren_agent_peer_path{{peer=\"b\",key=\"{b}\",path=\"direct\"}} 1\n"),
            format!("warren_agent_peer_rx_bytes_total{{peer=\"b\",key=\"{b}\"}} 1234\n"),
            format!("warren_agent_peer_handshake_age_seconds{{peer=\"b\",key=\"{b}\"}} 7\n"),
            format!("warren_agent_peer_check_rtt_seconds{{peer=\"b\",key=\"{b}\"}} 0.0015\n"),
            "peer=\"c\\\"d\"".to_string(),
            "warren_agent_path_upgrades_total 3\n".to_string(),
            "warren_agent_nat_mapping_known{socket=\"wireguard\"} 1\n".to_string(),
            "warren_agent_nat_mapping_known{socket=\"check\"} 0\n".to_string(),
        ] {
            assert!(text.contains(&want), "missing {want:?} in\n{text}");
        }
        assert!(
            !text.contains(&status.peers[0].public_key.to_base64()),
            "never a full key"
        );
    }
}
