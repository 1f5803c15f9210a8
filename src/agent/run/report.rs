//! What `warren status` and `warren netcheck` report: assembled from WireGuard, the
//! coordinator connection, the relays and the traversal.

use super::*;

impl Agent {
    pub(super) fn netcheck(&self) -> api::Netcheck {
        let m = self.nat.mappings();
        let (mapping_varies, mapping_varies_detail) = match (m.wg, m.check) {
            (Some(w), Some(c)) if w.ip() != c.ip() => (
                None,
                "the two sockets map to different public addresses (several uplinks?)".to_string(),
            ),
            (Some(_), Some(_)) => (
                None,
                "unknown: the mesh's STUN server has one address, and a second destination is needed to tell"
                    .to_string(),
            ),
            _ => (None, "unknown: no mapping learned".to_string()),
        };
        api::Netcheck {
            wg_mapping: m.wg,
            wg_mapping_error: m.wg_error.or_else(|| {
                (m.wg.is_none() && self.state.wgstun.is_empty())
                    .then(|| "the mesh publishes no WG-STUN server".to_string())
            }),
            check_mapping: m.check,
            check_mapping_error: m.check_error,
            mapping_varies,
            mapping_varies_detail,
            wgstun: self.state.wgstun.first().map(|w| w.endpoint.clone()),
            candidates: self
                .nat
                .local_candidates()
                .iter()
                .map(|c| api::CandidateStatus {
                    kind: c.kind.as_str().to_string(),
                    wg: c.wg,
                    check: c.check,
                })
                .collect(),
            relays: self.relay.status(),
            portmap: self.portmap_status(),
        }
    }

    fn portmap_status(&self) -> api::PortmapStatus {
        let st = self.portmap.status();
        let now = Instant::now();
        api::PortmapStatus {
            enabled: st.enabled,
            gateway: st.gateway,
            protocol: st.protocol.map(|p| p.as_str().to_string()),
            probes: st
                .probes
                .into_iter()
                .map(|(p, s)| (p.as_str().to_string(), s))
                .collect(),
            external_ip: st.external_ip,
            mappings: st
                .mappings
                .into_iter()
                .map(|(socket, internal_port, m)| api::PortmapMapping {
                    socket: socket.as_str().to_string(),
                    internal_port,
                    external_port: m.external.port(),
                    lease_secs_left: m.left(now).map(|d| d.as_secs()),
                })
                .collect(),
            error: st.error,
        }
    }

    pub(super) fn status(&mut self) -> Result<Status> {
        let ifname = self.cfg.ifname.clone();
        let wall = SystemTime::now();
        let now = Instant::now();
        let device = if self.backend.exists(&ifname)? {
            Some(self.backend.get(&ifname)?)
        } else {
            None
        };
        let me = self.ctrl.me();
        let last = self.ctrl.last_error().map(str::to_string);
        let last = last.as_deref();
        let (coordinator, detail) = match self.ctrl.phase() {
            Phase::Connected => ("connected", None),
            Phase::Connecting { server, .. } => (
                "connecting",
                Some(match last {
                    Some(e) => format!("dialling {server}; last attempt: {e}"),
                    None => format!("dialling {server}"),
                }),
            ),
            Phase::Waiting { retry_at } => (
                "waiting",
                Some(format!(
                    "{}; retrying in {} s",
                    last.unwrap_or("coordinator unreachable"),
                    retry_at.saturating_duration_since(Instant::now()).as_secs()
                )),
            ),
            Phase::Failed { reason, .. } => ("failed", Some(reason.clone())),
        };
        let peers = self
            .ctrl
            .peers()
            .map(|p| {
                let st = device
                    .as_ref()
                    .and_then(|d| d.peers.iter().find(|s| s.public_key == p.public_key));
                let relay = st
                    .and_then(|s| s.endpoint)
                    .and_then(|ep| self.relay.relay_of_endpoint(&p.public_key, ep));
                let nat = self.nat.status(now, &p.public_key);
                let direct = nat.as_ref().is_some_and(|n| n.direct);
                let path = if direct {
                    PathKind::Direct
                } else if relay.is_some() {
                    PathKind::Relay
                } else {
                    paths::path_kind(st, wall, false)
                };
                let pair = nat.as_ref().filter(|n| n.direct).map(|n| PairStatus {
                    local: n.local.map_or(
                        st.and_then(|s| s.endpoint)
                            .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0))),
                        |(a, _)| a,
                    ),
                    local_kind: n.local.map_or("prflx", |(_, k)| k.as_str()).to_string(),
                    remote: n
                        .remote
                        .map(|(a, _)| a)
                        .or(st.and_then(|s| s.endpoint))
                        .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0))),
                    remote_kind: n.remote.map_or("prflx", |(_, k)| k.as_str()).to_string(),
                });
                PeerStatus {
                    name: p.name.clone(),
                    mesh_addr: p.mesh_addr,
                    public_key: p.public_key,
                    online: p.online,
                    endpoint: st.and_then(|s| s.endpoint),
                    path,
                    relay: relay.and_then(|r| r.addrs.first().cloned()),
                    last_handshake_secs: st
                        .and_then(|s| s.last_handshake)
                        .and_then(|t| wall.duration_since(t).ok())
                        .map(|d| d.as_secs()),
                    rx_bytes: st.map_or(0, |s| s.rx_bytes),
                    tx_bytes: st.map_or(0, |s| s.tx_bytes),
                    pair,
                    rtt_us: nat.as_ref().and_then(|n| n.rtt).map(|r| r.as_micros() as u64),
                    path_secs: nat
                        .as_ref()
                        .map(|n| now.saturating_duration_since(n.since).as_secs()),
                    reason: nat.and_then(|n| match (n.reason, p.online) {
                        (Some(_), false) => Some("peer offline".to_string()),
                        (r, _) => r,
                    }),
                }
            })
            .collect();
        Ok(Status {
            name: me.map(|m| m.name.clone()),
            mesh_addr: me.map(|m| m.mesh_addr),
            public_key: self.state.private_key.public_key(),
            interface: ifname,
            backend: self.backend.kind().to_string(),
            coordinator: coordinator.to_string(),
            coordinator_detail: detail.or_else(|| self.last_error.clone()),
            coordinator_error: last.map(str::to_string),
            relays: self.relay.status(),
            routing: self
                .routing
                .status(&self.ctrl.peers().cloned().collect::<Vec<_>>()),
            peers,
            log_lines_dropped: crate::logline::dropped(),
            policy: self.firewall.status(),
        })
    }
}
