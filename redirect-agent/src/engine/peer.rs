//! Who may take an instance over, and whether it did: the checks that stand between a client
//! of the control socket and this agent giving up its workloads.
//!
//! The socket is root's (0600), but any root client could speak the handover protocol: ask and
//! stall, or say "serving" without serving anything. So the word of the peer decides nothing
//! here; the kernel's does:
//! - [`authenticate`], before anything is handed: the peer's credentials from the socket
//!   (`SO_PEERCRED`, set by the kernel at connect), which must be this process's euid; the
//!   peer's executable, which must have this one's file name (an upgrade is another binary, so
//!   not the same file); and, as the protocol defines, the peer must have this instance's lock
//!   file open: a successor opens it before it asks, since the lock is what it takes next.
//!   A successor of another instance (a `--socket` naming someone else's) opens another lock
//!   file and is refused.
//! - [`attached_by`], when the peer says it serves: every pinned cgroup link must run a
//!   program the peer process holds (it moved the links to its programs with
//!   `BPF_LINK_UPDATE` before it said so).
//! - [`successor_serves`], after this agent let go of the lock: the peer holds the lock, the
//!   state names its pid and its control socket answers. Only then does this agent exit;
//!   otherwise it serves on.

use std::{
    os::{
        fd::{AsFd, BorrowedFd},
        unix::fs::MetadataExt as _,
    },
    path::Path,
    time::{Duration, Instant},
};

use super::{
    links,
    pins::{self, State},
};

/// Why a peer is not taken for a successor, or not yet serving; one line.
pub(crate) type Refusal = String;

/// The peer's pid, if it may take this instance over (see the module's doc).
pub(crate) fn authenticate(stream: &impl AsFd, lock: &std::fs::File) -> Result<u32, Refusal> {
    let cred = rustix::net::sockopt::socket_peercred(stream).map_err(|e| format!("SO_PEERCRED: {e}"))?;
    let pid = cred.pid.as_raw_nonzero().get() as u32;
    let euid = rustix::process::geteuid().as_raw();
    if cred.uid.as_raw() != euid {
        return Err(format!(
            "peer pid {pid} runs as uid {}, not {euid}: only the agent's own user may take over",
            cred.uid.as_raw()
        ));
    }
    let name = |exe: &Path| {
        let n = exe
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        // A binary replaced on disk since it started reads "NAME (deleted)".
        n.strip_suffix(" (deleted)").map(str::to_owned).unwrap_or(n)
    };
    let ours = std::fs::read_link("/proc/self/exe")
        .map(|p| name(&p))
        .unwrap_or_default();
    let theirs = std::fs::read_link(format!("/proc/{pid}/exe"))
        .map(|p| name(&p))
        .map_err(|e| format!("peer pid {pid}: /proc/{pid}/exe: {e}"))?;
    if theirs != ours {
        return Err(format!(
            "peer pid {pid} is '{theirs}', not '{ours}': only an agent process takes over"
        ));
    }
    let lock = lock.metadata().map_err(|e| format!("the instance lock: {e}"))?;
    if !holds_file(pid, lock.dev(), lock.ino()) {
        return Err(format!(
            "peer pid {pid} does not have this instance's lock file open: it is not a successor of this instance (one \
             started under another --name, or not an agent's start)"
        ));
    }
    Ok(pid)
}

/// Whether process `pid` has the file `dev`/`ino` open.
fn holds_file(pid: u32, dev: u64, ino: u64) -> bool {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten()
        .filter_map(|e| std::fs::metadata(e.path()).ok())
        .any(|m| m.dev() == dev && m.ino() == ino)
}

/// Whether process `pid` holds the bpf program `id` (its fdinfo names it).
fn holds_program(pid: u32, id: u32) -> bool {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return false;
    };
    let needle = format!("prog_id:\t{id}\n");
    fds.flatten()
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .any(|info| info.contains(&needle))
}

/// Whether the peer `pid` attached: each of `links` runs a program other than this
/// process's (`own`) that `pid` holds.
pub(crate) fn attached_by(pid: u32, links: &[BorrowedFd<'_>], own: &[u32]) -> Result<(), Refusal> {
    for link in links {
        let (link_id, prog) = links::info(*link).map_err(|e| format!("link info: {e}"))?;
        if own.contains(&prog) {
            return Err(format!(
                "link {link_id} still runs this agent's program {prog}: the peer (pid {pid}) attached nothing"
            ));
        }
        if !holds_program(pid, prog) {
            return Err(format!(
                "link {link_id} runs program {prog}, which the peer (pid {pid}) does not hold"
            ));
        }
    }
    Ok(())
}

fn alive(pid: u32) -> bool {
    i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
        .is_some_and(|p| rustix::process::test_kill_process(p).is_ok())
}

/// Waits (up to `within`) until the successor `pid` serves instance `name`: it holds the
/// lock, the state names it, and `socket` answers. Fails at once if it died.
pub(crate) fn successor_serves(name: &str, socket: &Path, pid: u32, within: Duration) -> Result<(), Refusal> {
    let deadline = Instant::now() + within;
    loop {
        if !alive(pid) {
            return Err(format!("the successor (pid {pid}) exited"));
        }
        let state = State::read(name).map(|s| s.pid);
        if state == Some(pid) && pins::is_locked(name) && std::os::unix::net::UnixStream::connect(socket).is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "the successor (pid {pid}) did not serve within {} s (state names pid {}, lock {}held)",
                within.as_secs(),
                state.map_or("none".into(), |p| p.to_string()),
                if pins::is_locked(name) { "" } else { "not " },
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
