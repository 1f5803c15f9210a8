//! When the peer map's changes go out to the connected nodes, sans-IO.
//!
//! Every change reaches every connected node, so N changes sent one by one
//! cost N × N messages. A coordinator restart is exactly that: N nodes come
//! back within seconds and each return is a change ("online") the others
//! must hear. So changes go out at once when the mesh was quiet (a rename
//! still reaches everyone in one round trip) and at most once per
//! [`DELTA_INTERVAL`] while changes keep coming: a herd of returns costs each
//! node a few deltas a second, each carrying many returns, whatever N is.

use std::time::{Duration, Instant};

/// Least time between two deltas. Within the coordinator's budget for a
/// change reaching every node (500 ms p99, with the sealing and writing to
/// 10,000 connections on top), and long enough that a broadcast to 10,000
/// connections is a small part of each interval.
pub const DELTA_INTERVAL: Duration = Duration::from_millis(200);

#[derive(Debug, Default)]
pub struct Pacer {
    /// When the last delta went out.
    last: Option<Instant>,
}

impl Pacer {
    /// Whether changes waiting now may go out now.
    pub fn due(&self, now: Instant) -> bool {
        self.last.is_none_or(|t| now >= t + DELTA_INTERVAL)
    }

    /// A delta went out.
    pub fn sent(&mut self, now: Instant) {
        self.last = Some(now);
    }

    /// When changes that are waiting may go out; `None` when nothing waits
    /// or nothing was ever sent (then they go out at once).
    pub fn next(&self, waiting: bool) -> Option<Instant> {
        self.last.filter(|_| waiting).map(|t| t + DELTA_INTERVAL)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Drives the pacer as the hub does: a change may arrive every `step`,
    /// and whatever waits goes out when due. Returns when each change went out.
    fn run(t0: Instant, changes: &[Duration], until: Duration) -> Vec<(Duration, Duration)> {
        let mut p = Pacer::default();
        let mut waiting: Vec<Duration> = Vec::new();
        let mut out = Vec::new();
        let mut next = changes.iter().peekable();
        let mut now = t0;
        while now <= t0 + until {
            while next.peek().is_some_and(|&&c| t0 + c <= now) {
                waiting.push(*next.next().unwrap());
            }
            if !waiting.is_empty() && p.due(now) {
                p.sent(now);
                out.extend(waiting.drain(..).map(|c| (c, now - t0)));
            }
            // The loop sleeps until the next change or the pacer's deadline.
            let wake = [next.peek().map(|&&c| t0 + c), p.next(!waiting.is_empty())];
            now = wake
                .into_iter()
                .flatten()
                .min()
                .unwrap_or(t0 + until + Duration::from_secs(1));
        }
        out
    }

    #[test]
    fn a_change_in_a_quiet_mesh_goes_out_at_once() {
        let t0 = Instant::now();
        let sent = run(
            t0,
            &[Duration::from_secs(1), Duration::from_secs(5)],
            Duration::from_secs(10),
        );
        assert_eq!(
            sent,
            [
                (Duration::from_secs(1), Duration::from_secs(1)),
                (Duration::from_secs(5), Duration::from_secs(5))
            ]
        );
    }

    #[test]
    fn a_herd_of_changes_goes_out_in_few_deltas_none_waiting_longer_than_the_interval() {
        let t0 = Instant::now();
        // 10,000 returns over 20 s, one every 2 ms.
        let changes: Vec<Duration> = (0..10_000u64).map(|i| Duration::from_millis(2 * i)).collect();
        let sent = run(t0, &changes, Duration::from_secs(30));
        assert_eq!(sent.len(), changes.len(), "every change went out");
        let mut deltas: Vec<Duration> = sent.iter().map(|&(_, at)| at).collect();
        deltas.dedup();
        let most = (20_000 / DELTA_INTERVAL.as_millis() + 1) as usize;
        assert!(
            deltas.len() <= most,
            "{} deltas for 20 s, at most {most}",
            deltas.len()
        );
        assert!(
            deltas.windows(2).all(|w| w[1] - w[0] >= DELTA_INTERVAL),
            "two deltas closer than the interval"
        );
        let longest = sent.iter().map(|&(c, at)| at - c).max().unwrap();
        assert!(longest <= DELTA_INTERVAL, "a change waited {longest:?}");
    }
}
