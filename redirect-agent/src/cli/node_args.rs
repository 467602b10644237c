//! `redirect-agent node`'s flags, and the [`NodeOptions`] they make.

use std::{path::PathBuf, time::Duration};

use crate::{
    engine::Sizing,
    flags::{FastPathFlags, FastPathWhen, LivenessFlags, RelayFlags},
    node::NodeOptions,
};

#[derive(clap::Args, Debug)]
pub(super) struct NodeArgs {
    /// Instance name: pins go to /sys/fs/bpf/redirect/NAME/, state to /run/redirect/NAME.json.
    #[arg(long, default_value = "node")]
    name: String,
    /// cgroup v2 directory the programs attach to; every workload's processes must be under
    /// it (default: the cgroup v2 root).
    #[arg(long, value_name = "PATH")]
    cgroup_parent: Option<PathBuf>,
    /// Control socket (default: /run/redirect/NAME.sock).
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Prometheus endpoint (GET /metrics, GET /ready), or `off`.
    #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:15030")]
    metrics: String,
    /// Size of the original-destination and UDP-flow maps (LRU), shared by all workloads:
    /// about 580 bytes of kernel memory each (1,048,576 take about 600 MiB; the start log says
    /// how much).
    #[arg(long, default_value_t = 65536, value_parser = clap::value_parser!(u32).range(1024..=1_048_576))]
    max_tracked_connections: u32,
    /// Connections each workload's embedded proxy serves at once; more are reset. All
    /// workloads' proxies also share one budget, what the descriptor limit leaves after the
    /// reserve for the control plane and --max-workloads workloads (the start log and the
    /// metrics say how much).
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..=1_048_576))]
    max_proxy_connections: u32,
    /// The most workloads enrolled at once (an enroll past it is refused), at most 1024: the
    /// descriptor reserve keeps room for each one's listeners, maps and dialer. Default: as
    /// many as the descriptor limit holds with half of it left to proxied connections (1024
    /// under the usual container limit); set it to the kubelet's --max-pods or more.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=redirect_common::MAX_WORKLOADS as i64))]
    max_workloads: Option<u32>,
    /// Upstream connect timeout of the embedded proxies, in milliseconds.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=600_000))]
    connect_timeout_ms: u64,
    /// On stop or handover: how long open proxied connections may finish before they are
    /// reset, in milliseconds.
    #[arg(long, default_value_t = 30_000, value_parser = clap::value_parser!(u64).range(0..=3_600_000))]
    drain_timeout_ms: u64,
    #[command(flatten)]
    fast_path: FastPathFlags,
    /// How long a new agent taking over may take to load its programs and say it serves, in
    /// seconds, before this one serves on (enrollments wait meanwhile).
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600))]
    handover_timeout_secs: u64,
    /// Serve ztunnel over ZDS on this Unix socket, as istio-cni's node agent does: every pod
    /// enrolled with `--mode ambient` and `--proxy none` (and its pod's uid) is handed to the
    /// ztunnel that connects, with its network namespace. Istio's ztunnel connects to
    /// /var/run/ztunnel/ztunnel.sock by default. Off without it.
    #[arg(long, value_name = "PATH")]
    ztunnel_socket: Option<PathBuf>,
    #[command(flatten)]
    liveness: LivenessFlags,
    #[command(flatten)]
    relay: RelayFlags,
}

impl NodeArgs {
    /// The options `node::run` takes; `--metrics` parsed here, the paths checked there (before
    /// anything changes, with what the agent finds on the machine).
    pub(super) fn into_options(self) -> anyhow::Result<NodeOptions> {
        let metrics = match self.metrics.as_str() {
            "off" => None,
            m => Some(m.parse().map_err(|_| {
                anyhow::anyhow!("invalid value '{m}' for --metrics: expected ADDR:PORT (e.g. 127.0.0.1:15030) or off")
            })?),
        };
        Ok(NodeOptions {
            socket: self.socket.unwrap_or_else(|| redirect_api::default_socket(&self.name)),
            name: self.name,
            cgroup_parent: self.cgroup_parent,
            metrics,
            max_workloads: self.max_workloads.map(|n| n as usize),
            fast_path: self.fast_path.fast_path,
            ztunnel_socket: self.ztunnel_socket,
            sizing: Sizing {
                handover_within: Duration::from_secs(self.handover_timeout_secs),
                ..super::sizing(
                    self.max_tracked_connections,
                    self.max_proxy_connections,
                    self.connect_timeout_ms,
                    self.drain_timeout_ms,
                    self.fast_path.fast_path == FastPathWhen::On,
                    self.liveness,
                    self.relay,
                )
            },
        })
    }
}
