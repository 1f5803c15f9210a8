//! Connectivity checks for one peer: sealed pings from our check socket to
//! each of the peer's candidates' check endpoints, paced and retried, with
//! the round-trip time of every pair that answered. WireGuard is untouched
//! while they run. Both sides check at once, so each side's pings open its
//! own NAT for the other's.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::candidate::{Candidate, Kind};

/// Time between two pings of one peer's checks: a peer with five candidates
/// tries all of them within a quarter of a second, never in one burst.
pub const CHECK_PACE: Duration = Duration::from_millis(50);
/// Pings per target before it counts as failed. Early pings are often lost
/// to the far NAT until the peer's own pings have opened it.
pub const CHECK_TRIES: u32 = 6;
/// A pong later than this after its ping no longer counts.
pub const CHECK_ANSWER_TIMEOUT: Duration = Duration::from_secs(1);
/// After the first success, how long better (LAN) pairs still get to answer.
pub const CHECK_SETTLE: Duration = Duration::from_millis(150);
/// Peer-reflexive targets learned per check run; a peer cannot grow the list without bound.
const MAX_LEARNED: usize = 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Success {
    pub rtt: Duration,
    /// How the peer saw our ping's source: tells which of our candidates it reached.
    pub observed: SocketAddr,
}

#[derive(Clone, Debug)]
pub struct Target {
    pub candidate: Candidate,
    pub tries: u32,
    pub success: Option<Success>,
}

impl Target {
    /// Whether WireGuard could be pointed at it: a peer-reflexive mapping
    /// belongs to the check socket only.
    pub fn dialable(&self) -> bool {
        self.candidate.kind != Kind::PeerReflexive
    }
}

pub struct CheckList {
    pub targets: Vec<Target>,
    inflight: HashMap<u64, (usize, Instant)>,
    cursor: usize,
    next_ping: Instant,
    first_success: Option<Instant>,
    last_ping: Option<Instant>,
}

/// A ping to send: transaction id and destination.
pub struct Ping {
    pub txid: u64,
    pub to: SocketAddr,
}

impl CheckList {
    pub fn new(now: Instant, remote: &[Candidate]) -> CheckList {
        CheckList {
            targets: remote
                .iter()
                .map(|c| Target {
                    candidate: *c,
                    tries: 0,
                    success: None,
                })
                .collect(),
            inflight: HashMap::new(),
            cursor: 0,
            next_ping: now,
            first_success: None,
            last_ping: None,
        }
    }

    /// A ping from the peer arrived from `src`: if no target has that check
    /// endpoint, the peer is behind a NAT that mapped it anew; check it too.
    pub fn learn(&mut self, src: SocketAddr) {
        if self.targets.iter().any(|t| t.candidate.check == src) {
            return;
        }
        let learned = self
            .targets
            .iter()
            .filter(|t| t.candidate.kind == Kind::PeerReflexive)
            .count();
        if learned < MAX_LEARNED {
            self.targets.push(Target {
                candidate: Candidate {
                    kind: Kind::PeerReflexive,
                    wg: src,
                    check: src,
                },
                tries: 0,
                success: None,
            });
        }
    }

    /// The next ping due at `now`, if any; `txid` is the id to use.
    pub fn poll_ping(&mut self, now: Instant, txid: u64) -> Option<Ping> {
        if now < self.next_ping || self.targets.is_empty() {
            return None;
        }
        let n = self.targets.len();
        for step in 0..n {
            let i = (self.cursor + step) % n;
            let t = &mut self.targets[i];
            if t.success.is_some() || t.tries >= CHECK_TRIES {
                continue;
            }
            t.tries += 1;
            self.cursor = (i + 1) % n;
            self.next_ping = now + CHECK_PACE;
            self.last_ping = Some(now);
            self.inflight.insert(txid, (i, now));
            return Some(Ping {
                txid,
                to: t.candidate.check,
            });
        }
        None
    }

    /// A pong arrived; returns whether it answered one of our pings.
    pub fn handle_pong(&mut self, now: Instant, txid: u64, from: SocketAddr, observed: SocketAddr) -> bool {
        let Some((i, sent)) = self.inflight.remove(&txid) else {
            return false;
        };
        let rtt = now.saturating_duration_since(sent);
        let Some(t) = self.targets.get_mut(i) else {
            return false;
        };
        // A pong from elsewhere than the target still proves a round trip,
        // but not to the address we would dial.
        if rtt > CHECK_ANSWER_TIMEOUT || from != t.candidate.check {
            return false;
        }
        if t.success.is_none_or(|s| rtt < s.rtt) {
            t.success = Some(Success { rtt, observed });
        }
        self.first_success.get_or_insert(now);
        true
    }

    /// The best passing pair we could point WireGuard at: LAN before
    /// mappings, then the lowest RTT. `allowed` filters out banned ones.
    pub fn best(&self, allowed: impl Fn(&Candidate) -> bool) -> Option<(&Target, Success)> {
        self.targets
            .iter()
            .filter(|t| t.dialable() && allowed(&t.candidate))
            .filter_map(|t| t.success.map(|s| (t, s)))
            .min_by_key(|(t, s)| (t.candidate.kind, s.rtt))
    }

    /// Whether any pong came back at all (also on a peer-reflexive target):
    /// the path works in some direction, even if we cannot dial it.
    pub fn any_success(&self) -> bool {
        self.targets.iter().any(|t| t.success.is_some())
    }

    /// Whether to decide now: a LAN pair answered (nothing beats it), the
    /// settle time after the first success is over, or every target is done.
    pub fn ready(&self, now: Instant) -> bool {
        let lan = self
            .targets
            .iter()
            .any(|t| t.success.is_some() && t.candidate.kind == Kind::Local);
        lan || self.first_success.is_some_and(|f| now >= f + CHECK_SETTLE) || self.finished(now)
    }

    /// Every target was tried out and its last answer can no longer come.
    pub fn finished(&self, now: Instant) -> bool {
        let untried = self
            .targets
            .iter()
            .any(|t| t.success.is_none() && t.tries < CHECK_TRIES);
        !untried && self.last_ping.is_none_or(|p| now >= p + CHECK_ANSWER_TIMEOUT)
    }

    pub fn poll_timeout(&self, now: Instant) -> Option<Instant> {
        let mut t = vec![];
        if self
            .targets
            .iter()
            .any(|t| t.success.is_none() && t.tries < CHECK_TRIES)
        {
            t.push(self.next_ping.max(now));
        }
        if let Some(f) = self.first_success {
            t.push(f + CHECK_SETTLE);
        }
        if let Some(p) = self.last_ping {
            t.push(p + CHECK_ANSWER_TIMEOUT);
        }
        t.into_iter().filter(|x| *x > now).min().or_else(|| {
            // Something is due now.
            (!self.finished(now)).then_some(now)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(kind: Kind, ip: &str) -> Candidate {
        Candidate {
            kind,
            wg: format!("{ip}:51820").parse().unwrap(),
            check: format!("{ip}:51821").parse().unwrap(),
        }
    }

    #[test]
    fn pings_are_paced_round_robin_and_stop_after_the_tries() {
        let t0 = Instant::now();
        let mut c = CheckList::new(
            t0,
            &[cand(Kind::Local, "10.0.0.2"), cand(Kind::WgStun, "203.0.113.9")],
        );
        let mut sent = vec![];
        let mut now = t0;
        let mut txid = 0;
        for _ in 0..100 {
            while let Some(p) = c.poll_ping(now, txid) {
                sent.push((now, p.to));
                txid += 1;
            }
            now += Duration::from_millis(10);
        }
        assert_eq!(sent.len(), 2 * CHECK_TRIES as usize);
        assert!(sent.windows(2).all(|w| w[1].0 - w[0].0 >= CHECK_PACE));
        assert_ne!(sent[0].1, sent[1].1);
        assert!(!c.any_success());
        assert!(c.finished(now + CHECK_ANSWER_TIMEOUT));
    }

    #[test]
    fn lan_answer_decides_at_once_and_wins_over_a_faster_public_one() {
        let t0 = Instant::now();
        let lan = cand(Kind::Local, "10.0.0.2");
        let public = cand(Kind::WgStun, "203.0.113.9");
        let mut c = CheckList::new(t0, &[public, lan]);
        let p1 = c.poll_ping(t0, 1).unwrap();
        let p2 = c.poll_ping(t0 + CHECK_PACE, 2).unwrap();
        let me: SocketAddr = "10.0.0.1:51821".parse().unwrap();
        assert!(c.handle_pong(t0 + CHECK_PACE, 1, p1.to, me));
        assert!(!c.ready(t0 + CHECK_PACE));
        // An unknown txid or a pong from the wrong address is not a success.
        assert!(!c.handle_pong(t0 + CHECK_PACE, 99, p2.to, me));
        assert!(c.handle_pong(t0 + CHECK_PACE * 3, 2, p2.to, me));
        assert!(c.ready(t0 + CHECK_PACE * 3));
        let (best, s) = c.best(|_| true).unwrap();
        assert_eq!(best.candidate, lan);
        assert_eq!(s.rtt, CHECK_PACE * 2);
        // Banned: the other one.
        assert_eq!(c.best(|x| *x != lan).unwrap().0.candidate, public);
    }

    #[test]
    fn peer_reflexive_targets_are_checked_but_never_dialled_and_bounded() {
        let t0 = Instant::now();
        let mut c = CheckList::new(t0, &[cand(Kind::WgStun, "203.0.113.9")]);
        for port in 0..10 {
            c.learn(SocketAddr::from(([198, 51, 100, 3], 40000 + port)));
        }
        c.learn("203.0.113.9:51821".parse().unwrap());
        assert_eq!(c.targets.len(), 1 + MAX_LEARNED);
        let mut now = t0;
        let mut hit = None;
        for txid in 0..20 {
            if let Some(p) = c.poll_ping(now, txid)
                && p.to.port() == 40000
            {
                hit = Some((txid, p.to));
            }
            now += CHECK_PACE;
        }
        let (txid, to) = hit.unwrap();
        assert!(c.handle_pong(now, txid, to, "10.0.0.1:51821".parse().unwrap()));
        assert!(c.any_success());
        assert!(c.best(|_| true).is_none());
    }
}
