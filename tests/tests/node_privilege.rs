//! Node mode with the capabilities `deploy/daemonset.yaml` gives the agent, and no others
//! (its bounding set, as a container's `capabilities: {drop: [ALL], add: [...]}` leaves it):
//! a pod through the embedded proxy both ways, a TPROXY pod whose app sees the client, and a
//! pod whose own proxy was listening before it was enrolled (adopted through pidfd_getfd).

use std::time::{Duration, Instant};

use redirect_tests::{
    APP_PORT, OUTBOUND_CAPTURE, Outcome, PodProxy, REMOTE_PORT, Workload, banner_peer_ip, landing,
    node::{Inbound, NodeAgent, inbound},
    proxied,
};
use serde_json::json;

/// The agent container's `securityContext.capabilities.add` in the DaemonSet.
fn daemonset_capabilities() -> Vec<String> {
    use redirect_tests::runtime;
    runtime::capabilities(&runtime::container(&runtime::daemonset(), "agent"))
}

/// A capability set of `pid` (`field`: `CapEff:`, `CapBnd:`), from /proc.
fn capabilities(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let hex = status.lines().find_map(|l| l.strip_prefix(field)).unwrap().trim();
    u64::from_str_radix(hex, 16).unwrap()
}

#[test]
fn the_daemonsets_capabilities_are_enough_for_every_kind_of_pod() {
    let names = daemonset_capabilities();
    let agent = NodeAgent::new("node-priv", &[]).with_capabilities(&names);
    let node = agent
        .start()
        .expect("the agent starts with the DaemonSet's capabilities");
    let mut want = rustix::thread::CapabilitySet::empty();
    for n in &names {
        want |= rustix::thread::CapabilitySet::from_name(n).unwrap();
    }
    // Those of them this machine has: a sandbox may lack some (SYS_RESOURCE, which only lets
    // the agent raise its descriptor limit past the hard one).
    let ours = capabilities(std::process::id(), "CapBnd:");
    assert_eq!(
        capabilities(node.pid(), "CapEff:"),
        want.bits() & ours,
        "the agent runs with exactly {names:?}, as far as this machine has them"
    );

    // The embedded proxy, both ways.
    let plain = Workload::new_on("np1", 91);
    let add = agent.cni(
        "ADD",
        "pod-plain",
        Some(&plain.pair.workload.path),
        &agent.cni_conf(json!({})),
    );
    assert!(add.status.success(), "{:?} {}", add.stdout, add.stderr);
    let r = plain.probe(&plain.spec(plain.remote(REMOTE_PORT)));
    assert_eq!(landing(&r), proxied(OUTBOUND_CAPTURE, "remote"), "{r:?}");
    assert_eq!(inbound(&plain, APP_PORT), Inbound::Proxied);

    // TPROXY: routing rules, IP_TRANSPARENT; the app sees the client.
    let tproxy = Workload::new_on("np2", 92);
    let conf = agent.cni_conf(json!({ "sidecar.istio.io/interceptionMode": "TPROXY" }));
    let add = agent.cni("ADD", "pod-tproxy", Some(&tproxy.pair.workload.path), &conf);
    assert!(add.status.success(), "{:?} {}", add.stdout, add.stderr);
    let r = tproxy.probe(&tproxy.from_remote(tproxy.pod(APP_PORT)));
    assert_eq!(r.outcome, Outcome::Ok, "{r:?}");
    assert_eq!(banner_peer_ip(&r), tproxy.pair.remote_ip, "{r:?}");

    // The pod's own proxy listens before the enrollment: the agent takes its listener.
    let own = Workload::new_on("np3", 93);
    let proxy = PodProxy::start(&own);
    let listening = Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string(format!("/proc/{}/net/tcp", proxy.pid()))
        .unwrap_or_default()
        .lines()
        .any(|l| {
            l.split_whitespace().nth(1).is_some_and(|a| a.ends_with(":3A9E"))
                && l.split_whitespace().nth(3) == Some("0A")
        })
    {
        assert!(Instant::now() < listening, "the pod's proxy never listened on 15006");
        std::thread::sleep(Duration::from_millis(50));
    }
    let conf = agent.cni_conf(json!({ "redirect.dev/proxy": "none" }));
    let add = agent.cni("ADD", "pod-own", Some(&own.pair.workload.path), &conf);
    assert!(add.status.success(), "{:?} {}", add.stdout, add.stderr);
    assert_eq!(inbound(&own, APP_PORT), Inbound::Proxied);
    let r = own.probe(&own.spec(own.remote(REMOTE_PORT)));
    assert_eq!(landing(&r), proxied(OUTBOUND_CAPTURE, "remote"), "{r:?}");
    drop(node);
}
