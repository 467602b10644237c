//! The pin directories, made and checked so that nobody but root can move, rename or replace
//! an instance's pins.
//!
//! `/sys/fs/bpf` is writable by everyone (the kernel mounts every bpffs root 1777), so any user
//! can make `/sys/fs/bpf/redirect` before the first agent does, and whoever owns a directory
//! can rename what is in it: an instance's links would then live on under another name while
//! `cleanup` finds nothing to remove. So every directory from `redirect` down is made 0700 and,
//! when it exists already, must be a real directory (not a symlink) owned by root (or this
//! process's euid) that group and others cannot write. The walk goes by descriptor
//! (`openat(O_NOFOLLOW)` from the bpffs root), so a symlink swapped in between the check and
//! the open is refused too. Once the walk passed, the paths are stable against other users:
//! the bpffs root is sticky (only an entry's owner renames it) and everything below is root's.

use std::{
    io,
    os::fd::{AsFd, OwnedFd},
    path::{Path, PathBuf},
};

use rustix::fs::{AtFlags, FileType, Mode, OFlags};

use crate::{error::PinDirError, sys::BPFFS};

const GROUP_OTHER_WRITE: u32 = 0o022;
const STICKY: u32 = 0o1000;

/// The directory `BPFFS/rel[0]/rel[1]/…`, walked by descriptor. With `create`, missing
/// directories are made 0700; without, `Ok(None)` when one is missing (nothing to check
/// below it). Every directory that exists is checked on the way down.
pub(crate) fn walk(rel: &[&str], create: bool) -> Result<Option<OwnedFd>, PinDirError> {
    // An exiting instance removes the shared root when it is empty; that can land between our
    // mkdir of the root and of our own directory, so the walk starts again (bounded).
    let mut tries = 0;
    loop {
        match walk_once(rel, create) {
            Err(PinDirError::Io(_, e)) if e.kind() == io::ErrorKind::NotFound && create && tries < 5 => tries += 1,
            other => return other,
        }
    }
}

fn walk_once(rel: &[&str], create: bool) -> Result<Option<OwnedFd>, PinDirError> {
    let io = |what: &Path| {
        let what = what.display().to_string();
        move |e: rustix::io::Errno| PinDirError::Io(what, e.into())
    };
    let mut path = PathBuf::from(BPFFS);
    let mut dir = rustix::fs::open(
        BPFFS,
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(io(&path))?;
    let root = rustix::fs::fstat(&dir).map_err(io(&path))?;
    if root.st_mode & 0o002 != 0 && root.st_mode & STICKY == 0 {
        return Err(PinDirError::OpenRoot {
            path,
            mode: root.st_mode & 0o7777,
        });
    }
    for name in rel {
        path.push(name);
        if create {
            match rustix::fs::mkdirat(&dir, *name, Mode::from_raw_mode(0o700)) {
                Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                Err(e) => return Err(io(&path)(e)),
            }
        }
        let seen = match rustix::fs::statat(&dir, *name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(s) => s,
            Err(rustix::io::Errno::NOENT) if !create => return Ok(None),
            Err(e) => return Err(io(&path)(e)),
        };
        check(&path, &dir, name, &seen)?;
        let next = rustix::fs::openat(
            &dir,
            *name,
            OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(io(&path))?;
        // What was opened is what was checked (not something swapped in since).
        let opened = rustix::fs::fstat(&next).map_err(io(&path))?;
        check(&path, &dir, name, &opened)?;
        dir = next;
    }
    Ok(Some(dir))
}

fn check(path: &Path, parent: &impl AsFd, name: &str, st: &rustix::fs::Stat) -> Result<(), PinDirError> {
    let path = path.to_owned();
    match FileType::from_raw_mode(st.st_mode) {
        FileType::Directory => {}
        FileType::Symlink => {
            let to = rustix::fs::readlinkat(parent, name, Vec::new())
                .map(|t| t.to_string_lossy().into_owned())
                .unwrap_or_else(|_| "?".into());
            return Err(PinDirError::Symlink { path, to });
        }
        _ => return Err(PinDirError::NotDir { path }),
    }
    let euid = rustix::process::geteuid().as_raw();
    if (st.st_uid != 0 && st.st_uid != euid) || st.st_mode & GROUP_OTHER_WRITE != 0 {
        return Err(PinDirError::Unsafe {
            path,
            uid: st.st_uid,
            mode: st.st_mode & 0o7777,
            want: euid,
        });
    }
    Ok(())
}

/// The path components of instance `name`'s directories below the bpffs root: its own, and,
/// for an instance that keeps its pins, `links` and `programs`.
fn instance_dirs(name: &str, persist: bool) -> Vec<Vec<&str>> {
    let root = super::PIN_ROOT_NAME;
    let mut dirs = vec![vec![root, name]];
    if persist {
        dirs.push(vec![root, name, "links"]);
        dirs.push(vec![root, name, "programs"]);
    }
    dirs
}

/// Checks what exists of instance `name`'s directories, before anything is changed.
pub fn check_dirs(name: &str) -> Result<(), PinDirError> {
    for rel in instance_dirs(name, true) {
        walk(&rel, false)?;
    }
    Ok(())
}

/// Makes (0700) and checks instance `name`'s directories.
pub(crate) fn make_dirs(name: &str, persist: bool) -> Result<(), PinDirError> {
    for rel in instance_dirs(name, persist) {
        walk(&rel, true)?;
    }
    Ok(())
}
