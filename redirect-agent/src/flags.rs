//! istio-iptables' flags, as clap sees them, with the sidecar injection's values as defaults.

use clap::Args;
use redirect_common::config::{self, CaptureConfig, ConfigError};

use crate::proxy::{Keepalive, Liveness};

/// The capture flags, named and defaulted as `istio-iptables` for the default injection
/// (`-p 15001 -z 15006 -u 1337 -m REDIRECT -i '*' -b '*' -d 15090,15021,15020`).
#[derive(Args, Debug, Clone)]
pub struct CaptureFlags {
    /// Outbound capture port (ISTIO_REDIRECT target).
    #[arg(short = 'p', long = "envoy-port", default_value = "15001", value_name = "PORT")]
    pub envoy_port: String,
    /// Inbound capture port (ISTIO_IN_REDIRECT target).
    #[arg(
        short = 'z',
        long = "inbound-capture-port",
        default_value = "15006",
        value_name = "PORT"
    )]
    pub inbound_capture_port: String,
    /// HBONE tunnel port: never redirected from the proxy to its own pod.
    #[arg(
        short = 'e',
        long = "inbound-tunnel-port",
        default_value = "15008",
        value_name = "PORT"
    )]
    pub inbound_tunnel_port: String,
    /// Comma list of UIDs whose connections are never captured (the proxy's).
    #[arg(short = 'u', long = "proxy-uid", default_value = "1337", value_name = "UIDS")]
    pub proxy_uid: String,
    /// Comma list of GIDs whose connections are never captured (default: the -u list).
    #[arg(short = 'g', long = "proxy-gid", value_name = "GIDS")]
    pub proxy_gid: Option<String>,
    /// Inbound interception mode; only REDIRECT is supported.
    #[arg(
        short = 'm',
        long = "istio-inbound-interception-mode",
        default_value = "REDIRECT",
        value_name = "MODE"
    )]
    pub inbound_mode: String,
    /// Outbound CIDRs to capture: '*' for all, a comma list, or '' for none.
    #[arg(short = 'i', long = "istio-service-cidr", default_value = "*", value_name = "CIDRS")]
    pub service_cidr: String,
    /// Outbound CIDRs never captured.
    #[arg(
        short = 'x',
        long = "istio-service-exclude-cidr",
        default_value = "",
        value_name = "CIDRS"
    )]
    pub service_exclude_cidr: String,
    /// Inbound ports to capture: '*' for all, a comma list, or '' for none.
    #[arg(short = 'b', long = "istio-inbound-ports", default_value = "*", value_name = "PORTS")]
    pub inbound_ports: String,
    /// Inbound ports never captured (with -b '*').
    #[arg(
        short = 'd',
        long = "istio-local-exclude-ports",
        default_value = "15090,15021,15020",
        value_name = "PORTS"
    )]
    pub local_exclude_ports: String,
    /// Outbound ports always captured.
    #[arg(short = 'q', long = "istio-outbound-ports", default_value = "", value_name = "PORTS")]
    pub outbound_ports: String,
    /// Outbound ports never captured.
    #[arg(
        short = 'o',
        long = "istio-local-outbound-ports-exclude",
        default_value = "",
        value_name = "PORTS"
    )]
    pub outbound_ports_exclude: String,
}

impl CaptureFlags {
    pub fn to_config(&self) -> Result<CaptureConfig, ConfigError> {
        let uids = config::parse_ids("-u/--proxy-uid", &self.proxy_uid)?;
        let gids = match &self.proxy_gid {
            Some(g) => config::parse_ids("-g/--proxy-gid", g)?,
            None => uids.clone(),
        };
        Ok(CaptureConfig {
            envoy_port: config::parse_port("-p/--envoy-port", &self.envoy_port)?,
            inbound_capture_port: config::parse_port("-z/--inbound-capture-port", &self.inbound_capture_port)?,
            inbound_tunnel_port: config::parse_port("-e/--inbound-tunnel-port", &self.inbound_tunnel_port)?,
            proxy_uids: uids,
            proxy_gids: gids,
            inbound_mode: config::parse_mode("-m/--istio-inbound-interception-mode", &self.inbound_mode)?,
            outbound_cidrs: config::parse_cidr_include("-i/--istio-service-cidr", &self.service_cidr)?,
            outbound_exclude_cidrs: config::parse_cidrs("-x/--istio-service-exclude-cidr", &self.service_exclude_cidr)?,
            inbound_ports: config::parse_port_include("-b/--istio-inbound-ports", &self.inbound_ports)?,
            inbound_exclude_ports: config::parse_ports("-d/--istio-local-exclude-ports", &self.local_exclude_ports)?,
            outbound_ports: config::parse_ports("-q/--istio-outbound-ports", &self.outbound_ports)?,
            outbound_exclude_ports: config::parse_ports(
                "-o/--istio-local-outbound-ports-exclude",
                &self.outbound_ports_exclude,
            )?,
        })
    }
}

/// `--proxy`: who serves a workload's capture ports.
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

/// The istio-iptables flags of an enroll request (after `--`), parsed by the same clap
/// definition as `run`'s.
#[derive(clap::Parser, Debug)]
#[command(
    name = "enroll",
    no_binary_name = true,
    disable_help_flag = true,
    disable_version_flag = true
)]
struct FlagsOnly {
    #[command(flatten)]
    capture: CaptureFlags,
}

/// Parses a workload's flags as `run` parses its command line, then [`check`]s them. The
/// error is one line: clap's first (it names the flag and the value) or ours.
pub fn parse_args(args: &[String]) -> Result<CaptureConfig, String> {
    use clap::Parser as _;
    let parsed = FlagsOnly::try_parse_from(args).map_err(|e| {
        let text = e.render().to_string();
        text.lines()
            .next()
            .unwrap_or("invalid flags")
            .trim_start_matches("error: ")
            .trim()
            .to_owned()
    })?;
    let capture = parsed.capture.to_config().map_err(|e| e.to_string())?;
    check(&capture).map_err(|e| e.to_string())?;
    Ok(capture)
}

/// Combinations the agent cannot serve, refused before anything changes; and the one that
/// istio-iptables accepts and ignores, said out loud.
pub fn check(c: &CaptureConfig) -> Result<(), crate::error::FlagError> {
    if c.envoy_port == c.inbound_capture_port {
        return Err(crate::error::FlagError::SamePort(c.envoy_port));
    }
    if matches!(c.inbound_ports, config::Include::List(_)) && !c.inbound_exclude_ports.is_empty() {
        tracing::warn!(
            excluded = ?c.inbound_exclude_ports,
            "-d only applies with -b '*' (as in istio-iptables): ignored, only the -b ports are captured"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enroll_flags_parse_as_runs_do() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let c = parse_args(&args(&["-p", "15101", "-b", "8080"])).unwrap();
        assert_eq!(c.envoy_port, 15101);
        assert_eq!(c.inbound_capture_port, 15006);
        assert!(parse_args(&args(&["-z", "http"])).unwrap_err().contains("'http'"));
        assert!(parse_args(&args(&["-p", "15006"])).unwrap_err().contains("both 15006"));
        assert!(
            parse_args(&args(&["--frobnicate"]))
                .unwrap_err()
                .contains("--frobnicate")
        );
    }
}

/// How long a proxied connection may live with its peers quiet or gone (`run`, `node` and
/// `proxy` alike).
#[derive(Args, Debug, Clone, Copy)]
pub struct LivenessFlags {
    /// Close a proxied connection after this long without a byte in either direction, in
    /// milliseconds; 0: never (Envoy's TCP proxy default: 1 h).
    #[arg(long, default_value_t = Liveness::DEFAULT_IDLE_TIMEOUT.as_millis() as u64, value_parser = clap::value_parser!(u64).range(0..=604_800_000))]
    pub idle_timeout_ms: u64,
    /// TCP keepalive on both legs of each proxied connection: seconds of silence before the
    /// first probe; 0: keepalive off.
    #[arg(long, default_value_t = Keepalive::DEFAULT.time.as_secs() as u32, value_parser = clap::value_parser!(u32).range(0..=32_767))]
    pub keepalive_time_secs: u32,
    /// Seconds between unanswered keepalive probes.
    #[arg(long, default_value_t = Keepalive::DEFAULT.interval.as_secs() as u32, value_parser = clap::value_parser!(u32).range(1..=32_767))]
    pub keepalive_interval_secs: u32,
    /// Unanswered keepalive probes before the connection is dropped.
    #[arg(long, default_value_t = Keepalive::DEFAULT.probes, value_parser = clap::value_parser!(u32).range(1..=127))]
    pub keepalive_probes: u32,
}

impl LivenessFlags {
    pub fn to_liveness(self) -> Liveness {
        use std::time::Duration;
        Liveness {
            idle_timeout: (self.idle_timeout_ms > 0).then(|| Duration::from_millis(self.idle_timeout_ms)),
            keepalive: (self.keepalive_time_secs > 0).then(|| Keepalive {
                time: Duration::from_secs(self.keepalive_time_secs.into()),
                interval: Duration::from_secs(self.keepalive_interval_secs.into()),
                probes: self.keepalive_probes,
            }),
        }
    }
}
