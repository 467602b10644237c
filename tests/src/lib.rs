//! Harness for redirect's integration tests: a workload (namespace pair, cgroup, servers) with
//! a running agent, probes from inside it, and the agent's own `stats` output.
//!
//! Tests run as root against the real kernel (`cargo xtask test` sets REDIRECT_AGENT_BIN to
//! the agent it built, and REDIRECT_TESTKIT_BIN to the test kit's binary, which runs the probes
//! and workload servers). Every resource is a guard, so a failing test still cleans up.

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use redirect_agent::stats::InstanceStats;
use redirect_testkit::{
    agent::AgentProcess, cgroup::TestCgroup, netns::NetnsPair, probe::ProbeSpec, report::ProbeResult,
    server::TestServer, unique,
};

pub use redirect_testkit::report::Outcome;

pub mod differential;
pub mod kube_api;
pub mod node;
pub mod procfd;
pub mod rules_text;
pub mod runtime;
pub mod ztunnel;

/// Ports of the servers every workload has.
pub const REMOTE_PORT: u16 = 8080;
pub const APP_PORT: u16 = 9080;
pub const TUNNEL_PORT: u16 = 15008;
pub const OUTBOUND_CAPTURE: u16 = 15001;
pub const INBOUND_CAPTURE: u16 = 15006;

pub fn agent_bin() -> PathBuf {
    let path = std::env::var_os("REDIRECT_AGENT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/redirect-agent"));
    assert!(
        path.is_file(),
        "agent binary {} not found: run the tests with `cargo xtask test` (it builds the agent)",
        path.display()
    );
    path
}

/// The `redirect-testkit` binary (probes and workload servers run as its child processes):
/// REDIRECT_TESTKIT_BIN, else beside the agent binary (REDIRECT_AGENT_BIN's directory, or
/// target/debug), which is also where it is inside `cargo xtask vm-test`'s guest.
pub fn testkit_bin() -> PathBuf {
    let path = std::env::var_os("REDIRECT_TESTKIT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::var_os("REDIRECT_AGENT_BIN")
                .map(PathBuf::from)
                .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/redirect-agent"))
                .with_file_name("redirect-testkit")
        });
    assert!(
        path.is_file(),
        "test kit binary {} not found: run the tests with `cargo xtask test` (it builds \
         redirect-testkit beside the agent), or `cargo build -p redirect-testkit`, or set \
         REDIRECT_TESTKIT_BIN",
        path.display()
    );
    path
}

pub fn require_root() {
    assert_eq!(
        rustix::process::geteuid().as_raw(),
        0,
        "integration tests need root: run `cargo xtask test` as root"
    );
}

/// Loads iptables-save text into a named network namespace (`ip netns exec NS iptables-restore`).
pub fn iptables_restore(netns_name: &str, text: &str) {
    use std::io::Write as _;
    let mut child = Command::new("ip")
        .args(["netns", "exec", netns_name, "iptables-restore"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("ip netns exec iptables-restore (installed by xtask setup)");
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "iptables-restore refused:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Loads ip6tables-save text into a named network namespace (`ip netns exec NS
/// ip6tables-restore`).
pub fn ip6tables_restore(netns_name: &str, text: &str) {
    restore_with("ip6tables-restore", netns_name, text);
}

/// Loads `*-save` text with `tool` (`iptables-restore`, `ip6tables-restore`) inside a named
/// network namespace.
pub fn restore_with(tool: &str, netns_name: &str, text: &str) {
    use std::io::Write as _;
    let mut child = Command::new("ip")
        .args(["netns", "exec", netns_name, tool])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("ip netns exec {tool} (installed by xtask setup): {e}"));
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{tool} refused:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs the agent binary with arguments, capturing its output; `None` if it was still
/// running after `within` (it is killed then): for commands that must end by themselves, such
/// as a refusal, so that one that does not fails the test instead of hanging it.
pub fn agent_cmd_within(args: &[&str], within: Duration) -> Option<Output> {
    let mut child = Command::new(agent_bin())
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn redirect-agent");
    let deadline = std::time::Instant::now() + within;
    while child.try_wait().expect("wait for redirect-agent").is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Some(child.wait_with_output().expect("redirect-agent output"))
}

/// Runs the agent binary with arguments, capturing its output.
pub fn agent_cmd(args: &[&str]) -> Output {
    agent_cmd_with_env(args, &[])
}

/// [`agent_cmd`] with environment variables set for the agent (istio-iptables' `ISTIO_*`,
/// which `run` and `explain` read for flags left off the command line), beside what it
/// inherits.
pub fn agent_cmd_with_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(agent_bin())
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("spawn redirect-agent")
}

/// A workload with its servers and (optionally) a running agent. Fields drop in order: the
/// agent detaches before servers, cgroup and namespaces go.
pub struct Workload {
    pub agent: Option<AgentProcess>,
    pub remote_server: TestServer,
    pub app_server: TestServer,
    pub tunnel_server: TestServer,
    pub cgroup: TestCgroup,
    pub pair: NetnsPair,
    pub name: String,
}

/// A run killed by its test (or a test that failed after killing it) leaves its links pinned,
/// capturing: that is fail-closed by design. The test's instance is released once its agent
/// is gone, so that a failing test leaves the machine clean too.
impl Drop for Workload {
    fn drop(&mut self) {
        drop(self.agent.take());
        if redirect_agent::engine::pins::pin_dir(&self.name).exists() {
            let _ = agent_cmd_within(&["cleanup", "--name", &self.name], Duration::from_secs(30));
        }
    }
}

impl Workload {
    /// Namespaces, cgroup and servers: a remote host on 10.200.1.2:8080, the workload's own
    /// app on *:9080 and a tunnel listener on *:15008.
    pub fn new(tag: &str) -> Self {
        Self::new_on(tag, 1)
    }

    /// On 10.200.`subnet`.0/24 (workloads of one node agent need distinct addresses).
    pub fn new_on(tag: &str, subnet: u8) -> Self {
        require_root();
        Self::on_pair(tag, NetnsPair::create_on(tag, subnet).expect("create namespaces"))
    }

    /// A cgroup and the servers, on a pair the caller made.
    pub fn on_pair(tag: &str, pair: NetnsPair) -> Self {
        let cgroup = TestCgroup::create(tag).expect("create cgroup");
        let any = |p| SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, p);
        let remote_server = TestServer::start(&pair.remote, SocketAddrV4::new(pair.remote_ip, REMOTE_PORT), "remote")
            .expect("remote server");
        let app_server = TestServer::start(&pair.workload, any(APP_PORT), "app").expect("app server");
        let tunnel_server = TestServer::start(&pair.workload, any(TUNNEL_PORT), "tunnel").expect("tunnel server");
        Self {
            agent: None,
            remote_server,
            app_server,
            tunnel_server,
            cgroup,
            pair,
            name: unique(tag),
        }
    }

    /// The same, with `redirect-agent run` attached (extra flags appended).
    pub fn with_agent(tag: &str, flags: &[&str]) -> Self {
        let mut w = Self::new(tag);
        w.start_agent(flags).expect("agent starts");
        w
    }

    pub fn run_args(&self) -> Vec<String> {
        vec![
            "--cgroup".into(),
            self.cgroup.path.to_string_lossy().into_owned(),
            "--netns".into(),
            self.pair.workload.path.to_string_lossy().into_owned(),
        ]
    }

    pub fn start_agent(&mut self, flags: &[&str]) -> std::io::Result<()> {
        let mut args = self.run_args();
        args.extend(flags.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.agent = Some(AgentProcess::start(&agent_bin(), &self.name, &args)?);
        Ok(())
    }

    pub fn remote(&self, port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(self.pair.remote_ip, port)
    }

    pub fn pod(&self, port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(self.pair.workload_ip, port)
    }

    /// The remote host's IPv6 address (fd00:200:0:1::2) and `port`.
    pub fn remote6(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.pair.remote_ip6.into(), port)
    }

    /// The workload's own IPv6 address (fd00:200:0:1::1) and `port`.
    pub fn pod6(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.pair.workload_ip6.into(), port)
    }

    /// A probe from inside the workload, as uid 0 unless changed.
    pub fn spec(&self, to: impl Into<SocketAddr>) -> ProbeSpec {
        ProbeSpec::new(&self.cgroup.path, &self.pair.workload.path, to)
    }

    pub fn probe(&self, spec: &ProbeSpec) -> ProbeResult {
        spec.run(&testkit_bin())
            .unwrap_or_else(|e| panic!("probe {spec:?}: {e}"))
    }

    /// `n` probes at once, each its own process, for connections that overlap in time.
    pub fn probe_concurrently(&self, spec: &ProbeSpec, n: usize) -> Vec<ProbeResult> {
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..n).map(|_| s.spawn(|| self.probe(spec))).collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    /// A connection from the remote host to the pod's `port`, held by the test itself.
    /// A non-blocking listener on `0.0.0.0:port` inside the workload's namespace, held by the
    /// test (a stand-in for the app whose accepted connections the test keeps).
    pub fn listen(&self, port: u16) -> std::net::TcpListener {
        let addr = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port);
        let l = self
            .pair
            .workload
            .open()
            .unwrap()
            .run(move || std::net::TcpListener::bind(addr))
            .unwrap();
        l.set_nonblocking(true).unwrap();
        l
    }

    pub fn dial_from_remote(&self, port: u16, timeout: Duration) -> std::io::Result<TcpStream> {
        self.pair
            .remote
            .open()?
            .run(|| TcpStream::connect_timeout(&self.pod(port).into(), timeout))
    }

    /// The remote host sends 1 MiB to the app's port and reads it back: it must arrive intact,
    /// at the app, which sees the remote host's own address (a proxy dialing from the client's,
    /// as TPROXY mode's and ztunnel's do) and its pod address as its own; one connection.
    pub fn assert_inbound_seen_from_the_client(&self) {
        let r = self.probe(&self.from_remote(self.pod(APP_PORT)).bytes(1 << 20));
        assert_eq!(r.outcome, Outcome::Ok, "{r:?}");
        assert_eq!(r.banner_field("name"), Some("app"), "{r:?}");
        assert_eq!((r.sent, r.received), (1 << 20, 1 << 20), "{r:?}");
        assert!(r.intact, "bytes changed on the way: {r:?}");
        assert_eq!(banner_peer_ip(&r), self.pair.remote_ip, "{r:?}");
        let own = self.pod(APP_PORT).to_string();
        assert_eq!(r.banner_field("local"), Some(own.as_str()), "{r:?}");
        assert_eq!(self.app_server.accepted().len(), 1, "one connection reached the app");
    }

    /// `cmd` run in the workload's namespace (`ip netns exec`), its stdout; a failure fails
    /// the test with its stderr.
    pub fn exec(&self, cmd: &[&str]) -> String {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &self.pair.workload.name])
            .args(cmd)
            .output()
            .expect("ip netns exec");
        assert!(
            out.status.success(),
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `redirect-agent stats --name N --json`, parsed.
    pub fn stats(&self) -> InstanceStats {
        let out = agent_cmd(&["stats", "--name", &self.name, "--json"]);
        assert!(
            out.status.success(),
            "stats failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("stats --json parses")
    }

    /// Connections per rule of iptables' ISTIO_OUTPUT, in rule order.
    pub fn counts(&self) -> Vec<u64> {
        self.chain_counts("ISTIO_OUTPUT")
    }

    /// Connections per rule of iptables' `chain`, in rule order.
    pub fn chain_counts(&self, chain: &str) -> Vec<u64> {
        self.family_counts("ipv4", chain)
    }

    /// Connections per rule of `chain` in the table of `family` (`ipv4`: iptables, `ipv6`:
    /// ip6tables), in rule order.
    pub fn family_counts(&self, family: &str, chain: &str) -> Vec<u64> {
        self.stats()
            .rules
            .iter()
            .filter(|r| r.chain == chain && r.family == family)
            .map(|r| r.connections)
            .collect()
    }

    /// A probe from the remote host (10.200.1.2), outside any captured cgroup.
    pub fn from_remote(&self, to: impl Into<SocketAddr>) -> ProbeSpec {
        ProbeSpec::outside(&self.pair.remote.path, to)
    }
}

/// Where a probe landed, as the kernel connected it and as the server answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Landing {
    /// Connected to the capture port; the proxy forwarded to `server`.
    Proxied { capture_port: u16, server: String },
    /// Connected straight to the destination; `server` answered.
    Direct { server: String },
    /// Did not complete: the outcome.
    Failed(Outcome),
}

/// Connected to capture port `port`; the proxy forwarded it to `server`.
pub fn proxied(port: u16, server: &str) -> Landing {
    Landing::Proxied {
        capture_port: port,
        server: server.into(),
    }
}

/// Connected straight to `server`.
pub fn direct(server: &str) -> Landing {
    Landing::Direct { server: server.into() }
}

pub fn landing(r: &ProbeResult) -> Landing {
    if r.outcome != Outcome::Ok {
        return Landing::Failed(r.outcome);
    }
    let server = r.banner_field("name").unwrap_or("?").to_owned();
    match r.peer_port() {
        Some(p) if p == OUTBOUND_CAPTURE || p == INBOUND_CAPTURE => Landing::Proxied {
            capture_port: p,
            server,
        },
        _ => Landing::Direct { server },
    }
}

/// The address the server that answered saw the probe come from (its banner's `peer`).
pub fn banner_peer_ip(r: &ProbeResult) -> std::net::Ipv4Addr {
    let saw: SocketAddrV4 = r
        .banner_field("peer")
        .unwrap_or_else(|| panic!("no banner: {r:?}"))
        .parse()
        .unwrap();
    *saw.ip()
}

/// `redirect-agent proxy` as a workload's own proxy (Envoy's part), in its namespace and
/// cgroup: it listens on 0.0.0.0:15001 and :15006 (and fails if anything holds 127.0.0.1 on
/// those ports) as uid 1337, and asks SO_ORIGINAL_DST, which the root getsockopt program
/// answers. Killed when dropped.
pub struct PodProxy(std::process::Child);

impl PodProxy {
    pub fn start(w: &Workload) -> Self {
        Self(
            std::process::Command::new(agent_bin())
                .args(["proxy", "--netns"])
                .arg(&w.pair.workload.path)
                .arg("--cgroup")
                .arg(&w.cgroup.path)
                .env("RUST_LOG", "warn")
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("start the workload's own proxy"),
        )
    }

    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for PodProxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
