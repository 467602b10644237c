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
    /// errno of SO_ORIGINAL_DST on the probe's own (connecting) socket, which nobody
    /// redirected *to*: the kernel's answer must stand.
    pub orig_dst_errno: Option<i32>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProbeResult {
    pub outcome: Outcome,
    pub error: Option<String>,
    /// The socket's local address after connect.
    pub local: Option<String>,
    /// getpeername after connect: where the kernel connected the socket.
    pub peer: Option<String>,
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

    /// The port the kernel connected the socket to.
    pub fn peer_port(&self) -> Option<u16> {
        self.peer.as_deref()?.parse::<SocketAddr>().ok().map(|a| a.port())
    }
}
