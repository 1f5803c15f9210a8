//! Name resolution off the agent's event loop. Published addresses are
//! usually IP literals, answered at once; a host name (an operator's
//! `relay.example.org:7778`) is looked up by one worker thread, because
//! `getaddrinfo` blocks for as long as a slow or dead DNS server makes it.
//! The worker reports over a channel and wakes the loop through a
//! [`mio::Waker`]; the loop calls [`Resolver::drain`] and retries what was
//! waiting.

use std::collections::HashMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use mio::{Registry, Token, Waker};

/// A resolved name is served this long, then looked up again in the
/// background while the old answer is still served.
pub const POSITIVE_TTL: Duration = Duration::from_secs(60);
/// A failure is served this long, so a retry loop does not hammer the worker.
pub const NEGATIVE_TTL: Duration = Duration::from_secs(5);
/// Distinct names remembered or being looked up.
pub const MAX_NAMES: usize = 64;
const STOPPED: &str = "resolver thread stopped";

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lookup {
    Ready(SocketAddr),
    /// Being looked up: [`Resolver::drain`] returns true once an answer is in.
    Pending,
    /// One line naming the address.
    Failed(String),
}

type Answer = Result<SocketAddr, String>;

struct Entry {
    answer: Option<Answer>,
    /// When the answer must be looked up again.
    fresh_until: Instant,
    /// A request for it is queued or being worked on.
    queued: bool,
    last_used: Instant,
}

pub struct Resolver {
    /// None once the worker is gone.
    requests: Option<Sender<String>>,
    answers: Receiver<(String, Answer)>,
    cache: HashMap<String, Entry>,
    /// Held here too: closing its descriptor as the worker dies would take
    /// the pending wake-up with it.
    _waker: Arc<Waker>,
}

impl Resolver {
    /// Starts the worker; its answers wake `registry`'s poll with `token`.
    pub fn new(registry: &Registry, token: Token) -> Result<Resolver> {
        Resolver::with_lookup(registry, token, system_lookup)
    }

    /// mio allows one waker per poll: other worker threads wake the loop with this one.
    pub fn waker(&self) -> Arc<Waker> {
        self._waker.clone()
    }

    fn with_lookup<F>(registry: &Registry, token: Token, mut lookup: F) -> Result<Resolver>
    where
        F: FnMut(&str) -> Answer + Send + 'static,
    {
        let waker = Arc::new(Waker::new(registry, token).context("creating the resolver's waker")?);
        let (requests, inbox) = mpsc::channel::<String>();
        let (outbox, answers) = mpsc::channel();
        let worker_waker = waker.clone();
        std::thread::Builder::new()
            .name("resolver".into())
            .spawn(move || {
                let w = Worker {
                    answers: Some(outbox),
                    waker: worker_waker,
                };
                for host_port in inbox {
                    let answer = lookup(&host_port);
                    let Some(out) = w.answers.as_ref() else { return };
                    if out.send((host_port, answer)).is_err() {
                        return;
                    }
                    let _ = w.waker.wake();
                }
            })
            .context("starting the resolver thread")?;
        Ok(Resolver {
            requests: Some(requests),
            answers,
            cache: HashMap::new(),
            _waker: waker,
        })
    }

    /// The address `host_port` stands for, without blocking.
    pub fn lookup(&mut self, now: Instant, host_port: &str) -> Lookup {
        if let Ok(a) = host_port.parse::<SocketAddr>() {
            return Lookup::Ready(a);
        }
        match host_port.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {}
            _ => return Lookup::Failed(format!("{host_port:?} is not a host:port address")),
        }
        if !self.cache.contains_key(host_port) {
            if self.requests.is_none() {
                return Lookup::Failed(STOPPED.into());
            }
            if self.cache.len() >= MAX_NAMES {
                let oldest = self
                    .cache
                    .iter()
                    .filter(|(_, e)| !e.queued)
                    .min_by_key(|(_, e)| e.last_used)
                    .map(|(k, _)| k.clone());
                match oldest {
                    Some(k) => {
                        self.cache.remove(&k);
                    }
                    None => {
                        return Lookup::Failed(format!(
                            "cannot resolve {host_port}: {MAX_NAMES} other names are being looked up"
                        ));
                    }
                }
            }
            self.cache.insert(
                host_port.to_string(),
                Entry {
                    answer: None,
                    fresh_until: now,
                    queued: false,
                    last_used: now,
                },
            );
        }
        let e = self.cache.get_mut(host_port).expect("inserted above");
        e.last_used = now;
        if now >= e.fresh_until && !e.queued {
            let sent = self
                .requests
                .as_ref()
                .is_some_and(|r| r.send(host_port.to_string()).is_ok());
            if sent {
                e.queued = true;
            } else {
                self.requests = None;
                e.answer = Some(Err(STOPPED.into()));
            }
        }
        match &e.answer {
            // Stale while refreshing is still the best guess.
            Some(Ok(a)) => Lookup::Ready(*a),
            Some(Err(why)) if !e.queued => Lookup::Failed(why.clone()),
            _ => Lookup::Pending,
        }
    }

    /// Takes in the worker's answers (call when the waker's token fires);
    /// true if any arrived, so what was [`Lookup::Pending`] can be retried.
    pub fn drain(&mut self, now: Instant) -> bool {
        let mut arrived = false;
        loop {
            match self.answers.try_recv() {
                Ok((host_port, answer)) => {
                    arrived = true;
                    if let Some(e) = self.cache.get_mut(&host_port) {
                        e.fresh_until = now
                            + if answer.is_ok() {
                                POSITIVE_TTL
                            } else {
                                NEGATIVE_TTL
                            };
                        e.answer = Some(answer);
                        e.queued = false;
                    }
                }
                Err(TryRecvError::Empty) => return arrived,
                Err(TryRecvError::Disconnected) => {
                    // The worker died (a panic): nothing queued will be answered.
                    self.requests = None;
                    for e in self.cache.values_mut().filter(|e| e.queued) {
                        e.queued = false;
                        e.answer = Some(Err(STOPPED.into()));
                        arrived = true;
                    }
                    return arrived;
                }
            }
        }
    }
}

/// The worker's end; dropping it (also while unwinding from a panic) closes
/// the answer channel and then wakes the loop, so the loop sees it stopped.
struct Worker {
    answers: Option<Sender<(String, Answer)>>,
    waker: Arc<Waker>,
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.answers = None;
        let _ = self.waker.wake();
    }
}

/// The first address `getaddrinfo` gives, as the agent used before.
fn system_lookup(host_port: &str) -> Answer {
    match host_port.to_socket_addrs() {
        Ok(mut addrs) => addrs
            .next()
            .ok_or_else(|| format!("cannot resolve {host_port}: no addresses")),
        Err(e) => Err(format!("cannot resolve {host_port}: {e}").replace('\n', " ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mio::{Events, Poll};
    use std::sync::atomic::{AtomicUsize, Ordering};

    const TOKEN: Token = Token(7);
    const DEADLINE: Duration = Duration::from_secs(30);

    /// Polls until the waker fires and `drain` reports answers.
    fn wait(poll: &mut Poll, r: &mut Resolver) {
        let end = Instant::now() + DEADLINE;
        let mut events = Events::with_capacity(4);
        loop {
            assert!(Instant::now() < end, "no answer from the resolver");
            poll.poll(&mut events, Some(Duration::from_millis(100))).unwrap();
            if events.iter().any(|e| e.token() == TOKEN) && r.drain(Instant::now()) {
                return;
            }
        }
    }

    #[test]
    fn literals_are_ready_at_once() {
        let poll = Poll::new().unwrap();
        let mut r = Resolver::with_lookup(poll.registry(), TOKEN, |_| panic!("not for literals")).unwrap();
        let now = Instant::now();
        assert_eq!(
            r.lookup(now, "192.0.2.1:7777"),
            Lookup::Ready("192.0.2.1:7777".parse().unwrap())
        );
        assert_eq!(
            r.lookup(now, "[2001:db8::1]:51820"),
            Lookup::Ready("[2001:db8::1]:51820".parse().unwrap())
        );
        assert!(matches!(r.lookup(now, "no-port"), Lookup::Failed(_)));
        assert!(matches!(r.lookup(now, "host:99999"), Lookup::Failed(_)));
        assert!(r.cache.is_empty());
        assert!(!r.drain(now));
    }

    #[test]
    fn localhost_is_ready_after_drain() {
        let mut poll = Poll::new().unwrap();
        let mut r = Resolver::new(poll.registry(), TOKEN).unwrap();
        assert_eq!(r.lookup(Instant::now(), "localhost:80"), Lookup::Pending);
        wait(&mut poll, &mut r);
        match r.lookup(Instant::now(), "localhost:80") {
            Lookup::Ready(a) => assert!(a.ip().is_loopback() && a.port() == 80, "{a}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_unresolvable_name_fails_with_one_line_naming_it() {
        let mut poll = Poll::new().unwrap();
        let mut r = Resolver::new(poll.registry(), TOKEN).unwrap();
        let name = "no-such-host.invalid:1";
        assert_eq!(r.lookup(Instant::now(), name), Lookup::Pending);
        wait(&mut poll, &mut r);
        let now = Instant::now();
        match r.lookup(now, name) {
            Lookup::Failed(why) => assert!(
                why.contains("no-such-host.invalid") && !why.contains('\n'),
                "{why}"
            ),
            other => panic!("{other:?}"),
        }
        // Cached briefly, then asked again.
        assert!(matches!(
            r.lookup(now + NEGATIVE_TTL / 2, name),
            Lookup::Failed(_)
        ));
        assert_eq!(r.lookup(now + NEGATIVE_TTL, name), Lookup::Pending);
    }

    #[test]
    fn names_are_queued_once_bounded_and_refreshed_while_served() {
        let mut poll = Poll::new().unwrap();
        let calls = Arc::new(AtomicUsize::new(0));
        let (release, gate) = mpsc::channel::<()>();
        let counted = calls.clone();
        let mut r = Resolver::with_lookup(poll.registry(), TOKEN, move |hp| {
            counted.fetch_add(1, Ordering::SeqCst);
            let _ = gate.recv();
            let n: u8 = hp
                .trim_start_matches("host")
                .split('.')
                .next()
                .unwrap()
                .parse()
                .unwrap();
            Ok(SocketAddr::from(([192, 0, 2, n], 1)))
        })
        .unwrap();
        let t0 = Instant::now();
        for i in 0..MAX_NAMES {
            assert_eq!(r.lookup(t0, &format!("host{i}.test:1")), Lookup::Pending);
        }
        // Asked again while pending: not queued twice.
        assert_eq!(r.lookup(t0, "host0.test:1"), Lookup::Pending);
        // All pending: no room for another.
        assert!(matches!(r.lookup(t0, "host99.test:1"), Lookup::Failed(_)));
        assert_eq!(r.cache.len(), MAX_NAMES);
        for _ in 0..MAX_NAMES {
            release.send(()).unwrap();
        }
        let end = Instant::now() + DEADLINE;
        while r.cache.values().any(|e| e.queued) {
            assert!(Instant::now() < end, "answers did not arrive");
            wait(&mut poll, &mut r);
        }
        assert_eq!(calls.load(Ordering::SeqCst), MAX_NAMES);
        let t1 = Instant::now();
        assert_eq!(
            r.lookup(t1, "host5.test:1"),
            Lookup::Ready(SocketAddr::from(([192, 0, 2, 5], 1)))
        );
        // A new name evicts the least recently used; the bound holds.
        assert_eq!(r.lookup(t1, "host99.test:1"), Lookup::Pending);
        assert_eq!(r.cache.len(), MAX_NAMES);
        assert!(r.cache.contains_key("host5.test:1"));
        // Past its lifetime the answer is still served while it is looked up again.
        let later = t1 + POSITIVE_TTL;
        assert_eq!(
            r.lookup(later, "host5.test:1"),
            Lookup::Ready(SocketAddr::from(([192, 0, 2, 5], 1)))
        );
        assert!(r.cache["host5.test:1"].queued);
        release.send(()).unwrap();
        release.send(()).unwrap();
        let end = Instant::now() + DEADLINE;
        while r.cache.values().any(|e| e.queued) {
            assert!(Instant::now() < end, "answers did not arrive");
            wait(&mut poll, &mut r);
        }
        assert_eq!(calls.load(Ordering::SeqCst), MAX_NAMES + 2);
        assert_eq!(r.cache.len(), MAX_NAMES);
    }

    #[test]
    fn a_dead_worker_fails_lookups_instead_of_hanging() {
        let mut poll = Poll::new().unwrap();
        let mut r =
            Resolver::with_lookup(poll.registry(), TOKEN, |_| panic!("resolver test: worker dies")).unwrap();
        assert_eq!(r.lookup(Instant::now(), "doomed.test:1"), Lookup::Pending);
        wait(&mut poll, &mut r);
        let now = Instant::now();
        assert_eq!(r.lookup(now, "doomed.test:1"), Lookup::Failed(STOPPED.into()));
        assert_eq!(r.lookup(now, "other.test:1"), Lookup::Failed(STOPPED.into()));
    }
}
