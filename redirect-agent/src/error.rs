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
}

/// Flags that parse but cannot work together.
#[derive(Debug, thiserror::Error)]
pub enum FlagError {
    #[error("-p/--envoy-port and -z/--inbound-capture-port are both {0}: expected two different ports")]
    SamePort(u16),
}
