//! Node-to-node messages over the relay, sealed ([`crate::peer::seal`]) so
//! the relay carries them without reading, forging or replaying them. Today
//! they carry `warren ping`: a round trip that proves both agents and the
//! relay path between them work, independent of WireGuard. Sans-IO: sealed
//! bytes in and out, `now` passed in.
//!
//! Payload inside the box: `type (1) | nonce (8, big-endian)`; unknown types
//! are ignored so newer agents can add messages.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use crate::keys::Key;
use crate::peer::seal::Sealer;

/// A ping without a pong within this has failed.
pub const PING_TIMEOUT: Duration = Duration::from_secs(5);
/// Pings awaiting an answer at once; more are refused rather than queued.
pub const MAX_PENDING_PINGS: usize = 64;

const PING: u8 = 1;
const PONG: u8 = 2;
const MESSAGE_LEN: usize = 9;

struct Pending {
    peer: Key,
    sent: Instant,
    /// Who asked: the caller's handle for the answer.
    waiter: usize,
}

pub struct PeerMessages {
    sealer: Sealer,
    next_nonce: u64,
    pending: HashMap<u64, Pending>,
    outgoing: VecDeque<(Key, Vec<u8>)>,
    answers: VecDeque<(usize, Result<Duration, String>)>,
}

impl PeerMessages {
    /// `epoch` must grow across restarts (see the seal module); the nonce
    /// starts from it too, so a restarted agent never confuses old pongs with new pings.
    pub fn new(private: Key, epoch: u64) -> PeerMessages {
        PeerMessages {
            sealer: Sealer::new(private, epoch),
            next_nonce: epoch,
            pending: HashMap::new(),
            outgoing: VecDeque::new(),
            answers: VecDeque::new(),
        }
    }

    pub fn public_key(&self) -> Key {
        self.sealer.public_key()
    }

    /// Our key changed (rotation): seal with the new one from now on.
    pub fn rekey(&mut self, private: Key, epoch: u64, peers: &[Key]) {
        *self = PeerMessages {
            pending: std::mem::take(&mut self.pending),
            answers: std::mem::take(&mut self.answers),
            ..PeerMessages::new(private, epoch)
        };
        self.set_peers(peers);
    }

    /// The peers we exchange messages with: exactly the peer map's.
    pub fn set_peers(&mut self, peers: &[Key]) {
        for p in peers {
            if let Err(e) = self.sealer.add_peer(*p) {
                log_warn!("agent: peer {}: {e}", p.short());
            }
        }
        self.sealer.retain_peers(&peers.iter().copied().collect());
    }

    /// Sends a ping to `peer`; the answer for `waiter` comes from [`PeerMessages::poll_answer`].
    pub fn ping(&mut self, now: Instant, peer: Key, waiter: usize) -> Result<()> {
        if self.pending.len() >= MAX_PENDING_PINGS {
            bail!("too many pings in flight; try again in a few seconds");
        }
        let nonce = self.next_nonce;
        self.next_nonce = self.next_nonce.wrapping_add(1);
        let msg = self.seal(&peer, PING, nonce)?;
        self.pending.insert(
            nonce,
            Pending {
                peer,
                sent: now,
                waiter,
            },
        );
        self.outgoing.push_back((peer, msg));
        Ok(())
    }

    /// The transport could not send the last ping to `peer` (no relay connection).
    pub fn unsent(&mut self, peer: &Key, why: &str) {
        let failed: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.peer == *peer)
            .map(|(n, _)| *n)
            .collect();
        for n in failed {
            if let Some(p) = self.pending.remove(&n) {
                self.answers.push_back((p.waiter, Err(why.to_string())));
            }
        }
    }

    fn seal(&mut self, peer: &Key, kind: u8, nonce: u64) -> Result<Vec<u8>> {
        let mut payload = [0u8; MESSAGE_LEN];
        payload[0] = kind;
        payload[1..].copy_from_slice(&nonce.to_be_bytes());
        self.sealer.seal(peer, &payload)
    }

    /// Seals any payload to a peer (NAT traversal's messages share the box and its replay window).
    pub fn seal_payload(&mut self, peer: &Key, payload: &[u8]) -> Result<Vec<u8>> {
        self.sealer.seal(peer, payload)
    }

    /// Opens a sealed message from whoever sealed it (a check socket or the tunnel).
    pub fn open(&mut self, msg: &[u8]) -> Result<(Key, Vec<u8>), String> {
        self.sealer.open(msg).map_err(|e| e.to_string())
    }

    /// Opens a sealed message the relay delivered as coming from `from`.
    pub fn open_relayed(&mut self, from: Key, msg: &[u8]) -> Result<Vec<u8>, String> {
        let (sender, payload) = self.open(msg)?;
        if sender != from {
            return Err(format!(
                "sealed message from {} relayed as coming from {}",
                sender.short(),
                from.short()
            ));
        }
        Ok(payload)
    }

    /// A sealed message the relay delivered as coming from `from`. Returns
    /// why it was dropped, for the caller to log.
    pub fn handle_sealed(&mut self, now: Instant, from: Key, msg: &[u8]) -> Result<(), String> {
        let payload = self.open_relayed(from, msg)?;
        self.handle_payload(now, from, &payload)
    }

    /// An opened `warren ping` message from `sender`.
    pub fn handle_payload(&mut self, now: Instant, sender: Key, payload: &[u8]) -> Result<(), String> {
        if payload.len() < MESSAGE_LEN {
            return Err(format!("peer message of {} bytes", payload.len()));
        }
        let nonce = u64::from_be_bytes(payload[1..MESSAGE_LEN].try_into().expect("8 bytes"));
        match payload[0] {
            PING => {
                let pong = self.seal(&sender, PONG, nonce).map_err(|e| format!("{e:#}"))?;
                self.outgoing.push_back((sender, pong));
            }
            PONG => match self.pending.get(&nonce) {
                Some(p) if p.peer == sender => {
                    let p = self.pending.remove(&nonce).expect("just found");
                    self.answers
                        .push_back((p.waiter, Ok(now.saturating_duration_since(p.sent))));
                }
                _ => return Err(format!("unexpected pong {nonce}")),
            },
            _ => {}
        }
        Ok(())
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        let expired: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| now >= p.sent + PING_TIMEOUT)
            .map(|(n, _)| *n)
            .collect();
        for n in expired {
            if let Some(p) = self.pending.remove(&n) {
                self.answers.push_back((
                    p.waiter,
                    Err(format!("no answer within {} s", PING_TIMEOUT.as_secs())),
                ));
            }
        }
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.pending.values().map(|p| p.sent + PING_TIMEOUT).min()
    }

    /// A sealed message to send to a peer through its relay.
    pub fn poll_transmit(&mut self) -> Option<(Key, Vec<u8>)> {
        self.outgoing.pop_front()
    }

    /// A finished ping: the waiter and the round-trip time or why it failed.
    pub fn poll_answer(&mut self) -> Option<(usize, Result<Duration, String>)> {
        self.answers.pop_front()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (PeerMessages, PeerMessages) {
        let (a, b) = (Key::generate_private(), Key::generate_private());
        let mut ma = PeerMessages::new(a, 1);
        let mut mb = PeerMessages::new(b, 1);
        ma.set_peers(&[b.public_key()]);
        mb.set_peers(&[a.public_key()]);
        (ma, mb)
    }

    /// Carries every queued message from `from` to `to`, as the relay would.
    fn relay(from: &mut PeerMessages, to: &mut PeerMessages, now: Instant) -> Vec<Result<(), String>> {
        let sender = from.public_key();
        let mut out = Vec::new();
        while let Some((dest, msg)) = from.poll_transmit() {
            assert_eq!(dest, to.public_key());
            out.push(to.handle_sealed(now, sender, &msg));
        }
        out
    }

    #[test]
    fn ping_round_trip_measures_the_time() {
        let t0 = Instant::now();
        let (mut a, mut b) = pair();
        a.ping(t0, b.public_key(), 7).unwrap();
        assert_eq!(relay(&mut a, &mut b, t0), vec![Ok(())]);
        assert_eq!(
            relay(&mut b, &mut a, t0 + Duration::from_millis(30)),
            vec![Ok(())]
        );
        assert_eq!(a.poll_answer(), Some((7, Ok(Duration::from_millis(30)))));
        assert_eq!(a.poll_timeout(), None);
    }

    #[test]
    fn lost_pings_time_out_and_late_or_replayed_pongs_are_dropped() {
        let t0 = Instant::now();
        let (mut a, mut b) = pair();
        a.ping(t0, b.public_key(), 1).unwrap();
        relay(&mut a, &mut b, t0);
        let (_, pong) = b.poll_transmit().unwrap();
        assert_eq!(a.poll_timeout(), Some(t0 + PING_TIMEOUT));
        a.handle_timeout(t0 + PING_TIMEOUT);
        assert!(matches!(a.poll_answer(), Some((1, Err(_)))));
        // The pong arrives after all: no second answer.
        assert!(a.handle_sealed(t0 + PING_TIMEOUT, b.public_key(), &pong).is_err());
        assert_eq!(a.poll_answer(), None);
        // A replay of an answered pong is refused by the seal's window.
        a.ping(t0, b.public_key(), 2).unwrap();
        relay(&mut a, &mut b, t0);
        let (_, pong) = b.poll_transmit().unwrap();
        assert!(a.handle_sealed(t0, b.public_key(), &pong).is_ok());
        assert!(a.handle_sealed(t0, b.public_key(), &pong).is_err());
        assert_eq!(a.poll_answer().map(|(w, r)| (w, r.is_ok())), Some((2, true)));
        assert_eq!(a.poll_answer(), None);
    }

    #[test]
    fn a_relay_that_lies_about_the_sender_or_a_stranger_is_refused() {
        let t0 = Instant::now();
        let (mut a, mut b) = pair();
        let mut stranger = PeerMessages::new(Key::generate_private(), 1);
        stranger.set_peers(&[b.public_key()]);
        stranger.ping(t0, b.public_key(), 0).unwrap();
        let (_, msg) = stranger.poll_transmit().unwrap();
        assert!(b.handle_sealed(t0, stranger.public_key(), &msg).is_err());
        a.ping(t0, b.public_key(), 0).unwrap();
        let (_, msg) = a.poll_transmit().unwrap();
        assert!(b.handle_sealed(t0, stranger.public_key(), &msg).is_err());
        let mut tampered = msg.clone();
        *tampered.last_mut().unwrap() ^= 1;
        assert!(b.handle_sealed(t0, a.public_key(), &tampered).is_err());
        assert!(b.handle_sealed(t0, a.public_key(), &msg[..20]).is_err());
        assert_eq!(b.poll_transmit(), None);
    }

    #[test]
    fn unsendable_ping_answers_at_once_and_pending_is_bounded() {
        let t0 = Instant::now();
        let (mut a, b) = pair();
        a.ping(t0, b.public_key(), 3).unwrap();
        a.unsent(&b.public_key(), "no relay connection");
        assert_eq!(a.poll_answer(), Some((3, Err("no relay connection".into()))));
        for w in 0..MAX_PENDING_PINGS {
            a.ping(t0, b.public_key(), w).unwrap();
        }
        assert!(a.ping(t0, b.public_key(), 99).is_err());
    }
}
