//! Node mode: a workload whose network namespace is deleted without an unenroll (no CNI DEL)
//! is released as unenroll would release it, once no process is left in the namespace; one
//! that still has a process stays captured.

use std::{
    os::unix::fs::MetadataExt as _,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use redirect_testkit::netns::NetnsPair;
use redirect_tests::node::{NodeAgent, metric};

/// A process kept inside a namespace; killed on drop.
struct Inside(Child);

impl Inside {
    fn start(netns_name: &str) -> Self {
        let child = Command::new("ip")
            .args(["netns", "exec", netns_name, "sleep", "300"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("a process inside the namespace");
        Self(child)
    }
}

impl Drop for Inside {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn map_entries(agent: &NodeAgent) -> Vec<Option<f64>> {
    let text = agent.scrape("/metrics").expect("scrape").1;
    [
        "WORKLOADS",
        "LOCAL_ADDRS",
        "POD_ADDRS",
        "INBOUND_PENDING",
        "ORIG_BY_TUPLE",
        "RULE_COUNTERS",
        "CIDR_SETS",
        "PORT_SETS",
    ]
    .iter()
    .map(|m| metric(&text, &format!("redirect_map_entries{{map=\"{m}\"}}")))
    .collect()
}

fn sk_lookup_pins(agent: &NodeAgent) -> usize {
    std::fs::read_dir(format!("/sys/fs/bpf/redirect/{}/links", agent.name))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("sk_lookup-")
        })
        .count()
}

/// Waits (bounded) until `id` is no longer enrolled.
fn wait_released(agent: &NodeAgent, id: &str, log: impl Fn() -> String) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while agent.ids().iter().any(|i| i == id) {
        assert!(
            Instant::now() < deadline,
            "{id} still enrolled 30 s after its namespace went:\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_namespace_deleted_without_unenroll_is_released_once_no_process_is_left_in_it() {
    let agent = NodeAgent::new("gone", &[]);
    let p = agent.start().expect("node agent starts");
    let idle = map_entries(&agent);
    let empty = NetnsPair::create_on("gne", 75).expect("namespaces");
    let busy = NetnsPair::create_on("gnb", 76).expect("namespaces");
    // With lists, whose counters and set members go with the workload too.
    let lists = ["--", "-x", "10.9.0.0/16,10.8.0.0/16", "-b", "9080,9081,9082"];
    agent.enroll(&empty.workload.path, "empty", &lists);
    agent.enroll(&busy.workload.path, "busy", &lists);
    let enrolled = map_entries(&agent);
    assert!(
        enrolled.iter().zip(&idle).all(|(e, i)| e >= i) && enrolled[5..] != idle[5..],
        "the workloads' counters and set members are in the maps: {enrolled:?} (idle {idle:?})"
    );
    assert_eq!(sk_lookup_pins(&agent), 2);
    let inside = Inside::start(&busy.workload.name);
    // The process is in the namespace before its path goes.
    let ns_ino = std::fs::metadata(&busy.workload.path).unwrap().ino();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::metadata(format!("/proc/{}/ns/net", inside.0.id()))
        .map(|m| m.ino())
        .ok()
        != Some(ns_ino)
    {
        assert!(Instant::now() < deadline, "the process never entered the namespace");
        std::thread::sleep(Duration::from_millis(20));
    }

    // Deleted as a runtime deletes a pod's namespace, without a CNI DEL.
    Command::new("ip")
        .args(["netns", "del", &empty.workload.name])
        .status()
        .unwrap();
    Command::new("ip")
        .args(["netns", "del", &busy.workload.name])
        .status()
        .unwrap();
    assert!(!empty.workload.path.exists() && !busy.workload.path.exists());

    // Both are looked at in one pass: when the empty one is released, the busy one was seen
    // with its process and kept (fail-closed: its process's connections stay captured).
    wait_released(&agent, "empty", || p.log());
    assert_eq!(agent.ids(), ["busy"]);
    let log = p.log();
    assert!(log.contains("network namespace is gone"), "{log}");

    // Its last process exits: released too, and the maps are as before either was enrolled.
    drop(inside);
    wait_released(&agent, "busy", || p.log());
    assert_eq!(map_entries(&agent), idle);
    assert_eq!(sk_lookup_pins(&agent), 0);
    assert!(agent.state().unwrap().workloads.is_empty());
}
