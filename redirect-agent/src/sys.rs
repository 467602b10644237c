//! Kernel-facing plumbing: network namespaces, cgroup v2, bpffs, privileges, limits.

use std::{
    ffi::CString,
    fs::File,
    io,
    mem::MaybeUninit,
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
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

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const NSFS_MAGIC: i64 = 0x6e73_6673;
const SO_NETNS_COOKIE: libc::c_int = 71;

/// Where the agent pins maps: `/sys/fs/bpf/redirect/<name>/`.
pub const BPFFS: &str = "/sys/fs/bpf";
pub const PIN_ROOT: &str = "/sys/fs/bpf/redirect";
/// Locks and state files of running instances.
pub const RUN_DIR: &str = "/run/redirect";

fn statfs_magic(path: &Path) -> io::Result<i64> {
    let c = CString::new(path.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
    let mut buf = MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: valid C string and out-pointer.
    if unsafe { libc::statfs(c.as_ptr(), buf.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: statfs succeeded and filled the struct.
    Ok(unsafe { buf.assume_init() }.f_type)
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
/// the agent's own sockets.
pub fn process_under_cgroup(dir: &Path) -> bool {
    let (Ok(text), Ok(root), Ok(dir)) = (
        std::fs::read_to_string("/proc/self/cgroup"),
        cgroup2_root(),
        dir.canonicalize(),
    ) else {
        return false;
    };
    // The v2 line is `0::/path`, relative to the cgroup2 mount.
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .and_then(|own| root.join(own.trim_start_matches('/')).canonicalize().ok())
        .is_some_and(|own| own.starts_with(&dir))
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
    // SAFETY: valid fd; the lock is released when `dir` closes.
    if unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(SysError::Io(format!("lock {BPFFS}"), io::Error::last_os_error()));
    }
    if statfs_magic(Path::new(BPFFS)).ok() == Some(BPF_FS_MAGIC) {
        return Ok(());
    }
    let (src, dst, fstype) = (c"bpf", c"/sys/fs/bpf", c"bpf");
    // SAFETY: constant C strings; no data argument.
    let rc = unsafe { libc::mount(src.as_ptr(), dst.as_ptr(), fstype.as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        return Err(SysError::Io(
            format!("mount bpffs at {BPFFS}"),
            io::Error::last_os_error(),
        ));
    }
    tracing::info!("mounted bpffs at {BPFFS}");
    Ok(())
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
    // SAFETY: geteuid has no failure mode.
    let uid = unsafe { libc::geteuid() };
    Err(SysError::Privilege {
        what: what.into(),
        uid,
        missing: missing.join(", "),
    })
}

/// Descriptors kept for everything but proxied connections: listeners, maps, program links,
/// netlink, the runtime.
pub const RESERVED_FDS: u64 = 512;

/// RLIMIT_NOFILE as it is now (soft in `rlim_cur`, hard in `rlim_max`).
pub fn nofile_limit() -> Option<libc::rlimit> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid out-pointer.
    (unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0).then_some(lim)
}

/// Raises RLIMIT_NOFILE so that `connections` proxied connections fit (each holds two
/// descriptors), past the hard limit when the process may (CAP_SYS_RESOURCE, bounded by
/// fs.nr_open), else to the hard limit. Returns the soft limit now in force.
pub fn raise_nofile_limit(connections: usize) -> u64 {
    let want = (connections as u64).saturating_mul(2).saturating_add(RESERVED_FDS);
    let Some(mut lim) = nofile_limit() else {
        return 0;
    };
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(lim.rlim_max);
    if want > lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: want.min(nr_open),
            rlim_max: want.min(nr_open),
        };
        // SAFETY: valid in-pointer. Fails without CAP_SYS_RESOURCE; then the hard limit holds.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            return raised.rlim_cur;
        }
    }
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max.min(want.max(lim.rlim_cur));
        // SAFETY: valid in-pointer.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
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
        match statfs_magic(path) {
            Ok(NSFS_MAGIC) => {}
            _ => return Err(SysError::NotNetns(path.to_owned())),
        }
        // SAFETY: NS_GET_NSTYPE takes no argument; the fd is valid.
        let ns_type = unsafe { libc::ioctl(file.as_raw_fd(), 0xb703) };
        if ns_type != libc::CLONE_NEWNET {
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
        // SAFETY: valid namespace fd.
        if unsafe { libc::setns(self.file.as_fd().as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(io::Error::last_os_error());
        }
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

/// `getsockopt` of a fixed-size value `T` (a plain C struct or integer).
pub fn getsockopt<T: Copy>(fd: &impl AsRawFd, level: libc::c_int, name: libc::c_int) -> io::Result<T> {
    let mut value = MaybeUninit::<T>::zeroed();
    let mut len = std::mem::size_of::<T>() as libc::socklen_t;
    // SAFETY: the buffer is `len` bytes; the kernel writes at most that many.
    let rc = unsafe { libc::getsockopt(fd.as_raw_fd(), level, name, value.as_mut_ptr().cast(), &mut len) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: zero-initialised, and T is a plain value for which any bytes are valid.
    Ok(unsafe { value.assume_init() })
}

/// `getsockopt(SOL_IP, SO_ORIGINAL_DST)`: where an accepted connection was going before a
/// REDIRECT (conntrack's answer), or before the agent captured it (its getsockopt program's).
pub fn original_dst(socket: &impl AsRawFd) -> io::Result<SocketAddrV4> {
    const SO_ORIGINAL_DST: libc::c_int = 80;
    let sa: libc::sockaddr_in = getsockopt(socket, libc::SOL_IP, SO_ORIGINAL_DST)?;
    Ok(SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr)),
        u16::from_be(sa.sin_port),
    ))
}

/// The calling thread's network namespace cookie (SO_NETNS_COOKIE, 5.14+).
pub fn current_netns_cookie() -> io::Result<u64> {
    // SAFETY: plain socket creation; the fd is owned right away.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh, valid descriptor.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    getsockopt::<u64>(&sock, libc::SOL_SOCKET, SO_NETNS_COOKIE)
}

/// Drops to `uid`/`gid` with no supplementary groups. glibc applies it to every thread, but it
/// is meant for a process that has not started any.
pub fn become_user(uid: u32, gid: u32) -> io::Result<()> {
    let check = |rc: libc::c_int, what: &str| -> io::Result<()> {
        if rc == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        Err(io::Error::new(e.kind(), format!("{what}: {e}")))
    };
    // Groups first: after setuid the process may no longer change them.
    // SAFETY: plain credential syscalls.
    unsafe {
        check(libc::setgroups(0, std::ptr::null()), "setgroups")?;
        check(libc::setgid(gid), "setgid")?;
        check(libc::setuid(uid), "setuid")
    }
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

/// Most descriptors passed in one SCM_RIGHTS message (a workload has three).
pub const MAX_FDS_PER_MESSAGE: usize = 8;

/// Sends `fds` over a Unix stream socket in one message (with one byte of data, which
/// SCM_RIGHTS needs to travel with).
pub fn send_fds(socket: &impl AsRawFd, fds: &[std::os::fd::BorrowedFd<'_>]) -> io::Result<()> {
    assert!(fds.len() <= MAX_FDS_PER_MESSAGE);
    let payload = [b'F'];
    let mut iov = libc::iovec {
        iov_base: payload.as_ptr() as *mut libc::c_void,
        iov_len: 1,
    };
    // u64 words keep the control buffer aligned for cmsghdr.
    let mut control = [0u64; 16];
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE((fds.len() * size_of::<i32>()) as u32) } as usize;
    // SAFETY: zeroed msghdr is valid; every pointer set below outlives the sendmsg call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space;
    // SAFETY: the control buffer holds `space` bytes, enough for one header and the fds.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN((fds.len() * size_of::<i32>()) as u32) as usize;
        let data = libc::CMSG_DATA(cmsg).cast::<i32>();
        for (i, fd) in fds.iter().enumerate() {
            data.add(i).write_unaligned(fd.as_raw_fd());
        }
    }
    // SAFETY: msg is fully initialised.
    if unsafe { libc::sendmsg(socket.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) } != 1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Receives one message of [`send_fds`]: its descriptors, owned (close-on-exec).
pub fn recv_fds(socket: &impl AsRawFd) -> io::Result<Vec<OwnedFd>> {
    let mut payload = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: payload.as_mut_ptr().cast(),
        iov_len: 1,
    };
    let mut control = [0u64; 16];
    // SAFETY: zeroed msghdr is valid; pointers outlive the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = size_of_val(&control);
    // SAFETY: msg describes valid buffers.
    let n = unsafe { libc::recvmsg(socket.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if n == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "peer closed before sending descriptors",
        ));
    }
    let mut out = Vec::new();
    // SAFETY: walking the control buffer the kernel filled, with the libc macros.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg).cast::<i32>();
                let bytes = (*cmsg).cmsg_len as usize - (data as usize - cmsg as usize);
                for i in 0..bytes / size_of::<i32>() {
                    out.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::other("descriptors were cut short (MSG_CTRUNC)"));
    }
    Ok(out)
}

impl Netns {
    /// A namespace received as a descriptor (from a predecessor agent), checked like
    /// [`Netns::open`]; `path` is what it was known as.
    pub fn from_fd(fd: OwnedFd, path: &Path) -> Result<Self, SysError> {
        // SAFETY: NS_GET_NSTYPE takes no argument; the fd is valid.
        let ns_type = unsafe { libc::ioctl(fd.as_raw_fd(), 0xb703) };
        if ns_type != libc::CLONE_NEWNET {
            return Err(SysError::NotNetns(path.to_owned()));
        }
        Ok(Self {
            file: File::from(fd),
            path: path.to_owned(),
        })
    }
}
