//! Ambient mode's chains (`crate::config::ambient`): what istio-cni's `CreateInpodRules` writes
//! in the pod's namespace, in its order, as rules the programs walk and as the tables
//! `explain` prints.
//!
//! nat ISTIO_PRERT (from PREROUTING): each rerouted interface's TCP to ztunnel's outbound port
//! then RETURN; unless ingress mode, the probes' SNAT source accepted, and TCP not to
//! 127.0.0.1, not to the HBONE port and not from ztunnel redirected to its inbound port. nat
//! ISTIO_OUTPUT: TCP to the probes' SNAT address accepted; with DNS capture, UDP not over lo
//! and TCP not to 127.0.0.1 to port 53 (not ztunnel's) redirected to 15053; TCP carrying the
//! inbound-proxied mark accepted; anything over lo accepted; the rest of TCP (not to
//! 127.0.0.1, not ztunnel's) redirected to the outbound port. Every rule is [`m::AMBIENT`], so
//! that it prints as istio-cni writes it.

use std::{format, vec::Vec};

use super::{
    Builder, Names, host_cidr, out_lo, rule_text_named, slots,
    tables::{Table, TableLine, Tables, VIRT_REDIRECT_BY, VIRT_RETURN_BY, connect},
    virt_entry_bits, with_dport, with_dst, with_mark, with_src,
};
use crate::{
    ChainId, DNS_PROXY_PORT, IPPROTO_TCP, IPPROTO_UDP, Rule, Target,
    addr::Family,
    config::{AMBIENT_CONN_MARK, AMBIENT_MARK, AMBIENT_MARK_MASK, Ambient, CaptureConfig, Cidr},
    m,
};

use super::DNS_PORT;

/// One family's ISTIO_PRERT, then its ISTIO_OUTPUT.
pub(super) fn chains(b: &mut Builder, cfg: &CaptureConfig, ambient: &Ambient) {
    let (localhost, probe) = match b.family {
        Family::V4 => (
            host_cidr(std::net::Ipv4Addr::LOCALHOST.into()),
            host_cidr(ambient.probe_snat_v4.into()),
        ),
        Family::V6 => (
            host_cidr(std::net::Ipv6Addr::LOCALHOST.into()),
            host_cidr(ambient.probe_snat_v6.into()),
        ),
    };
    let family = b.family;
    let rule = |chain, target| {
        let mut r = Rule::new(family, chain, target);
        r.has |= m::AMBIENT;
        r
    };
    let tcp = |mut r: Rule| {
        r.proto = IPPROTO_TCP;
        r
    };
    let to_port = |mut r: Rule, port: u16| {
        r.dport2 = port;
        r
    };
    let not_ztunnel = |r: Rule| with_mark(r, AMBIENT_MARK, AMBIENT_MARK_MASK, true);
    let not_localhost = |r: Rule, localhost: &Cidr| with_dst(r, localhost, true);

    for bit in virt_entry_bits(cfg) {
        for target in [Target::Redirect, Target::Return] {
            let mut r = tcp(rule(ChainId::Inbound, target));
            r.has |= m::IFACE;
            r.uid = bit;
            b.push(to_port(r, cfg.envoy_port));
        }
    }
    if !cfg.inbound_ports.is_empty() {
        b.push(tcp(with_src(rule(ChainId::Inbound, Target::Accept), &probe)));
        let r = with_dport(
            not_localhost(rule(ChainId::Inbound, Target::InRedirect), &localhost),
            IPPROTO_TCP,
            cfg.inbound_tunnel_port,
            true,
        );
        b.push(to_port(not_ztunnel(r), cfg.inbound_capture_port));
    }

    b.push(tcp(with_dst(rule(ChainId::Output, Target::Accept), &probe, false)));
    if cfg.dns.redirect {
        let mut udp = with_dport(rule(ChainId::Output, Target::DnsRedirect), IPPROTO_UDP, DNS_PORT, false);
        udp = out_lo(udp);
        udp.neg |= m::OUT_LO;
        b.push(to_port(not_ztunnel(udp), DNS_PROXY_PORT));
        let tcp53 = with_dport(
            not_localhost(rule(ChainId::Output, Target::DnsRedirect), &localhost),
            IPPROTO_TCP,
            DNS_PORT,
            false,
        );
        b.push(to_port(not_ztunnel(tcp53), DNS_PROXY_PORT));
    }
    b.push(tcp(with_mark(
        rule(ChainId::Output, Target::Accept),
        AMBIENT_CONN_MARK,
        AMBIENT_MARK_MASK,
        false,
    )));
    b.push(out_lo(not_localhost(rule(ChainId::Output, Target::Accept), &localhost)));
    let redirect = tcp(not_localhost(rule(ChainId::Output, Target::Redirect), &localhost));
    b.push(to_port(not_ztunnel(redirect), cfg.envoy_port));
}

/// What replaces the connmark pair (with istio-cni's `fwmark 0x111/0xfff lookup 100`, which the
/// agent installs as istio-cni does).
const CONNMARK_BY: &str = "sock_ops: ztunnel's socket (0x539) dialing the pod from a foreign source takes 0x111 at \
                           its connect, and the app's socket accepted from it takes the SYN's mark \
                           (tcp_fwmark_accept=1), so every reply routes back to ztunnel; connect4/6 judge \
                           connect() calls only, so replies are never redirected";

/// What serves [`node_rule`].
const NODE_PROBE_BY: &str = "node mode: connect4/6 at the node's cgroup root bind the node's unbound TCP sockets \
                             connecting to an ambient pod's address to this source, which the agent keeps on the \
                             node's lo while a pod uses it";

/// istio-cni's rule in the node's own namespace for the kubelet's probes of ambient pods
/// (`CreateHostRulesForHealthChecks`; the set holds every ambient pod's address of `family`),
/// and what serves it.
pub fn node_rule(ambient: &Ambient, family: Family) -> (String, &'static str) {
    let (set, source) = match family {
        Family::V4 => ("istio-inpod-probes-v4", ambient.probe_snat_v4.to_string()),
        Family::V6 => ("istio-inpod-probes-v6", ambient.probe_snat_v6.to_string()),
    };
    (
        format!(
            "-t nat -A ISTIO_POSTRT -m owner --socket-exists -p tcp -m set --match-set {set} dst -j SNAT --to-source \
             {source}"
        ),
        NODE_PROBE_BY,
    )
}

/// What replaces the raw table's zones.
const ZONES_BY: &str = "not needed: sendmsg/recvmsg rewrite each socket's datagrams, no conntrack entry is made \
                        or shared";

/// Every table of `family` for an ambient pod with these settings. `rules` is what
/// [`super::compile`] returned for the same settings.
pub(super) fn tables(cfg: &CaptureConfig, _ambient: &Ambient, rules: &[Rule], family: Family) -> Vec<TableLine> {
    use Table::{Mangle, Nat, Raw};
    let mut t = Tables::new();
    let ifaces: Vec<&str> = cfg.interface_list().map(|i| i.as_str()).collect();
    let names = Names {
        groups: &[],
        ifaces: &ifaces,
    };
    let mark = format!("{AMBIENT_MARK:#x}/{AMBIENT_MARK_MASK:#x}");
    let conn_mark = format!("{AMBIENT_CONN_MARK:#x}/{AMBIENT_MARK_MASK:#x}");
    t.line(Mangle, "-A PREROUTING -j ISTIO_PRERT".into(), CONNMARK_BY);
    t.line(Mangle, "-A OUTPUT -j ISTIO_OUTPUT".into(), CONNMARK_BY);
    t.line(
        Mangle,
        format!("-A ISTIO_PRERT -m mark --mark {mark} -j CONNMARK --set-xmark {conn_mark}"),
        CONNMARK_BY,
    );
    t.line(
        Mangle,
        format!(
            "-A ISTIO_OUTPUT -m connmark --mark {conn_mark} -j CONNMARK --restore-mark --nfmask 0xffffffff \
             --ctmask 0xffffffff"
        ),
        CONNMARK_BY,
    );

    t.append(Nat, "-A OUTPUT -j ISTIO_OUTPUT".into(), None, connect(family));
    t.append(
        Nat,
        "-A PREROUTING -j ISTIO_PRERT".into(),
        None,
        "sk_lookup attached to the pod's netns (connections from other hosts)",
    );
    let virt = super::virt_entries(cfg);
    for (slot, r) in slots(rules)
        .into_iter()
        .zip(rules)
        .filter(|(_, r)| r.family == family as u8)
    {
        let by = match (r.chain_id(), r.target_kind()) {
            (Some(ChainId::Inbound), Some(Target::Redirect)) if r.uid & virt != 0 => VIRT_REDIRECT_BY,
            (Some(ChainId::Inbound), _) if r.has & m::IFACE != 0 => VIRT_RETURN_BY,
            (Some(ChainId::Inbound), _) => "sk_lookup",
            (_, _) if r.proto == IPPROTO_UDP => "connect4/6 and sendmsg4/6 (a datagram's flow, once)",
            (_, _) => connect(family),
        };
        t.append(Nat, rule_text_named(r, &names), Some(slot), by);
    }
    if cfg.dns.redirect {
        t.line(Raw, "-A PREROUTING -j ISTIO_PRERT".into(), ZONES_BY);
        t.line(Raw, "-A OUTPUT -j ISTIO_OUTPUT".into(), ZONES_BY);
        t.line(
            Raw,
            format!("-A ISTIO_OUTPUT -p udp -m mark --mark {mark} -m udp --dport 53 -j CT --zone 1"),
            ZONES_BY,
        );
        t.line(
            Raw,
            format!("-A ISTIO_PRERT -p udp -m mark ! --mark {mark} -m udp --sport 53 -j CT --zone 1"),
            ZONES_BY,
        );
    }
    t.finish()
}
