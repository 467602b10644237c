//! Finding a capture listener that was already listening when the agent started.
//!
//! sock_ops registers the workload's inbound capture listener when it calls listen(); a proxy
//! (Envoy, with `--proxy none`) that was listening before the agent attached never passes
//! there. iptables' REDIRECT reaches whichever socket listens on the port, so the agent finds
//! that socket the way `ss -lp` does (the namespace's `/proc/net/tcp`, then the owning
//! process's fds) and takes its own reference with `pidfd_getfd` (5.6+) to register it.

use std::{io, os::fd::OwnedFd, path::Path};

use crate::sys::Netns;

/// TCP_LISTEN in `/proc/net/tcp`'s `st` column.
const TCP_LISTEN: &str = "0A";

/// Inodes of IPv4 sockets listening on `port`, from a `/proc/net/tcp` text.
pub fn listening_inodes(proc_net_tcp: &str, port: u16) -> Vec<u64> {
    proc_net_tcp
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            let local_port = u16::from_str_radix(f.get(1)?.rsplit(':').next()?, 16).ok()?;
            (local_port == port && *f.get(3)? == TCP_LISTEN).then(|| f.get(9)?.parse().ok())?
        })
        .collect()
}

/// A process's fd that refers to socket `inode`, by scanning `/proc/*/fd`.
fn find_owner(inode: u64) -> io::Result<Option<(i32, i32)>> {
    let want = format!("socket:[{inode}]");
    for proc_entry in std::fs::read_dir("/proc")?.flatten() {
        let Some(pid) = proc_entry.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        // Processes exit and fds close while we look: skip what vanished.
        let Ok(fds) = std::fs::read_dir(proc_entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(target) = std::fs::read_link(fd.path()) else {
                continue;
            };
            if target == Path::new(&want)
                && let Some(n) = fd.file_name().to_str().and_then(|s| s.parse::<i32>().ok())
            {
                return Ok(Some((pid, n)));
            }
        }
    }
    Ok(None)
}

/// Our own descriptor for another process's fd.
pub(crate) fn dup_from(pid: i32, fd: i32) -> io::Result<OwnedFd> {
    use rustix::process::{Pid, PidfdFlags, PidfdGetfdFlags, pidfd_getfd, pidfd_open};
    let pid = Pid::from_raw(pid).ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("pid {pid}")))?;
    let pidfd = pidfd_open(pid, PidfdFlags::empty())?;
    Ok(pidfd_getfd(&pidfd, fd, PidfdGetfdFlags::empty())?)
}

/// A socket already listening on `port` in the namespace, if any: a descriptor the agent owns
/// and the pid that listens.
pub fn existing_listener(netns: &Netns, port: u16) -> io::Result<Option<(OwnedFd, i32)>> {
    // thread-self: /proc/self/net would show the namespace of the process, not of this thread.
    let table = netns.run(|| std::fs::read_to_string("/proc/thread-self/net/tcp"))?;
    for inode in listening_inodes(&table, port) {
        if let Some((pid, fd)) = find_owner(inode)? {
            return dup_from(pid, fd).map(|fd| Some((fd, pid)));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_listeners_by_port_and_state() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:3A9E 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1337        0 44123 1 0000000000000000 100 0 0 10 0
   1: 0100007F:3A99 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 44124 1 0000000000000000 100 0 0 10 0
   2: 0101C80A:3A9E 0201C80A:D2A4 01 00000000:00000000 00:00000000 00000000     0        0 44125 1 0000000000000000 20 4 30 10 -1
";
        assert_eq!(listening_inodes(table, 15006), [44123]);
        assert_eq!(listening_inodes(table, 15001), [44124]);
        assert!(listening_inodes(table, 80).is_empty());
    }
}
