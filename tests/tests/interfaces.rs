//! `-c` (`--istio-exclude-interfaces`): traffic on an excluded interface is left alone both
//! ways, as istio-iptables' `nat PREROUTING -i IFACE -j RETURN` and `OUTPUT -o IFACE -j
//! RETURN` leave it, each counted on its own rule; the rest is captured as before.

use std::net::{Ipv4Addr, SocketAddrV4};

use redirect_testkit::{
    netns::{NamedNetns, NetnsPair, veth},
    server::TestServer,
    unique,
};
use redirect_tests::{
    APP_PORT, OUTBOUND_CAPTURE, REMOTE_PORT, Workload, direct, landing,
    node::{Inbound, inbound, inbound_from},
    proxied,
};

/// The workload namespace has its primary interface (`w0`, to the remote host) and a second
/// one, `x0`, to a third namespace (10.200.`subnet`.0/24) that `-c x0` excludes.
struct TwoLinks {
    w: Workload,
    side: NamedNetns,
    _side_server: TestServer,
}

const SIDE_SUBNET: u8 = 243;

fn side_ip(host: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 200, SIDE_SUBNET, host)
}

impl TwoLinks {
    fn new(tag: &str, flags: &[&str]) -> Self {
        redirect_tests::require_root();
        let base = unique(tag);
        let workload = NamedNetns::create(&format!("{base}-w")).expect("netns");
        let remote = NamedNetns::create(&format!("{base}-r")).expect("netns");
        let side = NamedNetns::create(&format!("{base}-x")).expect("netns");
        veth((&workload, "x0"), (&side, "x1"), SIDE_SUBNET).expect("second veth");
        let pair = NetnsPair::wire(workload, remote, 42).expect("the primary veth");
        let side_server =
            TestServer::start(&side, SocketAddrV4::new(side_ip(2), REMOTE_PORT), "side").expect("side server");
        let mut w = Workload::on_pair(tag, pair);
        w.start_agent(flags).expect("agent starts");
        Self {
            w,
            side,
            _side_server: side_server,
        }
    }

    /// A connection from the side host to the app on the workload's `x0` address.
    fn inbound_from_side(&self) -> Inbound {
        inbound_from(&self.w, &self.side.path, SocketAddrV4::new(side_ip(1), APP_PORT).into())
    }

    fn count(&self, chain: &str) -> Vec<u64> {
        self.w.chain_counts(chain)
    }
}

#[test]
fn an_excluded_interface_is_left_alone_both_ways_and_counted_on_its_rules() {
    let t = TwoLinks::new("ifx", &["-c", "x0"]);
    let w = &t.w;
    assert_eq!(t.count("PREROUTING"), [0], "one -i x0 RETURN");
    assert_eq!(t.count("OUTPUT"), [0], "one -o x0 RETURN");
    let matches: Vec<(String, String)> = w
        .stats()
        .rules
        .iter()
        .filter(|r| r.family == "ipv4" && (r.chain == "PREROUTING" || r.chain == "OUTPUT"))
        .map(|r| (r.chain.clone(), r.match_.clone()))
        .collect();
    let named = |c: &str, m: &str| (c.to_owned(), m.to_owned());
    assert_eq!(
        matches,
        [named("PREROUTING", "-i x0"), named("OUTPUT", "-o x0")],
        "stats names the interface"
    );
    let output_before = w.counts();

    // Out through x0: OUTPUT's RETURN, before ISTIO_OUTPUT is reached.
    let r = w.probe(&w.spec(SocketAddrV4::new(side_ip(2), REMOTE_PORT)));
    assert_eq!(landing(&r), direct("side"), "{r:?}");
    assert_eq!(t.count("OUTPUT"), [1]);
    assert_eq!(w.counts(), output_before, "ISTIO_OUTPUT never saw it");
    // Out through w0: captured as before.
    let r = w.probe(&w.spec(w.remote(REMOTE_PORT)));
    assert_eq!(landing(&r), proxied(OUTBOUND_CAPTURE, "remote"), "{r:?}");
    assert_eq!(t.count("OUTPUT"), [1]);

    // In through x0: PREROUTING's RETURN; the app sees the side host itself.
    let inbound_before = t.count("ISTIO_INBOUND");
    assert_eq!(t.inbound_from_side(), Inbound::Direct);
    assert_eq!(t.count("PREROUTING"), [1]);
    assert_eq!(t.count("ISTIO_INBOUND"), inbound_before, "ISTIO_INBOUND never saw it");
    // In through w0: captured, the app sees the proxy's 127.0.0.6.
    assert_eq!(inbound(w, APP_PORT), Inbound::Proxied);
    assert_eq!(t.count("PREROUTING"), [1]);
}

/// A `+` entry names every interface of that prefix, including one added after the agent
/// started; without `-c` the same traffic is captured.
#[test]
fn a_prefix_entry_follows_interfaces_added_later() {
    let t = TwoLinks::new("ifp", &["-c", "y+"]);
    let w = &t.w;
    // x0 is not named: captured.
    let r = w.probe(&w.spec(SocketAddrV4::new(side_ip(2), REMOTE_PORT)));
    assert_eq!(landing(&r), proxied(OUTBOUND_CAPTURE, "side"), "{r:?}");
    assert_eq!(t.inbound_from_side(), Inbound::Proxied);
    // Renamed to y0, it is.
    for args in [
        &["link", "set", "x0", "down"][..],
        &["link", "set", "x0", "name", "y0"],
        &["link", "set", "y0", "up"],
        &["addr", "replace", &format!("{}/24", side_ip(1)), "dev", "y0"],
        &[
            "route",
            "replace",
            &format!("10.200.{SIDE_SUBNET}.0/24"),
            "dev",
            "y0",
            "src",
            &side_ip(1).to_string(),
        ],
    ] {
        w.pair.workload.ip(args).expect("ip");
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let r = w.probe(&w.spec(SocketAddrV4::new(side_ip(2), REMOTE_PORT)));
        if landing(&r) == direct("side") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still captured 10 s after the rename: {r:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert_eq!(t.inbound_from_side(), Inbound::Direct);
    assert_eq!(t.count("PREROUTING"), [1]);
}

/// `-o` sees the device a socket is bound to (SO_BINDTODEVICE), not the one the main table
/// would route its destination by: bound to x0, a connection to the remote host (routed by
/// w0) is left alone on `-o x0 -j RETURN`, as nat OUTPUT's interface match leaves it.
#[test]
fn a_socket_bound_to_an_excluded_device_is_left_alone() {
    let t = TwoLinks::new("ifb", &["-c", "x0"]);
    let w = &t.w;
    let before = w.counts();
    let r = w.probe(&w.spec(w.remote(REMOTE_PORT)).device("x0"));
    assert!(
        !matches!(landing(&r), redirect_tests::Landing::Proxied { .. }),
        "bound to x0 yet captured: {r:?}"
    );
    assert_eq!(t.count("OUTPUT"), [1], "{r:?}");
    assert_eq!(w.counts(), before, "ISTIO_OUTPUT never saw it");
    // Unbound, the same destination is captured.
    let r = w.probe(&w.spec(w.remote(REMOTE_PORT)));
    assert_eq!(landing(&r), proxied(OUTBOUND_CAPTURE, "remote"), "{r:?}");
}

/// A run that takes over a killed one's pins with another interface list judges every device
/// afresh: what the killed run wrote for its list is gone.
#[test]
fn a_takeover_with_another_list_keeps_nothing_of_the_old_one() {
    let mut t = TwoLinks::new("ift", &["-c", "x0"]);
    let r = t.w.probe(&t.w.spec(SocketAddrV4::new(side_ip(2), REMOTE_PORT)));
    assert_eq!(landing(&r), direct("side"), "{r:?}");
    let mut killed = t.w.agent.take().expect("agent");
    killed.signal(libc::SIGKILL);
    let _ = killed.wait(std::time::Duration::from_secs(10));
    t.w.start_agent(&["-c", "nosuch0"]).expect("a new run takes over");
    let r = t.w.probe(&t.w.spec(SocketAddrV4::new(side_ip(2), REMOTE_PORT)));
    assert_eq!(landing(&r), proxied(OUTBOUND_CAPTURE, "side"), "{r:?}");
    assert_eq!(t.inbound_from_side(), Inbound::Proxied);
}
