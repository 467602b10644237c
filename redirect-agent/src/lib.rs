//! redirect-agent: loads redirect's eBPF programs for workloads, serves original destinations
//! to its embedded proxy, and reports per-rule counters.
//!
//! The binary is the product; the library exists for it, and exposes only what the test kit,
//! the integration tests and the benchmark read of it (the state an instance publishes, the
//! counters' JSON, the kernel probes, and the process plumbing in [`sys`]). See
//! `docs/architecture.md` for the modules and the engine.

mod addrs;
mod adopt;
mod api;
mod cli;
pub mod engine;
mod error;
pub mod explain;
pub mod features;
mod flags;
mod listen_in;
mod metrics;
mod node;
mod proxy;
mod run;
mod standalone;
pub mod stats;
pub mod sys;

/// Who serves a workload's capture ports.
#[derive(Copy, Clone, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ProxyMode {
    /// Listeners on the capture ports inside the workload's namespace forward to the original
    /// destinations.
    Embedded,
    /// No listeners: another proxy (Envoy) owns the capture ports.
    None,
}

impl ProxyMode {
    /// As the command line and the node API spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Embedded => "embedded",
            Self::None => "none",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        <Self as clap::ValueEnum>::from_str(s, false).ok()
    }
}

pub use cli::main;
/// Proxied connections that a descriptor limit holds (the benchmark sizes its load by it).
pub use proxy::connections_fitting;
