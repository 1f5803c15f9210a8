//! When the peer map's changes go out to the connected nodes, sans-IO.
//!
//! Every change reaches every connected node, so N changes sent one by one
//! cost N × N messages. A coordinator restart is exactly that: N nodes come
//! back within seconds and each return is a change ("online") the others
//! must hear. So a change goes out at once when the mesh was quiet (a rename
//! still reaches everyone in one round trip); while changes keep coming,
//! deltas go out at most once per interval, and the interval doubles with
//! each delta sent while busy, from [`MIN_INTERVAL`] to [`MAX_INTERVAL`]. A
//! broadcast costs a seal and a write per connection (about 10 µs each, so
//! 100 ms for 10,000 nodes): 200 ms apart, a restart's herd spent about half
//! the coordinator's time on them (10,000 nodes back in 230 s, 70.9 s of its
//! CPU); 2 s apart, a twentieth.

use std::time::{Duration, Instant};

/// Least time between two deltas, and the interval after a quiet while.
/// Within the coordinator's budget for a change reaching every node (500 ms
/// p99), with the sealing and writing to 10,000 connections on top.
pub const MIN_INTERVAL: Duration = Duration::from_millis(200);
/// The interval at most, while changes keep coming: how late a change may
/// reach the others during a herd.
pub const MAX_INTERVAL: Duration = Duration::from_secs(2);

#[derive(Debug)]
pub struct Pacer {
    /// When the last delta went out.
    last: Option<Instant>,
    interval: Duration,
}

impl Default for Pacer {
    fn default() -> Pacer {
        Pacer {
            last: None,
            interval: MIN_INTERVAL,
        }
    }
}

impl Pacer {
    /// Whether changes waiting now may go out now.
    pub fn due(&self, now: Instant) -> bool {
        self.last.is_none_or(|t| now >= t + self.interval)
    }

    /// A delta went out. One that follows the last within twice the
    /// interval means changes keep coming: the next waits twice as long.
    pub fn sent(&mut self, now: Instant) {
        let busy = self.last.is_some_and(|t| now < t + 2 * self.interval);
        self.interval = if busy {
            (self.interval * 2).min(MAX_INTERVAL)
        } else {
            MIN_INTERVAL
        };
        self.last = Some(now);
    }

    /// When changes that are waiting may go out; `None` when nothing waits
    /// or nothing was ever sent (then they go out at once).
    pub fn next(&self, waiting: bool) -> Option<Instant> {
        self.last.filter(|_| waiting).map(|t| t + self.interval)
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
    fn a_herd_of_changes_goes_out_in_few_deltas_none_waiting_longer_than_the_longest_interval() {
        let t0 = Instant::now();
        // 10,000 returns over 20 s, one every 2 ms.
        let changes: Vec<Duration> = (0..10_000u64).map(|i| Duration::from_millis(2 * i)).collect();
        let sent = run(t0, &changes, Duration::from_secs(30));
        assert_eq!(sent.len(), changes.len(), "every change went out");
        let mut deltas: Vec<Duration> = sent.iter().map(|&(_, at)| at).collect();
        deltas.dedup();
        // Doubling from 200 ms to 2 s takes four deltas; then one per 2 s.
        let most = (20_000 / MAX_INTERVAL.as_millis() + 6) as usize;
        assert!(
            deltas.len() <= most,
            "{} deltas for 20 s, at most {most}",
            deltas.len()
        );
        assert!(
            deltas.windows(2).all(|w| w[1] - w[0] >= MIN_INTERVAL),
            "two deltas closer than the least interval"
        );
        let longest = sent.iter().map(|&(c, at)| at - c).max().unwrap();
        assert!(longest <= MAX_INTERVAL, "a change waited {longest:?}");
    }

    #[test]
    fn after_a_herd_a_quiet_while_makes_the_next_change_go_out_at_once_again() {
        let t0 = Instant::now();
        let mut changes: Vec<Duration> = (0..1_000u64).map(|i| Duration::from_millis(10 * i)).collect();
        // The herd ends at 10 s; one change at 20 s, and one shortly after it.
        changes.push(Duration::from_secs(20));
        changes.push(Duration::from_millis(20_050));
        let sent = run(t0, &changes, Duration::from_secs(30));
        assert_eq!(sent.len(), changes.len());
        let late: Vec<(Duration, Duration)> = sent
            .iter()
            .copied()
            .filter(|&(c, _)| c >= Duration::from_secs(20))
            .collect();
        assert_eq!(
            late,
            [
                (Duration::from_secs(20), Duration::from_secs(20)),
                (Duration::from_millis(20_050), Duration::from_millis(20_200))
            ],
            "at once after the quiet while, then the least interval"
        );
    }
}
