//! The bounded session table: one boringtun `Tunn` per client key, found by
//! key (handshake initiations) or by our receiver index (data packets).
//!
//! Memory has a fixed ceiling (`max` sessions), and who pays when it is
//! reached is chosen so that a flood cannot push out the clients that use
//! the server:
//! - every session counts against its *origin*, the source (IPv4 address or
//!   IPv6 /64) of the initiation that created it. The origin never moves, so
//!   roaming a session's data to other (spoofable) addresses frees nothing;
//! - a source holds at most `max_per_source` sessions; a new one beyond that
//!   replaces one of the source's own;
//! - when the table is full, the victim is a session that never asked a STUN
//!   question before one that did, then one from the source holding the most
//!   sessions, then the least recently used.

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use boringtun::noise::Tunn;

pub use crate::relay::admission::Source;

/// boringtun puts a 24-bit peer index in the top bits of every receiver
/// index it hands out (`Tunn::new(.., index, ..)` uses `index << 8`).
pub const MAX_SESSION_ID: u32 = (1 << 24) - 1;

pub type ClientKey = [u8; 32];

pub struct Session {
    pub tunn: Tunn,
    pub key: ClientKey,
    /// Outer address the newest authenticated packet came from.
    pub endpoint: SocketAddr,
    pub last_received: Instant,
    /// The source the session counts against (see the module comment).
    pub origin: Source,
    /// Whether a STUN Binding request came through this session: the one
    /// thing a client of this server does, and a flooder has no need to.
    pub asked: bool,
    stamp: u64,
}

impl Session {
    /// Eviction order inside a source: never-asked before asked, then oldest.
    fn rank(&self) -> (bool, u64) {
        (self.asked, self.stamp)
    }
}

/// One source's sessions in eviction order.
#[derive(Default)]
struct SourceSessions {
    by_rank: BTreeMap<(bool, u64), u32>,
}

/// Who would pay for a new session from some source.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// There is room: nobody is evicted.
    Free,
    /// The source is at its cap: one of its own sessions goes.
    EvictsOwn,
    /// The table is full: some other source's session goes.
    EvictsOther,
}

/// What `insert` had to evict to make room.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Evicted {
    pub key: ClientKey,
    /// The session had asked a STUN question (a client that used the server).
    pub asked: bool,
    pub admission: Admission,
}

pub struct Sessions {
    max: usize,
    max_per_source: usize,
    by_id: HashMap<u32, Box<Session>>,
    by_key: HashMap<ClientKey, u32>,
    by_source: HashMap<Source, SourceSessions>,
    /// Touch order, oldest first, for idle expiry. Stamps are unique and only grow.
    lru: BTreeMap<u64, u32>,
    next_stamp: u64,
    next_id: u32,
}

impl Sessions {
    pub fn new(max: usize, max_per_source: usize) -> Sessions {
        let max = max.clamp(1, MAX_SESSION_ID as usize / 2);
        Sessions {
            max,
            max_per_source: max_per_source.clamp(1, max),
            by_id: HashMap::new(),
            by_key: HashMap::new(),
            by_source: HashMap::new(),
            lru: BTreeMap::new(),
            next_stamp: 0,
            next_id: 1,
        }
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    pub fn capacity(&self) -> usize {
        self.max
    }

    pub fn capacity_per_source(&self) -> usize {
        self.max_per_source
    }

    /// Sessions counted against `source`.
    pub fn count_from(&self, source: Source) -> usize {
        self.by_source.get(&source).map_or(0, |s| s.by_rank.len())
    }

    pub fn id_of(&self, key: &ClientKey) -> Option<u32> {
        self.by_key.get(key).copied()
    }

    pub fn id_for_receiver_index(receiver_index: u32) -> u32 {
        receiver_index >> 8
    }

    pub fn get_mut(&mut self, id: u32) -> Option<&mut Session> {
        self.by_id.get_mut(&id).map(|b| &mut **b)
    }

    /// Who pays if a new session from `from` is inserted now.
    pub fn admission(&self, from: SocketAddr) -> Admission {
        if self.count_from(Source::of(from.ip())) >= self.max_per_source {
            Admission::EvictsOwn
        } else if self.by_id.len() >= self.max {
            Admission::EvictsOther
        } else {
            Admission::Free
        }
    }

    /// Marks a session as just used by an authenticated packet from `from`.
    pub fn touch(&mut self, id: u32, now: Instant, from: SocketAddr) {
        let stamp = self.take_stamp();
        self.rerank(id, |s| {
            s.stamp = stamp;
            s.last_received = now;
            s.endpoint = from;
        });
    }

    /// Records that the session asked a STUN question.
    pub fn mark_asked(&mut self, id: u32) {
        if self.by_id.get(&id).is_some_and(|s| !s.asked) {
            self.rerank(id, |s| s.asked = true);
        }
    }

    /// Applies `change` to a session and moves it to where its new rank and stamp put it.
    fn rerank(&mut self, id: u32, change: impl FnOnce(&mut Session)) {
        let Some(s) = self.by_id.get_mut(&id) else {
            return;
        };
        let (old_rank, old_stamp) = (s.rank(), s.stamp);
        change(s);
        let (rank, stamp) = (s.rank(), s.stamp);
        if let Some(src) = self.by_source.get_mut(&s.origin) {
            src.by_rank.remove(&old_rank);
            src.by_rank.insert(rank, id);
        }
        self.lru.remove(&old_stamp);
        self.lru.insert(stamp, id);
    }

    fn take_stamp(&mut self) -> u64 {
        let stamp = self.next_stamp;
        self.next_stamp += 1;
        stamp
    }

    /// Adds a session for `key` first seen from `from`, evicting one if the
    /// source is at its cap or the table is full (see the module comment).
    /// Returns its id and what was evicted, if anything.
    pub fn insert(
        &mut self,
        key: ClientKey,
        now: Instant,
        from: SocketAddr,
        make_tunn: impl FnOnce(u32) -> Tunn,
    ) -> (u32, Option<Evicted>) {
        let origin = Source::of(from.ip());
        let admission = self.admission(from);
        let victim = match admission {
            Admission::Free => None,
            Admission::EvictsOwn => self.own_victim(origin),
            Admission::EvictsOther => self.global_victim(),
        };
        let evicted = victim.and_then(|id| {
            let asked = self.by_id.get(&id)?.asked;
            let key = self.remove(id)?;
            Some(Evicted {
                key,
                asked,
                admission,
            })
        });
        let id = self.free_id();
        let stamp = self.take_stamp();
        let session = Session {
            tunn: make_tunn(id),
            key,
            endpoint: from,
            last_received: now,
            origin,
            asked: false,
            stamp,
        };
        self.by_source
            .entry(origin)
            .or_default()
            .by_rank
            .insert(session.rank(), id);
        self.by_id.insert(id, Box::new(session));
        self.by_key.insert(key, id);
        self.lru.insert(stamp, id);
        (id, evicted)
    }

    fn own_victim(&self, source: Source) -> Option<u32> {
        let src = self.by_source.get(&source)?;
        src.by_rank.first_key_value().map(|(_, &id)| id)
    }

    /// The first session by (asked, fewest sessions at its source, oldest).
    /// A scan over sources: it runs only when the table is full and a new
    /// initiator proved its address, and a source is a few words to look at.
    fn global_victim(&self) -> Option<u32> {
        self.by_source
            .values()
            .filter_map(|src| {
                let (&(asked, stamp), &id) = src.by_rank.first_key_value()?;
                Some(((asked, Reverse(src.by_rank.len()), stamp), id))
            })
            .min()
            .map(|(_, id)| id)
    }

    pub fn remove(&mut self, id: u32) -> Option<ClientKey> {
        let s = self.by_id.remove(&id)?;
        self.by_key.remove(&s.key);
        self.lru.remove(&s.stamp);
        if let Some(src) = self.by_source.get_mut(&s.origin) {
            src.by_rank.remove(&s.rank());
            if src.by_rank.is_empty() {
                self.by_source.remove(&s.origin);
            }
        }
        Some(s.key)
    }

    fn free_id(&mut self) -> u32 {
        // At most `max` ids are taken and max < MAX_SESSION_ID / 2, so this ends quickly.
        loop {
            let id = self.next_id;
            self.next_id = if id >= MAX_SESSION_ID { 1 } else { id + 1 };
            if !self.by_id.contains_key(&id) {
                return id;
            }
        }
    }

    /// Drops sessions that received nothing for `idle`; returns how many.
    pub fn expire_idle(&mut self, now: Instant, idle: Duration) -> usize {
        let mut n = 0;
        while let Some((_, &id)) = self.lru.first_key_value() {
            let expired = self
                .by_id
                .get(&id)
                .is_none_or(|s| now.saturating_duration_since(s.last_received) >= idle);
            if !expired {
                break;
            }
            if self.remove(id).is_none() {
                // An lru entry without its session; cannot happen, but never loop on it.
                self.lru.pop_first();
            }
            n += 1;
        }
        n
    }

    pub fn iter_mut_with_ids(&mut self) -> impl Iterator<Item = (u32, &mut Session)> {
        self.by_id.iter_mut().map(|(id, b)| (*id, &mut **b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use boringtun::x25519::{PublicKey, StaticSecret};

    fn tunn(id: u32) -> Tunn {
        let s = StaticSecret::from([1u8; 32]);
        Tunn::new(s, PublicKey::from([9u8; 32]), None, None, id, None)
    }

    fn at(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn least_recently_used_is_evicted_and_ids_map_back() {
        let now = Instant::now();
        let mut t = Sessions::new(2, 2);
        let (a, _) = t.insert([1; 32], now, at("203.0.113.1:1"), tunn);
        let (b, _) = t.insert([2; 32], now, at("203.0.113.2:1"), tunn);
        t.touch(a, now, at("203.0.113.1:1"));
        let (c, evicted) = t.insert([3; 32], now, at("203.0.113.3:1"), tunn);
        assert_eq!(evicted.map(|e| e.key), Some([2; 32]), "b was used least recently");
        assert_eq!(t.len(), 2);
        assert_eq!(t.id_of(&[1; 32]), Some(a));
        assert_eq!(t.id_of(&[2; 32]), None);
        assert!(t.get_mut(b).is_none());
        assert_eq!(Sessions::id_for_receiver_index((c << 8) | 0x17), c);
        assert_eq!(t.remove(a), Some([1; 32]));
        assert_eq!((t.len(), t.id_of(&[1; 32])), (1, None));
    }

    #[test]
    fn a_source_at_its_cap_replaces_its_own_sessions_only() {
        let now = Instant::now();
        let mut t = Sessions::new(100, 3);
        let (legit, _) = t.insert([0; 32], now, at("203.0.113.20:51820"), tunn);
        t.mark_asked(legit);
        for i in 1..=50u8 {
            let (_, evicted) = t.insert(
                [i; 32],
                now,
                at(&format!("198.51.100.50:{}", 1000 + i as u16)),
                tunn,
            );
            if i > 3 {
                let e = evicted.expect("the source is at its cap");
                assert_eq!(e.admission, Admission::EvictsOwn);
                assert_eq!(e.key, [i - 3; 32], "its own oldest goes");
            }
            assert!(t.count_from(Source::of("198.51.100.50".parse().unwrap())) <= 3);
        }
        assert_eq!(t.len(), 4);
        assert!(t.get_mut(legit).is_some());
        // Per /64 for IPv6: another address in the same /64 is the same source.
        let mut v6 = Sessions::new(100, 2);
        v6.insert([1; 32], now, at("[2001:db8::1]:1"), tunn);
        v6.insert([2; 32], now, at("[2001:db8::2]:1"), tunn);
        assert_eq!(v6.admission(at("[2001:db8::ffff]:9")), Admission::EvictsOwn);
        assert_eq!(v6.admission(at("[2001:db8:0:1::1]:9")), Admission::Free);
    }

    #[test]
    fn a_full_table_evicts_never_asked_then_the_biggest_source_then_oldest() {
        let now = Instant::now();
        let mut t = Sessions::new(6, 6);
        // Two clients that asked, one from a source of its own, the other
        // beside two silent sessions; one silent session from a third source.
        let (lone, _) = t.insert([1; 32], now, at("203.0.113.1:1"), tunn);
        t.mark_asked(lone);
        let (crowd_asked, _) = t.insert([2; 32], now, at("198.51.100.9:1"), tunn);
        t.mark_asked(crowd_asked);
        t.insert([3; 32], now, at("198.51.100.9:2"), tunn);
        t.insert([4; 32], now, at("198.51.100.9:3"), tunn);
        t.insert([5; 32], now, at("192.0.2.7:1"), tunn);
        t.insert([6; 32], now, at("192.0.2.8:1"), tunn);
        t.touch(lone, now, at("203.0.113.1:1"));
        // Never-asked first, from the biggest source, oldest first.
        let order: Vec<ClientKey> = (10..15u8)
            .map(|i| {
                let (id, e) = t.insert([i; 32], now, at(&format!("192.0.2.{}:1", 100 + i)), tunn);
                t.mark_asked(id);
                e.expect("table full").key
            })
            .collect();
        assert_eq!(order, vec![[3; 32], [4; 32], [5; 32], [6; 32], [2; 32]]);
        // Only asked sessions are left, one per source: the least recently used goes.
        let (_, e) = t.insert([20; 32], now, at("192.0.2.200:1"), tunn);
        assert_eq!(e.map(|e| (e.key, e.asked)), Some(([1; 32], true)));
        assert_eq!(t.len(), 6);
    }

    #[test]
    fn roaming_does_not_move_a_session_off_its_origin() {
        let now = Instant::now();
        let mut t = Sessions::new(10, 1);
        let (id, _) = t.insert([1; 32], now, at("198.51.100.50:1"), tunn);
        t.touch(id, now, at("192.0.2.99:5"));
        assert_eq!(t.admission(at("198.51.100.50:2")), Admission::EvictsOwn);
        assert_eq!(t.admission(at("192.0.2.99:6")), Admission::Free);
        t.remove(id);
        assert_eq!(t.count_from(Source::of("198.51.100.50".parse().unwrap())), 0);
        assert!(t.by_source.is_empty(), "empty sources are dropped");
    }

    #[test]
    fn idle_expiry_takes_only_the_idle() {
        let start = Instant::now();
        let from: SocketAddr = "203.0.113.1:1".parse().unwrap();
        let mut t = Sessions::new(10, 10);
        let (old, _) = t.insert([1; 32], start, from, tunn);
        let (fresh, _) = t.insert([2; 32], start, from, tunn);
        t.touch(fresh, start + Duration::from_secs(100), from);
        assert_eq!(
            t.expire_idle(start + Duration::from_secs(150), Duration::from_secs(120)),
            1
        );
        assert!(t.get_mut(old).is_none());
        assert!(t.get_mut(fresh).is_some());
        assert_eq!(t.count_from(Source::of(from.ip())), 1);
    }
}
