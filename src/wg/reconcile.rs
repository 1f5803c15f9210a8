//! Declarative reconcile: the desired device against the actual one, the
//! minimal change between them, and sending only that.

use std::collections::{BTreeSet, HashMap, HashSet};

use anyhow::{Result, bail};

use super::{AllowedIp, Backend, BackendKind, DeviceConfig, DeviceState, DeviceUpdate, PeerUpdate, WireCost};
use crate::keys::Key;

/// What one apply did.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ApplyReport {
    pub backend: BackendKind,
    /// The interface did not exist and this apply created it.
    pub created: bool,
    pub peers_added: usize,
    pub peers_removed: usize,
    pub peers_changed: usize,
    /// Whether anything besides peers (key, port, fwmark) changed.
    pub device_changed: bool,
    pub cost: WireCost,
}

impl ApplyReport {
    pub fn changed_anything(&self) -> bool {
        self.created || self.device_changed || self.peers_added + self.peers_removed + self.peers_changed > 0
    }
}

/// Refuses a desired device WireGuard would silently turn into something
/// else: the same peer twice, ourselves as a peer, or one address range
/// claimed by two peers (WireGuard would move it to whichever came last).
pub fn validate(desired: &DeviceConfig) -> Result<()> {
    let own = desired.private_key.public_key();
    let mut seen: HashMap<Key, usize> = HashMap::new();
    for (i, p) in desired.peers.iter().enumerate() {
        let name = peer_name(i, &p.public_key);
        if p.public_key == own {
            bail!("{name}: public key is the interface's own public key");
        }
        if let Some(first) = seen.insert(p.public_key, i) {
            bail!("{name}: same public key as {}", peer_name(first, &p.public_key));
        }
    }
    check_overlaps(desired)
}

/// How errors and logs name a peer: 1-based position in the config and short key.
pub fn peer_name(index: usize, key: &Key) -> String {
    format!("peer {} ({}…)", index + 1, key.short())
}

/// Nested prefixes on two peers are meaningful: WireGuard, like the
/// kernel's routing, picks the longest match (10.0.0.0/8 on one peer,
/// 10.1.0.0/16 on another). The same prefix on two peers is not: WireGuard
/// would move it to whichever came last.
fn check_overlaps(desired: &DeviceConfig) -> Result<()> {
    let mut owner: HashMap<AllowedIp, usize> = HashMap::new();
    for (i, p) in desired.peers.iter().enumerate() {
        for ip in &p.allowed_ips {
            let ip = AllowedIp::new(ip.addr, ip.cidr).unwrap_or(*ip);
            match owner.get(&ip) {
                Some(&first) if first != i => bail!(
                    "{}: allowed IP {ip} is also {}'s",
                    peer_name(i, &p.public_key),
                    peer_name(first, &desired.peers[first].public_key)
                ),
                _ => {
                    owner.insert(ip, i);
                }
            }
        }
    }
    Ok(())
}

fn normalised(ips: &[AllowedIp]) -> BTreeSet<AllowedIp> {
    ips.iter()
        .map(|ip| AllowedIp::new(ip.addr, ip.cidr).unwrap_or(*ip))
        .collect()
}

/// The minimal change turning `actual` into `desired`. Fields WireGuard
/// cannot clear (an endpoint it learnt by roaming, a port it picked) are
/// left alone when the desired config does not name them.
pub fn diff(desired: &DeviceConfig, actual: &DeviceState) -> DeviceUpdate {
    let mut update = DeviceUpdate::default();
    if actual.private_key != Some(desired.private_key) {
        update.private_key = Some(desired.private_key);
    }
    if let Some(port) = desired.listen_port
        && port != actual.listen_port
    {
        update.listen_port = Some(port);
    }
    let mark = desired.fwmark.unwrap_or(0);
    if mark != actual.fwmark {
        update.fwmark = Some(mark);
    }

    let wanted: HashSet<Key> = desired.peers.iter().map(|p| p.public_key).collect();
    // Removals first, so that nothing a removed peer held is in the way.
    for p in &actual.peers {
        if !wanted.contains(&p.public_key) {
            let mut u = PeerUpdate::new(p.public_key);
            u.remove = true;
            update.peers.push(u);
        }
    }
    let existing: HashMap<Key, &super::PeerState> = actual.peers.iter().map(|p| (p.public_key, p)).collect();
    for want in &desired.peers {
        let want_psk = want.preshared_key.unwrap_or(Key([0; 32]));
        let want_ka = want.persistent_keepalive.unwrap_or(0);
        let want_ips = normalised(&want.allowed_ips);
        let mut u = PeerUpdate::new(want.public_key);
        match existing.get(&want.public_key) {
            None => {
                u.preshared_key = (!want_psk.is_zero()).then_some(want_psk);
                u.endpoint = want.endpoint;
                u.persistent_keepalive = (want_ka != 0).then_some(want_ka);
                u.replace_allowed_ips = Some(want_ips.into_iter().collect());
                update.peers.push(u);
            }
            Some(have) => {
                if have.preshared_key.unwrap_or(Key([0; 32])) != want_psk {
                    u.preshared_key = Some(want_psk);
                }
                if want.endpoint.is_some() && want.endpoint != have.endpoint {
                    u.endpoint = want.endpoint;
                }
                if have.persistent_keepalive.unwrap_or(0) != want_ka {
                    u.persistent_keepalive = Some(want_ka);
                }
                if normalised(&have.allowed_ips) != want_ips {
                    u.replace_allowed_ips = Some(want_ips.into_iter().collect());
                }
                if u != PeerUpdate::new(want.public_key) {
                    update.peers.push(u);
                }
            }
        }
    }
    update
}

/// Makes interface `ifname` look like `desired`: validates, creates it when
/// missing, reads it, and sends the minimal change (nothing when it already
/// matches). An interface this call created is deleted again if configuring
/// it fails, so a failed apply leaves nothing behind.
pub fn apply(backend: &mut dyn Backend, ifname: &str, desired: &DeviceConfig) -> Result<ApplyReport> {
    validate(desired)?;
    let created = if backend.exists(ifname)? {
        false
    } else {
        backend.create(ifname)?;
        true
    };
    let result = configure(backend, ifname, desired, created);
    if result.is_err() && created {
        // The original error is what matters; a failed cleanup is secondary.
        if let Err(e) = backend.delete(ifname) {
            log!("warren: {ifname}: removing the half-configured interface failed: {e:#}");
        }
    }
    result
}

fn configure(
    backend: &mut dyn Backend,
    ifname: &str,
    desired: &DeviceConfig,
    created: bool,
) -> Result<ApplyReport> {
    // Backend errors already name the interface.
    let actual = backend.get(ifname)?;
    let update = diff(desired, &actual);
    let cost = if update.is_empty() {
        WireCost::default()
    } else {
        backend.set(ifname, &update)?
    };
    let present: HashSet<Key> = actual.peers.iter().map(|p| p.public_key).collect();
    let removed = update.peers.iter().filter(|p| p.remove).count();
    let added = update
        .peers
        .iter()
        .filter(|p| !p.remove && !present.contains(&p.public_key))
        .count();
    Ok(ApplyReport {
        backend: backend.kind(),
        created,
        peers_added: added,
        peers_removed: removed,
        peers_changed: update.peers.len() - added - removed,
        device_changed: update.private_key.is_some()
            || update.listen_port.is_some()
            || update.fwmark.is_some(),
        cost,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wg::{PeerConfig, PeerState};
    use std::net::SocketAddr;

    fn key(b: u8) -> Key {
        Key([b; 32])
    }

    fn ip(s: &str) -> AllowedIp {
        s.parse().unwrap()
    }

    fn peer(k: u8, ips: &[&str]) -> PeerConfig {
        PeerConfig {
            public_key: key(k),
            preshared_key: None,
            endpoint: None,
            allowed_ips: ips.iter().map(|s| ip(s)).collect(),
            persistent_keepalive: None,
        }
    }

    fn device(peers: Vec<PeerConfig>) -> DeviceConfig {
        DeviceConfig {
            private_key: key(200),
            listen_port: Some(51820),
            fwmark: None,
            peers,
        }
    }

    /// An in-memory WireGuard device with WireGuard's semantics, as the
    /// reference the diff is checked against.
    #[derive(Default)]
    struct Model {
        exists: bool,
        state: DeviceState,
        sets: usize,
        fail_set: bool,
        deleted: bool,
    }

    impl Model {
        fn apply_update(state: &mut DeviceState, u: &DeviceUpdate) {
            if let Some(k) = u.private_key {
                state.private_key = Some(k);
                state.public_key = Some(k.public_key());
            }
            if let Some(p) = u.listen_port {
                state.listen_port = p;
            }
            if let Some(m) = u.fwmark {
                state.fwmark = m;
            }
            for pu in &u.peers {
                let pos = state.peers.iter().position(|p| p.public_key == pu.public_key);
                if pu.remove {
                    if let Some(i) = pos {
                        state.peers.remove(i);
                    }
                    continue;
                }
                let i = pos.unwrap_or_else(|| {
                    state.peers.push(PeerState {
                        public_key: pu.public_key,
                        preshared_key: None,
                        endpoint: None,
                        allowed_ips: vec![],
                        persistent_keepalive: None,
                        last_handshake: None,
                        rx_bytes: 0,
                        tx_bytes: 0,
                    });
                    state.peers.len() - 1
                });
                if let Some(k) = pu.preshared_key {
                    state.peers[i].preshared_key = (!k.is_zero()).then_some(k);
                }
                if let Some(e) = pu.endpoint {
                    state.peers[i].endpoint = Some(e);
                }
                if let Some(ka) = pu.persistent_keepalive {
                    state.peers[i].persistent_keepalive = (ka != 0).then_some(ka);
                }
                if let Some(ips) = &pu.replace_allowed_ips {
                    // WireGuard moves an address range to the peer that claims it last.
                    for other in state.peers.iter_mut() {
                        other.allowed_ips.retain(|a| !ips.contains(a));
                    }
                    state.peers[i].allowed_ips = ips.clone();
                }
            }
        }
    }

    impl Backend for Model {
        fn kind(&self) -> BackendKind {
            BackendKind::Userspace
        }
        fn exists(&mut self, _: &str) -> Result<bool> {
            Ok(self.exists)
        }
        fn create(&mut self, _: &str) -> Result<()> {
            self.exists = true;
            self.state = DeviceState {
                listen_port: 40000,
                ..Default::default()
            };
            Ok(())
        }
        fn delete(&mut self, _: &str) -> Result<()> {
            self.exists = false;
            self.deleted = true;
            Ok(())
        }
        fn get(&mut self, _: &str) -> Result<DeviceState> {
            Ok(self.state.clone())
        }
        fn set(&mut self, _: &str, u: &DeviceUpdate) -> Result<WireCost> {
            assert!(!u.is_empty(), "an empty update must not be sent");
            if self.fail_set {
                bail!("errno 22 (Invalid argument)");
            }
            self.sets += 1;
            Model::apply_update(&mut self.state, u);
            Ok(WireCost {
                messages: 1,
                bytes: 1,
            })
        }
    }

    /// Whether `state` is what `desired` asks for.
    fn matches(desired: &DeviceConfig, state: &DeviceState) -> bool {
        if state.private_key != Some(desired.private_key) {
            return false;
        }
        if desired.listen_port.is_some_and(|p| p != state.listen_port) {
            return false;
        }
        if desired.fwmark.unwrap_or(0) != state.fwmark || desired.peers.len() != state.peers.len() {
            return false;
        }
        desired.peers.iter().all(|want| {
            state.peers.iter().any(|have| {
                have.public_key == want.public_key
                    && have.preshared_key == want.preshared_key.filter(|k| !k.is_zero())
                    && (want.endpoint.is_none() || have.endpoint == want.endpoint)
                    && have.persistent_keepalive == want.persistent_keepalive.filter(|&k| k != 0)
                    && normalised(&have.allowed_ips) == normalised(&want.allowed_ips)
            })
        })
    }

    fn state_of(desired: &DeviceConfig) -> DeviceState {
        let mut s = DeviceState::default();
        Model::apply_update(&mut s, &diff(desired, &DeviceState::default()));
        s
    }

    #[test]
    fn fresh_device_gets_everything() {
        let d = device(vec![peer(1, &["10.0.0.1/32"]), peer(2, &["10.0.0.2/32"])]);
        let u = diff(&d, &DeviceState::default());
        assert_eq!(u.private_key, Some(key(200)));
        assert_eq!(u.listen_port, Some(51820));
        assert_eq!(u.fwmark, None, "no mark wanted and none there");
        assert_eq!(u.peers.len(), 2);
        assert!(
            u.peers
                .iter()
                .all(|p| p.replace_allowed_ips.is_some() && !p.remove)
        );
        assert_eq!(u.peers[0].preshared_key, None);
        assert_eq!(u.peers[0].persistent_keepalive, None);
    }

    #[test]
    fn reapplying_is_empty() {
        let mut p = peer(1, &["10.0.0.1/32", "fd00::/64"]);
        p.endpoint = Some("[fd00::9]:51820".parse().unwrap());
        p.persistent_keepalive = Some(25);
        p.preshared_key = Some(key(9));
        let mut d = device(vec![p, peer(2, &[])]);
        d.fwmark = Some(7);
        let s = state_of(&d);
        assert!(diff(&d, &s).is_empty(), "{:?}", diff(&d, &s));
    }

    #[test]
    fn only_changed_fields_are_sent() {
        let d = device(vec![peer(1, &["10.0.0.1/32"])]);
        let s = state_of(&d);
        let mut d2 = d.clone();
        d2.peers[0].persistent_keepalive = Some(10);
        let u = diff(&d2, &s);
        assert_eq!(u.private_key, None);
        assert_eq!(u.listen_port, None);
        assert_eq!(u.peers.len(), 1);
        let mut expected = PeerUpdate::new(key(1));
        expected.persistent_keepalive = Some(10);
        assert_eq!(u.peers[0], expected);
    }

    #[test]
    fn clearing_keepalive_and_psk_sends_zero() {
        let mut p = peer(1, &[]);
        p.persistent_keepalive = Some(25);
        p.preshared_key = Some(key(9));
        let s = state_of(&device(vec![p]));
        let u = diff(&device(vec![peer(1, &[])]), &s);
        assert_eq!(u.peers[0].persistent_keepalive, Some(0));
        assert_eq!(u.peers[0].preshared_key, Some(Key([0; 32])));
        assert_eq!(u.peers[0].replace_allowed_ips, None);
    }

    #[test]
    fn allowed_ips_compare_as_normalised_sets() {
        let s = state_of(&device(vec![peer(1, &["10.0.0.0/24", "10.1.0.1/32"])]));
        let mut want = device(vec![peer(1, &[])]);
        // Different order, a duplicate, and host bits set: still the same set.
        want.peers[0].allowed_ips = vec![
            ip("10.1.0.1/32"),
            AllowedIp {
                addr: "10.0.0.77".parse().unwrap(),
                cidr: 24,
            },
            ip("10.1.0.1/32"),
        ];
        assert!(diff(&want, &s).is_empty());
        want.peers[0].allowed_ips.remove(0);
        want.peers[0].allowed_ips.pop();
        let u = diff(&want, &s);
        assert_eq!(u.peers[0].replace_allowed_ips, Some(vec![ip("10.0.0.0/24")]));
    }

    #[test]
    fn endpoint_left_alone_when_not_configured() {
        let d = device(vec![peer(1, &[])]);
        let mut s = state_of(&d);
        // WireGuard learnt the endpoint from the peer's packets.
        s.peers[0].endpoint = Some("198.51.100.7:1234".parse().unwrap());
        assert!(diff(&d, &s).is_empty());
        let mut d2 = d.clone();
        let ep: SocketAddr = "203.0.113.2:51820".parse().unwrap();
        d2.peers[0].endpoint = Some(ep);
        assert_eq!(diff(&d2, &s).peers[0].endpoint, Some(ep));
    }

    #[test]
    fn listen_port_and_fwmark() {
        let mut d = device(vec![]);
        d.listen_port = None;
        let mut s = state_of(&d);
        s.listen_port = 41234;
        assert!(diff(&d, &s).is_empty(), "a picked port is kept");
        s.fwmark = 5;
        assert_eq!(diff(&d, &s).fwmark, Some(0), "an unwanted mark is cleared");
        d.fwmark = Some(5);
        assert!(diff(&d, &s).is_empty());
    }

    #[test]
    fn extra_peers_are_removed_first() {
        let s = state_of(&device(vec![peer(1, &["10.0.0.1/32"])]));
        let u = diff(&device(vec![peer(2, &["10.0.0.1/32"])]), &s);
        assert!(u.peers[0].remove && u.peers[0].public_key == key(1));
        assert_eq!(u.peers[1].public_key, key(2));
    }

    #[test]
    fn private_key_change() {
        let d = device(vec![]);
        let s = state_of(&d);
        let mut d2 = d.clone();
        d2.private_key = key(201);
        let u = diff(&d2, &s);
        assert_eq!(u.private_key, Some(key(201)));
        assert!(u.peers.is_empty());
    }

    #[test]
    fn validate_rejects_duplicates_self_and_overlaps() {
        let err = validate(&device(vec![peer(1, &[]), peer(1, &[])]))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("peer 2 (AQEBAQEB…): same public key as peer 1"),
            "{err}"
        );

        let mut d = device(vec![peer(1, &[])]);
        d.peers[0].public_key = d.private_key.public_key();
        let err = validate(&d).unwrap_err().to_string();
        assert!(err.contains("own public key"), "{err}");

        let err = validate(&device(vec![
            peer(1, &["10.9.0.0/24"]),
            peer(2, &["10.9.0.7/24"]),
        ]))
        .unwrap_err()
        .to_string();
        assert_eq!(
            err,
            "peer 2 (AgICAgIC…): allowed IP 10.9.0.0/24 is also peer 1 (AQEBAQEB…)'s"
        );
        assert!(validate(&device(vec![peer(1, &["::/0"]), peer(2, &["::/0"])])).is_err());
        assert!(
            validate(&device(vec![
                peer(1, &["10.0.0.1/32"]),
                peer(2, &["10.0.0.1/32"])
            ]))
            .is_err()
        );
    }

    /// Longest-prefix match makes nested prefixes on two peers meaningful:
    /// subnet routes (10.0.0.0/8 behind one node, 10.1.0.0/16 behind
    /// another) and an exit node's 0.0.0.0/0 beside every mesh address.
    #[test]
    fn validate_accepts_nested_prefixes_on_different_peers() {
        validate(&device(vec![
            peer(1, &["10.9.0.0/24"]),
            peer(2, &["10.9.0.2/32"]),
        ]))
        .unwrap();
        validate(&device(vec![
            peer(1, &["10.0.0.0/8", "0.0.0.0/0"]),
            peer(2, &["10.1.0.0/16", "100.64.0.9/32"]),
            peer(3, &["::/0"]),
            peer(4, &["fd00::1/128"]),
        ]))
        .unwrap();
    }

    #[test]
    fn validate_accepts_disjoint_and_same_peer_overlaps() {
        validate(&device(vec![
            peer(1, &["10.0.0.0/24", "10.0.0.1/32", "fd00::/64"]),
            peer(2, &["10.0.1.0/24", "0.0.0.0/32"]),
            peer(3, &["11.0.0.0/8", "fd01::/64"]),
        ]))
        .unwrap();
        // IPv4 0.0.0.0/0 and IPv6 ::/0 do not overlap each other.
        validate(&device(vec![peer(1, &["0.0.0.0/0"]), peer(2, &["::/0"])])).unwrap();
    }

    #[test]
    fn apply_creates_sets_and_reapplies_nothing() {
        let d = device(vec![peer(1, &["10.0.0.1/32"]), peer(2, &["10.0.0.2/32"])]);
        let mut m = Model::default();
        let r = apply(&mut m, "wg0", &d).unwrap();
        assert!(r.created && r.device_changed);
        assert_eq!((r.peers_added, r.peers_removed, r.peers_changed), (2, 0, 0));
        assert_eq!(m.sets, 1);
        let r = apply(&mut m, "wg0", &d).unwrap();
        assert!(!r.changed_anything());
        assert_eq!(r.cost, WireCost::default());
        assert_eq!(m.sets, 1, "re-apply sends nothing");

        let mut d2 = d.clone();
        d2.peers.remove(0);
        d2.peers[0].persistent_keepalive = Some(5);
        d2.peers.push(peer(3, &["10.0.0.3/32"]));
        let r = apply(&mut m, "wg0", &d2).unwrap();
        assert_eq!((r.peers_added, r.peers_removed, r.peers_changed), (1, 1, 1));
        assert!(matches(&d2, &m.state));
    }

    #[test]
    fn apply_validates_before_touching_anything() {
        let mut m = Model::default();
        assert!(apply(&mut m, "wg0", &device(vec![peer(1, &[]), peer(1, &[])])).is_err());
        assert!(!m.exists && m.sets == 0);
    }

    #[test]
    fn failed_apply_deletes_what_it_created() {
        let mut m = Model {
            fail_set: true,
            ..Default::default()
        };
        let err = apply(&mut m, "wg0", &device(vec![peer(1, &[])])).unwrap_err();
        assert!(format!("{err:#}").starts_with("errno 22"), "{err:#}");
        assert!(m.deleted && !m.exists);
        // An interface that was already there is left as it was.
        let mut m = Model {
            fail_set: true,
            ..Default::default()
        };
        m.create("wg0").unwrap();
        assert!(apply(&mut m, "wg0", &device(vec![peer(1, &[])])).is_err());
        assert!(!m.deleted && m.exists);
    }

    /// Deterministic generator so the property test needs no extra crate.
    struct XorShift(u64);
    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// A random valid device over a small key and address space, so random
    /// pairs share many peers and addresses.
    fn random_device(rng: &mut XorShift) -> DeviceConfig {
        let mut peers = Vec::new();
        let mut keys: Vec<u8> = (1..=8).collect();
        // One small shared address pool, so that between two random devices
        // ranges move from peer to peer; a range overlapping another peer's
        // is dropped to keep the device valid.
        for _ in 0..rng.below(6) {
            let k = keys.remove(rng.below(keys.len() as u64) as usize);
            let mut ips: Vec<AllowedIp> = Vec::new();
            for _ in 0..rng.below(4) {
                let candidate = if rng.below(2) == 0 {
                    ip(&format!(
                        "10.0.{}.{}/{}",
                        rng.below(4),
                        rng.below(8),
                        22 + rng.below(11)
                    ))
                } else {
                    ip(&format!("fd00::{:x}/{}", rng.below(8), 124 + rng.below(5)))
                };
                let taken = peers
                    .iter()
                    .any(|p: &PeerConfig| p.allowed_ips.iter().any(|a| a.overlaps(&candidate)));
                if !taken {
                    ips.push(candidate);
                }
            }
            peers.push(PeerConfig {
                public_key: key(k),
                preshared_key: [None, Some(key(50)), Some(key(51))][rng.below(3) as usize],
                endpoint: [
                    None,
                    Some("203.0.113.2:51820".parse().unwrap()),
                    Some("[fd00::1]:1".parse().unwrap()),
                ][rng.below(3) as usize],
                allowed_ips: ips,
                persistent_keepalive: [None, Some(25), Some(0)][rng.below(3) as usize],
            });
        }
        DeviceConfig {
            private_key: key(200 + rng.below(2) as u8),
            listen_port: [None, Some(51820), Some(51821)][rng.below(3) as usize],
            fwmark: [None, Some(0), Some(7)][rng.below(3) as usize],
            peers,
        }
    }

    #[test]
    fn property_diff_turns_actual_into_desired() {
        let mut rng = XorShift(0x2545_F491_4F6C_DD1D);
        let mut moved = 0;
        for round in 0..3000 {
            let before = random_device(&mut rng);
            let desired = random_device(&mut rng);
            validate(&desired).unwrap();
            let mut state = state_of(&before);
            // WireGuard may hold learnt endpoints and a picked port.
            if rng.below(2) == 0 {
                state.listen_port = 30000;
            }
            if let Some(p) = state.peers.first_mut() {
                p.endpoint = Some("198.51.100.9:4500".parse().unwrap());
            }
            // Count rounds where a range moves from one peer to another.
            if desired.peers.iter().any(|d| {
                state.peers.iter().any(|a| {
                    a.public_key != d.public_key && a.allowed_ips.iter().any(|x| d.allowed_ips.contains(x))
                })
            }) {
                moved += 1;
            }
            let u = diff(&desired, &state);
            Model::apply_update(&mut state, &u);
            assert!(
                matches(&desired, &state),
                "round {round}: {desired:?} vs {state:?} via {u:?}"
            );
            assert!(
                diff(&desired, &state).is_empty(),
                "round {round}: second diff not empty"
            );
            // Minimality: no peer update names a field it does not change.
            for pu in u.peers.iter().filter(|p| !p.remove) {
                assert!(
                    pu.preshared_key.is_some()
                        || pu.endpoint.is_some()
                        || pu.persistent_keepalive.is_some()
                        || pu.replace_allowed_ips.is_some()
                );
            }
        }
        assert!(moved > 100, "only {moved} rounds moved a range between peers");
    }

    #[test]
    fn ten_thousand_peers_validate_and_diff() {
        let peers: Vec<PeerConfig> = (0..10_000u32)
            .map(|i| {
                let mut k = [0u8; 32];
                k[..4].copy_from_slice(&i.to_be_bytes());
                k[31] = 1;
                PeerConfig {
                    public_key: Key(k),
                    preshared_key: None,
                    endpoint: None,
                    allowed_ips: vec![ip(&format!("10.{}.{}.{}/32", i >> 16, (i >> 8) & 255, i & 255))],
                    persistent_keepalive: None,
                }
            })
            .collect();
        let d = device(peers);
        validate(&d).unwrap();
        // Built directly: the model's linear peer lookup would dominate.
        let s = DeviceState {
            private_key: Some(d.private_key),
            public_key: Some(d.private_key.public_key()),
            listen_port: 51820,
            fwmark: 0,
            peers: d
                .peers
                .iter()
                .map(|p| PeerState {
                    public_key: p.public_key,
                    preshared_key: None,
                    endpoint: None,
                    allowed_ips: p.allowed_ips.clone(),
                    persistent_keepalive: None,
                    last_handshake: None,
                    rx_bytes: 0,
                    tx_bytes: 0,
                })
                .collect(),
        };
        assert!(diff(&d, &s).is_empty());
    }
}
