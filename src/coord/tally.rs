//! What strangers did, counted and summed up in one log line per interval.
//!
//! Anything a connection does before it authenticates is input from someone
//! unknown: one log line per event would let a flood of connections write
//! the log as fast as it can connect (148,000 lines in 10 s were measured),
//! and the writing cost more CPU than the refusing.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use super::admission::Refusal;
use super::inbound::Violation;
use crate::control::messages::ErrorCode;

/// At most one summary line this often.
pub const SUMMARY_INTERVAL: Duration = Duration::from_secs(10);

/// Why a connection that never authenticated ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    Violation(Violation),
    /// The channel refused it: a failed Noise handshake, or a first message
    /// that was not a readable Hello or Join.
    Refused,
    TimedOut,
    /// Evicted to keep pending connections within their memory budget.
    Evicted,
    /// The peer hung up (or reset) before its first message.
    HungUp,
    /// Closed soon after its first message: the hub refused the key or the invite.
    RefusedByHub,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub refused_full: u64,
    pub refused_pending: u64,
    pub refused_rate: u64,
    pub accept_errors: u64,
    pub bad_frames: u64,
    pub bad_openings: u64,
    pub fragments: u64,
    pub too_much: u64,
    pub too_long: u64,
    pub refused_by_channel: u64,
    pub timed_out: u64,
    pub evicted: u64,
    pub hung_up: u64,
    pub refused_by_hub: u64,
    /// Hello or Join refused by the hub (a valid handshake with a key or
    /// invite that is not a member's), by why. The same connections are also
    /// counted among the closed ones (`refused_by_hub`) when they go.
    pub opening_unknown_key: u64,
    pub opening_removed: u64,
    pub opening_invite: u64,
    pub opening_version: u64,
    pub opening_other: u64,
}

impl Counts {
    pub fn refused(&self) -> u64 {
        self.refused_full + self.refused_pending + self.refused_rate
    }

    pub fn closed(&self) -> u64 {
        self.bad_frames
            + self.bad_openings
            + self.fragments
            + self.too_much
            + self.too_long
            + self.refused_by_channel
            + self.timed_out
            + self.evicted
            + self.hung_up
            + self.refused_by_hub
    }

    pub fn refused_openings(&self) -> u64 {
        self.opening_unknown_key
            + self.opening_removed
            + self.opening_invite
            + self.opening_version
            + self.opening_other
    }

    fn events(&self) -> u64 {
        self.refused() + self.closed() + self.accept_errors + self.refused_openings()
    }
}

#[derive(Debug)]
pub struct Tally {
    /// Since the start.
    total: Counts,
    /// Since the last summary line.
    recent: Counts,
    next_summary: Instant,
}

impl Tally {
    pub fn new(now: Instant) -> Tally {
        Tally {
            total: Counts::default(),
            recent: Counts::default(),
            next_summary: now,
        }
    }

    pub fn total(&self) -> &Counts {
        &self.total
    }

    pub fn refused(&mut self, why: Refusal) {
        for c in [&mut self.total, &mut self.recent] {
            match why {
                Refusal::Full => c.refused_full += 1,
                Refusal::Pending => c.refused_pending += 1,
                Refusal::Rate => c.refused_rate += 1,
            }
        }
    }

    pub fn accept_error(&mut self) {
        self.total.accept_errors += 1;
        self.recent.accept_errors += 1;
    }

    pub fn ended(&mut self, how: Ending) {
        for c in [&mut self.total, &mut self.recent] {
            let field = match how {
                Ending::Violation(Violation::BadFrame) => &mut c.bad_frames,
                Ending::Violation(Violation::BadOpening) => &mut c.bad_openings,
                Ending::Violation(Violation::FragmentBeforeAuth) => &mut c.fragments,
                Ending::Violation(Violation::TooMuchBeforeAuth) => &mut c.too_much,
                Ending::Violation(Violation::MessageTooLong) => &mut c.too_long,
                Ending::Refused => &mut c.refused_by_channel,
                Ending::TimedOut => &mut c.timed_out,
                Ending::Evicted => &mut c.evicted,
                Ending::HungUp => &mut c.hung_up,
                Ending::RefusedByHub => &mut c.refused_by_hub,
            };
            *field += 1;
        }
    }

    /// The hub refused a Hello or Join with `code`: counted, never logged
    /// one by one (whoever sent it is not a member).
    pub fn refused_opening(&mut self, code: ErrorCode) {
        for c in [&mut self.total, &mut self.recent] {
            let field = match code {
                ErrorCode::UnknownNode => &mut c.opening_unknown_key,
                ErrorCode::Removed => &mut c.opening_removed,
                ErrorCode::InviteUnknown | ErrorCode::InviteExpired | ErrorCode::InviteUsed => {
                    &mut c.opening_invite
                }
                ErrorCode::Version => &mut c.opening_version,
                _ => &mut c.opening_other,
            };
            *field += 1;
        }
    }

    /// When a summary is due, if anything is waiting to be summed up.
    pub fn poll_timeout(&self) -> Option<Instant> {
        (self.recent.events() > 0).then_some(self.next_summary)
    }

    /// The summary line, if one is due: at most one per [`SUMMARY_INTERVAL`],
    /// none when nothing happened.
    pub fn summary(&mut self, now: Instant) -> Option<String> {
        if now < self.next_summary || self.recent.events() == 0 {
            return None;
        }
        let r = std::mem::take(&mut self.recent);
        self.next_summary = now + SUMMARY_INTERVAL;
        let t = &self.total;
        let mut line =
            String::from("coordinator: strangers and misbehaving connections since the last report:");
        let _ = write!(
            line,
            " refused {} (coordinator full {}, source has too many pending {}, source failing too often {});",
            r.refused(),
            r.refused_full,
            r.refused_pending,
            r.refused_rate
        );
        let _ = write!(
            line,
            " closed {} (not control frames {}, bad opening {}, fragments before hello {}, over 4 KiB before hello {}, \
             message over 64 KiB {}, failed handshake or first message {}, timed out {}, evicted for memory {}, \
             hung up {}, refused key or invite {});",
            r.closed(),
            r.bad_frames,
            r.bad_openings,
            r.fragments,
            r.too_much,
            r.too_long,
            r.refused_by_channel,
            r.timed_out,
            r.evicted,
            r.hung_up,
            r.refused_by_hub
        );
        if r.refused_openings() > 0 {
            let _ = write!(
                line,
                " hello or join refused {} (unknown key {}, removed node {}, bad invite {}, protocol version {}, other {});",
                r.refused_openings(),
                r.opening_unknown_key,
                r.opening_removed,
                r.opening_invite,
                r.opening_version,
                r.opening_other
            );
        }
        if r.accept_errors > 0 {
            let _ = write!(line, " accept errors {};", r.accept_errors);
        }
        let _ = write!(
            line,
            " since start: refused {}, closed {}",
            t.refused(),
            t.closed()
        );
        Some(line)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_of_events_makes_one_line_per_interval() {
        let t0 = Instant::now();
        let mut t = Tally::new(t0);
        assert_eq!(t.summary(t0), None, "nothing happened: no line");
        assert_eq!(t.poll_timeout(), None);
        let mut lines = Vec::new();
        // 148,000 events over 10 s, polled on every event.
        for i in 0..148_000u64 {
            let now = t0 + Duration::from_micros(i * 10_000_000 / 148_000);
            match i % 4 {
                0 => t.refused(Refusal::Rate),
                1 => t.ended(Ending::Violation(Violation::BadFrame)),
                2 => t.ended(Ending::TimedOut),
                _ => t.accept_error(),
            }
            lines.extend(t.summary(now));
        }
        lines.extend(t.summary(t0 + Duration::from_secs(20)));
        assert!(lines.len() <= 3, "{}", lines.len());
        assert_eq!(t.total().refused(), 37_000);
        assert_eq!(t.total().closed(), 74_000);
        let last = lines.last().unwrap();
        assert!(
            last.contains("since start: refused 37000, closed 74000"),
            "{last}"
        );
        assert!(!last.contains('\n'));
        assert_eq!(t.summary(t0 + Duration::from_secs(60)), None);
    }

    #[test]
    fn refused_openings_are_summed_up_by_why() {
        let t0 = Instant::now();
        let mut t = Tally::new(t0);
        for _ in 0..5 {
            t.refused_opening(ErrorCode::UnknownNode);
        }
        t.refused_opening(ErrorCode::InviteExpired);
        t.refused_opening(ErrorCode::Removed);
        assert_eq!(t.poll_timeout(), Some(t0), "something to report");
        let line = t.summary(t0).unwrap();
        assert!(
            line.contains("hello or join refused 7 (unknown key 5, removed node 1, bad invite 1, protocol version 0, other 0);"),
            "{line}"
        );
        assert_eq!(t.summary(t0 + SUMMARY_INTERVAL), None, "nothing new");
    }
}
