//! Loading, pinning, configuring and attaching the eBPF programs of one instance.
//!
//! Order matters for "never half-attached": everything that can fail (verifier, maps, pins,
//! listeners) happens before the first attach, sock_ops attaches before connect4 so every
//! redirected socket is tracked, and dropping [`Loaded`] detaches (the links are owned by the
//! programs) before [`InstanceDirs`] removes the pins.

use std::{
    fs::File,
    io::Write as _,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, Map, MapData, MapError, PerCpuArray, SockHash},
    programs::{CgroupAttachMode, CgroupSockAddr, CgroupSockopt, ProgramError, SkLookup, SkMsg, SkSkb, SockOps},
};
use redirect_common::{TupleKey, Workload, fast_path, maps, programs};
use serde::Serialize;

use crate::{
    error::{LoadError, SysError},
    sys::{PIN_ROOT, RUN_DIR},
};

/// The object built from `redirect-ebpf` by build.rs (aya-build).
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/redirect-ebpf"));

/// The programs every instance loads (the fast path's two only when asked for).
const CAPTURE_PROGRAMS: [&str; 4] = [
    programs::SOCK_OPS,
    programs::SK_LOOKUP,
    programs::CONNECT4,
    programs::GETSOCKOPT,
];

/// The fast path's programs, loaded only with `--fast-path`.
const FAST_PATH_PROGRAMS: [&str; 2] = [programs::SK_SKB, programs::SK_MSG];

/// The programs an instance loads: the fast path's two only when asked for.
pub fn programs_for(fast_path: bool) -> impl Iterator<Item = &'static str> {
    let fast: &'static [&'static str] = if fast_path { &FAST_PATH_PROGRAMS } else { &[] };
    CAPTURE_PROGRAMS.into_iter().chain(fast.iter().copied())
}

/// The object with its programs ([`programs_for`]) loaded and verified, nothing attached.
/// The original-destination maps hold `max_tracked_connections`; the fast-path maps both
/// ends of each local pair, or one entry when the fast path is off (a map cannot have none),
/// so that an instance without it does not hold their memory. `pin_dir`: reuse the maps
/// pinned there, or pin them there if there are none (node mode).
fn load_object(max_tracked_connections: u32, fast_path: bool, pin_dir: Option<&Path>) -> Result<Ebpf, LoadError> {
    let fast_path_slots = if fast_path {
        max_tracked_connections.saturating_mul(2)
    } else {
        1
    };
    let pins: Vec<(&'static str, PathBuf)> = pin_dir
        .map(|dir| maps::ALL.iter().map(|m| (*m, dir.join(m))).collect())
        .unwrap_or_default();
    let mut loader = EbpfLoader::new();
    loader
        .map_max_entries(maps::ORIG_BY_COOKIE, max_tracked_connections)
        .map_max_entries(maps::ORIG_BY_TUPLE, max_tracked_connections)
        .map_max_entries(maps::INBOUND_PENDING, max_tracked_connections)
        .map_max_entries(maps::FAST_PATH_SOCKETS, fast_path_slots)
        .map_max_entries(maps::FAST_PATH_SENDERS, fast_path_slots);
    for (name, path) in &pins {
        loader.map_pin_path(name, path.as_path());
    }
    let mut ebpf = loader.load(EBPF_OBJECT).map_err(LoadError::Object)?;
    for name in programs_for(fast_path) {
        load_program(&mut ebpf, name)?;
    }
    Ok(ebpf)
}

/// Flags 0: see [`Loaded::attach`].
const LINK_MODE: CgroupAttachMode = CgroupAttachMode::Single;

fn kernel_string() -> String {
    crate::features::kernel_string()
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
    let mut ebpf = EbpfLoader::new().load(EBPF_OBJECT).map_err(LoadError::Object)?;
    let mut out = Vec::new();
    for name in [
        programs::SOCK_OPS,
        programs::SK_LOOKUP,
        programs::CONNECT4,
        programs::GETSOCKOPT,
        programs::SK_MSG,
        programs::SK_SKB,
    ] {
        let info = load_program(&mut ebpf, name)?;
        out.push(ProgramReport {
            name: name.into(),
            instructions: info.size_translated().map(|b| b / 8),
            verified: info.verified_instruction_count(),
        });
    }
    Ok(out)
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
        programs::CONNECT4 => load_as!(ebpf, name, CgroupSockAddr),
        programs::GETSOCKOPT => load_as!(ebpf, name, CgroupSockopt),
        programs::SK_MSG => load_as!(ebpf, name, SkMsg),
        programs::SK_SKB => load_as!(ebpf, name, SkSkb),
        _ => return Err(LoadError::MissingProgram(name)),
    }
    .map_err(|e| verifier_error(name, e))
}

/// An instance's pin directory, lock and state file. Claimed before loading, removed on drop.
pub struct InstanceDirs {
    name: String,
    pin_dir: PathBuf,
    lock_path: PathBuf,
    state_path: PathBuf,
    _lock: File,
}

pub fn validate_name(name: &str) -> Result<(), LoadError> {
    let ok = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(LoadError::BadName(name.into()))
    }
}

pub fn pin_dir(name: &str) -> PathBuf {
    Path::new(PIN_ROOT).join(name)
}

pub fn state_path(name: &str) -> PathBuf {
    Path::new(RUN_DIR).join(format!("{name}.json"))
}

impl InstanceDirs {
    pub fn claim(name: &str) -> Result<Self, LoadError> {
        validate_name(name)?;
        let io = |what: String| move |e| LoadError::Sys(SysError::Io(what, e));
        std::fs::create_dir_all(RUN_DIR).map_err(io(format!("create {RUN_DIR}")))?;
        let lock_path = Path::new(RUN_DIR).join(format!("{name}.lock"));
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io(format!("open {}", lock_path.display())))?;
        // SAFETY: valid fd; non-blocking exclusive lock, released when the file closes.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(LoadError::AlreadyRunning {
                name: name.into(),
                lock: lock_path,
            });
        }
        let state_path = state_path(name);
        if state_path.exists() {
            // Same reasoning: a "ready" left by a dead process must not describe this one.
            std::fs::remove_file(&state_path).map_err(io(format!("remove {}", state_path.display())))?;
        }
        let pin_dir = pin_dir(name);
        if pin_dir.exists() {
            // Nobody holds the lock, so these are left over from a process that was killed.
            tracing::warn!(dir = %pin_dir.display(), "removing stale pins of a previous run");
            std::fs::remove_dir_all(&pin_dir).map_err(io(format!("remove {}", pin_dir.display())))?;
        }
        create_pin_dir(&pin_dir).map_err(io(format!("create {}", pin_dir.display())))?;
        Ok(Self {
            name: name.into(),
            pin_dir,
            lock_path,
            state_path,
            _lock: lock,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Written once everything is attached: a state file naming a live pid means "ready".
    pub fn write_state(&self, state: &InstanceState) -> std::io::Result<()> {
        let tmp = self.state_path.with_extension("json.tmp");
        let mut f = File::create(&tmp)?;
        serde_json::to_writer_pretty(&mut f, state)?;
        f.write_all(b"\n")?;
        std::fs::rename(tmp, &self.state_path)
    }
}

/// An exiting instance removes the shared root when it is empty; that can land between our
/// mkdir of the root and of our own directory, so try again (bounded) when the parent vanishes.
fn create_pin_dir(dir: &Path) -> std::io::Result<()> {
    let mut tries = 0;
    loop {
        match std::fs::create_dir_all(dir) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && tries < 5 => tries += 1,
            other => return other,
        }
    }
}

impl Drop for InstanceDirs {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.state_path);
        if let Err(e) = std::fs::remove_dir_all(&self.pin_dir) {
            tracing::warn!(dir = %self.pin_dir.display(), "removing pins: {e}");
        }
        // The pin root is shared by instances; remove it only when this was the last one.
        let _ = std::fs::remove_dir(PIN_ROOT);
        let _ = std::fs::remove_file(&self.lock_path);
    }
}

/// What a running instance publishes in `/run/redirect/<name>.json`.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct InstanceState {
    pub name: String,
    pub pid: u32,
    pub cgroup: PathBuf,
    pub netns: PathBuf,
    pub netns_cookie: u64,
    pub proxy: String,
    pub programs: Vec<ProgramState>,
}

#[derive(Debug, Serialize, serde::Deserialize)]
pub struct ProgramState {
    pub name: String,
    pub id: u32,
}

/// The loaded (verified) object; programs attach through [`Loaded::attach`].
pub struct Loaded {
    ebpf: Ebpf,
    // Declared after `ebpf`: fields drop in order, so programs detach before pins go.
    dirs: InstanceDirs,
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
        kernel: kernel_string(),
    }
}

impl Loaded {
    /// Loads the object, pins its maps and loads (verifies) every program it will attach
    /// (the fast path's two only when asked for), attaching nothing.
    pub fn load(dirs: InstanceDirs, max_tracked_connections: u32, fast_path: bool) -> Result<Self, LoadError> {
        let ebpf = load_object(max_tracked_connections, fast_path, None)?;
        for name in maps::ALL {
            let map = ebpf.map(name).ok_or(LoadError::MissingMap(name))?;
            let path = dirs.pin_dir.join(name);
            map.pin(&path).map_err(|source| LoadError::Pin { path, source })?;
        }
        Ok(Self { ebpf, dirs })
    }

    pub fn dirs(&self) -> &InstanceDirs {
        &self.dirs
    }

    /// Installs one workload's entry ([`redirect_common::chain::workload`]), keyed by its
    /// namespace cookie.
    pub fn set_workload(&mut self, netns_cookie: u64, w: &Workload) -> Result<(), LoadError> {
        let map = self
            .ebpf
            .map_mut(maps::WORKLOADS)
            .ok_or(LoadError::MissingMap(maps::WORKLOADS))?;
        let mut workloads: HashMap<_, u64, Workload> = HashMap::try_from(map).map_err(|source| LoadError::Map {
            map: maps::WORKLOADS,
            source,
        })?;
        workloads.insert(netns_cookie, w, 0).map_err(|source| LoadError::Map {
            map: maps::WORKLOADS,
            source,
        })
    }

    /// Moves a map out as its typed view, for the task that owns it (address watcher, proxy).
    pub fn take<T>(&mut self, name: &'static str) -> Result<T, LoadError>
    where
        T: TryFrom<Map, Error = MapError>,
    {
        let map = self.ebpf.take_map(name).ok_or(LoadError::MissingMap(name))?;
        T::try_from(map).map_err(|source| LoadError::Map { map: name, source })
    }

    /// Attaches the fast path's programs to its sockhash: before sock_ops, because a socket
    /// takes the sockhash's programs when it joins, not later. The returned handle keeps them
    /// attached: the kernel detaches a sockhash's programs when its last user reference goes.
    pub fn attach_fast_path(&mut self) -> Result<(FastPathSockets, Vec<ProgramState>), LoadError> {
        let map: SockHash<MapData, TupleKey> = self.take(maps::FAST_PATH_SOCKETS)?;
        let senders: HashMap<MapData, TupleKey, u8> = self.take(maps::FAST_PATH_SENDERS)?;
        let mut states = Vec::new();
        let attach_err = |prog: &'static str| {
            move |source| LoadError::AttachMap {
                prog,
                map: maps::FAST_PATH_SOCKETS,
                source,
            }
        };
        // The verdict first: a socket must never sit in the sockhash without it on the kernels
        // whose readiness wakeups need it (see redirect-ebpf/src/sk_skb.rs).
        let prog: &mut SkSkb = program(&mut self.ebpf, programs::SK_SKB)?;
        prog.attach(map.fd()).map_err(attach_err(programs::SK_SKB))?;
        states.push(attached(programs::SK_SKB, prog.info())?);
        let prog: &mut SkMsg = program(&mut self.ebpf, programs::SK_MSG)?;
        prog.attach(map.fd()).map_err(attach_err(programs::SK_MSG))?;
        states.push(attached(programs::SK_MSG, prog.info())?);
        Ok((FastPathSockets { map, senders }, states))
    }

    /// Attaches sock_ops to the cgroup: first, so that every socket connect4 will redirect,
    /// and every capture listener the workload opens from now on, is seen.
    ///
    /// On the kernels we support (5.7+) aya attaches through `bpf_link_create`, and a cgroup
    /// bpf_link always joins the cgroup's multi-program list: it coexists with other agents'
    /// programs. The kernel refuses any flag on that path (EINVAL), BPF_F_ALLOW_MULTI
    /// included, so the mode passed is the flagless one.
    pub fn attach_sock_ops(&mut self, cgroup: &File, cgroup_path: &Path) -> Result<ProgramState, LoadError> {
        let prog: &mut SockOps = program(&mut self.ebpf, programs::SOCK_OPS)?;
        prog.attach(cgroup, LINK_MODE).map_err(|source| LoadError::Attach {
            prog: programs::SOCK_OPS,
            cgroup: cgroup_path.to_owned(),
            source,
        })?;
        attached(programs::SOCK_OPS, prog.info())
    }

    /// Then the two that capture: sk_lookup on the namespace (inbound) and connect4 on the
    /// cgroup (outbound). sk_lookup links on a namespace run in attach order; ours passes over
    /// connections it does not decide.
    pub fn attach_capture(
        &mut self,
        cgroup: &File,
        cgroup_path: &Path,
        netns: &crate::sys::Netns,
        netns_path: &Path,
    ) -> Result<Vec<ProgramState>, LoadError> {
        let mut ids = Vec::new();
        let prog: &mut SkLookup = program(&mut self.ebpf, programs::SK_LOOKUP)?;
        prog.attach(netns).map_err(|source| LoadError::AttachNetns {
            prog: programs::SK_LOOKUP,
            netns: netns_path.to_owned(),
            source,
        })?;
        ids.push(attached(programs::SK_LOOKUP, prog.info())?);
        // Before connect4, so that a connection it captures can ask for its destination.
        let prog: &mut CgroupSockopt = program(&mut self.ebpf, programs::GETSOCKOPT)?;
        prog.attach(cgroup, LINK_MODE).map_err(|source| LoadError::Attach {
            prog: programs::GETSOCKOPT,
            cgroup: cgroup_path.to_owned(),
            source,
        })?;
        ids.push(attached(programs::GETSOCKOPT, prog.info())?);
        let prog: &mut CgroupSockAddr = program(&mut self.ebpf, programs::CONNECT4)?;
        prog.attach(cgroup, LINK_MODE).map_err(|source| LoadError::Attach {
            prog: programs::CONNECT4,
            cgroup: cgroup_path.to_owned(),
            source,
        })?;
        ids.push(attached(programs::CONNECT4, prog.info())?);
        Ok(ids)
    }
}

/// The fast path's sockhash and sender states, for sockets the agent itself owns (the
/// embedded proxy's upstream connections, made outside the workload's cgroup, where sock_ops
/// never sees them). Holding it keeps the fast path's programs attached.
pub struct FastPathSockets {
    map: SockHash<MapData, TupleKey>,
    senders: HashMap<MapData, TupleKey, u8>,
}

impl FastPathSockets {
    /// Enrolls a connected socket under `key` (its own view of the connection). Must happen
    /// before it sends anything: its first message decides its path for good.
    pub fn enroll(&mut self, key: TupleKey, socket: &impl AsRawFd) -> Result<(), MapError> {
        // The state before the socket, as sock_ops does: sk_msg treats a socket without one as
        // "TCP for good".
        self.senders.insert(key, fast_path::UNDECIDED, 0)?;
        self.map.insert(key, socket.as_raw_fd(), 0).inspect_err(|_| {
            let _ = self.senders.remove(&key);
        })
    }

    /// Forgets a socket's sender state once it is closed (the kernel drops the socket from
    /// the sockhash itself).
    pub fn forget(&mut self, key: &TupleKey) {
        let _ = self.senders.remove(key);
    }
}

/// The workload's slot in `INBOUND_LISTENERS`: the socket sk_lookup hands inbound
/// connections to.
pub struct InboundListener {
    map: SockHash<MapData, u64>,
    netns_cookie: u64,
}

impl InboundListener {
    pub fn new(map: SockHash<MapData, u64>, netns_cookie: u64) -> Self {
        Self { map, netns_cookie }
    }

    /// Empties the slot (nothing registered is fine).
    pub fn unregister(&mut self) {
        let _ = self.map.remove(&self.netns_cookie);
    }

    /// `socket` must be listening (the kernel refuses other TCP states in a sockhash).
    pub fn register(&mut self, socket: &impl AsRawFd) -> Result<(), LoadError> {
        self.map
            .insert(self.netns_cookie, socket.as_raw_fd(), 0)
            .map_err(|source| LoadError::Map {
                map: maps::INBOUND_LISTENERS,
                source,
            })
    }
}

/// What the state file says of an attached program: its name and the id bpftool shows.
fn attached(
    name: &'static str,
    info: Result<aya::programs::ProgramInfo, ProgramError>,
) -> Result<ProgramState, LoadError> {
    let id = info.map(|i| i.id()).map_err(|e| LoadError::Verifier {
        prog: "program info",
        reason: e.to_string(),
        kernel: kernel_string(),
    })?;
    Ok(ProgramState { name: name.into(), id })
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, LoadError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let p = ebpf.program_mut(name).ok_or(LoadError::MissingProgram(name))?;
    p.try_into().map_err(|_| LoadError::MissingProgram(name))
}

/// A running instance's maps, opened from their pins.
pub struct PinnedMaps {
    pub workloads: HashMap<MapData, u64, Workload>,
    pub counters: PerCpuArray<MapData, u64>,
    pub events: PerCpuArray<MapData, u64>,
}

/// Opens an instance's pinned maps for `stats`.
pub fn open_pinned(name: &str) -> Result<PinnedMaps, LoadError> {
    validate_name(name)?;
    let dir = pin_dir(name);
    if !dir.is_dir() {
        return Err(LoadError::NotRunning { name: name.into(), dir });
    }
    Ok(PinnedMaps {
        workloads: open_typed(&dir, maps::WORKLOADS)?,
        counters: open_typed(&dir, maps::RULE_COUNTERS)?,
        events: open_typed(&dir, maps::EVENT_COUNTERS)?,
    })
}

/// One map of a pin directory, as its typed view.
pub fn open_typed<T: TryFrom<Map, Error = MapError>>(dir: &Path, map: &'static str) -> Result<T, LoadError> {
    let err = |source| LoadError::Map { map, source };
    let data = MapData::from_pin(dir.join(map)).map_err(err)?;
    T::try_from(Map::from_map_data(data).map_err(err)?).map_err(err)
}

/// Node mode's object: programs loaded against the maps pinned in the node's directory (made
/// there on the first start, reused by every later one, so that what the programs know
/// survives the agent), nothing attached. Attaching is [`crate::links`]' job: node mode pins
/// its links.
pub struct NodeObject {
    ebpf: Ebpf,
    fast_path: bool,
}

impl NodeObject {
    pub fn load(pin_dir: &Path, max_tracked_connections: u32, fast_path: bool) -> Result<Self, LoadError> {
        let ebpf = load_object(max_tracked_connections, fast_path, Some(pin_dir))?;
        Ok(Self { ebpf, fast_path })
    }

    /// With `--fast-path`: attaches the verdict, then sk_msg, to the pinned sockhash (see
    /// [`Loaded::attach_fast_path`] for the order). They stay with the map across restarts;
    /// a new agent's replace them.
    pub fn attach_fast_path(&self) -> Result<(), LoadError> {
        use std::os::fd::AsFd as _;
        let map = self
            .ebpf
            .map(maps::FAST_PATH_SOCKETS)
            .ok_or(LoadError::MissingMap(maps::FAST_PATH_SOCKETS))?;
        let map_fd = match map {
            Map::SockHash(data) => data.fd().as_fd(),
            _ => return Err(LoadError::MissingMap(maps::FAST_PATH_SOCKETS)),
        };
        for (prog, attach_type) in [
            (programs::SK_SKB, crate::links::MapAttachType::SkSkbStreamVerdict),
            (programs::SK_MSG, crate::links::MapAttachType::SkMsgVerdict),
        ] {
            crate::links::attach_to_map(self.program_fd(prog)?, map_fd, attach_type).map_err(|e| {
                LoadError::Verifier {
                    prog,
                    reason: format!("attaching to {}: {e}", maps::FAST_PATH_SOCKETS),
                    kernel: kernel_string(),
                }
            })?;
        }
        Ok(())
    }

    /// Pins the programs in `dir`, in place of a predecessor's: once every link runs this
    /// process's programs, the pins say which those are (`bpftool prog show pinned`), and a
    /// predecessor's programs are freed when its process exits.
    pub fn pin_programs(&mut self, dir: &Path) -> Result<(), LoadError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| LoadError::Sys(SysError::Io(format!("create {}", dir.display()), e)))?;
        for name in programs_for(self.fast_path) {
            let path = dir.join(name);
            let _ = std::fs::remove_file(&path);
            let p = self.ebpf.program_mut(name).ok_or(LoadError::MissingProgram(name))?;
            p.pin(&path).map_err(|source| LoadError::Pin { path, source })?;
        }
        Ok(())
    }

    /// A loaded program's descriptor, for [`crate::links`].
    pub fn program_fd(&self, name: &'static str) -> Result<std::os::fd::BorrowedFd<'_>, LoadError> {
        use std::os::fd::AsFd as _;
        let p = self.ebpf.program(name).ok_or(LoadError::MissingProgram(name))?;
        let fd = p.fd().map_err(|e| verifier_error(name, e))?;
        Ok(fd.as_fd())
    }

    /// A program's id, as bpftool shows it.
    pub fn program_id(&self, name: &'static str) -> Result<u32, LoadError> {
        let p = self.ebpf.program(name).ok_or(LoadError::MissingProgram(name))?;
        let info = p.info().map_err(|e| verifier_error(name, e))?;
        Ok(info.id())
    }

    /// Moves a map out as its typed view.
    pub fn take<T>(&mut self, name: &'static str) -> Result<T, LoadError>
    where
        T: TryFrom<Map, Error = MapError>,
    {
        let map = self.ebpf.take_map(name).ok_or(LoadError::MissingMap(name))?;
        T::try_from(map).map_err(|source| LoadError::Map { map: name, source })
    }
}
