//! What a relay exports to Prometheus: its [`RelayStats`], the counters its
//! refusal summary line and the tests read, as published each loop turn.

use super::server::RelayStats;
use crate::metrics::{Exposition, Kind};

pub fn render(e: &mut Exposition, s: &RelayStats) {
    let g =
        |e: &mut Exposition, name: &str, help: &str, v: usize| e.single(name, Kind::Gauge, help, v as f64);
    g(
        e,
        "warren_relay_clients",
        "Connections open, registered or in their handshake.",
        s.clients,
    );
    g(
        e,
        "warren_relay_clients_registered",
        "Clients registered with their key.",
        s.registered,
    );
    g(
        e,
        "warren_relay_clients_pending",
        "Connections still in their handshake.",
        s.pending,
    );
    g(
        e,
        "warren_relay_queued_bytes",
        "Bytes queued for all clients now.",
        s.total_queued_bytes,
    );
    g(
        e,
        "warren_relay_queued_bytes_max",
        "The most bytes ever queued for all clients together.",
        s.max_total_queued_bytes,
    );
    g(
        e,
        "warren_relay_client_queued_bytes_max",
        "The most bytes ever queued for one client.",
        s.max_queued_bytes,
    );
    g(
        e,
        "warren_relay_queue_budget_bytes",
        "Bytes all queues together may hold.",
        s.queue_budget_bytes,
    );
    e.single(
        "warren_relay_forwarded_total",
        Kind::Counter,
        "Frames forwarded from one client to another.",
        s.forwarded as f64,
    );
    e.family(
        "warren_relay_dropped_total",
        Kind::Counter,
        "Frames dropped, by reason: the receiver's queue full, the sender over its rate, no such peer, all queues at the budget.",
    )
    .sample(&[("reason", "queue_full")], s.dropped_queue_full as f64)
    .sample(&[("reason", "rate")], s.dropped_rate as f64)
    .sample(&[("reason", "no_peer")], s.dropped_no_peer as f64)
    .sample(&[("reason", "budget")], s.dropped_budget as f64);
    e.family(
        "warren_relay_refused_total",
        Kind::Counter,
        "Connections refused, by reason: relay full, removed key, source too fast, too many handshakes or connections from the source.",
    )
    .sample(&[("reason", "full")], s.rejected_full as f64)
    .sample(&[("reason", "removed")], s.refused_removed as f64)
    .sample(&[("reason", "source_rate")], s.refused_rate as f64)
    .sample(&[("reason", "source_pending")], s.refused_pending as f64)
    .sample(&[("reason", "source_full")], s.refused_source_full as f64);
    e.family(
        "warren_relay_closed_total",
        Kind::Counter,
        "Connections closed by the relay, by reason: bad input, no queue room to answer the handshake, \
         pushed out of the pending pool, any reason before registering, replaced by a newer one of the key.",
    )
    .sample(&[("reason", "bad_input")], s.closed_bad_input as f64)
    .sample(&[("reason", "budget")], s.closed_budget as f64)
    .sample(&[("reason", "evicted_pending")], s.evicted_pending as f64)
    .sample(&[("reason", "unregistered")], s.closed_unregistered as f64)
    .sample(&[("reason", "replaced")], s.replaced as f64);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stats_are_what_is_exported() {
        let s = RelayStats {
            clients: 3,
            forwarded: 42,
            dropped_rate: 2,
            refused_rate: 5,
            ..RelayStats::default()
        };
        let mut e = Exposition::new();
        render(&mut e, &s);
        let text = e.finish();
        for want in [
            "warren_relay_clients 3\n",
            "warren_relay_forwarded_total 42\n",
            "warren_relay_dropped_total{reason=\"rate\"} 2\n",
            "warren_relay_refused_total{reason=\"source_rate\"} 5\n",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
    }
}
