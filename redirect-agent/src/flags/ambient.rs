//! `--mode ambient`: istio-cni's in-pod rules for ztunnel instead of istio-iptables'
//! (`redirect_common::config::ambient`), with the few settings istio-cni takes from its own
//! configuration and the pod's annotations.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
};

use clap::Args;
use redirect_common::config::{self, Ambient, AmbientSettings, CaptureConfig, ConfigError, DnsCapture};

use super::{
    CaptureFlags,
    env::{boolean, no_env},
};

/// The capture mode and ambient's own settings.
#[derive(Args, Debug, Clone, Default)]
pub struct ModeFlags {
    /// Whose rules to reproduce: `sidecar` (istio-iptables', for a pod with its own proxy) or
    /// `ambient` (istio-cni's in-pod rules, for ztunnel) [default: sidecar].
    #[arg(long = "mode", value_name = "MODE")]
    pub mode: Option<String>,
    /// Ambient: the source the node's rules SNAT the kubelet's probes to, let through [default:
    /// 169.254.7.127].
    #[arg(long = "host-probe-snat", value_name = "ADDR")]
    pub probe_snat: Option<String>,
    /// Ambient: the same for IPv6 [default: fd16:9254:7127:1337:ffff:ffff:ffff:ffff].
    #[arg(long = "host-probe-v6-snat", value_name = "ADDR")]
    pub probe_snat_v6: Option<String>,
    /// Ambient: no inbound capture, as for an ingress gateway (the pod annotation
    /// ambient.istio.io/bypass-inbound-capture).
    #[arg(long = "bypass-inbound-capture", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    pub bypass_inbound_capture: Option<String>,
}

/// The settings `--mode ambient` takes, for errors.
const AMBIENT_SETTINGS: &str = "--redirect-dns, --bypass-inbound-capture, -k/--reroute-virtual-interfaces, \
                                --host-probe-snat, --host-probe-v6-snat and --resolv-conf";

/// Which rules: `--mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Sidecar,
    Ambient,
}

impl ModeFlags {
    pub fn mode(&self) -> Result<Mode, ConfigError> {
        match self.mode.as_deref().map(str::trim) {
            None | Some("sidecar") => Ok(Mode::Sidecar),
            Some("ambient") => Ok(Mode::Ambient),
            Some(other) => Err(ConfigError {
                flag: "--mode",
                value: other.to_owned(),
                expected: "sidecar or ambient".into(),
            }),
        }
    }

    /// For sidecar mode: refuses ambient's own settings.
    pub(super) fn check_sidecar(&self) -> Result<(), ConfigError> {
        let given = [
            (&self.probe_snat, "--host-probe-snat"),
            (&self.probe_snat_v6, "--host-probe-v6-snat"),
            (&self.bypass_inbound_capture, "--bypass-inbound-capture"),
        ];
        match given.into_iter().find_map(|(v, flag)| Some((v.as_ref()?, flag))) {
            Some((v, flag)) => Err(ConfigError {
                flag,
                value: v.clone(),
                expected: "it only with --mode ambient (istio-iptables has no such setting)".into(),
            }),
            None => Ok(()),
        }
    }
}

impl CaptureFlags {
    /// `--mode ambient`'s capture: the command line only (istio-cni's in-pod rules read no
    /// environment of the pod's), and none of istio-iptables' flags, which these rules do not
    /// take.
    pub(super) fn ambient(&self) -> Result<CaptureConfig, ConfigError> {
        let sidecar_only = [
            (&self.envoy_port, "-p/--envoy-port"),
            (&self.inbound_capture_port, "-z/--inbound-capture-port"),
            (&self.inbound_tunnel_port, "-e/--inbound-tunnel-port"),
            (&self.proxy_uid, "-u/--proxy-uid"),
            (&self.proxy_gid, "-g/--proxy-gid"),
            (&self.inbound_mode, "-m/--istio-inbound-interception-mode"),
            (&self.service_cidr, "-i/--istio-service-cidr"),
            (&self.service_exclude_cidr, "-x/--istio-service-exclude-cidr"),
            (&self.inbound_ports, "-b/--istio-inbound-ports"),
            (&self.local_exclude_ports, "-d/--istio-local-exclude-ports"),
            (&self.outbound_ports, "-q/--istio-outbound-ports"),
            (&self.outbound_ports_exclude, "-o/--istio-local-outbound-ports-exclude"),
            (&self.exclude_interfaces, "-c/--istio-exclude-interfaces"),
            (&self.tproxy_mark, "-t/--istio-inbound-tproxy-mark"),
            (&self.tproxy_route_table, "-r/--istio-inbound-tproxy-route-table"),
            (&self.capture_all_dns, "--capture-all-dns"),
            (&self.drop_invalid, "--drop-invalid"),
            (&self.compatibility_version, "--compatibility-version"),
        ];
        if let Some((v, flag)) = sidecar_only.into_iter().find_map(|(v, flag)| Some((v.as_ref()?, flag))) {
            return Err(ConfigError {
                flag,
                value: v.clone(),
                expected: format!(
                    "no value with --mode ambient: istio-cni's in-pod rules have fixed ports and tell ztunnel \
                     by its mark 0x539; their settings are {AMBIENT_SETTINGS}"
                ),
            });
        }
        let m = &self.mode;
        // A node agent puts the source on the node's lo and binds the node's sockets to it:
        // a unicast address no other use claims.
        let probe_snat = match &m.probe_snat {
            Some(v) => parse_addr::<Ipv4Addr>("--host-probe-snat", v, PROBE_V4)
                .and_then(|a| probe_source(a.into(), "--host-probe-snat", v, PROBE_V4).map(|()| a))?,
            None => config::DEFAULT_PROBE_SNAT_V4,
        };
        let probe_snat_v6 = match &m.probe_snat_v6 {
            Some(v) => parse_addr::<Ipv6Addr>("--host-probe-v6-snat", v, PROBE_V6)
                .and_then(|a| probe_source(a.into(), "--host-probe-v6-snat", v, PROBE_V6).map(|()| a))?,
            None => config::DEFAULT_PROBE_SNAT_V6,
        };
        let dns = boolean(&self.redirect_dns, "--redirect-dns", &[], &no_env)?;
        // The resolvers a DNS proxy serving the pod forwards to: a resolv.conf named but not
        // readable is an error, the default one missing only leaves none.
        let dns_upstreams = match (dns, read_resolv_conf(&self.resolv_conf)) {
            (true, (_, Ok((v4, v6)))) => v4
                .into_iter()
                .map(IpAddr::V4)
                .chain(v6.into_iter().map(IpAddr::V6))
                .collect(),
            (true, (path, Err(e))) if self.resolv_conf.is_some() => {
                return Err(ConfigError {
                    flag: "--resolv-conf",
                    value: path.display().to_string(),
                    expected: format!("a readable resolv.conf ({e})"),
                });
            }
            _ => Vec::new(),
        };
        let (v, f) = (
            self.kube_virt_interfaces.clone().unwrap_or_default(),
            "-k/--reroute-virtual-interfaces",
        );
        Ok(CaptureConfig::ambient(AmbientSettings {
            ambient: Ambient {
                probe_snat_v4: probe_snat,
                probe_snat_v6,
            },
            dns,
            bypass_inbound: boolean(&m.bypass_inbound_capture, "--bypass-inbound-capture", &[], &no_env)?,
            virtual_interfaces: config::parse_interfaces(f, &v)?,
            dns_upstreams,
        }))
    }
}

const PROBE_V4: &str = "a unicast IPv4 address, not loopback, 0.0.0.0 or broadcast (istio-cni's default \
                        169.254.7.127)";
const PROBE_V6: &str = "a unicast IPv6 address, not loopback, ::, link-local or v4-mapped (istio-cni's default \
                        fd16:9254:7127:1337:ffff:ffff:ffff:ffff)";

/// Refuses a probe source no node could hold as its own address.
fn probe_source(a: IpAddr, flag: &'static str, v: &str, what: &str) -> Result<(), ConfigError> {
    let bad = match a {
        IpAddr::V4(a) => a.is_loopback() || a.is_unspecified() || a.is_multicast() || a.is_broadcast(),
        // A link-local one cannot be bound without its device.
        IpAddr::V6(a) => {
            a.is_loopback()
                || a.is_unspecified()
                || a.is_multicast()
                || a.is_unicast_link_local()
                || a.to_ipv4_mapped().is_some()
        }
    };
    match bad {
        true => Err(ConfigError {
            flag,
            value: v.to_owned(),
            expected: what.into(),
        }),
        false => Ok(()),
    }
}

fn parse_addr<T: std::str::FromStr>(flag: &'static str, v: &str, what: &str) -> Result<T, ConfigError> {
    v.trim().parse().map_err(|_| ConfigError {
        flag,
        value: v.to_owned(),
        expected: what.into(),
    })
}

/// A resolv.conf's resolvers, by family.
pub(super) type Resolvers = (Vec<Ipv4Addr>, Vec<Ipv6Addr>);

/// The resolvers of `--resolv-conf` (default /etc/resolv.conf), and the path read.
pub(super) fn read_resolv_conf(path: &Option<PathBuf>) -> (PathBuf, std::io::Result<Resolvers>) {
    let path = path.clone().unwrap_or_else(|| PathBuf::from("/etc/resolv.conf"));
    let read = std::fs::read_to_string(&path).map(|text| DnsCapture::servers_from_resolv_conf(&text));
    (path, read)
}
