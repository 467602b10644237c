//! A restart that cannot serve a workload again keeps it captured (refused), never lets it
//! through: while no agent runs, any process of the pod may bind a capture port, and the next
//! agent then cannot listen there. (Found by review: the workload was released, and its
//! connections went direct from then on.)

use std::{net::TcpListener, time::Duration};

use redirect_tests::{
    Landing, OUTBOUND_CAPTURE, Outcome, REMOTE_PORT, Workload, landing,
    node::{NodeAgent, NodeProcess},
    proxied,
};

/// A listener on 127.0.0.1:15001 inside the workload's namespace, as a pod process could
/// bind while no agent runs.
fn squat(w: &Workload) -> TcpListener {
    w.pair
        .workload
        .open()
        .expect("workload netns")
        .run(|| TcpListener::bind(("127.0.0.1", OUTBOUND_CAPTURE)))
        .expect("bind 127.0.0.1:15001")
}

/// Refused or reset, never reaching the remote host around the proxy.
fn refused(w: &Workload, what: &str) {
    let r = w.probe(&w.spec(w.remote(REMOTE_PORT)));
    assert!(
        matches!(landing(&r), Landing::Failed(Outcome::Refused | Outcome::Reset)),
        "{what}: {r:?}"
    );
    assert!(
        w.remote_server.accepted().is_empty(),
        "{what}: reached the remote host directly"
    );
}

fn kill(w: &mut Workload) {
    let pid = w.agent.as_ref().unwrap().pid().unwrap();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let _ = w.agent.as_mut().unwrap().stop();
}

#[test]
fn a_run_restart_that_cannot_listen_leaves_the_workload_refused() {
    let mut w = Workload::with_agent("rs-run", &[]);
    kill(&mut w);
    let squatter = squat(&w);
    let err = w.start_agent(&[]).expect_err("the restart cannot listen on 15001");
    assert!(err.to_string().contains("15001"), "{err}");
    drop(squatter);
    refused(&w, "after the failed restart");
    // The next restart, with the port free again, serves.
    w.start_agent(&[]).expect("restart");
    assert_eq!(
        landing(&w.probe(&w.spec(w.remote(REMOTE_PORT)))),
        proxied(OUTBOUND_CAPTURE, "remote")
    );
}

#[test]
fn a_node_restart_that_cannot_serve_a_workload_keeps_it_refused_then_serves_it() {
    let agent = NodeAgent::new("rs-node", &[]);
    let mut first: NodeProcess = agent.start().expect("node agent starts");
    let w = Workload::new_on("rsn", 171);
    agent.enroll(&w.pair.workload.path, "victim", &[]);
    let _ = first.kill();
    let squatter = squat(&w);
    let second = agent.start().expect("a new agent starts");
    assert!(
        second.log().contains("cannot serve the workload again"),
        "{}",
        second.log()
    );
    let state = agent.state().expect("state");
    assert!(
        state.workloads.iter().any(|i| i.id == "victim"),
        "kept in the state for the next start: {state:?}"
    );
    // Once the port is free the agent serves it (retried every 2 s; bounded wait); until
    // then its connections are refused, never let through.
    drop(squatter);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let r = w.probe(&w.spec(w.remote(REMOTE_PORT)));
        if landing(&r) == proxied(OUTBOUND_CAPTURE, "remote") {
            break;
        }
        assert!(
            matches!(landing(&r), Landing::Failed(Outcome::Refused | Outcome::Reset)),
            "never around the proxy: {r:?}"
        );
        assert!(
            std::time::Instant::now() < deadline,
            "not served again within 30 s:\n{}",
            second.log()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(
        w.remote_server.accepted().len() == 1,
        "only the proxied one reached the remote"
    );
    assert_eq!(agent.ids(), ["victim"]);
}
