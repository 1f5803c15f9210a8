//! The member feed: a separate `warren relay` subscribes on the control port
//! with its relay key and learns which node keys are members of the mesh, so
//! it can refuse removed ones as the embedded relay does.
//!
//! Only relay keys the coordinator publishes (`warren server --relay
//! KEY@HOST:PORT`) may subscribe. A subscriber gets the whole set first, then
//! one delta per loop turn in which members were added or removed (joins,
//! removals, key rotations). A subscriber that does not read is not queued
//! for without bound: once [`MAX_BACKLOG`] bytes wait for it, deltas are
//! skipped for it, and when it has read everything it gets the whole set
//! again, which makes up for every delta it missed.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;

use super::conn::{Conn, Phase};
use super::hub::ConnId;
use crate::control::messages::{self, ServerMessage};
use crate::keys::Key;

/// Unwritten bytes a subscriber may have before it counts as behind. A full
/// set of 10,000 members is about 470 KB of JSON, so this holds a full set
/// and many deltas, and bounds each subscriber's output near 1 MiB plus one
/// message.
pub const MAX_BACKLOG: usize = 1024 * 1024;

#[derive(Default)]
pub struct RelayFeed {
    /// Relay keys allowed to subscribe.
    authorised: HashSet<Key>,
    /// Every member's key. Read from the store when the first relay
    /// subscribes, then kept current by [`RelayFeed::added`] and
    /// [`RelayFeed::removed`]; `None` before (no relay, no cost).
    members: Option<BTreeSet<Key>>,
    /// Changes since the last flush, sent as one delta.
    added: BTreeSet<Key>,
    removed: BTreeSet<Key>,
    /// The `members` message for the current set, encoded once for all.
    full: Option<Arc<[u8]>>,
    /// Subscribed connections; true when one fell behind and waits for a full set.
    subscribers: BTreeMap<ConnId, bool>,
}

impl RelayFeed {
    /// The relays nodes are told about: their keys may subscribe.
    pub fn set_authorised(&mut self, keys: impl IntoIterator<Item = Key>) {
        self.authorised = keys.into_iter().collect();
    }

    pub fn is_authorised(&self, key: &Key) -> bool {
        self.authorised.contains(key)
    }

    /// Subscribes an authorised relay's connection and queues the whole set
    /// for it; `load` reads the members from the store the first time.
    pub fn subscribe(
        &mut self,
        id: ConnId,
        now: Instant,
        conn: &mut Conn,
        load: impl FnOnce() -> Result<Vec<Key>>,
    ) -> Result<()> {
        if self.members.is_none() {
            self.members = Some(load()?.into_iter().collect());
            self.added.clear();
            self.removed.clear();
        }
        conn.subscribed(now);
        conn.send_encoded(&self.full_message());
        self.subscribers.insert(id, false);
        Ok(())
    }

    /// `key` became a member (joined, or rotated to).
    pub fn added(&mut self, key: Key) {
        let Some(members) = &mut self.members else { return };
        if members.insert(key) {
            self.full = None;
            if !self.removed.remove(&key) {
                self.added.insert(key);
            }
        }
    }

    /// `key` is no longer a member (removed, or rotated away from).
    pub fn removed(&mut self, key: Key) {
        let Some(members) = &mut self.members else { return };
        if members.remove(&key) {
            self.full = None;
            if !self.added.remove(&key) {
                self.removed.insert(key);
            }
        }
    }

    pub fn closed(&mut self, id: ConnId) {
        self.subscribers.remove(&id);
    }

    fn full_message(&mut self) -> Arc<[u8]> {
        let members = self.members.as_ref().map(|m| m.iter().copied().collect());
        self.full
            .get_or_insert_with(|| {
                messages::encode(&ServerMessage::Members {
                    keys: members.unwrap_or_default(),
                })
                .into()
            })
            .clone()
    }

    /// Sends this turn's changes to every subscriber keeping up, and the
    /// whole set to those that fell behind and have caught up on reading.
    pub fn flush(&mut self, conns: &mut HashMap<ConnId, Conn>, dirty: &mut BTreeSet<ConnId>) {
        self.subscribers
            .retain(|id, _| conns.get(id).is_some_and(|c| c.phase == Phase::Relay));
        let delta = (!self.added.is_empty() || !self.removed.is_empty()).then(|| {
            messages::encode(&ServerMessage::MembersDelta {
                added: std::mem::take(&mut self.added).into_iter().collect(),
                removed: std::mem::take(&mut self.removed).into_iter().collect(),
            })
        });
        let caught_up: Vec<ConnId> = self
            .subscribers
            .iter()
            .filter(|&(id, &behind)| behind && conns.get(id).is_some_and(|c| c.outgoing().is_empty()))
            .map(|(&id, _)| id)
            .collect();
        if !caught_up.is_empty() {
            let full = self.full_message();
            for id in caught_up {
                if let Some(c) = conns.get_mut(&id) {
                    c.send_encoded(&full);
                    dirty.insert(id);
                }
                self.subscribers.insert(id, false);
            }
        }
        let Some(delta) = delta else { return };
        for (&id, behind) in self.subscribers.iter_mut() {
            let Some(c) = conns.get_mut(&id) else { continue };
            if *behind {
                continue;
            }
            if c.outgoing().len() > MAX_BACKLOG {
                *behind = true;
                continue;
            }
            c.send_encoded(&delta);
            dirty.insert(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::channel::Channel;

    /// A relay's connection as the coordinator holds it, with the relay's end.
    fn subscriber(server: &Key, now: Instant) -> (Conn, Channel) {
        let relay = Key::generate_private();
        let mut ch = Channel::client(&relay, &server.public_key()).unwrap();
        let mut conn = Conn::new(server, now);
        conn.receive(now, ch.outgoing()).unwrap();
        ch.consume_outgoing(ch.outgoing().len());
        ch.receive(conn.outgoing()).unwrap();
        let n = conn.outgoing().len();
        conn.consume_outgoing(n);
        (conn, ch)
    }

    /// What the relay's end reads of everything queued for it.
    fn read_all(conn: &mut Conn, ch: &mut Channel) -> Vec<ServerMessage> {
        ch.receive(conn.outgoing()).unwrap();
        let n = conn.outgoing().len();
        conn.consume_outgoing(n);
        std::iter::from_fn(|| ch.next_message())
            .map(|m| messages::decode_server(&m).unwrap())
            .collect()
    }

    fn keys(n: usize) -> Vec<Key> {
        (0..n).map(|_| Key::generate_private().public_key()).collect()
    }

    #[test]
    fn a_subscriber_gets_the_set_then_one_delta_per_flush() {
        let now = Instant::now();
        let server = Key::generate_private();
        let (conn, mut ch) = subscriber(&server, now);
        let mut conns = HashMap::from([(7, conn)]);
        let mut dirty = BTreeSet::new();
        let mut feed = RelayFeed::default();
        let first = keys(3);
        let loaded = first.clone();
        feed.subscribe(7, now, conns.get_mut(&7).unwrap(), || Ok(loaded))
            .unwrap();
        let got = read_all(conns.get_mut(&7).unwrap(), &mut ch);
        let mut want = first.clone();
        want.sort();
        assert_eq!(got, vec![ServerMessage::Members { keys: want }]);

        // A join, a removal, and a key added and removed in the same turn.
        let (joined, passing) = (keys(1)[0], keys(1)[0]);
        feed.added(joined);
        feed.removed(first[0]);
        feed.added(passing);
        feed.removed(passing);
        feed.flush(&mut conns, &mut dirty);
        assert!(dirty.contains(&7));
        let got = read_all(conns.get_mut(&7).unwrap(), &mut ch);
        assert_eq!(
            got,
            vec![ServerMessage::MembersDelta {
                added: vec![joined],
                removed: vec![first[0]],
            }]
        );
        // Nothing changed: nothing sent.
        feed.flush(&mut conns, &mut dirty);
        assert!(read_all(conns.get_mut(&7).unwrap(), &mut ch).is_empty());
    }

    #[test]
    fn a_subscriber_that_stops_reading_stays_bounded_and_then_gets_the_whole_set() {
        let now = Instant::now();
        let server = Key::generate_private();
        let (conn, mut ch) = subscriber(&server, now);
        let mut conns = HashMap::from([(1, conn)]);
        let mut dirty = BTreeSet::new();
        let mut feed = RelayFeed::default();
        feed.subscribe(1, now, conns.get_mut(&1).unwrap(), || Ok(keys(100)))
            .unwrap();
        // 20,000 turns with a join and a removal each, and the relay reads nothing.
        let mut last = Vec::new();
        for _ in 0..20_000 {
            let k = keys(2);
            feed.added(k[0]);
            feed.added(k[1]);
            feed.removed(k[0]);
            feed.flush(&mut conns, &mut dirty);
            last.push(k[1]);
            assert!(
                conns[&1].outgoing().len() <= MAX_BACKLOG + 1024,
                "{} bytes queued for a relay that does not read",
                conns[&1].outgoing().len()
            );
        }
        assert!(conns[&1].phase == Phase::Relay, "a slow relay is not cut off");
        // It reads what was queued (old news), and then gets the current set.
        let stale = read_all(conns.get_mut(&1).unwrap(), &mut ch);
        assert!(matches!(stale.first(), Some(ServerMessage::Members { .. })));
        feed.flush(&mut conns, &mut dirty);
        let got = read_all(conns.get_mut(&1).unwrap(), &mut ch);
        let [ServerMessage::Members { keys: full }] = got.as_slice() else {
            panic!("expected one full set, got {got:?}");
        };
        assert_eq!(full.len(), 100 + 20_000);
        let have: BTreeSet<Key> = full.iter().copied().collect();
        assert!(last.iter().all(|k| have.contains(k)));
        // Keeping up again: the next change comes as a delta.
        let k = keys(1)[0];
        feed.added(k);
        feed.flush(&mut conns, &mut dirty);
        let got = read_all(conns.get_mut(&1).unwrap(), &mut ch);
        assert_eq!(
            got,
            vec![ServerMessage::MembersDelta {
                added: vec![k],
                removed: vec![]
            }]
        );
    }

    #[test]
    fn changes_before_any_subscriber_cost_nothing_and_closed_ones_are_forgotten() {
        let now = Instant::now();
        let server = Key::generate_private();
        let mut feed = RelayFeed::default();
        feed.added(keys(1)[0]);
        assert!(feed.members.is_none() && feed.added.is_empty());
        let (conn, _ch) = subscriber(&server, now);
        let mut conns = HashMap::from([(3, conn)]);
        feed.subscribe(3, now, conns.get_mut(&3).unwrap(), || Ok(vec![]))
            .unwrap();
        conns.remove(&3);
        feed.closed(3);
        feed.added(keys(1)[0]);
        feed.flush(&mut conns, &mut BTreeSet::new());
        assert!(feed.subscribers.is_empty());
    }
}
