//! Sealed peer messages: node-to-node boxes that a relay (or anyone on the
//! path) can carry but not read, forge or replay.
//!
//! Key agreement is X25519 static-static between the two nodes' WireGuard
//! keys. Each direction and each sender epoch gets its own ChaCha20Poly1305
//! key, `BLAKE2s-MAC(key = DH, LABEL ‖ sender ‖ receiver ‖ epoch)`, so the
//! same WireGuard key used elsewhere (Noise prologues, WireGuard itself) never
//! yields the same symmetric key, a message cannot be reflected back to its
//! sender, and a nonce never repeats under one key.
//!
//! Wire format (all integers big-endian):
//!
//! ```text
//! version (1) | sender public key (32) | epoch (8) | counter (8) | ciphertext ‖ tag (16)
//! ```
//!
//! The sender key is authenticated twice: only its private key (or ours) can
//! compute the DH secret the box key comes from, and the whole header plus the
//! receiver's key are the AEAD's associated data.
//!
//! Replay: the counter is the AEAD nonce and the receiver keeps a 2048-message
//! sliding window per sender, like WireGuard's transport counters.
//!
//! Restarts: a sender that restarts starts its counter at 0 again, which a plain
//! counter window would drop forever. We add an explicit `epoch` chosen by the
//! sender when it starts, normally its wall clock in nanoseconds
//! ([`epoch_from_clock`]). The receiver accepts a higher epoch (and forgets
//! the old window), checks the window within the current epoch, and drops a
//! lower epoch: an old epoch's messages cannot be replayed after the switch.
//! This is the same trust WireGuard places in the TAI64N timestamp of its
//! handshake initiation. The cost is the same too: a sender whose clock went
//! backwards across a restart is ignored until its clock passes its old epoch;
//! a caller that persists its last epoch can pass `max(clock, last + 1)`.
//! A timestamp-derived counter alone (no epoch field) would do the same with
//! fewer bytes, but couples the replay window to clock jumps while running.

use std::collections::HashMap;
use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use blake2::Blake2sMac256;
use blake2::digest::{FixedOutput, Mac};
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Nonce};

use crate::keys::{KEY_LEN, Key};

/// Version byte, first on the wire. It has the high bit set so it can never be
/// a WireGuard message type (1–4): a relay payload is one or the other by its first byte.
pub const SEAL_VERSION: u8 = 0x81;
/// Domain label: this is the only place a node's WireGuard key seals peer messages.
const LABEL: &[u8] = b"warren sealed peer message v1";
pub const HEADER_LEN: usize = 1 + KEY_LEN + 8 + 8;
pub const TAG_LEN: usize = 16;
/// Smallest valid box: header and the tag of an empty payload.
pub const MIN_SEALED_LEN: usize = HEADER_LEN + TAG_LEN;
/// Messages a receiver still accepts behind the highest counter it has seen.
pub const REPLAY_WINDOW: u64 = 2048;
/// Largest payload; sealed messages travel in one relay frame or one UDP datagram.
pub const MAX_PAYLOAD_LEN: usize = 60 * 1024;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OpenError {
    Truncated(usize),
    Version(u8),
    UnknownSender(Key),
    /// The sender's key is a low-order point: no secret can be agreed with it.
    WeakKey(Key),
    /// The sender already moved on to a newer epoch.
    StaleEpoch {
        epoch: u64,
        current: u64,
    },
    /// Counter fell behind the replay window.
    TooOld {
        counter: u64,
        highest: u64,
    },
    Replayed(u64),
    /// Tampered, truncated inside the ciphertext, or sealed with another key.
    Authentication,
}

impl fmt::Display for OpenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OpenError::Truncated(n) => {
                write!(f, "sealed message of {n} bytes is shorter than {MIN_SEALED_LEN}")
            }
            OpenError::Version(v) => write!(f, "unsupported sealed message version {v}"),
            OpenError::UnknownSender(k) => write!(f, "sealed message from unknown key {}", k.short()),
            OpenError::WeakKey(k) => write!(f, "sealed message from low-order key {}", k.short()),
            OpenError::StaleEpoch { epoch, current } => {
                write!(
                    f,
                    "sealed message from old epoch {epoch} (sender is at {current})"
                )
            }
            OpenError::TooOld { counter, highest } => {
                write!(
                    f,
                    "sealed message counter {counter} is behind the replay window (highest {highest})"
                )
            }
            OpenError::Replayed(c) => write!(f, "sealed message counter {c} was already received"),
            OpenError::Authentication => write!(f, "sealed message failed authentication"),
        }
    }
}

impl std::error::Error for OpenError {}

/// The sender's wall clock in nanoseconds since 1970: a fresh epoch per start.
pub fn epoch_from_clock() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Sliding bitmap over the last [`REPLAY_WINDOW`] counters of one sender epoch.
#[derive(Clone, Debug)]
struct ReplayWindow {
    /// Highest counter accepted; `None` before the first message.
    highest: Option<u64>,
    /// Bit `c % REPLAY_WINDOW` is set when counter `c` (within the window) was accepted.
    bits: [u64; (REPLAY_WINDOW / 64) as usize],
}

impl ReplayWindow {
    fn new() -> ReplayWindow {
        ReplayWindow {
            highest: None,
            bits: [0; (REPLAY_WINDOW / 64) as usize],
        }
    }

    fn bit(c: u64) -> (usize, u64) {
        let i = c % REPLAY_WINDOW;
        ((i / 64) as usize, 1u64 << (i % 64))
    }

    /// Checks without recording: only authenticated messages may move the window.
    fn check(&self, c: u64) -> Result<(), OpenError> {
        let Some(highest) = self.highest else {
            return Ok(());
        };
        if c > highest {
            return Ok(());
        }
        if highest - c >= REPLAY_WINDOW {
            return Err(OpenError::TooOld { counter: c, highest });
        }
        let (word, mask) = Self::bit(c);
        if self.bits[word] & mask != 0 {
            return Err(OpenError::Replayed(c));
        }
        Ok(())
    }

    fn record(&mut self, c: u64) {
        match self.highest {
            Some(h) if c <= h => {}
            Some(h) if c - h < REPLAY_WINDOW => {
                // Clear the slots of the counters skipped over: they now stand for newer counters.
                for skipped in h + 1..=c {
                    let (word, mask) = Self::bit(skipped);
                    self.bits[word] &= !mask;
                }
                self.highest = Some(c);
            }
            _ => {
                self.bits = [0; (REPLAY_WINDOW / 64) as usize];
                self.highest = Some(c);
            }
        }
        let (word, mask) = Self::bit(c);
        self.bits[word] |= mask;
    }
}

struct PeerSeal {
    /// X25519(our private, their public); the root of both directions' keys.
    shared: [u8; 32],
    tx_counter: u64,
    tx_cipher: ChaCha20Poly1305,
    rx_epoch: Option<u64>,
    rx_window: ReplayWindow,
}

/// One node's sealing state: its key, its epoch, and per peer the counters and windows.
pub struct Sealer {
    private: Key,
    public: Key,
    epoch: u64,
    peers: HashMap<Key, PeerSeal>,
}

fn derive_cipher(shared: &[u8; 32], sender: &Key, receiver: &Key, epoch: u64) -> ChaCha20Poly1305 {
    let mut mac = <Blake2sMac256 as KeyInit>::new_from_slice(shared).expect("32-byte BLAKE2s key is valid");
    Mac::update(&mut mac, LABEL);
    Mac::update(&mut mac, &sender.0);
    Mac::update(&mut mac, &receiver.0);
    Mac::update(&mut mac, &epoch.to_be_bytes());
    let key = mac.finalize_fixed();
    ChaCha20Poly1305::new(&key)
}

fn nonce(counter: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_be_bytes());
    n.into()
}

fn aad(header: &[u8], receiver: &Key) -> Vec<u8> {
    [header, &receiver.0[..]].concat()
}

impl Sealer {
    /// `epoch` must grow across restarts of this node; see the module comment.
    pub fn new(private: Key, epoch: u64) -> Sealer {
        Sealer {
            public: private.public_key(),
            private,
            epoch,
            peers: HashMap::new(),
        }
    }

    pub fn public_key(&self) -> Key {
        self.public
    }

    /// Accepts messages from `peer` and allows sealing to it. Keeps existing
    /// counters and windows if the peer is already known.
    pub fn add_peer(&mut self, peer: Key) -> Result<(), OpenError> {
        if self.peers.contains_key(&peer) {
            return Ok(());
        }
        let secret = x25519_dalek::StaticSecret::from(self.private.0);
        let shared = secret.diffie_hellman(&x25519_dalek::PublicKey::from(peer.0));
        if !shared.was_contributory() {
            return Err(OpenError::WeakKey(peer));
        }
        let shared = shared.to_bytes();
        let tx_cipher = derive_cipher(&shared, &self.public, &peer, self.epoch);
        self.peers.insert(
            peer,
            PeerSeal {
                shared,
                tx_counter: 0,
                tx_cipher,
                rx_epoch: None,
                rx_window: ReplayWindow::new(),
            },
        );
        Ok(())
    }

    pub fn remove_peer(&mut self, peer: &Key) {
        self.peers.remove(peer);
    }

    /// Forgets every peer not in `keep`.
    pub fn retain_peers(&mut self, keep: &std::collections::HashSet<Key>) {
        self.peers.retain(|k, _| keep.contains(k));
    }

    /// Seals `payload` for `to`, which must have been added with [`Sealer::add_peer`].
    pub fn seal(&mut self, to: &Key, payload: &[u8]) -> anyhow::Result<Vec<u8>> {
        if payload.len() > MAX_PAYLOAD_LEN {
            anyhow::bail!(
                "sealing for {}: payload of {} bytes exceeds {MAX_PAYLOAD_LEN}",
                to.short(),
                payload.len()
            );
        }
        let peer = self
            .peers
            .get_mut(to)
            .ok_or_else(|| anyhow::anyhow!("sealing for {}: not a known peer", to.short()))?;
        let counter = peer.tx_counter;
        peer.tx_counter += 1;
        let mut out = Vec::with_capacity(MIN_SEALED_LEN + payload.len());
        out.push(SEAL_VERSION);
        out.extend_from_slice(&self.public.0);
        out.extend_from_slice(&self.epoch.to_be_bytes());
        out.extend_from_slice(&counter.to_be_bytes());
        let ct = peer
            .tx_cipher
            .encrypt(
                &nonce(counter),
                Payload {
                    msg: payload,
                    aad: &aad(&out, to),
                },
            )
            .map_err(|_| anyhow::anyhow!("sealing for {}: encryption failed", to.short()))?;
        out.extend_from_slice(&ct);
        Ok(out)
    }

    /// Opens a sealed message; returns the proven sender and the payload.
    pub fn open(&mut self, msg: &[u8]) -> Result<(Key, Vec<u8>), OpenError> {
        if msg.len() < MIN_SEALED_LEN {
            return Err(OpenError::Truncated(msg.len()));
        }
        if msg[0] != SEAL_VERSION {
            return Err(OpenError::Version(msg[0]));
        }
        let (header, body) = msg.split_at(HEADER_LEN);
        let sender = Key(header[1..1 + KEY_LEN].try_into().expect("slice of KEY_LEN"));
        let epoch = u64::from_be_bytes(header[1 + KEY_LEN..9 + KEY_LEN].try_into().expect("8 bytes"));
        let counter = u64::from_be_bytes(header[9 + KEY_LEN..].try_into().expect("8 bytes"));
        let me = self.public;
        let peer = self
            .peers
            .get_mut(&sender)
            .ok_or(OpenError::UnknownSender(sender))?;
        let same_epoch = match peer.rx_epoch {
            Some(current) if epoch < current => return Err(OpenError::StaleEpoch { epoch, current }),
            Some(current) => epoch == current,
            None => false,
        };
        if same_epoch {
            peer.rx_window.check(counter)?;
        }
        let cipher = derive_cipher(&peer.shared, &sender, &me, epoch);
        let plain = cipher
            .decrypt(
                &nonce(counter),
                Payload {
                    msg: body,
                    aad: &aad(header, &me),
                },
            )
            .map_err(|_| OpenError::Authentication)?;
        if !same_epoch {
            peer.rx_epoch = Some(epoch);
            peer.rx_window = ReplayWindow::new();
        }
        peer.rx_window.record(counter);
        Ok((sender, plain))
    }
}

/// Opens arbitrary bytes as a sealed message from a known peer; the fuzz
/// target and the no-panic test share it. Returns whether it opened.
pub fn fuzz_open(data: &[u8]) -> bool {
    thread_local! {
        static RECEIVER: std::cell::RefCell<Sealer> = std::cell::RefCell::new({
            let mut s = Sealer::new(Key([0x42; 32]), 1);
            let _ = s.add_peer(Key([0x24; 32]).public_key());
            s
        });
    }
    RECEIVER.with(|r| r.borrow_mut().open(data).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> Key {
        let mut k = [b; 32];
        k[0] &= 248;
        k[31] &= 127;
        k[31] |= 64;
        Key(k)
    }

    fn pair(epoch_a: u64) -> (Sealer, Sealer) {
        let (a, b) = (key(1), key(2));
        let mut sa = Sealer::new(a, epoch_a);
        let mut sb = Sealer::new(b, 7);
        sa.add_peer(b.public_key()).unwrap();
        sb.add_peer(a.public_key()).unwrap();
        (sa, sb)
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn test_vector_exact_bytes() {
        let (mut a, mut b) = pair(0x0102_0304_0506_0708);
        let to = b.public_key();
        let m0 = a.seal(&to, b"hello").unwrap();
        let m1 = a.seal(&to, b"").unwrap();
        assert_eq!(hex(&m0), VECTOR_0);
        assert_eq!(hex(&m1), VECTOR_1);
        assert_eq!(b.open(&m0).unwrap(), (a.public_key(), b"hello".to_vec()));
        assert_eq!(b.open(&m1).unwrap(), (a.public_key(), Vec::new()));
    }

    // Pinned output of this implementation (sender key(1), receiver key(2), epoch
    // 0x0102030405060708, counters 0 and 1): any change to the wire format or the
    // KDF breaks compatibility between versions and must show up here.
    const VECTOR_0: &str = "81a4e09292b651c278b9772c569f5fa9bb13d906b46ab68c9df9dc2b4409f8a20901020304050607080000000000000000ba5aa01761db29f1d005df21fb5b17479142ffbcbb";
    const VECTOR_1: &str = "81a4e09292b651c278b9772c569f5fa9bb13d906b46ab68c9df9dc2b4409f8a20901020304050607080000000000000001b2eeec60b74e7d12b28ffbc676abfd26";

    #[test]
    fn round_trip_both_directions() {
        let (mut a, mut b) = pair(5);
        let (pa, pb) = (a.public_key(), b.public_key());
        let m = a.seal(&pb, b"candidates").unwrap();
        assert_eq!(b.open(&m).unwrap(), (pa, b"candidates".to_vec()));
        let m = b.seal(&pa, b"pong").unwrap();
        assert_eq!(a.open(&m).unwrap(), (pb, b"pong".to_vec()));
    }

    #[test]
    fn tampering_anywhere_is_rejected() {
        let (mut a, mut b) = pair(5);
        let m = a.seal(&b.public_key(), b"some payload").unwrap();
        for i in 0..m.len() {
            let mut t = m.clone();
            t[i] ^= 0x01;
            let err = b.open(&t).unwrap_err();
            match i {
                0 => assert_eq!(err, OpenError::Version(SEAL_VERSION ^ 1)),
                // Flipping a sender-key bit names a key we do not know.
                1..=32 => assert!(matches!(err, OpenError::UnknownSender(_)), "{i}: {err}"),
                _ => assert_eq!(err, OpenError::Authentication, "byte {i}"),
            }
        }
        // The untouched message still opens: failed attempts did not move the window.
        assert!(b.open(&m).is_ok());
    }

    #[test]
    fn replay_is_rejected() {
        let (mut a, mut b) = pair(5);
        let m = a.seal(&b.public_key(), b"once").unwrap();
        b.open(&m).unwrap();
        assert_eq!(b.open(&m), Err(OpenError::Replayed(0)));
    }

    #[test]
    fn reordering_within_window_is_accepted_beyond_is_dropped() {
        let (mut a, mut b) = pair(5);
        let to = b.public_key();
        let msgs: Vec<Vec<u8>> = (0..REPLAY_WINDOW + 10)
            .map(|_| a.seal(&to, b"x").unwrap())
            .collect();
        // Deliver 5 first, then 0..5 out of order: all inside the window.
        b.open(&msgs[5]).unwrap();
        for i in [3, 0, 4, 1, 2] {
            b.open(&msgs[i]).unwrap();
        }
        assert_eq!(b.open(&msgs[3]), Err(OpenError::Replayed(3)));
        // Jump ahead: counter 6 is now exactly REPLAY_WINDOW behind and too old; 7 is inside.
        let last = REPLAY_WINDOW as usize + 6;
        b.open(&msgs[last]).unwrap();
        assert_eq!(
            b.open(&msgs[6]),
            Err(OpenError::TooOld {
                counter: 6,
                highest: last as u64
            })
        );
        b.open(&msgs[7]).unwrap();
        assert_eq!(b.open(&msgs[7]), Err(OpenError::Replayed(7)));
        // A slot reused by the ring for a newer counter does not carry an old mark.
        b.open(&msgs[last + 1]).unwrap();
        b.open(&msgs[last - 1]).unwrap();
    }

    #[test]
    fn restarted_sender_with_newer_epoch_is_accepted_old_epoch_is_not() {
        let (mut a, mut b) = pair(100);
        let to = b.public_key();
        let old0 = a.seal(&to, b"before restart").unwrap();
        let old1 = a.seal(&to, b"before restart 2").unwrap();
        b.open(&old0).unwrap();
        // Restart: same key, counter back at 0, later epoch.
        let mut a2 = Sealer::new(key(1), 200);
        a2.add_peer(to).unwrap();
        let new0 = a2.seal(&to, b"after restart").unwrap();
        assert_eq!(b.open(&new0).unwrap().1, b"after restart");
        assert_eq!(
            b.open(&old1),
            Err(OpenError::StaleEpoch {
                epoch: 100,
                current: 200
            })
        );
        assert_eq!(b.open(&new0), Err(OpenError::Replayed(0)));
    }

    #[test]
    fn forged_newer_epoch_does_not_reset_the_window() {
        let (mut a, mut b) = pair(100);
        let m = a.seal(&b.public_key(), b"x").unwrap();
        b.open(&m).unwrap();
        let mut forged = m.clone();
        forged[1 + KEY_LEN + 7] ^= 0x80; // epoch += 128, no valid tag
        assert_eq!(b.open(&forged), Err(OpenError::Authentication));
        assert_eq!(b.open(&m), Err(OpenError::Replayed(0)));
    }

    #[test]
    fn wrong_keys_are_rejected() {
        let (mut a, _) = pair(5);
        let m = a.seal(&key(2).public_key(), b"for b").unwrap();
        // C knows A, but the box was for B.
        let mut c = Sealer::new(key(3), 1);
        c.add_peer(key(1).public_key()).unwrap();
        assert_eq!(c.open(&m), Err(OpenError::Authentication));
        // C does not know the sender at all.
        let mut d = Sealer::new(key(4), 1);
        assert!(matches!(d.open(&m), Err(OpenError::UnknownSender(_))));
        // A message reflected back to its sender does not open as the peer's.
        assert!(matches!(a.open(&m), Err(OpenError::UnknownSender(_))));
        // Sealing to a stranger is an error, not a panic.
        assert!(a.seal(&key(9).public_key(), b"x").is_err());
        // Low-order points cannot be peers.
        assert!(matches!(a.add_peer(Key([0; 32])), Err(OpenError::WeakKey(_))));
    }

    #[test]
    fn truncated_is_rejected() {
        let (mut a, mut b) = pair(5);
        let m = a.seal(&b.public_key(), b"payload").unwrap();
        for n in 0..m.len() {
            let err = b.open(&m[..n]).unwrap_err();
            if n < MIN_SEALED_LEN {
                assert_eq!(err, OpenError::Truncated(n));
            } else {
                assert_eq!(err, OpenError::Authentication);
            }
        }
        assert!(b.open(&m).is_ok());
    }

    #[test]
    fn random_input_never_panics() {
        let mut next = crate::testutil::xorshift(0x2545_f491_4f6c_dd1du64);
        for i in 0..3000 {
            let len = (next() % 200) as usize;
            let mut data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if i % 2 == 0 && data.len() > 33 {
                // Valid version and a known sender reach the window and the AEAD.
                data[0] = SEAL_VERSION;
                data[1..33].copy_from_slice(&Key([0x24; 32]).public_key().0);
            }
            assert!(!fuzz_open(&data));
        }
    }
}
