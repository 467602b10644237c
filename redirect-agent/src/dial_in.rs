//! The process that makes the embedded proxy's upstream sockets inside the workload's cgroup
//! (`redirect-agent dial-in`, hidden), and the messages it exchanges with the agent.
//!
//! A socket belongs to the cgroup of the task that made it (`sk_cgrp_data`, set at creation
//! and kept whoever holds the socket later): that is what the workload's cgroup-scoped egress
//! rules match (iptables `-m cgroup`, cgroup_skb and cgroup sock_addr programs). A sidecar
//! lives in the pod's cgroup, so its upstream sockets are the workload's; the agent's are not,
//! and cgroup v2 moves whole processes only. So a child of the agent's binary joins the
//! workload's cgroup and namespace before it has a thread, becomes the proxy's identity (the
//! `-u`/`-g` a sidecar runs as) with no capabilities, and makes plain sockets on request,
//! sent to the agent over a socket pair (SCM_RIGHTS). The agent marks them, sets keepalive and
//! gives them `AGENT_SOCKETS` storage (`proxy/cgroup_dialer.rs`), ahead of demand: no hop is added on a
//! connection's path.
//!
//! Protocol over a SOCK_SEQPACKET pair (the child's end is its stdin):
//! 1. agent -> child: one byte and the workload's namespace descriptor;
//! 2. child -> agent: `R` once it is in the cgroup and namespace as the proxy identity, or
//!    `E`, the error's errno (4 bytes, little-endian, 0 for none) and its text (then it exits);
//! 3. then, repeatedly, agent -> child: `[family, count]` (family 4 or 6, count 1..=8);
//!    child -> agent: `[made, errno (4 bytes, little-endian)]` with `made` sockets attached;
//!    `errno` is that of the first socket it could not make (0 when all were made).
//!
//! The child exits when the agent's end closes, and is killed if the agent dies
//! (PR_SET_PDEATHSIG).

use std::{
    io,
    os::fd::{AsFd, BorrowedFd, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    process::ExitCode,
};

use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketFlags, SocketType};

use crate::sys::{self, DIAL_BATCH};

#[derive(clap::Args, Debug, Clone)]
pub struct DialInArgs {
    /// cgroup v2 directory to join (the workload's).
    #[arg(long)]
    pub cgroup: PathBuf,
    /// The identity to make sockets as (the proxy's, istio-iptables -u).
    #[arg(long)]
    pub uid: u32,
    /// (istio-iptables -g).
    #[arg(long)]
    pub gid: u32,
    /// The agent's pid: the child exits at once if its parent is already another.
    #[arg(long)]
    pub parent: u32,
}

/// Ready (step 2).
pub const READY: u8 = b'R';
/// Failed to start (step 2), followed by the errno and the error's text.
pub const FAILED: u8 = b'E';

/// The child. Single-threaded throughout: cgroup, namespace and identity are per task.
pub fn main(args: &DialInArgs) -> ExitCode {
    // SAFETY: descriptor 0 is the socket pair's end the agent passed as stdin; this process
    // owns it from here on (nothing else in it reads stdin).
    let conn = unsafe { OwnedFd::from_raw_fd(0) };
    // Dies with the agent (with the thread that started it, which lives as long as the
    // workload's dialer). Set first, then checked: a parent that died before is seen here.
    let orphaned = rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL)).is_err()
        || rustix::process::getppid().map(|p| p.as_raw_nonzero().get() as u32) != Some(args.parent);
    if orphaned {
        return ExitCode::FAILURE;
    }
    // Whatever the agent inherited without close-on-exec (its supervisor's pipes, say) is not
    // the workload's to hold.
    // SAFETY: close_range takes no pointers; descriptors 3 and up are owned by nothing in this
    // process yet (clap and the runtime's startup open none that stay open).
    unsafe { libc::close_range(3, u32::MAX, 0) };
    if let Err(e) = enter(args, &conn) {
        let mut msg = vec![FAILED];
        msg.extend_from_slice(&e.raw_os_error().unwrap_or(0).to_le_bytes());
        msg.extend_from_slice(e.to_string().as_bytes());
        msg.truncate(512);
        let _ = rustix::net::send(&conn, &msg, SendFlags::NOSIGNAL);
        return ExitCode::FAILURE;
    }
    if rustix::net::send(&conn, &[READY], SendFlags::NOSIGNAL).is_err() {
        return ExitCode::FAILURE;
    }
    serve(&conn);
    ExitCode::SUCCESS
}

/// Steps 1 and 2: the namespace from the agent, the cgroup, then the proxy identity with no
/// capabilities left (a sidecar has none: nothing here needs any once the sockets' cgroup and
/// namespace are set, the agent marks them).
fn enter(args: &DialInArgs, conn: &OwnedFd) -> io::Result<()> {
    let fds = sys::recv_fds(conn)?;
    let [netns] = <[OwnedFd; 1]>::try_from(fds)
        .map_err(|fds| io::Error::other(format!("expected 1 namespace descriptor, got {}", fds.len())))?;
    let netns = sys::Netns::from_fd(netns, Path::new("(from the agent)")).map_err(io::Error::other)?;
    sys::join(Some(&args.cgroup), None)?;
    netns.enter_current_thread()?;
    drop(netns);
    sys::become_user(args.uid, args.gid)?;
    // Root (`-u 0`) keeps its capabilities across setuid(0); everyone else has lost them.
    rustix::thread::set_capabilities(
        None,
        rustix::thread::CapabilitySets {
            effective: rustix::thread::CapabilitySet::empty(),
            permitted: rustix::thread::CapabilitySet::empty(),
            inheritable: rustix::thread::CapabilitySet::empty(),
        },
    )
    .map_err(|e| io::Error::new(e.kind(), format!("dropping capabilities: {e}")))?;
    rustix::thread::set_no_new_privs(true)?;
    Ok(())
}

/// Step 3 until the agent's end closes.
fn serve(conn: &OwnedFd) {
    loop {
        let mut req = [0u8; 2];
        match rustix::net::recv(conn, &mut req, RecvFlags::empty()) {
            Ok((2, _)) => {}
            // EOF (the agent is done with us) or a malformed request: either way, stop.
            _ => return,
        }
        let family = match req[0] {
            4 => AddressFamily::INET,
            6 => AddressFamily::INET6,
            _ => return,
        };
        let count = usize::from(req[1]).clamp(1, DIAL_BATCH);
        let mut made = Vec::with_capacity(count);
        let mut errno = 0;
        for _ in 0..count {
            match rustix::net::socket_with(
                family,
                SocketType::STREAM,
                SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
                None,
            ) {
                Ok(s) => made.push(s),
                Err(e) => {
                    errno = e.raw_os_error();
                    break;
                }
            }
        }
        let fds: Vec<BorrowedFd<'_>> = made.iter().map(AsFd::as_fd).collect();
        if send_reply(conn, &fds, errno).is_err() {
            return;
        }
    }
}

/// A step 3 reply.
fn send_reply(conn: &impl AsFd, fds: &[BorrowedFd<'_>], errno: i32) -> io::Result<()> {
    let mut payload = [0u8; 5];
    payload[0] = fds.len() as u8;
    payload[1..].copy_from_slice(&errno.to_le_bytes());
    sys::send_with_fds(conn, &payload, fds)?;
    Ok(())
}

/// Receives a step 3 reply: the sockets made, and the error that stopped the child short.
pub fn recv_reply(conn: &impl AsFd) -> io::Result<(Vec<OwnedFd>, Option<io::Error>)> {
    let mut payload = [0u8; 5];
    let (bytes, fds) = sys::recv_with_fds(conn, &mut payload)?;
    if bytes == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the upstream dialer process closed its end",
        ));
    }
    if bytes != payload.len() || fds.len() != usize::from(payload[0]) {
        return Err(io::Error::other(format!(
            "malformed reply from the upstream dialer process ({bytes} bytes, {} descriptors)",
            fds.len()
        )));
    }
    let errno = i32::from_le_bytes([payload[1], payload[2], payload[3], payload[4]]);
    Ok((fds, (errno != 0).then(|| io::Error::from_raw_os_error(errno))))
}
