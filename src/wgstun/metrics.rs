//! What WG-STUN exports to Prometheus: the responder's and the plain STUN
//! server's counters, the same ones its stats line prints, published by its
//! loop each turn into a [`StatsHandle`].

use std::sync::{Arc, Mutex};

use super::responder::Stats;
use crate::metrics::{Exposition, Kind};
use crate::stun::server::StunStats;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub wg: Stats,
    pub stun: StunStats,
    pub sessions: usize,
    pub send_errors: u64,
}

/// The loop's latest [`Snapshot`], for a metrics thread.
#[derive(Clone, Default)]
pub struct StatsHandle(pub(super) Arc<Mutex<Snapshot>>);

impl StatsHandle {
    pub fn get(&self) -> Snapshot {
        self.0.lock().map(|s| *s).unwrap_or_default()
    }
}

pub fn render(e: &mut Exposition, s: &Snapshot) {
    let w = &s.wg;
    e.single(
        "warren_wgstun_sessions",
        Kind::Gauge,
        "WireGuard sessions held now.",
        s.sessions as f64,
    );
    e.family(
        "warren_wgstun_answers_total",
        Kind::Counter,
        "STUN questions answered: inside the tunnel (wgstun), echo inside the tunnel, plain STUN outside it.",
    )
    .sample(&[("kind", "wgstun")], w.stun_answered as f64)
    .sample(&[("kind", "echo")], w.echo_answered as f64)
    .sample(&[("kind", "stun")], s.stun.answered as f64);
    e.single(
        "warren_wgstun_handshakes_total",
        Kind::Counter,
        "WireGuard handshakes completed.",
        w.handshakes as f64,
    );
    e.family(
        "warren_wgstun_refused_total",
        Kind::Counter,
        "Datagrams refused, by reason (the counters of the stats line).",
    )
    .sample(&[("reason", "source_over_budget")], w.source_over_budget as f64)
    .sample(&[("reason", "cookie_reply")], w.cookie_replies as f64)
    .sample(&[("reason", "not_wireguard")], w.not_wireguard as f64)
    .sample(&[("reason", "bad_mac")], w.bad_mac as f64)
    .sample(&[("reason", "handshake_rejected")], w.handshake_rejected as f64)
    .sample(&[("reason", "unknown_session")], w.unknown_session as f64)
    .sample(&[("reason", "decrypt_failed")], w.decrypt_failed as f64)
    .sample(&[("reason", "inner_malformed")], w.inner_malformed as f64)
    .sample(&[("reason", "inner_bad_checksum")], w.inner_bad_checksum as f64)
    .sample(&[("reason", "inner_fragment")], w.inner_fragment as f64)
    .sample(&[("reason", "inner_not_for_us")], w.inner_not_for_us as f64)
    .sample(&[("reason", "inner_not_served")], w.inner_not_served as f64)
    .sample(&[("reason", "transmit_overflow")], w.transmit_overflow as f64);
    e.family(
        "warren_wgstun_stun_refused_total",
        Kind::Counter,
        "Plain STUN datagrams not answered, by reason.",
    )
    .sample(&[("reason", "malformed")], s.stun.malformed as f64)
    .sample(&[("reason", "bad_fingerprint")], s.stun.bad_fingerprint as f64)
    .sample(&[("reason", "ignored")], s.stun.ignored as f64)
    .sample(&[("reason", "rate_limited")], s.stun.rate_limited as f64);
    e.family(
        "warren_wgstun_sessions_ended_total",
        Kind::Counter,
        "Sessions ended, by how.",
    )
    .sample(&[("how", "evicted")], w.sessions_evicted as f64)
    .sample(&[("how", "expired")], w.sessions_expired as f64);
    e.single(
        "warren_wgstun_send_errors_total",
        Kind::Counter,
        "Answers the socket would not send.",
        s.send_errors as f64,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stats_are_what_is_exported() {
        let mut s = Snapshot::default();
        s.wg.stun_answered = 4;
        s.wg.bad_mac = 9;
        s.stun.answered = 2;
        let mut e = Exposition::new();
        render(&mut e, &s);
        let text = e.finish();
        for want in [
            "warren_wgstun_answers_total{kind=\"wgstun\"} 4\n",
            "warren_wgstun_answers_total{kind=\"stun\"} 2\n",
            "warren_wgstun_refused_total{reason=\"bad_mac\"} 9\n",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
    }
}
