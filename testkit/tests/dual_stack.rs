//! The kit's own check of its dual-stack pieces against the real kernel, with no agent: a
//! namespace pair, servers on IPv4 and IPv6 addresses, and probes over AF_INET, AF_INET6 to a
//! v4-mapped address and AF_INET6 to an IPv6 one. Needs root, as every
//! integration test of the project does (`cargo xtask test` runs them as root).

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    path::Path,
    process::Command,
};

use redirect_testkit::{
    netns::{NamedNetns, NetnsPair},
    probe::ProbeSpec,
    report::{Outcome, ProbeResult},
    serve::ServeProcess,
    server::TestServer,
};

fn testkit() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_redirect-testkit"))
}

fn require_root() {
    // SAFETY: geteuid takes nothing and cannot fail.
    assert_eq!(unsafe { libc::geteuid() }, 0, "needs root (namespaces, veth)");
}

fn probe(spec: &ProbeSpec) -> ProbeResult {
    let r = spec.run(testkit()).unwrap_or_else(|e| panic!("probe {spec:?}: {e}"));
    println!("{}", serde_json::to_string(&r).unwrap());
    r
}

fn exchanged(r: &ProbeResult, server: &str) {
    assert_eq!(r.outcome, Outcome::Ok, "{r:?}");
    assert!(
        r.intact && r.received == r.sent && r.sent > 0,
        "bytes did not come back: {r:?}"
    );
    assert_eq!(r.banner_field("name"), Some(server), "{r:?}");
}

/// `ip6tables`/`iptables` in a namespace.
fn nat(ns: &NamedNetns, tool: &str, rule: &[&str]) {
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.name, tool, "-t", "nat"])
        .args(rule)
        .output()
        .expect("ip netns exec");
    assert!(
        out.status.success(),
        "{tool} {rule:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_pair_is_dual_stack_and_the_probe_dials_either_family() {
    require_root();
    let pair = NetnsPair::create("ds").expect("namespaces");
    assert_eq!(pair.workload_ip6, "fd00:200:0:1::1".parse::<Ipv6Addr>().unwrap());
    assert_eq!(pair.remote_ip6, "fd00:200:0:1::2".parse::<Ipv6Addr>().unwrap());
    let v6 = |ip, port| SocketAddrV6::new(ip, port, 0, 0);
    let _remote4 = TestServer::start(&pair.remote, SocketAddrV4::new(pair.remote_ip, 8080), "remote4").unwrap();
    let remote6 = TestServer::start(&pair.remote, v6(pair.remote_ip6, 8080), "remote6").unwrap();
    assert_eq!(remote6.addr.to_string(), "[fd00:200:0:1::2]:8080");
    // Servers as the workload's own process: a dual-stack listener and one on ::1.
    let listen: Vec<(String, SocketAddr)> = vec![
        ("any6".into(), "[::]:9080".parse().unwrap()),
        ("lo6".into(), "[::1]:9081".parse().unwrap()),
    ];
    let _app = ServeProcess::start(testkit(), None, &pair.workload.path, &listen).unwrap();
    let from_workload = |to: SocketAddr| ProbeSpec::outside(&pair.workload.path, to);

    // AF_INET, as always.
    let r = probe(&from_workload(SocketAddrV4::new(pair.remote_ip, 8080).into()));
    exchanged(&r, "remote4");
    assert_eq!(r.peer.as_deref(), Some("10.200.1.2:8080"));
    assert_eq!(r.local_addr().unwrap().ip(), Ipv4Addr::new(10, 200, 1, 1));
    assert_eq!(r.dialed.as_deref(), Some("10.200.1.2:8080"));

    // AF_INET6 to an IPv6 address.
    let r = probe(&from_workload(v6(pair.remote_ip6, 8080).into()));
    exchanged(&r, "remote6");
    assert_eq!(r.peer.as_deref(), Some("[fd00:200:0:1::2]:8080"));
    assert!(r.local.as_deref().unwrap().starts_with("[fd00:200:0:1::1]:"), "{r:?}");
    assert_eq!(r.banner_field("local"), Some("[fd00:200:0:1::2]:8080"));
    assert_eq!(r.banner_field("peer"), r.local.as_deref());
    let bound = probe(&from_workload(v6(pair.remote_ip6, 8080).into()).bind(pair.workload_ip6));
    exchanged(&bound, "remote6");

    // AF_INET6 to the v4-mapped address of an IPv4 server: the probe reports the kernel's
    // v4-mapped addresses, the server (AF_INET) plain IPv4 ones.
    let r = probe(&from_workload(SocketAddrV4::new(pair.remote_ip, 8080).into()).v4_mapped());
    exchanged(&r, "remote4");
    assert_eq!(r.dialed.as_deref(), Some("[::ffff:10.200.1.2]:8080"));
    assert_eq!(r.peer.as_deref(), Some("[::ffff:10.200.1.2]:8080"));
    assert!(r.local.as_deref().unwrap().starts_with("[::ffff:10.200.1.1]:"), "{r:?}");
    assert_eq!(r.banner_field("local"), Some("10.200.1.2:8080"));
    let port = r.local_addr().unwrap().port();
    assert_eq!(
        r.banner_addr("peer"),
        Some(SocketAddrV4::new(pair.workload_ip, port).into())
    );
    let bound = probe(
        &from_workload(SocketAddrV4::new(pair.remote_ip, 8080).into())
            .v4_mapped()
            .bind(pair.workload_ip),
    );
    exchanged(&bound, "remote4");
    assert!(
        bound.local.as_deref().unwrap().starts_with("[::ffff:10.200.1.1]:"),
        "{bound:?}"
    );

    // The dual-stack listener sees an IPv4 client v4-mapped; ::1 answers over AF_INET6.
    let r = probe(&from_workload(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9080).into()));
    exchanged(&r, "any6");
    assert_eq!(r.banner_field("local"), Some("[::ffff:127.0.0.1]:9080"));
    assert_eq!(r.peer.as_deref(), Some("127.0.0.1:9080"));
    let r = probe(&from_workload(v6(Ipv6Addr::LOCALHOST, 9081).into()));
    exchanged(&r, "lo6");
    assert_eq!(r.peer.as_deref(), Some("[::1]:9081"));

    // UDP connect() in both families.
    let r = probe(&from_workload(v6(pair.remote_ip6, 53).into()).udp());
    assert_eq!(r.outcome, Outcome::Ok, "{r:?}");
    assert_eq!(r.peer.as_deref(), Some("[fd00:200:0:1::2]:53"));
    let r = probe(
        &from_workload(SocketAddrV4::new(pair.remote_ip, 53).into())
            .udp()
            .v4_mapped(),
    );
    assert_eq!(r.peer.as_deref(), Some("[::ffff:10.200.1.2]:53"));
    assert!(r.local.as_deref().unwrap().starts_with("[::ffff:10.200.1.1]:"), "{r:?}");

    // The probe's own socket, which nobody redirected: the original destination query finds
    // nothing, asked as SO_ORIGINAL_DST on AF_INET and IP6T_SO_ORIGINAL_DST on AF_INET6.
    for spec in [
        from_workload(SocketAddrV4::new(pair.remote_ip, 8080).into()),
        from_workload(SocketAddrV4::new(pair.remote_ip, 8080).into()).v4_mapped(),
        from_workload(v6(pair.remote_ip6, 8080).into()),
    ] {
        let r = probe(&spec.sockopts());
        let s = r.sockopts.as_ref().unwrap_or_else(|| panic!("{r:?}"));
        assert_eq!(s.orig_dst_errno, Some(libc::ENOENT), "{r:?}");
        assert!(s.tcp_info_len > 0 && s.peer_groups_intact, "{r:?}");
    }

    // Nobody listens: refused, in either family.
    let r = probe(&from_workload(v6(pair.remote_ip6, 1).into()));
    assert_eq!(r.outcome, Outcome::Refused, "{r:?}");

    // The servers' original destination, as conntrack answers it after a REDIRECT: through
    // IP6T_SO_ORIGINAL_DST on an AF_INET6 socket, SO_ORIGINAL_DST on an AF_INET one.
    nat(
        &pair.remote,
        "ip6tables",
        &[
            "-A",
            "PREROUTING",
            "-p",
            "tcp",
            "--dport",
            "8081",
            "-j",
            "REDIRECT",
            "--to-ports",
            "8080",
        ],
    );
    nat(
        &pair.remote,
        "iptables",
        &[
            "-A",
            "PREROUTING",
            "-p",
            "tcp",
            "--dport",
            "8081",
            "-j",
            "REDIRECT",
            "--to-ports",
            "8080",
        ],
    );
    let r = probe(&from_workload(v6(pair.remote_ip6, 8081).into()));
    exchanged(&r, "remote6");
    assert_eq!(r.banner_field("orig"), Some("[fd00:200:0:1::2]:8081"), "{r:?}");
    assert_eq!(r.banner_field("local"), Some("[fd00:200:0:1::2]:8080"), "{r:?}");
    let r = probe(&from_workload(SocketAddrV4::new(pair.remote_ip, 8081).into()).v4_mapped());
    exchanged(&r, "remote4");
    assert_eq!(r.banner_field("orig"), Some("10.200.1.2:8081"), "{r:?}");
    assert_eq!(r.peer.as_deref(), Some("[::ffff:10.200.1.2]:8081"));
}

#[test]
fn a_sysctl_is_set_in_the_namespace_not_on_the_host() {
    require_root();
    let key = "net.ipv4.ip_unprivileged_port_start";
    let path = "/proc/sys/net/ipv4/ip_unprivileged_port_start";
    let host = std::fs::read_to_string(path).unwrap();
    let ns = NamedNetns::create(&redirect_testkit::unique("sysctl")).unwrap();
    let want = if host.trim() == "1234" { "1235" } else { "1234" };
    ns.sysctl(key, want).unwrap();
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.name, "cat", path])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), want);
    assert_eq!(std::fs::read_to_string(path).unwrap(), host, "the host's changed");
    let disabled = Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns.name,
            "cat",
            "/proc/sys/net/ipv6/conf/lo/disable_ipv6",
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&disabled.stdout).trim(), "0");
}
