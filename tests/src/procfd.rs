//! Another process's descriptors, as the kernel shows them: how many it holds
//! (`/proc/PID/fd`), and its TCP sockets, each taken with `pidfd_getfd` to ask the socket
//! itself (addresses, options) rather than a table about it.

use std::{
    io,
    net::SocketAddr,
    os::fd::{OwnedFd, RawFd},
};

use rustix::process::{Pid, PidfdFlags, PidfdGetfdFlags, pidfd_getfd, pidfd_open};

/// Descriptors `pid` holds now.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// One of another process's connected TCP sockets, as a descriptor of our own: while it is
/// held, the socket stays open even after the other process closes its descriptor.
pub struct PeerSocket {
    pub fd: OwnedFd,
    pub local: SocketAddr,
    pub peer: SocketAddr,
}

/// The connected TCP/IP sockets `pid` holds now (listeners and unconnected sockets left out).
pub fn connected_sockets(pid: u32) -> io::Result<Vec<PeerSocket>> {
    let raw = i32::try_from(pid)
        .ok()
        .and_then(Pid::from_raw)
        .ok_or_else(|| io::Error::other("bad pid"))?;
    let pidfd = pidfd_open(raw, PidfdFlags::empty())?;
    let mut out = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        let entry = entry?;
        let is_socket = std::fs::read_link(entry.path()).is_ok_and(|t| t.to_string_lossy().starts_with("socket:"));
        let Some(n) = entry.file_name().to_str().and_then(|n| n.parse::<RawFd>().ok()) else {
            continue;
        };
        if !is_socket {
            continue;
        }
        // Closed since the listing: skip it.
        let Ok(fd) = pidfd_getfd(&pidfd, n, PidfdGetfdFlags::empty()) else {
            continue;
        };
        let local = rustix::net::getsockname(&fd)
            .ok()
            .and_then(|a| SocketAddr::try_from(a).ok());
        let peer = rustix::net::getpeername(&fd)
            .ok()
            .flatten()
            .and_then(|a| SocketAddr::try_from(a).ok());
        if let (Some(local), Some(peer)) = (local, peer) {
            out.push(PeerSocket { fd, local, peer });
        }
    }
    Ok(out)
}
