//! The sweep of `INBOUND_PENDING`: records of inbound connections that nothing will take.
//!
//! sk_lookup records a connection it hands to a capture listener; the record is taken within
//! moments, when the connection is accepted (sock_ops moves it, the embedded proxy reads it).
//! sk_lookup runs for any segment that finds no socket of its own and cannot see its flags, so
//! a segment that is no SYN leaves a record no accept will ever take: a late segment of a
//! connection whose socket just closed (sent before the close, delayed in another CPU's
//! backlog, as a loaded node does), or a stray from anywhere. So does a SYN whose client gave
//! up before its handshake completed. The LRU would push such records out only once full.
//!
//! Every [`SWEEP_EVERY`], each record is marked (`OrigDst::swept`); one still marked at the
//! next sweep has waited that long untaken, and goes. A record lives from one to two periods
//! untaken: longer than a handshake under load, and longer than the client's first four SYN
//! retransmissions (1, 3, 7 and 15 s after the first), whose record must last so that they go
//! where the first went, uncounted, as conntrack's SYN_SENT entry keeps them out of nat.
//! sk_lookup writes a new record unmarked, so a record taken and written again between two
//! sweeps (a 4-tuple used again) starts over.

use std::{path::Path, time::Duration};

use aya::maps::{HashMap, MapData};
use redirect_common::{OrigDst, TupleKey, maps};

use super::{EnrollError, object::open_typed, pins};

/// `bpf(2)`'s update flag: only an existing element (uapi `linux/bpf.h`).
const BPF_EXIST: u64 = 2;

/// How often records are marked, and marked ones removed.
pub const SWEEP_EVERY: Duration = Duration::from_secs(15);

/// The longest an untaken record can last: what a check that records come back to their idle
/// count must allow for.
pub const UNTAKEN_AT_MOST: Duration = Duration::from_secs(2 * SWEEP_EVERY.as_secs());

/// The sweep of one instance's `INBOUND_PENDING`.
pub struct PendingSweep {
    map: HashMap<MapData, TupleKey, OrigDst>,
}

/// What one pass did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Swept {
    pub marked: usize,
    pub removed: usize,
}

impl PendingSweep {
    /// The map of the instance named `name`, from its pin.
    pub fn open(name: &str) -> Result<Self, EnrollError> {
        Self::open_in(&pins::pin_dir(name))
    }

    fn open_in(dir: &Path) -> Result<Self, EnrollError> {
        Ok(Self {
            map: open_typed(dir, maps::INBOUND_PENDING)?,
        })
    }

    /// One pass: removes the records the last pass marked, marks the others.
    pub fn sweep(&mut self) -> Swept {
        // Keys first: the map is not walked while it changes under this pass's own writes.
        let keys: Vec<TupleKey> = self.map.keys().filter_map(Result::ok).collect();
        let mut done = Swept::default();
        for key in keys {
            // Taken (or pushed out) since the keys were read: nothing to do.
            let Ok(mut v) = self.map.get(&key, 0) else {
                continue;
            };
            if v.swept != 0 {
                if self.map.remove(&key).is_ok() {
                    done.removed += 1;
                }
            } else {
                v.swept = 1;
                // BPF_EXIST: never brings back a record taken since the read. One taken and
                // written again in between (a 4-tuple used again at once) is marked early and
                // so lasts one period untaken instead of two: still far past its handshake.
                if self.map.insert(key, v, BPF_EXIST).is_ok() {
                    done.marked += 1;
                }
            }
        }
        done
    }

    /// Sweeps every [`SWEEP_EVERY`] until dropped (the caller aborts the task).
    pub async fn run(mut self) {
        let mut tick = tokio::time::interval(SWEEP_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The first tick is at once: nothing to sweep before a period has passed.
        tick.tick().await;
        loop {
            tick.tick().await;
            let swept = self.sweep();
            if swept.removed > 0 {
                tracing::debug!(
                    removed = swept.removed,
                    "removed inbound records nothing took (segments without a handshake)"
                );
            }
        }
    }
}
