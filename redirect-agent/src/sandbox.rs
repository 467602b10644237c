//! Throw-away workloads for `demo` and the integration tests: a network-namespace pair joined
//! by a veth (10.200.0.0/16, no default route, so nothing can leave the machine), a cgroup,
//! plain servers, the agent as a child process, and probes run from inside the workload.
//! Every piece removes itself on drop, also when a test panics.

use std::{
    io::{self, BufRead, Read, Write},
    net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::{engine::pins as loader, probe::ProbeResult, sys};

/// Largest request a test server buffers before answering.
const SERVER_MAX_BYTES: usize = 16 << 20;
const IO_TIMEOUT: Duration = Duration::from_secs(10);

static SEQ: AtomicUsize = AtomicUsize::new(0);

/// A name no other test or demo on this machine is using right now.
pub fn unique(tag: &str) -> String {
    format!(
        "rd-{tag}-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs a command, failing with its stderr.
pub fn cmd(program: &str, args: &[&str]) -> io::Result<()> {
    let out = Command::new(program).args(args).stdin(Stdio::null()).output()?;
    if out.status.success() {
        return Ok(());
    }
    Err(io::Error::other(format!(
        "{program} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    )))
}

/// A named network namespace (`ip netns add`), deleted on drop.
pub struct NamedNetns {
    pub name: String,
    pub path: PathBuf,
}

impl NamedNetns {
    pub fn create(name: &str) -> io::Result<Self> {
        cmd("ip", &["netns", "add", name])?;
        let ns = Self {
            name: name.into(),
            path: Path::new("/run/netns").join(name),
        };
        cmd("ip", &["-n", name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn open(&self) -> io::Result<sys::Netns> {
        sys::Netns::open(&self.path).map_err(io::Error::other)
    }

    /// `ip -n NAME ...`
    pub fn ip(&self, args: &[&str]) -> io::Result<()> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        cmd("ip", &all)
    }
}

impl Drop for NamedNetns {
    fn drop(&mut self) {
        let _ = cmd("ip", &["netns", "del", &self.name]);
    }
}

/// A workload namespace and a "remote host" namespace on one /24 of 10.200.0.0/16.
pub struct NetnsPair {
    pub workload: NamedNetns,
    pub remote: NamedNetns,
    pub workload_ip: Ipv4Addr,
    pub remote_ip: Ipv4Addr,
}

impl NetnsPair {
    /// Each pair is its own world, so every pair can use the same subnet.
    pub fn create(tag: &str) -> io::Result<Self> {
        Self::create_on(tag, 1)
    }

    /// On 10.200.`subnet`.0/24: workloads served by one node agent need distinct addresses,
    /// as pods on one node have.
    pub fn create_on(tag: &str, subnet: u8) -> io::Result<Self> {
        let base = unique(tag);
        let workload = NamedNetns::create(&format!("{base}-w"))?;
        let remote = NamedNetns::create(&format!("{base}-r"))?;
        let (workload_ip, remote_ip) = (Ipv4Addr::new(10, 200, subnet, 1), Ipv4Addr::new(10, 200, subnet, 2));
        workload.ip(&[
            "link",
            "add",
            "w0",
            "type",
            "veth",
            "peer",
            "name",
            "r0",
            "netns",
            &remote.name,
        ])?;
        workload.ip(&["addr", "add", &format!("{workload_ip}/24"), "dev", "w0"])?;
        remote.ip(&["addr", "add", &format!("{remote_ip}/24"), "dev", "r0"])?;
        workload.ip(&["link", "set", "w0", "up"])?;
        remote.ip(&["link", "set", "r0", "up"])?;
        Ok(Self {
            workload,
            remote,
            workload_ip,
            remote_ip,
        })
    }
}

/// A cgroup v2 directory under the cgroup2 mount; its processes are killed and the directory
/// removed on drop.
pub struct TestCgroup {
    pub path: PathBuf,
}

impl TestCgroup {
    pub fn create(tag: &str) -> io::Result<Self> {
        let root = sys::cgroup2_root().map_err(io::Error::other)?;
        let path = root.join(unique(tag));
        std::fs::create_dir(&path)?;
        Ok(Self { path })
    }

    pub fn procs(&self) -> Vec<i32> {
        std::fs::read_to_string(self.path.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            for pid in self.procs() {
                // SAFETY: signalling a pid; a stale pid at worst gets ESRCH.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            if std::fs::remove_dir(&self.path).is_ok() || Instant::now() > deadline {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A plain TCP server: on accept it sends one line naming itself and both addresses of the
/// connection, reads the request until EOF (the client's half-close), then echoes it and
/// closes. It records every peer it accepted.
pub struct TestServer {
    pub name: String,
    pub addr: SocketAddrV4,
    stop: Arc<AtomicBool>,
    accepted: Arc<Mutex<Vec<SocketAddr>>>,
    thread: Option<JoinHandle<()>>,
}

/// The first line a [`TestServer`] sends: its name, the connection's addresses, and what
/// `getsockopt(SO_ORIGINAL_DST)` answered on the accepted socket (`-` for an error).
pub fn server_banner(name: &str, local: SocketAddr, peer: SocketAddr, orig: Option<SocketAddrV4>) -> String {
    let orig = orig.map_or_else(|| "-".to_owned(), |o| o.to_string());
    format!("REDIRECT-TEST name={name} local={local} peer={peer} orig={orig}\n")
}

impl TestServer {
    pub fn start(netns: &NamedNetns, addr: SocketAddrV4, name: &str) -> io::Result<Self> {
        let listener = netns.open()?.run(move || TcpListener::bind(addr))?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(Mutex::new(Vec::new()));
        let (stop2, accepted2, name2) = (stop.clone(), accepted.clone(), name.to_owned());
        let thread = std::thread::spawn(move || {
            let mut workers = Vec::new();
            while !stop2.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, peer)) => {
                        accepted2.lock().unwrap_or_else(|e| e.into_inner()).push(peer);
                        let name = name2.clone();
                        // A finished thread's stack stays until it is joined: under a long
                        // load that would be thousands of them.
                        workers.retain_mut(|h: &mut Option<JoinHandle<()>>| match h.take_if(|h| h.is_finished()) {
                            Some(done) => {
                                let _ = done.join();
                                false
                            }
                            None => true,
                        });
                        workers.push(Some(std::thread::spawn(move || {
                            let _ = serve_one(stream, peer, &name);
                        })));
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
            for w in workers.into_iter().flatten() {
                let _ = w.join();
            }
        });
        Ok(Self {
            name: name.into(),
            addr,
            stop,
            accepted,
            thread: Some(thread),
        })
    }

    /// Peers accepted so far.
    pub fn accepted(&self) -> Vec<SocketAddr> {
        self.accepted.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

pub(crate) fn serve_one(mut stream: TcpStream, peer: SocketAddr, name: &str) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let local = stream.local_addr()?;
    let orig = crate::sys::original_dst(&stream).ok();
    stream.write_all(server_banner(name, local, peer, orig).as_bytes())?;
    if name.starts_with("echo") {
        // Request/response: every chunk straight back, until EOF.
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = stream.read(&mut buf)?;
            if n == 0 {
                return stream.shutdown(Shutdown::Write);
            }
            stream.write_all(&buf[..n])?;
        }
    }
    if name.starts_with("sink") {
        // A reader that stops reading: holds the connection, reads nothing, until the peer
        // goes or the timeout.
        std::thread::sleep(IO_TIMEOUT);
        return Ok(());
    }
    let mut body = Vec::new();
    (&mut stream).take(SERVER_MAX_BYTES as u64).read_to_end(&mut body)?;
    stream.write_all(&body)?;
    stream.shutdown(Shutdown::Write)
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What one probe does, from inside the workload (or, without a cgroup, from any namespace).
#[derive(Clone, Debug)]
pub struct ProbeSpec {
    pub cgroup: Option<PathBuf>,
    pub netns: PathBuf,
    pub uid: u32,
    pub gid: u32,
    pub bind: Option<Ipv4Addr>,
    pub connect: SocketAddrV4,
    pub bytes: usize,
    pub udp: bool,
    pub round_trips: u64,
    pub fill: bool,
    pub tokio: bool,
    pub sockopts: bool,
}

impl ProbeSpec {
    pub fn new(cgroup: &Path, netns: &Path, connect: SocketAddrV4) -> Self {
        Self {
            cgroup: Some(cgroup.into()),
            netns: netns.into(),
            uid: 0,
            gid: 0,
            bind: None,
            connect,
            bytes: 1024,
            udp: false,
            round_trips: 0,
            fill: false,
            tokio: false,
            sockopts: false,
        }
    }

    /// A probe from a namespace that is not a captured workload (the remote host).
    pub fn outside(netns: &Path, connect: SocketAddrV4) -> Self {
        Self {
            cgroup: None,
            ..Self::new(Path::new("/"), netns, connect)
        }
    }

    pub fn uid(mut self, uid: u32) -> Self {
        self.uid = uid;
        self
    }

    pub fn gid(mut self, gid: u32) -> Self {
        self.gid = gid;
        self
    }

    pub fn bind(mut self, ip: Ipv4Addr) -> Self {
        self.bind = Some(ip);
        self
    }

    /// A UDP connect() instead of a TCP exchange.
    pub fn udp(mut self) -> Self {
        self.udp = true;
        self
    }

    pub fn bytes(mut self, n: usize) -> Self {
        self.bytes = n;
        self
    }

    /// `n` request/response round trips of `bytes` each instead of one exchange.
    pub fn round_trips(mut self, n: u64) -> Self {
        self.round_trips = n;
        self
    }

    /// With a tokio client (non-blocking, epoll readiness) instead of blocking calls.
    pub fn tokio(mut self) -> Self {
        self.tokio = true;
        self
    }

    /// Socket options instead of an exchange (`probe --sockopts`).
    pub fn sockopts(mut self) -> Self {
        self.sockopts = true;
        self
    }

    /// Write until the connection stops taking bytes instead of one exchange.
    pub fn fill(mut self) -> Self {
        self.fill = true;
        self
    }

    /// Runs `agent probe` as a child process (it moves itself into the cgroup and namespace
    /// and drops to uid/gid before connecting) and parses its one-line JSON report.
    pub fn run(&self, agent: &Path) -> io::Result<ProbeResult> {
        let mut all = self.run_batch(agent, &[self.connect])?;
        all.pop().ok_or_else(|| io::Error::other("probe reported nothing"))
    }

    /// The same probe to each of `targets`, one after another, from one child process.
    pub fn run_batch(&self, agent: &Path, targets: &[SocketAddrV4]) -> io::Result<Vec<ProbeResult>> {
        let mut c = Command::new(agent);
        c.arg("probe");
        if let Some(cg) = &self.cgroup {
            c.args(["--cgroup", &cg.to_string_lossy()]);
        }
        c.args(["--netns", &self.netns.to_string_lossy()])
            .args(["--uid", &self.uid.to_string(), "--gid", &self.gid.to_string()])
            .args(["--bytes", &self.bytes.to_string()]);
        for t in targets {
            c.args(["--connect", &t.to_string()]);
        }
        if let Some(b) = self.bind {
            c.args(["--bind", &b.to_string()]);
        }
        if self.udp {
            c.arg("--udp");
        }
        if self.round_trips > 0 {
            c.args(["--round-trips", &self.round_trips.to_string()]);
        }
        if self.fill {
            c.arg("--fill");
        }
        if self.tokio {
            c.arg("--tokio");
        }
        if self.sockopts {
            c.arg("--sockopts");
        }
        let out = c.stdin(Stdio::null()).output()?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "probe {self:?} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let results = out
            .stdout
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).map_err(io::Error::other))
            .collect::<io::Result<Vec<ProbeResult>>>()?;
        if results.len() != targets.len() {
            return Err(io::Error::other(format!(
                "probe reported {} results for {} targets",
                results.len(),
                targets.len()
            )));
        }
        Ok(results)
    }
}

/// `redirect-agent serve` as a child process: [`TestServer`]s inside a cgroup and namespace,
/// as a workload's own process (sock_ops sees its listen()). Killed on drop.
pub struct ServeProcess {
    child: Child,
}

impl ServeProcess {
    /// `listen`: (name, address) pairs. Returns once every socket listens.
    pub fn start(
        agent: &Path,
        cgroup: Option<&Path>,
        netns: &Path,
        listen: &[(String, SocketAddrV4)],
    ) -> io::Result<Self> {
        let mut c = Command::new(agent);
        c.arg("serve");
        if let Some(cg) = cgroup {
            c.args(["--cgroup", &cg.to_string_lossy()]);
        }
        c.args(["--netns", &netns.to_string_lossy()]);
        for (name, addr) in listen {
            c.args(["--listen", &format!("{name}={addr}")]);
        }
        let child = c
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let mut me = Self { child };
        let stdout = me.child.stdout.take().ok_or_else(|| io::Error::other("no stdout"))?;
        let mut line = String::new();
        io::BufReader::new(stdout).read_line(&mut line)?;
        if line.trim() != "ready" {
            let mut err = String::new();
            if let Some(mut e) = me.child.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            return Err(io::Error::other(format!("serve did not start: {}", err.trim())));
        }
        Ok(me)
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `redirect-agent run` as a child process, stopped with SIGTERM (then SIGKILL) on drop.
pub struct AgentProcess {
    pub name: String,
    child: Option<Child>,
    /// The agent's stderr goes to a file: a pipe nobody drains could stall it.
    log: PathBuf,
}

impl AgentProcess {
    /// Starts the agent and waits until it has attached (its state file exists).
    pub fn start(agent: &Path, name: &str, args: &[&str]) -> io::Result<Self> {
        let log = std::env::temp_dir().join(format!("{name}.agent.log"));
        let log_file = std::fs::File::create(&log)?;
        let child = Command::new(agent)
            .arg("run")
            .args(["--name", name])
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("REDIRECT_AGENT_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()?;
        let mut me = Self {
            name: name.into(),
            child: Some(child),
            log,
        };
        let state = loader::state_path(name);
        let pid = me.child_mut().id();
        let deadline = Instant::now() + Duration::from_secs(30);
        // Ready means a state file written by this child, not one left by an earlier process.
        let ready = || {
            std::fs::read(&state)
                .ok()
                .and_then(|b| serde_json::from_slice::<loader::State>(&b).ok())
                .is_some_and(|s| s.pid == pid)
        };
        while !ready() {
            if let Some(status) = me.child_mut().try_wait()? {
                let err = me.take_log();
                me.child = None;
                return Err(io::Error::other(format!(
                    "agent exited early ({status}): {}",
                    err.trim()
                )));
            }
            if Instant::now() > deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "agent did not attach within 30 s",
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(me)
    }

    fn child_mut(&mut self) -> &mut Child {
        self.child.as_mut().expect("child present until stopped")
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGTERM, then wait (SIGKILL after 10 s). Returns the exit status and what it logged.
    pub fn stop(&mut self) -> io::Result<(std::process::ExitStatus, String)> {
        self.terminate();
        self.wait(Duration::from_secs(10))
    }

    /// SIGTERM, without waiting: the agent detaches, then drains.
    pub fn terminate(&self) {
        if let Some(child) = &self.child {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        }
    }

    /// Waits for the agent to exit (SIGKILL after `within`). Returns the exit status and what
    /// it logged.
    pub fn wait(&mut self, within: Duration) -> io::Result<(std::process::ExitStatus, String)> {
        let mut child = self.child.take().ok_or_else(|| io::Error::other("already stopped"))?;
        let deadline = Instant::now() + within;
        let status = loop {
            if let Some(s) = child.try_wait()? {
                break s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                break child.wait()?;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        Ok((status, self.take_log()))
    }

    /// What the agent has logged so far; the file is removed.
    fn take_log(&mut self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let _ = std::fs::remove_file(&self.log);
        text
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.stop();
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

/// Reads the banner line a [`TestServer`] sends (bounded).
pub fn read_banner(r: &mut impl BufRead) -> io::Result<String> {
    let mut line = Vec::new();
    r.take(512).read_until(b'\n', &mut line)?;
    if line.last() != Some(&b'\n') {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "no banner from server"));
    }
    Ok(String::from_utf8_lossy(&line).trim_end().to_owned())
}
