//! One descriptor table for the whole node agent: the workloads' proxies share a connection
//! budget sized from the descriptor limit less a reserve for the control plane, and the
//! metrics endpoint bounds what a local user can hold. The agent runs with a small
//! RLIMIT_NOFILE it cannot raise, so that the budget is reached with a few hundred connections.

use std::{
    io::{self, BufRead as _, BufReader, Read as _},
    net::{TcpListener, TcpStream},
    os::unix::process::CommandExt as _,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use redirect_tests::{
    Workload, agent_cmd_within,
    node::{NodeAgent, metric},
    procfd::fd_count,
    testkit_bin,
};

/// The agent's descriptor limit: with `--max-workloads 4` its reserve is about 650, leaving a
/// budget of about 300 connections.
const NOFILE: u64 = 1200;
/// More connections than the budget can hold (and than the limit, at two descriptors each).
const MAX_HELD: usize = 700;
/// A port of each workload's nobody else uses: the test's own listener holds its connections.
const HELD_PORT: u16 = 9302;
/// Generous upper bound for "did not hang".
const BOUND: Duration = Duration::from_secs(20);
/// The unprivileged user of the floods.
const NOBODY: u32 = 65534;

/// Lets the test process hold its side of every connection.
fn raise_own_nofile() {
    redirect_agent::sys::raise_nofile_limit(4 * MAX_HELD);
}

/// What became of one connection from the remote host to a workload's port.
enum Fate {
    /// The proxy forwarded it: the client end and the end the workload's listener took.
    Proxied(TcpStream, TcpStream),
    /// Reset (or closed) by the proxy.
    Reset,
    /// Neither within the bound: left hanging.
    Hung,
}

/// Connects from the remote host to `w`'s held port and waits, within the bound, for the
/// workload's listener to take the proxied connection or for the client to see a reset.
fn connect(w: &Workload, listener: &TcpListener) -> Fate {
    let client = match w.dial_from_remote(HELD_PORT, Duration::from_secs(5)) {
        Ok(c) => c,
        // The proxy resets a connection over the budget as soon as it accepts it, which can
        // beat the client's own connect() to the answer: a reset all the same.
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Fate::Reset;
        }
        // Timed out at connect: nothing answered.
        Err(_) => return Fate::Hung,
    };
    client.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
    let deadline = Instant::now() + BOUND;
    while Instant::now() < deadline {
        match listener.accept() {
            Ok((server, _)) => return Fate::Proxied(client, server),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("accept in the workload: {e}"),
        }
        match (&client).read(&mut [0u8; 1]) {
            Ok(0) => return Fate::Reset,
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Fate::Reset,
            _ => {}
        }
    }
    Fate::Hung
}

/// `/ready` answers 200 within the bound (one retry: a probe's connection may be the one a
/// flood pushes out).
fn ready(agent: &NodeAgent) -> Result<(), String> {
    let mut last = String::new();
    for _ in 0..3 {
        match agent.scrape("/ready") {
            Ok((status, _)) if status.contains("200") => return Ok(()),
            Ok((status, _)) => last = status,
            Err(e) => last = e.to_string(),
        }
    }
    Err(last)
}

/// `redirect-agent list --json` answers within the bound with these ids.
fn list(agent: &NodeAgent) -> Result<Vec<String>, String> {
    let socket = agent.socket.to_string_lossy().into_owned();
    let out = agent_cmd_within(&["list", "--socket", &socket, "--json"], BOUND).ok_or("list hung")?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let list: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
    Ok(list.iter().filter_map(|w| Some(w["id"].as_str()?.to_owned())).collect())
}

/// Two workloads' connections held until the node's budget refuses one: a further connection
/// of either workload is reset at once, never left hanging, and counted; `list`, an enroll of
/// a third workload and `/ready` all answer meanwhile; once connections close, new ones are
/// proxied again.
#[test]
fn the_proxies_share_one_budget_and_the_control_plane_keeps_its_reserve() {
    raise_own_nofile();
    let agent =
        NodeAgent::new("budget", &["--max-workloads", "4", "--max-proxy-connections", "1000"]).with_nofile(NOFILE);
    let p = agent.start().expect("node agent starts");
    let a = Workload::new_on("bga", 181);
    let b = Workload::new_on("bgb", 182);
    let c = Workload::new_on("bgc", 183);
    agent.enroll(&a.pair.workload.path, "a", &[]);
    agent.enroll(&b.pair.workload.path, "b", &[]);
    let (la, lb) = (a.listen(HELD_PORT), b.listen(HELD_PORT));

    // Both workloads, in turn, until one connection is refused.
    let mut held = Vec::new();
    let refused = loop {
        assert!(
            held.len() < MAX_HELD,
            "{} connections proxied and none refused: no budget short of {NOFILE} descriptors",
            held.len()
        );
        let (w, l) = if held.len() % 2 == 0 { (&a, &la) } else { (&b, &lb) };
        match connect(w, l) {
            Fate::Proxied(client, server) => held.push((client, server)),
            Fate::Reset => break held.len(),
            Fate::Hung => panic!(
                "connection {} of the two workloads was neither proxied nor reset within {BOUND:?}: it hangs\n{}",
                held.len() + 1,
                p.log()
            ),
        }
    };
    eprintln!("the budget refused connection {} (of the two workloads)", refused + 1);
    assert!(refused >= 100, "refused after only {refused} connections");

    // (a) Over the budget, either workload's next connection is reset, not left hanging.
    for (w, l, id) in [(&a, &la, "a"), (&b, &lb, "b")] {
        match connect(w, l) {
            Fate::Reset => {}
            Fate::Proxied(..) => panic!("workload {id}: a connection past the budget was proxied"),
            Fate::Hung => panic!("workload {id}: a connection past the budget hangs"),
        }
    }

    // (b) The control plane answers: list, /ready, an enroll of a third workload, list again.
    assert_eq!(list(&agent).expect("list answers at the budget"), ["a", "b"]);
    ready(&agent).expect("/ready answers at the budget");
    let socket = agent.socket.to_string_lossy().into_owned();
    let netns = c.pair.workload.path.to_string_lossy().into_owned();
    let out = agent_cmd_within(
        &["enroll", "--socket", &socket, "--netns", &netns, "--id", "c"],
        Duration::from_secs(40),
    )
    .expect("an enroll at the budget answers");
    assert!(
        out.status.success(),
        "enroll at the budget: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(list(&agent).expect("list answers"), ["a", "b", "c"]);

    // Visible: the resets are counted as over the budget, per workload.
    let (_, text) = agent.scrape("/metrics").expect("metrics answer at the budget");
    for id in ["a", "b"] {
        let series = format!("redirect_proxy_connections_failed_total{{workload=\"{id}\",reason=\"over_budget\"}}");
        assert!(metric(&text, &series).unwrap_or(0.0) >= 1.0, "{series} in\n{text}");
    }
    let budget = metric(&text, "redirect_proxy_budget_connections").expect("the budget is shown");
    assert_eq!(budget as usize, refused, "the refusal came at the budget shown");

    // Descriptors come back: with the held connections closed, a new one is proxied.
    drop(held);
    let deadline = Instant::now() + BOUND;
    loop {
        match connect(&a, &la) {
            Fate::Proxied(..) => break,
            _ if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
            _ => panic!("no connection proxied after the held ones closed"),
        }
    }
}

/// One unprivileged flood of the metrics port; killed on drop.
struct Flood(Child);

impl Flood {
    fn start(agent: &NodeAgent, slow: bool) -> Self {
        let mut c = Command::new(testkit_bin());
        c.args(["flood", "--to", &agent.metrics.to_string(), "--hold", "1500"])
            .args(["--for-ms", "60000"])
            .uid(NOBODY)
            .gid(NOBODY)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        if slow {
            c.arg("--slow");
        }
        Self(c.spawn().expect("start a flood as nobody"))
    }

    /// Connections made, once at least `n` (or what it made by the bound).
    fn wait_for(&mut self, n: usize) -> usize {
        let out = self.0.stdout.take().expect("flood output");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let made = line.split_whitespace().nth(1).and_then(|v| v.parse::<usize>().ok());
                if tx.send(made.unwrap_or(0)).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + BOUND;
        let mut made = 0;
        while made < n {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(m) => made = made.max(m),
                Err(_) => break,
            }
        }
        made
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Two unprivileged processes flood the metrics port with idle and slow connections, more
/// than the agent's whole descriptor limit: the agent holds only a few of them at a time, and
/// `/ready`, `list` and an enroll all answer.
#[test]
fn a_local_users_flood_of_the_metrics_port_does_not_stop_ready_or_list() {
    let agent = NodeAgent::new("budget-flood", &["--max-workloads", "4"]).with_nofile(NOFILE);
    let p = agent.start().expect("node agent starts");
    let w = Workload::new_on("bgf", 184);
    let second = Workload::new_on("bgg", 185);
    agent.enroll(&w.pair.workload.path, "f", &[]);
    let before = fd_count(p.pid());
    let mut idle = Flood::start(&agent, false);
    let mut slow = Flood::start(&agent, true);
    let made = [idle.wait_for(NOFILE as usize), slow.wait_for(NOFILE as usize)];

    // Still flooding: the endpoint holds its few clients, not one descriptor per connection.
    let most = (0..20)
        .map(|_| {
            std::thread::sleep(Duration::from_millis(50));
            fd_count(p.pid())
        })
        .max()
        .unwrap_or(0);
    assert!(
        most < before + 64,
        "under the flood the agent holds {most} descriptors ({before} before it, limit {NOFILE})"
    );
    ready(&agent).unwrap_or_else(|e| panic!("/ready under the flood ({made:?} connections made): {e}"));
    assert_eq!(
        list(&agent).unwrap_or_else(|e| panic!("list under the flood ({made:?} connections made): {e}")),
        ["f"]
    );
    let socket = agent.socket.to_string_lossy().into_owned();
    let netns = second.pair.workload.path.to_string_lossy().into_owned();
    let out = agent_cmd_within(
        &["enroll", "--socket", &socket, "--netns", &netns, "--id", "g"],
        Duration::from_secs(40),
    )
    .expect("an enroll under the flood answers");
    assert!(
        out.status.success(),
        "enroll under the flood: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Each flood connected more often than the agent has descriptors: it was cut each time,
    // not left holding them.
    assert!(
        made.iter().all(|&m| m >= NOFILE as usize),
        "the floods made only {made:?} connections in {BOUND:?}\n{}",
        p.log()
    );
}
