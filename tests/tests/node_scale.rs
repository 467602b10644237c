//! Node mode past its old fixed cap of 64 workloads (and the kubelet's default of 110 pods per
//! node): one agent enrolls more, and the last one enrolled is captured like the first. The
//! timings and memory at 1,000 workloads are `cargo xtask bench --scale`'s
//! (docs/benchmarks.md), not this test's.

use redirect_testkit::{netns::NamedNetns, unique};
use redirect_tests::{OUTBOUND_CAPTURE, REMOTE_PORT, Workload, landing, node::NodeAgent, proxied};

/// Past the kubelet's default `maxPods` (110), where 64 refused the 65th pod's CNI ADD.
const WORKLOADS: usize = 120;

#[test]
fn a_node_agent_serves_more_workloads_than_a_node_runs_pods_by_default() {
    // Asked for: left out, the agent plans for what the descriptor limit holds, fewer on a
    // machine held to 20,000 descriptors.
    let max = WORKLOADS.to_string();
    let agent = NodeAgent::new("node-many", &["--max-workloads", &max]);
    let _p = agent.start().expect("node agent starts");
    // Sidecar pods, in effect: their namespaces enrolled with `--proxy none`, nothing more.
    let tag = unique("many");
    let sidecars: Vec<NamedNetns> = (1..WORKLOADS)
        .map(|i| NamedNetns::create(&format!("{tag}-{i}")).expect("netns"))
        .collect();
    for (i, ns) in sidecars.iter().enumerate() {
        agent.enroll(&ns.path, &format!("sidecar-{i}"), &["--proxy", "none"]);
    }
    // The last, with the embedded proxy and a remote host to dial.
    let w = Workload::new_on("many", 121);
    agent.enroll(&w.pair.workload.path, "last", &[]);
    assert_eq!(agent.ids().len(), WORKLOADS);
    let r = w.probe(&w.spec(w.remote(REMOTE_PORT)));
    assert_eq!(landing(&r), proxied(OUTBOUND_CAPTURE, "remote"), "{r:?}");
}
