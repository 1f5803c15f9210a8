//! How many handshake initiations the responder takes on per second, in
//! total and per source (IPv4 address, IPv6 /64), before the expensive part
//! (the DH). Counts are per tick of the responder's clock and start over
//! every tick.
//!
//! Two kinds of initiation are counted apart, because they cost an attacker
//! different things:
//! - *unproven* ones carry no valid mac2, so their source address may be
//!   spoofed. Past the total or the per-source budget, the sender must prove
//!   its address (WireGuard's cookie reply) first. Demanding proof instead of
//!   dropping matters: a spoofer using a real client's address would
//!   otherwise spend that client's budget.
//! - *proven* ones carry the mac2 of a cookie we gave to that address, so
//!   they come from it. Past the per-source budget they are dropped: one
//!   address that answers cookies (issue 12: 4,096 sessions in 4.6 s) gets a
//!   few handshakes a second and nothing more, and its surplus costs us two
//!   MACs each instead of six X25519 operations, so our queue keeps moving
//!   for everyone else.

use std::collections::HashMap;

use super::peers::Source;

/// Proven initiations one source gets handled per tick by default; the rest
/// are dropped. Far more than a few nodes behind one NAT send (one per client
/// every two minutes, one retry per 5 s), few enough that one address costs
/// us little DH.
pub const DEFAULT_PROVEN_PER_SOURCE: u32 = 16;
/// Unproven initiations one source may send per tick before it must prove its
/// address, as a share of the proven budget: spoofable, so less.
const UNPROVEN_SHARE: u32 = 2;
/// Sources counted per tick for unproven initiations. Beyond it, a source we
/// have no count for must prove its address, so a spoofed flood of many
/// addresses keeps the table small.
pub const MAX_COUNTED_SOURCES: usize = 16_384;
/// Proven sources still get counted past that: each is an address the sender
/// really receives at, so a spoofed flood cannot crowd them out.
const MAX_COUNTED_WITH_PROVEN: usize = 2 * MAX_COUNTED_SOURCES;

/// What an initiation must do before we do the DH for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gate {
    Open,
    ProofNeeded,
}

#[derive(Default)]
struct Count {
    unproven: u32,
    proven: u32,
}

pub struct Budget {
    per_tick: u64,
    proven_per_source: u32,
    unproven_per_source: u32,
    this_tick: u64,
    by_source: HashMap<Source, Count>,
}

impl Budget {
    /// `per_tick`: unproven initiations in total per tick before everyone must
    /// prove; `proven_per_source`: proven initiations handled per source per
    /// tick (half as many unproven ones are let through).
    pub fn new(per_tick: u64, proven_per_source: u32) -> Budget {
        let proven_per_source = proven_per_source.max(1);
        Budget {
            per_tick,
            proven_per_source,
            unproven_per_source: (proven_per_source / UNPROVEN_SHARE).max(1),
            this_tick: 0,
            by_source: HashMap::new(),
        }
    }

    pub fn tick(&mut self) {
        self.this_tick = 0;
        self.by_source.clear();
        // A spoofed flood may have grown it; give the memory back.
        self.by_source.shrink_to(1024);
    }

    /// An initiation with a valid mac1 from `source`, before any proof.
    pub fn unproven(&mut self, source: Source) -> Gate {
        let global_load = self.this_tick >= self.per_tick;
        self.this_tick = self.this_tick.saturating_add(1);
        let limit = self.unproven_per_source;
        let Some(count) = self.count(source, MAX_COUNTED_SOURCES) else {
            return Gate::ProofNeeded;
        };
        if global_load || count.unproven >= limit {
            return Gate::ProofNeeded;
        }
        count.unproven += 1;
        Gate::Open
    }

    /// An initiation from `source` whose mac2 proved its address: whether it may be handled.
    pub fn proven(&mut self, source: Source) -> bool {
        let limit = self.proven_per_source;
        let Some(count) = self.count(source, MAX_COUNTED_WITH_PROVEN) else {
            return false;
        };
        if count.proven >= limit {
            return false;
        }
        count.proven += 1;
        true
    }

    fn count(&mut self, source: Source, max_sources: usize) -> Option<&mut Count> {
        if self.by_source.len() >= max_sources && !self.by_source.contains_key(&source) {
            return None;
        }
        Some(self.by_source.entry(source).or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn src(s: &str) -> Source {
        Source::of(s.parse().unwrap())
    }

    #[test]
    fn a_busy_source_must_prove_then_is_capped_and_others_are_not() {
        let mut b = Budget::new(1_000, DEFAULT_PROVEN_PER_SOURCE);
        let (busy, other) = (src("198.51.100.50"), src("203.0.113.20"));
        for _ in 0..DEFAULT_PROVEN_PER_SOURCE / UNPROVEN_SHARE {
            assert_eq!(b.unproven(busy), Gate::Open);
        }
        assert_eq!(b.unproven(busy), Gate::ProofNeeded);
        assert_eq!(b.unproven(other), Gate::Open);
        let handled = (0..100).filter(|_| b.proven(busy)).count();
        assert_eq!(handled, DEFAULT_PROVEN_PER_SOURCE as usize);
        assert!(b.proven(other), "another source's proven budget is its own");
        b.tick();
        assert_eq!(b.unproven(busy), Gate::Open);
        assert!(b.proven(busy));
    }

    #[test]
    fn past_the_total_everyone_must_prove() {
        let mut b = Budget::new(3, DEFAULT_PROVEN_PER_SOURCE);
        for i in 0..3 {
            assert_eq!(b.unproven(src(&format!("192.0.2.{i}"))), Gate::Open);
        }
        assert_eq!(b.unproven(src("192.0.2.200")), Gate::ProofNeeded);
        b.tick();
        assert_eq!(b.unproven(src("192.0.2.200")), Gate::Open);
    }

    #[test]
    fn the_source_table_is_bounded() {
        let mut b = Budget::new(u64::MAX, DEFAULT_PROVEN_PER_SOURCE);
        for i in 0..MAX_COUNTED_SOURCES as u32 {
            assert_eq!(b.unproven(Source::V4(i)), Gate::Open);
        }
        assert_eq!(b.unproven(Source::V4(u32::MAX)), Gate::ProofNeeded);
        assert!(b.proven(Source::V4(u32::MAX)), "a proven source is still served");
        assert!(
            b.proven(Source::V4(7)),
            "sources already counted keep their budget"
        );
        for i in 0..3 * MAX_COUNTED_SOURCES as u32 {
            b.proven(Source::V4(u32::MAX - i));
        }
        assert_eq!(b.by_source.len(), MAX_COUNTED_WITH_PROVEN);
    }
}
