//! Dual stack's edges: cases where ip6tables (or the rule budget) behaves differently from the
//! IPv4 case, each found by running the scenario against istio-iptables' own rules (loaded with
//! ip6tables-restore from `redirect-agent explain --family ipv6`) in a twin namespace. Each
//! test states what the kernel did under the real rules.

use std::{
    io::{BufReader, Read as _},
    net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6, TcpStream},
    process::Command,
    time::Duration,
};

use redirect_testkit::{
    netns::{NamedNetns, NetnsPair},
    server::{TestServer, read_banner},
    unique,
};
use redirect_tests::{OUTBOUND_CAPTURE, REMOTE_PORT, Workload, agent_cmd, direct, landing, proxied};

/// A port only these tests listen on, for an IPv6 app (the kit's app is IPv4 on 9080).
const APP6_PORT: u16 = 9091;

/// Each family has its own 64-rule budget, as each has its own table: flags that compile to
/// 34 iptables rules (and 34 ip6tables ones, the port lists being in both) are not refused.
#[test]
fn flags_that_fit_before_dual_stack_still_fit() {
    let ports = (30001..=30010).map(|p| p.to_string()).collect::<Vec<_>>().join(",");
    let out = agent_cmd(&["explain", "-o", &ports]);
    assert!(
        out.status.success(),
        "explain -o <10 ports>: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// ip6tables: an unbound socket dialing `::6` gets `::6` as its source (the address itself),
/// so `-o lo -s ::6/128 -j RETURN` (ISTIO_OUTPUT's first rule) lets it by, even for uid 1337:
/// connect6 judges the chain with the source routing picks, not the unbound `::`.
#[test]
fn uid_1337_dialing_the_ipv6_passthrough_address_is_returned_by_the_source_rule() {
    let w = Workload::with_agent("rv-pass6", &[]);
    let _app6 = TestServer::start(
        &w.pair.workload,
        SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), APP6_PORT),
        "app6",
    )
    .expect("IPv6 app");
    let to: SocketAddr = SocketAddr::new("::6".parse::<IpAddr>().unwrap(), APP6_PORT);
    let r = w.probe(&w.spec(to).uid(1337).gid(1337));
    // Under ip6tables: local [::6]:N, straight to the app.
    assert_eq!(r.local_addr().map(|a| a.ip()), Some("::6".parse().unwrap()), "{r:?}");
    assert_eq!(landing(&r), direct("app6"), "{r:?}");
}

/// IPv6 does not refuse a loopback source on the route lookup the way IPv4 does (EINVAL):
/// under ip6tables a socket bound to `::1` dialing another host is REDIRECTed to [::1]:15001
/// and works, so connect6 must not apply IPv4's "a loopback source cannot leave" (left alone,
/// the SYN would leave w0 with source ::1 and time out).
#[test]
fn an_ipv6_socket_bound_to_loopback_dialing_out_is_captured() {
    let w = Workload::with_agent("rv-lo6", &[]);
    let _remote6 = TestServer::start(&w.pair.remote, w.remote6(REMOTE_PORT), "remote6").expect("IPv6 server");
    let r = w.probe(&w.spec(w.remote6(REMOTE_PORT)).bind(Ipv6Addr::LOCALHOST));
    assert_eq!(landing(&r), proxied(OUTBOUND_CAPTURE, "remote6"), "{r:?}");
}

/// `ip -n NS -6 -o addr show dev DEV scope link`: the link-local address of DEV.
fn link_local(ns: &NamedNetns, dev: &str) -> Ipv6Addr {
    let out = Command::new("ip")
        .args(["-n", &ns.name, "-6", "-o", "addr", "show", "dev", dev, "scope", "link"])
        .output()
        .expect("ip addr");
    let text = String::from_utf8_lossy(&out.stdout);
    let word = text
        .split_whitespace()
        .skip_while(|w| *w != "inet6")
        .nth(1)
        .unwrap_or_else(|| panic!("no link-local address on {dev}: {text}"));
    word.split('/').next().unwrap().parse().unwrap()
}

/// The ifindex of `dev` inside `ns`.
fn ifindex(ns: &NamedNetns, dev: &str) -> u32 {
    let out = Command::new("ip")
        .args(["-n", &ns.name, "-o", "link", "show", "dev", dev])
        .output()
        .expect("ip link");
    let text = String::from_utf8_lossy(&out.stdout);
    text.split(':').next().unwrap().trim().parse().unwrap()
}

/// ip6tables' `PREROUTING -p tcp -j ISTIO_INBOUND` sees every destination, the pod's
/// link-local address too: a connection from the link (the node, or any pod on the same
/// bridge) to [fe80::pod%eth0]:PORT is REDIRECTed to 15006. Link-local addresses name their
/// workload like any other, so sk_lookup hands the SYN to the capture listener:
/// the app is never reached around the proxy. (The embedded proxy cannot dial the link-local
/// original destination without its scope, so it resets the connection: visible, not open.)
#[test]
fn inbound_to_the_pods_ipv6_link_local_address_never_reaches_the_app_directly() {
    let w = Workload::with_agent("rv-ll6", &[]);
    let app6 = TestServer::start(
        &w.pair.workload,
        SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), APP6_PORT),
        "app6",
    )
    .expect("IPv6 app");
    // The kernel adds link-local addresses through DAD: give it time (bounded).
    let mut pod_ll = None;
    for _ in 0..50 {
        let ll = link_local(&w.pair.workload, "w0");
        let out = Command::new("ip")
            .args([
                "-n",
                &w.pair.workload.name,
                "-6",
                "-o",
                "addr",
                "show",
                "dev",
                "w0",
                "tentative",
            ])
            .output()
            .expect("ip addr");
        if out.stdout.is_empty() {
            pod_ll = Some(ll);
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let pod_ll = pod_ll.expect("w0's link-local address left DAD");
    let scope = ifindex(&w.pair.remote, "r0");
    let to = SocketAddrV6::new(pod_ll, APP6_PORT, 0, scope);
    let banner = w
        .pair
        .remote
        .open()
        .expect("remote netns")
        .run(|| -> std::io::Result<String> {
            let s = TcpStream::connect_timeout(&to.into(), Duration::from_secs(5))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            let mut r = BufReader::new(s);
            let b = read_banner(&mut r).unwrap_or_default();
            let _ = r.read_to_end(&mut Vec::new());
            Ok(b)
        });
    let direct_from_link: Vec<_> = app6
        .accepted()
        .into_iter()
        .filter(|p| matches!(p.ip(), IpAddr::V6(v6) if v6.is_unicast_link_local()))
        .collect();
    assert!(
        direct_from_link.is_empty(),
        "the app accepted {direct_from_link:?} straight from the link (banner {banner:?}): \
         ip6tables would have sent it to 15006"
    );
}

/// A pod whose second interface has a lower ifindex than its primary (a Multus network made
/// inside the namespace while eth0 was moved in from the host, so eth0 kept its high index):
/// routing picks the primary's address for a destination behind the primary, and so does the
/// agent (the main table mirrored in ROUTE_SOURCES), not the first address in the kernel's
/// order: getsockname and the proxy see what they would under NAT.
#[test]
fn a_secondary_interface_does_not_change_the_source_the_app_sees() {
    redirect_tests::require_root();
    let base = unique("rv-2nd");
    let workload = NamedNetns::create(&format!("{base}-w")).expect("netns");
    let remote = NamedNetns::create(&format!("{base}-r")).expect("netns");
    // The secondary first (ifindex 2/3), then the primary (4, with its peer in the remote).
    workload
        .ip(&["link", "add", "d0", "type", "veth", "peer", "name", "d1"])
        .expect("secondary veth");
    workload.ip(&["addr", "add", "10.200.233.1/24", "dev", "d0"]).unwrap();
    workload
        .ip(&["addr", "add", "fd00:200:0:233::1/64", "dev", "d0", "nodad"])
        .unwrap();
    workload.ip(&["link", "set", "d0", "up"]).unwrap();
    workload.ip(&["link", "set", "d1", "up"]).unwrap();
    let pair = NetnsPair::wire(workload, remote, 41).expect("the primary veth");
    let (workload_ip, workload_ip6) = (pair.workload_ip, pair.workload_ip6);
    let mut w = Workload::on_pair("rv-2nd", pair);
    w.start_agent(&[]).expect("agent starts");
    let _remote6 = TestServer::start(&w.pair.remote, w.remote6(REMOTE_PORT), "remote6").expect("IPv6 server");

    let r = w.probe(&w.spec(w.remote(REMOTE_PORT)));
    assert_eq!(landing(&r), proxied(OUTBOUND_CAPTURE, "remote"), "{r:?}");
    assert_eq!(
        r.local_addr().map(|a| a.ip()),
        Some(IpAddr::V4(workload_ip)),
        "the source routing picks for 10.200.41.2 (via w0): {r:?}"
    );
    let r = w.probe(&w.spec(w.remote6(REMOTE_PORT)));
    assert_eq!(landing(&r), proxied(OUTBOUND_CAPTURE, "remote6"), "{r:?}");
    assert_eq!(
        r.local_addr().map(|a| a.ip()),
        Some(IpAddr::V6(workload_ip6)),
        "the source routing picks for fd00:200:0:41::2 (via w0): {r:?}"
    );
}
