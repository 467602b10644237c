use super::*;
use crate::{ConnFacts, config};

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

fn output(rules: &[Rule]) -> impl Iterator<Item = &Rule> {
    rules.iter().filter(|r| r.chain == ChainId::Output as u8)
}

fn ip(s: &str) -> u32 {
    u32::from(s.parse::<Ipv4Addr>().unwrap()).to_be()
}

fn first_match(rules: &[Rule], c: &ConnFacts) -> Option<usize> {
    rules.iter().position(|r| r.matches(c))
}

#[test]
fn default_chain_decides_like_the_rule_set() {
    let rules = compile(&CaptureConfig::default()).unwrap();
    let base = ConnFacts {
        proto: IPPROTO_TCP,
        dst_addr: ip("10.200.0.2"),
        dst_port: 80,
        src_addr: 0,
        out_lo: false,
        uid: 0,
        gid: 0,
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
        compile(cfg)
            .unwrap()
            .iter()
            .filter(|r| r.chain == ChainId::Inbound as u8)
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
    let text = iptables_save(&nat_table(&none, &compile(&none).unwrap()));
    assert!(!text.contains("PREROUTING -p tcp"), "{text}");
}

/// The default injection's nat table as istio-iptables writes it (the reference's listing,
/// in iptables-save order and spelling).
#[test]
fn default_nat_table_is_istio_iptables_output() {
    let cfg = CaptureConfig::default();
    let rules = compile(&cfg).unwrap();
    let lines = nat_table(&cfg, &rules);
    let mut want = std::vec![
        "-A PREROUTING -p tcp -j ISTIO_INBOUND",
        "-A OUTPUT -j ISTIO_OUTPUT",
        "-A ISTIO_INBOUND -p tcp -m tcp --dport 15008 -j RETURN",
        "-A ISTIO_INBOUND -p tcp -m tcp --dport 15090 -j RETURN",
        "-A ISTIO_INBOUND -p tcp -m tcp --dport 15021 -j RETURN",
        "-A ISTIO_INBOUND -p tcp -m tcp --dport 15020 -j RETURN",
        "-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT",
        "-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
    ];
    want.extend(DEFAULT_OUTPUT);
    want.push("-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001");
    let got: Vec<&str> = lines.iter().map(|l| l.text.as_str()).collect();
    assert_eq!(got, want);
    // Slots are indices into the compiled list, whichever order the chains print in.
    for l in &lines {
        if let Some(slot) = l.slot {
            assert_eq!(rule_text(&rules[slot]), l.text);
        }
    }
    assert_eq!(lines[2].slot, Some(DEFAULT_OUTPUT.len()));
    assert_eq!(lines[8].slot, Some(0));
    let save = iptables_save(&lines);
    assert!(save.starts_with("*nat\n:PREROUTING ACCEPT [0:0]\n"), "{save}");
    assert!(save.ends_with("COMMIT\n"), "{save}");
}

#[test]
fn a_workload_entry_carries_the_chain_ports_counter_block_and_serving_flags() {
    let cfg = CaptureConfig::default();
    let rules = compile(&cfg).unwrap();
    let w = workload(&cfg, &rules, 3, Serving::default());
    assert_eq!(w.rules(), &rules[..]);
    assert_eq!((w.outbound_port, w.inbound_port), (15001, 15006));
    assert_eq!(w.counter_base, 3 * MAX_RULES as u32);
    assert_eq!(w.flags, workload_flags::INBOUND);
    let own = Serving {
        own_proxy: true,
        fast_path: true,
    };
    assert_eq!(
        workload(&cfg, &rules, 0, own).flags,
        workload_flags::INBOUND | workload_flags::WORKLOAD_LISTENER | workload_flags::FAST_PATH
    );
    assert_eq!((w.cgroup_id, w.cgroup_level), (0, 0));
}

#[test]
fn oversized_flags_are_refused() {
    let cidrs = (0..70).map(|i| format!("10.{i}.0.0/16")).collect::<Vec<_>>().join(",");
    let cfg = CaptureConfig {
        outbound_exclude_cidrs: config::parse_cidrs("-x", &cidrs).unwrap(),
        ..CaptureConfig::default()
    };
    assert!(compile(&cfg).unwrap_err().to_string().contains("at most 64"));
}
