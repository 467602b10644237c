//! redirect-agent: loads redirect's eBPF programs for a workload, serves original destinations
//! to its embedded proxy, and reports per-rule counters. The library half exists so that the
//! integration tests drive the same code paths (and the same sandbox) as `demo`.

pub mod addrs;
pub mod adopt;
pub mod demo;
pub mod error;
pub mod explain;
pub mod features;
pub mod flags;
pub mod links;
pub mod listen_in;
pub mod loader;
pub mod metrics;
pub mod node;
pub mod probe;
pub mod proxy;
pub mod run;
pub mod sandbox;
pub mod serve;
pub mod standalone;
pub mod stats;
pub mod sys;
