//! The relay's memory for queued output, shared by all clients.
//!
//! Each client's queue has its own limit ([`super::client_conn::Limits::queue_bytes`]),
//! but thousands of clients that stop reading would each fill theirs. The
//! budget bounds the sum. Queued bytes are sealed in Noise nonce order and
//! cannot be taken back, so the budget can only refuse new ones (drop-newest,
//! as per client). Refusing only at the very top would let slow readers fill
//! it and starve everyone, so a client's own limit shrinks as the budget fills:
//! up to half full every client gets its full limit; above that, its limit
//! is scaled by the share of the upper half still free.
//!
//! What that guarantees: a client holding `q` bytes can add `n` only while
//! `free >= (q + n) * (limit / 2) / per_client`. So clients that already
//! hold data stop growing while there is still room for at least
//! `limit / per_client` more clients with empty queues (256 with the
//! defaults): a reader that keeps up, whose queue is empty most of the time,
//! still gets its datagrams through when slow readers have taken the rest.

/// Default total: a small VPS or a router with a few hundred MB can spare it.
pub const DEFAULT_TOTAL_QUEUE_BYTES: usize = 64 * 1024 * 1024;

#[derive(Debug)]
pub struct QueueBudget {
    limit: usize,
    used: usize,
    peak: usize,
}

impl QueueBudget {
    pub fn new(limit: usize) -> QueueBudget {
        QueueBudget {
            limit,
            used: 0,
            peak: 0,
        }
    }

    /// The most bytes a client with its own limit `per_client` may have queued now.
    pub fn client_cap(&self, per_client: usize) -> usize {
        let half = self.limit / 2;
        if self.used <= half {
            return per_client;
        }
        let free = self.limit.saturating_sub(self.used);
        let upper = (self.limit - half).max(1);
        (per_client as u128 * free as u128 / upper as u128) as usize
    }

    /// The most bytes a client that has `queued` bytes queued may have
    /// queued now: [`QueueBudget::client_cap`], and never past the total.
    pub fn cap_for(&self, queued: usize, per_client: usize) -> usize {
        let free = self.limit.saturating_sub(self.used);
        self.client_cap(per_client).min(queued + free)
    }

    /// Whether `n` more bytes fit for a client that has `queued` bytes queued.
    pub fn admits(&self, queued: usize, n: usize, per_client: usize) -> bool {
        queued + n <= self.cap_for(queued, per_client)
    }

    /// One client's queued bytes went from `before` to `after`.
    pub fn adjust(&mut self, before: usize, after: usize) {
        self.used = (self.used + after).saturating_sub(before);
        self.peak = self.peak.max(self.used);
    }

    pub fn used(&self) -> usize {
        self.used
    }

    /// The largest `used` ever was.
    pub fn peak(&self) -> usize {
        self.peak
    }

    pub fn limit(&self) -> usize {
        self.limit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PER_CLIENT: usize = 256 * 1024;
    /// A 1,500-byte datagram as queued: relay frame header, key, Noise framing and tag.
    const DATAGRAM: usize = 1500 + 3 + 32 + 6 + 16;

    #[test]
    fn full_limit_until_half_then_shrinking_to_nothing() {
        let mut b = QueueBudget::new(1000);
        assert_eq!(b.client_cap(100), 100);
        b.adjust(0, 500);
        assert_eq!(b.client_cap(100), 100);
        b.adjust(500, 750);
        assert_eq!(b.client_cap(100), 50);
        b.adjust(750, 1000);
        assert_eq!(b.client_cap(100), 0);
        assert!(!b.admits(0, 1, 100));
        b.adjust(1000, 0);
        assert_eq!((b.used(), b.peak()), (0, 1000));
    }

    #[test]
    fn the_total_is_never_exceeded_even_with_per_client_limits_above_it() {
        let mut b = QueueBudget::new(10_000);
        let mut queued = [0usize; 4];
        for _ in 0..1000 {
            for q in queued.iter_mut() {
                if b.admits(*q, 700, 1 << 30) {
                    b.adjust(*q, *q + 700);
                    *q += 700;
                }
            }
        }
        assert!(b.used() <= 10_000 && b.peak() <= 10_000, "{b:?}");
        assert_eq!(b.used(), queued.iter().sum::<usize>());
    }

    /// Many clients that never read fill what they can; a client with an
    /// empty queue (one that keeps up) still gets a datagram in.
    #[test]
    fn slow_readers_cannot_starve_a_client_that_keeps_up() {
        for slow in [10usize, 300, 1000, 20_000] {
            let mut b = QueueBudget::new(DEFAULT_TOTAL_QUEUE_BYTES);
            let mut queued = vec![0usize; slow];
            loop {
                let mut grew = false;
                for q in queued.iter_mut() {
                    if b.admits(*q, DATAGRAM, PER_CLIENT) {
                        b.adjust(*q, *q + DATAGRAM);
                        *q += DATAGRAM;
                        grew = true;
                    }
                }
                if !grew {
                    break;
                }
            }
            assert!(b.peak() <= b.limit());
            assert!(
                b.admits(0, DATAGRAM, PER_CLIENT),
                "{slow} slow readers starve a fresh client: {b:?}"
            );
            // Below half the budget nobody is held back beyond their own limit.
            if slow * PER_CLIENT <= b.limit() / 2 {
                assert!(queued.iter().all(|&q| q + DATAGRAM > PER_CLIENT), "{slow}");
            }
        }
    }
}
