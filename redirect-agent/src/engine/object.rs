//! The eBPF object: loading and verifying the programs against an instance's pinned maps,
//! pinning the programs, attaching the fast path to its sockhash, and what the verifier made
//! of each program (`check --verifier`).
//!
//! Attaching to cgroups and namespaces is [`super::links`]' job: every link the engine makes
//! is a `BPF_LINK_CREATE` link, pinned or not depending on the instance's lifetime.

use std::{
    os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, Map, MapData, MapError, SockHash},
    programs::{CgroupSockAddr, CgroupSockopt, ProgramError, SchedClassifier, SkLookup, SkMsg, SkSkb, SockOps},
};
use redirect_common::{FamilyKey, TupleKey, addr::Family, globals, maps, owner, programs};
use serde::Serialize;

use super::links::{self, MapAttachType};
use crate::error::LoadError;

/// The object built from `redirect-ebpf` by build.rs (aya-build).
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/redirect-ebpf"));

/// The programs every instance loads.
const CAPTURE_PROGRAMS: [&str; 13] = [
    programs::SOCK_OPS,
    programs::SK_LOOKUP,
    programs::VIRT_INGRESS,
    programs::VIRT_EGRESS,
    programs::CONNECT4,
    programs::CONNECT6,
    programs::SENDMSG4,
    programs::SENDMSG6,
    programs::RECVMSG4,
    programs::RECVMSG6,
    programs::GETSOCKOPT,
    programs::GETPEERNAME4,
    programs::GETPEERNAME6,
];

/// The programs each workload gets an instance of, its namespace's cookie built in: sk_lookup,
/// and the tc programs of its `-k` devices. The object's own copies are only verified.
const PER_WORKLOAD_PROGRAMS: [&str; 3] = [programs::SK_LOOKUP, programs::VIRT_INGRESS, programs::VIRT_EGRESS];

/// The fast path's programs, loaded only with `--fast-path`.
const FAST_PATH_PROGRAMS: [&str; 2] = [programs::SK_SKB, programs::SK_MSG];

/// The programs an instance loads: the fast path's two only when asked for.
pub(crate) fn programs_for(fast_path: bool) -> impl Iterator<Item = &'static str> {
    let fast: &'static [&'static str] = if fast_path { &FAST_PATH_PROGRAMS } else { &[] };
    CAPTURE_PROGRAMS.into_iter().chain(fast.iter().copied())
}

/// Attaches `ebpf`'s verdict, then its sk_msg, to its sockhash ([`Object::attach_fast_path`]).
fn attach_to_sockhash(ebpf: &Ebpf) -> Result<(), LoadError> {
    let map = ebpf
        .map(maps::FAST_PATH_SOCKETS)
        .ok_or(LoadError::MissingMap(maps::FAST_PATH_SOCKETS))?;
    let Map::SockHash(data) = map else {
        return Err(LoadError::MissingMap(maps::FAST_PATH_SOCKETS));
    };
    for (prog, attach_type) in [
        (programs::SK_SKB, MapAttachType::SkSkbStreamVerdict),
        (programs::SK_MSG, MapAttachType::SkMsgVerdict),
    ] {
        let p = ebpf.program(prog).ok_or(LoadError::MissingProgram(prog))?;
        let fd = p.fd().map_err(|e| verifier_error(prog, e))?;
        links::attach_to_map(fd.as_fd(), data.fd().as_fd(), attach_type).map_err(|e| LoadError::Verifier {
            prog,
            reason: format!("attaching to {}: {e}", maps::FAST_PATH_SOCKETS),
            kernel: crate::features::kernel_string(),
        })?;
    }
    Ok(())
}

/// [`fast_path_trial`]'s object, sockhash and sender states.
pub(crate) type FastPathTrial = (Ebpf, SockHash<MapData, TupleKey>, HashMap<MapData, TupleKey, u8>);

/// The fast path on its own, for [`super::fast_path_probe`]: an object with no pins and maps
/// of its own (the preallocated ones of a few entries), only sk_msg and the verdict loaded,
/// attached to its sockhash. Nothing else of the agent's sees it; dropping the three values
/// frees it all (a socket still in the sockhash leaves it as the map goes).
pub(crate) fn fast_path_trial() -> Result<FastPathTrial, LoadError> {
    let owner = crate::btf::owner_offsets()?;
    let mut loader = EbpfLoader::new();
    loader.override_global(owner::OWNER_OFFSETS, owner, true);
    // Every map of the object is made; the LRU ones are allocated whole at once, 65,536
    // entries each by default. The probe's own take a few entries, the others none.
    for map in [
        maps::FAST_PATH_SOCKETS,
        maps::FAST_PATH_SENDERS,
        maps::ORIG_BY_COOKIE,
        maps::ORIG_BY_TUPLE,
        maps::INBOUND_PENDING,
        maps::UDP_ORIG,
        maps::UDP_FLOWS,
        maps::VIRT_FLOWS,
        maps::VIRT_REPLIES,
        maps::SYN_MARK_BY_COOKIE,
        maps::SYN_MARKS,
    ] {
        loader.map_max_entries(map, 8);
    }
    let mut ebpf = loader.load(EBPF_OBJECT).map_err(LoadError::Object)?;
    for name in FAST_PATH_PROGRAMS {
        load_program(&mut ebpf, name)?;
    }
    attach_to_sockhash(&ebpf)?;
    let mut take = |map| {
        let m = ebpf.take_map(map).ok_or(LoadError::MissingMap(map))?;
        Ok::<_, LoadError>((map, m))
    };
    let err = |map| move |source| LoadError::Map { map, source };
    let (name, m) = take(maps::FAST_PATH_SOCKETS)?;
    let sockets = SockHash::try_from(m).map_err(err(name))?;
    let (name, m) = take(maps::FAST_PATH_SENDERS)?;
    let senders = HashMap::try_from(m).map_err(err(name))?;
    Ok((ebpf, sockets, senders))
}

/// What the verifier made of one program on this kernel.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct ProgramReport {
    pub name: String,
    /// Instructions after the kernel's rewrites (xlated), as `bpftool prog show` counts them.
    pub instructions: Option<u32>,
    /// Instructions the verifier processed on its walk (5.16+).
    pub verified: Option<u32>,
}

/// Loads (verifies) every program without pinning or attaching anything, and reports their
/// sizes: what `check --verifier` prints per kernel.
pub fn verifier_report() -> Result<Vec<ProgramReport>, LoadError> {
    let owner = crate::btf::owner_offsets()?;
    let mut ebpf = EbpfLoader::new()
        .override_global(owner::OWNER_OFFSETS, owner, true)
        .load(EBPF_OBJECT)
        .map_err(LoadError::Object)?;
    programs_for(true)
        .map(|name| {
            let info = load_program(&mut ebpf, name)?;
            Ok(ProgramReport {
                name: name.into(),
                instructions: info.size_translated().map(|b| b / 8),
                verified: info.verified_instruction_count(),
            })
        })
        .collect()
}

/// Loads (verifies) program `name` as the type it is declared with. A macro, because aya's
/// program types share no trait for `load`.
macro_rules! load_as {
    ($ebpf:expr, $name:expr, $ty:ty) => {{
        let p: &mut $ty = program($ebpf, $name)?;
        p.load().map_err(|e| verifier_error($name, e))?;
        p.info()
    }};
}

fn load_program(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::programs::ProgramInfo, LoadError> {
    match name {
        programs::SOCK_OPS => load_as!(ebpf, name, SockOps),
        programs::SK_LOOKUP => load_as!(ebpf, name, SkLookup),
        programs::CONNECT4
        | programs::CONNECT6
        | programs::SENDMSG4
        | programs::SENDMSG6
        | programs::RECVMSG4
        | programs::RECVMSG6
        | programs::GETPEERNAME4
        | programs::GETPEERNAME6 => load_as!(ebpf, name, CgroupSockAddr),
        programs::GETSOCKOPT => load_as!(ebpf, name, CgroupSockopt),
        programs::SK_MSG => load_as!(ebpf, name, SkMsg),
        programs::SK_SKB => load_as!(ebpf, name, SkSkb),
        programs::VIRT_INGRESS | programs::VIRT_EGRESS => load_as!(ebpf, name, SchedClassifier),
        _ => return Err(LoadError::MissingProgram(name)),
    }
    .map_err(|e| verifier_error(name, e))
}

fn verifier_error(prog: &'static str, e: ProgramError) -> LoadError {
    let reason = match &e {
        ProgramError::LoadError { io_error, verifier_log } => {
            tracing::debug!(prog, "verifier log:\n{verifier_log}");
            io_error.to_string()
        }
        other => other.to_string(),
    };
    LoadError::Verifier {
        prog,
        reason,
        kernel: crate::features::kernel_string(),
    }
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, LoadError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let p = ebpf.program_mut(name).ok_or(LoadError::MissingProgram(name))?;
    p.try_into().map_err(|_| LoadError::MissingProgram(name))
}

/// The loaded object: its programs ([`programs_for`]) verified, its maps those pinned in the
/// instance's directory (made and pinned there if there are none, reused otherwise, so that
/// what the programs know survives an agent that keeps its pins), nothing attached.
pub(crate) struct Object {
    ebpf: Ebpf,
    fast_path: bool,
    pin_dir: PathBuf,
    max_tracked_connections: u32,
}

/// One workload's sk_lookup program ([`Object::sk_lookup_for`]), loaded, not yet linked: its
/// descriptor alone. The rest of its load (the object's other programs, parsed, and a
/// descriptor of each of its maps) is let go at once: kept for every workload, it came to a
/// few hundred KiB and twenty-odd descriptors each, which 1,024 workloads multiply.
pub(crate) struct SkLookupInstance {
    fd: OwnedFd,
}

/// One workload's tc programs for its `-k` devices ([`Object::virt_for`]), loaded, not
/// attached.
pub(crate) struct VirtInstance {
    ebpf: Ebpf,
}

impl VirtInstance {
    /// The ingress and the egress program, at once (a device takes both in one step).
    pub(crate) fn both_mut(&mut self) -> Result<(&mut SchedClassifier, &mut SchedClassifier), LoadError> {
        let (mut ingress, mut egress) = (None, None);
        for (name, p) in self.ebpf.programs_mut() {
            match name {
                programs::VIRT_INGRESS => ingress = Some(p),
                programs::VIRT_EGRESS => egress = Some(p),
                _ => {}
            }
        }
        Ok((
            classifier(ingress, programs::VIRT_INGRESS)?,
            classifier(egress, programs::VIRT_EGRESS)?,
        ))
    }
}

fn classifier<'a>(
    p: Option<&'a mut aya::programs::Program>,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, LoadError> {
    p.ok_or(LoadError::MissingProgram(name))?
        .try_into()
        .map_err(|_| LoadError::MissingProgram(name))
}

impl SkLookupInstance {
    pub(crate) fn fd(&self) -> Result<BorrowedFd<'_>, LoadError> {
        Ok(self.fd.as_fd())
    }
}

/// The loader of the object against an instance's pinned maps: each map pinned in `pin_dir` is
/// reused (made and pinned there if there is none yet).
/// `owner`: the running kernel's field offsets ([`crate::btf::owner_offsets`]), which connect4/6
/// read a socket's owner with.
fn loader<'a>(
    pin_dir: &Path,
    max_tracked_connections: u32,
    fast_path: bool,
    owner: &'a owner::OwnerOffsets,
) -> EbpfLoader<'a> {
    let fast_path_slots = if fast_path {
        max_tracked_connections.saturating_mul(2)
    } else {
        1
    };
    // sk_lookup reads its context's `ingress_ifindex` (for `-c`) only where the kernel has it.
    let ingress_ifindex: &'static u8 =
        match aya::util::KernelVersion::current().is_ok_and(|v| v >= aya::util::KernelVersion::new(5, 17, 0)) {
            true => &1,
            false => &0,
        };
    let mut loader = EbpfLoader::new();
    loader
        .override_global(owner::OWNER_OFFSETS, owner, true)
        .override_global(globals::SK_LOOKUP_INGRESS_IFINDEX, ingress_ifindex, true)
        .map_max_entries(maps::ORIG_BY_COOKIE, max_tracked_connections)
        .map_max_entries(maps::ORIG_BY_TUPLE, max_tracked_connections)
        .map_max_entries(maps::INBOUND_PENDING, max_tracked_connections)
        // UDP flows are tracked connections too (conntrack's flows, a socket's DNS peer).
        .map_max_entries(maps::UDP_ORIG, max_tracked_connections)
        .map_max_entries(maps::UDP_FLOWS, max_tracked_connections)
        // A VM's connections through its pod are tracked connections of the pod's.
        .map_max_entries(maps::VIRT_FLOWS, max_tracked_connections)
        .map_max_entries(maps::VIRT_REPLIES, max_tracked_connections)
        .map_max_entries(maps::FAST_PATH_SOCKETS, fast_path_slots)
        .map_max_entries(maps::FAST_PATH_SENDERS, fast_path_slots);
    for name in maps::ALL {
        loader.map_pin_path(name, pin_dir.join(name));
    }
    loader
}

impl Object {
    /// The original-destination maps hold `max_tracked_connections`; the fast-path maps both
    /// ends of each local pair, or one entry when the fast path is off (a map cannot have
    /// none), so that an instance without it does not hold their memory.
    ///
    /// sk_lookup is loaded here too, with no namespace's cookie, only so that a kernel that
    /// refuses it fails the start rather than the first enroll: each workload gets its own
    /// instance ([`Object::sk_lookup_for`]).
    pub(crate) fn load(pin_dir: &Path, max_tracked_connections: u32, fast_path: bool) -> Result<Self, LoadError> {
        let owner = crate::btf::owner_offsets()?;
        let mut ebpf = loader(pin_dir, max_tracked_connections, fast_path, owner)
            .load(EBPF_OBJECT)
            .map_err(LoadError::Object)?;
        for name in programs_for(fast_path) {
            load_program(&mut ebpf, name)?;
        }
        Ok(Self {
            ebpf,
            fast_path,
            pin_dir: pin_dir.to_owned(),
            max_tracked_connections,
        })
    }

    /// The sk_lookup program for the one workload whose namespace has cookie `netns_cookie`,
    /// loaded (verified) against the same pinned maps: it judges every connection by that
    /// workload's chain, so it must be linked to that namespace and no other. sk_lookup has no
    /// helper that names the namespace it runs in; the cookie is a constant of this instance,
    /// in a read-only map the kernel freezes. The link holds the program once made; dropping
    /// the returned value then only closes this process's descriptors.
    pub(crate) fn sk_lookup_for(&self, netns_cookie: u64) -> Result<SkLookupInstance, LoadError> {
        let owner = crate::btf::owner_offsets()?;
        let mut loader = loader(&self.pin_dir, self.max_tracked_connections, self.fast_path, owner);
        loader.override_global(globals::SK_LOOKUP_NETNS_COOKIE, &netns_cookie, true);
        let mut ebpf = loader.load(EBPF_OBJECT).map_err(LoadError::Object)?;
        load_program(&mut ebpf, programs::SK_LOOKUP)?;
        let name = programs::SK_LOOKUP;
        let p = ebpf.program(name).ok_or(LoadError::MissingProgram(name))?;
        let fd = p
            .fd()
            .map_err(|e| verifier_error(name, e))?
            .as_fd()
            .try_clone_to_owned()
            .map_err(|source| LoadError::Sys(crate::error::SysError::Io(format!("{name}'s descriptor"), source)))?;
        // Dropping `ebpf` closes its descriptors; the program lives on by `fd` (and by the
        // link made from it), and nothing aya attached is detached: the link is made apart.
        Ok(SkLookupInstance { fd })
    }

    /// The tc programs for the `-k` devices of the one workload whose namespace has cookie
    /// `netns_cookie`, loaded against the same pinned maps: like sk_lookup, tc has no helper
    /// that names its namespace on the kernels supported (6.15 added one), and a device's
    /// index is only unique within its namespace.
    pub(crate) fn virt_for(&self, netns_cookie: u64) -> Result<VirtInstance, LoadError> {
        let owner = crate::btf::owner_offsets()?;
        let mut loader = loader(&self.pin_dir, self.max_tracked_connections, self.fast_path, owner);
        loader.override_global(globals::SK_LOOKUP_NETNS_COOKIE, &netns_cookie, true);
        let mut ebpf = loader.load(EBPF_OBJECT).map_err(LoadError::Object)?;
        for name in [programs::VIRT_INGRESS, programs::VIRT_EGRESS] {
            load_program(&mut ebpf, name)?;
        }
        Ok(VirtInstance { ebpf })
    }

    /// With `--fast-path`: attaches the verdict, then sk_msg, to the pinned sockhash. Before
    /// any workload is served: a socket takes the sockhash's programs when it joins, not
    /// later, and it must never sit there without the verdict on the kernels whose readiness
    /// wakeups need it (see redirect-ebpf/src/sk_skb.rs). They stay with the map for as long
    /// as it lives; a later agent's replace them.
    pub(crate) fn attach_fast_path(&self) -> Result<(), LoadError> {
        attach_to_sockhash(&self.ebpf)
    }

    /// The programs this object's own links and sockhash run: all but those whose instances
    /// are per workload.
    fn shared_programs(&self) -> impl Iterator<Item = &'static str> {
        programs_for(self.fast_path).filter(|p| !PER_WORKLOAD_PROGRAMS.contains(p))
    }

    /// Pins the programs in `dir`, in place of a predecessor's: once every link runs this
    /// process's programs, the pins say which those are (`bpftool prog show pinned`), and a
    /// predecessor's programs are freed when its process exits. (A workload's sk_lookup
    /// program is held by its pinned link.) `dir` was made and checked at start
    /// ([`super::pins::make_dirs`]).
    pub(crate) fn pin_programs(&mut self, dir: &Path) -> Result<(), LoadError> {
        // A predecessor's pin of the one sk_lookup program all workloads once shared.
        let _ = std::fs::remove_file(dir.join(programs::SK_LOOKUP));
        for name in self.shared_programs().collect::<Vec<_>>() {
            let path = dir.join(name);
            let _ = std::fs::remove_file(&path);
            let p = self.ebpf.program_mut(name).ok_or(LoadError::MissingProgram(name))?;
            p.pin(&path).map_err(|source| LoadError::Pin { path, source })?;
        }
        Ok(())
    }

    /// A loaded program's descriptor, for [`super::links`].
    pub(crate) fn program_fd(&self, name: &'static str) -> Result<BorrowedFd<'_>, LoadError> {
        let p = self.ebpf.program(name).ok_or(LoadError::MissingProgram(name))?;
        let fd = p.fd().map_err(|e| verifier_error(name, e))?;
        Ok(fd.as_fd())
    }

    /// A program's id, as bpftool shows it.
    pub(crate) fn program_id(&self, name: &'static str) -> Result<u32, LoadError> {
        let p = self.ebpf.program(name).ok_or(LoadError::MissingProgram(name))?;
        let info = p.info().map_err(|e| verifier_error(name, e))?;
        Ok(info.id())
    }

    /// The programs this object's links run, by name with their ids (each workload's
    /// sk_lookup instance is its own program: `bpftool link show` names it on the namespace).
    pub(crate) fn program_ids(&self) -> std::collections::BTreeMap<String, u32> {
        self.shared_programs()
            .filter_map(|p| Some((p.to_owned(), self.program_id(p).ok()?)))
            .collect()
    }

    /// Moves a map out as its typed view.
    pub(crate) fn take<T>(&mut self, name: &'static str) -> Result<T, LoadError>
    where
        T: TryFrom<Map, Error = MapError>,
    {
        let map = self.ebpf.take_map(name).ok_or(LoadError::MissingMap(name))?;
        T::try_from(map).map_err(|source| LoadError::Map { map: name, source })
    }
}

/// One map of a pin directory, as its typed view (a second descriptor of the same map: each
/// workload's proxy and address watcher own theirs).
pub(crate) fn open_typed<T: TryFrom<Map, Error = MapError>>(dir: &Path, map: &'static str) -> Result<T, LoadError> {
    let err = |source| LoadError::Map { map, source };
    let data = MapData::from_pin(dir.join(map)).map_err(err)?;
    T::try_from(Map::from_map_data(data).map_err(err)?).map_err(err)
}

/// The workload's slots in `INBOUND_LISTENERS`, one per address family: the sockets
/// sk_lookup hands inbound connections to.
pub(crate) struct InboundListener {
    map: SockHash<MapData, FamilyKey>,
    netns_cookie: u64,
}

impl InboundListener {
    pub(crate) fn new(map: SockHash<MapData, FamilyKey>, netns_cookie: u64) -> Self {
        Self { map, netns_cookie }
    }

    /// `socket` must be listening (the kernel refuses other TCP states in a sockhash). It
    /// takes the connections of its own family: an AF_INET6 socket the IPv6 ones.
    pub(crate) fn register(&mut self, socket: &(impl AsRawFd + AsFd)) -> Result<(), LoadError> {
        let family = match rustix::net::getsockname(socket).map(|a| a.address_family()) {
            Ok(rustix::net::AddressFamily::INET6) => Family::V6,
            _ => Family::V4,
        };
        self.map
            .insert(FamilyKey::new(self.netns_cookie, family), socket.as_raw_fd(), 0)
            .map_err(|source| LoadError::Map {
                map: maps::INBOUND_LISTENERS,
                source,
            })
    }
}

/// Registers a socket that already listens on the inbound capture port (the workload's own
/// proxy's); `false`: none does yet, which is normal (the proxy starts later). Failing to look
/// is logged, not fatal: sock_ops still registers the next listen().
pub(super) fn adopt_listener(
    netns: &crate::sys::Netns,
    port: u16,
    slot: &mut InboundListener,
    id: &str,
) -> Result<bool, super::EnrollError> {
    match crate::adopt::existing_listener(netns, port) {
        Ok(Some((fd, pid))) => {
            slot.register(&fd)?;
            tracing::info!(%id, pid, port, "inbound capture listener (already listening) registered");
            Ok(true)
        }
        Ok(None) => Ok(false),
        Err(e) => {
            tracing::warn!(%id, port, "looking for an inbound capture listener: {e}");
            Ok(false)
        }
    }
}
