//! Ambient's chains decide as istio-cni's in-pod rules do: ztunnel by its mark (the low 12
//! bits only), the probes' SNAT address, loopback, DNS, the inbound-proxied mark, and the
//! interfaces rerouted as outbound.

use std::{net::IpAddr, vec::Vec};

use super::{compile, flags, rule_text};
use crate::{
    ChainId, ConnFacts, IPPROTO_TCP, IPPROTO_UDP, Rule, Target,
    addr::{self, Family},
    config::{AmbientSettings, CaptureConfig, parse_interfaces},
    workload_flags,
};

fn ip(s: &str) -> addr::Addr {
    addr::from_ip(s.parse::<IpAddr>().unwrap())
}

fn ambient(dns: bool, bypass_inbound: bool) -> CaptureConfig {
    CaptureConfig::ambient(AmbientSettings {
        dns,
        bypass_inbound,
        ..AmbientSettings::default()
    })
}

/// The target of the first rule of `chain` that matches (a walk of the kernel's kind), with
/// its counter slot.
fn decide(rules: &[Rule], chain: ChainId, c: &ConnFacts) -> Option<(Target, u32)> {
    let r = rules.iter().find(|r| r.chain_id() == Some(chain) && r.matches(c))?;
    Some((r.target_kind()?, r.slot))
}

fn out4(dst: &str, port: u16) -> ConnFacts {
    ConnFacts {
        family: Family::V4 as u8,
        proto: IPPROTO_TCP,
        dst_addr: ip(dst),
        dst_port: port,
        src_addr: ip("10.200.0.1"),
        out_lo: false,
        uid: 1000,
        gid: 1000,
        in_owner_groups: false,
        ifaces: 0,
        mark: 0,
        established: false,
    }
}

#[test]
fn outbound_keys_on_the_mark_and_leaves_loopback_and_probes_alone() {
    let cfg = ambient(true, false);
    let rules = compile(&cfg).unwrap();
    let out = |c: ConnFacts| decide(&rules, ChainId::Output, &c).map(|(t, _)| t);
    let app = out4("10.200.1.2", 8080);
    assert_eq!(out(app), Some(Target::Redirect));
    // ztunnel's sockets, whatever their mark's upper bits; a mark that differs in the low 12
    // bits is the app's.
    assert_eq!(out(ConnFacts { mark: 0x539, ..app }), None);
    assert_eq!(out(ConnFacts { mark: 0x7_0539, ..app }), None);
    assert_eq!(out(ConnFacts { mark: 0x538, ..app }), Some(Target::Redirect));
    // The uid does not matter (a sidecar's 1337 is captured like any).
    assert_eq!(
        out(ConnFacts {
            uid: 1337,
            gid: 1337,
            ..app
        }),
        Some(Target::Redirect)
    );
    // The inbound-proxied mark: accepted.
    assert_eq!(out(ConnFacts { mark: 0x111, ..app }), Some(Target::Accept));
    // The probes' SNAT address, the pod itself, and 127.0.0.1 (which nothing matches).
    assert_eq!(out(out4("169.254.7.127", 8080)), Some(Target::Accept));
    let pod = ConnFacts {
        out_lo: true,
        ..out4("10.200.0.1", 8080)
    };
    assert_eq!(out(pod), Some(Target::Accept));
    let localhost = ConnFacts {
        out_lo: true,
        ..out4("127.0.0.1", 8080)
    };
    assert_eq!(out(localhost), None);
    // DNS: UDP not over lo, TCP not to 127.0.0.1, not ztunnel's.
    let udp53 = ConnFacts {
        proto: IPPROTO_UDP,
        ..out4("10.96.0.10", 53)
    };
    assert_eq!(out(udp53), Some(Target::DnsRedirect));
    assert_eq!(out(ConnFacts { mark: 0x539, ..udp53 }), None);
    let resolved = ConnFacts {
        out_lo: true,
        ..out4("127.0.0.53", 53)
    };
    assert_eq!(
        out(ConnFacts {
            proto: IPPROTO_UDP,
            ..resolved
        }),
        Some(Target::Accept)
    );
    assert_eq!(out(resolved), Some(Target::DnsRedirect));
    assert_eq!(out(out4("10.96.0.10", 53)), Some(Target::DnsRedirect));
    // Other UDP: nothing.
    assert_eq!(out(ConnFacts { dst_port: 123, ..udp53 }), None);

    let rules = compile(&ambient(false, false)).unwrap();
    let out = |c: ConnFacts| decide(&rules, ChainId::Output, &c).map(|(t, _)| t);
    assert_eq!(out(out4("10.96.0.10", 53)), Some(Target::Redirect));
    assert_eq!(out(udp53), None);
}

#[test]
fn inbound_is_redirected_unless_from_the_probes_to_hbone_or_bypassed() {
    let cfg = ambient(false, false);
    assert_ne!(flags(&cfg) & workload_flags::INBOUND, 0);
    let rules = compile(&cfg).unwrap();
    let from = |src: &str, dst: &str, port: u16| ConnFacts {
        src_addr: ip(src),
        ..out4(dst, port)
    };
    let inb = |c: ConnFacts| decide(&rules, ChainId::Inbound, &c).map(|(t, _)| t);
    assert_eq!(inb(from("10.200.1.2", "10.200.0.1", 8080)), Some(Target::InRedirect));
    assert_eq!(inb(from("10.200.1.2", "10.200.0.1", 15006)), Some(Target::InRedirect));
    assert_eq!(inb(from("10.200.1.2", "10.200.0.1", 15008)), None);
    assert_eq!(inb(from("169.254.7.127", "10.200.0.1", 8080)), Some(Target::Accept));

    let bypassed = ambient(false, true);
    assert_eq!(flags(&bypassed) & workload_flags::INBOUND, 0);
    let rules = compile(&bypassed).unwrap();
    assert!(rules.iter().all(|r| r.chain_id() != Some(ChainId::Inbound)));
}

#[test]
fn ip6tables_chains_take_ipv6_loopback_and_probe_address() {
    let rules = compile(&ambient(true, false)).unwrap();
    let six: Vec<_> = rules
        .iter()
        .filter(|r| r.family == Family::V6 as u8)
        .map(rule_text)
        .collect();
    assert_eq!(
        six,
        [
            "-A ISTIO_PRERT -s fd16:9254:7127:1337:ffff:ffff:ffff:ffff/128 -p tcp -j ACCEPT",
            "-A ISTIO_PRERT ! -d ::1/128 -p tcp -m tcp ! --dport 15008 -m mark ! --mark 0x539/0xfff -j REDIRECT \
             --to-ports 15006",
            "-A ISTIO_OUTPUT -d fd16:9254:7127:1337:ffff:ffff:ffff:ffff/128 -p tcp -j ACCEPT",
            "-A ISTIO_OUTPUT ! -o lo -p udp -m udp --dport 53 -m mark ! --mark 0x539/0xfff -j REDIRECT \
             --to-ports 15053",
            "-A ISTIO_OUTPUT ! -d ::1/128 -p tcp -m tcp --dport 53 -m mark ! --mark 0x539/0xfff -j REDIRECT \
             --to-ports 15053",
            "-A ISTIO_OUTPUT -p tcp -m mark --mark 0x111/0xfff -j ACCEPT",
            "-A ISTIO_OUTPUT ! -d ::1/128 -o lo -j ACCEPT",
            "-A ISTIO_OUTPUT ! -d ::1/128 -p tcp -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15001",
        ]
    );
    let native = ConnFacts {
        family: Family::V6 as u8,
        src_addr: ip("fd00:200::1"),
        ..out4("::", 8080)
    };
    let out = |c: ConnFacts| decide(&rules, ChainId::Output, &c).map(|(t, _)| t);
    assert_eq!(
        out(ConnFacts {
            dst_addr: ip("fd00:200:1::2"),
            ..native
        }),
        Some(Target::Redirect)
    );
    let lo = ConnFacts {
        dst_addr: ip("::1"),
        out_lo: true,
        ..native
    };
    assert_eq!(out(lo), None);
    let probe = ConnFacts {
        dst_addr: ip("fd16:9254:7127:1337:ffff:ffff:ffff:ffff"),
        ..native
    };
    assert_eq!(out(probe), Some(Target::Accept));
}

#[test]
fn rerouted_interfaces_send_their_tcp_to_the_outbound_port_first() {
    let cfg = CaptureConfig::ambient(AmbientSettings {
        virtual_interfaces: parse_interfaces("-k", "vm0,vm1").unwrap(),
        ..AmbientSettings::default()
    });
    assert_eq!(super::virt_entries(&cfg), 0b11);
    let rules = compile(&cfg).unwrap();
    let on = |bit: u32| ConnFacts {
        ifaces: bit,
        src_addr: ip("10.200.9.2"),
        ..out4("10.200.1.2", 80)
    };
    for bit in [1, 2] {
        let (target, slot) = decide(&rules, ChainId::Inbound, &on(bit)).unwrap();
        assert_eq!(target, Target::Redirect);
        assert_eq!(rules[slot as usize].dport2, 15001);
        // UDP from there: no rule (they are `-p tcp`), so it is not the probes' or the
        // inbound redirect's either.
        assert_eq!(
            decide(
                &rules,
                ChainId::Inbound,
                &ConnFacts {
                    proto: IPPROTO_UDP,
                    ..on(bit)
                }
            ),
            None
        );
    }
    assert_eq!(
        decide(&rules, ChainId::Inbound, &on(0)).map(|d| d.0),
        Some(Target::InRedirect)
    );
}

#[test]
fn the_node_rule_names_the_pods_probe_source_per_family() {
    let mut ambient = crate::config::Ambient::default();
    let (v4, _) = super::node_rule(&ambient, Family::V4);
    assert_eq!(
        v4,
        "-t nat -A ISTIO_POSTRT -m owner --socket-exists -p tcp -m set --match-set istio-inpod-probes-v4 dst -j SNAT \
         --to-source 169.254.7.127"
    );
    ambient.probe_snat_v6 = "fd00::7".parse().unwrap();
    let (v6, _) = super::node_rule(&ambient, Family::V6);
    assert!(
        v6.ends_with("--match-set istio-inpod-probes-v6 dst -j SNAT --to-source fd00::7"),
        "{v6}"
    );
}
