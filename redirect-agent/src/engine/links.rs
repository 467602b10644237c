//! bpf links the agent creates and pins itself, for node mode's restart without loss.
//!
//! aya 0.14 can pin the links of connect4 and sock_ops, but not those of cgroup/getsockopt or
//! sk_lookup, and has no `BPF_LINK_UPDATE`. Node mode needs all four pinned (a pinned link
//! keeps its program attached while no agent runs) and needs to move a pinned link to the
//! programs a new agent process loaded, atomically, so that an upgrade never leaves a
//! window in which connections go uncaptured. Those are four commands of `bpf(2)`; this is
//! them, with the attribute layouts of `include/uapi/linux/bpf.h`.

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsFd as _, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;

/// `enum bpf_attach_type` values of the four attach points node mode links.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum AttachType {
    SockOps = 3,
    Connect4 = 10,
    Connect6 = 11,
    Sendmsg4 = 14,
    Sendmsg6 = 15,
    Recvmsg4 = 19,
    Recvmsg6 = 20,
    Getsockopt = 21,
    Getpeername4 = 29,
    Getpeername6 = 30,
    SkLookup = 36,
}

/// `union bpf_attr` is 144 bytes on 6.x; the kernel accepts a shorter one if the bytes it does
/// not know are absent, and refuses unknown non-zero ones, so a zeroed buffer of the fields we
/// set is the portable shape.
#[repr(C)]
#[derive(Default)]
struct Attr {
    words: [u32; 16],
}

fn bpf(cmd: libc::c_long, attr: &mut Attr) -> io::Result<libc::c_long> {
    // SAFETY: attr is a valid, initialised buffer of the size passed.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut::<Attr>(attr),
            size_of::<Attr>() as u32,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc)
}

fn fd_from(rc: libc::c_long) -> OwnedFd {
    // SAFETY: the kernel just returned this descriptor to us.
    unsafe { OwnedFd::from_raw_fd(rc as i32) }
}

/// `BPF_LINK_CREATE`: attaches `prog` to `target` (a cgroup directory or a network namespace).
/// A cgroup link always joins the cgroup's multi-program list, so other agents' programs keep
/// running beside ours.
pub fn create(prog: BorrowedFd<'_>, target: BorrowedFd<'_>, attach_type: AttachType) -> io::Result<OwnedFd> {
    let mut attr = Attr::default();
    attr.words[0] = prog.as_raw_fd() as u32;
    attr.words[1] = target.as_raw_fd() as u32;
    attr.words[2] = attach_type as u32;
    bpf(BPF_LINK_CREATE, &mut attr).map(fd_from)
}

/// `enum bpf_attach_type` values of a sockhash's programs.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum MapAttachType {
    SkSkbStreamVerdict = 5,
    SkMsgVerdict = 7,
}

/// `BPF_PROG_ATTACH` of a program to a sockhash: it stays attached for as long as the map
/// lives (the map is pinned), not for as long as this process; attaching again replaces it.
/// Sockets take the map's programs when they join it.
pub fn attach_to_map(prog: BorrowedFd<'_>, map: BorrowedFd<'_>, attach_type: MapAttachType) -> io::Result<()> {
    let mut attr = Attr::default();
    attr.words[0] = map.as_raw_fd() as u32;
    attr.words[1] = prog.as_raw_fd() as u32;
    attr.words[2] = attach_type as u32;
    bpf(BPF_PROG_ATTACH, &mut attr).map(drop)
}

/// `BPF_LINK_UPDATE`: the link runs `prog` from now on; no packet or connect() sees neither.
pub fn update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = Attr::default();
    attr.words[0] = link.as_raw_fd() as u32;
    attr.words[1] = prog.as_raw_fd() as u32;
    bpf(BPF_LINK_UPDATE, &mut attr).map(drop)
}

fn path_attr(path: &Path, fd: u32) -> io::Result<(Attr, CString)> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))?;
    let mut attr = Attr::default();
    let ptr = c.as_ptr() as u64;
    attr.words[0] = ptr as u32;
    attr.words[1] = (ptr >> 32) as u32;
    attr.words[2] = fd;
    Ok((attr, c))
}

/// `BPF_OBJ_PIN`: the link outlives every descriptor to it until the pin is removed.
pub fn pin(link: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let (mut attr, _keep) = path_attr(path, link.as_raw_fd() as u32)?;
    bpf(BPF_OBJ_PIN, &mut attr)
        .map(drop)
        .map_err(|e| io::Error::new(e.kind(), format!("pin {}: {e}", path.display())))
}

/// `BPF_OBJ_GET`: a descriptor of a pinned link (or any pinned object).
pub fn open_pinned(path: &Path) -> io::Result<OwnedFd> {
    let (mut attr, _keep) = path_attr(path, 0)?;
    bpf(BPF_OBJ_GET, &mut attr)
        .map(fd_from)
        .map_err(|e| io::Error::new(e.kind(), format!("open pinned {}: {e}", path.display())))
}

/// A link that runs `prog` on `target`. With `pin`: the link pinned there, moved to `prog`
/// with [`update`] if a predecessor left one (no connection sees neither program), else made
/// and pinned. Without: a new link, attached for as long as its descriptor lives.
pub fn attach(
    prog: BorrowedFd<'_>,
    target: BorrowedFd<'_>,
    attach_type: AttachType,
    pin: Option<&Path>,
) -> io::Result<OwnedFd> {
    if let Some(pin) = pin
        && let Ok(link) = open_pinned(pin)
    {
        update(link.as_fd(), prog).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("moving {} to this agent's program: {e}", pin.display()),
            )
        })?;
        return Ok(link);
    }
    let link = create(prog, target, attach_type)?;
    if let Some(pin) = pin {
        self::pin(link.as_fd(), pin)?;
    }
    Ok(link)
}

/// `BPF_OBJ_GET_INFO_BY_FD` of a link: its id and the id of the program it runs now.
pub fn info(link: BorrowedFd<'_>) -> io::Result<(u32, u32)> {
    // struct bpf_link_info starts { __u32 type; __u32 id; __u32 prog_id; }; the kernel fills
    // as much as the buffer holds.
    let mut info = [0u32; 4];
    let ptr = info.as_mut_ptr() as u64;
    let mut attr = Attr::default();
    attr.words[0] = link.as_raw_fd() as u32;
    attr.words[1] = size_of_val(&info) as u32;
    attr.words[2] = ptr as u32;
    attr.words[3] = (ptr >> 32) as u32;
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok((info[1], info[2]))
}

/// Removes a pin; once no descriptor is left either, the kernel detaches the link.
pub fn unpin(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

impl super::Engine {
    /// sk_lookup on the workload's namespace, the instance loaded for it (which knows no other
    /// workload): a pinned link of an adopted workload moved to this process's instance, else
    /// a new one, pinned if the instance keeps its pins. Links on a namespace run in attach
    /// order; ours passes over connections it does not decide.
    pub(super) fn sk_lookup_link(
        &self,
        cookie: u64,
        netns: &crate::sys::Netns,
    ) -> Result<(OwnedFd, super::object::SkLookupInstance), super::EnrollError> {
        let pin = self.sk_lookup_pin(cookie);
        let persist = self.settings.keep_links;
        let program = self.object.sk_lookup_for(cookie)?;
        let link = attach(
            program.fd()?,
            netns.as_fd(),
            AttachType::SkLookup,
            persist.then_some(pin.as_path()),
        )
        .map_err(super::EnrollError::io(format!(
            "attaching sk_lookup to {} (sk_lookup links need kernel 5.9+)",
            netns.path().display()
        )))?;
        Ok((link, program))
    }
}
