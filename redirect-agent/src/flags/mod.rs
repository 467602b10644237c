//! istio-iptables' flags, as clap sees them, with the sidecar injection's values as defaults.

use clap::Args;
use std::net::IpAddr;

use redirect_common::config::{self, CaptureConfig, ConfigError, DnsCapture};

use crate::proxy::{Keepalive, Liveness};

mod ambient;
mod env;
mod execution;

pub use ambient::{Mode, ModeFlags};
use env::{Env, pick, resolve_groups, user_uid};
pub use env::{no_env, process_env};
pub use execution::{Execution, ExecutionFlags};

/// The capture flags, named as `istio-iptables` names them and defaulted as the sidecar
/// injection passes them (`-p 15001 -z 15006 -u 1337 -m REDIRECT -i '*' -b '*' -d
/// 15090,15021,15020`). Where a flag is absent, `run` and `explain` read istio-iptables'
/// environment variable for it (the flag wins, as in istio-iptables); a node enrollment's
/// flags are the workload's own and read no environment.
#[derive(Args, Debug, Clone, Default)]
pub struct CaptureFlags {
    /// Outbound capture port (ISTIO_REDIRECT target) [default: 15001].
    #[arg(short = 'p', long = "envoy-port", value_name = "PORT")]
    pub envoy_port: Option<String>,
    /// Inbound capture port (ISTIO_IN_REDIRECT target) [default: 15006; env INBOUND_CAPTURE_PORT].
    #[arg(short = 'z', long = "inbound-capture-port", value_name = "PORT")]
    pub inbound_capture_port: Option<String>,
    /// HBONE tunnel port: never redirected from the proxy to its own pod [default: 15008; env
    /// INBOUND_TUNNEL_PORT].
    #[arg(short = 'e', long = "inbound-tunnel-port", value_name = "PORT")]
    pub inbound_tunnel_port: Option<String>,
    /// Comma list of UIDs whose connections are never captured (the proxy's) [default: 1337;
    /// env PROXY_UID].
    #[arg(short = 'u', long = "proxy-uid", value_name = "UIDS")]
    pub proxy_uid: Option<String>,
    /// Comma list of GIDs whose connections are never captured [default: the -u list; env
    /// PROXY_GID].
    #[arg(short = 'g', long = "proxy-gid", value_name = "GIDS")]
    pub proxy_gid: Option<String>,
    /// Inbound interception mode: REDIRECT or TPROXY [default: REDIRECT; env
    /// ISTIO_INBOUND_INTERCEPTION_MODE].
    #[arg(short = 'm', long = "istio-inbound-interception-mode", value_name = "MODE")]
    pub inbound_mode: Option<String>,
    /// Outbound CIDRs to capture: '*' for all, a comma list, or '' for none [default: '*'; env
    /// ISTIO_SERVICE_CIDR].
    #[arg(short = 'i', long = "istio-service-cidr", value_name = "CIDRS")]
    pub service_cidr: Option<String>,
    /// Outbound CIDRs never captured [env ISTIO_SERVICE_EXCLUDE_CIDR].
    #[arg(short = 'x', long = "istio-service-exclude-cidr", value_name = "CIDRS")]
    pub service_exclude_cidr: Option<String>,
    /// Inbound ports to capture: '*' for all, a comma list, or '' for none [default: '*'; env
    /// ISTIO_INBOUND_PORTS].
    #[arg(short = 'b', long = "istio-inbound-ports", value_name = "PORTS")]
    pub inbound_ports: Option<String>,
    /// Inbound ports never captured (with -b '*') [default: 15090,15021,15020; env
    /// ISTIO_LOCAL_EXCLUDE_PORTS].
    #[arg(short = 'd', long = "istio-local-exclude-ports", value_name = "PORTS")]
    pub local_exclude_ports: Option<String>,
    /// Outbound ports always captured [env ISTIO_OUTBOUND_PORTS].
    #[arg(short = 'q', long = "istio-outbound-ports", value_name = "PORTS")]
    pub outbound_ports: Option<String>,
    /// Outbound ports never captured, TCP and UDP [env ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE].
    #[arg(short = 'o', long = "istio-local-outbound-ports-exclude", value_name = "PORTS")]
    pub outbound_ports_exclude: Option<String>,
    /// Interfaces whose traffic is never captured, either way [env ISTIO_EXCLUDE_INTERFACES].
    #[arg(short = 'c', long = "istio-exclude-interfaces", value_name = "IFACES")]
    pub exclude_interfaces: Option<String>,
    /// Interfaces whose arriving connections are captured as outbound ones (a KubeVirt VM's)
    /// [env KUBE_VIRT_INTERFACES].
    /// (`--mode ambient`: the pod's istio.io/reroute-virtual-interfaces.)
    #[arg(
        short = 'k',
        long = "kube-virt-interfaces",
        visible_alias = "reroute-virtual-interfaces",
        value_name = "IFACES"
    )]
    pub kube_virt_interfaces: Option<String>,
    /// TPROXY mode's mark [default: 1337; env ISTIO_INBOUND_TPROXY_MARK].
    #[arg(short = 't', long = "istio-inbound-tproxy-mark", value_name = "MARK")]
    pub tproxy_mark: Option<String>,
    /// TPROXY mode's routing table [default: 133; env ISTIO_INBOUND_TPROXY_ROUTE_TABLE].
    #[arg(short = 'r', long = "istio-inbound-tproxy-route-table", value_name = "TABLE")]
    pub tproxy_route_table: Option<String>,
    /// Capture DNS to the resolvers of resolv.conf (port 53, UDP and TCP) to 15053 [env
    /// REDIRECT_DNS, ISTIO_META_DNS_CAPTURE].
    #[arg(long = "redirect-dns", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    pub redirect_dns: Option<String>,
    /// With --redirect-dns: capture DNS to every address, not only resolv.conf's [env
    /// CAPTURE_ALL_DNS].
    #[arg(long = "capture-all-dns", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    pub capture_all_dns: Option<String>,
    /// Drop packets conntrack finds invalid instead of resetting [env DROP_INVALID,
    /// INVALID_DROP].
    #[arg(long = "drop-invalid", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    pub drop_invalid: Option<String>,
    /// The resolv.conf whose `nameserver`s --redirect-dns captures [default: the workload's
    /// /etc/resolv.conf as istio-iptables reads it; explain: this host's].
    #[arg(long = "resolv-conf", value_name = "PATH")]
    pub resolv_conf: Option<std::path::PathBuf>,
    /// The Istio release whose istio-iptables rules to reproduce, where releases differ
    /// (docs/istio.md lists how) [default: current; env COMPATIBILITY_VERSION].
    #[arg(long = "compatibility-version", value_name = "MAJOR.MINOR")]
    pub compatibility_version: Option<String>,

    #[command(flatten)]
    pub execution: ExecutionFlags,
    #[command(flatten)]
    pub mode: ModeFlags,
}

impl CaptureFlags {
    /// The flags alone (a node enrollment's): no environment, and the proxy's uid, when `-u`
    /// leaves it out, is 1337 (the agent's user database is not the pod's).
    pub fn to_config(&self) -> Result<CaptureConfig, ConfigError> {
        self.build(&no_env, false)
    }

    /// The flags, then istio-iptables' environment variables for those absent; without `-u`,
    /// the uid of `ENVOY_USER` (istio-proxy) in /etc/passwd, else 1337, as istio-iptables.
    pub fn to_config_with(&self, env: Env) -> Result<CaptureConfig, ConfigError> {
        self.build(env, true)
    }

    fn build(&self, env: Env, users: bool) -> Result<CaptureConfig, ConfigError> {
        if self.mode.mode()? == Mode::Ambient {
            return self.ambient();
        }
        self.mode.check_sidecar()?;
        let p = |cli, flag, envs, default| pick(cli, flag, envs, env, default);
        // istio-iptables takes an empty -u (or PROXY_UID) as absent, and an empty -g as -u's.
        let (v, f) = p(&self.proxy_uid, "-u/--proxy-uid", &["PROXY_UID"], "");
        let uids = match v.trim() {
            "" if users => {
                let name = env("ENVOY_USER").unwrap_or_else(|| "istio-proxy".into());
                vec![user_uid(&name).unwrap_or(1337)]
            }
            "" => vec![1337],
            _ => config::parse_ids(f, &v)?,
        };
        let gids = match p(&self.proxy_gid, "-g/--proxy-gid", &["PROXY_GID"], "") {
            (v, f) if !v.trim().is_empty() => config::parse_ids(f, &v)?,
            _ => uids.clone(),
        };
        let port = |cli, flag, envs, default| {
            let (v, f) = p(cli, flag, envs, default);
            config::parse_port(f, &v)
        };
        let ports = |cli, flag, envs, default| {
            let (v, f) = p(cli, flag, envs, default);
            config::parse_ports(f, &v)
        };
        let boolean = |cli, flag, envs| env::boolean(cli, flag, envs, env);
        let (v, f) = p(
            &self.inbound_mode,
            "-m/--istio-inbound-interception-mode",
            &["ISTIO_INBOUND_INTERCEPTION_MODE"],
            "REDIRECT",
        );
        let inbound_mode = config::parse_mode(f, &v)?;
        let (v, f) = p(
            &self.service_cidr,
            "-i/--istio-service-cidr",
            &["ISTIO_SERVICE_CIDR"],
            "*",
        );
        let outbound_cidrs = config::parse_cidr_include(f, &v)?;
        let (v, f) = p(
            &self.service_exclude_cidr,
            "-x/--istio-service-exclude-cidr",
            &["ISTIO_SERVICE_EXCLUDE_CIDR"],
            "",
        );
        let outbound_exclude_cidrs = config::parse_cidrs(f, &v)?;
        let (v, f) = p(
            &self.inbound_ports,
            "-b/--istio-inbound-ports",
            &["ISTIO_INBOUND_PORTS"],
            "*",
        );
        let inbound_ports = config::parse_port_include(f, &v)?;
        let (v, f) = p(
            &self.exclude_interfaces,
            "-c/--istio-exclude-interfaces",
            &["ISTIO_EXCLUDE_INTERFACES"],
            "",
        );
        let exclude_interfaces = config::parse_interfaces(f, &v)?;
        let (v, f) = p(
            &self.kube_virt_interfaces,
            "-k/--kube-virt-interfaces",
            &["KUBE_VIRT_INTERFACES"],
            "",
        );
        let kube_virt_interfaces = config::parse_interfaces(f, &v)?;
        // One interface list, `-c`'s then `-k`'s: each entry a bit of the programs' 32-bit mask.
        if exclude_interfaces.len() + kube_virt_interfaces.len() > config::MAX_INTERFACES {
            return Err(config::ConfigError {
                flag: f,
                value: v,
                expected: format!(
                    "with -c/--istio-exclude-interfaces' {}, at most {} interface names in all",
                    exclude_interfaces.len(),
                    config::MAX_INTERFACES
                ),
            });
        }
        let (v, f) = p(
            &self.tproxy_mark,
            "-t/--istio-inbound-tproxy-mark",
            &["ISTIO_INBOUND_TPROXY_MARK"],
            "1337",
        );
        let mark = config::parse_u32_nonzero(f, &v)?;
        let (v, f) = p(
            &self.tproxy_route_table,
            "-r/--istio-inbound-tproxy-route-table",
            &["ISTIO_INBOUND_TPROXY_ROUTE_TABLE"],
            "133",
        );
        let route_table = config::parse_u32_nonzero(f, &v)?;
        let (v, f) = p(
            &self.compatibility_version,
            "--compatibility-version",
            &["COMPATIBILITY_VERSION"],
            "",
        );
        let compat = config::parse_compat(f, &v)?;

        let redirect = boolean(
            &self.redirect_dns,
            "--redirect-dns",
            &["REDIRECT_DNS", "ISTIO_META_DNS_CAPTURE"],
        )?;
        let capture_all = boolean(&self.capture_all_dns, "--capture-all-dns", &["CAPTURE_ALL_DNS"])?;
        let mut dns = DnsCapture {
            redirect,
            capture_all,
            ..DnsCapture::default()
        };
        // istio-iptables reads resolv.conf only for DNS capture limited to its servers; the
        // embedded DNS proxy forwards to them either way (as istio-agent does), so with
        // capture-all they are read if they can be.
        if redirect {
            let (path, read) = ambient::read_resolv_conf(&self.resolv_conf);
            match read {
                Ok((v4, v6)) => {
                    dns.upstreams = v4
                        .iter()
                        .copied()
                        .map(IpAddr::V4)
                        .chain(v6.iter().copied().map(IpAddr::V6))
                        .collect();
                    if !capture_all {
                        (dns.servers_v4, dns.servers_v6) = (v4, v6);
                    }
                }
                Err(e) if !capture_all => {
                    return Err(ConfigError {
                        flag: "--resolv-conf",
                        value: path.display().to_string(),
                        expected: format!("a readable resolv.conf ({e})"),
                    });
                }
                Err(_) => {}
            }
        }

        let include = env("ISTIO_OUTBOUND_OWNER_GROUPS").unwrap_or_else(|| "*".into());
        let exclude = env("ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE").unwrap_or_default();
        let mut owner_groups = config::parse_owner_groups(&include, &exclude)?;
        resolve_groups(&mut owner_groups);
        let ipv4_loopback = match env("ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR") {
            Some(v) => config::parse_ipv4_loopback("ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR", &v)?,
            None => config::DEFAULT_IPV4_LOOPBACK,
        };

        Ok(CaptureConfig {
            envoy_port: port(&self.envoy_port, "-p/--envoy-port", &[], "15001")?,
            inbound_capture_port: port(
                &self.inbound_capture_port,
                "-z/--inbound-capture-port",
                &["INBOUND_CAPTURE_PORT"],
                "15006",
            )?,
            inbound_tunnel_port: port(
                &self.inbound_tunnel_port,
                "-e/--inbound-tunnel-port",
                &["INBOUND_TUNNEL_PORT"],
                "15008",
            )?,
            proxy_uids: uids,
            proxy_gids: gids,
            inbound_mode,
            outbound_cidrs,
            outbound_exclude_cidrs,
            inbound_ports,
            inbound_exclude_ports: ports(
                &self.local_exclude_ports,
                "-d/--istio-local-exclude-ports",
                &["ISTIO_LOCAL_EXCLUDE_PORTS"],
                "15090,15021,15020",
            )?,
            outbound_ports: ports(
                &self.outbound_ports,
                "-q/--istio-outbound-ports",
                &["ISTIO_OUTBOUND_PORTS"],
                "",
            )?,
            outbound_exclude_ports: ports(
                &self.outbound_ports_exclude,
                "-o/--istio-local-outbound-ports-exclude",
                &["ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE"],
                "",
            )?,
            dns,
            tproxy: config::Tproxy { mark, route_table },
            exclude_interfaces,
            kube_virt_interfaces,
            drop_invalid: boolean(&self.drop_invalid, "--drop-invalid", &["DROP_INVALID", "INVALID_DROP"])?,
            owner_groups,
            ipv4_loopback,
            compat,
            ambient: None,
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
    args_override_self = true,
    disable_help_flag = true,
    disable_version_flag = true
)]
struct FlagsOnly {
    #[command(flatten)]
    capture: CaptureFlags,
}

/// Parses a workload's flags as `run` parses its command line, then [`check`]s them. The
/// error is one line: clap's first (it names the flag and the value) or ours. The
/// `--network-namespace` given, if any, comes back for the caller to compare.
pub fn parse_args(args: &[String]) -> Result<(CaptureConfig, Option<std::path::PathBuf>), String> {
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
    let execution = parsed
        .capture
        .execution
        .to_execution(&no_env)
        .map_err(|e| e.to_string())?;
    if let Some(refusal) = execution.enrollment_refusal() {
        return Err(refusal);
    }
    execution.log_without_effect();
    // The agent's own resolv.conf is not the workload's: a node enrollment names it.
    if capture.dns.redirect && !capture.dns.capture_all && parsed.capture.resolv_conf.is_none() {
        return Err(
            "--redirect-dns: name the workload's resolv.conf with --resolv-conf PATH (the agent's own is another \
             file), or capture all port-53 traffic with --capture-all-dns"
                .into(),
        );
    }
    check(&capture).map_err(|e| e.to_string())?;
    Ok((capture, execution.network_namespace))
}

/// Combinations the agent cannot serve, refused before anything changes; and the one that
/// istio-iptables accepts and ignores, said out loud.
pub fn check(c: &CaptureConfig) -> Result<(), crate::error::FlagError> {
    use crate::error::FlagError;
    if c.envoy_port == c.inbound_capture_port {
        return Err(FlagError::SamePort(c.envoy_port));
    }
    if c.inbound_mode == config::InterceptionMode::Tproxy && (253..=255).contains(&c.tproxy.route_table) {
        return Err(FlagError::KernelTable(c.tproxy.route_table));
    }
    // sk_lookup reads the SYN's arrival device only where the kernel has it (see sk_lookup.rs):
    // `-c`'s `PREROUTING -i`, and TPROXY's `-i lo` (the proxy's transparent dial comes from the
    // client's own address, so only the device tells it came from the namespace itself).
    let arrival_device = [
        (
            !c.exclude_interfaces.is_empty(),
            "-c/--istio-exclude-interfaces",
            "sk_lookup's ingress_ifindex, for PREROUTING -i",
        ),
        (
            !c.kube_virt_interfaces.is_empty(),
            "-k/--kube-virt-interfaces",
            "sk_lookup's ingress_ifindex, to leave the connections tc judged on a -k device alone",
        ),
        (
            c.inbound_mode == config::InterceptionMode::Tproxy,
            "-m TPROXY",
            "sk_lookup's ingress_ifindex, for mangle ISTIO_INBOUND's -i lo",
        ),
    ];
    if let Some(&(_, flag, what)) = arrival_device.iter().find(|(on, ..)| *on)
        && aya::util::KernelVersion::current().is_ok_and(|v| v < aya::util::KernelVersion::new(5, 17, 0))
    {
        return Err(FlagError::Kernel {
            flag,
            needs: "5.17",
            what,
            kernel: crate::features::kernel_string(),
        });
    }
    if let Some(g) = c.owner_groups.groups().iter().find(|g| g.gid.is_none()) {
        return Err(FlagError::UnknownGroup(g.name.clone()));
    }
    if matches!(c.inbound_ports, config::Include::List(_)) && !c.inbound_exclude_ports.is_empty() {
        tracing::warn!(
            excluded = ?c.inbound_exclude_ports,
            "-d only applies with -b '*' (as in istio-iptables): ignored, only the -b ports are captured"
        );
    }
    Ok(())
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

/// How the proxies move a stream's bytes (`run`, `node` and `proxy` alike).
#[derive(Args, Debug, Clone, Copy)]
pub struct RelayFlags {
    /// `splice`: once a direction of a proxied connection streams (a read fills its 64 KiB
    /// buffer), its bytes go from socket to socket through a pipe, never copied into the
    /// agent; `copy`: every byte is read and written through the buffer. Workloads on the
    /// fast path always copy. See docs/benchmarks.md for what each costs.
    #[arg(long, value_enum, default_value_t = Relay::Splice)]
    pub relay: Relay,
}

/// `run`'s and `node`'s `--fast-path`.
#[derive(clap::Args, Debug, Clone, Copy)]
pub struct FastPathFlags {
    /// Hand bytes between the two local ends of captured connections (app and proxy) with
    /// sk_msg, skipping TCP/IP on loopback: `auto` where the kernel's probe finds it safe
    /// (`check` says), or `on`/`off` (`--fast-path` alone is `on`). A node agent offers it to
    /// workloads enrolled with --fast-path, and sizes the fast-path maps by it (changing it
    /// needs a `cleanup`). See docs/fast-path.md.
    #[arg(long, value_enum, value_name = "WHEN", num_args = 0..=1, require_equals = true,
        default_value_t = FastPathWhen::Auto, default_missing_value = "on")]
    pub fast_path: FastPathWhen,
}

/// `--fast-path`'s values: whether the fast path is on.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum FastPathWhen {
    /// On where the kernel's probe finds it safe (`redirect-agent check` says what it found).
    Auto,
    /// On, whatever the probe would find.
    On,
    Off,
}

/// [`RelayFlags::relay`]'s values.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Relay {
    Splice,
    Copy,
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

#[cfg(test)]
mod tests;
