//! Workloads whose network namespace went away without an unenroll (a pod deleted while the
//! CNI DEL never came, `ip netns del` of a namespace enrolled by path): released as unenroll
//! would release them.
//!
//! The agent's own descriptors keep such a namespace alive: the `Netns` it holds, the proxy's
//! listeners and upstream sockets (every socket holds its namespace), and the dialer's threads
//! that entered it. So "gone" cannot be the kernel freeing it; it is what a container runtime
//! leaves when it deletes a pod: the path the workload was enrolled with no longer names that
//! namespace (its bind mount removed, or `/proc/PID/ns/net` of an exited process), no other
//! process has a thread in it, and no mount of this mount namespace holds it. While any
//! process is still in it, it stays captured (fail-closed), whatever its path says.

use std::{
    collections::BTreeSet,
    io,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use super::Engine;
use crate::sys::Netns;

/// How often the node agent looks (each look opens one path per workload; only when one of
/// them no longer names its namespace does it read `/proc`).
pub(crate) const CHECK_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// A namespace's identity as `stat` gives it: (device, inode) of its nsfs file.
type NsId = (u64, u64);

/// One enrolled workload as the check needs it, copied out so that the slow part runs
/// without the engine's lock.
pub(crate) struct Candidate {
    id: String,
    path: PathBuf,
    netns_cookie: u64,
    ns: NsId,
}

fn ns_id(netns: &Netns) -> io::Result<NsId> {
    let st = rustix::fs::fstat(netns.as_fd())?;
    Ok((st.st_dev, st.st_ino))
}

/// Whether `path` positively no longer names the namespace whose cookie is `cookie`: it names
/// nothing (ENOENT) or another namespace. Any other failure (out of descriptors, say) tells
/// nothing, and a workload is never released on nothing.
fn path_lost(path: &Path, cookie: u64) -> bool {
    match Netns::open(path) {
        Ok(ns) => ns.cookie().is_ok_and(|c| c != cookie),
        Err(e) => e.is_not_found(),
    }
}

/// The namespaces some thread of another process is in (this process's own threads are the
/// agent's handles, not users of the namespace).
fn in_use_by_processes() -> io::Result<BTreeSet<NsId>> {
    let me = std::process::id().to_string();
    let mut out = BTreeSet::new();
    for pid in std::fs::read_dir("/proc")?.flatten() {
        let name = pid.file_name();
        let Some(name) = name.to_str() else { continue };
        if name == me || !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        // A process may exit while we look: its entries vanish (ENOENT, or ESRCH for a
        // zombie's namespaces), which is not an error; nor is a process whose namespaces even
        // root may not see (EACCES: a sandbox's own init, say), which no pod process is. Any
        // other failure is (out of descriptors or memory): not knowing where a process is must
        // not count as it being nowhere.
        let tasks = match std::fs::read_dir(pid.path().join("task")) {
            Ok(t) => t,
            Err(e) if vanished(&e) || e.kind() == io::ErrorKind::PermissionDenied => continue,
            Err(e) => return Err(e),
        };
        for task in tasks {
            let task = match task {
                Ok(t) => t,
                Err(e) if vanished(&e) => continue,
                Err(e) => return Err(e),
            };
            match rustix::fs::stat(task.path().join("ns/net")) {
                Ok(st) => {
                    out.insert((st.st_dev, st.st_ino));
                }
                Err(e) if vanished(&e.into()) || e == rustix::io::Errno::ACCESS || e == rustix::io::Errno::PERM => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(out)
}

/// An entry of `/proc` that went away while it was read: its process exited.
fn vanished(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ESRCH)
}

/// Inodes of the network namespaces bind-mounted in this mount namespace (nsfs mounts show
/// their namespace as the root, `net:[INODE]`).
fn mounted() -> io::Result<BTreeSet<u64>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let root = l.split(' ').nth(3)?;
            root.strip_prefix("net:[")?.strip_suffix(']')?.parse().ok()
        })
        .collect())
}

/// Of `candidates`, the ones whose namespace is gone (see the module's doc). Blocking: reads
/// `/proc`.
pub(crate) fn gone(candidates: Vec<Candidate>) -> Vec<Candidate> {
    let orphaned: Vec<Candidate> = candidates
        .into_iter()
        .filter(|c| path_lost(&c.path, c.netns_cookie))
        .collect();
    if orphaned.is_empty() {
        return orphaned;
    }
    let used = match in_use_by_processes() {
        Ok(u) => u,
        Err(e) => {
            // Without knowing who is in them, nothing is released.
            tracing::warn!("reading /proc for namespaces in use: {e}");
            return Vec::new();
        }
    };
    let mounts = match mounted() {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!("reading /proc/self/mountinfo: {e}");
            return Vec::new();
        }
    };
    orphaned
        .into_iter()
        .filter(|c| !used.contains(&c.ns) && !mounts.contains(&c.ns.1))
        .collect()
}

impl Engine {
    /// The enrolled workloads, for [`gone`].
    pub(crate) fn gone_candidates(&self) -> Vec<Candidate> {
        if self.handed_over {
            return Vec::new();
        }
        self.workloads
            .values()
            .filter_map(|w| {
                Some(Candidate {
                    id: w.info.id.clone(),
                    path: w.info.netns.clone(),
                    netns_cookie: w.info.netns_cookie,
                    ns: ns_id(&w.netns).ok()?,
                })
            })
            .collect()
    }

    /// Releases the workloads [`gone`] found, as unenroll does (maps, link, listeners, proxy,
    /// counters' slot), if they are still the ones it looked at.
    pub(crate) fn release_gone(&mut self, gone: Vec<Candidate>) {
        for c in gone {
            let same = self
                .workloads
                .get(&c.id)
                .is_some_and(|w| w.info.netns_cookie == c.netns_cookie);
            if !same {
                continue;
            }
            tracing::warn!(
                id = %c.id,
                netns = %c.path.display(),
                netns_cookie = c.netns_cookie,
                "network namespace is gone (its path no longer names it and no process is in it) without an \
                 unenroll; releasing the workload"
            );
            if let Err(e) = self.unenroll(Some(c.id.clone()), None) {
                tracing::error!(id = %c.id, "releasing a workload whose namespace is gone: {e}");
            }
        }
    }
}
