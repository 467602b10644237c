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
mod btf;
mod check;
mod cli;
mod dial_in;
pub mod engine;
mod error;
pub mod explain;
pub mod features;
mod flags;
mod listen_in;
mod logging;
mod metrics;
mod node;
mod proxy;
mod run;
mod standalone;
pub mod stats;
pub mod sys;
pub mod tproxy_route;
mod validate;
pub mod zds;

pub use cli::main;
/// istio-iptables' flags to a capture config, as an enrollment reads them (the benchmark's tests
/// build `explain`'s tables from the flags it runs with).
pub use flags::parse_args;
/// Proxied connections that a descriptor limit holds (the benchmark sizes its load by it).
pub use proxy::connections_fitting;
