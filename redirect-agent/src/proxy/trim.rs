//! Giving memory back to the system after a burst of connections.
//!
//! Each connection's task, futures and registrations are small allocations; once a burst of
//! thousands ends they are free but scattered, and glibc's malloc returns only the free top of
//! a heap on its own. `malloc_trim` also releases the free pages inside (`MADV_DONTNEED`). It
//! walks every arena under its lock, so it runs only after connections ended, at most once a
//! second for the whole process.
//!
//! And one arena, not glibc's eight per core: with a heap per worker thread, the survivors of a
//! burst pin pages in each of them, and even after `malloc_trim` the heap stayed well above its
//! idle size after bursts of thousands of connections (and above it with two arenas); with one
//! it comes back to it (`cargo xtask stress`, docs/reliability.md). The data path allocates
//! nothing per read (the workers' scratch buffers), and most of what a connection allocates
//! comes from the thread's own cache, so the arena's lock is seldom taken.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

/// Connections that must have ended since a proxy's last trim before it asks for another.
pub(super) const ENDED_BEFORE_TRIM: u64 = 256;
const MIN_INTERVAL: Duration = Duration::from_secs(1);

/// One proxy's view: how many of its connections had ended at its last trim.
#[derive(Default)]
pub(super) struct Trimmer {
    ended_at_trim: u64,
}

impl Trimmer {
    /// Called once a second with the proxy's totals: `ended` connections so far, `active` now
    /// and `active_before` at the previous call. Trims once enough ended and the load is not
    /// growing (a burst on its way up keeps what it will use again).
    pub(super) fn tick(&mut self, ended: u64, active: usize, active_before: usize) {
        if ended.saturating_sub(self.ended_at_trim) < ENDED_BEFORE_TRIM || active > active_before {
            return;
        }
        if trim_process() {
            self.ended_at_trim = ended;
        }
    }
}

/// Trims unless the process did within [`MIN_INTERVAL`]; `true` if it did now.
fn trim_process() -> bool {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    // Milliseconds from START to the last trim, plus one; 0: never.
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = START.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1;
    let last = LAST.load(Ordering::Relaxed);
    if last != 0 && now.saturating_sub(last) < MIN_INTERVAL.as_millis() as u64 {
        return false;
    }
    if LAST
        .compare_exchange(last, now, Ordering::AcqRel, Ordering::Relaxed)
        .is_err()
    {
        return false;
    }
    release_free_memory();
    true
}

/// One malloc arena for the whole process, unless the user chose (`MALLOC_ARENA_MAX`, or
/// `GLIBC_TUNABLES` naming `arena_max`). Call before any thread is made.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn one_arena() {
    let chosen = std::env::var_os("MALLOC_ARENA_MAX").is_some()
        || std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("arena_max"));
    if !chosen {
        // SAFETY: mallopt takes two integers and changes glibc's own tuning; before any other
        // thread exists nothing allocates concurrently.
        unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn one_arena() {}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn release_free_memory() {
    // SAFETY: malloc_trim takes a byte count and only rearranges glibc's own free lists and
    // mappings; it is thread-safe (it takes each arena's lock).
    unsafe { libc::malloc_trim(0) };
}

/// Other allocators (musl's) return freed memory themselves, or offer no such call.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn release_free_memory() {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trim_waits_for_enough_ended_connections_and_a_load_not_growing() {
        let mut t = Trimmer::default();
        t.tick(ENDED_BEFORE_TRIM - 1, 0, 0);
        assert_eq!(t.ended_at_trim, 0, "too few ended");
        t.tick(ENDED_BEFORE_TRIM, 10, 5);
        assert_eq!(t.ended_at_trim, 0, "load growing");
        // Another test's trim may hold the process's interval: bounded retries.
        for _ in 0..30 {
            t.tick(ENDED_BEFORE_TRIM, 5, 10);
            if t.ended_at_trim == ENDED_BEFORE_TRIM {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("never trimmed");
    }
}
