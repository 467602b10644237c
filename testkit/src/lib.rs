//! redirect-testkit: throw-away workloads for redirect's integration tests, benchmark and
//! demo, kept out of the product.
//!
//! A workload is a network-namespace pair joined by a veth ([`netns`]), a cgroup ([`cgroup`]),
//! plain servers ([`server`], or [`serve`] as the workload's own process), the agent as a child
//! process ([`agent`]), and probes run from inside the workload ([`probe`], reporting
//! [`report`]s). Every piece removes itself on drop, also when a test panics. All of it is
//! dual-stack: the pair has IPv4 and IPv6 addresses, servers listen on either, and a probe
//! dials from an AF_INET or an AF_INET6 socket, also to a v4-mapped address ([`sock`]).
//!
//! The `redirect-testkit` binary is the child process that enters a workload (`probe`,
//! `serve`), and runs the `demo`. Of the agent, this crate uses the library's `sys` module
//! (namespaces, cgroups, identity); everything else it reaches as a user does: the
//! `redirect-agent` binary and its documented state file.

pub mod agent;
pub mod cgroup;
pub mod demo;
pub mod dns_server;
pub mod flood;
pub mod handover_peer;
pub mod netns;
pub mod probe;
pub mod report;
pub mod serve;
pub mod server;
pub mod sock;
pub mod sockdiag;
pub mod stress;
pub mod util;

pub use util::unique;
