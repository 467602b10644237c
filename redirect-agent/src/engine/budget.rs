//! The descriptor budget of an engine: one table (RLIMIT_NOFILE) for the control plane and every
//! workload's proxy. The control plane's part is set aside first, computed from what each of
//! its parts can hold at most; the proxied connections of all workloads share the rest
//! ([`Budget`]), each on top of its own `--max-proxy-connections`. A connection over either is
//! reset at accept, so that enroll, list, unenroll and `/ready` keep their descriptors however
//! busy the workloads are.

use redirect_common::maps;

use crate::proxy::{Budget, DNS_SOCKETS_PER_FAMILY, SPARE_SOCKETS};

/// Descriptors one enrolled workload holds whatever its traffic, by part. Counted in
/// `/proc/PID/fd` of a node agent before and after an enroll: 55 for a workload with both
/// families and no fast path (8 listeners and their copies, 3 namespace descriptors, 8 maps, 1
/// program, 1 link, the dialer's sockets, 2 netlink); the parts below are those at their most.
/// One enrolled with `--proxy none` holds about 10.
pub const PER_WORKLOAD: u64 = {
    // The capture listeners (two ports, IPv4 and IPv6) and, with DNS capture, the DNS proxy's
    // TCP listeners and UDP sockets (IPv4 and IPv6), and a second descriptor of each, kept for
    // a handover; the DNS proxy's upstream UDP sockets per family.
    let listeners = (4 + 2 + 2) * 2 + 2 * DNS_SOCKETS_PER_FAMILY as u64;
    // The namespace: the workload's, its address watcher's, its dialer's and each dialer
    // thread's (one per family).
    let netns = 5;
    // Pinned maps its proxy and address watcher hold open: 8 counted, 2 more with the fast
    // path, and 2 spare. (Its sk_lookup instance keeps none: `SkLookupInstance`.)
    let map_fds = 12;
    // Its sk_lookup link and program.
    let sk_lookup = 2;
    // The address watcher's netlink sockets, and an ambient pod's in the node's namespace (its
    // probe source on the node's lo).
    let netlink = 3;
    // Sockets the dialer makes ahead of demand, a thread per family, each with one more in
    // hand while its queue is full.
    let spare = 2 * (SPARE_SOCKETS as u64 + 1);
    // Accepted and not yet admitted or reset: one per listener at a time.
    let accepting = 4;
    // A dialer process in the workload's cgroup (`proxy/cgroup_dialer.rs`): the agent's end of
    // its socket pair, and a batch of up to 8 sockets per family received and not yet queued.
    let dialer_process = 1 + 2 * 8;
    listeners + netns + map_fds + sk_lookup + netlink + spare + accepting + dialer_process
};

/// The control socket: its listener and the clients it serves at once.
const CONTROL: u64 = 1 + crate::api::MAX_CONNECTIONS as u64;

/// One enroll, unenroll or handover at a time (they run under the engine's lock), beyond what
/// the workload then keeps ([`PER_WORKLOAD`]): the sk_lookup instance opens every map of the
/// object and its BTF while it loads, and the enroll opens the namespace, the cgroup directory
/// and a netlink socket to read the addresses; twice that, for a handover's received
/// descriptors and the state file written after.
const ENROLL: u64 = 2 * (maps::ALL.len() as u64 + 1 + 3);

/// The metrics endpoint: its listener, the clients it serves at once, one accepted to be
/// turned away (or to take the place of a stalled one), and a scrape's map descriptor (one at
/// a time).
const METRICS: u64 = 1 + crate::metrics::MAX_CONNECTIONS as u64 + 1 + 1;

/// Now-and-then work of the agent: the lock and state files, the reaper's look at `/proc`,
/// pin checks, `/proc/sys` reads, logging.
const ODDS: u64 = 32;

/// What an engine sets aside and what its proxies share.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    /// RLIMIT_NOFILE in force.
    pub nofile: u64,
    /// Descriptors kept from the proxied connections.
    pub reserved: u64,
    /// The connections all proxies share.
    pub budget: Budget,
}

impl Plan {
    /// `open`: the descriptors the process holds once its programs are loaded and attached
    /// (maps, programs, links, the runtime, standard streams, the lock, the metrics listener,
    /// a handover's descriptors); `workloads`: the most it serves.
    pub(crate) fn new(nofile: u64, open: u64, workloads: usize) -> Self {
        let reserved = reserve(open, workloads);
        Self {
            nofile,
            reserved,
            budget: Budget::new(connections_fitting(nofile, reserved)),
        }
    }
}

/// Descriptors kept from the proxied connections of `workloads` workloads, with `open` held
/// already.
pub(crate) fn reserve(open: u64, workloads: usize) -> u64 {
    open + CONTROL + ENROLL + METRICS + ODDS + PER_WORKLOAD.saturating_mul(workloads as u64)
}

/// `--max-workloads` left out: as many workloads as `nofile` holds the reserve of with half of
/// it left to proxied connections (`open` held already), at most `MAX_WORKLOADS`, at least
/// one. A node with the usual container limit (2^20) gets all 1,024; one held to 20,000
/// descriptors, about 70.
pub(crate) fn fitting_workloads(nofile: u64, open: u64) -> usize {
    let room = (nofile / 2).saturating_sub(reserve(open, 0)) / PER_WORKLOAD;
    usize::try_from(room)
        .unwrap_or(usize::MAX)
        .clamp(1, redirect_common::MAX_WORKLOADS as usize)
}

/// Proxied connections (two descriptors each) that fit in `nofile` beside `reserved`; at least
/// one.
pub(crate) fn connections_fitting(nofile: u64, reserved: u64) -> usize {
    usize::try_from(nofile.saturating_sub(reserved) / 2)
        .unwrap_or(usize::MAX)
        .max(1)
}

/// Descriptors this process holds now.
pub(crate) fn open_now() -> u64 {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_connections_share_what_the_control_plane_and_the_workloads_leave() {
        let reserved = reserve(50, 4);
        assert_eq!(reserved, 50 + CONTROL + ENROLL + METRICS + ODDS + 4 * PER_WORKLOAD);
        let plan = Plan::new(reserved + 600, 50, 4);
        assert_eq!(plan.budget.size(), 300);
        // Below the reserve: one connection, not none (and a warning at start).
        assert_eq!(Plan::new(100, 50, 4).budget.size(), 1);
        // The workloads' part grows with the workloads planned for.
        assert!(reserve(50, 64) > reserve(50, 4) + 60 * 100);
    }

    #[test]
    fn without_a_cap_the_workloads_take_half_the_descriptors_at_most() {
        let max = redirect_common::MAX_WORKLOADS as usize;
        assert_eq!(fitting_workloads(1 << 20, 100), max);
        let n = fitting_workloads(20_000, 100);
        assert!((2..max).contains(&n), "{n}");
        assert!(reserve(100, n) <= 10_000 && reserve(100, n + 1) > 10_000);
        assert_eq!(fitting_workloads(100, 100), 1);
    }
}
