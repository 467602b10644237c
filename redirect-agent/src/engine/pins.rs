//! Where an instance lives outside its process: its pins under `/sys/fs/bpf/redirect/NAME/`
//! (maps, and for an instance that outlives its process, `links/` and `programs/`), its lock
//! and its state file under `/run/redirect/`. One layout for `run` and `node`.

use std::{
    collections::BTreeMap,
    fs::File,
    io::Write as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use redirect_api::WorkloadInfo;
use redirect_common::{
    FamilyKey, LocalAddrKey, MAX_RULES, MAX_WORKLOADS, OrigDst, PendingOrigDst, TupleKey, Workload, events,
};
use serde::{Deserialize, Serialize};

pub(crate) use self::dirs::make_dirs;
pub use self::{cleanup::cleanup, dirs::check_dirs};
use crate::{
    error::{LoadError, SysError},
    sys::{PIN_ROOT, RUN_DIR},
};

mod cleanup;
mod dirs;

/// [`PIN_ROOT`]'s name below the bpffs root.
const PIN_ROOT_NAME: &str = "redirect";

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

/// `/sys/fs/bpf/redirect/NAME`: the instance's maps.
pub fn pin_dir(name: &str) -> PathBuf {
    Path::new(PIN_ROOT).join(name)
}

/// The links an instance that outlives its process keeps attached.
pub(crate) fn links_dir(name: &str) -> PathBuf {
    pin_dir(name).join("links")
}

pub(crate) fn programs_dir(name: &str) -> PathBuf {
    pin_dir(name).join("programs")
}

/// `/run/redirect/NAME.json`: written once the instance serves; a state naming a live pid
/// means "ready".
pub fn state_path(name: &str) -> PathBuf {
    Path::new(RUN_DIR).join(format!("{name}.json"))
}

/// Where node agents before the engine wrote their state; read when there is no other, so
/// that an upgraded agent adopts a crashed predecessor's workloads.
fn legacy_state_path(name: &str) -> PathBuf {
    Path::new(RUN_DIR).join(format!("{name}.node.json"))
}

fn lock_path(name: &str) -> PathBuf {
    Path::new(RUN_DIR).join(format!("{name}.lock"))
}

/// How an instance relates to its process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// `run`: everything goes with the process (its links are not pinned).
    Run,
    /// `node`: links and programs are pinned and outlive the process.
    Node,
}

fn node_mode() -> Mode {
    Mode::Node
}

/// What a running instance publishes, and what a successor adopts when no agent hands over.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct State {
    pub name: String,
    pub pid: u32,
    #[serde(default = "node_mode")]
    pub mode: Mode,
    /// The shared types' layout: pinned maps are reused only by an agent that reads them the
    /// same way.
    pub layout: String,
    /// The cgroup v2 directory the cgroup programs are attached to.
    pub cgroup_parent: PathBuf,
    /// The control socket, for an instance that has one.
    pub socket: Option<PathBuf>,
    pub metrics: Option<SocketAddr>,
    /// Attached programs by name, with the ids bpftool shows.
    pub programs: BTreeMap<String, u32>,
    pub workloads: Vec<WorkloadInfo>,
}

impl State {
    /// Instance `name`'s state, if it has a readable one.
    pub fn read(name: &str) -> Option<Self> {
        [state_path(name), legacy_state_path(name)]
            .iter()
            .find_map(|p| serde_json::from_slice(&std::fs::read(p).ok()?).ok())
    }

    /// Written whole or not at all (a rename), so a reader never sees half a state.
    pub(crate) fn write(&self) -> std::io::Result<()> {
        std::fs::create_dir_all(RUN_DIR)?;
        let path = state_path(&self.name);
        let tmp = path.with_extension("json.tmp");
        // One write: serde_json writes a field at a time, which unbuffered is a syscall each,
        // tens of thousands for a node of a thousand workloads, at every enroll.
        let mut text = serde_json::to_vec_pretty(self)?;
        text.push(b'\n');
        File::create(&tmp)?.write_all(&text)?;
        std::fs::rename(tmp, &path)?;
        // The legacy file would shadow nothing now, but would mislead a reader.
        let _ = std::fs::remove_file(legacy_state_path(&self.name));
        Ok(())
    }
}

/// How `chain::pack` packs a chain: raised when the same flags would pack into other set
/// entries, so that an agent never adopts set members it would not have written itself.
/// 2: TPROXY's `-b` tuples, and `-k`'s rules taken interface by interface.
const PACKING: u32 = 2;

/// Sizes of everything the programs and the agent exchange through pinned maps.
pub fn layout() -> String {
    use std::mem::size_of;
    format!(
        "workload{}-rules{}-workloads{}-events{}-tuple{}-orig{}-pending{}-addr{}-family{}-route{}-iface{}-counter{}-cidrset{}-portset{}-pack{}",
        size_of::<Workload>(),
        MAX_RULES,
        MAX_WORKLOADS,
        events::PER_WORKLOAD,
        size_of::<TupleKey>(),
        size_of::<OrigDst>(),
        size_of::<PendingOrigDst>(),
        size_of::<LocalAddrKey>(),
        size_of::<FamilyKey>(),
        size_of::<redirect_common::RouteInfo>(),
        size_of::<redirect_common::IfaceKey>(),
        size_of::<redirect_common::CounterKey>(),
        size_of::<redirect_common::CidrSetKey>(),
        size_of::<redirect_common::PortSetKey>(),
        PACKING,
    )
}

/// An instance's lock: one process per name holds it at a time; a handover passes it on.
#[derive(Debug)]
pub(crate) struct Lock {
    file: File,
    path: PathBuf,
}

/// Why a lock was not had.
#[derive(Debug, thiserror::Error)]
pub(crate) enum LockError {
    #[error("{0}")]
    Io(#[from] SysError),
    #[error("lock {0} is held")]
    Held(PathBuf),
}

impl Lock {
    /// Waits up to `within` (a predecessor releases it right after a handover).
    pub(crate) fn take(name: &str, within: Duration) -> Result<Self, LockError> {
        let io = |what: String| move |e| SysError::Io(what, e);
        std::fs::create_dir_all(RUN_DIR).map_err(io(format!("create {RUN_DIR}")))?;
        let path = lock_path(name);
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io(format!("open {}", path.display())))?;
        let deadline = Instant::now() + within;
        loop {
            match file.try_lock() {
                Ok(()) => return Ok(Self { file, path }),
                Err(std::fs::TryLockError::WouldBlock) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(std::fs::TryLockError::WouldBlock) => return Err(LockError::Held(path)),
                Err(std::fs::TryLockError::Error(e)) => return Err(io(format!("lock {}", path.display()))(e).into()),
            }
        }
    }

    /// The lock file, whose identity a successor proves it awaits (see [`super::peer`]).
    pub(crate) fn file(&self) -> &File {
        &self.file
    }

    /// Releases the lock and removes its file (an instance that leaves nothing behind).
    pub(crate) fn remove(self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Instance `name`'s lock file, opened (not locked): a successor keeps it open while it asks
/// for a handover, which is how the running agent knows it awaits this instance's lock.
pub(crate) fn open_lock(name: &str) -> std::io::Result<File> {
    std::fs::create_dir_all(RUN_DIR)?;
    File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(lock_path(name))
}

/// Whether a process holds instance `name`'s lock (without taking it for long).
pub(crate) fn is_locked(name: &str) -> bool {
    let Ok(f) = File::options().write(true).open(lock_path(name)) else {
        return false;
    };
    // Released at once when `f` closes.
    matches!(f.try_lock(), Err(std::fs::TryLockError::WouldBlock))
}

/// Removes an instance's pins and state (the end of an instance that keeps nothing, or
/// `cleanup`), and the shared root when it was the last one.
pub(crate) fn remove_all(name: &str) -> Vec<(PathBuf, std::io::Result<()>)> {
    let mut done = Vec::new();
    for path in [
        pin_dir(name),
        state_path(name),
        legacy_state_path(name),
        state_path(name).with_extension("json.tmp"),
    ] {
        let gone = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        if !matches!(&gone, Err(e) if e.kind() == std::io::ErrorKind::NotFound) {
            done.push((path, gone));
        }
    }
    let _ = std::fs::remove_dir(PIN_ROOT);
    done
}

/// Another live instance that captures the namespace `netns_cookie`, named for an error:
/// two sets of programs deciding one namespace's connections would redirect them twice.
pub(crate) fn captured_elsewhere(netns_cookie: u64, except: &str) -> Option<String> {
    let alive = |pid: u32| {
        i32::try_from(pid)
            .ok()
            .and_then(rustix::process::Pid::from_raw)
            .is_some_and(|p| rustix::process::test_kill_process(p).is_ok())
    };
    let mut names: Vec<String> = std::fs::read_dir(RUN_DIR)
        .ok()?
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.strip_suffix(".node.json")
                .or_else(|| n.strip_suffix(".json"))
                .map(str::to_owned)
        })
        .collect();
    names.sort();
    names.dedup();
    names.into_iter().filter(|n| n != except).find_map(|name| {
        let Some(state) = State::read(&name) else {
            // A `run` of the release before the engine: {"pid", "netns_cookie", ...}.
            let legacy: LegacyRun = serde_json::from_slice(&std::fs::read(state_path(&name)).ok()?).ok()?;
            return (legacy.netns_cookie == netns_cookie && alive(legacy.pid))
                .then(|| format!("`run` instance '{name}' (pid {})", legacy.pid));
        };
        let w = state.workloads.iter().find(|w| w.netns_cookie == netns_cookie)?;
        alive(state.pid).then(|| match state.mode {
            Mode::Node => format!("node agent '{name}' (pid {}) as workload '{}'", state.pid, w.id),
            Mode::Run => format!("`run` instance '{name}' (pid {})", state.pid),
        })
    })
}

/// The state file of a `run` before the engine, as far as [`captured_elsewhere`] reads it.
#[derive(Deserialize)]
struct LegacyRun {
    pid: u32,
    netns_cookie: u64,
}

/// Whether the fast-path maps pinned for instance `name` by an agent of `mode` were made
/// with the fast path on; `None` without such pins. `--fast-path=auto` follows them, so that
/// a restart, a handover or a killed run's successor decides as its predecessor did.
pub(crate) fn pinned_fast_path(name: &str, mode: Mode) -> Option<bool> {
    State::read(name).filter(|s| s.mode == mode && pin_dir(name).exists())?;
    Some(pinned_size(name, redirect_common::maps::FAST_PATH_SOCKETS)? > 1)
}

/// The size (`max_entries`) map `map` of instance `name` was pinned with; `None` without it.
pub(crate) fn pinned_size(name: &str, map: &str) -> Option<u32> {
    let data = aya::maps::MapData::from_pin(pin_dir(name).join(map)).ok()?;
    Some(data.info().ok()?.max_entries())
}

/// What the pins of instance `name` were made with, checked before a start changes anything
/// (and so before a node asks a running agent to hand over): pinned maps are reused only by an
/// agent that reads them the same way (the layout the state records), and keep the size they
/// were made with. A different `--max-tracked-connections` is said and ignored; a different
/// `--fast-path` is refused, since the fast-path maps would have one slot (or hold memory
/// nobody uses).
pub(crate) fn check_pins(name: &str, fast_path: bool, max_tracked_connections: u32) -> anyhow::Result<()> {
    let dir = pin_dir(name);
    // Only a node agent's pins are reused; others (a killed `run`'s, or pins without a
    // state) are removed, whatever they were made with.
    let Some(state) = State::read(name).filter(|s| s.mode == Mode::Node && dir.exists()) else {
        return Ok(());
    };
    if state.layout != layout() {
        anyhow::bail!(
            "the maps pinned at {} have layout {} but this agent's is {}: run `redirect-agent cleanup --name {name}` \
             (it releases every workload), then start again",
            dir.display(),
            state.layout,
            layout(),
        );
    }
    let size = |map: &str| pinned_size(name, map);
    if let Some(n) = size(redirect_common::maps::FAST_PATH_SOCKETS)
        && (n > 1) != fast_path
    {
        anyhow::bail!(
            "the pinned maps of '{name}' were made with --fast-path {on}, and this start has it {off}: start with \
             --fast-path={on}, or run `redirect-agent cleanup --name {name}` first (it releases every workload)",
            on = if n > 1 { "on" } else { "off" },
            off = if n > 1 { "off" } else { "on" },
        );
    }
    if let Some(n) = size(redirect_common::maps::ORIG_BY_TUPLE)
        && n != max_tracked_connections
    {
        tracing::warn!(
            pinned = n,
            asked = max_tracked_connections,
            "the pinned maps keep their size; --max-tracked-connections takes effect after a cleanup"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pin_root_is_named_below_bpffs() {
        assert_eq!(Path::new(crate::sys::BPFFS).join(PIN_ROOT_NAME), Path::new(PIN_ROOT));
    }

    #[test]
    fn names_are_path_safe() {
        for good in ["node", "a-b_c", &"x".repeat(64)] {
            assert!(validate_name(good).is_ok(), "{good}");
        }
        for bad in ["", "a/b", "..", "a b", &"x".repeat(65)] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_state_written_before_the_engine_still_reads() {
        // A node agent's state file as the last release wrote it (no mode, socket required).
        let old = r#"{"name":"node","pid":7,"layout":"x","cgroup_parent":"/sys/fs/cgroup","socket":"/run/redirect/node.sock",
            "metrics":null,"programs":{"redirect_connect4":12},"workloads":[]}"#;
        let s: State = serde_json::from_str(old).unwrap();
        assert_eq!(s.mode, Mode::Node);
        assert_eq!(s.socket.as_deref(), Some(Path::new("/run/redirect/node.sock")));
        assert_eq!(s.programs["redirect_connect4"], 12);
    }
}
