//! `redirect-agent cleanup`: the end of a stopped instance, said only once the kernel agrees.
//!
//! A pinned link keeps its program attached until its pin is gone, wherever that pin is: pins
//! that were moved or renamed (by whoever could) keep capturing while nothing is left to
//! remove under the instance's name. So cleanup notes which programs the instance ran (from
//! its state and its pins) before it removes anything, and afterwards asks the kernel for every
//! link (`BPF_LINK_GET_NEXT_ID`): one that still runs such a program is named, and cleanup
//! fails, keeping the state file so that it can be asked again.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    time::{Duration, Instant},
};

use aya::programs::{
    ProgramInfo,
    links::{FdLink, LinkType, PinnedLink},
};

use super::{State, is_locked, legacy_state_path, links_dir, lock_path, pin_dir, programs_dir, state_path};

/// Removes every pin, link and state file of instance `name`, whose agent is not running.
pub fn cleanup(name: &str) -> anyhow::Result<Vec<PathBuf>> {
    crate::sys::require_privileges("redirect-agent cleanup")?;
    super::validate_name(name)?;
    let state = State::read(name);
    if is_locked(name) {
        let pid = state.map(|s| format!(" (pid {})", s.pid)).unwrap_or_default();
        anyhow::bail!("instance '{name}' is running{pid}: stop it first, then run cleanup");
    }
    let ours = programs_of(name, state.as_ref());
    let mut removed = Vec::new();
    let dir = pin_dir(name);
    // What a node agent put on the node's lo for its ambient pods goes with them.
    crate::addrs::remove_pinned_probe_sources(&dir.join(redirect_common::maps::PROBE_SNAT));
    // Not followed if it is a symlink (remove_dir_all removes the link itself).
    match std::fs::symlink_metadata(&dir) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(&dir),
        Ok(_) => std::fs::remove_file(&dir),
        Err(e) => Err(e),
    }
    .map_or_else(
        |e| match e.kind() {
            std::io::ErrorKind::NotFound => Ok(()),
            _ => Err(anyhow::anyhow!("remove {}: {e}", dir.display())),
        },
        |()| {
            removed.push(dir.clone());
            Ok(())
        },
    )?;
    let _ = std::fs::remove_dir(crate::sys::PIN_ROOT);

    let attached = still_attached(&ours);
    if !attached.is_empty() {
        anyhow::bail!(
            "instance '{name}': its pins are removed but the kernel still runs its programs through {}: their pins \
             were moved or renamed (`bpftool link show` lists them; remove those pins), then run cleanup again",
            attached.join(", ")
        );
    }

    let socket = state
        .and_then(|s| s.socket)
        .unwrap_or_else(|| redirect_api::default_socket(name));
    for path in [
        state_path(name),
        legacy_state_path(name),
        state_path(name).with_extension("json.tmp"),
        socket,
        lock_path(name),
    ] {
        match std::fs::remove_file(&path) {
            Ok(()) => removed.push(path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => anyhow::bail!("remove {}: {e}", path.display()),
        }
    }
    Ok(removed)
}

/// The programs instance `name` ran, by id: those its state records, and those its pins hold
/// (the pinned programs, and the programs its pinned links run).
fn programs_of(name: &str, state: Option<&State>) -> BTreeMap<u32, String> {
    let mut ids: BTreeMap<u32, String> = state
        .map(|s| s.programs.iter().map(|(n, id)| (*id, n.clone())).collect())
        .unwrap_or_default();
    let entries = |dir: PathBuf| {
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
    };
    for (pin, path) in entries(programs_dir(name)) {
        if let Ok(info) = ProgramInfo::from_pin(&path) {
            ids.entry(info.id()).or_insert(pin);
        }
    }
    for (pin, path) in entries(links_dir(name)) {
        if let Ok(info) = PinnedLink::from_pin(&path).map(FdLink::from).and_then(|l| l.info()) {
            ids.entry(info.program_id()).or_insert(pin);
        }
    }
    ids
}

/// Links the kernel has that run one of `programs`, described for an error. A link whose last
/// pin just went is released by the kernel asynchronously, so this looks again for a moment
/// (bounded) before it says so.
fn still_attached(programs: &BTreeMap<u32, String>) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let found: Vec<String> = aya::programs::loaded_links()
            // A link released while the kernel is listed is gone, not an error.
            .flatten()
            .filter_map(|l| {
                let prog = programs.get(&l.program_id())?;
                let kind = match l.link_type() {
                    Ok(LinkType::Cgroup) => "cgroup",
                    Ok(LinkType::Netns) => "netns",
                    _ => "other",
                };
                Some(format!(
                    "link {} ({kind}) running {prog} (program {})",
                    l.id(),
                    l.program_id()
                ))
            })
            .collect();
        if found.is_empty() || Instant::now() > deadline {
            return found;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
