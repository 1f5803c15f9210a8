//! The Prometheus endpoint on the agent's loop: a scrape is answered in the
//! turn its request completes, from the same status `warren status` shows.

use super::*;

impl Agent {
    pub(super) fn serve_metrics(&mut self, now: Instant) {
        if let Some(m) = self.metrics.as_mut() {
            m.handle_timeout(self.poll.registry(), now);
        }
        if !self.metrics.as_ref().is_some_and(|m| m.wants_body(now)) {
            return;
        }
        let body = self.metrics_text();
        if let Some(m) = self.metrics.as_mut() {
            m.answer(self.poll.registry(), now, &body);
        }
    }

    fn metrics_text(&mut self) -> String {
        let status = match self.status() {
            Ok(s) => s,
            Err(e) => {
                // Without WireGuard's view there are no peers to report;
                // the scrape still answers with what the agent knows.
                log_warn!("agent: metrics: reading WireGuard: {e:#}");
                Status {
                    name: self.ctrl.me().map(|m| m.name.clone()),
                    mesh_addr: self.ctrl.me().map(|m| m.mesh_addr),
                    public_key: self.state.private_key.public_key(),
                    interface: self.cfg.ifname.clone(),
                    backend: self.backend.kind().to_string(),
                    coordinator: String::new(),
                    coordinator_detail: None,
                    coordinator_error: None,
                    relays: self.relay.status(),
                    peers: Vec::new(),
                    log_lines_dropped: crate::logline::dropped(),
                    routing: None,
                    policy: self.firewall.status(),
                }
            }
        };
        let counters = Counters {
            relay_bytes_sent: self.relay.bytes_sent,
            relay_bytes_received: self.relay.bytes_received,
            relay_muted_drops: self.relay.muted_drops,
            checks: self.nat.check_counts(),
            ..self.counters
        };
        super::super::metrics::render(&status, &self.netcheck(), &counters)
    }
}
