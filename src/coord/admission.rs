//! Who may open a coordinator connection, and how much a connection that has
//! not yet said who it is may cost, sans-IO.
//!
//! Anyone who ever saw a join token knows the coordinator's public key and
//! can complete the Noise handshake with a made-up key, so a handshake proves
//! nothing until the first message (Hello or Join) arrives. Until then a
//! connection is *pending*, and pending connections are held to:
//!
//! - per source (an IPv4 address, or an IPv6 /64): at most
//!   [`Limits::per_source_pending`] at once, and a token bucket of *failures*
//!   (a connection that ends before its first message, or is closed soon
//!   after it, costs a token). A source without tokens is refused at accept.
//!   Connections that authenticate cost nothing, and neither do refusals (a
//!   reset at accept is the cheapest answer there is): thousands of nodes
//!   behind one NAT (or one benchmark host) reconnecting after a restart are
//!   held only by the pending cap, never locked out by the rate;
//! - in total: a memory budget for everything pending connections hold
//!   (a fixed cost each plus the bytes they sent). When a new connection or
//!   new bytes do not fit, the oldest pending connections are evicted: a
//!   legitimate node finishes its opening within a round trip, so the oldest
//!   are the ones holding on, and a newcomer always gets in;
//! - and all connections, authenticated or not, by [`Limits::max_connections`].
//!
//! There is no per-source cap on authenticated connections: each one is an
//! enrolled node, and enrolment is the administrator's call.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

#[cfg(test)]
use crate::relay::admission::MAX_TRACKED_SOURCES;
pub use crate::relay::admission::Source;
use crate::relay::admission::SourceBuckets;

/// What a pending connection costs besides the bytes it sent: the channel and
/// its Noise state, the socket, and the map entries that track it. Measured:
/// 600 pending connections that each sent 4 KiB grew a debug build's RSS by
/// 7.5 KB each, so about 3.5 KB; rounded up.
pub const PENDING_OVERHEAD_BYTES: usize = 4 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Pending connections one source may have at once. A node has one; a
    /// NAT full of nodes restarting at once, a few dozen.
    pub per_source_pending: usize,
    /// Sustained failures one source may cause per second.
    pub failures_per_sec: u32,
    /// Failures one source may cause at once above the rate.
    pub failure_burst: u32,
    /// Memory all pending connections together may hold.
    pub pending_budget_bytes: usize,
    /// Connections of every kind.
    pub max_connections: usize,
}

impl Limits {
    /// The coordinator's defaults, for a process allowed `max_connections` descriptors.
    pub fn coordinator(max_connections: usize) -> Limits {
        Limits {
            per_source_pending: 128,
            // A failed opening costs the coordinator a handshake (about 0.1 ms);
            // ten a second from one source is noise, and a misconfigured node
            // retrying with backoff stays far below it.
            failures_per_sec: 10,
            failure_burst: 50,
            // 6 MiB: about 1,500 idle pending connections, or 750 that each
            // sent all they may before authenticating.
            pending_budget_bytes: 6 * 1024 * 1024,
            max_connections,
        }
    }
}

/// Why a connection was refused at accept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The coordinator has `max_connections`.
    Full,
    /// The source already has `per_source_pending` connections pending.
    Pending,
    /// The source failed too often lately.
    Rate,
}

pub type ConnId = usize;

#[derive(Debug)]
struct Pending {
    source: Source,
    deadline: Instant,
    held: usize,
}

#[derive(Debug)]
pub struct Admission {
    limits: Limits,
    failures: SourceBuckets,
    /// Pending connections by id; ids grow with accept time, so the first is the oldest.
    pending: BTreeMap<ConnId, Pending>,
    pending_by_source: HashMap<Source, usize>,
    pending_bytes: usize,
    peak_pending_bytes: usize,
    connections: usize,
}

impl Admission {
    pub fn new(limits: Limits) -> Admission {
        Admission {
            failures: SourceBuckets::new(limits.failures_per_sec, limits.failure_burst),
            limits,
            pending: BTreeMap::new(),
            pending_by_source: HashMap::new(),
            pending_bytes: 0,
            peak_pending_bytes: 0,
            connections: 0,
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// A connection from `source` arrived: may it be opened?
    pub fn check(&mut self, now: Instant, source: Source) -> Result<(), Refusal> {
        if self.connections >= self.limits.max_connections {
            return Err(Refusal::Full);
        }
        let pending = self.pending_by_source.get(&source).copied().unwrap_or(0);
        if pending >= self.limits.per_source_pending {
            return Err(Refusal::Pending);
        }
        if self.limits.failures_per_sec > 0 && !self.failures.has_token(now, source) {
            return Err(Refusal::Rate);
        }
        Ok(())
    }

    /// An admitted connection was opened; it is pending until
    /// [`Admission::authenticated`] or must be closed by `deadline`. Returns
    /// the pending connections to evict so that its fixed cost fits.
    pub fn opened(&mut self, id: ConnId, source: Source, deadline: Instant) -> Vec<ConnId> {
        self.connections += 1;
        *self.pending_by_source.entry(source).or_default() += 1;
        self.pending.insert(
            id,
            Pending {
                source,
                deadline,
                held: 0,
            },
        );
        self.hold(id, PENDING_OVERHEAD_BYTES)
    }

    /// A pending connection holds `bytes` more. Returns the oldest pending
    /// connections to evict (possibly this one) so the budget holds.
    pub fn hold(&mut self, id: ConnId, bytes: usize) -> Vec<ConnId> {
        let Some(p) = self.pending.get_mut(&id) else {
            return Vec::new();
        };
        p.held += bytes;
        self.pending_bytes += bytes;
        let mut evict = Vec::new();
        let mut over = self
            .pending_bytes
            .saturating_sub(self.limits.pending_budget_bytes);
        for (&old, p) in &self.pending {
            if over == 0 {
                break;
            }
            evict.push(old);
            over = over.saturating_sub(p.held);
        }
        // What the evicted hold is released when they are closed; until then
        // the peak shows what was really held.
        self.peak_pending_bytes = self.peak_pending_bytes.max(self.pending_bytes);
        evict
    }

    /// A pending connection sent its first message: from now on it is the
    /// hub's (a node, or refused and closing within the linger).
    pub fn authenticated(&mut self, id: ConnId) {
        self.leave_pending(id);
    }

    /// A connection closed; `failed` charges its source (see the module docs).
    pub fn closed(&mut self, now: Instant, id: ConnId, source: Source, failed: bool) {
        self.leave_pending(id);
        self.connections = self.connections.saturating_sub(1);
        if failed {
            self.charge(now, source);
        }
    }

    pub fn is_pending(&self, id: ConnId) -> bool {
        self.pending.contains_key(&id)
    }

    /// Pending connections whose deadline has passed, oldest first.
    pub fn expired(&self, now: Instant) -> Vec<ConnId> {
        // Deadlines are accept time plus one constant, so they are in id order.
        self.pending
            .iter()
            .take_while(|(_, p)| p.deadline <= now)
            .map(|(&id, _)| id)
            .collect()
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.pending.values().next().map(|p| p.deadline)
    }

    pub fn connections(&self) -> usize {
        self.connections
    }

    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    pub fn pending_bytes(&self) -> usize {
        self.pending_bytes
    }

    pub fn peak_pending_bytes(&self) -> usize {
        self.peak_pending_bytes
    }

    pub fn tracked_sources(&self) -> usize {
        self.failures.tracked()
    }

    fn leave_pending(&mut self, id: ConnId) {
        let Some(p) = self.pending.remove(&id) else {
            return;
        };
        self.pending_bytes -= p.held;
        if let Some(n) = self.pending_by_source.get_mut(&p.source) {
            *n -= 1;
            if *n == 0 {
                self.pending_by_source.remove(&p.source);
            }
        }
    }

    fn charge(&mut self, now: Instant, source: Source) {
        if self.limits.failures_per_sec > 0 {
            // An empty bucket stays empty: the source is refused until it refills.
            self.failures.take(now, source);
        }
    }
}

/// How long after its first message a closed connection still counts as a
/// failure: the hub refuses an unknown key or a bad invite at once and
/// lingers at most [`super::conn::CLOSE_LINGER`] for the node to read why.
pub const REFUSED_WITHIN: Duration = Duration::from_secs(5);

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;

    fn v4(last: u8) -> Source {
        Source::of(IpAddr::from([192, 0, 2, last]))
    }

    fn limits() -> Limits {
        Limits {
            per_source_pending: 1000,
            failures_per_sec: 10,
            failure_burst: 5,
            pending_budget_bytes: 1 << 30,
            max_connections: 1 << 20,
        }
    }

    /// Opens and at once closes a connection from `s`; whether it was admitted.
    fn attempt(a: &mut Admission, now: Instant, id: ConnId, s: Source, failed: bool) -> bool {
        if a.check(now, s).is_err() {
            return false;
        }
        a.opened(id, s, now + Duration::from_secs(10));
        a.closed(now, id, s, failed);
        true
    }

    #[test]
    fn failures_drain_the_bucket_and_successes_do_not() {
        let t0 = Instant::now();
        let mut a = Admission::new(limits());
        // Thousands of connections that authenticate: never refused.
        for id in 0..5000 {
            assert!(attempt(&mut a, t0, id, v4(1), false), "{id}");
        }
        // Failures: the burst, then refused.
        let ok = (0..20)
            .filter(|&i| attempt(&mut a, t0, 10_000 + i, v4(1), true))
            .count();
        assert_eq!(ok, 5);
        assert_eq!(a.check(t0, v4(1)), Err(Refusal::Rate));
        assert!(a.check(t0, v4(2)).is_ok(), "another source is not affected");
        // A source that keeps failing gets the rate (10 a second), no more,
        // however often it knocks.
        let admitted = (1..=2000u64)
            .filter(|&ms| {
                attempt(
                    &mut a,
                    t0 + Duration::from_millis(ms),
                    20_000 + ms as usize,
                    v4(1),
                    true,
                )
            })
            .count();
        assert_eq!(admitted, 20);
        // A pause refills the burst, no more.
        let t1 = t0 + Duration::from_secs(3600);
        let ok = (0..20)
            .filter(|&i| attempt(&mut a, t1, 30_000 + i, v4(1), true))
            .count();
        assert_eq!(ok, 5);
    }

    #[test]
    fn per_source_pending_and_total_caps() {
        let now = Instant::now();
        let mut a = Admission::new(Limits {
            per_source_pending: 2,
            max_connections: 3,
            ..limits()
        });
        let d = now + Duration::from_secs(10);
        assert!(a.check(now, v4(1)).is_ok());
        a.opened(1, v4(1), d);
        a.opened(2, v4(1), d);
        assert_eq!(a.check(now, v4(1)), Err(Refusal::Pending));
        a.authenticated(1);
        assert!(
            a.check(now, v4(1)).is_ok(),
            "an authenticated one no longer counts"
        );
        a.opened(3, v4(2), d);
        assert_eq!(a.check(now, v4(3)), Err(Refusal::Full));
        a.closed(now, 1, v4(1), false);
        assert!(a.check(now, v4(3)).is_ok());
        a.closed(now, 2, v4(1), false);
        a.closed(now, 3, v4(2), false);
        assert_eq!((a.connections(), a.pending(), a.pending_bytes()), (0, 0, 0));
        assert!(a.pending_by_source.is_empty());
    }

    #[test]
    fn the_budget_evicts_the_oldest_pending_first() {
        let now = Instant::now();
        let budget = 10 * PENDING_OVERHEAD_BYTES;
        let mut a = Admission::new(Limits {
            pending_budget_bytes: budget,
            ..limits()
        });
        let d = now + Duration::from_secs(10);
        for id in 0..10 {
            assert!(a.opened(id, v4(id as u8), d).is_empty());
        }
        // One more does not fit: the oldest goes.
        assert_eq!(a.opened(10, v4(10), d), vec![0]);
        a.closed(now, 0, v4(0), true);
        // A connection that sends a lot evicts enough of the oldest, and
        // itself when nothing older is left to give way.
        let evicted = a.hold(5, 3 * PENDING_OVERHEAD_BYTES);
        assert_eq!(evicted, vec![1, 2, 3]);
        for id in evicted {
            a.closed(now, id, v4(id as u8), true);
        }
        assert!(a.pending_bytes() <= budget);
        let all: Vec<ConnId> = a.pending.keys().copied().collect();
        assert_eq!(a.hold(10, budget), all, "it evicts everyone including itself");
        assert!(a.peak_pending_bytes() > budget);
    }

    #[test]
    fn deadlines_expire_oldest_first() {
        let t0 = Instant::now();
        let mut a = Admission::new(limits());
        for id in 0..3 {
            a.opened(id, v4(1), t0 + Duration::from_secs(id as u64 + 1));
        }
        assert_eq!(a.next_deadline(), Some(t0 + Duration::from_secs(1)));
        assert_eq!(a.expired(t0 + Duration::from_secs(2)), vec![0, 1]);
        a.authenticated(0);
        assert_eq!(a.expired(t0 + Duration::from_secs(2)), vec![1]);
    }

    #[test]
    fn the_bucket_table_is_bounded() {
        let t0 = Instant::now();
        let mut a = Admission::new(limits());
        for i in 0..(MAX_TRACKED_SOURCES as u32 * 2) {
            a.charge(t0, Source::V4(i));
            assert!(a.tracked_sources() <= MAX_TRACKED_SOURCES);
        }
        assert!(a.failures.consistent());
    }
}
