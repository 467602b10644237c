//! Typed errors inside the agent; `anyhow` only at the command edges. Every message is one line
//! that names the value at fault and what would be accepted.

use std::path::PathBuf;

pub use crate::sys::SysError;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Sys(#[from] SysError),
    #[error("instance name '{0}' is invalid: expected 1-64 characters of A-Z a-z 0-9 _ -")]
    BadName(String),
    #[error(
        "no running instance '{name}' (nothing pinned at {dir}); start one with `redirect-agent run --name {name}`"
    )]
    NotRunning { name: String, dir: PathBuf },
    #[error("instance '{name}' is already running (lock {lock} is held); pick another --name")]
    AlreadyRunning { name: String, lock: PathBuf },
    #[error("loading the eBPF object failed: {0}")]
    Object(#[source] aya::EbpfError),
    #[error("program {0} is missing from the eBPF object")]
    MissingProgram(&'static str),
    #[error("map {0} is missing from the eBPF object")]
    MissingMap(&'static str),
    #[error("loading program {prog} failed: {reason} (kernel {kernel}; RUST_LOG=debug shows the verifier log)")]
    Verifier {
        prog: &'static str,
        reason: String,
        kernel: String,
    },
    /// A `bpf(2)` link command: attaching, pinning or moving a link.
    #[error("{what}: {source}")]
    Link {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("map {map}: {source}")]
    Map {
        map: &'static str,
        source: aya::maps::MapError,
    },
    #[error("pinning {path}: {source}")]
    Pin { path: PathBuf, source: aya::pin::PinError },
    #[error(transparent)]
    Rules(#[from] redirect_common::chain::TooManyRules),
    #[error(transparent)]
    Btf(#[from] crate::btf::BtfError),
    #[error(transparent)]
    PinDir(#[from] PinDirError),
}

/// Why a pin directory was refused; one line naming the path and what is required.
#[derive(Debug, thiserror::Error)]
pub enum PinDirError {
    #[error(
        "pin directory {path} is owned by uid {uid} with mode {mode:04o}: expected a directory owned by root (uid \
         {want}) that group and others cannot write (the agent makes them 0700); remove it, or chown it to root and \
         chmod it 0700"
    )]
    Unsafe {
        path: PathBuf,
        uid: u32,
        mode: u32,
        want: u32,
    },
    #[error(
        "pin directory {path} is a symlink (to {to}): expected a real directory owned by root with mode 0700; remove \
         the symlink"
    )]
    Symlink { path: PathBuf, to: String },
    #[error("pin directory {path} is not a directory: expected a directory owned by root with mode 0700; remove it")]
    NotDir { path: PathBuf },
    #[error(
        "{path} (the bpffs root) is writable by others without the sticky bit (mode {mode:04o}): any user could \
         rename the agent's pins; mount bpffs there (its root is 1777)"
    )]
    OpenRoot { path: PathBuf, mode: u32 },
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
}

/// Flags that parse but cannot work together.
#[derive(Debug, thiserror::Error)]
pub enum FlagError {
    #[error("-p/--envoy-port and -z/--inbound-capture-port are both {0}: expected two different ports")]
    SamePort(u16),
    #[error(
        "ISTIO_OUTBOUND_OWNER_GROUPS(_EXCLUDE) names group '{0}', which is not in /etc/group: expected a gid or a \
         group name known there (iptables-restore refuses it too)"
    )]
    UnknownGroup(String),
    #[error(
        "-r/--istio-inbound-tproxy-route-table {0} is one of the kernel's own tables (253 default, 254 main, 255 \
         local), where TPROXY's `local default dev lo` route would deliver every packet locally: expected 1-252 or \
         above 255"
    )]
    KernelTable(u32),
    #[error("{flag} needs Linux {needs} or later ({what}); this kernel is {kernel}")]
    Kernel {
        flag: &'static str,
        needs: &'static str,
        what: &'static str,
        kernel: String,
    },
}
