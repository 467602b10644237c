//! The connection budget every proxy of one process shares: one descriptor table
//! (RLIMIT_NOFILE) holds all their connections, so a limit per proxy alone would let two busy
//! workloads (or one busy workload and the control plane) run the process out of descriptors.
//! What the process keeps aside for everything else is the engine's to say
//! ([`crate::engine::budget`]); here it is only spent.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Connections the process's proxies may hold together, each two descriptors (the accepted one
/// and the upstream one). Clones share it.
#[derive(Clone, Debug)]
pub struct Budget {
    permits: Arc<Semaphore>,
    size: usize,
}

impl Budget {
    /// At least one connection, so that a budget of none cannot be asked for by mistake.
    pub fn new(connections: usize) -> Self {
        let size = connections.clamp(1, Semaphore::MAX_PERMITS);
        Self {
            permits: Arc::new(Semaphore::new(size)),
            size,
        }
    }

    /// Connections it allows at once.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Connections held now, by every proxy that shares it.
    pub fn in_use(&self) -> usize {
        self.size - self.permits.available_permits()
    }

    /// One connection's share, held for its life; `None`: spent (the connection is reset).
    pub(super) fn take(&self) -> Option<OwnedSemaphorePermit> {
        self.permits.clone().try_acquire_owned().ok()
    }

    /// A share for something a connection can do without (a pipe to splice through: two
    /// descriptors, as a connection), only while half of the budget stays free after it, so
    /// that it never leaves a new connection without one.
    pub(super) fn take_spare(&self) -> Option<OwnedSemaphorePermit> {
        if self.permits.available_permits() <= self.size / 2 {
            return None;
        }
        self.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clones_share_one_budget_and_a_share_comes_back_when_dropped() {
        let a = Budget::new(2);
        let b = a.clone();
        let one = a.take().expect("first");
        let two = b.take().expect("second");
        assert!(a.take().is_none() && b.take().is_none(), "spent for both");
        assert_eq!((a.in_use(), b.size()), (2, 2));
        drop(one);
        assert!(b.take().is_some());
        drop(two);
        assert_eq!(Budget::new(0).size(), 1, "never none");
    }

    #[test]
    fn a_spare_share_leaves_half_of_the_budget_free() {
        let b = Budget::new(4);
        let spare = b.take_spare().expect("4 free");
        let _other = b.take_spare().expect("3 free");
        assert!(b.take_spare().is_none(), "2 free: half");
        let _connection = b.take().expect("a connection still gets one");
        drop(spare);
        assert!(b.take_spare().is_none(), "2 free again: half");
    }
}
