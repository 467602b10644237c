//! Kernel-facing plumbing: network namespaces, cgroup v2, bpffs, privileges, limits.

use std::{
    fs::File,
    io::{self, IoSlice, IoSliceMut},
    mem::MaybeUninit,
    net::SocketAddr,
    os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
    path::{Path, PathBuf},
};

use rustix::{
    fs::FsWord,
    net::{
        AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
        SendAncillaryMessage, SendFlags, SocketFlags, SocketType,
    },
    process::{Resource, Rlimit},
    thread::LinkNameSpaceType,
};

/// What went wrong with a path, a privilege or a system call; every message names the value.
#[derive(Debug, thiserror::Error)]
pub enum SysError {
    #[error("{0}: {1}")]
    Io(String, #[source] io::Error),
    #[error("no cgroup v2 hierarchy is mounted (none of type cgroup2 in /proc/self/mounts)")]
    NoCgroup2,
    #[error("'{0}' is not a cgroup v2 directory (expected a directory under the cgroup2 mount)")]
    NotCgroup2(PathBuf),
    #[error("'{0}' is not a network namespace (expected /run/netns/NAME or /proc/PID/ns/net)")]
    NotNetns(PathBuf),
    #[error("{what} needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN); running as uid {uid} without {missing}")]
    Privilege { what: String, uid: u32, missing: String },
}

impl SysError {
    /// Whether the path named nothing (ENOENT): a namespace that is positively gone, where
    /// any other failure (out of descriptors, say) says nothing about it.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::Io(_, e) if e.kind() == io::ErrorKind::NotFound)
    }
}

const CGROUP2_SUPER_MAGIC: FsWord = 0x6367_7270;
const BPF_FS_MAGIC: FsWord = 0xcafe_4a11;
const NSFS_MAGIC: FsWord = 0x6e73_6673;

/// Where the agent pins maps: `/sys/fs/bpf/redirect/<name>/`.
pub const BPFFS: &str = "/sys/fs/bpf";
pub const PIN_ROOT: &str = "/sys/fs/bpf/redirect";
/// Locks and state files of running instances.
pub const RUN_DIR: &str = "/run/redirect";

/// The type of the filesystem `path` is on (statfs's `f_type`).
fn statfs_magic(path: &Path) -> io::Result<FsWord> {
    Ok(rustix::fs::statfs(path)?.f_type)
}

/// The cgroup v2 mount point, from `/proc/self/mounts` (it is `/sys/fs/cgroup/unified` on
/// hybrid hosts and `/sys/fs/cgroup` on unified ones).
pub fn cgroup2_root() -> Result<PathBuf, SysError> {
    let mounts =
        std::fs::read_to_string("/proc/self/mounts").map_err(|e| SysError::Io("read /proc/self/mounts".into(), e))?;
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_src, dir, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(dir))
        })
        .next()
        .ok_or(SysError::NoCgroup2)
}

/// A cgroup v2 directory as the programs see it: its id (the directory's inode number on the
/// cgroup2 filesystem, what `bpf_get_current_cgroup_id` returns) and its depth below the
/// hierarchy's root (what `bpf_get_current_ancestor_cgroup_id` takes).
pub fn cgroup_identity(path: &Path) -> Result<(u64, u32), SysError> {
    use std::os::unix::fs::MetadataExt as _;
    open_cgroup2_dir(path)?;
    let io = |what: &Path| {
        let what = what.to_owned();
        move |e| SysError::Io(format!("cgroup {}", what.display()), e)
    };
    let dir = path.canonicalize().map_err(io(path))?;
    let root = cgroup2_root()?;
    let root = root.canonicalize().map_err(io(&root))?;
    let below = dir
        .strip_prefix(&root)
        .map_err(|_| SysError::NotCgroup2(path.to_owned()))?;
    let level = below.components().count() as u32;
    let id = std::fs::metadata(&dir).map_err(io(&dir))?.ino();
    Ok((id, level))
}

/// Whether this process's cgroup is `dir` or below it: then programs attached at `dir` see
/// the agent's own sockets. `false` when it cannot tell (an attach point above this process's
/// cgroup namespace): the engine then takes the way that works either way.
pub fn process_under_cgroup(dir: &Path) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    let (Ok(text), Ok(root), Ok(target)) = (
        std::fs::read_to_string("/proc/self/cgroup"),
        cgroup2_root(),
        std::fs::metadata(dir),
    ) else {
        return false;
    };
    // The v2 line is `0::/path`, relative to the root of this process's cgroup namespace,
    // which is where the cgroup2 mount it sees starts. Directories are compared by identity
    // (a cgroup's inode is its id), not by path: `dir` may be the same cgroup seen through
    // another mount of the hierarchy.
    let Some(own) = text.lines().find_map(|l| l.strip_prefix("0::")) else {
        return false;
    };
    let own = root.join(own.trim_start_matches('/'));
    own.ancestors()
        .take_while(|a| a.starts_with(&root))
        .filter_map(|a| std::fs::metadata(a).ok())
        .any(|m| m.ino() == target.ino() && m.dev() == target.dev())
}

/// Opens a cgroup v2 directory for attaching programs.
pub fn open_cgroup2_dir(path: &Path) -> Result<File, SysError> {
    match statfs_magic(path) {
        Ok(CGROUP2_SUPER_MAGIC) if path.is_dir() => {}
        Ok(_) => return Err(SysError::NotCgroup2(path.to_owned())),
        Err(e) => return Err(SysError::Io(format!("cgroup {}", path.display()), e)),
    }
    File::open(path).map_err(|e| SysError::Io(format!("open cgroup {}", path.display()), e))
}

/// Mounts bpffs at /sys/fs/bpf when nothing is mounted there (fresh machines).
///
/// Agents starting together must not each mount one: a second bpffs stacked on the first hides
/// the pins another agent has just made. Check-and-mount is serialised by a lock on the mount
/// point directory itself, so no lock file is left behind.
pub fn ensure_bpffs() -> Result<(), SysError> {
    if statfs_magic(Path::new(BPFFS)).ok() == Some(BPF_FS_MAGIC) {
        return Ok(());
    }
    std::fs::create_dir_all(BPFFS).map_err(|e| SysError::Io(format!("create {BPFFS}"), e))?;
    let dir = File::open(BPFFS).map_err(|e| SysError::Io(format!("open {BPFFS}"), e))?;
    // flock(LOCK_EX), released when `dir` closes.
    dir.lock().map_err(|e| SysError::Io(format!("lock {BPFFS}"), e))?;
    if statfs_magic(Path::new(BPFFS)).ok() == Some(BPF_FS_MAGIC) {
        return Ok(());
    }
    rustix::mount::mount("bpf", BPFFS, "bpf", rustix::mount::MountFlags::empty(), None)
        .map_err(|e| SysError::Io(format!("mount bpffs at {BPFFS}"), e.into()))?;
    tracing::info!("mounted bpffs at {BPFFS}");
    Ok(())
}

/// Whether two paths name the same file (device and inode), e.g. one namespace as
/// /run/netns/NAME and as /proc/PID/ns/net. Unreadable paths are not the same.
pub fn same_file(a: &Path, b: &Path) -> bool {
    match (rustix::fs::stat(a), rustix::fs::stat(b)) {
        (Ok(a), Ok(b)) => (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino),
        _ => false,
    }
}

/// Fails unless this process may load programs, enter namespaces and mount bpffs.
pub fn require_privileges(what: &str) -> Result<(), SysError> {
    const CAP_NET_ADMIN: u32 = 12;
    const CAP_SYS_ADMIN: u32 = 21;
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    let missing: Vec<&str> = [(CAP_SYS_ADMIN, "CAP_SYS_ADMIN"), (CAP_NET_ADMIN, "CAP_NET_ADMIN")]
        .into_iter()
        .filter(|(bit, _)| eff & (1 << bit) == 0)
        .map(|(_, n)| n)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(SysError::Privilege {
        what: what.into(),
        uid: rustix::process::geteuid().as_raw(),
        missing: missing.join(", "),
    })
}

/// Descriptors kept for everything but proxied connections: listeners, maps, program links,
/// netlink, the runtime.
pub const RESERVED_FDS: u64 = 512;

/// RLIMIT_NOFILE as it is now (soft in `rlim_cur`, hard in `rlim_max`; `RLIM_INFINITY` for
/// no limit). getrlimit cannot fail for a valid resource: this is always `Some`.
pub fn nofile_limit() -> Option<libc::rlimit> {
    let lim = rustix::process::getrlimit(Resource::Nofile);
    let raw = |v: Option<u64>| v.unwrap_or(libc::RLIM_INFINITY);
    Some(libc::rlimit {
        rlim_cur: raw(lim.current),
        rlim_max: raw(lim.maximum),
    })
}

/// Sets RLIMIT_NOFILE to `soft`/`hard` as [`nofile_limit`] spells them.
fn set_nofile_limit(soft: u64, hard: u64) -> io::Result<()> {
    let limit = |v: u64| (v != libc::RLIM_INFINITY).then_some(v);
    rustix::process::setrlimit(
        Resource::Nofile,
        Rlimit {
            current: limit(soft),
            maximum: limit(hard),
        },
    )?;
    Ok(())
}

/// Raises RLIMIT_NOFILE so that `connections` proxied connections fit (each holds two
/// descriptors), past the hard limit when the process may (CAP_SYS_RESOURCE, bounded by
/// fs.nr_open), else to the hard limit. Returns the soft limit now in force.
pub fn raise_nofile_limit(connections: usize) -> u64 {
    raise_nofile_to((connections as u64).saturating_mul(2).saturating_add(RESERVED_FDS))
}

/// Raises RLIMIT_NOFILE towards `want` descriptors, as [`raise_nofile_limit`] does. Returns
/// the soft limit now in force.
pub fn raise_nofile_to(want: u64) -> u64 {
    let Some(mut lim) = nofile_limit() else {
        return 0;
    };
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(lim.rlim_max);
    if want > lim.rlim_max {
        let raised = want.min(nr_open);
        // Fails without CAP_SYS_RESOURCE; then the hard limit holds.
        if set_nofile_limit(raised, raised).is_ok() {
            return raised;
        }
    }
    if lim.rlim_cur < lim.rlim_max {
        let soft = lim.rlim_max.min(want.max(lim.rlim_cur));
        // Lowering nothing and staying within the hard limit, this cannot be refused.
        if set_nofile_limit(soft, lim.rlim_max).is_ok() {
            lim.rlim_cur = soft;
        }
    }
    lim.rlim_cur
}

/// A network namespace, held open by a file descriptor.
#[derive(Debug)]
pub struct Netns {
    file: File,
    path: PathBuf,
}

/// The namespace fd, for attaching programs to the namespace (sk_lookup).
impl AsFd for Netns {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl Netns {
    /// Opens a namespace file such as `/run/netns/NAME` or `/proc/PID/ns/net`.
    pub fn open(path: &Path) -> Result<Self, SysError> {
        let file = File::open(path).map_err(|e| SysError::Io(format!("open netns {}", path.display()), e))?;
        if !is_net_namespace(file.as_fd()) {
            return Err(SysError::NotNetns(path.to_owned()));
        }
        Ok(Self {
            file,
            path: path.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Self {
            file: self.file.try_clone()?,
            path: self.path.clone(),
        })
    }

    /// Enters this namespace on the calling thread. Only for threads made for it: the
    /// runtime's own threads never change namespace.
    pub fn enter_current_thread(&self) -> io::Result<()> {
        rustix::thread::move_into_link_name_space(self.file.as_fd(), Some(LinkNameSpaceType::Network))?;
        Ok(())
    }

    /// Runs `f` on a short-lived thread inside this namespace. Sockets made there stay in the
    /// namespace whichever thread uses them later.
    pub fn run<R: Send>(&self, f: impl FnOnce() -> io::Result<R> + Send) -> io::Result<R> {
        std::thread::scope(|s| {
            s.spawn(|| {
                self.enter_current_thread()?;
                f()
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("namespace worker thread panicked")))
        })
    }

    /// The namespace's cookie, as `bpf_get_netns_cookie` sees it (SO_NETNS_COOKIE, 5.14+).
    pub fn cookie(&self) -> io::Result<u64> {
        self.run(current_netns_cookie)
    }
}

/// Whether `fd` is a network namespace: a file of nsfs whose type (NS_GET_NSTYPE, 4.11+) is
/// CLONE_NEWNET.
fn is_net_namespace(fd: BorrowedFd<'_>) -> bool {
    /// `_IO(0xb7, 0x3)` of linux/nsfs.h.
    const NS_GET_NSTYPE: libc::Ioctl = 0xb703;
    // Checked first so that the request number only ever reaches nsfs, which defines it; on
    // another file type the same number could mean something else.
    if !rustix::fs::fstatfs(fd).is_ok_and(|st| st.f_type == NSFS_MAGIC) {
        return false;
    }
    // SAFETY: `fd` is borrowed, so open for the call, and is an nsfs file (checked above), for
    // which NS_GET_NSTYPE takes no argument, touches no memory of ours, and returns the
    // namespace type or -1. (rustix's no-argument ioctl pattern discards the return value,
    // which is the answer here.)
    unsafe { libc::ioctl(fd.as_raw_fd(), NS_GET_NSTYPE) == libc::CLONE_NEWNET }
}

/// `SO_ORIGINAL_DST`: where an accepted connection was going before a REDIRECT (conntrack's
/// answer), or before the agent captured it (its getsockopt program's).
///
/// Conntrack answers at the level of the connection's family: `SOL_IP` for IPv4 (also on an
/// AF_INET6 socket of a v4-mapped connection), `SOL_IPV6` (`IP6T_SO_ORIGINAL_DST`) for IPv6.
/// `local` is the socket's own address, which tells them apart.
pub fn original_dst(socket: &impl AsFd, local: SocketAddr) -> io::Result<SocketAddr> {
    match local {
        SocketAddr::V6(v6) if v6.ip().to_ipv4_mapped().is_none() => {
            Ok(SocketAddr::V6(rustix::net::sockopt::ipv6_original_dst(socket)?))
        }
        _ => Ok(SocketAddr::V4(rustix::net::sockopt::ip_original_dst(socket)?)),
    }
}

/// The calling thread's network namespace cookie (SO_NETNS_COOKIE, 5.14+).
/// The kernel memory a BPF map takes, as `/proc/self/fdinfo` says (`memlock:`, what bpftool
/// shows as `memlock`). `None` when it cannot be read.
pub fn memlock(map: BorrowedFd<'_>) -> Option<u64> {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", map.as_raw_fd())).ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix("memlock:"))
        .and_then(|v| v.trim().parse().ok())
}

pub fn current_netns_cookie() -> io::Result<u64> {
    let socket = rustix::net::socket_with(AddressFamily::INET, SocketType::DGRAM, SocketFlags::CLOEXEC, None)?;
    netns_cookie(socket.as_fd())
}

/// `getsockopt(SOL_SOCKET, SO_NETNS_COOKIE)`: the cookie of the namespace `socket` was made in.
/// Neither rustix nor socket2 has an accessor for this option.
fn netns_cookie(socket: BorrowedFd<'_>) -> io::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let mut cookie: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: `socket` is borrowed, so open for the call; the value pointer and `len` describe
    // `cookie`, a live, writable u64, and the kernel writes at most `len` bytes there (and the
    // length it wrote into `len`). Any 8 bytes are a valid u64.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if len as usize != size_of::<u64>() {
        return Err(io::Error::other(format!("SO_NETNS_COOKIE: {len} bytes, not 8")));
    }
    Ok(cookie)
}

/// Drops to `uid`/`gid` with no supplementary groups, in a process that has started no thread.
///
/// These are the raw system calls, which change the calling thread's credentials only
/// (glibc's wrappers would make every thread follow); threads started afterwards inherit them.
/// Every caller runs before its process's first thread (`redirect-agent proxy` before its
/// runtime, the test probe, which never starts one), so the whole process changes; this checks
/// that and fails rather than leave other threads with the old credentials.
pub fn become_user(uid: u32, gid: u32) -> io::Result<()> {
    let context = |what: &'static str| move |e: rustix::io::Errno| io::Error::new(e.kind(), format!("{what}: {e}"));
    let threads = std::fs::read_dir("/proc/self/task")
        .map_err(|e| io::Error::new(e.kind(), format!("counting threads in /proc/self/task: {e}")))?
        .count();
    if threads != 1 {
        return Err(io::Error::other(format!(
            "changing identity needs a single-threaded process; this one has {threads} threads"
        )));
    }
    // -1 means "leave unchanged" to the kernel, and rustix's ids must not hold it.
    if uid == u32::MAX || gid == u32::MAX {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("uid {uid}, gid {gid}"),
        ));
    }
    // Groups first: after setuid the process may no longer change them.
    rustix::thread::set_thread_groups(&[]).map_err(context("setgroups"))?;
    rustix::thread::set_thread_gid(rustix::process::Gid::from_raw(gid)).map_err(context("setgid"))?;
    rustix::thread::set_thread_uid(rustix::process::Uid::from_raw(uid)).map_err(context("setuid"))
}

/// Moves the calling (single-threaded) process into a workload: its cgroup, then its network
/// namespace. Both are per task, so this must run before any thread exists.
pub fn join(cgroup: Option<&Path>, netns: Option<&Path>) -> io::Result<()> {
    if let Some(cg) = cgroup {
        std::fs::write(cg.join("cgroup.procs"), std::process::id().to_string())
            .map_err(|e| io::Error::new(e.kind(), format!("join cgroup {}: {e}", cg.display())))?;
    }
    if let Some(ns) = netns {
        Netns::open(ns).map_err(io::Error::other)?.enter_current_thread()?;
    }
    Ok(())
}

/// Most descriptors passed in one SCM_RIGHTS message: a handed-over workload's (its namespace,
/// four capture listeners, and with DNS capture two TCP and two UDP DNS sockets), with room.
pub const MAX_FDS_PER_MESSAGE: usize = 16;

/// Sockets a dialer process sends at once (the descriptor budget counts a batch per family).
pub const DIAL_BATCH: usize = 8;

/// Sends `payload` with `fds` in one message (SCM_RIGHTS needs at least a byte to travel
/// with); the bytes sent.
pub fn send_with_fds(socket: &impl AsFd, payload: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<usize> {
    if fds.len() > MAX_FDS_PER_MESSAGE {
        return Err(io::Error::other(format!(
            "{} descriptors in one message: at most {MAX_FDS_PER_MESSAGE}",
            fds.len()
        )));
    }
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS_PER_MESSAGE))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(io::Error::other("descriptors do not fit the control buffer"));
    }
    Ok(rustix::net::sendmsg(
        socket,
        &[IoSlice::new(payload)],
        &mut control,
        SendFlags::NOSIGNAL,
    )?)
}

/// Receives one message of [`send_with_fds`] into `payload`: the bytes received (0: the peer
/// closed) and its descriptors, owned (close-on-exec). Descriptors cut short (MSG_CTRUNC) are
/// an error.
pub fn recv_with_fds(socket: &impl AsFd, payload: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS_PER_MESSAGE))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let msg = rustix::net::recvmsg(
        socket,
        &mut [IoSliceMut::new(payload)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )?;
    let fds: Vec<OwnedFd> = control
        .drain()
        .filter_map(|m| match m {
            RecvAncillaryMessage::ScmRights(fds) => Some(fds),
            _ => None,
        })
        .flatten()
        .collect();
    if msg.flags.contains(ReturnFlags::CTRUNC) {
        return Err(io::Error::other("descriptors were cut short (MSG_CTRUNC)"));
    }
    Ok((msg.bytes, fds))
}

/// Sends `fds` over a Unix stream socket in one message (with one byte of data).
pub fn send_fds(socket: &impl AsFd, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    if send_with_fds(socket, b"F", fds)? != 1 {
        return Err(io::Error::new(io::ErrorKind::WriteZero, "descriptors not sent"));
    }
    Ok(())
}

/// Receives one message of [`send_fds`]: its descriptors, owned (close-on-exec).
pub fn recv_fds(socket: &impl AsFd) -> io::Result<Vec<OwnedFd>> {
    let (bytes, fds) = recv_with_fds(socket, &mut [0u8; 1])?;
    if bytes == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "peer closed before sending descriptors",
        ));
    }
    Ok(fds)
}

impl Netns {
    /// A namespace received as a descriptor (from a predecessor agent), checked like
    /// [`Netns::open`]; `path` is what it was known as.
    pub fn from_fd(fd: OwnedFd, path: &Path) -> Result<Self, SysError> {
        if !is_net_namespace(fd.as_fd()) {
            return Err(SysError::NotNetns(path.to_owned()));
        }
        Ok(Self {
            file: File::from(fd),
            path: path.to_owned(),
        })
    }
}

/// Waits (at most `within`) until thread `tid` of this process sleeps (`S` in its
/// `/proc/self/task/TID/stat`, after the command name's closing parenthesis): a thread
/// blocked in a read, say, before another wakes it.
pub fn wait_until_asleep(tid: u32, within: std::time::Duration) {
    use std::time::{Duration, Instant};
    let stat = format!("/proc/self/task/{tid}/stat");
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        let text = std::fs::read_to_string(&stat).unwrap_or_default();
        let state = text
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next());
        if state == Some('S') {
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_process_is_under_its_cgroup_root_and_nowhere_else() {
        // Machines without cgroup v2 have nothing to check.
        let Ok(root) = cgroup2_root() else { return };
        assert!(process_under_cgroup(&root));
        // A directory that is no ancestor of ours (nor a cgroup at all).
        assert!(!process_under_cgroup(&std::env::temp_dir()));
        assert!(!process_under_cgroup(Path::new("/nonexistent/cgroup")));
    }
}
