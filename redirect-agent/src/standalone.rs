//! `redirect-agent proxy`: the embedded proxy loop alone, behind istio-iptables' own REDIRECT
//! rules. Original destinations come from conntrack (`SO_ORIGINAL_DST`), as Envoy reads them.
//!
//! It runs as a workload's proxy does: inside the workload's namespace, as the proxy identity
//! the rules exempt (`-u`/`-g`, 1337), so its upstream connections are not captured again;
//! inbound upstreams leave from 127.0.0.6, which ISTIO_OUTPUT's first rule lets by.

use std::{path::PathBuf, time::Duration};

use anyhow::Context as _;

use crate::{
    proxy::{Budget, Dialer, Listeners, OriginalDst, Proxy, ProxyConfig},
    sys,
};

#[derive(clap::Args, Debug, Clone)]
pub struct ProxyArgs {
    /// The workload's network namespace (default: this process's).
    #[arg(long, value_name = "PATH")]
    pub netns: Option<PathBuf>,
    /// A cgroup v2 directory to join first (the workload's, as a sidecar container would be).
    #[arg(long, value_name = "PATH")]
    pub cgroup: Option<PathBuf>,
    /// The identity to run as: the proxy UID the rules exempt (istio-iptables -u).
    #[arg(long, default_value_t = 1337)]
    pub uid: u32,
    /// The proxy GID the rules exempt (istio-iptables -g).
    #[arg(long, default_value_t = 1337)]
    pub gid: u32,
    /// Outbound capture port (istio-iptables -p).
    #[arg(short = 'p', long = "envoy-port", default_value_t = 15001)]
    pub envoy_port: u16,
    /// Inbound capture port (istio-iptables -z).
    #[arg(short = 'z', long = "inbound-capture-port", default_value_t = 15006)]
    pub inbound_capture_port: u16,
    /// Connections served at once; more are reset.
    #[arg(long, default_value_t = 16384, value_parser = clap::value_parser!(u32).range(1..=1_048_576))]
    pub max_proxy_connections: u32,
    /// Upstream connect timeout, in milliseconds.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=600_000))]
    pub connect_timeout_ms: u64,
    /// On SIGTERM: how long open connections may finish before they are reset, in milliseconds.
    #[arg(long, default_value_t = 5_000, value_parser = clap::value_parser!(u64).range(0..=600_000))]
    pub drain_timeout_ms: u64,
    #[command(flatten)]
    pub liveness: crate::flags::LivenessFlags,
    #[command(flatten)]
    pub relay: crate::flags::RelayFlags,
}

/// Enters the workload and takes the proxy's identity. Must run before any thread exists:
/// namespace and cgroup are per task, and the identity must cover every thread.
pub fn enter(args: &ProxyArgs) -> anyhow::Result<()> {
    if args.envoy_port == args.inbound_capture_port {
        anyhow::bail!(crate::error::FlagError::SamePort(args.envoy_port));
    }
    sys::require_privileges("redirect-agent proxy")?;
    sys::join(args.cgroup.as_deref(), args.netns.as_deref())?;
    // While still root: the proxy identity cannot raise the hard limit.
    sys::raise_nofile_limit(args.max_proxy_connections as usize);
    sys::become_user(args.uid, args.gid)?;
    Ok(())
}

/// Serves until `shutdown` resolves. Listens on 0.0.0.0 and `::`: REDIRECT sends locally made
/// connections to 127.0.0.1 (`::1`) and connections from other hosts to the receiving
/// address.
pub async fn serve(args: &ProxyArgs, shutdown: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
    let cfg = ProxyConfig {
        outbound_port: args.envoy_port,
        inbound_port: args.inbound_capture_port,
        listen_on: ProxyConfig::ANY.to_vec(),
        outbound_on_any: false,
        connect_timeout: Duration::from_millis(args.connect_timeout_ms),
        max_connections: args.max_proxy_connections as usize,
        liveness: args.liveness.to_liveness(),
        dns_port: None,
        inbound_dial: crate::proxy::InboundDial::Passthrough,
        splice: args.relay.relay == crate::flags::Relay::Splice,
    }
    // Raised in `enter`, while still root.
    .fit_to_descriptors(sys::nofile_limit().map_or(0, |l| l.rlim_cur));
    let listening = Listeners::bind_here(&cfg)
        .and_then(Listeners::listen)
        .context("proxy listeners")?;
    // The only proxy of its process: its own limit, fitted to the descriptors above, is the
    // whole budget.
    let budget = Budget::new(cfg.max_connections);
    let proxy = Proxy::start(listening, OriginalDst::Conntrack, Dialer::Here, cfg, None, budget, None)?;
    tracing::info!(
        uid = args.uid,
        gid = args.gid,
        "proxy serving (original destinations from SO_ORIGINAL_DST)"
    );
    shutdown.await;
    proxy.drain(Duration::from_millis(args.drain_timeout_ms)).await;
    Ok(())
}
