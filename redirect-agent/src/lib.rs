//! redirect-agent: loads redirect's eBPF programs for a workload, serves original destinations
//! to its embedded proxy, and reports per-rule counters. The library half exists so that the
//! integration tests can reach the same code paths; the test kit (`redirect-testkit`) lives in
//! a crate of its own.

pub mod addrs;
pub mod adopt;
pub mod error;
pub mod explain;
pub mod features;
pub mod flags;
pub mod links;
pub mod listen_in;
pub mod loader;
pub mod metrics;
pub mod node;
pub mod proxy;
pub mod run;
pub mod standalone;
pub mod stats;
pub mod sys;
