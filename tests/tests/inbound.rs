//! Inbound capture: connections from another host reach the inbound capture port through
//! sk_lookup, and the embedded proxy forwards them to the original port from 127.0.0.6.

use std::{
    io::{self, Read as _},
    net::{Ipv4Addr, Shutdown, SocketAddrV4, TcpStream},
    time::{Duration, Instant},
};

use redirect_testkit::{serve::ServeProcess, server::TestServer};
use redirect_tests::{APP_PORT, Outcome, TUNNEL_PORT, Workload, banner_peer_ip as peer_ip};

/// istio's status port: excluded inbound by the default `-d`.
const STATUS_PORT: u16 = 15020;

fn any(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)
}

/// ISTIO_INBOUND of the default injection, 1-based: 15008, 15090, 15021, 15020, catch-all.
const INBOUND_TUNNEL: usize = 0;
const INBOUND_STATUS: usize = 3;
const INBOUND_REDIRECT: usize = 4;

#[test]
fn inbound_connection_reaches_the_app_through_the_proxy() {
    let w = Workload::with_agent("inbound", &[]);
    let r = w.probe(&w.from_remote(w.pod(APP_PORT)).bytes(1 << 20));
    assert_eq!(r.outcome, Outcome::Ok, "{r:?}");
    assert_eq!(r.banner_field("name"), Some("app"), "{r:?}");
    assert_eq!((r.sent, r.received), (1 << 20, 1 << 20), "{r:?}");
    assert!(r.intact, "bytes changed on the way: {r:?}");
    // The client is still connected to the address it dialled: nothing was rewritten.
    assert_eq!(r.peer.as_deref(), Some(w.pod(APP_PORT).to_string().as_str()), "{r:?}");
    // The app sees Envoy's inbound passthrough source: the connection crossed the proxy.
    assert_eq!(peer_ip(&r), Ipv4Addr::new(127, 0, 0, 6), "{r:?}");
    assert_eq!(
        r.banner_field("local"),
        Some(w.pod(APP_PORT).to_string().as_str()),
        "{r:?}"
    );
    let counts = w.chain_counts("ISTIO_INBOUND");
    assert_eq!(counts, [0, 0, 0, 0, 1], "{:#?}", w.stats());
    // The proxy's upstream connect is its own (not the workload's) and is not counted, and the
    // SYN it sends over lo is not inbound.
    assert!(w.counts().iter().all(|&c| c == 0), "{:?}", w.counts());
}

#[test]
fn excluded_inbound_ports_go_direct() {
    let mut w = Workload::new("inbound-excl");
    let status = TestServer::start(&w.pair.workload, any(STATUS_PORT), "status").unwrap();
    w.start_agent(&[]).unwrap();
    let r = w.probe(&w.from_remote(w.pod(STATUS_PORT)));
    assert_eq!(r.outcome, Outcome::Ok, "{r:?}");
    assert_eq!(r.banner_field("name"), Some("status"), "{r:?}");
    assert_eq!(peer_ip(&r), w.pair.remote_ip, "{r:?}");
    let r = w.probe(&w.from_remote(w.pod(TUNNEL_PORT)));
    assert_eq!(r.banner_field("name"), Some("tunnel"), "{r:?}");
    assert_eq!(peer_ip(&r), w.pair.remote_ip, "{r:?}");
    let counts = w.chain_counts("ISTIO_INBOUND");
    assert_eq!(counts[INBOUND_STATUS], 1, "{counts:?}");
    assert_eq!(counts[INBOUND_TUNNEL], 1, "{counts:?}");
    assert_eq!(counts[INBOUND_REDIRECT], 0, "{counts:?}");
    assert_eq!(status.accepted().len(), 1);
}

/// Fail closed: with nobody on the inbound capture port, a captured connection is refused,
/// as iptables' REDIRECT to a closed port would, and never handed to the app behind the
/// proxy's back.
#[test]
fn inbound_without_a_capture_listener_is_refused() {
    let w = Workload::with_agent("inbound-nolisten", &["--proxy", "none"]);
    let r = w.probe(&w.from_remote(w.pod(APP_PORT)));
    assert_eq!(r.outcome, Outcome::Refused, "{r:?}");
    assert!(w.app_server.accepted().is_empty(), "the app was reached: {r:?}");
    assert_eq!(w.chain_counts("ISTIO_INBOUND")[INBOUND_REDIRECT], 1);
    assert_eq!(w.stats().events["inbound_no_listener"], 1, "{:#?}", w.stats());
}

#[test]
fn no_inbound_ports_leaves_inbound_alone() {
    let w = Workload::with_agent("inbound-off", &["-b", ""]);
    let r = w.probe(&w.from_remote(w.pod(APP_PORT)));
    assert_eq!(r.banner_field("name"), Some("app"), "{r:?}");
    assert_eq!(peer_ip(&r), w.pair.remote_ip, "{r:?}");
    assert!(w.chain_counts("ISTIO_INBOUND").iter().all(|&c| c == 0));
}

#[test]
fn concurrent_inbound_connections_all_arrive() {
    const N: usize = 32;
    let w = Workload::with_agent("inbound-many", &[]);
    let spec = w.from_remote(w.pod(APP_PORT)).bytes(64 << 10);
    let results = w.probe_concurrently(&spec, N);
    for r in &results {
        assert_eq!(r.banner_field("name"), Some("app"), "{r:?}");
        assert!(r.intact && r.received == 64 << 10, "{r:?}");
        assert_eq!(peer_ip(r), Ipv4Addr::new(127, 0, 0, 6), "{r:?}");
    }
    assert_eq!(w.chain_counts("ISTIO_INBOUND")[INBOUND_REDIRECT], N as u64);
    assert_eq!(w.app_server.accepted().len(), N);
}

/// Past `--max-proxy-connections` the proxy resets at once (no hang in the backlog), and a
/// slot freed by a finished connection serves the next one.
#[test]
fn connections_past_the_proxy_limit_are_reset() {
    const LIMIT: usize = 2;
    const WAIT: Duration = Duration::from_secs(5);
    let w = Workload::with_agent("inbound-limit", &["--max-proxy-connections", &LIMIT.to_string()]);
    // The app answers only after the client's FIN, so these hold their proxy slots.
    let mut held: Vec<TcpStream> = (0..LIMIT)
        .map(|_| w.dial_from_remote(APP_PORT, WAIT).unwrap())
        .collect();
    let deadline = Instant::now() + WAIT;
    while w.app_server.accepted().len() < LIMIT {
        assert!(Instant::now() < deadline, "held connections never reached the app");
        std::thread::sleep(Duration::from_millis(10));
    }

    // The reset can beat connect() back to the client, so it may surface there or at read.
    let got = w.dial_from_remote(APP_PORT, WAIT).and_then(|mut over| {
        over.set_read_timeout(Some(WAIT))?;
        over.read(&mut [0u8; 64])
    });
    assert_eq!(
        got.as_ref().map_err(io::Error::kind).err(),
        Some(io::ErrorKind::ConnectionReset),
        "over the limit: {got:?}"
    );
    assert_eq!(
        w.app_server.accepted().len(),
        LIMIT,
        "the app was reached past the limit"
    );

    // Finish one held connection; its slot comes back once the proxy has closed both sides.
    let mut done = held.pop().unwrap();
    done.shutdown(Shutdown::Write).unwrap();
    done.set_read_timeout(Some(WAIT)).unwrap();
    let mut banner = Vec::new();
    done.read_to_end(&mut banner).unwrap();
    assert!(String::from_utf8_lossy(&banner).contains("name=app"), "{banner:?}");
    let r = (0..50)
        .map(|_| {
            let r = w.probe(&w.from_remote(w.pod(APP_PORT)));
            if r.outcome != Outcome::Ok {
                std::thread::sleep(Duration::from_millis(20));
            }
            r
        })
        .find(|r| r.outcome == Outcome::Ok);
    assert!(r.is_some(), "a freed slot never served again");
    drop(held);
}

/// A capture listener that goes away takes inbound capture with it (refused), and one that
/// comes back (a restarted Envoy) is picked up again by sock_ops.
#[test]
fn a_restarted_capture_listener_is_registered_again() {
    let w = Workload::with_agent("inbound-relisten", &["--proxy", "none"]);
    let testkit = redirect_tests::testkit_bin();
    let listen = [("envoy".to_string(), any(15006))];
    let envoy = ServeProcess::start(&testkit, Some(&w.cgroup.path), &w.pair.workload.path, &listen).unwrap();
    let r = w.probe(&w.from_remote(w.pod(APP_PORT)));
    assert_eq!(r.banner_field("name"), Some("envoy"), "{r:?}");
    drop(envoy);
    let r = w.probe(&w.from_remote(w.pod(APP_PORT)));
    assert_eq!(r.outcome, Outcome::Refused, "{r:?}");
    let _envoy = ServeProcess::start(&testkit, Some(&w.cgroup.path), &w.pair.workload.path, &listen).unwrap();
    let r = w.probe(&w.from_remote(w.pod(APP_PORT)));
    assert_eq!(r.banner_field("name"), Some("envoy"), "{r:?}");
    assert!(w.app_server.accepted().is_empty());
}

/// A proxy that was listening before the agent started (agent restarted under a running
/// Envoy) is found and registered, as REDIRECT would reach it.
#[test]
fn a_capture_listener_from_before_the_agent_is_adopted() {
    let mut w = Workload::new("inbound-adopt");
    let testkit = redirect_tests::testkit_bin();
    let listen = [("envoy".to_string(), any(15006))];
    let _envoy = ServeProcess::start(&testkit, Some(&w.cgroup.path), &w.pair.workload.path, &listen).unwrap();
    w.start_agent(&["--proxy", "none"]).unwrap();
    let r = w.probe(&w.from_remote(w.pod(APP_PORT)));
    assert_eq!(r.banner_field("name"), Some("envoy"), "{r:?}");
    assert!(w.app_server.accepted().is_empty());
}

/// With the embedded proxy, a workload socket that happens to listen on the capture port (on
/// another address) does not take inbound capture away from the proxy.
#[test]
fn a_workload_listener_does_not_replace_the_embedded_proxy() {
    let w = Workload::with_agent("inbound-squat", &[]);
    let testkit = redirect_tests::testkit_bin();
    let listen = [("squatter".to_string(), SocketAddrV4::new(w.pair.workload_ip, 15006))];
    let _squatter = ServeProcess::start(&testkit, Some(&w.cgroup.path), &w.pair.workload.path, &listen).unwrap();
    let r = w.probe(&w.from_remote(w.pod(APP_PORT)));
    assert_eq!(r.banner_field("name"), Some("app"), "{r:?}");
    assert_eq!(peer_ip(&r), Ipv4Addr::new(127, 0, 0, 6), "{r:?}");
}
