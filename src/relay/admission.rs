//! Who may open a relay connection, per source address, sans-IO.
//!
//! Every TCP connection costs the relay a slot of `max_clients`, a file
//! descriptor and, once it sends its first handshake message, two X25519
//! operations. Without a per-source limit one host could fill the relay with
//! half-open connections or keep a core busy answering handshakes. Three
//! limits, each per source (an IPv4 address, or an IPv6 /64, which one host
//! usually holds in full):
//!
//! - new connections: a token bucket (sustained rate plus burst);
//! - connections that have not finished the handshake yet;
//! - connections in total.
//!
//! Many nodes behind one carrier-grade NAT share an address, so the defaults
//! are generous; refused clients retry with backoff.
//!
//! The bucket table is bounded: past [`MAX_TRACKED_SOURCES`] the source seen
//! longest ago is forgotten. Forgetting only ever errs towards admitting (a
//! forgotten source starts with a full bucket). The per-source connection
//! counts are kept apart and stay exact; they only exist for sources with
//! open connections, so the relay's `max_clients` bounds them.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::time::Instant;

/// Sources whose connection-rate bucket is remembered. Each entry is about
/// 100 bytes, so the table stays under a megabyte however many addresses
/// knock.
pub const MAX_TRACKED_SOURCES: usize = 8192;

/// Per-source limits; 0 in a field means no limit of that kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SourceLimits {
    /// Sustained new connections per second from one source.
    pub connects_per_sec: u32,
    /// New connections one source may open at once above the rate.
    pub connect_burst: u32,
    /// Connections from one source still in the handshake. A legitimate
    /// client has one; a NAT full of nodes restarting at once has a few dozen.
    pub max_pending: usize,
    /// Connections from one source in total, so one host cannot take every
    /// slot of `max_clients` by completing handshakes with made-up keys.
    pub max_clients: usize,
}

impl SourceLimits {
    /// Defaults for a relay of `max_clients`: one source may hold a quarter
    /// of it, or up to 64 clients on a small relay (a household behind one address).
    pub fn for_relay(max_clients: usize) -> SourceLimits {
        SourceLimits {
            // A handshake costs the relay about 0.1 ms of CPU: 50 a second
            // from one source is half a percent of a core.
            connects_per_sec: 50,
            // All nodes behind one NAT reconnecting after a relay restart.
            connect_burst: 200,
            max_pending: 128,
            max_clients: (max_clients / 4).max(max_clients.min(64)).max(1),
        }
    }

    /// No per-source limits at all (benchmarks that connect thousands of clients from one address).
    pub fn unlimited() -> SourceLimits {
        SourceLimits {
            connects_per_sec: 0,
            connect_burst: 0,
            max_pending: 0,
            max_clients: 0,
        }
    }
}

/// Why a connection was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The source opens connections faster than its rate.
    Rate,
    /// The source already has `max_pending` handshakes in progress.
    Pending,
    /// The source already has `max_clients` connections.
    Clients,
}

/// The unit a limit applies to: an IPv4 address or an IPv6 /64.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Source {
    V4(u32),
    V6Prefix(u64),
}

impl Source {
    pub fn of(ip: IpAddr) -> Source {
        match ip {
            IpAddr::V4(v4) => Source::V4(v4.into()),
            // A dual-stack listener reports IPv4 clients as ::ffff:a.b.c.d.
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Source::V4(v4.into()),
                None => Source::V6Prefix((u128::from(v6) >> 64) as u64),
            },
        }
    }
}

/// Tokens are kept in thousandths so that rates below one per second work
/// without floating point.
const MILLI: u64 = 1000;

#[derive(Debug)]
struct Bucket {
    milli_tokens: u64,
    refilled: Instant,
    /// Position in the recency order.
    stamp: u64,
}

/// A token bucket per source, for the relay's connects and the
/// coordinator's failures. At most [`MAX_TRACKED_SOURCES`] are remembered,
/// the least recently touched forgotten first: forgetting a source only
/// ever errs towards admitting it (it starts over with a full bucket).
#[derive(Debug)]
pub struct SourceBuckets {
    per_sec: u32,
    burst: u32,
    buckets: HashMap<Source, Bucket>,
    /// Stamp -> source, oldest first, for forgetting buckets in LRU order.
    recency: BTreeMap<u64, Source>,
    next_stamp: u64,
}

impl SourceBuckets {
    /// `per_sec` tokens a second, holding at most `burst` (at least one).
    pub fn new(per_sec: u32, burst: u32) -> SourceBuckets {
        SourceBuckets {
            per_sec,
            burst: burst.max(1),
            buckets: HashMap::new(),
            recency: BTreeMap::new(),
            next_stamp: 0,
        }
    }

    /// The bucket's tokens at `now`, and the instant they count from: it
    /// moves only when a whole thousandth was added, so that calls closer
    /// together than that still accumulate.
    fn refilled(&self, now: Instant, b: &Bucket) -> (u64, Instant) {
        let burst = u64::from(self.burst) * MILLI;
        let elapsed = now.saturating_duration_since(b.refilled);
        let refill = (elapsed.as_micros() * u128::from(self.per_sec) / 1000).min(u128::from(burst)) as u64;
        if refill == 0 {
            (b.milli_tokens, b.refilled)
        } else {
            ((b.milli_tokens + refill).min(burst), now)
        }
    }

    /// Whether `source` has a whole token now; touches nothing.
    pub fn has_token(&self, now: Instant, source: Source) -> bool {
        self.buckets
            .get(&source)
            .is_none_or(|b| self.refilled(now, b).0 >= MILLI)
    }

    /// Takes a token from `source` if it has one (false if not); either way
    /// the source is remembered as just touched.
    pub fn take(&mut self, now: Instant, source: Source) -> bool {
        let stamp = self.next_stamp;
        self.next_stamp += 1;
        let (tokens, refilled) = match self.buckets.get(&source) {
            Some(b) => {
                self.recency.remove(&b.stamp);
                self.refilled(now, b)
            }
            None => {
                while self.buckets.len() >= MAX_TRACKED_SOURCES {
                    let Some((_, oldest)) = self.recency.pop_first() else {
                        break;
                    };
                    self.buckets.remove(&oldest);
                }
                (u64::from(self.burst) * MILLI, now)
            }
        };
        let took = tokens >= MILLI;
        self.buckets.insert(
            source,
            Bucket {
                milli_tokens: if took { tokens - MILLI } else { tokens },
                refilled,
                stamp,
            },
        );
        self.recency.insert(stamp, source);
        took
    }

    /// Sources remembered now (bounded by [`MAX_TRACKED_SOURCES`]).
    pub fn tracked(&self) -> usize {
        self.buckets.len()
    }

    #[cfg(test)]
    pub(crate) fn consistent(&self) -> bool {
        self.recency.len() == self.buckets.len()
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    pending: usize,
    total: usize,
}

#[derive(Debug)]
pub struct Admission {
    limits: SourceLimits,
    connects: SourceBuckets,
    /// Sources with open connections; bounded by the relay's `max_clients`.
    open: HashMap<Source, Counts>,
}

impl Admission {
    pub fn new(limits: SourceLimits) -> Admission {
        Admission {
            connects: SourceBuckets::new(limits.connects_per_sec, limits.connect_burst),
            limits,
            open: HashMap::new(),
        }
    }

    /// A new connection from `source` arrived: admit it (and count it as
    /// pending) or say why not. Every attempt that gets past the rate takes a
    /// token, refused by a cap or not: a source that keeps knocking at a cap
    /// spends its bucket and is then refused by the rate, the cheapest refusal.
    pub fn admit(&mut self, now: Instant, source: Source) -> Result<(), Refusal> {
        if self.limits.connects_per_sec > 0 && !self.connects.take(now, source) {
            return Err(Refusal::Rate);
        }
        let counts = self.open.get(&source).copied().unwrap_or_default();
        if self.limits.max_clients > 0 && counts.total >= self.limits.max_clients {
            return Err(Refusal::Clients);
        }
        if self.limits.max_pending > 0 && counts.pending >= self.limits.max_pending {
            return Err(Refusal::Pending);
        }
        let c = self.open.entry(source).or_default();
        c.pending += 1;
        c.total += 1;
        Ok(())
    }

    /// A refusal decided elsewhere (the relay is full, or the source's
    /// connection was pushed out of the pending pool) costs `source` a token
    /// as a refusal here does, so a flood of them is paid for by the flooder.
    pub fn charge(&mut self, now: Instant, source: Source) {
        if self.limits.connects_per_sec > 0 {
            self.connects.take(now, source);
        }
    }

    /// An admitted connection finished its handshake.
    pub fn registered(&mut self, source: Source) {
        if let Some(c) = self.open.get_mut(&source) {
            c.pending = c.pending.saturating_sub(1);
        }
    }

    /// An admitted connection closed; `was_registered` says whether
    /// [`Admission::registered`] was called for it.
    pub fn closed(&mut self, source: Source, was_registered: bool) {
        let Some(c) = self.open.get_mut(&source) else {
            return;
        };
        if !was_registered {
            c.pending = c.pending.saturating_sub(1);
        }
        c.total = c.total.saturating_sub(1);
        if c.total == 0 {
            self.open.remove(&source);
        }
    }

    /// Connections from `source` open now, and how many of them are in the handshake.
    pub fn open_from(&self, source: Source) -> (usize, usize) {
        let c = self.open.get(&source).copied().unwrap_or_default();
        (c.total, c.pending)
    }

    /// Sources whose rate bucket is remembered (bounded by [`MAX_TRACKED_SOURCES`]).
    pub fn tracked_sources(&self) -> usize {
        self.connects.tracked()
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};
    use std::time::Duration;

    use super::*;

    fn v4(last: u8) -> Source {
        Source::of(IpAddr::from([192, 0, 2, last]))
    }

    fn limits() -> SourceLimits {
        SourceLimits {
            connects_per_sec: 10,
            connect_burst: 5,
            max_pending: 0,
            max_clients: 0,
        }
    }

    #[test]
    fn bucket_allows_the_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut a = Admission::new(limits());
        let admitted = (0..20).filter(|_| a.admit(t0, v4(1)).is_ok()).count();
        assert_eq!(admitted, 5, "the burst");
        assert_eq!(a.admit(t0, v4(1)), Err(Refusal::Rate));
        // Another source is not affected.
        assert!(a.admit(t0, v4(2)).is_ok());
        // 10 per second: 350 ms gives 3 more, no more.
        let t1 = t0 + Duration::from_millis(350);
        let admitted = (0..20).filter(|_| a.admit(t1, v4(1)).is_ok()).count();
        assert_eq!(admitted, 3);
        // A long pause refills only up to the burst.
        let t2 = t1 + Duration::from_secs(3600);
        let admitted = (0..20).filter(|_| a.admit(t2, v4(1)).is_ok()).count();
        assert_eq!(admitted, 5);
    }

    #[test]
    fn slow_rates_accumulate_fractions() {
        let t0 = Instant::now();
        let mut a = Admission::new(SourceLimits {
            connects_per_sec: 1,
            connect_burst: 1,
            ..limits()
        });
        assert!(a.admit(t0, v4(1)).is_ok());
        // Refused attempts cost nothing, and credit builds up between them.
        for ms in (100..1000).step_by(100) {
            assert_eq!(
                a.admit(t0 + Duration::from_millis(ms), v4(1)),
                Err(Refusal::Rate),
                "{ms}"
            );
        }
        assert!(a.admit(t0 + Duration::from_millis(1000), v4(1)).is_ok());
    }

    #[test]
    fn pending_and_total_caps_follow_the_connections() {
        let now = Instant::now();
        let mut a = Admission::new(SourceLimits {
            connects_per_sec: 0,
            connect_burst: 0,
            max_pending: 2,
            max_clients: 3,
        });
        let s = v4(1);
        assert!(a.admit(now, s).is_ok());
        assert!(a.admit(now, s).is_ok());
        assert_eq!(a.admit(now, s), Err(Refusal::Pending));
        a.registered(s);
        assert!(a.admit(now, s).is_ok());
        assert_eq!(a.open_from(s), (3, 2));
        assert_eq!(a.admit(now, s), Err(Refusal::Clients));
        a.closed(s, false);
        a.closed(s, true);
        assert_eq!(a.open_from(s), (1, 1));
        assert!(a.admit(now, s).is_ok());
        a.closed(s, false);
        a.closed(s, false);
        assert_eq!(a.open_from(s), (0, 0));
        assert!(
            a.open.is_empty(),
            "no entry left for a source without connections"
        );
    }

    /// Knocking at a cap, or being refused elsewhere (relay full, evicted
    /// from the pending pool), spends the source's bucket like an admission.
    #[test]
    fn refusals_by_a_cap_or_elsewhere_cost_the_source_a_token() {
        let now = Instant::now();
        let mut a = Admission::new(SourceLimits {
            connects_per_sec: 1,
            connect_burst: 4,
            max_pending: 1,
            max_clients: 0,
        });
        let s = v4(1);
        assert!(a.admit(now, s).is_ok());
        assert_eq!(a.admit(now, s), Err(Refusal::Pending));
        a.charge(now, s);
        assert_eq!(a.admit(now, s), Err(Refusal::Pending));
        // Four tokens: one admission, two cap refusals, one charge. Now the
        // rate refuses, even once the pending connection is gone.
        a.closed(s, false);
        assert_eq!(a.admit(now, s), Err(Refusal::Rate));
        assert!(a.admit(now, v4(2)).is_ok(), "other sources keep their own bucket");
    }

    #[test]
    fn ipv6_is_limited_per_64_and_mapped_ipv4_as_ipv4() {
        let now = Instant::now();
        let mut a = Admission::new(SourceLimits {
            connects_per_sec: 1,
            connect_burst: 1,
            ..limits()
        });
        let host = |h: u16| Source::of(IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 1, 0, 0, 0, h)));
        assert!(a.admit(now, host(1)).is_ok());
        assert_eq!(a.admit(now, host(2)), Err(Refusal::Rate), "same /64");
        let other64 = Source::of(IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 2, 0, 0, 0, 1)));
        assert!(a.admit(now, other64).is_ok());
        assert!(a.admit(now, v4(7)).is_ok());
        let mapped = Source::of(IpAddr::V6(Ipv4Addr::new(192, 0, 2, 7).to_ipv6_mapped()));
        assert_eq!(mapped, v4(7));
        assert_eq!(a.admit(now, mapped), Err(Refusal::Rate));
    }

    #[test]
    fn the_bucket_table_is_bounded_and_forgets_the_oldest() {
        let t0 = Instant::now();
        let mut a = Admission::new(SourceLimits {
            connects_per_sec: 1,
            connect_burst: 1,
            ..limits()
        });
        let first = Source::V4(0);
        assert!(a.admit(t0, first).is_ok());
        assert_eq!(a.admit(t0, first), Err(Refusal::Rate));
        for i in 1..(MAX_TRACKED_SOURCES as u32 * 2) {
            let _ = a.admit(t0, Source::V4(i));
            assert!(a.tracked_sources() <= MAX_TRACKED_SOURCES);
        }
        assert!(a.connects.consistent());
        // The first source was forgotten, so it starts over with a full bucket;
        // a recent one is still remembered and still limited.
        assert!(a.admit(t0, first).is_ok());
        let recent = Source::V4(MAX_TRACKED_SOURCES as u32 * 2 - 1);
        assert_eq!(a.admit(t0, recent), Err(Refusal::Rate));
    }
}
