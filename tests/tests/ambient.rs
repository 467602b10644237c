//! Ambient mode (`--mode ambient`) carried out with the embedded proxy standing in for
//! ztunnel: it serves the pod's ports 15001 and 15006 from sockets in the pod's namespace,
//! marked 0x539 as ztunnel's are; it dials the app as the client, from the client's own
//! address, as ztunnel does. istio-cni's routing of the inbound-proxied mark brings the app's
//! replies back, in place while the agent runs and gone after. The rules themselves are held
//! to iptables by the differential tests; here is the path a connection takes through the
//! stand-in.

use redirect_tests::{APP_PORT, Outcome, REMOTE_PORT, Workload};

const AMBIENT: [&str; 2] = ["--mode", "ambient"];

/// ISTIO_PRERT's rules, 0-based: the probes' ACCEPT, the redirect to 15006.
const INBOUND_REDIRECT: usize = 1;
/// ISTIO_OUTPUT's rules without DNS capture, 0-based: the probes' ACCEPT, the inbound-proxied
/// mark's ACCEPT, lo's ACCEPT, the redirect to 15001.
const LO_ACCEPT: usize = 2;
const OUTBOUND_REDIRECT: usize = 3;

#[test]
fn inbound_reaches_the_app_from_the_clients_address_and_its_replies_come_back() {
    let w = Workload::with_agent("amb-in", &AMBIENT);
    // The app sees the remote host, as behind ztunnel: the stand-in dialed from its address.
    w.assert_inbound_seen_from_the_client();
    // The remote host's SYN was redirected; the stand-in's dial into the pod, made in the
    // namespace, is nat PREROUTING's business no more than under iptables.
    let mut want = vec![0; 2];
    want[INBOUND_REDIRECT] = 1;
    assert_eq!(w.chain_counts("ISTIO_PRERT"), want, "{:#?}", w.stats());
    // The stand-in's own sockets are the agent's: ISTIO_OUTPUT never judged them.
    assert!(w.counts().iter().all(|&c| c == 0), "{:?}", w.counts());
}

#[test]
fn outbound_goes_through_the_stand_in_and_leaves_the_pod() {
    let w = Workload::with_agent("amb-out", &AMBIENT);
    let r = w.probe(&w.spec(w.remote(REMOTE_PORT)).bytes(1 << 16));
    assert_eq!(r.outcome, Outcome::Ok, "{r:?}");
    assert_eq!(r.banner_field("name"), Some("remote"), "{r:?}");
    assert!(r.intact, "{r:?}");
    assert_eq!(
        w.remote_server.accepted().len(),
        1,
        "through the proxy to the remote host"
    );
    // The app's own connection to itself goes straight (lo's ACCEPT).
    let me = w.probe(&w.spec(w.pod(APP_PORT)).bytes(16));
    assert_eq!(me.outcome, Outcome::Ok, "{me:?}");
    assert_eq!(me.banner_field("name"), Some("app"), "{me:?}");
    let mut want = vec![0; 4];
    want[OUTBOUND_REDIRECT] = 1;
    want[LO_ACCEPT] = 1;
    assert_eq!(w.counts(), want, "{:#?}", w.stats());
}

#[test]
fn the_routing_is_there_while_the_agent_runs_and_gone_after() {
    let mut w = Workload::with_agent("amb-rt", &AMBIENT);
    let rule = "32764:\tfrom all fwmark 0x111/0xfff lookup 100";
    for family in ["-4", "-6"] {
        let rules = w.exec(&["ip", family, "rule"]);
        assert!(rules.contains(rule), "{rules}");
        let route = w.exec(&["ip", family, "route", "show", "table", "100"]);
        assert!(route.starts_with("local default dev lo"), "{route}");
    }
    let accept = |w: &Workload| w.exec(&["cat", "/proc/sys/net/ipv4/tcp_fwmark_accept"]);
    assert_eq!(accept(&w).trim(), "1");
    // lo has what istio-cni leaves: no `::6`, which istio-iptables adds for a sidecar's IPv6
    // passthrough and ztunnel never dials from.
    let lo = w.exec(&["ip", "-6", "addr", "show", "dev", "lo"]);
    assert!(lo.contains("::1/128") && !lo.contains("::6/128"), "{lo}");
    let (status, stderr) = w.agent.as_mut().expect("agent").stop().expect("agent stops");
    assert!(status.success(), "{status:?}: {stderr}");
    for family in ["-4", "-6"] {
        let rules = w.exec(&["ip", family, "rule"]);
        assert!(!rules.contains("lookup 100"), "{rules}");
    }
    assert_eq!(accept(&w).trim(), "0", "tcp_fwmark_accept restored");
}

#[test]
fn settings_istio_cni_does_not_take_are_refused_before_anything_changes() {
    let mut w = Workload::new("amb-bad");
    for flags in [
        &["--mode", "ambient", "-u", "1337"][..],
        &["--mode", "ambient", "--run-validation"],
        &["--bypass-inbound-capture"],
    ] {
        let err = w.start_agent(flags);
        assert!(err.is_err(), "the agent started with {flags:?}");
        let rules = w.exec(&["ip", "rule"]);
        assert!(!rules.contains("fwmark"), "{flags:?}: {rules}");
    }
}
