//! What the programs need from the kernel, probed before anything is loaded.
//!
//! A kernel version says little on distribution kernels (features are backported, or turned
//! off), and a verifier dump says too much; so each program type, map type and helper the
//! programs use is probed the way libbpf does (a minimal program or map), and the first one
//! missing is named in one line with the upstream version that brought it.

use std::{fmt, io};

use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{BpfHelper, is_helper_supported, is_map_supported, is_program_supported},
    util::KernelVersion,
};
use serde::Serialize;

/// How a feature is probed.
#[derive(Clone, Copy, Debug)]
pub enum Probe {
    Program(ProgramType),
    Map(MapType),
    Helper(ProgramType, BpfHelper),
    /// getsockopt(SO_NETNS_COOKIE), which the agent uses to key workloads.
    NetnsCookieSockopt,
    /// The kernel's BTF, with the socket-to-owner fields the owner match reads.
    KernelBtf,
}

#[derive(Clone, Copy, Debug)]
pub struct Feature {
    pub name: &'static str,
    /// The upstream release that brought it.
    pub since: &'static str,
    /// What redirect uses it for.
    pub why: &'static str,
    pub probe: Probe,
}

/// Everything the programs and the agent use, oldest first within each kind.
pub const FEATURES: &[Feature] = &[
    Feature {
        name: "sock_ops programs",
        since: "4.13",
        why: "original destinations by 4-tuple",
        probe: Probe::Program(ProgramType::SockOps),
    },
    Feature {
        name: "cgroup/connect4 and connect6 programs",
        since: "4.17",
        why: "ISTIO_OUTPUT (AF_INET and AF_INET6 sockets)",
        probe: Probe::Program(ProgramType::CgroupSockAddr),
    },
    Feature {
        name: "sk_lookup programs",
        since: "5.9",
        why: "ISTIO_INBOUND",
        probe: Probe::Program(ProgramType::SkLookup),
    },
    Feature {
        name: "array maps",
        since: "3.19",
        why: "rule and event counters",
        probe: Probe::Map(MapType::Array),
    },
    Feature {
        name: "LRU hash maps",
        since: "4.10",
        why: "original destinations",
        probe: Probe::Map(MapType::LruHash),
    },
    Feature {
        name: "sockhash maps",
        since: "4.18",
        why: "the inbound capture listener",
        probe: Probe::Map(MapType::SockHash),
    },
    Feature {
        name: "socket-local storage maps",
        since: "5.2",
        why: "telling the agent's own upstream sockets apart",
        probe: Probe::Map(MapType::SkStorage),
    },
    Feature {
        name: "bpf_sock_hash_update in sock_ops",
        since: "4.18",
        why: "registering a proxy's inbound capture listener",
        probe: Probe::Helper(ProgramType::SockOps, BpfHelper::BPF_FUNC_sock_hash_update),
    },
    Feature {
        name: "bpf_get_socket_cookie in cgroup/connect4",
        since: "4.19",
        why: "carrying the original destination from connect to sock_ops",
        probe: Probe::Helper(ProgramType::CgroupSockAddr, BpfHelper::BPF_FUNC_get_socket_cookie),
    },
    Feature {
        name: "bpf_get_socket_cookie in sock_ops",
        since: "4.19",
        why: "carrying the original destination from connect to sock_ops",
        probe: Probe::Helper(ProgramType::SockOps, BpfHelper::BPF_FUNC_get_socket_cookie),
    },
    Feature {
        name: "bpf_sk_storage_get in cgroup/connect4",
        since: "5.3",
        why: "telling the agent's own upstream sockets apart",
        probe: Probe::Helper(ProgramType::CgroupSockAddr, BpfHelper::BPF_FUNC_sk_storage_get),
    },
    Feature {
        name: "bpf_get_netns_cookie in cgroup/connect4",
        since: "5.7",
        why: "finding the workload of a connection",
        probe: Probe::Helper(ProgramType::CgroupSockAddr, BpfHelper::BPF_FUNC_get_netns_cookie),
    },
    Feature {
        name: "bpf_get_current_ancestor_cgroup_id in cgroup/connect4",
        since: "5.7",
        why: "capturing only a workload's cgroup within its namespace (node mode, enroll --cgroup)",
        probe: Probe::Helper(
            ProgramType::CgroupSockAddr,
            BpfHelper::BPF_FUNC_get_current_ancestor_cgroup_id,
        ),
    },
    Feature {
        name: "bpf_skc_to_tcp_sock in cgroup/connect4",
        since: "5.9",
        why: "the owner matches (-u, -g): the socket file's fsuid and fsgid, as iptables reads them",
        probe: Probe::Helper(ProgramType::CgroupSockAddr, BpfHelper::BPF_FUNC_skc_to_tcp_sock),
    },
    Feature {
        name: "bpf_sk_assign in sk_lookup",
        since: "5.9",
        why: "handing inbound connections to the capture listener",
        probe: Probe::Helper(ProgramType::SkLookup, BpfHelper::BPF_FUNC_sk_assign),
    },
    Feature {
        name: "bpf_get_current_task_btf in cgroup/sendmsg4",
        since: "5.11",
        why: "the owner matches for UDP (DNS capture): the sending task's fsuid and fsgid",
        probe: Probe::Helper(ProgramType::CgroupSockAddr, BpfHelper::BPF_FUNC_get_current_task_btf),
    },
    Feature {
        name: "kernel BTF (/sys/kernel/btf/vmlinux)",
        since: "5.4",
        why: "the owner matches (-u, -g): where a socket's owner is, in this kernel's structs",
        probe: Probe::KernelBtf,
    },
    Feature {
        name: "SO_NETNS_COOKIE",
        since: "5.14",
        why: "naming the workload's network namespace as the programs see it",
        probe: Probe::NetnsCookieSockopt,
    },
    Feature {
        name: "bpf_get_netns_cookie in sock_ops",
        since: "5.15",
        why: "keying original destinations by network namespace",
        probe: Probe::Helper(ProgramType::SockOps, BpfHelper::BPF_FUNC_get_netns_cookie),
    },
    Feature {
        name: "cgroup/getsockopt programs",
        since: "5.3",
        why: "answering SO_ORIGINAL_DST",
        probe: Probe::Program(ProgramType::CgroupSockopt),
    },
    Feature {
        name: "bpf_get_netns_cookie in cgroup/getsockopt",
        since: "5.15",
        why: "answering SO_ORIGINAL_DST per network namespace",
        probe: Probe::Helper(ProgramType::CgroupSockopt, BpfHelper::BPF_FUNC_get_netns_cookie),
    },
    Feature {
        name: "tc (sched_cls) programs",
        since: "4.1",
        why: "-k: a VM's connections REDIRECTed on its device",
        probe: Probe::Program(ProgramType::SchedClassifier),
    },
    Feature {
        name: "bpf_l4_csum_replace in tc",
        since: "4.1",
        why: "-k: the rewritten segment's TCP checksum",
        probe: Probe::Helper(ProgramType::SchedClassifier, BpfHelper::BPF_FUNC_l4_csum_replace),
    },
    Feature {
        name: "sk_skb programs",
        since: "4.14",
        why: "the fast path's stream verdict",
        probe: Probe::Program(ProgramType::SkSkb),
    },
    Feature {
        name: "sk_msg programs",
        since: "4.17",
        why: "the fast path (--fast-path)",
        probe: Probe::Program(ProgramType::SkMsg),
    },
    Feature {
        name: "bpf_msg_redirect_hash in sk_msg",
        since: "4.18",
        why: "the fast path (--fast-path)",
        probe: Probe::Helper(ProgramType::SkMsg, BpfHelper::BPF_FUNC_msg_redirect_hash),
    },
    Feature {
        name: "bpf_get_netns_cookie in sk_msg",
        since: "5.15",
        why: "the fast path's keys (--fast-path)",
        probe: Probe::Helper(ProgramType::SkMsg, BpfHelper::BPF_FUNC_get_netns_cookie),
    },
];

/// A feature this kernel lacks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Missing {
    pub kernel: String,
    pub name: &'static str,
    pub since: &'static str,
    pub why: &'static str,
}

impl fmt::Display for Missing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "kernel {} lacks {} (Linux {}+), which redirect needs for {}",
            self.kernel, self.name, self.since, self.why
        )
    }
}

impl std::error::Error for Missing {}

/// One probe's answer.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    pub name: &'static str,
    pub since: &'static str,
    /// `None`: the probe itself failed (say why in `error`).
    pub present: Option<bool>,
    pub error: Option<String>,
}

fn netns_cookie_sockopt() -> io::Result<bool> {
    match crate::sys::current_netns_cookie() {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOPROTOOPT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Runs one probe against this kernel.
pub fn probe(f: &Feature) -> Result<bool, String> {
    match f.probe {
        Probe::Program(t) => is_program_supported(t).map_err(|e| e.to_string()),
        Probe::Map(t) => is_map_supported(t).map_err(|e| e.to_string()),
        Probe::Helper(t, h) => is_helper_supported(t, h).map_err(|e| e.to_string()),
        Probe::NetnsCookieSockopt => netns_cookie_sockopt().map_err(|e| e.to_string()),
        // Missing BTF is a missing feature; BTF without the fields is one too (said in full
        // when loading).
        Probe::KernelBtf => Ok(crate::btf::owner_offsets().is_ok()),
    }
}

/// Every feature, probed with `probe`.
pub fn survey(probe: impl Fn(&Feature) -> Result<bool, String>) -> Vec<Finding> {
    FEATURES
        .iter()
        .map(|f| {
            let (present, error) = match probe(f) {
                Ok(p) => (Some(p), None),
                Err(e) => (None, Some(e)),
            };
            Finding {
                name: f.name,
                since: f.since,
                present,
                error,
            }
        })
        .collect()
}

/// The first feature `probe` says is missing. A probe that cannot decide is not held against
/// the kernel: loading will then say what is wrong.
pub fn first_missing(kernel: &str, probe: impl Fn(&Feature) -> Result<bool, String>) -> Option<Missing> {
    FEATURES.iter().find_map(|f| match probe(f) {
        Ok(false) => Some(Missing {
            kernel: kernel.to_owned(),
            name: f.name,
            since: f.since,
            why: f.why,
        }),
        Ok(true) => None,
        Err(e) => {
            tracing::warn!(feature = f.name, "feature probe failed: {e}");
            None
        }
    })
}

pub fn kernel_string() -> String {
    KernelVersion::current().map_or_else(|_| "(unknown version)".into(), |v| v.to_string())
}

/// Fails with one line naming the first missing feature.
pub fn require_all() -> Result<(), Missing> {
    match first_missing(&kernel_string(), probe) {
        Some(m) => Err(m),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_missing_feature_is_named_with_its_version() {
        let m = first_missing("5.10.0", |f| Ok(!f.name.contains("netns_cookie in sock_ops"))).expect("one is missing");
        assert_eq!(m.since, "5.15");
        assert_eq!(
            m.to_string(),
            "kernel 5.10.0 lacks bpf_get_netns_cookie in sock_ops (Linux 5.15+), which redirect needs for \
             keying original destinations by network namespace"
        );
        // Earlier entries win: a kernel without sk_lookup is told about sk_lookup first.
        let m = first_missing("5.4.0", |f| Ok(f.since != "5.9" && f.since != "5.15")).unwrap();
        assert_eq!(m.name, "sk_lookup programs");
        assert!(first_missing("6.1.0", |_| Ok(true)).is_none());
        // A probe that errors is not a verdict.
        assert!(first_missing("6.1.0", |_| Err("EPERM".into())).is_none());
    }

    #[test]
    fn versions_are_ordered_within_each_kind() {
        let v = |s: &str| -> (u32, u32) {
            let (a, b) = s.split_once('.').unwrap();
            (a.parse().unwrap(), b.parse().unwrap())
        };
        for w in FEATURES.windows(2) {
            let same_kind = std::mem::discriminant(&w[0].probe) == std::mem::discriminant(&w[1].probe);
            if same_kind {
                assert!(v(w[0].since) <= v(w[1].since), "{} before {}", w[0].name, w[1].name);
            }
        }
    }
}
