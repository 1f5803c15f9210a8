//! What the coordinator exports to Prometheus: connected nodes from the hub,
//! and the admission refusals and stranger endings its summary line counts
//! ([`Counts`]), published by its loop each turn into a [`StatsHandle`].

use std::sync::{Arc, Mutex};

use super::tally::Counts;
use crate::metrics::{Exposition, Kind};

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Nodes with an authenticated connection.
    pub nodes_connected: usize,
    /// Node connections of any kind, authenticated or not yet.
    pub connections: usize,
    pub tally: Counts,
}

/// The loop's latest [`Snapshot`], for a metrics thread.
#[derive(Clone, Default)]
pub struct StatsHandle(pub(super) Arc<Mutex<Snapshot>>);

impl StatsHandle {
    pub fn get(&self) -> Snapshot {
        self.0.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

pub fn render(e: &mut Exposition, s: &Snapshot) {
    let t = &s.tally;
    e.single(
        "warren_coordinator_nodes_connected",
        Kind::Gauge,
        "Nodes connected and authenticated.",
        s.nodes_connected as f64,
    );
    e.single(
        "warren_coordinator_connections",
        Kind::Gauge,
        "Node connections open, authenticated or not yet.",
        s.connections as f64,
    );
    e.family(
        "warren_coordinator_refused_total",
        Kind::Counter,
        "Connections refused by admission: coordinator full, source with too many pending, source failing too often.",
    )
    .sample(&[("reason", "full")], t.refused_full as f64)
    .sample(&[("reason", "source_pending")], t.refused_pending as f64)
    .sample(&[("reason", "source_rate")], t.refused_rate as f64);
    e.family(
        "warren_coordinator_closed_total",
        Kind::Counter,
        "Connections closed before they authenticated, by reason (as in the summary line).",
    )
    .sample(&[("reason", "bad_frame")], t.bad_frames as f64)
    .sample(&[("reason", "bad_opening")], t.bad_openings as f64)
    .sample(&[("reason", "fragment_before_hello")], t.fragments as f64)
    .sample(&[("reason", "too_much_before_hello")], t.too_much as f64)
    .sample(&[("reason", "message_too_long")], t.too_long as f64)
    .sample(&[("reason", "handshake_failed")], t.refused_by_channel as f64)
    .sample(&[("reason", "timed_out")], t.timed_out as f64)
    .sample(&[("reason", "evicted")], t.evicted as f64)
    .sample(&[("reason", "hung_up")], t.hung_up as f64)
    .sample(&[("reason", "refused_key_or_invite")], t.refused_by_hub as f64);
    e.single(
        "warren_coordinator_accept_errors_total",
        Kind::Counter,
        "Errors accepting a connection.",
        t.accept_errors as f64,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tally_is_what_is_exported() {
        let s = Snapshot {
            nodes_connected: 2,
            connections: 5,
            tally: Counts {
                refused_rate: 7,
                timed_out: 1,
                ..Counts::default()
            },
        };
        let mut e = Exposition::new();
        render(&mut e, &s);
        let text = e.finish();
        for want in [
            "warren_coordinator_nodes_connected 2\n",
            "warren_coordinator_refused_total{reason=\"source_rate\"} 7\n",
            "warren_coordinator_closed_total{reason=\"timed_out\"} 1\n",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
    }
}
