//! Typed errors inside the agent; `anyhow` only at the command edges. Every message is one line
//! that names the value at fault and what would be accepted.

use std::{io, path::PathBuf};

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
    #[error(transparent)]
    Kernel(#[from] crate::features::Missing),
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
    #[error("attaching {prog} to cgroup {cgroup} failed: {source}")]
    Attach {
        prog: &'static str,
        cgroup: PathBuf,
        source: aya::programs::ProgramError,
    },
    #[error("attaching {prog} to network namespace {netns} failed: {source} (sk_lookup links need kernel 5.9+)")]
    AttachNetns {
        prog: &'static str,
        netns: PathBuf,
        source: aya::programs::ProgramError,
    },
    #[error("attaching {prog} to map {map} failed: {source}")]
    AttachMap {
        prog: &'static str,
        map: &'static str,
        source: aya::programs::ProgramError,
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
}

/// Flags that parse but cannot work together.
#[derive(Debug, thiserror::Error)]
pub enum FlagError {
    #[error("-p/--envoy-port and -z/--inbound-capture-port are both {0}: expected two different ports")]
    SamePort(u16),
}
