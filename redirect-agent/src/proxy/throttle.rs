//! The proxy's per-connection log lines, throttled: a flood of connections that all fail the
//! same way (direct hits on a capture port, an unreachable destination, the connection limit or
//! the node's connection budget)
//! must not become a flood of lines. The first of a kind is logged with its details; later ones
//! are counted, and a line with the count goes out at most once a second, the last ones when the
//! proxy stops. The counters in [`super::ProxyCounters`] still see every connection.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

/// Lets a repeating event through at most once a period, counting the ones held back. Shared by
/// every connection task of a proxy, without a lock.
pub(super) struct Throttle {
    start: Instant,
    period: Duration,
    /// Milliseconds from `start` to the last report, plus one; 0: never reported.
    last: AtomicU64,
    held: AtomicU64,
}

impl Throttle {
    pub(super) fn new(period: Duration) -> Self {
        Self {
            start: Instant::now(),
            period,
            last: AtomicU64::new(0),
            held: AtomicU64::new(0),
        }
    }

    /// One event. `Some(n)`: report now, `n` events since the last report (this one included).
    pub(super) fn hit(&self) -> Option<u64> {
        self.held.fetch_add(1, Ordering::Relaxed);
        self.take(false)
    }

    /// Events held back, once their period is over (`all`: whatever the period): for the
    /// summary line.
    pub(super) fn take(&self, all: bool) -> Option<u64> {
        if self.held.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let now = self.start.elapsed().as_millis() as u64 + 1;
        let last = self.last.load(Ordering::Relaxed);
        if !all && last != 0 && now.saturating_sub(last) < self.period.as_millis() as u64 {
            return None;
        }
        // One reporter per period: the task that moves `last` takes the count.
        if self
            .last
            .compare_exchange(last, now, Ordering::AcqRel, Ordering::Relaxed)
            .is_err()
        {
            return None;
        }
        Some(self.held.swap(0, Ordering::AcqRel)).filter(|&n| n > 0)
    }
}

/// What a proxy logs per connection.
#[derive(Copy, Clone, Debug)]
pub(super) enum Noise {
    OverLimit,
    OverBudget,
    NoOriginalDst,
    UpstreamFailed,
    AcceptFailed,
}

impl Noise {
    const ALL: [Noise; 5] = [
        Noise::OverLimit,
        Noise::OverBudget,
        Noise::NoOriginalDst,
        Noise::UpstreamFailed,
        Noise::AcceptFailed,
    ];
}

/// One [`Throttle`] per kind of [`Noise`].
pub(super) struct Throttles([Throttle; 5]);

impl Throttles {
    pub(super) const PERIOD: Duration = Duration::from_secs(1);

    pub(super) fn new() -> Self {
        Self(std::array::from_fn(|_| Throttle::new(Self::PERIOD)))
    }

    /// One connection of this kind; `Some(count)`: log it now, with the count.
    pub(super) fn hit(&self, kind: Noise) -> Option<u64> {
        self.0[kind as usize].hit()
    }

    /// Logs the count of each kind held back since its last line, once its period is over
    /// (`all`: now, as the proxy stops). `limit`: the proxy's own; `budget`: the one its
    /// process shares among its proxies.
    pub(super) fn summarize(&self, all: bool, limit: usize, budget: usize) {
        for kind in Noise::ALL {
            let Some(count) = self.0[kind as usize].take(all) else {
                continue;
            };
            match kind {
                Noise::OverLimit => tracing::warn!(limit, count, "connection limit reached; resetting"),
                Noise::OverBudget => {
                    tracing::warn!(budget, count, "the node's connection budget is spent; resetting")
                }
                Noise::NoOriginalDst => {
                    tracing::warn!(
                        count,
                        "no original destination recorded for these connections; resetting"
                    )
                }
                Noise::UpstreamFailed => tracing::info!(count, "upstream connect failed; resetting"),
                Noise::AcceptFailed => tracing::warn!(count, "accept failed"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_throttle_reports_the_first_event_then_counts() {
        let t = Throttle::new(Duration::from_secs(1));
        assert_eq!(t.take(false), None, "nothing to report");
        assert_eq!(t.hit(), Some(1));
        assert_eq!(t.hit(), None);
        assert_eq!(t.hit(), None);
        assert_eq!(t.take(false), None, "within the period");
        // The period is over.
        t.last.store(1, Ordering::Relaxed);
        let start = t.start.checked_sub(Duration::from_secs(2)).unwrap();
        let t = Throttle { start, ..t };
        assert_eq!(t.hit(), Some(3));
        assert_eq!(t.hit(), None);
        assert_eq!(t.take(true), Some(1), "a stop takes what is held");
        assert_eq!(t.take(true), None);
    }
}
