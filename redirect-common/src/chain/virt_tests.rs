//! `-k`: nat PREROUTING's rules for a VM's devices, as the kernel holds them after
//! istio-iptables' `-I PREROUTING 1` insertions, and what their walk decides.
use super::*;
use crate::{ConnFacts, addr, config, workload_flags};

fn cfg(args: &[(&str, &str)]) -> CaptureConfig {
    let mut c = CaptureConfig::default();
    for (flag, value) in args {
        match *flag {
            "-k" => c.kube_virt_interfaces = config::parse_interfaces("-k", value).unwrap(),
            "-c" => c.exclude_interfaces = config::parse_interfaces("-c", value).unwrap(),
            "-i" => c.outbound_cidrs = config::parse_cidr_include("-i", value).unwrap(),
            _ => unreachable!("{flag}"),
        }
    }
    c
}

fn prerouting(c: &CaptureConfig, family: Family) -> Vec<String> {
    let rules = compile(c).unwrap();
    let names: Vec<&str> = c.interface_list().map(|i| i.as_str()).collect();
    let names = Names {
        groups: &[],
        ifaces: &names,
    };
    rules
        .iter()
        .filter(|r| r.family == family as u8 && r.chain_id() == Some(ChainId::Prerouting))
        .map(|r| rule_text_named(r, &names))
        .collect()
}

#[test]
fn virt_rules_come_first_in_the_order_the_insertions_leave() {
    // istio-iptables' golden `ipnets-with-kube-virt-interfaces`, plus an IPv6 CIDR and -c.
    let c = cfg(&[("-k", "eth1,eth2"), ("-i", "10.0.0.0/8,fd00::/8"), ("-c", "eth9")]);
    assert_eq!(
        prerouting(&c, Family::V4),
        [
            "-A PREROUTING -d 10.0.0.0/8 -i eth2 -j ISTIO_REDIRECT",
            "-A PREROUTING -d 10.0.0.0/8 -i eth1 -j ISTIO_REDIRECT",
            "-A PREROUTING -i eth2 -j RETURN",
            "-A PREROUTING -i eth1 -j RETURN",
            "-A PREROUTING -i eth9 -j RETURN",
        ]
    );
    assert_eq!(
        prerouting(&c, Family::V6)[0],
        "-A PREROUTING -d fd00::/8 -i eth2 -j ISTIO_REDIRECT"
    );
    // `-i '*'`: one jump per device, in both tables; `-i ''`: only the RETURNs.
    let all = cfg(&[("-k", "eth1")]);
    assert_eq!(
        prerouting(&all, Family::V6),
        [
            "-A PREROUTING -i eth1 -j ISTIO_REDIRECT",
            "-A PREROUTING -i eth1 -j RETURN"
        ]
    );
    let none = cfg(&[("-k", "eth1"), ("-i", "")]);
    assert_eq!(prerouting(&none, Family::V4), ["-A PREROUTING -i eth1 -j RETURN"]);
}

#[test]
fn a_syn_from_a_virt_device_is_redirected_in_the_include_list_and_returned_outside_it() {
    let c = cfg(&[("-c", "eth9"), ("-k", "eth1"), ("-i", "10.0.0.0/8")]);
    let rules = compile(&c).unwrap();
    // eth9 is entry 0, eth1 entry 1.
    assert_eq!(
        workload(&c, &compile_packed(&c).unwrap().packed, 0, Serving::default()).virt_ifaces,
        0b10
    );
    assert_eq!(flags(&c) & workload_flags::IFACES, workload_flags::IFACES);
    let syn = |dst: &str, ifaces: u32| ConnFacts {
        family: Family::V4 as u8,
        proto: IPPROTO_TCP,
        dst_addr: addr::from_ip(dst.parse::<IpAddr>().unwrap()),
        dst_port: 443,
        src_addr: addr::from_ip("10.0.2.2".parse::<IpAddr>().unwrap()),
        out_lo: false,
        uid: u32::MAX,
        gid: u32::MAX,
        in_owner_groups: false,
        ifaces,
        mark: 0,
        established: false,
    };
    let decided = |f: &ConnFacts| {
        rules
            .iter()
            .filter(|r| r.family == Family::V4 as u8 && r.chain == ChainId::Inbound as u8)
            .find(|r| r.matches(f))
            .map(|r| (r.target_kind(), r.has & m::DST != 0))
    };
    assert_eq!(decided(&syn("10.96.0.1", 0b10)), Some((Some(Target::Redirect), true)));
    assert_eq!(decided(&syn("192.168.1.1", 0b10)), Some((Some(Target::Return), false)));
    // The same SYN from another device: not the -k rules' (ISTIO_INBOUND's own decides).
    assert_ne!(decided(&syn("10.96.0.1", 0)), Some((Some(Target::Redirect), true)));
}
