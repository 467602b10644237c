//! Node mode: workloads enrolled through the CNI plugin, each captured per its own flags by one
//! set of programs at the cgroup root; removal; restarts (handover under load, adoption after a
//! crash); bad input; the metrics endpoint; cleanup.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use redirect_testkit::server::TestServer;
use redirect_tests::{
    APP_PORT, Landing, OUTBOUND_CAPTURE, PodProxy, REMOTE_PORT, Workload, direct, landing,
    node::{Inbound, NodeAgent, StopOnDrop, inbound, load, metric, refused_node_start, rule_count},
    proxied,
};
use serde_json::json;

/// The done-when of node mode: three workloads with their own flags, all through the plugin,
/// each landing per its flags; one removed; the agent restarted under load, failing nothing.
#[test]
fn three_workloads_through_cni_land_per_their_own_flags_then_one_removed_and_a_restart_loses_nothing() {
    let agent = NodeAgent::new("node-cni", &[]);
    let mut first = agent.start().expect("node agent starts");
    let w1 = Workload::new_on("n1", 11);
    let w2 = Workload::new_on("n2", 12);
    let w3 = Workload::new_on("n3", 13);
    // w1: the sidecar injection's defaults. w2: only 10.96.0.0/12 is captured outbound (the
    // remote host is not in it). w3: outbound port 8080 and inbound port 9080 left alone.
    let pods = [
        (&w1, "pod-one", json!({})),
        (
            &w2,
            "pod-two",
            json!({ "traffic.sidecar.istio.io/includeOutboundIPRanges": "10.96.0.0/12" }),
        ),
        (
            &w3,
            "pod-three",
            json!({
                "traffic.sidecar.istio.io/excludeOutboundPorts": "8080",
                "traffic.sidecar.istio.io/excludeInboundPorts": "9080"
            }),
        ),
    ];
    for (w, id, annotations) in &pods {
        let conf = agent.cni_conf(annotations.clone());
        let out = agent.cni("ADD", id, Some(&w.pair.workload.path), &conf);
        assert!(out.status.success(), "ADD {id}: {:?} {}", out.stdout, out.stderr);
        // A chained plugin passes the previous result on.
        assert_eq!(out.stdout, conf["prevResult"], "{id}");
        let check = agent.cni("CHECK", id, Some(&w.pair.workload.path), &conf);
        assert!(check.status.success(), "CHECK {id}: {:?}", check.stdout);
    }
    assert_eq!(agent.ids(), ["pod-one", "pod-three", "pod-two"]);

    let out_to_remote = |w: &Workload| landing(&w.probe(&w.spec(w.remote(REMOTE_PORT))));
    let in_from_remote = |w: &Workload| inbound(w, APP_PORT);
    assert_eq!(out_to_remote(&w1), proxied(OUTBOUND_CAPTURE, "remote"));
    assert_eq!(in_from_remote(&w1), Inbound::Proxied);
    assert_eq!(out_to_remote(&w2), direct("remote"));
    assert_eq!(in_from_remote(&w2), Inbound::Proxied);
    assert_eq!(out_to_remote(&w3), direct("remote"));
    assert_eq!(in_from_remote(&w3), Inbound::Direct);

    // Each decision counted on its own workload's rule, as `iptables -L -v` would per pod.
    let (status, text) = agent.scrape("/metrics").unwrap();
    assert_eq!(status, "HTTP/1.1 200 OK");
    // The last ISTIO_OUTPUT rule (-j ISTIO_REDIRECT), after the plugin's `-o 15020` pair.
    let last_output = 11;
    assert_eq!(rule_count(&text, "pod-one", "ISTIO_OUTPUT", last_output), 1, "{text}");
    assert_eq!(rule_count(&text, "pod-two", "ISTIO_OUTPUT", last_output), 0, "{text}");
    assert_eq!(metric(&text, "redirect_workloads"), Some(3.0));
    assert_eq!(
        metric(&text, "redirect_proxy_connections_total{workload=\"pod-one\"}"),
        Some(2.0),
        "{text}"
    );
    // The plugin named each pod (CNI_ARGS): its samples carry it, after the other labels.
    assert_eq!(
        metric(
            &text,
            "redirect_proxy_connections_total{workload=\"pod-one\",namespace=\"default\",pod=\"pod-one\"}"
        ),
        Some(2.0),
        "{text}"
    );
    assert!(
        metric(
            &text,
            "redirect_proxy_bytes_total{workload=\"pod-one\",direction=\"to_upstream\"}"
        )
        .unwrap()
            > 0.0
    );
    assert_eq!(metric(&text, "redirect_map_entries{map=\"WORKLOADS\"}"), Some(3.0));
    assert_eq!(
        metric(&text, "redirect_map_max_entries{map=\"WORKLOADS\"}"),
        Some(f64::from(redirect_common::MAX_WORKLOADS))
    );

    // DEL: pod-two is released at once, the others keep their capture; DEL again is fine.
    let conf = agent.cni_conf(json!({}));
    let del = agent.cni("DEL", "pod-two", Some(&w2.pair.workload.path), &conf);
    assert!(del.status.success(), "DEL: {:?} {}", del.stdout, del.stderr);
    assert!(agent.cni("DEL", "pod-two", None, &conf).status.success());
    assert_eq!(agent.ids(), ["pod-one", "pod-three"]);
    assert_eq!(in_from_remote(&w2), Inbound::Direct);
    assert_eq!(in_from_remote(&w1), Inbound::Proxied);
    let check = agent.cni("CHECK", "pod-two", Some(&w2.pair.workload.path), &conf);
    assert!(!check.status.success(), "CHECK of a removed pod must fail");
    assert_eq!(check.stdout["code"], 101, "{:?}", check.stdout);
    let pins = std::fs::read_dir(format!("/sys/fs/bpf/redirect/{}/links", agent.name))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("sk_lookup-")
        })
        .count();
    assert_eq!(pins, 2, "one sk_lookup link per enrolled namespace");

    // Restart under load: the two remaining pods, both ways, through a handover.
    let w3_echo = TestServer::start(&w3.pair.remote, w3.remote(8081), "remote-8081").unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let _stop_on_exit = StopOnDrop(stop.clone());
    let ok = Arc::new(AtomicU64::new(0));
    let loops = [
        load(&w1.pair.workload, w1.remote(REMOTE_PORT), stop.clone(), ok.clone()), // captured
        load(&w1.pair.remote, w1.pod(APP_PORT), stop.clone(), ok.clone()),         // captured
        load(&w3.pair.workload, w3.remote(8081), stop.clone(), ok.clone()),        // captured
        load(&w3.pair.remote, w3.pod(APP_PORT), stop.clone(), ok.clone()),         // -d 9080: direct
    ];
    let wait_for = |above: u64| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while ok.load(Ordering::Relaxed) <= above && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    wait_for(40);
    let second = agent.start().expect("a new agent takes over");
    let at_handover = ok.load(Ordering::Relaxed);
    wait_for(at_handover + 200);
    stop.store(true, Ordering::Relaxed);
    let failures: Vec<String> = loops.into_iter().flat_map(|h| h.join().unwrap()).collect();
    let (status, first_log) = first.wait(Duration::from_secs(30));
    assert!(failures.is_empty(), "{failures:?}\n{first_log}\n{}", second.log());
    assert!(status.is_some_and(|s| s.success()), "{first_log}");
    let total = ok.load(Ordering::Relaxed);
    assert!(total > at_handover + 200, "{at_handover} -> {total}");
    println!(
        "three pods, one removed, restart under load: {total} requests ({at_handover} by the time the new agent was ready), 0 failed"
    );
    // After the restart each pod still lands per its own flags, and is still named.
    assert_eq!(agent.ids(), ["pod-one", "pod-three"]);
    let list: serde_json::Value = serde_json::from_slice(&agent.cli(&["list", "--json"]).stdout).unwrap();
    assert_eq!(
        list[0]["pod"],
        json!({ "namespace": "default", "name": "pod-one" }),
        "{list}"
    );
    assert_eq!(out_to_remote(&w1), proxied(OUTBOUND_CAPTURE, "remote"));
    assert_eq!(in_from_remote(&w1), Inbound::Proxied);
    assert_eq!(out_to_remote(&w3), direct("remote"));
    assert_eq!(in_from_remote(&w3), Inbound::Direct);
    assert_eq!(in_from_remote(&w2), Inbound::Direct);
    drop(w3_echo);
}

#[test]
fn bad_enrollments_are_refused_and_change_nothing() {
    // The fast path off whatever the kernel: an enroll that asks for it is refused.
    let agent = NodeAgent::new("node-bad", &["--fast-path=off"]);
    let _p = agent.start().expect("node agent starts");
    let good = Workload::new_on("nb1", 41);
    let same_ip = Workload::new_on("nb2", 41);
    let other = Workload::new_on("nb3", 42);
    let ns = good.pair.workload.path.to_string_lossy().into_owned();
    let free = other.pair.workload.path.to_string_lossy().into_owned();
    let enroll = |args: &[&str]| {
        let mut all = vec!["enroll"];
        all.extend_from_slice(args);
        let out = agent.cli(&all);
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        )
    };
    assert_eq!(enroll(&["--netns", &ns, "--id", "good"]).0, Some(0));
    let before = agent.scrape("/metrics").unwrap().1;
    let cases: [(&[&str], &str); 9] = [
        (
            &["--netns", "/run/netns/does-not-exist", "--id", "x"],
            "/run/netns/does-not-exist",
        ),
        (
            &["--netns", "/proc/self/ns/net", "--id", "host"],
            "the agent's own network namespace",
        ),
        (&["--netns", &ns, "--id", "good"], "workload 'good' is already enrolled"),
        (
            &["--netns", &ns, "--id", "again"],
            "is already enrolled as workload 'good'",
        ),
        (
            &["--netns", &free, "--id", "cg", "--cgroup", "/tmp"],
            "'/tmp' is not a cgroup v2 directory",
        ),
        (
            &["--netns", &free, "--id", "ports", "--", "-p", "15001", "-z", "15001"],
            "both 15001",
        ),
        (
            &["--netns", &free, "--id", "cidr", "--", "-i", "10.0.0.0/33"],
            "'10.0.0.0/33'",
        ),
        (&["--netns", &free, "--id", "proxy", "--proxy", "envoy"], "'envoy'"),
        (
            &["--netns", &free, "--id", "fp", "--fast-path"],
            "the fast path is off on this node agent",
        ),
    ];
    for (args, want) in cases {
        let (code, err) = enroll(args);
        // 1: the agent refused it; 2: the CLI's own parser did (usage).
        assert!(matches!(code, Some(1 | 2)), "{args:?}: {code:?} {err}");
        assert!(err.contains(want), "{args:?}: expected '{want}' in: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    }
    assert_eq!(agent.ids(), ["good"]);
    let after = agent.scrape("/metrics").unwrap().1;
    for m in ["WORKLOADS", "LOCAL_ADDRS", "POD_ADDRS"] {
        let series = format!("redirect_map_entries{{map=\"{m}\"}}");
        assert_eq!(metric(&before, &series), metric(&after, &series), "{m}");
    }
    // The plugin: a bad configuration and a refused pod are CNI errors on stdout.
    let mut conf = agent.cni_conf(json!({}));
    conf["cniVersion"] = json!("0.2.0");
    let out = agent.cni("ADD", "p", Some(&same_ip.pair.workload.path), &conf);
    assert!(!out.status.success());
    assert_eq!(out.stdout["code"], 1, "{:?}", out.stdout);
    // Checked by the plugin, as istio-cni checks it, before the agent is asked.
    let conf = agent.cni_conf(json!({ "traffic.sidecar.istio.io/includeInboundPorts": "http" }));
    let out = agent.cni("ADD", "p", Some(&same_ip.pair.workload.path), &conf);
    assert_eq!(out.stdout["code"], 102, "{:?}", out.stdout);
    assert!(
        out.stdout["msg"].as_str().unwrap().contains("'http'"),
        "{:?}",
        out.stdout
    );
    // A flag only the agent can judge: its one-line refusal, as code 100.
    let mut conf = agent.cni_conf(json!({}));
    conf["args"] = json!(["-p", "70000"]);
    let out = agent.cni("ADD", "p", Some(&same_ip.pair.workload.path), &conf);
    assert_eq!(out.stdout["code"], 100, "{:?}", out.stdout);
    assert!(
        out.stdout["msg"].as_str().unwrap().contains("70000"),
        "{:?}",
        out.stdout
    );
    let out = agent.cni("ADD", "p", None, &agent.cni_conf(json!({})));
    assert_eq!(out.stdout["code"], 4, "{:?}", out.stdout);
    assert_eq!(agent.ids(), ["good"]);
    // A second agent under the same name is refused while this one serves... by handing over
    // instead, so a clash is only possible with a stuck agent; `cleanup` refuses a live one.
    let out = redirect_tests::agent_cmd(&["cleanup", "--name", &agent.name]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is running"));
}

#[test]
fn a_workload_with_its_own_proxy_is_captured_and_told_original_destinations() {
    let agent = NodeAgent::new("node-own", &[]);
    let _p = agent.start().expect("node agent starts");
    let w = Workload::new_on("no", 71);
    let conf = agent.cni_conf(json!({ "redirect.dev/proxy": "none" }));
    let add = agent.cni("ADD", "pod-envoy", Some(&w.pair.workload.path), &conf);
    assert!(add.status.success(), "{:?} {}", add.stdout, add.stderr);
    // No proxy yet: captured connections fail at once, both ways.
    let r = w.probe(&w.spec(w.remote(REMOTE_PORT)));
    assert_eq!(landing(&r), Landing::Failed(redirect_tests::Outcome::Refused), "{r:?}");
    assert_eq!(inbound(&w, APP_PORT), Inbound::Failed(redirect_tests::Outcome::Refused));

    let _proxy = PodProxy::start(&w);
    let deadline = Instant::now() + Duration::from_secs(20);
    let r = loop {
        let r = w.probe(&w.spec(w.remote(REMOTE_PORT)));
        if landing(&r) != Landing::Failed(redirect_tests::Outcome::Refused) || Instant::now() > deadline {
            break r;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(landing(&r), proxied(OUTBOUND_CAPTURE, "remote"), "{r:?}");
    assert!(r.intact, "{r:?}");
    // The workload proxy's listener was registered for sk_lookup when it listened.
    assert_eq!(inbound(&w, APP_PORT), Inbound::Proxied);
    let (_, text) = agent.scrape("/metrics").unwrap();
    let event = |e: &str| {
        metric(
            &text,
            &format!("redirect_events_total{{workload=\"pod-envoy\",event=\"{e}\"}}"),
        )
    };
    assert_eq!(event("inbound_no_listener"), Some(1.0), "{text}");
    assert!(event("orig_dst_answered").unwrap() >= 2.0, "{text}");
    // The agent runs no proxy for it.
    assert_eq!(
        metric(&text, "redirect_proxy_connections_total{workload=\"pod-envoy\"}"),
        None
    );
}

/// `node --fast-path`: sock_ops, attached at the root, sees the proxy's own sockets too, so the
/// local pairs of a workload enrolled with `--fast-path` (and only those) join the sockhash
/// with no help from user space.
#[test]
fn the_fast_path_carries_the_local_pairs_of_the_workloads_that_ask() {
    let agent = NodeAgent::new("node-fp", &["--fast-path"]);
    let mut first = agent.start().expect("node agent starts");
    let fast = Workload::new_on("nf1", 91);
    let plain = Workload::new_on("nf2", 92);
    for (w, id, extra) in [(&fast, "fast", Some("--fast-path")), (&plain, "plain", None)] {
        agent.enroll(&w.pair.workload.path, id, extra.as_slice());
    }
    for w in [&fast, &plain] {
        let r = w.probe(&w.spec(w.remote(REMOTE_PORT)).bytes(1 << 20).tokio());
        assert_eq!(landing(&r), proxied(OUTBOUND_CAPTURE, "remote"), "{r:?}");
        assert!(r.intact && r.received == 1 << 20, "{r:?}");
        let r = w.probe(&w.from_remote(w.pod(APP_PORT)).bytes(1 << 20).tokio());
        assert!(r.intact && r.received == 1 << 20, "{r:?}");
        assert!(r.banner_field("peer").unwrap().starts_with("127.0.0.6:"), "{r:?}");
    }
    let (_, text) = agent.scrape("/metrics").unwrap();
    let event = |id: &str, e: &str| {
        metric(
            &text,
            &format!("redirect_events_total{{workload=\"{id}\",event=\"{e}\"}}"),
        )
        .unwrap()
    };
    // Both ends of app -> 15001 and of proxy (127.0.0.6) -> app.
    assert!(event("fast", "fast_path_enrolled") >= 4.0, "{text}");
    assert!(event("fast", "fast_path_redirected") >= 1.0, "{text}");
    assert_eq!(event("plain", "fast_path_enrolled"), 0.0, "{text}");
    // Every sender state goes with its socket.
    let deadline = Instant::now() + Duration::from_secs(5);
    let senders = loop {
        let (_, text) = agent.scrape("/metrics").unwrap();
        let n = metric(&text, "redirect_map_entries{map=\"FAST_PATH_SENDERS\"}").unwrap();
        if n == 0.0 || Instant::now() > deadline {
            break n;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(senders, 0.0);
    println!(
        "fast path: enrolled {}, redirected {}, declined {}",
        event("fast", "fast_path_enrolled"),
        event("fast", "fast_path_redirected"),
        event("fast", "fast_path_declined")
    );

    // The setting is part of the pinned maps: a start without it is refused, and the running
    // agent goes on.
    let err = refused_node_start(&agent.name, &agent.socket);
    assert!(err.contains("were made with --fast-path on"), "{err}");
    assert_eq!(agent.state().unwrap().pid, first.pid());
    // After a handover the sockhash runs the new agent's programs, and new pairs still take
    // the fast path.
    let second = agent.start().expect("a new agent takes over");
    let (status, log) = first.wait(Duration::from_secs(30));
    assert!(status.is_some_and(|s| s.success()), "{log}");
    let r = fast.probe(&fast.spec(fast.remote(REMOTE_PORT)).bytes(1 << 20).tokio());
    assert!(r.intact && r.received == 1 << 20, "{r:?}\n{}", second.log());
    let (_, after) = agent.scrape("/metrics").unwrap();
    let redirected = metric(
        &after,
        "redirect_events_total{workload=\"fast\",event=\"fast_path_redirected\"}",
    )
    .unwrap();
    assert!(redirected > event("fast", "fast_path_redirected"), "{after}");
}

/// `enroll --cgroup`: ISTIO_OUTPUT is that cgroup's only, as with `run --cgroup`; inbound
/// capture stays the namespace's (PREROUTING has no owner).
#[test]
fn an_enrolled_cgroup_narrows_outbound_capture_to_its_processes() {
    let agent = NodeAgent::new("node-cg", &[]);
    let _p = agent.start().expect("node agent starts");
    let w = Workload::new_on("ncg", 101);
    let other = redirect_testkit::cgroup::TestCgroup::create("ncg-other").unwrap();
    agent.enroll(
        &w.pair.workload.path,
        "scoped",
        &["--cgroup", &w.cgroup.path.to_string_lossy()],
    );
    let inside = w.probe(&w.spec(w.remote(REMOTE_PORT)));
    assert_eq!(landing(&inside), proxied(OUTBOUND_CAPTURE, "remote"), "{inside:?}");
    let elsewhere = redirect_testkit::probe::ProbeSpec::new(&other.path, &w.pair.workload.path, w.remote(REMOTE_PORT));
    let r = w.probe(&elsewhere);
    assert_eq!(landing(&r), direct("remote"), "same namespace, another cgroup: {r:?}");
    assert_eq!(inbound(&w, APP_PORT), Inbound::Proxied);
    let out = agent.cli(&["list", "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list[0]["cgroup"], json!(w.cgroup.path));
}
