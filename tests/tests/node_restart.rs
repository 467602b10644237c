//! Node mode across restarts: a handover under load, adoption after a crash, a successor that
//! dies mid-handover, a name another agent holds, a killed run's pins, pins of another layout,
//! and stopping then `cleanup`.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{Shutdown, TcpStream},
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use redirect_testkit::server::TestServer;
use redirect_tests::{
    APP_PORT, Landing, OUTBOUND_CAPTURE, REMOTE_PORT, Workload, direct, landing,
    node::{HandoverPeer, Inbound, NodeAgent, StopOnDrop, inbound, load, metric, refused_node_start, rule_count},
    proxied,
};
use serde_json::json;

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
            // Past the restart the test makes, however long an agent takes to start (its programs
            // verified under emulation in the 6.1 VM take minutes), and bounded all the same.
            let deadline = Instant::now() + Duration::from_secs(30) + 2 * redirect_testkit::agent::start_timeout();
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
    // The last ISTIO_OUTPUT rule (-j ISTIO_REDIRECT), after the plugin's `-o 15020` pair.
    let total = rule_count(&text, "pod-load", "ISTIO_OUTPUT", 11);
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
fn stopping_keeps_the_pins_and_cleanup_releases_every_workload() {
    let agent = NodeAgent::new("node-clean", &[]);
    let mut p = agent.start().expect("node agent starts");
    let w = Workload::new_on("ncl", 51);
    agent.enroll(&w.pair.workload.path, "c", &[]);
    let programs: Vec<u32> = agent.state().unwrap().programs.values().copied().collect();
    // The cgroup programs; each workload's sk_lookup instance is held by its pinned link.
    assert_eq!(programs.len(), 10);
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
