//! The bounded session table: one boringtun `Tunn` per client key, found by
//! key (handshake initiations) or by our receiver index (data packets), with
//! least-recently-used eviction so memory has a fixed ceiling.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use boringtun::noise::Tunn;

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
    lru_stamp: u64,
}

pub struct Sessions {
    max: usize,
    by_id: HashMap<u32, Box<Session>>,
    by_key: HashMap<ClientKey, u32>,
    /// Touch order: oldest first. Stamps are unique and only grow.
    lru: BTreeMap<u64, u32>,
    next_stamp: u64,
    next_id: u32,
}

impl Sessions {
    pub fn new(max: usize) -> Sessions {
        let max = max.clamp(1, MAX_SESSION_ID as usize / 2);
        Sessions {
            max,
            by_id: HashMap::new(),
            by_key: HashMap::new(),
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

    pub fn id_of(&self, key: &ClientKey) -> Option<u32> {
        self.by_key.get(key).copied()
    }

    pub fn id_for_receiver_index(receiver_index: u32) -> u32 {
        receiver_index >> 8
    }

    pub fn get_mut(&mut self, id: u32) -> Option<&mut Session> {
        self.by_id.get_mut(&id).map(|b| &mut **b)
    }

    /// Marks a session as just used by an authenticated packet from `from`.
    pub fn touch(&mut self, id: u32, now: Instant, from: SocketAddr) {
        let stamp = self.next_stamp;
        if let Some(s) = self.by_id.get_mut(&id) {
            self.lru.remove(&s.lru_stamp);
            s.lru_stamp = stamp;
            s.last_received = now;
            s.endpoint = from;
            self.lru.insert(stamp, id);
            self.next_stamp += 1;
        }
    }

    /// Adds a session for `key`, evicting the least recently used one if full.
    /// Returns its id and the key of the evicted session, if any.
    pub fn insert(
        &mut self,
        key: ClientKey,
        now: Instant,
        from: SocketAddr,
        make_tunn: impl FnOnce(u32) -> Tunn,
    ) -> (u32, Option<ClientKey>) {
        let evicted = if self.by_id.len() >= self.max {
            self.evict_oldest()
        } else {
            None
        };
        let id = self.free_id();
        let stamp = self.next_stamp;
        self.next_stamp += 1;
        let session = Session {
            tunn: make_tunn(id),
            key,
            endpoint: from,
            last_received: now,
            lru_stamp: stamp,
        };
        self.by_id.insert(id, Box::new(session));
        self.by_key.insert(key, id);
        self.lru.insert(stamp, id);
        (id, evicted)
    }

    pub fn remove(&mut self, id: u32) -> Option<ClientKey> {
        let s = self.by_id.remove(&id)?;
        self.by_key.remove(&s.key);
        self.lru.remove(&s.lru_stamp);
        Some(s.key)
    }

    fn evict_oldest(&mut self) -> Option<ClientKey> {
        let (_, id) = self.lru.pop_first()?;
        let s = self.by_id.remove(&id)?;
        self.by_key.remove(&s.key);
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
            self.lru.pop_first();
            if let Some(s) = self.by_id.remove(&id) {
                self.by_key.remove(&s.key);
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

    #[test]
    fn least_recently_used_is_evicted_and_ids_map_back() {
        let now = Instant::now();
        let from: SocketAddr = "203.0.113.1:1".parse().unwrap();
        let mut t = Sessions::new(2);
        let (a, _) = t.insert([1; 32], now, from, tunn);
        let (b, _) = t.insert([2; 32], now, from, tunn);
        t.touch(a, now, from);
        let (c, evicted) = t.insert([3; 32], now, from, tunn);
        assert_eq!(evicted, Some([2; 32]), "b was used least recently");
        assert_eq!(t.len(), 2);
        assert_eq!(t.id_of(&[1; 32]), Some(a));
        assert_eq!(t.id_of(&[2; 32]), None);
        assert!(t.get_mut(b).is_none());
        assert_eq!(Sessions::id_for_receiver_index((c << 8) | 0x17), c);
        assert_eq!(t.remove(a), Some([1; 32]));
        assert_eq!((t.len(), t.id_of(&[1; 32])), (1, None));
    }

    #[test]
    fn idle_expiry_takes_only_the_idle() {
        let start = Instant::now();
        let from: SocketAddr = "203.0.113.1:1".parse().unwrap();
        let mut t = Sessions::new(10);
        let (old, _) = t.insert([1; 32], start, from, tunn);
        let (fresh, _) = t.insert([2; 32], start, from, tunn);
        t.touch(fresh, start + Duration::from_secs(100), from);
        assert_eq!(
            t.expire_idle(start + Duration::from_secs(150), Duration::from_secs(120)),
            1
        );
        assert!(t.get_mut(old).is_none());
        assert!(t.get_mut(fresh).is_some());
    }
}
