//! What a probe reports, one JSON line per connection: written by `redirect-testkit probe`
//! inside the workload, read back by [`crate::probe::ProbeSpec`] in the test.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Connected, exchanged the bytes, saw a clean EOF.
    Ok,
    Refused,
    Reset,
    Timeout,
    Unreachable,
    /// A clean EOF before the exchange finished.
    Closed,
    Other,
}

/// What `--sockopts` saw, from inside the workload's cgroup (where the program runs).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SockoptReport {
    /// TCP_INFO on the probe's connection: length and `tcpi_state`.
    pub tcp_info_len: u32,
    pub tcp_state: u8,
    /// SO_PEERGROUPS of a unix socketpair, asked with a 16 KiB buffer: the length the kernel
    /// returned, and whether the groups were ours.
    pub peer_groups_len: u32,
    pub peer_groups_intact: bool,
    /// errno of the original destination query on the probe's own (connecting) socket, which
    /// nobody redirected *to*: the kernel's answer must stand. SO_ORIGINAL_DST on an AF_INET
    /// socket, IP6T_SO_ORIGINAL_DST on an AF_INET6 one (see [`crate::sock::original_dst`]).
    pub orig_dst_errno: Option<i32>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProbeResult {
    pub outcome: Outcome,
    pub error: Option<String>,
    /// The address connect() was given, as the probe formatted it: the destination, or its
    /// v4-mapped form (`[::ffff:10.200.1.2]:8080`) with `--v4-mapped`.
    #[serde(default)]
    pub dialed: Option<String>,
    /// getsockname right after connect: the socket's local address, as the kernel returned it
    /// (an AF_INET6 socket's stays in its v4-mapped form, `[::ffff:10.200.1.1]:40000`).
    pub local: Option<String>,
    /// getpeername right after connect, as the kernel returned it: what the app sees, which
    /// for a captured connection is its original destination (as behind iptables REDIRECT).
    pub peer: Option<String>,
    /// Where the kernel really connected the socket (the capture listener when captured), from
    /// its socket table (`/proc/net/tcp`, `tcp6`): how a test tells proxied from direct.
    #[serde(default)]
    pub kernel_peer: Option<String>,
    /// The first line the server sent (see [`crate::server::server_banner`]).
    pub banner: Option<String>,
    pub sent: usize,
    pub received: usize,
    /// The bytes that came back are the bytes that were sent.
    pub intact: bool,
    pub elapsed_ms: u64,
    /// `--round-trips`: how many completed, and the slowest one.
    #[serde(default)]
    pub round_trips: u64,
    #[serde(default)]
    pub slowest_round_trip_us: u64,
    #[serde(default)]
    pub sockopts: Option<SockoptReport>,
}

impl ProbeResult {
    /// A `key=value` field of the banner (`name`, `local`, `peer`).
    pub fn banner_field(&self, key: &str) -> Option<&str> {
        let b = self.banner.as_deref()?;
        b.split_whitespace()
            .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
    }

    /// The port the kernel really connected the socket to (its socket table's view, else
    /// getpeername's).
    pub fn peer_port(&self) -> Option<u16> {
        self.kernel_peer
            .as_deref()
            .and_then(|p| p.parse::<std::net::SocketAddr>().ok())
            .or_else(|| self.peer_addr())
            .map(|a| a.port())
    }

    /// `peer`, parsed (a v4-mapped address stays an IPv6 one).
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        self.peer.as_deref()?.parse().ok()
    }

    /// `local`, parsed (a v4-mapped address stays an IPv6 one).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local.as_deref()?.parse().ok()
    }

    /// An address field of the banner (`local`, `peer`, `orig`), parsed; `None` for `orig=-`.
    pub fn banner_addr(&self, key: &str) -> Option<SocketAddr> {
        self.banner_field(key)?.parse().ok()
    }
}
