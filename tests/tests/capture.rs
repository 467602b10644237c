//! Outbound capture through connect4 and the embedded proxy, and the exemptions of the
//! default rule set, each landing where istio-iptables' ISTIO_OUTPUT would send it.

use std::net::{Ipv4Addr, SocketAddrV4};

use redirect_tests::{
    APP_PORT, INBOUND_CAPTURE, Landing, OUTBOUND_CAPTURE, Outcome, REMOTE_PORT, TUNNEL_PORT, Workload, direct, landing,
    proxied,
};

/// The server protocol answers only after the client's FIN, so "all bytes back" also proves
/// that the half-close crossed the proxy while the other direction stayed open.
#[test]
fn captured_connection_reaches_its_destination_through_the_proxy() {
    let w = Workload::with_agent("capture", &[]);
    let r = w.probe(&w.spec(w.remote(REMOTE_PORT)).bytes(1 << 20));
    assert_eq!(landing(&r), proxied(OUTBOUND_CAPTURE, "remote"), "{r:?}");
    assert_eq!((r.sent, r.received), (1 << 20, 1 << 20), "{r:?}");
    assert!(r.intact, "bytes changed on the way: {r:?}");
    // The proxy dials from inside the workload's namespace, so the remote host sees the pod.
    let saw: SocketAddrV4 = r.banner_field("peer").unwrap().parse().unwrap();
    assert_eq!(*saw.ip(), w.pair.workload_ip, "{r:?}");
    // Exactly one decision, on the last rule (-j ISTIO_REDIRECT).
    let counts = w.counts();
    assert_eq!(counts, [0, 0, 0, 0, 0, 0, 0, 0, 1], "{:#?}", w.stats());
    // `stats --json` speaks iptables: chain and target names, 1-based rule, iptables-save match.
    let out = redirect_tests::agent_cmd(&["stats", "--name", &w.name, "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let row = &json["rules"][1];
    assert_eq!(row["chain"], "ISTIO_OUTPUT");
    assert_eq!(row["rule"], 2);
    assert_eq!(row["target"], "ISTIO_IN_REDIRECT");
    assert_eq!(
        row["match"],
        "! -d 127.0.0.1/32 -o lo -p tcp -m tcp ! --dport 15008 -m owner --uid-owner 1337"
    );
    assert_eq!(json["rules"][8]["connections"], 1);
    assert_eq!(w.remote_server.accepted().len(), 1);
}

/// One scenario: who connects, from where, to what; where it must land; which rule decides.
struct Case {
    what: &'static str,
    uid: u32,
    gid: u32,
    bind: Option<Ipv4Addr>,
    to: SocketAddrV4,
    want: Landing,
    /// 1-based ISTIO_OUTPUT rule whose counter must move by one (and no other).
    rule: usize,
    /// Source address the server must see, when it matters.
    server_saw: Option<Ipv4Addr>,
}

#[test]
fn each_exemption_lands_where_the_rule_set_says() {
    let w = Workload::with_agent("exempt", &[]);
    let lo = |p| SocketAddrV4::new(Ipv4Addr::LOCALHOST, p);
    let passthrough = Ipv4Addr::new(127, 0, 0, 6);
    let cases = [
        Case {
            what: "app (uid 0) to a remote host: captured",
            uid: 0,
            gid: 0,
            bind: None,
            to: w.remote(REMOTE_PORT),
            want: proxied(OUTBOUND_CAPTURE, "remote"),
            rule: 9,
            server_saw: Some(w.pair.workload_ip),
        },
        Case {
            what: "proxy uid 1337 to a remote host: direct",
            uid: 1337,
            gid: 0,
            bind: None,
            to: w.remote(REMOTE_PORT),
            want: direct("remote"),
            rule: 4,
            server_saw: None,
        },
        Case {
            what: "proxy gid 1337 (uid 1000) to a remote host: direct",
            uid: 1000,
            gid: 1337,
            bind: None,
            to: w.remote(REMOTE_PORT),
            want: direct("remote"),
            rule: 7,
            server_saw: None,
        },
        Case {
            what: "uid 1337 from 127.0.0.6 to its own pod: direct",
            uid: 1337,
            gid: 0,
            bind: Some(passthrough),
            to: w.pod(APP_PORT),
            want: direct("app"),
            rule: 1,
            server_saw: Some(passthrough),
        },
        Case {
            what: "app to 127.0.0.1: direct",
            uid: 0,
            gid: 0,
            bind: None,
            to: lo(APP_PORT),
            want: direct("app"),
            rule: 3,
            server_saw: None,
        },
        Case {
            what: "proxy uid 1337 to 127.0.0.1: direct",
            uid: 1337,
            gid: 0,
            bind: None,
            to: lo(APP_PORT),
            want: direct("app"),
            rule: 4,
            server_saw: None,
        },
        Case {
            what: "app to 127.0.0.2 (loopback, not 127.0.0.1): direct",
            uid: 1000,
            gid: 1000,
            bind: None,
            to: SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 2), APP_PORT),
            want: direct("app"),
            rule: 3,
            server_saw: None,
        },
        Case {
            what: "app to 0.0.0.0 (routed to 127.0.0.1 over lo): direct",
            uid: 0,
            gid: 0,
            bind: None,
            to: SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, APP_PORT),
            want: direct("app"),
            rule: 3,
            server_saw: None,
        },
        Case {
            what: "proxy uid 1337 to 0.0.0.0 (is 127.0.0.1, not its pod): direct",
            uid: 1337,
            gid: 0,
            bind: None,
            to: SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, APP_PORT),
            want: direct("app"),
            rule: 4,
            server_saw: None,
        },
        Case {
            what: "app (non-proxy) to its own pod address: direct",
            uid: 0,
            gid: 0,
            bind: None,
            to: w.pod(APP_PORT),
            want: direct("app"),
            rule: 3,
            server_saw: None,
        },
        Case {
            what: "proxy uid 1337 to its own pod on 15008: direct",
            uid: 1337,
            gid: 0,
            bind: None,
            to: w.pod(TUNNEL_PORT),
            want: direct("tunnel"),
            rule: 4,
            server_saw: None,
        },
        Case {
            what: "proxy uid 1337 to its own pod: inbound capture, forwarded from 127.0.0.6",
            uid: 1337,
            gid: 0,
            bind: None,
            to: w.pod(APP_PORT),
            want: proxied(INBOUND_CAPTURE, "app"),
            rule: 2,
            server_saw: Some(passthrough),
        },
        Case {
            // Rule 3 (-o lo ! --uid-owner 1337) returns before the GID rules are reached.
            what: "gid 1337 with uid 1000 to its own pod: direct (uid rule 3 first)",
            uid: 1000,
            gid: 1337,
            bind: None,
            to: w.pod(APP_PORT),
            want: direct("app"),
            rule: 3,
            server_saw: Some(w.pair.workload_ip),
        },
    ];
    for c in &cases {
        let before = w.counts();
        let mut spec = w.spec(c.to).uid(c.uid).gid(c.gid);
        if let Some(b) = c.bind {
            spec = spec.bind(b);
        }
        let r = w.probe(&spec);
        println!("{:<72} {:?}", c.what, landing(&r));
        assert_eq!(landing(&r), c.want, "{}: {r:?}", c.what);
        assert!(r.intact, "{}: bytes changed: {r:?}", c.what);
        if let Some(ip) = c.server_saw {
            let saw: SocketAddrV4 = r.banner_field("peer").unwrap().parse().unwrap();
            assert_eq!(*saw.ip(), ip, "{}: server saw {saw}", c.what);
        }
        let after = w.counts();
        let mut want = before.clone();
        want[c.rule - 1] += 1;
        assert_eq!(after, want, "{}: counters before {before:?}", c.what);
    }
}

/// Traffic the proxy cannot serve fails at once with a reset, never a hang or a clean close.
#[test]
fn unreachable_destinations_are_reset() {
    let w = Workload::with_agent("reset", &[]);
    // Nothing listens on port 1 of the remote host: the upstream connect is refused.
    let r = w.probe(&w.spec(w.remote(1)));
    assert_reset_by_the_proxy(&r);
    assert_eq!(w.counts()[8], 1);
    // No route to 10.200.9.9 in the workload namespace (there is no default route).
    let r = w.probe(&w.spec(SocketAddrV4::new(Ipv4Addr::new(10, 200, 9, 9), 80)));
    assert_reset_by_the_proxy(&r);
    assert_eq!(w.counts()[8], 2);
}

/// Without the agent these would be refused or unreachable, not reset; redirected to a closed
/// capture port they would be refused, and closed by a proxy that gave up quietly. So a reset
/// of a connection the redirect rule counted is the proxy's. The reset can beat connect()
/// back to the client (then connect() itself fails and there is no peer to read), or the
/// socket table read after it (which then no longer lists the connection).
fn assert_reset_by_the_proxy(r: &redirect_testkit::report::ProbeResult) {
    assert_eq!(r.outcome, Outcome::Reset, "{r:?}");
    if r.kernel_peer.is_some() {
        assert_eq!(r.peer_port(), Some(OUTBOUND_CAPTURE), "{r:?}");
    }
}

/// Without the agent the same workload connects directly: the capture is the agent's doing.
#[test]
fn without_the_agent_nothing_is_captured() {
    let w = Workload::new("noagent");
    let r = w.probe(&w.spec(w.remote(REMOTE_PORT)));
    assert_eq!(landing(&r), direct("remote"), "{r:?}");
}

/// Many connections at once all arrive intact, each counted once.
#[test]
fn concurrent_captures_all_arrive() {
    const N: usize = 32;
    let w = Workload::with_agent("concurrent", &[]);
    let spec = w.spec(w.remote(REMOTE_PORT)).bytes(64 << 10);
    let results = w.probe_concurrently(&spec, N);
    for r in &results {
        assert_eq!(landing(r), proxied(OUTBOUND_CAPTURE, "remote"), "{r:?}");
        assert!(r.intact && r.received == 64 << 10, "{r:?}");
    }
    assert_eq!(w.counts()[8], N as u64);
    assert_eq!(w.remote_server.accepted().len(), N);
}

/// The rule set's REDIRECT targets are `-p tcp`: a UDP connect() keeps its destination. Its
/// flow walks ISTIO_OUTPUT through `-j ISTIO_REDIRECT` (whose `-p tcp` REDIRECT it does not
/// match) and is counted there, once, as iptables counts a UDP flow's first datagram (here at
/// connect, the last hook a connected socket's flow passes; docs/istio.md).
#[test]
fn udp_is_untouched() {
    let w = Workload::with_agent("udp", &[]);
    let to = w.remote(53);
    let r = w.probe(&w.spec(to).udp());
    assert_eq!(r.outcome, Outcome::Ok, "{r:?}");
    assert_eq!(r.peer.as_deref(), Some(to.to_string().as_str()), "{r:?}");
    let counts = w.chain_counts("ISTIO_OUTPUT");
    let (last, rest) = counts.split_last().unwrap();
    assert_eq!((rest.iter().sum::<u64>(), *last), (0, 1), "{counts:?}");
    // A TCP connection right after is still captured: the agent was live.
    let r = w.probe(&w.spec(w.remote(REMOTE_PORT)));
    assert_eq!(landing(&r), proxied(OUTBOUND_CAPTURE, "remote"), "{r:?}");
}
