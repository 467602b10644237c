use super::*;

#[test]
fn enroll_flags_parse_as_runs_do() {
    let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let (c, _) = parse_args(&args(&["-p", "15101", "-b", "8080"])).unwrap();
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

fn env_of(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
    move |k| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
}

/// istio-iptables' precedence: the flag, then the later of two variables, then the default.
#[test]
fn environment_fills_what_the_flags_leave_out() {
    let env = env_of(&[
        ("ISTIO_INBOUND_PORTS", "8080"),
        ("PROXY_UID", "3"),
        ("DROP_INVALID", "false"),
        ("INVALID_DROP", "true"),
        ("ISTIO_OUTBOUND_OWNER_GROUPS", "202"),
        ("ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR", "127.0.0.1/8"),
        ("REDIRECT_DNS", "true"),
        ("ISTIO_META_DNS_CAPTURE", ""),
        ("CAPTURE_ALL_DNS", "true"),
        ("ENVOY_PORT", "1"),
    ]);
    let flags = CaptureFlags {
        proxy_uid: Some("7".into()),
        ..CaptureFlags::default()
    };
    let c = flags.to_config_with(&env).unwrap();
    assert_eq!(c.inbound_ports, config::Include::List(vec![8080]));
    assert_eq!(c.proxy_uids, [7], "the flag wins");
    assert_eq!(c.proxy_gids, [7]);
    assert!(c.drop_invalid, "INVALID_DROP wins over DROP_INVALID");
    assert_eq!(c.envoy_port, 15001, "-p has no variable");
    assert!(matches!(&c.owner_groups, config::OwnerGroups::Only(g) if g[0].gid == Some(202)));
    assert_eq!(c.ipv4_loopback.to_string(), "127.0.0.0/8");
    assert!(c.dns.redirect, "an empty later variable leaves the earlier one's value");
    let e = CaptureFlags::default()
        .to_config_with(&env_of(&[("INBOUND_CAPTURE_PORT", "http")]))
        .unwrap_err();
    assert!(
        e.to_string().contains("INBOUND_CAPTURE_PORT") && e.to_string().contains("'http'"),
        "{e}"
    );
    // A node enrollment reads no environment.
    assert_eq!(
        CaptureFlags::default().to_config().unwrap().inbound_ports,
        config::Include::All
    );
}

/// Every mode is accepted, in every combination; a kernel table for TPROXY's route is refused
/// by name; DNS capture takes its resolvers from the resolv.conf named, and with none is off
/// (as in istio-iptables).
#[test]
fn every_mode_is_accepted_and_kernel_tables_are_refused_by_name() {
    let dir = std::env::temp_dir().join(format!("redirect-flags-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let empty = dir.join("empty.conf");
    let one = dir.join("one.conf");
    std::fs::write(&empty, "search x\n").unwrap();
    std::fs::write(&one, "nameserver 10.96.0.10\n").unwrap();
    let with = |a: &[&str]| {
        let mut v: Vec<String> = a.iter().map(|s| s.to_string()).collect();
        v.insert(0, "-b".into());
        v.insert(1, "*".into());
        parse_args(&v).map(|(c, _)| c)
    };
    assert!(with(&["-m", "TPROXY"]).is_ok());
    assert!(
        with(&["-m", "TPROXY", "-r", "255"])
            .unwrap_err()
            .contains("255 is one of the kernel's own tables")
    );
    // Only TPROXY mode installs a route there.
    assert!(with(&["-r", "255"]).is_ok());
    assert!(with(&["-c", "eth1,veth+"]).is_ok());
    assert!(with(&["-k", "eth1,tap+"]).is_ok());
    assert!(with(&["-k", "eth1", "-m", "TPROXY"]).is_ok());
    // Commands, not settings: an enrollment names the command that does it.
    assert!(with(&["--dry-run"]).unwrap_err().contains("explain"));
    assert!(with(&["--cleanup-only=true"]).unwrap_err().contains("unenroll"));
    assert!(with(&["--reconcile", "--cni-mode", "--dual-stack"]).is_ok());
    // Nothing to carry out: no packet is NATed (redirect-common's `DROP_INVALID_BY`).
    assert!(with(&["--drop-invalid"]).is_ok());
    let dns = with(&["--redirect-dns", "--resolv-conf", one.to_str().unwrap()]).unwrap();
    assert_eq!(dns.dns.servers_v4, [std::net::Ipv4Addr::new(10, 96, 0, 10)]);
    assert!(
        !with(&["--redirect-dns", "--resolv-conf", empty.to_str().unwrap()])
            .unwrap()
            .dns
            .enabled()
    );
    let missing = dir.join("missing.conf");
    let e = with(&["--redirect-dns"]).unwrap_err();
    assert!(
        e.contains("--resolv-conf"),
        "a node enrollment names the workload's: {e}"
    );
    assert!(with(&["--redirect-dns", "--capture-all-dns"]).is_ok());
    let e = with(&["--redirect-dns", "--resolv-conf", missing.to_str().unwrap()]).unwrap_err();
    assert!(e.contains("missing.conf"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--fast-path` alone is `on` (as before it took a value), none is `auto`, and a value goes
/// after `=` only, so that the next argument is never taken for one.
#[test]
fn fast_path_takes_an_optional_value() {
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        f: FastPathFlags,
        rest: Vec<String>,
    }
    let parse = |a: &[&str]| {
        <Cli as clap::Parser>::try_parse_from(std::iter::once("x").chain(a.iter().copied()))
            .map(|c| (c.f.fast_path, c.rest))
    };
    assert_eq!(parse(&[]).unwrap().0, FastPathWhen::Auto);
    assert_eq!(parse(&["--fast-path"]).unwrap().0, FastPathWhen::On);
    assert_eq!(parse(&["--fast-path=off"]).unwrap().0, FastPathWhen::Off);
    assert_eq!(
        parse(&["--fast-path", "off"]).unwrap(),
        (FastPathWhen::On, vec!["off".to_owned()])
    );
    let err = parse(&["--fast-path=maybe"]).err().unwrap().to_string();
    assert!(err.contains("'maybe'") && err.contains("auto, on, off"), "{err}");
}

/// `-c` and `-k` share the programs' 32-bit interface mask: 32 names in all are taken, a 33rd
/// is refused with both flags' share named.
#[test]
fn interface_lists_share_thirty_two_entries() {
    let names = |p: &str, n: usize| (0..n).map(|i| format!("{p}{i}")).collect::<Vec<_>>().join(",");
    let args = |c: usize, k: usize| vec!["-c".to_owned(), names("c", c), "-k".to_owned(), names("k", k)];
    assert!(parse_args(&args(16, 16)).is_ok());
    let err = parse_args(&args(16, 17)).unwrap_err();
    assert!(
        err.contains("-k/--kube-virt-interfaces") && err.contains("16, at most 32"),
        "{err}"
    );
}

/// `--mode ambient`: istio-cni's few settings, none of istio-iptables' (and none of its
/// environment), and each mode's own settings refused in the other.
#[test]
fn ambient_mode_takes_its_own_settings_only() {
    let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let (c, _) = parse_args(&args(&["--mode", "ambient"])).unwrap();
    let ambient = c.ambient.clone().expect("ambient");
    assert_eq!(ambient.probe_snat_v4, config::DEFAULT_PROBE_SNAT_V4);
    assert_eq!(
        (c.envoy_port, c.inbound_capture_port, c.inbound_tunnel_port),
        (15001, 15006, 15008)
    );
    assert!(c.proxy_uids.is_empty() && !c.dns.redirect && !c.inbound_ports.is_empty());
    let (c, _) = parse_args(&args(&[
        "--mode",
        "ambient",
        "--redirect-dns",
        "--bypass-inbound-capture",
        "--reroute-virtual-interfaces",
        "vm0",
        "--host-probe-snat",
        "10.200.7.127",
    ]))
    .unwrap();
    assert!(c.dns.redirect && c.dns.capture_all && c.inbound_ports.is_empty());
    assert_eq!(c.kube_virt_interfaces.len(), 1);
    assert_eq!(
        c.ambient.unwrap().probe_snat_v4,
        std::net::Ipv4Addr::new(10, 200, 7, 127)
    );

    let refused = |a: &[&str], says: &str| {
        let e = parse_args(&args(a)).unwrap_err();
        assert!(e.contains(says), "{a:?}: {e}");
    };
    refused(
        &["--mode", "ambient", "-u", "1337"],
        "-u/--proxy-uid: expected no value with --mode ambient",
    );
    refused(&["--mode", "ambient", "-b", "8080"], "-b/--istio-inbound-ports");
    refused(
        &["--mode", "ambient", "--host-probe-snat", "::1"],
        "expected a unicast IPv4 address",
    );
    refused(
        &["--mode", "ambient", "--host-probe-v6-snat", "x"],
        "expected a unicast IPv6 address",
    );
    for (flag, value) in [
        ("--host-probe-snat", "127.0.0.1"),
        ("--host-probe-snat", "0.0.0.0"),
        ("--host-probe-snat", "255.255.255.255"),
        ("--host-probe-snat", "224.0.0.1"),
        ("--host-probe-v6-snat", "::1"),
        ("--host-probe-v6-snat", "::"),
        ("--host-probe-v6-snat", "ff02::1"),
        ("--host-probe-v6-snat", "fe80::7"),
        ("--host-probe-v6-snat", "::ffff:169.254.7.127"),
    ] {
        refused(
            &["--mode", "ambient", flag, value],
            &format!("{flag}: expected a unicast"),
        );
    }
    refused(&["--bypass-inbound-capture"], "only with --mode ambient");
    refused(
        &[
            "--mode",
            "ambient",
            "--redirect-dns",
            "--resolv-conf",
            "/nonexistent/resolv.conf",
        ],
        "--resolv-conf: expected a readable resolv.conf",
    );
    refused(&["--mode", "ztunnel"], "expected sidecar or ambient");

    // istio-iptables' variables do not reach ambient's rules.
    let flags = CaptureFlags {
        mode: ModeFlags {
            mode: Some("ambient".into()),
            ..ModeFlags::default()
        },
        ..CaptureFlags::default()
    };
    let c = flags
        .to_config_with(&env_of(&[("REDIRECT_DNS", "true"), ("PROXY_UID", "3")]))
        .unwrap();
    assert!(!c.dns.redirect && c.proxy_uids.is_empty());
}
