//! Ambient mode: the rules istio-cni's node agent writes inside an ambient pod's network
//! namespace (`cni/pkg/iptables/iptables.go`, `CreateInpodRules`) for ztunnel, the node's one
//! proxy, which serves the pod from listening sockets made in that namespace.
//!
//! Unlike istio-iptables', these rules take almost no settings: ztunnel's ports are fixed, and
//! ztunnel is told apart by the mark on its sockets, not by a uid. What a pod can change is
//! DNS capture, inbound capture (ingress gateways bypass it), interfaces rerouted as outbound
//! (a KubeVirt VM's), and the address the kubelet's probes arrive SNATed from.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    vec::Vec,
};

use super::{CaptureConfig, DnsCapture, Include, Interface};

pub use crate::{AMBIENT_CONN_MARK, AMBIENT_MARK, AMBIENT_MARK_MASK};
/// ztunnel's outbound listener in the pod (`ZtunnelOutboundPort`).
pub const AMBIENT_OUTBOUND_PORT: u16 = 15001;
/// ztunnel's plaintext inbound listener (`ZtunnelInboundPlaintextPort`).
pub const AMBIENT_INBOUND_PORT: u16 = 15006;
/// ztunnel's HBONE listener (`ZtunnelInboundPort`): connections to it are never redirected.
pub const AMBIENT_TUNNEL_PORT: u16 = 15008;
/// istio-cni's default `HostProbeSNATAddress`: the node's rules SNAT the kubelet's probes to
/// it, and the pod's let them through.
pub const DEFAULT_PROBE_SNAT_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 7, 127);
/// istio-cni's default `HostProbeV6SNATAddress`.
pub const DEFAULT_PROBE_SNAT_V6: Ipv6Addr =
    Ipv6Addr::new(0xfd16, 0x9254, 0x7127, 0x1337, 0xffff, 0xffff, 0xffff, 0xffff);

/// What only ambient's rules have. The settings they share with istio-iptables' are kept where
/// those are ([`CaptureConfig::ambient`] says where).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ambient {
    /// `HostProbeSNATAddress`.
    pub probe_snat_v4: Ipv4Addr,
    /// `HostProbeV6SNATAddress`.
    pub probe_snat_v6: Ipv6Addr,
}

impl Default for Ambient {
    fn default() -> Self {
        Self {
            probe_snat_v4: DEFAULT_PROBE_SNAT_V4,
            probe_snat_v6: DEFAULT_PROBE_SNAT_V6,
        }
    }
}

/// An ambient pod's settings, as istio-cni reads them from its own configuration and the pod's
/// annotations.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AmbientSettings {
    pub ambient: Ambient,
    /// DNS capture (`AMBIENT_DNS_CAPTURE`, or the pod's `ambient.istio.io/dns-capture`).
    pub dns: bool,
    /// Ingress mode (`ambient.istio.io/bypass-inbound-capture`): no inbound capture.
    pub bypass_inbound: bool,
    /// `istio.io/reroute-virtual-interfaces`: TCP arriving on these goes to ztunnel's outbound
    /// listener.
    pub virtual_interfaces: Vec<Interface>,
    /// The pod's resolvers, where a DNS proxy serving the pod sends what it does not answer.
    pub dns_upstreams: Vec<std::net::IpAddr>,
}

impl CaptureConfig {
    /// An ambient pod's capture. The settings ambient shares with istio-iptables are held in
    /// istio-iptables' fields, so that everything downstream of the rules (the DNS proxy, the
    /// interface list, whether inbound is captured, the capture ports) reads them one way: DNS
    /// capture is `dns` (every resolver: ambient's rules name none), ingress mode an empty
    /// `-b`, the rerouted interfaces `-k`'s, and the ports ztunnel's. No uid or gid is
    /// exempt: ztunnel is known by its mark.
    pub fn ambient(s: AmbientSettings) -> Self {
        Self {
            envoy_port: AMBIENT_OUTBOUND_PORT,
            inbound_capture_port: AMBIENT_INBOUND_PORT,
            inbound_tunnel_port: AMBIENT_TUNNEL_PORT,
            proxy_uids: Vec::new(),
            proxy_gids: Vec::new(),
            outbound_cidrs: Include::All,
            inbound_ports: if s.bypass_inbound {
                Include::List(Vec::new())
            } else {
                Include::All
            },
            inbound_exclude_ports: Vec::new(),
            dns: DnsCapture {
                redirect: s.dns,
                capture_all: true,
                upstreams: s.dns_upstreams,
                ..DnsCapture::default()
            },
            kube_virt_interfaces: s.virtual_interfaces,
            ambient: Some(s.ambient),
            ..Self::default()
        }
    }
}
