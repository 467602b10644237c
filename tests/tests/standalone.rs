//! `redirect-agent proxy`: the proxy loop alone behind istio-iptables' own rules, finding
//! original destinations in conntrack (SO_ORIGINAL_DST) as Envoy does.

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use redirect_tests::{APP_PORT, Outcome, PodProxy, REMOTE_PORT, Workload, agent_cmd, iptables_restore};

fn explain_default() -> String {
    let out = agent_cmd(&["explain"]);
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn the_proxy_serves_iptables_redirect_both_ways() {
    let w = Workload::new("standalone");
    iptables_restore(&w.pair.workload.name, &explain_default());
    // The rules alone send the app's connection to a port nobody listens on yet.
    let r = w.probe(&w.spec(w.remote(REMOTE_PORT)));
    assert_eq!(r.outcome, Outcome::Refused, "not redirected: {r:?}");
    let _proxy = PodProxy::start(&w);

    // Outbound: the app's connection is REDIRECTed to :15001 by the nat table; the proxy (uid
    // 1337, exempt) dials the original destination from the pod. Retried while it starts.
    let deadline = Instant::now() + Duration::from_secs(20);
    let r = loop {
        let r = w.probe(&w.spec(w.remote(REMOTE_PORT)).bytes(256 << 10));
        if r.outcome == Outcome::Ok || Instant::now() > deadline {
            break r;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(r.outcome, Outcome::Ok, "{r:?}");
    assert_eq!(r.banner_field("name"), Some("remote"), "{r:?}");
    assert!(r.intact && r.received == 256 << 10, "{r:?}");
    // Under NAT the app still sees its original peer; the remote host sees the pod.
    assert_eq!(
        r.peer.as_deref(),
        Some(w.remote(REMOTE_PORT).to_string().as_str()),
        "{r:?}"
    );
    let saw: std::net::SocketAddrV4 = r.banner_field("peer").unwrap().parse().unwrap();
    assert_eq!(*saw.ip(), w.pair.workload_ip, "{r:?}");

    // Inbound: REDIRECT to :15006 on the pod address; forwarded to the app from 127.0.0.6.
    let r = w.probe(&w.from_remote(w.pod(APP_PORT)).bytes(256 << 10));
    assert_eq!(r.outcome, Outcome::Ok, "{r:?}");
    assert_eq!(r.banner_field("name"), Some("app"), "{r:?}");
    assert!(r.intact, "{r:?}");
    let saw: std::net::SocketAddrV4 = r.banner_field("peer").unwrap().parse().unwrap();
    assert_eq!(*saw.ip(), Ipv4Addr::new(127, 0, 0, 6), "{r:?}");
}

#[test]
fn the_proxy_refuses_bad_flags_in_one_line() {
    for (args, needle) in [
        (vec!["proxy", "-p", "15006"], "both 15006"),
        (vec!["proxy", "--netns", "/tmp"], "'/tmp' is not a network namespace"),
        (vec!["proxy", "--uid", "x"], "'x'"),
    ] {
        let out = agent_cmd(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}
