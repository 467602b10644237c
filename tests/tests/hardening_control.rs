//! The control socket and the node agent's endpoints under a hostile or careless client (issue
//! 16, items 8 and 10): a handover only to a successor of this instance, no wait that holds up
//! the API, no exit on a client's word, nothing attached by a start whose socket or metrics
//! port cannot be had.

use std::{
    io::Write as _,
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use redirect_agent::engine::pins::{pin_dir, state_path};
use redirect_testkit::unique;
use redirect_tests::{
    OUTBOUND_CAPTURE, REMOTE_PORT, Workload, agent_cmd, agent_cmd_within, landing,
    node::{HandoverPeer, NodeAgent},
    proxied,
};

/// `cleanup --name NAME` on drop, for a start that must have been refused (and so, if it was
/// not, leaves pins or a state file of that name).
struct Cleanup(String);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = agent_cmd(&["cleanup", "--name", &self.0]);
    }
}

/// The running agent serves on: same process in its state, its API answers, the workload's
/// connections go through its proxy.
fn serves_on(agent: &NodeAgent, pid: u32, w: &Workload, id: &str) {
    assert_eq!(
        agent.state().map(|s| s.pid),
        Some(pid),
        "the state names the same agent"
    );
    let out = agent_cmd_within(
        &["list", "--json", "--socket", &agent.socket.to_string_lossy()],
        Duration::from_secs(20),
    )
    .expect("list answers");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains(id));
    assert_eq!(
        landing(&w.probe(&w.spec(w.remote(REMOTE_PORT)))),
        proxied(OUTBOUND_CAPTURE, "remote")
    );
}

/// A root client that asks for a handover is not a successor: refused at once, with nothing
/// handed. So is an agent-named process that does not await the instance's lock.
#[test]
fn a_handover_is_refused_to_a_client_that_is_not_a_successor() {
    let agent = NodeAgent::new("ctl-fake", &[]);
    let p = agent.start().expect("node agent starts");
    let w = Workload::new_on("cf", 162);
    agent.enroll(&w.pair.workload.path, "fake", &[]);

    let s = UnixStream::connect(&agent.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    (&s).write_all(b"{\"op\":\"handover\"}\n").unwrap();
    let answer: serde_json::Value = serde_json::from_slice(&redirect_api::read_line(&s).unwrap()).unwrap();
    assert!(
        answer.get("handover").is_none(),
        "nothing is handed to a client: {answer}"
    );
    let message = answer["error"]["message"].as_str().unwrap_or_default().to_owned();
    assert!(
        message.contains("handover refused") && message.contains("not 'redirect-agent'"),
        "{answer}"
    );
    drop(s);

    let (status, out, err) =
        HandoverPeer::start(&agent, "serving", false, Duration::ZERO).finish(Duration::from_secs(30));
    assert!(status.is_some(), "{out} {err}");
    assert!(
        out.contains("lock file"),
        "refused for not awaiting the lock: {out} {err}"
    );
    assert!(!out.contains("descriptors"), "{out}");
    serves_on(&agent, p.pid(), &w, "fake");
}

/// A node started under another name with this agent's socket asks it for a handover: the
/// running agent refuses (the peer awaits another instance's lock), so the start fails with
/// one line and the running agent keeps its workloads.
#[test]
fn a_successor_under_another_name_is_refused_and_the_agent_serves_on() {
    let agent = NodeAgent::new("ctl-other", &[]);
    let p = agent.start().expect("node agent starts");
    let w = Workload::new_on("co", 163);
    agent.enroll(&w.pair.workload.path, "mine", &[]);
    let other = unique("ctl-other2");
    let _cleanup = Cleanup(other.clone());
    let out = agent_cmd_within(
        &[
            "node",
            "--name",
            &other,
            "--socket",
            &agent.socket.to_string_lossy(),
            "--metrics",
            "off",
        ],
        Duration::from_secs(30),
    )
    .expect("the start is refused, not left running");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("refused to hand over"), "{err}");
    assert!(!pin_dir(&other).exists(), "nothing attached under {other}");
    serves_on(&agent, p.pid(), &w, "mine");
}

/// A successor that asks and then stalls, and clients that connect and send nothing, hold up
/// no other request: `list` answers meanwhile, enrollments are told to retry until the
/// handover ends, then succeed.
#[test]
fn a_stalled_handover_or_client_holds_up_no_other_request() {
    let agent = NodeAgent::new("ctl-stall", &[]);
    let p = agent.start().expect("node agent starts");
    let w = Workload::new_on("cs", 164);
    agent.enroll(&w.pair.workload.path, "first", &[]);
    let silent: Vec<UnixStream> = (0..4).map(|_| UnixStream::connect(&agent.socket).unwrap()).collect();
    let mut peer = HandoverPeer::start(&agent, "asked", true, Duration::from_secs(60));
    let answer = peer.answer();
    assert!(answer.contains("\"handover\""), "the handover started: {answer}");

    let out = agent_cmd_within(
        &["list", "--json", "--socket", &agent.socket.to_string_lossy()],
        Duration::from_secs(15),
    )
    .expect("list answers while a handover stalls");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("first"));

    let w2 = Workload::new_on("cs2", 165);
    let netns = w2.pair.workload.path.to_string_lossy().into_owned();
    let enroll = || {
        agent_cmd_within(
            &[
                "enroll",
                "--socket",
                &agent.socket.to_string_lossy(),
                "--netns",
                &netns,
                "--id",
                "second",
            ],
            Duration::from_secs(15),
        )
        .expect("enroll answers while a handover stalls")
    };
    let out = enroll();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("handing the node over"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The stalled successor goes: the handover ends at once and changes are taken again.
    let _ = peer.finish(Duration::ZERO);
    drop(silent);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = enroll();
        if out.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "enroll after the handover ended: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    serves_on(&agent, p.pid(), &w, "second");
}

/// A successor that goes through the whole exchange and says it serves, without having
/// attached anything, is not believed: the agent checks the pinned links, answers that it
/// refuses, and serves on with its own programs.
#[test]
fn a_handover_completed_without_attaching_does_not_stop_the_agent() {
    let agent = NodeAgent::new("ctl-word", &[]);
    let p = agent.start().expect("node agent starts");
    let w = Workload::new_on("cw", 166);
    agent.enroll(&w.pair.workload.path, "kept", &[]);
    let (status, out, err) =
        HandoverPeer::start(&agent, "serving", true, Duration::ZERO).finish(Duration::from_secs(90));
    assert!(status.is_some_and(|s| s.success()), "{out} {err}");
    let last = out.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("refused:") && last.contains("attached nothing"),
        "the agent says why it does not stop: {out}"
    );
    assert!(p.log().contains("serving on"), "{}", p.log());
    serves_on(&agent, p.pid(), &w, "kept");
}

/// `node --socket` at a path it could never bind is refused before anything is attached: no
/// pins, no state, one line naming the path.
#[test]
fn an_unusable_socket_path_is_refused_before_anything_is_attached() {
    let base = std::env::temp_dir().join(unique("ctl-sock"));
    std::fs::create_dir_all(&base).unwrap();
    struct Gone(PathBuf);
    impl Drop for Gone {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _base = Gone(base.clone());
    let file = base.join("file");
    std::fs::write(&file, b"not a directory").unwrap();
    let dir = base.join("dir.sock");
    std::fs::create_dir(&dir).unwrap();
    let cases: [(PathBuf, &str); 4] = [
        (file.join("node.sock"), "cannot make"),
        (dir, "is a directory"),
        (file.clone(), "is a regular file"),
        // procfs takes no sockets, whoever asks.
        (
            Path::new("/proc").join(format!("{}.sock", unique("ctl"))),
            "cannot bind",
        ),
    ];
    for (socket, why) in cases {
        let name = unique("ctl-sock");
        let _cleanup = Cleanup(name.clone());
        let out = agent_cmd_within(
            &[
                "node",
                "--name",
                &name,
                "--socket",
                &socket.to_string_lossy(),
                "--metrics",
                "off",
            ],
            Duration::from_secs(30),
        )
        .expect("a refused start ends");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{}: {err}", socket.display());
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(
            err.contains(&format!("--socket {}", socket.display())) && err.contains(why),
            "{err}"
        );
        assert!(!pin_dir(&name).exists(), "{}: pins were made", socket.display());
        assert!(!state_path(&name).exists(), "{}: a state was written", socket.display());
    }
    assert_eq!(
        std::fs::read(&file).unwrap(),
        b"not a directory",
        "the file is untouched"
    );
}

/// Two node agents on one metrics port would split the scrapes between them (the kernel
/// spreads connections over SO_REUSEPORT listeners): the second is refused before it attaches
/// anything. A successor of the same instance is handed the port instead.
#[test]
fn a_second_agent_on_the_same_metrics_port_is_refused() {
    let agent = NodeAgent::new("ctl-metrics", &[]);
    let mut first = agent.start().expect("node agent starts");
    let other = unique("ctl-metrics2");
    let _cleanup = Cleanup(other.clone());
    let out = agent_cmd_within(
        &[
            "node",
            "--name",
            &other,
            "--socket",
            &format!("/run/redirect/{other}.sock"),
            "--metrics",
            &agent.metrics.to_string(),
        ],
        Duration::from_secs(30),
    )
    .expect("the start is refused, not left running");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains(&format!("metrics address {} is in use", agent.metrics)),
        "{err}"
    );
    assert!(!pin_dir(&other).exists(), "nothing attached under {other}");
    assert!(agent.scrape("/ready").unwrap().0.contains("200"));

    // A handover passes the listener on: the successor serves the port once the first is gone.
    let second = agent.start().expect("a successor takes over");
    let (status, log) = first.wait(Duration::from_secs(30));
    assert!(status.is_some_and(|s| s.success()), "{log}");
    let (status, body) = agent.scrape("/metrics").unwrap();
    assert!(status.contains("200"), "{status}");
    assert!(body.contains("redirect_agent_uptime_seconds"), "{body}");
    assert_eq!(agent.state().unwrap().pid, second.pid());
}
