//! TPROXY mode (`-m TPROXY`) carried out: sk_lookup judges mangle's ISTIO_INBOUND, the embedded
//! proxy dials the app from the client's own address, and the namespace's policy routing
//! brings the app's replies back to it, in place while the agent runs and gone after.

use redirect_tests::{Outcome, REMOTE_PORT, Workload};

const TPROXY: [&str; 2] = ["-m", "TPROXY"];

/// mangle ISTIO_INBOUND of the default injection in TPROXY mode, 0-based: the three RETURNs
/// istio-iptables inserts first, then 15090, 15021, 15020, the ESTABLISHED divert, the jump.
const MARKED: usize = 0;
const JUMP: usize = 7;

#[test]
fn the_app_sees_the_client_and_its_replies_come_back() {
    let w = Workload::with_agent("tpx-in", &TPROXY);
    // The app sees the remote host, not 127.0.0.6: the proxy dialed from the client's address.
    w.assert_inbound_seen_from_the_client();
    // The remote SYN: the jump and ISTIO_TPROXY's rule. The proxy's transparent SYN to the app
    // comes back in on lo with its mark: the first RETURN.
    let inbound = w.chain_counts("ISTIO_INBOUND");
    assert_eq!(inbound.len(), 8, "{:#?}", w.stats());
    let mut want = vec![0; 8];
    want[MARKED] = 1;
    want[JUMP] = 1;
    assert_eq!(inbound, want, "{:#?}", w.stats());
    assert_eq!(w.chain_counts("ISTIO_TPROXY"), [1], "{:#?}", w.stats());
    // The proxy's own upstream connect is the agent's: ISTIO_OUTPUT never judged it.
    assert!(w.counts().iter().all(|&c| c == 0), "{:?}", w.counts());
}

/// The embedded proxy's outbound sockets carry the agent's mark, 0x539, which is also TPROXY's
/// default mark: they must not carry it in TPROXY mode, where its `ip rule` routes into lo.
#[test]
fn outbound_through_the_proxy_still_leaves_the_pod() {
    let w = Workload::with_agent("tpx-out", &TPROXY);
    let r = w.probe(&w.spec(w.remote(REMOTE_PORT)).bytes(1 << 16));
    assert_eq!(r.outcome, Outcome::Ok, "{r:?}");
    assert_eq!(r.banner_field("name"), Some("remote"), "{r:?}");
    assert!(r.intact, "{r:?}");
    assert_eq!(
        w.remote_server.accepted().len(),
        1,
        "through the proxy to the remote host"
    );
    assert_eq!(
        *w.counts().last().unwrap(),
        1,
        "captured on the catch-all: {:?}",
        w.counts()
    );
}

#[test]
fn the_routing_is_there_while_the_agent_runs_and_gone_after() {
    let mut w = Workload::with_agent("tpx-rt", &["-m", "TPROXY", "-t", "0x600", "-r", "2100"]);
    let rules = w.exec(&["ip", "rule"]);
    assert!(rules.contains("fwmark 0x600 lookup 2100"), "{rules}");
    let route = w.exec(&["ip", "route", "show", "table", "2100"]);
    assert!(route.contains("local default dev lo"), "{route}");
    let accept = |w: &Workload| w.exec(&["cat", "/proc/sys/net/ipv4/tcp_fwmark_accept"]);
    assert_eq!(accept(&w).trim(), "1");
    let (status, stderr) = w.agent.as_mut().expect("agent").stop().expect("agent stops");
    assert!(status.success(), "{status:?}: {stderr}");
    let rules = w.exec(&["ip", "rule"]);
    assert!(!rules.contains("lookup 2100"), "{rules}");
    let route = w.exec(&["ip", "route", "show", "table", "2100"]);
    assert!(route.trim().is_empty(), "{route}");
    assert_eq!(accept(&w).trim(), "0", "tcp_fwmark_accept restored");
}

#[test]
fn a_kernel_table_is_refused_before_anything_changes() {
    let mut w = Workload::new("tpx-bad");
    let err = w.start_agent(&["-m", "TPROXY", "-r", "254"]);
    assert!(err.is_err(), "the agent started with table 254");
    let rules = w.exec(&["ip", "rule"]);
    assert!(!rules.contains("fwmark"), "{rules}");
}
