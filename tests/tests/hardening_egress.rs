//! Issue 16, item 5: the embedded proxy's upstream connections are the workload's, as a
//! sidecar's are, so the workload's cgroup-scoped egress rules (and rules on the proxy's
//! identity) bind them. The oracle is iptables: the same `-m cgroup --path` and `-m owner`
//! rules, with a sidecar-like proxy (`redirect-agent proxy` in the workload's cgroup, as uid
//! 1337) behind istio-iptables' own rules, and with the agent.

use std::{
    net::SocketAddrV4,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use redirect_testkit::server::TestServer;
use redirect_tests::{
    Landing, OUTBOUND_CAPTURE, Outcome, PodProxy, REMOTE_PORT, Workload, agent_cmd, iptables_restore, landing,
    node::NodeAgent, proxied,
};

/// A destination no rule forbids.
const ALLOWED_PORT: u16 = 8081;
/// A destination forbidden to the proxy identity (uid 1337) by an owner rule.
const OWNER_PORT: u16 = 8082;
const BOUND: Duration = Duration::from_secs(20);

/// The workload's cgroup as `-m cgroup --path` names it: relative to the cgroup2 mount.
fn cgroup_path(w: &Workload) -> String {
    let root = redirect_agent::sys::cgroup2_root().expect("cgroup2 is mounted");
    w.cgroup
        .path
        .strip_prefix(&root)
        .expect("test cgroups are under the cgroup2 mount")
        .to_string_lossy()
        .into_owned()
}

fn iptables(netns: &str, args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", netns, "iptables"])
        .args(args)
        .output()
        .expect("ip netns exec iptables");
    assert!(
        out.status.success(),
        "iptables {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The workload's egress rules, as its operator would write them: its cgroup may not reach
/// the remote server's port 8080, its proxy identity may not reach port 8082. Both reset the
/// connection at once.
fn forbid(w: &Workload) {
    let ns = &w.pair.workload.name;
    let remote = w.pair.remote_ip.to_string();
    let cgroup = cgroup_path(w);
    let reject = ["-j", "REJECT", "--reject-with", "tcp-reset"];
    let mut by_cgroup = vec![
        "-A", "OUTPUT", "-m", "cgroup", "--path", &cgroup, "-p", "tcp", "-d", &remote,
    ];
    by_cgroup.extend(["--dport", "8080"]);
    by_cgroup.extend(reject);
    iptables(ns, &by_cgroup);
    let port = OWNER_PORT.to_string();
    let mut by_owner = vec![
        "-A",
        "OUTPUT",
        "-m",
        "owner",
        "--uid-owner",
        "1337",
        "-p",
        "tcp",
        "-d",
        &remote,
    ];
    by_owner.extend(["--dport", &port]);
    by_owner.extend(reject);
    iptables(ns, &by_owner);
}

/// Packets each of [`forbid`]'s rules matched, in order.
fn rule_hits(w: &Workload) -> Vec<u64> {
    iptables(&w.pair.workload.name, &["-L", "OUTPUT", "-n", "-v", "-x"])
        .lines()
        .skip(2)
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect()
}

/// The servers beside the workload's `remote` one (port 8080): `allowed` and `owner`.
fn more_servers(w: &Workload) -> [TestServer; 2] {
    let at = |p| SocketAddrV4::new(w.pair.remote_ip, p);
    [
        TestServer::start(&w.pair.remote, at(ALLOWED_PORT), "allowed").expect("allowed server"),
        TestServer::start(&w.pair.remote, at(OWNER_PORT), "owner").expect("owner server"),
    ]
}

/// Where the app's connections to 8080, 8081 and 8082 land, after the first one through the
/// proxy answered (the proxy may still be starting).
fn landings(w: &Workload) -> [Landing; 3] {
    let deadline = Instant::now() + BOUND;
    while w.probe(&w.spec(w.remote(ALLOWED_PORT))).outcome != Outcome::Ok && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    [REMOTE_PORT, ALLOWED_PORT, OWNER_PORT].map(|p| landing(&w.probe(&w.spec(w.remote(p)))))
}

/// What the sidecar's connections see under the rules (the oracle), and that without them
/// every destination is reached.
fn with_a_sidecar() -> [Result<String, Outcome>; 3] {
    let w = Workload::new("egress-sc");
    let servers = more_servers(&w);
    let out = agent_cmd(&["explain"]);
    assert!(out.status.success());
    iptables_restore(&w.pair.workload.name, &String::from_utf8(out.stdout).unwrap());
    let _sidecar = PodProxy::start(&w);
    // Under REDIRECT the app sees its original peer: a proxied connection looks direct to it.
    let open = landings(&w).map(reached);
    assert_eq!(
        open,
        [Ok("remote".into()), Ok("allowed".into()), Ok("owner".into())],
        "no rule yet"
    );
    forbid(&w);
    let ruled = landings(&w).map(reached);
    assert_eq!(rule_hits(&w), [1, 1], "each rule matched the sidecar's connection once");
    drop(servers);
    ruled
}

/// The server a connection reached, or how it failed.
fn reached(l: Landing) -> Result<String, Outcome> {
    match l {
        Landing::Proxied { server, .. } | Landing::Direct { server } => Ok(server),
        Landing::Failed(o) => Err(o),
    }
}

/// The sidecar's connections to the forbidden destinations are refused by the rules, the
/// other goes through it; the agent's embedded proxy lands every connection the same way.
/// (Before the dialer child, the agent dialled as root from its own cgroup: both forbidden
/// destinations were reached.)
#[test]
fn the_embedded_proxy_obeys_the_egress_rules_a_sidecar_obeys() {
    let sidecar = with_a_sidecar();
    assert!(
        matches!(&sidecar, [Err(_), Ok(s), Err(_)] if s == "allowed"),
        "{sidecar:?}"
    );

    let mut w = Workload::new("egress-run");
    let servers = more_servers(&w);
    w.start_agent(&[]).expect("agent starts");
    assert_eq!(
        landings(&w),
        [
            proxied(OUTBOUND_CAPTURE, "remote"),
            proxied(OUTBOUND_CAPTURE, "allowed"),
            proxied(OUTBOUND_CAPTURE, "owner")
        ],
        "no rule yet"
    );
    let before = [w.remote_server.accepted().len(), servers[1].accepted().len()];
    forbid(&w);
    let embedded = landings(&w);
    assert_eq!(embedded[1], proxied(OUTBOUND_CAPTURE, "allowed"));
    assert_eq!(
        embedded.map(reached),
        sidecar,
        "the agent's proxy against the sidecar's"
    );
    assert_eq!(rule_hits(&w), [1, 1], "each rule matched the proxy's connection once");
    assert_eq!(
        [w.remote_server.accepted().len(), servers[1].accepted().len()],
        before,
        "a forbidden destination was reached"
    );
}

/// Node mode, for a workload enrolled with its cgroup.
#[test]
fn a_node_agent_dials_from_the_enrolled_cgroup() {
    let agent = NodeAgent::new("node-egress", &[]);
    let _p = agent.start().expect("node agent starts");
    let w = Workload::new_on("negress", 181);
    let servers = more_servers(&w);
    agent.enroll(
        &w.pair.workload.path,
        "egress",
        &["--cgroup", &w.cgroup.path.to_string_lossy()],
    );
    forbid(&w);
    let r = landings(&w);
    assert!(
        matches!(&r, [Landing::Failed(_), Landing::Proxied { server, .. }, Landing::Failed(_)] if server == "allowed"),
        "{r:?}"
    );
    assert_eq!(rule_hits(&w), [1, 1]);
    assert!(w.remote_server.accepted().is_empty() && servers[1].accepted().is_empty());
}

/// The dialer process of a `run` agent's workload: in the workload's cgroup, as uid 1337, a
/// child of the agent. Killed, it is replaced; meanwhile connections are proxied or reset,
/// never dialled from elsewhere. Stopping the agent leaves no process behind.
#[test]
fn the_dialer_process_is_replaced_when_killed_and_goes_with_the_agent() {
    let mut w = Workload::new("egress-child");
    let _servers = more_servers(&w);
    w.start_agent(&[]).expect("agent starts");
    let agent_pid = w.agent.as_ref().unwrap().pid().expect("agent runs");
    let dialer = || -> Option<u32> {
        let procs = w.cgroup.procs();
        let pid = *procs.first()?;
        (procs.len() == 1).then_some(pid as u32)
    };
    let deadline = Instant::now() + BOUND;
    while dialer().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let first = dialer().expect("one dialer process in the workload's cgroup");
    let status = std::fs::read_to_string(format!("/proc/{first}/status")).unwrap();
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .to_owned()
    };
    assert_eq!(field("PPid:"), agent_pid.to_string(), "{status}");
    assert_eq!(field("Uid:"), "1337", "{status}");
    assert_eq!(field("Gid:"), "1337", "{status}");
    assert_eq!(field("CapEff:"), "0000000000000000", "{status}");
    // Its socket pair to the agent and /dev/null: nothing of the agent's.
    let fds = std::fs::read_dir(format!("/proc/{first}/fd")).unwrap().count();
    assert_eq!(fds, 3, "descriptors of the dialer process");

    // SAFETY: kill(2) takes no pointers; the pid is the agent's child, not yet reaped.
    assert_eq!(unsafe { libc::kill(first as i32, libc::SIGKILL) }, 0);
    let deadline = Instant::now() + BOUND;
    let mut seen = Vec::new();
    let replaced = loop {
        let l = landing(&w.probe(&w.spec(w.remote(ALLOWED_PORT))));
        assert!(
            l == proxied(OUTBOUND_CAPTURE, "allowed") || l == Landing::Failed(Outcome::Reset),
            "while the dialer process was replaced: {l:?}"
        );
        seen.push(l);
        if let Some(pid) = dialer()
            && pid != first
            && seen.last() == Some(&proxied(OUTBOUND_CAPTURE, "allowed"))
        {
            break pid;
        }
        assert!(Instant::now() < deadline, "not replaced: {seen:?}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        !Path::new(&format!("/proc/{first}")).exists(),
        "the killed one was reaped"
    );

    let (status, log) = w.agent.as_mut().unwrap().stop().expect("agent stops");
    assert!(status.success(), "{log}");
    assert!(
        w.cgroup.procs().is_empty(),
        "left in the workload's cgroup: {:?}",
        w.cgroup.procs()
    );
    assert!(!running(replaced), "dialer {replaced} outlived the agent");
}

/// Whether process `pid` still runs: gone, or a zombie (it exited; with the agent gone, its
/// reaping is up to init, whenever that gets to it), it does not.
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let after = &stat[stat.rfind(')')? + 1..];
            after.split_whitespace().next().map(|state| state != "Z")
        })
        .unwrap_or(false)
}
