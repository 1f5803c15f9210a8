//! The peer map as every node receives it, held in memory by the hub.
//!
//! Each entry is encoded once, when it changes; the full `peer_map` message is
//! spliced from those encodings once per map version and shared by every
//! connection that needs it (`Arc<[u8]>`). So a connect costs a copy of
//! bytes already made, never a database read or an encoding of the whole
//! mesh: a coordinator restart meets 10,000 reconnecting nodes at once.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::control::messages::{self, PeerInfo, ServerMessage};

#[derive(Default)]
pub struct PeerMap {
    /// Each node's entry, already encoded as it appears in `nodes`.
    entries: BTreeMap<u64, Box<[u8]>>,
    version: u64,
    /// The whole `peer_map` message at `version`; dropped by every change.
    full: Option<Arc<[u8]>>,
}

impl PeerMap {
    pub fn new(version: u64, nodes: impl IntoIterator<Item = PeerInfo>) -> PeerMap {
        let mut map = PeerMap {
            version,
            ..PeerMap::default()
        };
        for n in nodes {
            map.upsert(&n);
        }
        map
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn contains(&self, id: u64) -> bool {
        self.entries.contains_key(&id)
    }

    /// Whether `node` is its entry here with only the online flag changed.
    pub fn only_online_differs(&self, node: &PeerInfo) -> bool {
        let Some(entry) = self.entries.get(&node.id) else {
            return false;
        };
        let flipped = PeerInfo {
            online: !node.online,
            ..node.clone()
        };
        **entry == *messages::encode(&flipped)
    }

    pub fn upsert(&mut self, node: &PeerInfo) {
        self.entries.insert(node.id, messages::encode(node).into());
        self.full = None;
    }

    pub fn remove(&mut self, id: u64) {
        if self.entries.remove(&id).is_some() {
            self.full = None;
        }
    }

    /// Starts the next version: the changes since the last call are its delta.
    pub fn bump(&mut self) -> u64 {
        self.version += 1;
        self.full = None;
        self.version
    }

    /// The `peer_map` message for the current version, encoded at most once per version.
    pub fn full(&mut self) -> Arc<[u8]> {
        if let Some(f) = &self.full {
            return f.clone();
        }
        // Splice the entries into the encoding of an empty map, so the frame
        // is exactly what encoding the whole message would give.
        let empty = messages::encode(&ServerMessage::PeerMap {
            version: self.version,
            nodes: Vec::new(),
        });
        let tail = empty
            .windows(NODES_TAIL.len())
            .rposition(|w| w == NODES_TAIL)
            .expect("an empty peer map ends in an empty node list");
        let body: usize = self.entries.values().map(|e| e.len() + 1).sum();
        let mut out = Vec::with_capacity(empty.len() + body);
        out.extend_from_slice(&empty[..tail + 1]);
        for (i, e) in self.entries.values().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(e);
        }
        out.extend_from_slice(&empty[tail + 1..]);
        let full: Arc<[u8]> = out.into();
        self.full = Some(full.clone());
        full
    }
}

/// How the node list of an empty map is encoded (`"nodes":[]`): the entries go between the brackets.
const NODES_TAIL: &[u8] = b"[]";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::Key;
    use std::net::Ipv4Addr;

    fn peer(id: u64, name: &str) -> PeerInfo {
        PeerInfo {
            id,
            name: name.into(),
            mesh_addr: Ipv4Addr::new(100, 64, 0, 8 + id as u8),
            public_key: Key::generate_private().public_key(),
            candidates: Vec::new(),
            online: id.is_multiple_of(2),
            home_relay: id.is_multiple_of(3).then(|| Key::generate_private().public_key()),
            routes: Vec::new(),
            exit: false,
        }
    }

    fn whole(version: u64, nodes: &[PeerInfo]) -> Vec<u8> {
        messages::encode(&ServerMessage::PeerMap {
            version,
            nodes: nodes.to_vec(),
        })
    }

    #[test]
    fn full_map_is_byte_for_byte_the_encoded_message() {
        for n in [0, 1, 2, 7] {
            let nodes: Vec<PeerInfo> = (1..=n).map(|i| peer(i, &format!("n-{i}"))).collect();
            let mut map = PeerMap::new(42, nodes.clone());
            assert_eq!(&*map.full(), whole(42, &nodes).as_slice(), "{n} nodes");
        }
    }

    #[test]
    fn tells_an_online_change_from_any_other() {
        let a = peer(1, "a");
        let map = PeerMap::new(1, [a.clone()]);
        let back = PeerInfo {
            online: !a.online,
            ..a.clone()
        };
        assert!(map.only_online_differs(&back));
        assert!(
            !map.only_online_differs(&a),
            "no change at all is not an online change"
        );
        let renamed = PeerInfo {
            name: "a2".into(),
            ..back
        };
        assert!(!map.only_online_differs(&renamed));
        assert!(!map.only_online_differs(&peer(2, "new")), "a new entry is not");
    }

    #[test]
    fn encoded_once_per_version_and_every_change_makes_a_new_one() {
        let mut map = PeerMap::new(1, [peer(1, "a"), peer(2, "b")]);
        let first = map.full();
        assert!(
            Arc::ptr_eq(&first, &map.full()),
            "same version: the same bytes, not a new encoding"
        );
        let mut renamed = peer(2, "b2");
        map.upsert(&renamed);
        map.bump();
        let second = map.full();
        assert!(!Arc::ptr_eq(&first, &second));
        let text = String::from_utf8(second.to_vec()).unwrap();
        assert!(
            text.contains(r#""name":"b2""#) && text.contains(r#""version":2"#),
            "{text}"
        );
        renamed.online = !renamed.online;
        map.upsert(&renamed);
        assert!(
            !Arc::ptr_eq(&second, &map.full()),
            "a change without a new version is still seen"
        );
        map.remove(1);
        map.bump();
        assert_eq!(&*map.full(), whole(3, &[renamed]).as_slice());
    }
}
