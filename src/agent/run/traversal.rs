//! The NAT traversal core in the loop: check-socket input in, sealed transmits
//! out (relay or check socket), path events logged, endpoints and relay mutes
//! applied when the traversal changes its mind.

use super::*;

impl Agent {
    /// The peer's check socket on its direct path, if it is direct.
    pub(super) fn direct_check_addr(&self, now: Instant, peer: &Key) -> Option<SocketAddr> {
        self.nat
            .status(now, peer)
            .filter(|s| s.direct)
            .and_then(|s| s.remote_check)
    }

    /// A check or tunnel socket is readable.
    pub(super) fn direct_ready(&mut self, now: Instant, token: Token) {
        let received = self
            .direct
            .ready(now, token, &mut self.nat, &mut self.msgs, &self.mesh_of);
        for r in received {
            match r {
                Received::Traversal { from, via, msg } => self.nat.handle_message(now, from, via, msg),
                Received::Other { from, payload, src } => {
                    // The answer goes back where the ping came from: that
                    // mapping is open, whatever the peer's candidates say.
                    if let Some(src) = src {
                        self.reply_to.insert(from, src);
                    }
                    let _ = self.msgs.handle_payload(now, from, &payload);
                }
            }
        }
    }

    /// Sends what the traversal queued and acts on what it decided.
    pub(super) fn drive_nat(&mut self, now: Instant) {
        while let Some(req) = self.nat.poll_stun(now) {
            self.direct.send_stun(req.socket, req.to, &req.bytes);
        }
        while let Some(t) = self.nat.poll_transmit() {
            match t.via {
                Via::Relay => match self.msgs.seal_payload(&t.peer, &t.msg.encode()) {
                    Ok(sealed) => {
                        self.relay.send_sealed(now, &t.peer, &sealed);
                    }
                    Err(e) => log_warn!("agent: sealing for {}: {e:#}", self.peer_label(&t.peer)),
                },
                via => {
                    // The peer's check port is its own (another WireGuard port, or a
                    // fallback port); its local candidates tell it.
                    let port = self.nat.peer_check_port(&t.peer).unwrap_or(self.direct.port);
                    let tunnel_to = self.mesh_of.get(&t.peer).map(|m| SocketAddr::from((*m, port)));
                    self.direct.send(&mut self.msgs, &t.peer, via, &t.msg, tunnel_to);
                }
            }
        }
        self.relay.flush(now);
        while let Some(ev) = self.nat.poll_event() {
            // An event is a change between direct and not direct.
            if ev.to.starts_with("direct") {
                self.counters.upgrades += 1;
            } else {
                self.counters.downgrades += 1;
            }
            let why = if ev.why.is_empty() {
                String::new()
            } else {
                format!(": {}", ev.why)
            };
            log!(
                "agent: peer {}: {} -> {}{why}",
                self.peer_label(&ev.peer),
                ev.from,
                ev.to
            );
        }
        let snapshot: Vec<(Key, Desired, Mute)> = self
            .mesh_of
            .keys()
            .map(|k| (*k, self.nat.desired(k), self.nat.mute(k)))
            .collect();
        let mut sorted = snapshot;
        sorted.sort_by_key(|(k, _, _)| k.0);
        if sorted != self.applied {
            let muted: HashMap<Key, Mute> = sorted
                .iter()
                .filter(|(_, _, m)| *m != Mute::None)
                .map(|(k, _, m)| (*k, *m))
                .collect();
            self.relay.set_muted(muted);
            let endpoints_changed = sorted.len() != self.applied.len()
                || sorted
                    .iter()
                    .zip(&self.applied)
                    .any(|(a, b)| a.0 != b.0 || a.1 != b.1);
            self.applied = sorted;
            if endpoints_changed {
                // Applied by the next sample, which also proves or refutes it.
                self.nat.sample_soon();
            }
        }
    }
}
