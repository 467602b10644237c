//! Node mode: workloads enrolled through the CNI plugin, each captured per its own flags by one
//! set of programs at the cgroup root; removal; restarts (handover under load, adoption after a
//! crash); bad input; the metrics endpoint; cleanup.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{Shutdown, SocketAddrV4, TcpStream},
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use redirect_testkit::{netns::NamedNetns, server::TestServer};
use redirect_tests::{
    APP_PORT, Landing, OUTBOUND_CAPTURE, REMOTE_PORT, Workload, direct, landing,
    node::{HandoverPeer, NodeAgent, metric, refused_node_start},
    proxied,
};
use serde_json::json;

/// Where a connection from the remote host to the pod's `port` landed: sk_lookup rewrites
/// nothing, so the app telling 127.0.0.6 as its peer is what shows it crossed the proxy.
#[derive(Debug, PartialEq, Eq)]
enum Inbound {
    Proxied,
    Direct,
    Failed(redirect_tests::Outcome),
}

fn inbound(w: &Workload, port: u16) -> Inbound {
    let r = w.probe(&w.from_remote(w.pod(port)));
    match landing(&r) {
        Landing::Failed(o) => Inbound::Failed(o),
        _ if r.banner_field("peer").is_some_and(|p| p.starts_with("127.0.0.6:")) => Inbound::Proxied,
        _ => Inbound::Direct,
    }
}

/// Connections rule `rule` (1-based) of iptables' `chain` decided for workload `id`, from a
/// scrape.
fn rule_count(text: &str, id: &str, chain: &str, rule: usize) -> u64 {
    let prefix = format!(
        "redirect_rule_connections_total{{workload=\"{id}\",family=\"ipv4\",chain=\"{chain}\",rule=\"{rule}\","
    );
    text.lines()
        .find(|l| l.starts_with(&prefix))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {prefix} in:\n{text}"))
}

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
    let last_output = 9;
    assert_eq!(rule_count(&text, "pod-one", "ISTIO_OUTPUT", last_output), 1, "{text}");
    assert_eq!(rule_count(&text, "pod-two", "ISTIO_OUTPUT", last_output), 0, "{text}");
    assert_eq!(metric(&text, "redirect_workloads"), Some(3.0));
    assert_eq!(
        metric(&text, "redirect_proxy_connections_total{workload=\"pod-one\"}"),
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
    assert_eq!(metric(&text, "redirect_map_max_entries{map=\"WORKLOADS\"}"), Some(64.0));

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
    // After the restart each pod still lands per its own flags.
    assert_eq!(agent.ids(), ["pod-one", "pod-three"]);
    assert_eq!(out_to_remote(&w1), proxied(OUTBOUND_CAPTURE, "remote"));
    assert_eq!(in_from_remote(&w1), Inbound::Proxied);
    assert_eq!(out_to_remote(&w3), direct("remote"));
    assert_eq!(in_from_remote(&w3), Inbound::Direct);
    assert_eq!(in_from_remote(&w2), Inbound::Direct);
    drop(w3_echo);
}

/// A loop of fresh connections, each checked end to end, counted until `stop`. Bounded in
/// count and time.
fn load(
    netns: &NamedNetns,
    to: SocketAddrV4,
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
) -> std::thread::JoinHandle<Vec<String>> {
    let ns = netns.open().unwrap();
    std::thread::spawn(move || {
        ns.enter_current_thread().unwrap();
        let mut failures = Vec::new();
        let payload = vec![b'x'; 4096];
        let deadline = Instant::now() + Duration::from_secs(60);
        for _ in 0..20_000 {
            if stop.load(Ordering::Relaxed) || Instant::now() > deadline {
                break;
            }
            let r = (|| -> std::io::Result<()> {
                let mut s = TcpStream::connect_timeout(&to.into(), Duration::from_secs(5))?;
                s.set_read_timeout(Some(Duration::from_secs(10)))?;
                s.write_all(&payload)?;
                s.shutdown(Shutdown::Write)?;
                let mut back = Vec::new();
                s.read_to_end(&mut back)?;
                let text = String::from_utf8_lossy(&back);
                let (banner, body) = text.split_once('\n').unwrap_or(("", ""));
                if !banner.starts_with("REDIRECT-TEST") || body.as_bytes() != payload.as_slice() {
                    return Err(std::io::Error::other(format!(
                        "bad answer: {banner:?}, {} bytes",
                        body.len()
                    )));
                }
                Ok(())
            })();
            match r {
                Ok(()) => {
                    ok.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => failures.push(e.to_string()),
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        failures
    })
}

struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

#[test]
fn a_restart_under_load_hands_over_without_a_failed_request() {
    let agent = NodeAgent::new("node-restart", &["--drain-timeout-ms", "60000"]);
    let mut first = agent.start().expect("node agent starts");
    let w = Workload::new_on("nr", 21);
    let echo = TestServer::start(&w.pair.remote, w.remote(8081), "echo-remote").unwrap();
    let conf = agent.cni_conf(json!({}));
    let add = agent.cni("ADD", "pod-load", Some(&w.pair.workload.path), &conf);
    assert!(add.status.success(), "{:?} {}", add.stdout, add.stderr);

    let stop = Arc::new(AtomicBool::new(false));
    // A failing assertion stops the load too, rather than leave it running to its deadline.
    let _stop_on_exit = StopOnDrop(stop.clone());
    let (out_ok, in_ok) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    // Outbound from the pod (captured by connect4, served on 15001) and inbound from the
    // remote host (sk_lookup to 15006).
    let loops = 3;
    let outbound: Vec<_> = (0..loops)
        .map(|_| load(&w.pair.workload, w.remote(REMOTE_PORT), stop.clone(), out_ok.clone()))
        .collect();
    let inbound: Vec<_> = (0..loops)
        .map(|_| load(&w.pair.remote, w.pod(APP_PORT), stop.clone(), in_ok.clone()))
        .collect();
    // And one connection established before the restart that keeps talking through it.
    let long_lived = {
        let ns = w.pair.workload.open().unwrap();
        let to = w.remote(8081);
        let stop = stop.clone();
        std::thread::spawn(move || -> std::io::Result<u64> {
            ns.enter_current_thread()?;
            let s = TcpStream::connect_timeout(&to.into(), Duration::from_secs(5))?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            let mut r = BufReader::new(s.try_clone()?);
            let mut banner = String::new();
            r.read_line(&mut banner)?;
            assert!(banner.contains("name=echo-remote"), "{banner}");
            let mut trips = 0u64;
            let deadline = Instant::now() + Duration::from_secs(60);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                let msg = format!("{trips:08}");
                (&s).write_all(msg.as_bytes())?;
                let mut back = [0u8; 8];
                r.read_exact(&mut back)?;
                assert_eq!(&back, msg.as_bytes());
                trips += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            s.shutdown(Shutdown::Write)?;
            let mut rest = Vec::new();
            r.read_to_end(&mut rest)?;
            Ok(trips)
        })
    };
    let wait_for = |counter: &AtomicU64, above: u64| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while counter.load(Ordering::Relaxed) <= above && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    wait_for(&out_ok, 20);
    wait_for(&in_ok, 20);
    let before = (out_ok.load(Ordering::Relaxed), in_ok.load(Ordering::Relaxed));

    let old_programs: Vec<u32> = agent.state().unwrap().programs.values().copied().collect();
    let second = agent.start().expect("the new agent takes over");
    assert_eq!(agent.state().unwrap().pid, second.pid());
    assert!(second.log().contains("a running agent handed over"), "{}", second.log());
    let at_handover = (out_ok.load(Ordering::Relaxed), in_ok.load(Ordering::Relaxed));
    wait_for(&out_ok, at_handover.0 + 100);
    wait_for(&in_ok, at_handover.1 + 100);
    stop.store(true, Ordering::Relaxed);
    let out_failures: Vec<String> = outbound.into_iter().flat_map(|h| h.join().unwrap()).collect();
    let in_failures: Vec<String> = inbound.into_iter().flat_map(|h| h.join().unwrap()).collect();
    let trips = long_lived.join().unwrap();
    // The predecessor exits once its last connection (the long-lived one) is done.
    let (status, first_log) = first.wait(Duration::from_secs(30));
    assert!(
        status.is_some_and(|s| s.success()),
        "first agent: {status:?}\n{first_log}"
    );
    assert!(first_log.contains("handed over"), "{first_log}");
    // Every link moved to the new process's programs (BPF_LINK_UPDATE), so with the old
    // process gone its programs are gone from the kernel.
    let new_programs: Vec<u32> = agent.state().unwrap().programs.values().copied().collect();
    for id in &old_programs {
        assert!(!new_programs.contains(id), "{old_programs:?} {new_programs:?}");
        let shown = std::process::Command::new("bpftool")
            .args(["prog", "show", "id", &id.to_string()])
            .output()
            .unwrap();
        assert!(!shown.status.success(), "old program {id} is still loaded");
    }

    let after = (out_ok.load(Ordering::Relaxed), in_ok.load(Ordering::Relaxed));
    assert!(
        out_failures.is_empty(),
        "outbound failures: {out_failures:?}\n{first_log}\n{}",
        second.log()
    );
    assert!(
        in_failures.is_empty(),
        "inbound failures: {in_failures:?}\n{first_log}\n{}",
        second.log()
    );
    let trips = trips.unwrap_or_else(|e| panic!("long-lived connection: {e}\n{first_log}\n{}", second.log()));
    // Not vacuous: requests went before the restart and after it, on both sides, and the new
    // agent served some.
    assert!(before.0 > 20 && before.1 > 20, "{before:?}");
    assert!(
        after.0 > at_handover.0 + 100 && after.1 > at_handover.1 + 100,
        "{at_handover:?} -> {after:?}"
    );
    println!(
        "requests (outbound, inbound): {before:?} before the restart, {at_handover:?} when the new agent was \
         ready, {after:?} in all, 0 failed"
    );
    assert!(trips > 10, "{trips}");
    println!("long-lived connection: {trips} round trips across the restart");
    assert_eq!(agent.scrape("/ready").unwrap().0, "HTTP/1.1 200 OK");
    let (_, text) = agent.scrape("/metrics").unwrap();
    let served = metric(&text, "redirect_proxy_connections_total{workload=\"pod-load\"}").unwrap();
    assert!(served >= 200.0, "the new agent served {served}:\n{text}");
    // Counters live in the pinned maps: the restart did not reset them.
    let total = rule_count(&text, "pod-load", "ISTIO_OUTPUT", 9);
    assert!(total >= after.0, "{total} < {}", after.0);
    drop(echo);
}

#[test]
fn after_a_crash_the_next_agent_adopts_the_pins_and_the_workloads() {
    let agent = NodeAgent::new("node-crash", &[]);
    let mut first = agent.start().expect("node agent starts");
    let w = Workload::new_on("nc", 31);
    agent.enroll(&w.pair.workload.path, "crashy", &["--", "-d", ""]);
    assert_eq!(
        landing(&w.probe(&w.spec(w.remote(REMOTE_PORT)))),
        proxied(OUTBOUND_CAPTURE, "remote")
    );
    let log = first.kill();
    // No agent: the pinned programs still capture, and a captured connection is refused at
    // once (nothing listens on the capture port), as with iptables while the sidecar is down.
    let r = w.probe(&w.spec(w.remote(REMOTE_PORT)));
    assert_eq!(
        landing(&r),
        Landing::Failed(redirect_tests::Outcome::Refused),
        "{r:?}\n{log}"
    );
    let second = agent.start().expect("a new agent adopts");
    assert_eq!(agent.ids(), ["crashy"]);
    assert_eq!(
        landing(&w.probe(&w.spec(w.remote(REMOTE_PORT)))),
        proxied(OUTBOUND_CAPTURE, "remote")
    );
    assert_eq!(inbound(&w, APP_PORT), Inbound::Proxied);
    assert!(second.log().contains("workload adopted"), "{}", second.log());
    // The counters live in the pinned maps: the connection before the crash, the refused one
    // during it and the one after are all on ISTIO_REDIRECT's rule. `stats` names the workload.
    let out = redirect_tests::agent_cmd(&["stats", "--name", &agent.name, "--json"]);
    let stats: redirect_agent::stats::InstanceStats = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(stats.workloads.len(), 1);
    assert_eq!(stats.workloads[0].id.as_deref(), Some("crashy"));
    let redirect = stats.workloads[0]
        .rules
        .iter()
        .find(|r| r.chain == "ISTIO_OUTPUT" && r.target == "ISTIO_REDIRECT")
        .unwrap();
    assert_eq!(redirect.connections, 3, "{stats:?}");
    // The flags survived with it: with -d '' a connection to 15020 (where nothing listens)
    // is captured, so the proxy resets it; with the defaults the kernel would refuse it.
    assert_eq!(inbound(&w, 15020), Inbound::Failed(redirect_tests::Outcome::Reset));
}

#[test]
fn bad_enrollments_are_refused_and_change_nothing() {
    let agent = NodeAgent::new("node-bad", &[]);
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
            "does not offer the fast path",
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
    let conf = agent.cni_conf(json!({ "traffic.sidecar.istio.io/includeInboundPorts": "http" }));
    let out = agent.cni("ADD", "p", Some(&same_ip.pair.workload.path), &conf);
    assert_eq!(out.stdout["code"], 100, "{:?}", out.stdout);
    assert!(
        out.stdout["msg"].as_str().unwrap().contains("'http'"),
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
fn stopping_keeps_the_pins_and_cleanup_releases_every_workload() {
    let agent = NodeAgent::new("node-clean", &[]);
    let mut p = agent.start().expect("node agent starts");
    let w = Workload::new_on("ncl", 51);
    agent.enroll(&w.pair.workload.path, "c", &[]);
    let programs: Vec<u32> = agent.state().unwrap().programs.values().copied().collect();
    // The cgroup programs; each workload's sk_lookup instance is held by its pinned link.
    assert_eq!(programs.len(), 6);
    let (status, log) = p.stop(Duration::from_secs(10));
    assert!(status.is_some_and(|s| s.success()), "{log}");
    let pins = format!("/sys/fs/bpf/redirect/{}", agent.name);
    assert!(std::path::Path::new(&pins).join("links/redirect_connect4").exists());
    // The pinned programs are the ones the state names.
    let shown = std::process::Command::new("bpftool")
        .args([
            "-j",
            "prog",
            "show",
            "pinned",
            &format!("{pins}/programs/redirect_connect4"),
        ])
        .output()
        .unwrap();
    let shown: serde_json::Value = serde_json::from_slice(&shown.stdout).unwrap();
    assert!(programs.contains(&(shown["id"].as_u64().unwrap() as u32)), "{shown}");
    let out = redirect_tests::agent_cmd(&["cleanup", "--name", &agent.name]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!std::path::Path::new(&pins).exists());
    // Released: the programs are gone from the kernel and connections go direct again.
    for id in programs {
        let shown = std::process::Command::new("bpftool")
            .args(["prog", "show", "id", &id.to_string()])
            .output()
            .unwrap();
        assert!(!shown.status.success(), "program {id} is still loaded");
    }
    assert_eq!(landing(&w.probe(&w.spec(w.remote(REMOTE_PORT)))), direct("remote"));
    let out = redirect_tests::agent_cmd(&["cleanup", "--name", &agent.name]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("nothing"), "{out:?}");
}

#[test]
fn a_node_agent_under_a_name_another_agent_holds_is_refused_at_once() {
    let w = Workload::with_agent("node-taken", &[]);
    let started = Instant::now();
    let err = refused_node_start(&w.name, Path::new(&format!("/run/redirect/{}.sock", w.name)));
    assert!(err.contains("is held by another agent"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(10), "no handover to wait for");
    // The running instance is untouched.
    assert_eq!(
        landing(&w.probe(&w.spec(w.remote(REMOTE_PORT)))),
        proxied(OUTBOUND_CAPTURE, "remote")
    );
}

/// A `run` that was killed leaves its maps pinned under its name. A node agent started under
/// that name later removes them, whatever they were made with (here: `--fast-path`, which a
/// node's own pins would have to match), and serves nothing of the dead run's.
#[test]
fn a_killed_runs_pins_do_not_stop_a_node_of_that_name() {
    let mut w = Workload::with_agent("run-node", &["--fast-path"]);
    let pid = w.agent.as_ref().unwrap().pid().unwrap();
    // SAFETY: signalling our own child; a stale pid cannot be reused before it is reaped below.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let _ = w.agent.as_mut().unwrap().stop();
    assert!(
        std::path::Path::new("/sys/fs/bpf/redirect").join(&w.name).exists(),
        "a killed run cannot remove its pins"
    );
    let agent = NodeAgent::named(&w.name, &[]);
    let p = agent.start().expect("a node agent starts over a killed run's pins");
    assert!(agent.ids().is_empty(), "nothing of the dead run is served");
    assert_eq!(agent.state().unwrap().pid, p.pid());
    // The namespace is free to enroll, and is captured as usual.
    agent.enroll(&w.pair.workload.path, "again", &[]);
    assert_eq!(
        landing(&w.probe(&w.spec(w.remote(REMOTE_PORT)))),
        proxied(OUTBOUND_CAPTURE, "remote")
    );
}

/// `redirect-agent proxy` as the workload's own proxy (Envoy's part): it listens on the
/// capture ports as uid 1337 and asks SO_ORIGINAL_DST, which the root getsockopt program
/// answers.
struct WorkloadProxy(std::process::Child);

impl Drop for WorkloadProxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
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

    let _proxy = WorkloadProxy(
        std::process::Command::new(redirect_tests::agent_bin())
            .args(["proxy", "--netns"])
            .arg(&w.pair.workload.path)
            .arg("--cgroup")
            .arg(&w.cgroup.path)
            .env("RUST_LOG", "warn")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("start the workload's proxy"),
    );
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

/// The predecessor's side of a handover, against a successor that takes the descriptors and
/// dies before it serves: the running agent must serve on, as if nothing had been asked.
#[test]
fn a_successor_that_dies_mid_handover_costs_nothing() {
    let agent = NodeAgent::new("node-half", &[]);
    let p = agent.start().expect("node agent starts");
    let w = Workload::new_on("nh", 81);
    agent.enroll(&w.pair.workload.path, "half", &[]);
    // A successor the agent accepts (an agent process holding the instance's lock file) that
    // takes the descriptors and dies before it serves.
    let (status, out, err) =
        HandoverPeer::start(&agent, "descriptors", true, Duration::ZERO).finish(Duration::from_secs(30));
    assert!(status.is_some_and(|s| s.success()), "{out} {err}");
    let mut lines = out.lines();
    let answer: serde_json::Value = serde_json::from_str(lines.next().unwrap()).unwrap();
    let list = answer["handover"].as_array().unwrap_or_else(|| panic!("{answer}"));
    assert_eq!(list.len(), 1);
    // Each capture port listens on 127.0.0.1 and on ::1.
    assert_eq!(
        list[0]["fds"],
        json!(["netns", "outbound", "outbound", "inbound", "inbound"])
    );
    assert_eq!(lines.next(), Some("descriptors 5"), "{out}");
    assert_eq!(
        landing(&w.probe(&w.spec(w.remote(REMOTE_PORT)))),
        proxied(OUTBOUND_CAPTURE, "remote")
    );
    assert_eq!(inbound(&w, APP_PORT), Inbound::Proxied);
    assert_eq!(agent.ids(), ["half"], "the API still answers");
    assert_eq!(agent.state().unwrap().pid, p.pid());
    let log = p.log();
    assert!(
        log.contains("the successor did not take over") && log.contains("serving on"),
        "{log}"
    );
    let out = agent.cli(&["unenroll", "--netns", &w.pair.workload.path.to_string_lossy()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(agent.ids().is_empty());
    assert_eq!(landing(&w.probe(&w.spec(w.remote(REMOTE_PORT)))), direct("remote"));
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

/// Pinned maps are shared with the programs only by an agent that reads them the same way: a
/// start whose layout differs (an upgrade that changed a shared type) is refused before it
/// asks for a handover, and the running agent serves on.
#[test]
fn pins_of_another_layout_are_refused_before_a_handover() {
    let agent = NodeAgent::new("node-layout", &[]);
    let p = agent.start().expect("node agent starts");
    let w = Workload::new_on("nl", 111);
    agent.enroll(&w.pair.workload.path, "l", &[]);
    // As an older agent would have written it.
    let path = redirect_agent::engine::pins::state_path(&agent.name);
    let mut state: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    state["layout"] = json!("workload2320-rules64-workloads64-events8-tuple24-orig8-pending16-addr16");
    std::fs::write(&path, serde_json::to_vec(&state).unwrap()).unwrap();
    let err = refused_node_start(&agent.name, &agent.socket);
    assert!(
        err.contains("have layout workload2320") && err.contains("cleanup"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(!p.log().contains("handover"), "no handover was asked for: {}", p.log());
    assert_eq!(
        landing(&w.probe(&w.spec(w.remote(REMOTE_PORT)))),
        proxied(OUTBOUND_CAPTURE, "remote")
    );
    assert_eq!(agent.ids(), ["l"]);
}
