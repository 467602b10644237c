//! Dual stack: an app is captured whichever socket family it connects with, each connection is
//! judged by the table its family would meet (iptables for IPv4, also when reached through a
//! v4-mapped AF_INET6 socket; ip6tables for IPv6), and the app sees the addresses it would see
//! behind REDIRECT: its original destination as peer, its pod address as its own.
//!
//! The namespaces are dual-stack (10.200.1.0/24 and fd00:200:0:1::/64, no default route).

use std::net::{IpAddr, SocketAddr};

use redirect_testkit::{report::ProbeResult, server::TestServer};
use redirect_tests::{APP_PORT, OUTBOUND_CAPTURE, Outcome, REMOTE_PORT, Workload, landing, proxied};

/// Connections per rule of ip6tables' `chain`.
fn v6_counts(w: &Workload, chain: &str) -> Vec<u64> {
    w.family_counts("ipv6", chain)
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// Proxied intact to `server`, and what the app saw: `peer` exactly (its original
/// destination), and its own address `local` (with the kernel's port).
fn captured(r: &ProbeResult, server: &str, peer: SocketAddr, local: IpAddr) {
    assert_eq!(landing(r), proxied(OUTBOUND_CAPTURE, server), "{r:?}");
    assert!(r.intact && r.sent == r.received && r.sent > 0, "{r:?}");
    assert_eq!(r.peer_addr(), Some(peer), "getpeername: {r:?}");
    assert_eq!(r.local_addr().map(|a| a.ip()), Some(local), "getsockname: {r:?}");
}

#[test]
fn every_socket_family_is_captured_and_counted_in_its_own_table() {
    let w = Workload::with_agent("dual", &[]);
    let _remote6 = TestServer::start(&w.pair.remote, w.remote6(REMOTE_PORT), "remote6").expect("IPv6 server");
    let pod4 = IpAddr::V4(w.pair.workload_ip);
    let last = |counts: Vec<u64>| *counts.last().unwrap();

    // AF_INET: iptables' ISTIO_OUTPUT, its last rule (-j ISTIO_REDIRECT).
    let r = w.probe(&w.spec(w.remote(REMOTE_PORT)).bytes(64 << 10));
    captured(&r, "remote", w.remote(REMOTE_PORT).into(), pod4);
    assert_eq!(r.kernel_peer.as_deref(), Some("127.0.0.1:15001"), "{r:?}");
    assert_eq!(last(w.counts()), 1);

    // AF_INET6 to ::ffff:10.200.1.2: IPv4 on the wire, so iptables' chain again.
    let r = w.probe(&w.spec(w.remote(REMOTE_PORT)).v4_mapped().bytes(64 << 10));
    let mapped = |ip: IpAddr| match ip {
        IpAddr::V4(v4) => IpAddr::V6(v4.to_ipv6_mapped()),
        v6 => v6,
    };
    captured(
        &r,
        "remote",
        SocketAddr::new(mapped(w.pair.remote_ip.into()), REMOTE_PORT),
        mapped(pod4),
    );
    assert_eq!(r.kernel_peer.as_deref(), Some("[::ffff:127.0.0.1]:15001"), "{r:?}");
    let v4 = w.counts();
    assert_eq!(last(v4.clone()), 2, "{v4:?}");
    assert_eq!(v4.iter().sum::<u64>(), 2, "{v4:?}");
    assert!(v6_counts(&w, "ISTIO_OUTPUT").iter().all(|&n| n == 0));

    // AF_INET6 to the remote's IPv6 address: ip6tables' ISTIO_OUTPUT, to [::1]:15001.
    let r = w.probe(&w.spec(w.remote6(REMOTE_PORT)).bytes(64 << 10));
    captured(&r, "remote6", w.remote6(REMOTE_PORT), IpAddr::V6(w.pair.workload_ip6));
    assert_eq!(r.kernel_peer.as_deref(), Some("[::1]:15001"), "{r:?}");
    // The proxy dialed from the workload's namespace: the remote sees the pod's address.
    let saw = r.banner_addr("peer").expect("banner peer");
    assert_eq!(saw.ip(), IpAddr::V6(w.pair.workload_ip6), "{r:?}");
    let v6 = v6_counts(&w, "ISTIO_OUTPUT");
    assert_eq!((last(v6.clone()), v6.iter().sum::<u64>()), (1, 1), "{v6:?}");
    assert_eq!(w.counts().iter().sum::<u64>(), 2, "IPv4 counters unchanged");

    // ::1 is ip6tables' `-d ::1/128 -j RETURN` (after the `-o lo` RETURN for this uid): direct.
    let lo6 = TestServer::start(&w.pair.workload, addr("[::1]:7070"), "lo6").expect("::1 server");
    let r = w.probe(&w.spec(addr("[::1]:7070")));
    assert_eq!(landing(&r), redirect_tests::direct("lo6"), "{r:?}");
    drop(lo6);
}

#[test]
fn ipv6_connections_from_another_host_are_captured_inbound() {
    let w = Workload::with_agent("dual-in", &[]);
    let _app6 = TestServer::start(&w.pair.workload, w.pod6(APP_PORT), "app6").expect("IPv6 app");
    let r = w.probe(&w.from_remote(w.pod6(APP_PORT)));
    assert_eq!(r.outcome, Outcome::Ok, "{r:?}");
    assert_eq!(r.banner_field("name"), Some("app6"), "{r:?}");
    // The proxy connected to the app from ::6 (ISTIO_OUTPUT's first rule lets it by).
    let from = r.banner_addr("peer").expect("banner peer");
    assert_eq!(from.ip(), "::6".parse::<IpAddr>().unwrap(), "{r:?}");
    let inbound = v6_counts(&w, "ISTIO_INBOUND");
    assert_eq!(*inbound.last().unwrap(), 1, "{inbound:?}");
    assert!(w.chain_counts("ISTIO_INBOUND").iter().all(|&n| n == 0));
    // The remote host connected to the app's address and sees it as its peer.
    assert_eq!(r.peer_addr(), Some(w.pod6(APP_PORT)), "{r:?}");
}

/// istio-iptables installs ip6tables rules only for a pod with an IPv6 address: without one,
/// IPv6 connects are the kernel's business (here: no route), and IPv4 through AF_INET6 sockets
/// is still captured.
#[test]
fn a_workload_without_ipv6_leaves_ipv6_to_the_kernel() {
    let mut w = Workload::new("v4only");
    let v6 = format!("{}/64", w.pair.workload_ip6);
    w.pair
        .workload
        .ip(&["-6", "addr", "del", &v6, "dev", "w0"])
        .expect("remove the IPv6 address");
    w.start_agent(&[]).expect("agent starts");
    let r = w.probe(&w.spec(w.remote6(REMOTE_PORT)));
    assert_eq!(r.outcome, Outcome::Unreachable, "not captured, so no route: {r:?}");
    assert!(v6_counts(&w, "ISTIO_OUTPUT").iter().all(|&n| n == 0));
    let r = w.probe(&w.spec(w.remote(REMOTE_PORT)).v4_mapped());
    assert_eq!(landing(&r), proxied(OUTBOUND_CAPTURE, "remote"), "{r:?}");
}

/// Node mode through the CNI plugin: a dual-stack pod (its prevResult carries both families'
/// addresses) with an IPv6 CIDR in its excludeOutboundIPRanges annotation. The exclusion lands
/// in ip6tables' chain only; IPv4, v4-mapped and the rest of IPv6 are captured; the metrics
/// count each in its own table.
#[test]
fn a_dual_stack_pod_enrolled_through_cni_takes_each_familys_cidrs() {
    use redirect_tests::node::NodeAgent;
    use serde_json::json;

    let agent = NodeAgent::new("node-ds", &[]);
    let _node = agent.start().expect("node agent starts");
    let w = Workload::new_on("nds", 31);
    let _remote6 = TestServer::start(&w.pair.remote, w.remote6(REMOTE_PORT), "remote6").expect("IPv6 server");
    let excluded = format!("{}/128", w.pair.remote_ip6);
    let mut conf = agent.cni_conf(json!({ "traffic.sidecar.istio.io/excludeOutboundIPRanges": excluded }));
    conf["prevResult"]["ips"] = json!([
        { "address": format!("{}/24", w.pair.workload_ip), "interface": 0 },
        { "address": format!("{}/64", w.pair.workload_ip6), "interface": 0 }
    ]);
    let out = agent.cni("ADD", "pod-ds", Some(&w.pair.workload.path), &conf);
    assert!(out.status.success(), "ADD: {:?} {}", out.stdout, out.stderr);
    assert_eq!(out.stdout, conf["prevResult"]);

    let landed = |spec| landing(&w.probe(&spec));
    assert_eq!(
        landed(w.spec(w.remote(REMOTE_PORT))),
        proxied(OUTBOUND_CAPTURE, "remote")
    );
    assert_eq!(
        landed(w.spec(w.remote(REMOTE_PORT)).v4_mapped()),
        proxied(OUTBOUND_CAPTURE, "remote")
    );
    // The remote's IPv6 address is excluded (-x, ip6tables' table only): direct.
    assert_eq!(
        landed(w.spec(w.remote6(REMOTE_PORT))),
        redirect_tests::direct("remote6")
    );

    let (_, text) = agent.scrape("/metrics").expect("metrics");
    let count = |family: &str, rule: usize| -> u64 {
        let prefix = format!(
            "redirect_rule_connections_total{{workload=\"pod-ds\",family=\"{family}\",table=\"nat\",chain=\"ISTIO_OUTPUT\",rule=\"{rule}\","
        );
        text.lines()
            .find(|l| l.starts_with(&prefix))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or_else(|| panic!("no {prefix} in:\n{text}"))
    };
    // The plugin's flags open ISTIO_OUTPUT with istio-cni's `-o 15020` (a tcp and a udp
    // RETURN). iptables: rule 11 is -j ISTIO_REDIRECT (the CIDR is not IPv4: no -d rule there).
    assert_eq!(count("ipv4", 11), 2, "{text}");
    // ip6tables: 10 is -d ::1/128 RETURN, 11 the excluded CIDR, 12 -j ISTIO_REDIRECT.
    assert_eq!((count("ipv6", 11), count("ipv6", 12)), (1, 0), "{text}");

    let out = agent.cni("DEL", "pod-ds", Some(&w.pair.workload.path), &conf);
    assert!(out.status.success(), "DEL: {}", out.stderr);
    assert_eq!(
        landed(w.spec(w.remote(REMOTE_PORT)).v4_mapped()),
        redirect_tests::direct("remote")
    );
}
