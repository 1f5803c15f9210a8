//! This machine's network as the agent follows it: local candidates, netlink
//! changes (addresses, links, routes), the STUN servers and the host names the
//! resolver answers.

use super::*;

impl Agent {
    /// Our local candidates (sealed to peers, never to a server): every
    /// address of every up interface outside the mesh.
    pub(super) fn update_candidates(&mut self, now: Instant) {
        let local = candidate::local(
            &crate::ifaddrs::addresses(),
            &self.cfg.ifname,
            self.cfg.listen_port,
            self.direct.port,
        );
        self.nat.set_local(now, local);
    }

    /// The WG-STUN server to keep as a peer and ask, and its plain STUN.
    /// None while its host name is being resolved: `resolved` reconciles again.
    pub(super) fn wgstun(&mut self, now: Instant) -> Option<(WgStunInfo, SocketAddr)> {
        let w = self.state.wgstun.first()?.clone();
        match self.resolver.lookup(now, &w.endpoint) {
            Lookup::Ready(ep) => Some((w, ep)),
            Lookup::Pending | Lookup::Failed(_) => None,
        }
    }

    /// Also called whenever the resolver has answers: one that was pending here counts then.
    pub(super) fn configure_stun(&mut self, now: Instant) {
        let (tunnel, plain) = match self.state.wgstun.first() {
            Some(w) => (
                Some(direct::WGSTUN_STUN),
                w.stun
                    .as_deref()
                    .and_then(|s| match self.resolver.lookup(now, s) {
                        Lookup::Ready(a) => Some(a),
                        Lookup::Pending | Lookup::Failed(_) => None,
                    }),
            ),
            None => (None, None),
        };
        self.nat.set_stun_servers(now, tunnel, plain);
    }

    /// The resolver's worker answered: retry what waited for it.
    pub(super) fn resolved(&mut self, now: Instant) {
        if !self.resolver.drain(now) {
            return;
        }
        if let Some(server) = self.dial_waiting.take()
            && self.tcp.is_none()
            && matches!(self.ctrl.phase(), Phase::Connecting { server: s, .. } if *s == server)
        {
            self.dial(now, &server);
        }
        self.relay.resolved(self.poll.registry(), &mut self.resolver, now);
        self.configure_stun(now);
        // The WG-STUN peer's endpoint may be known now.
        self.need_apply = true;
    }

    /// Port mapping asks the IPv4 default route's next hop.
    pub(super) fn refresh_router(&mut self, now: Instant) {
        let router = match self.rtnl.default_gateway_v4() {
            Ok(r) => r.map(|(g, _)| g),
            Err(e) => {
                log_warn!("agent: reading the default route: {e:#}");
                return;
            }
        };
        self.portmap.set_router(self.poll.registry(), now, router);
    }

    pub(super) fn net_changed(&mut self, now: Instant) {
        match self.monitor.read_events() {
            Ok(evs) => {
                let mesh_index = self.rtnl.link_index(&self.cfg.ifname).ok().flatten();
                let ours = |i: &u32| Some(*i) == mesh_index;
                let mut addresses = false;
                let mut routes = false;
                let mut removed = Vec::new();
                for e in &evs {
                    match e {
                        NetEvent::AddressAdded { index, .. } => addresses |= !ours(index),
                        NetEvent::AddressRemoved { index, addr, .. } => {
                            addresses |= !ours(index);
                            if !ours(index) {
                                removed.push(*addr);
                            }
                        }
                        NetEvent::LinkChanged(l) => addresses |= !ours(&l.index),
                        NetEvent::LinkRemoved { index, .. } => addresses |= !ours(index),
                        NetEvent::RouteAdded(r) | NetEvent::RouteRemoved(r) => {
                            routes |= !r.oif.as_ref().is_some_and(ours)
                        }
                        NetEvent::Resync => addresses = true,
                    }
                }
                if !removed.is_empty() {
                    self.rebind_endpoints = true;
                    self.need_apply = true;
                }
                for addr in removed {
                    let bound = self
                        .tcp
                        .as_ref()
                        .and_then(|s| s.local_addr().ok())
                        .is_some_and(|a| a.ip() == addr);
                    if bound {
                        self.lost_tcp(now, &format!("local address {addr} went away"));
                    }
                    self.relay
                        .address_removed(self.poll.registry(), &mut self.resolver, now, addr);
                }
                if addresses {
                    self.update_candidates(now);
                }
                if addresses || routes {
                    self.refresh_router(now);
                }
                if routes && !addresses {
                    self.nat.network_changed(now);
                }
            }
            Err(e) => log_warn!("agent: reading network changes: {e:#}"),
        }
    }
}
