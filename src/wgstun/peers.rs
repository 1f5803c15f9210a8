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
