//! Keeping WireGuard as the agent wants it: samples for the traversal, the
//! desired device (mesh peers with their chosen endpoints, the WG-STUN peer), the
//! minimal change, the mesh address.

use super::*;

impl Agent {
    /// `full`: the map, a relay or the network changed, so the interface,
    /// its address and every peer are checked. Otherwise this is a sample
    /// for the traversal: one WireGuard read, and a write only when a path
    /// changed. Each blocking round trip is a wake-up of an idle agent.
    pub(super) fn reconcile(&mut self, now: Instant, full: bool) -> Result<()> {
        let Some(me) = self.ctrl.me().cloned() else {
            return Ok(());
        };
        let ifname = self.cfg.ifname.clone();
        let wall = SystemTime::now();
        let current = if full {
            if self.backend.exists(&ifname)? {
                Some(self.backend.get(&ifname)?)
            } else {
                None
            }
        } else {
            match self.backend.get(&ifname) {
                Ok(c) => Some(c),
                Err(e) => {
                    // Gone or unreadable: the full path finds out which.
                    self.need_apply = true;
                    return Err(e);
                }
            }
        };
        let peers: Vec<PeerInfo> = self.ctrl.peers().cloned().collect();
        if full {
            // Before WireGuard hears of a new peer: see `firewall`.
            self.enforce_policy(&me, &peers);
        }
        let homes: Vec<(Key, Option<Key>)> = peers.iter().map(|p| (p.public_key, p.home_relay)).collect();
        self.relay.configure(
            self.poll.registry(),
            now,
            self.state.private_key,
            &self.state.relays,
            me.home_relay,
            &homes,
        );
        let keys: Vec<Key> = peers.iter().map(|p| p.public_key).collect();
        if self.msgs.public_key() != self.state.private_key.public_key() {
            self.msgs.rekey(
                self.state.private_key,
                crate::peer::seal::epoch_from_clock(),
                &keys,
            );
        } else {
            self.msgs.set_peers(&keys);
        }
        if self.nat.public_key() != self.state.private_key.public_key() {
            self.nat.rekey(now, self.state.private_key.public_key());
        }
        let ids: Vec<(u64, Key)> = peers.iter().map(|p| (p.id, p.public_key)).collect();
        self.nat.set_peers(now, &ids);
        self.mesh_of = peers.iter().map(|p| (p.public_key, p.mesh_addr)).collect();
        let samples: Vec<(Key, Sample)> = peers
            .iter()
            .filter_map(|p| {
                let st = current
                    .as_ref()?
                    .peers
                    .iter()
                    .find(|s| s.public_key == p.public_key)?;
                Some((
                    p.public_key,
                    Sample {
                        endpoint: st.endpoint,
                        relayed: st
                            .endpoint
                            .is_some_and(|e| self.relay.relay_of_endpoint(&p.public_key, e).is_some()),
                        rx_bytes: st.rx_bytes,
                        tx_bytes: st.tx_bytes,
                        handshake_age: st.last_handshake.and_then(|t| wall.duration_since(t).ok()),
                    },
                ))
            })
            .collect();
        self.nat.handle_samples(now, &samples);
        self.drive_nat(now);
        let mut with_endpoints = Vec::with_capacity(peers.len());
        for p in peers {
            let ep = match self.nat.desired(&p.public_key) {
                // Without a usable relay, WireGuard keeps what it learned.
                Desired::Relay => self.relay.endpoint(&p.public_key),
                Desired::Dial(a) => Some(a),
                Desired::Keep => None,
            };
            with_endpoints.push((p, ep));
        }
        if full {
            let all: Vec<PeerInfo> = with_endpoints.iter().map(|(p, _)| p.clone()).collect();
            self.routing.plan(&mut self.rtnl, &ifname, &all)?;
        }
        let mut desired = paths::device_config(self.state.private_key, self.cfg.listen_port, &with_endpoints);
        self.routing.shape_device(&mut desired);
        if let Some(w) = self.wgstun_peer(now) {
            desired.peers.push(w);
        }
        if let (false, Some(cur)) = (full, &current) {
            let update = reconcile::diff(&desired, cur);
            if !update.is_empty() {
                self.backend
                    .set(&ifname, &update)
                    .with_context(|| format!("configuring {ifname}"))?;
            }
            return Ok(());
        }
        let report = reconcile::apply(self.backend.as_mut(), &ifname, &desired)
            .with_context(|| format!("configuring {ifname}"))?;
        if std::mem::take(&mut self.rebind_endpoints) {
            self.rebind(&ifname, &desired, current.as_ref());
        }
        if report.created {
            log!("agent: created {ifname} ({} backend)", report.backend);
        } else if report.peers_added + report.peers_removed > 0 {
            log!(
                "agent: {ifname}: {} peers added, {} removed",
                report.peers_added,
                report.peers_removed
            );
        }
        self.ensure_address(&ifname, me.mesh_addr)?;
        self.routing.apply(&mut self.rtnl, &ifname)
    }

    /// Sets every peer's endpoint again, unchanged: a userspace WireGuard
    /// keeps sending from the source address it used last (wireguard-go's
    /// sticky sockets), which is dead once that address is gone; a fresh
    /// endpoint makes it pick the source anew. The kernel module re-checks
    /// its cached source by itself, so there this costs one netlink message.
    pub(super) fn rebind(&mut self, ifname: &str, desired: &DeviceConfig, current: Option<&DeviceState>) {
        let update = DeviceUpdate {
            peers: desired
                .peers
                .iter()
                .filter_map(|p| {
                    let ep = p.endpoint.or_else(|| {
                        current?
                            .peers
                            .iter()
                            .find(|s| s.public_key == p.public_key)?
                            .endpoint
                    })?;
                    Some(PeerUpdate {
                        endpoint: Some(ep),
                        ..PeerUpdate::new(p.public_key)
                    })
                })
                .collect(),
            ..DeviceUpdate::default()
        };
        if !update.is_empty()
            && let Err(e) = self.backend.set(ifname, &update)
        {
            log_warn!("agent: re-setting endpoints after an address change: {e:#}");
        }
    }

    /// The WG-STUN server as a WireGuard peer: STUN to 100.64.0.4 through it
    /// tells the public mapping of WireGuard's own socket, and its keepalive
    /// holds that mapping open on the router.
    pub(super) fn wgstun_peer(&mut self, now: Instant) -> Option<PeerConfig> {
        let (w, endpoint) = self.wgstun(now)?;
        if self.ctrl.peers().any(|p| p.public_key == w.public_key) {
            return None;
        }
        Some(PeerConfig {
            public_key: w.public_key,
            preshared_key: None,
            endpoint: Some(endpoint),
            allowed_ips: vec![AllowedIp {
                addr: IpAddr::V4(crate::wgstun::inner::WGSTUN_ADDR),
                cidr: 32,
            }],
            persistent_keepalive: Some(paths::PERSISTENT_KEEPALIVE),
        })
    }

    pub(super) fn ensure_address(&mut self, ifname: &str, addr: Ipv4Addr) -> Result<()> {
        let index = self
            .rtnl
            .link_index(ifname)?
            .with_context(|| format!("interface {ifname} vanished after configuring it"))?;
        let have = self.rtnl.addresses(index)?;
        let want = (IpAddr::V4(addr), MESH_PREFIX_LEN);
        for (a, p) in &have {
            // An old mesh address (from another mesh) would route the prefix wrongly.
            if let IpAddr::V4(v4) = a
                && in_mesh(*v4)
                && (*a, *p) != want
            {
                self.rtnl.del_address(index, *a, *p)?;
            }
        }
        if !have.contains(&want) {
            self.rtnl.add_address(index, want.0, want.1)?;
            log!("agent: {ifname} has address {addr}/{MESH_PREFIX_LEN}");
        }
        let up = self.rtnl.link(ifname)?.is_some_and(|l| l.up);
        if !up {
            self.rtnl.set_link_up(index, true)?;
        }
        Ok(())
    }
}
