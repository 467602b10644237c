//! The embedded proxy's data path: a stream goes from socket to socket through a pipe
//! (`--relay splice`, the default), intact both ways, outbound and inbound, on each kernel the
//! matrix runs (6.1 sends pipe pages through `->sendpage`, 6.5+ through
//! `sendmsg(MSG_SPLICE_PAGES)`); a bad `--relay` is refused before anything starts.

use redirect_testkit::probe::ProbeSpec;
use redirect_tests::{
    APP_PORT, OUTBOUND_CAPTURE, REMOTE_PORT, Workload, agent_cmd, landing,
    node::{NodeAgent, metric},
    proxied,
};
use serde_json::json;

/// Bytes each way per exchange: more than a read (64 KiB) many times over, and, since the
/// probe writes all before it reads the echo, enough that the echo backs up to the proxy.
const STREAM: usize = 2 << 20;

/// Directions of `id`'s proxied connections that took a pipe, from a scrape.
fn spliced(agent: &NodeAgent, id: &str) -> f64 {
    let (_, text) = agent.scrape("/metrics").expect("metrics");
    let series = format!("redirect_proxy_spliced_directions_total{{workload=\"{id}\"}}");
    metric(&text, &series).unwrap_or_else(|| panic!("no {series}:\n{text}"))
}

/// Exchanges until both directions of one have gone through a pipe (at most 5), each intact.
fn stream_until_spliced(agent: &NodeAgent, id: &str, spec: &ProbeSpec, w: &Workload, what: &str) {
    let before = spliced(agent, id);
    for _ in 0..5 {
        let r = w.probe(spec);
        assert_eq!((r.sent, r.received), (STREAM, STREAM), "{what}: {r:?}");
        assert!(r.intact, "{what}: bytes changed on the way: {r:?}");
        if spliced(agent, id) >= before + 2.0 {
            return;
        }
    }
    panic!(
        "{what}: 5 streams of {STREAM} bytes, and {} directions spliced",
        spliced(agent, id) - before
    );
}

#[test]
fn streams_go_through_a_pipe_intact_outbound_and_inbound() {
    let agent = NodeAgent::new("relay", &[]);
    let _running = agent.start().expect("node agent starts");
    let w = Workload::new_on("rl", 191);
    let conf = agent.cni_conf(json!({}));
    let out = agent.cni("ADD", "relay-pod", Some(&w.pair.workload.path), &conf);
    assert!(out.status.success(), "ADD: {:?} {}", out.stdout, out.stderr);

    let outbound = w.spec(w.remote(REMOTE_PORT)).bytes(STREAM);
    assert_eq!(landing(&w.probe(&outbound)), proxied(OUTBOUND_CAPTURE, "remote"));
    stream_until_spliced(&agent, "relay-pod", &outbound, &w, "outbound");

    let inbound = ProbeSpec::outside(&w.pair.remote.path, w.pod(APP_PORT)).bytes(STREAM);
    let r = w.probe(&inbound);
    assert!(
        r.banner_field("peer").is_some_and(|p| p.starts_with("127.0.0.6:")),
        "inbound is proxied: {r:?}"
    );
    stream_until_spliced(&agent, "relay-pod", &inbound, &w, "inbound");
}

#[test]
fn a_relay_that_is_not_splice_or_copy_is_refused() {
    let out = agent_cmd(&["proxy", "--relay", "zerocopy"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("zerocopy") && err.contains("splice") && err.contains("copy"),
        "{err}"
    );
}
