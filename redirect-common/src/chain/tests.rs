use super::*;
use crate::{ConnFacts, addr, config, workload_flags};

/// The default sidecar injection's ISTIO_OUTPUT, as quoted in the foundation issue (with
/// the `-m tcp` that iptables-save prints for `--dport`).
const DEFAULT_OUTPUT: &[&str] = &[
    "-A ISTIO_OUTPUT -s 127.0.0.6/32 -o lo -j RETURN",
    "-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -p tcp -m tcp ! --dport 15008 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT",
    "-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN",
    "-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN",
    "-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -p tcp -m tcp ! --dport 15008 -m owner --gid-owner 1337 -j ISTIO_IN_REDIRECT",
    "-A ISTIO_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN",
    "-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN",
    "-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN",
    "-A ISTIO_OUTPUT -j ISTIO_REDIRECT",
];

#[test]
fn default_chain_renders_as_istio_iptables_writes_it() {
    let rules = compile(&CaptureConfig::default()).unwrap();
    let text: Vec<String> = output(&rules).map(rule_text).collect();
    assert_eq!(text, DEFAULT_OUTPUT);
    let c = list_columns(&rules[1]);
    assert_eq!((c.prot.as_str(), c.out.as_str()), ("tcp", "lo"));
    assert_eq!((c.source.as_str(), c.destination.as_str()), ("0.0.0.0/0", "!127.0.0.1"));
    assert_eq!(c.extra, "tcp dpt:!15008 owner UID match 1337");
    assert_eq!(list_columns(&rules[2]).extra, "! owner UID match 1337");
}

fn chain(rules: &[Rule], chain: ChainId, family: Family) -> impl Iterator<Item = &Rule> {
    rules
        .iter()
        .filter(move |r| r.chain == chain as u8 && r.family == family as u8)
}

fn output(rules: &[Rule]) -> impl Iterator<Item = &Rule> {
    chain(rules, ChainId::Output, Family::V4)
}

fn ip(s: &str) -> addr::Addr {
    addr::from_ip(s.parse::<IpAddr>().unwrap())
}

fn first_match(rules: &[Rule], c: &ConnFacts) -> Option<usize> {
    rules.iter().position(|r| r.matches(c))
}

#[test]
fn default_chain_decides_like_the_rule_set() {
    let rules = compile(&CaptureConfig::default()).unwrap();
    let base = ConnFacts {
        family: Family::V4 as u8,
        proto: IPPROTO_TCP,
        dst_addr: ip("10.200.0.2"),
        dst_port: 80,
        src_addr: addr::UNSPECIFIED,
        out_lo: false,
        uid: 0,
        gid: 0,
        in_owner_groups: false,
        ifaces: 0,
        mark: 0,
        established: false,
    };
    let pod = ConnFacts {
        dst_addr: ip("10.200.0.1"),
        out_lo: true,
        ..base
    };
    let lo = ConnFacts {
        dst_addr: ip("127.0.0.1"),
        out_lo: true,
        ..base
    };
    let cases: &[(ConnFacts, usize)] = &[
        (base, 8),
        (ConnFacts { uid: 1337, ..base }, 3),
        (
            ConnFacts {
                uid: 1000,
                gid: 1337,
                ..base
            },
            6,
        ),
        (
            ConnFacts {
                src_addr: ip("127.0.0.6"),
                uid: 1337,
                ..pod
            },
            0,
        ),
        (ConnFacts { uid: 1337, ..pod }, 1),
        (
            ConnFacts {
                uid: 1337,
                dst_port: 15008,
                ..pod
            },
            3,
        ),
        (
            ConnFacts {
                uid: 1000,
                gid: 1337,
                ..pod
            },
            2,
        ),
        (pod, 2),
        (lo, 2),
        (ConnFacts { uid: 1337, ..lo }, 3),
        (
            ConnFacts {
                uid: 1000,
                gid: 1337,
                ..lo
            },
            2,
        ),
    ];
    for (c, want) in cases {
        assert_eq!(first_match(&rules, c), Some(*want), "{c:?}");
    }
}

#[test]
fn every_flag_shapes_the_chain_in_istio_order() {
    let cfg = CaptureConfig {
        proxy_uids: std::vec![1337, 1000],
        proxy_gids: std::vec![1337],
        outbound_cidrs: config::parse_cidr_include("-i", "10.0.0.0/8,172.16.0.0/12").unwrap(),
        outbound_exclude_cidrs: config::parse_cidrs("-x", "10.96.0.1/32").unwrap(),
        outbound_ports: std::vec![3306],
        outbound_exclude_ports: std::vec![5432],
        ..CaptureConfig::default()
    };
    let text: Vec<String> = output(&compile(&cfg).unwrap()).map(rule_text).collect();
    assert_eq!(text[0], "-A ISTIO_OUTPUT -p tcp -m tcp --dport 5432 -j RETURN");
    assert_eq!(text[1], "-A ISTIO_OUTPUT -p udp -m udp --dport 5432 -j RETURN");
    assert_eq!(text[2], "-A ISTIO_OUTPUT -s 127.0.0.6/32 -o lo -j RETURN");
    assert!(text[6].contains("--uid-owner 1000"), "{}", text[6]);
    assert_eq!(text[12], "-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN");
    assert_eq!(text[13], "-A ISTIO_OUTPUT -d 10.96.0.1/32 -j RETURN");
    assert_eq!(text[14], "-A ISTIO_OUTPUT -p tcp -m tcp --dport 3306 -j ISTIO_REDIRECT");
    assert_eq!(text[15], "-A ISTIO_OUTPUT -d 10.0.0.0/8 -j ISTIO_REDIRECT");
    assert_eq!(text[16], "-A ISTIO_OUTPUT -d 172.16.0.0/12 -j ISTIO_REDIRECT");
    assert_eq!(text.len(), 17);

    let none = CaptureConfig {
        outbound_cidrs: Include::List(Vec::new()),
        ..CaptureConfig::default()
    };
    let rules = compile(&none).unwrap();
    assert!(rules.iter().all(|r| r.target_kind() != Some(Target::Redirect)));
}

#[test]
fn inbound_chain_follows_b_and_d() {
    let inbound = |cfg: &CaptureConfig| -> Vec<String> {
        chain(&compile(cfg).unwrap(), ChainId::Inbound, Family::V4)
            .map(rule_text)
            .collect()
    };
    let cfg = CaptureConfig::default();
    assert_eq!(
        inbound(&cfg),
        [
            "-A ISTIO_INBOUND -p tcp -m tcp --dport 15008 -j RETURN",
            "-A ISTIO_INBOUND -p tcp -m tcp --dport 15090 -j RETURN",
            "-A ISTIO_INBOUND -p tcp -m tcp --dport 15021 -j RETURN",
            "-A ISTIO_INBOUND -p tcp -m tcp --dport 15020 -j RETURN",
            "-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT",
        ]
    );
    assert_eq!(flags(&cfg), workload_flags::INBOUND);
    let list = CaptureConfig {
        inbound_ports: Include::List(std::vec![9080, 8081]),
        ..CaptureConfig::default()
    };
    assert_eq!(
        inbound(&list),
        [
            "-A ISTIO_INBOUND -p tcp -m tcp --dport 15008 -j RETURN",
            "-A ISTIO_INBOUND -p tcp -m tcp --dport 9080 -j ISTIO_IN_REDIRECT",
            "-A ISTIO_INBOUND -p tcp -m tcp --dport 8081 -j ISTIO_IN_REDIRECT",
        ]
    );
    let none = CaptureConfig {
        inbound_ports: Include::List(Vec::new()),
        ..CaptureConfig::default()
    };
    assert_eq!(
        inbound(&none),
        ["-A ISTIO_INBOUND -p tcp -m tcp --dport 15008 -j RETURN"]
    );
    assert_eq!(flags(&none), 0);
    let text = iptables_save(&tables(&none, &compile(&none).unwrap(), Family::V4));
    assert!(!text.contains("PREROUTING -p tcp"), "{text}");
}

/// The default injection's nat table as istio-iptables writes it (the reference's listing,
/// in iptables-save order and spelling).
#[test]
fn default_nat_table_is_istio_iptables_output() {
    let cfg = CaptureConfig::default();
    let rules = compile(&cfg).unwrap();
    let lines = tables(&cfg, &rules, Family::V4);
    // Chains in the order istio-iptables first writes to them, each chain in rule order.
    let mut want = std::vec![
        "-A ISTIO_INBOUND -p tcp -m tcp --dport 15008 -j RETURN",
        "-A ISTIO_INBOUND -p tcp -m tcp --dport 15090 -j RETURN",
        "-A ISTIO_INBOUND -p tcp -m tcp --dport 15021 -j RETURN",
        "-A ISTIO_INBOUND -p tcp -m tcp --dport 15020 -j RETURN",
        "-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT",
        "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
        "-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
        "-A PREROUTING -p tcp -j ISTIO_INBOUND",
        "-A OUTPUT -j ISTIO_OUTPUT",
    ];
    want.extend(DEFAULT_OUTPUT);
    let got: Vec<&str> = lines.iter().map(|l| l.text.as_str()).collect();
    assert_eq!(got, want);
    assert!(lines.iter().all(|l| l.table == Table::Nat));
    // Slots are indices into the compiled list, whichever order the chains print in.
    for l in &lines {
        if let Some(slot) = l.slot {
            assert_eq!(rule_text(&rules[slot]), l.text);
        }
    }
    assert_eq!(lines[0].slot, Some(DEFAULT_OUTPUT.len()));
    assert_eq!(lines[9].slot, Some(0));
    let save = iptables_save(&lines);
    assert!(save.starts_with("*nat\n:PREROUTING ACCEPT [0:0]\n"), "{save}");
    assert!(save.ends_with("COMMIT\n"), "{save}");
}

#[test]
fn a_workload_entry_carries_the_chain_ports_counter_block_and_serving_flags() {
    let cfg = CaptureConfig::default();
    let rules = compile(&cfg).unwrap();
    let packed = pack(&rules, &[]).unwrap();
    let w = workload(&cfg, &packed, 3, Serving::default());
    // The default ISTIO_INBOUND RETURNs (15008, 15090, 15021, 15020) are one port set entry
    // in each family; the entries and the set's members give back every rule, each counted
    // in its index in the list.
    let entries: Vec<(usize, Rule)> = w.entries().map(|(i, r)| (i, *r)).collect();
    assert_eq!(entries.iter().filter(|(_, r)| r.has & m::PORT_SET != 0).count(), 2);
    assert_eq!(entries.len() + 2 * 3, rules.len());
    assert_eq!(unpack(&entries, &packed.cidrs, &packed.ports), rules);
    assert_eq!(super::slots(&rules), (0..rules.len()).collect::<Vec<_>>());
    assert_eq!((w.outbound_port, w.inbound_port), (15001, 15006));
    assert_eq!(w.slot, 3);
    assert_eq!(w.flags, workload_flags::INBOUND);
    let own = Serving {
        own_proxy: true,
        fast_path: true,
    };
    assert_eq!(
        workload(&cfg, &packed, 0, own).flags,
        workload_flags::INBOUND | workload_flags::WORKLOAD_LISTENER | workload_flags::FAST_PATH
    );
    assert_eq!((w.cgroup_id, w.cgroup_level), (0, 0));
}

/// Lists no set can hold (one owner rule of three per id) still meet the walk's bound.
#[test]
fn oversized_flags_are_refused() {
    let cfg = CaptureConfig {
        proxy_uids: (1000..1030).collect(),
        ..CaptureConfig::default()
    };
    let e = compile(&cfg).unwrap_err().to_string();
    assert!(
        e.contains("iptables' chains once their CIDR and port lists are packed; redirect holds at most 64 per family"),
        "{e}"
    );
}

/// ip6tables' chains for the flags of Istio's `ipv6-uid-gid` golden case (`-b 4000,5000
/// -d 6000,7000 -g 1,2 -u 3,4 -x 2001:db8::/32 -i 2001:db8::/32`), in ip6tables-save
/// spelling; the IPv4 chains of the same flags take no IPv6 CIDR.
#[test]
fn ip6tables_chains_take_v6_addresses_and_cidrs() {
    let cfg = CaptureConfig {
        inbound_ports: Include::List(std::vec![4000, 5000]),
        inbound_exclude_ports: std::vec![6000, 7000],
        proxy_uids: std::vec![3, 4],
        proxy_gids: std::vec![1, 2],
        outbound_exclude_cidrs: config::parse_cidrs("-x", "2001:db8::/32").unwrap(),
        outbound_cidrs: config::parse_cidr_include("-i", "2001:db8::/32").unwrap(),
        ..CaptureConfig::default()
    };
    let rules = compile(&cfg).unwrap();
    let v6: Vec<String> = chain(&rules, ChainId::Output, Family::V6).map(rule_text).collect();
    let owner = |m: &str| {
        [
            format!(
                "-A ISTIO_OUTPUT ! -d ::1/128 -o lo -p tcp -m tcp ! --dport 15008 -m owner {m} -j ISTIO_IN_REDIRECT"
            ),
            format!("-A ISTIO_OUTPUT -o lo -m owner ! {m} -j RETURN"),
            format!("-A ISTIO_OUTPUT -m owner {m} -j RETURN"),
        ]
    };
    let mut want = std::vec!["-A ISTIO_OUTPUT -s ::6/128 -o lo -j RETURN".to_string()];
    for m in ["--uid-owner 3", "--uid-owner 4", "--gid-owner 1", "--gid-owner 2"] {
        want.extend(owner(m));
    }
    want.push("-A ISTIO_OUTPUT -d ::1/128 -j RETURN".into());
    want.push("-A ISTIO_OUTPUT -d 2001:db8::/32 -j RETURN".into());
    want.push("-A ISTIO_OUTPUT -d 2001:db8::/32 -j ISTIO_REDIRECT".into());
    assert_eq!(v6, want);
    let v4: Vec<String> = output(&rules).map(rule_text).collect();
    assert_eq!(v4.last().unwrap(), "-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN");
    let inbound6: Vec<String> = chain(&rules, ChainId::Inbound, Family::V6).map(rule_text).collect();
    assert_eq!(
        inbound6,
        [
            "-A ISTIO_INBOUND -p tcp -m tcp --dport 15008 -j RETURN",
            "-A ISTIO_INBOUND -p tcp -m tcp --dport 4000 -j ISTIO_IN_REDIRECT",
            "-A ISTIO_INBOUND -p tcp -m tcp --dport 5000 -j ISTIO_IN_REDIRECT",
        ]
    );
    // Slots: IPv4 from 0, so the IPv4 chains keep the slots they had before IPv6; IPv6 after
    // the last of them.
    let first_v6 = rules.iter().position(|r| r.family == Family::V6 as u8).unwrap();
    assert!(rules[..first_v6].iter().all(|r| r.family == Family::V4 as u8));
    let table = tables(&cfg, &rules, Family::V6);
    let v6_slots: Vec<usize> = table.iter().filter_map(|l| l.slot).collect();
    assert!(v6_slots.iter().all(|&s| s >= first_v6), "{v6_slots:?}");
    assert_eq!(v6_slots.iter().min(), Some(&first_v6));
    assert!(iptables_save(&table).contains("-A ISTIO_OUTPUT -s ::6/128 -o lo -j RETURN\n"));
    let c = list_columns(&rules[first_v6]);
    assert_eq!((c.source.as_str(), c.destination.as_str()), ("::6/128", "::/0"));
}

/// The v6 chain decides for native IPv6 connections only; v4-mapped ones are IPv4.
#[test]
fn ip6tables_chain_decides_native_ipv6() {
    let rules = compile(&CaptureConfig::default()).unwrap();
    let remote6 = ConnFacts {
        family: Family::V6 as u8,
        proto: IPPROTO_TCP,
        dst_addr: ip("fd00:200:0:1::2"),
        dst_port: 80,
        src_addr: addr::UNSPECIFIED,
        out_lo: false,
        uid: 0,
        gid: 0,
        in_owner_groups: false,
        ifaces: 0,
        mark: 0,
        established: false,
    };
    let slot = first_match(&rules, &remote6).unwrap();
    assert_eq!(rule_text(&rules[slot]), "-A ISTIO_OUTPUT -j ISTIO_REDIRECT");
    assert_eq!(rules[slot].family, Family::V6 as u8);
    let lo6 = ConnFacts {
        dst_addr: addr::LOCALHOST6,
        out_lo: true,
        ..remote6
    };
    assert_eq!(
        rule_text(&rules[first_match(&rules, &lo6).unwrap()]),
        "-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN"
    );
    let passthrough = ConnFacts {
        src_addr: addr::INBOUND_PASSTHROUGH_SRC6,
        dst_addr: ip("fd00:200:0:1::1"),
        out_lo: true,
        uid: 1337,
        ..remote6
    };
    assert_eq!(
        rule_text(&rules[first_match(&rules, &passthrough).unwrap()]),
        "-A ISTIO_OUTPUT -s ::6/128 -o lo -j RETURN"
    );
    let mapped = ConnFacts {
        family: Family::V4 as u8,
        dst_addr: ip("::ffff:10.200.0.2"),
        ..remote6
    };
    assert_eq!(first_match(&rules, &mapped), Some(8));
}

/// A loopback CIDR of either family in -i drops the `-o lo ! --uid-owner` RETURNs from both
/// tables (istio-iptables checks `HasLoopBackIP` of both lists for each).
#[test]
fn a_loopback_include_of_either_family_affects_both_tables() {
    for include in ["127.1.2.3/32", "::1/128"] {
        let cfg = CaptureConfig {
            outbound_cidrs: config::parse_cidr_include("-i", include).unwrap(),
            ..CaptureConfig::default()
        };
        let rules = compile(&cfg).unwrap();
        assert!(
            !rules.iter().any(|r| rule_text(r).contains("-o lo -m owner !")),
            "{include}"
        );
    }
}

/// Each family has its own budget, as each had its own table: the entry says where
/// ip6tables' entries start.
#[test]
fn each_family_has_its_own_budget() {
    let cfg = CaptureConfig {
        outbound_exclude_ports: (30001..=30010).collect(),
        inbound_ports: Include::List((40001..=40026).collect()),
        ..CaptureConfig::default()
    };
    let rules = compile(&cfg).unwrap();
    assert!(rules.len() > MAX_RULES_PER_FAMILY, "{}", rules.len());
    let packed = pack(&rules, &[]).unwrap();
    let w = workload(&cfg, &packed, 0, Serving::default());
    // Both lists are a set entry in each family.
    assert_eq!(w.n_rules, w.n_rules6);
    assert_eq!(w.entries().filter(|(_, r)| r.has & m::SETS != 0).count(), 4);
    let (v4, first4) = w.family_rules(Family::V4);
    let (v6, first6) = w.family_rules(Family::V6);
    assert_eq!((first4, first6), (0, MAX_RULES_PER_FAMILY));
    assert!(v4.iter().all(|r| r.family == Family::V4 as u8));
    assert!(v6.iter().all(|r| r.family == Family::V6 as u8));
    // A list only ip6tables' chains hold (v6 CIDRs), of members none packs with the one
    // before (each inside the one before it, under a REDIRECT a UDP flow walks past).
    let cidrs = (0..70)
        .map(|i| format!("fd00::/{}", 16 + i))
        .collect::<Vec<_>>()
        .join(",");
    let v6_heavy = CaptureConfig {
        outbound_cidrs: config::parse_cidr_include("-i", &cidrs).unwrap(),
        ..CaptureConfig::default()
    };
    let e = compile(&v6_heavy).unwrap_err().to_string();
    assert!(e.contains("ip6tables' chains"), "{e}");
}

/// As the programs walk ISTIO_OUTPUT: ISTIO_OUTPUT_DNS's rules in place after the jump, the
/// jump counted and passed over. The deciding rule's index and every rule counted before it.
fn walk_output(rules: &[Rule], c: &ConnFacts) -> (Option<usize>, Vec<usize>) {
    let mut counted = Vec::new();
    for (i, r) in rules.iter().enumerate() {
        let in_chain = r.chain == ChainId::Output as u8 || r.chain == ChainId::OutputDns as u8;
        if !in_chain || !r.matches(c) {
            continue;
        }
        counted.push(i);
        if r.target_kind().is_some_and(Target::decides) {
            return (Some(i), counted);
        }
    }
    (None, counted)
}

fn dns_cfg() -> CaptureConfig {
    CaptureConfig {
        dns: config::DnsCapture {
            redirect: true,
            servers_v4: std::vec![std::net::Ipv4Addr::new(10, 96, 0, 10)],
            ..Default::default()
        },
        ..CaptureConfig::default()
    }
}

/// With DNS capture, TCP to a resolver of resolv.conf goes to 15053 through the jump (both
/// counted); the proxy's own query does not; another address on port 53 is ordinary outbound.
#[test]
fn dns_capture_walks_into_istio_output_dns() {
    let rules = compile(&dns_cfg()).unwrap();
    let app = ConnFacts {
        family: Family::V4 as u8,
        proto: IPPROTO_TCP,
        dst_addr: ip("10.96.0.10"),
        dst_port: 53,
        src_addr: addr::UNSPECIFIED,
        out_lo: false,
        uid: 0,
        gid: 0,
        in_owner_groups: false,
        ifaces: 0,
        mark: 0,
        established: false,
    };
    let (hit, counted) = walk_output(&rules, &app);
    let hit = hit.unwrap();
    assert_eq!(rules[hit].target_kind(), Some(Target::DnsRedirect));
    assert_eq!(
        rule_text(&rules[hit]),
        "-A ISTIO_OUTPUT_DNS -d 10.96.0.10/32 -p tcp -m tcp --dport 53 -j REDIRECT --to-ports 15053"
    );
    assert_eq!(counted.len(), 2, "the jump and the deciding rule");
    assert_eq!(rule_text(&rules[counted[0]]), "-A ISTIO_OUTPUT -j ISTIO_OUTPUT_DNS");
    let proxy = ConnFacts { uid: 1337, ..app };
    assert_eq!(
        rules[walk_output(&rules, &proxy).0.unwrap()].target_kind(),
        Some(Target::Return)
    );
    let other = ConnFacts {
        dst_addr: ip("10.96.0.11"),
        ..app
    };
    assert_eq!(
        rules[walk_output(&rules, &other).0.unwrap()].target_kind(),
        Some(Target::Redirect)
    );
    // The proxy's TCP query to a resolver in its own pod is not sent to its inbound port.
    let to_self = ConnFacts {
        dst_addr: ip("10.200.0.1"),
        out_lo: true,
        uid: 1337,
        ..app
    };
    assert_eq!(
        rules[walk_output(&rules, &to_self).0.unwrap()].target_kind(),
        Some(Target::Return)
    );
    // No resolver of the family: no jump in ip6tables' chain.
    assert!(
        !rules
            .iter()
            .any(|r| r.family == Family::V6 as u8 && r.target == Target::JumpDns as u8)
    );
}

/// `ISTIO_OUTBOUND_OWNER_GROUPS=a,b`: one rule, RETURN for a socket of neither group.
#[test]
fn owner_groups_only_returns_the_others() {
    let cfg = CaptureConfig {
        owner_groups: config::parse_owner_groups("java,202", "").unwrap(),
        ..CaptureConfig::default()
    };
    let rules = compile(&cfg).unwrap();
    let groups = ["java", "202"];
    let texts: Vec<String> = rules
        .iter()
        .map(|r| {
            rule_text_named(
                r,
                &super::Names {
                    groups: &groups,
                    ifaces: &[],
                },
            )
        })
        .collect();
    assert!(texts.contains(&"-A ISTIO_OUTPUT -m owner ! --gid-owner java -m owner ! --gid-owner 202 -j RETURN".into()));
    let w = workload(&cfg, &pack(&rules, &[]).unwrap(), 0, Serving::default());
    assert_eq!(w.n_owner_groups, 2);
    assert!(w.in_owner_groups(202) && !w.in_owner_groups(7));
    let remote = ConnFacts {
        family: Family::V4 as u8,
        proto: IPPROTO_TCP,
        dst_addr: ip("10.200.0.2"),
        dst_port: 80,
        src_addr: addr::UNSPECIFIED,
        out_lo: false,
        uid: 0,
        gid: 7,
        in_owner_groups: w.in_owner_groups(7),
        ifaces: 0,
        mark: 0,
        established: false,
    };
    assert_eq!(
        rules[walk_output(&rules, &remote).0.unwrap()].target_kind(),
        Some(Target::Return)
    );
    let member = ConnFacts {
        gid: 202,
        in_owner_groups: true,
        ..remote
    };
    assert_eq!(
        rules[walk_output(&rules, &member).0.unwrap()].target_kind(),
        Some(Target::Redirect)
    );
}

/// `--compatibility-version 1.12`: `-b '*'` also leaves SSH alone, right after the tunnel
/// port, as istio-iptables did up to 1.12.
#[test]
fn compatibility_version_brings_back_the_ssh_return() {
    let old = CaptureConfig {
        compat: config::parse_compat("v", "1.12").unwrap(),
        ..CaptureConfig::default()
    };
    let inbound: Vec<String> = compile(&old)
        .unwrap()
        .iter()
        .filter(|r| r.chain == ChainId::Inbound as u8 && r.family == Family::V4 as u8)
        .map(rule_text)
        .collect();
    assert_eq!(inbound[1], "-A ISTIO_INBOUND -p tcp -m tcp --dport 22 -j RETURN");
    assert_eq!(inbound[2], "-A ISTIO_INBOUND -p tcp -m tcp --dport 15090 -j RETURN");
    let now = compile(&CaptureConfig::default()).unwrap();
    assert!(!now.iter().any(|r| r.dport == 22));
}
