//! Node mode's harness: a `redirect-agent node` instance of the test's own (its name, socket
//! and metrics port), processes of it that can be restarted, the CNI plugin invoked as a
//! container runtime invokes it, and a scrape of the metrics endpoint.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use redirect_agent::engine::pins::State;
use redirect_testkit::unique;

use crate::{Landing, Workload, agent_bin, agent_cmd, landing, require_root, testkit_bin};

mod load;
pub use load::{StopOnDrop, load};

/// The plugin binary `cargo xtask test` built next to the agent.
pub fn cni_bin() -> PathBuf {
    std::env::var_os("REDIRECT_CNI_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| agent_bin().with_file_name("redirect-cni"))
}

/// One node agent instance; every process of it is stopped, and its pins removed, on drop.
pub struct NodeAgent {
    pub name: String,
    pub socket: PathBuf,
    pub metrics: SocketAddrV4,
    extra: Vec<String>,
    /// RLIMIT_NOFILE the agent's processes start with and cannot raise.
    nofile: Option<u64>,
    /// The only capabilities its processes may have (their bounding set), as Kubernetes names
    /// them (`NET_ADMIN`).
    capabilities: Option<rustix::thread::CapabilitySet>,
    /// The network namespace its processes run in (the node's, to them); the test's own by
    /// default.
    netns: Option<PathBuf>,
}

/// `redirect-agent node` under a name and socket that must be refused: the start exits 1 at
/// once with a one-line error, which is returned. The fast path off, whatever the kernel's
/// probe would say, so that the pins of an agent with it on refuse the start.
pub fn refused_node_start(name: &str, socket: &Path) -> String {
    let out = agent_cmd(&[
        "node",
        "--name",
        name,
        "--socket",
        &socket.to_string_lossy(),
        "--metrics",
        "off",
        "--fast-path=off",
    ]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    err
}

/// One process of the instance.
pub struct NodeProcess {
    child: Option<Child>,
    log: PathBuf,
}

impl NodeAgent {
    /// Chooses the name, socket and a free loopback port; starts nothing.
    pub fn new(tag: &str, extra: &[&str]) -> Self {
        Self::named(&unique(tag), extra)
    }

    /// [`NodeAgent::new`] under a given instance name.
    pub fn named(name: &str, extra: &[&str]) -> Self {
        require_root();
        let name = name.to_owned();
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free loopback port")
            .port();
        Self {
            socket: PathBuf::from(format!("/run/redirect/{name}.sock")),
            metrics: SocketAddrV4::new(Ipv4Addr::LOCALHOST, port),
            name,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            nofile: None,
            capabilities: None,
            netns: None,
        }
    }

    /// Its processes run in the network namespace at `netns`, a node of the test's own whose
    /// connections are its to judge: the metrics endpoint is then that namespace's (read
    /// counters with `stats`).
    pub fn within(mut self, netns: &Path) -> Self {
        self.netns = Some(netns.to_owned());
        self
    }

    /// Its processes start with these capabilities at most (a container's `capabilities.add`
    /// over `drop: [ALL]`), named as Kubernetes names them. Panics on a name that is none.
    pub fn with_capabilities(mut self, names: &[String]) -> Self {
        let mut set = rustix::thread::CapabilitySet::empty();
        for name in names {
            set |= rustix::thread::CapabilitySet::from_name(name).unwrap_or_else(|| panic!("no capability {name}"));
        }
        self.capabilities = Some(set);
        self
    }

    /// Its processes start with `nofile` descriptors at most (soft and hard), without
    /// CAP_SYS_RESOURCE, so the agent cannot raise it: a descriptor limit a test can reach.
    pub fn with_nofile(mut self, nofile: u64) -> Self {
        self.nofile = Some(nofile);
        self
    }

    /// Starts a process and waits until it serves (its state names it and the socket answers).
    pub fn start(&self) -> std::io::Result<NodeProcess> {
        let log = std::env::temp_dir().join(format!("{}.node.log", unique(&self.name)));
        let mut command = Command::new(agent_bin());
        if let Some(allowed) = self.capabilities {
            use rustix::thread::{self as t, CapabilitySet};
            use std::os::unix::process::CommandExt as _;
            // SAFETY: between fork and exec the closure only makes syscalls (prctl, capget,
            // capset), which allocate nothing and take no lock.
            unsafe {
                command.pre_exec(move || {
                    // Root's exec takes every capability in the bounding set: the set is
                    // what the agent gets. SETPCAP, which removing needs, goes last.
                    for cap in CapabilitySet::all().iter() {
                        if cap != CapabilitySet::SETPCAP && !allowed.contains(cap) {
                            match t::remove_capability_from_bounding_set(cap) {
                                // One this kernel does not have.
                                Err(rustix::io::Errno::INVAL) => {}
                                other => other?,
                            }
                        }
                    }
                    t::clear_ambient_capability_set()?;
                    let mut sets = t::capabilities(None)?;
                    sets.inheritable = CapabilitySet::empty();
                    t::set_capabilities(None, sets)?;
                    if !allowed.contains(CapabilitySet::SETPCAP) {
                        t::remove_capability_from_bounding_set(CapabilitySet::SETPCAP)?;
                    }
                    Ok(())
                });
            }
        }
        if let Some(netns) = &self.netns {
            use std::os::{fd::AsFd as _, unix::process::CommandExt as _};
            let ns = std::fs::File::open(netns)?;
            // SAFETY: between fork and exec the closure makes one syscall (setns), which
            // allocates nothing and takes no lock; `ns` stays open in the parent until spawn
            // returns.
            unsafe {
                command.pre_exec(move || {
                    rustix::thread::move_into_link_name_space(
                        ns.as_fd(),
                        Some(rustix::thread::LinkNameSpaceType::Network),
                    )?;
                    Ok(())
                });
            }
        }
        if let Some(nofile) = self.nofile {
            use std::os::unix::process::CommandExt as _;
            let limit = rustix::process::Rlimit {
                current: Some(nofile),
                maximum: Some(nofile),
            };
            // SAFETY: between fork and exec the closure only makes two syscalls (prctl,
            // setrlimit), which allocate nothing and take no lock.
            unsafe {
                command.pre_exec(move || {
                    rustix::thread::remove_capability_from_bounding_set(rustix::thread::CapabilitySet::SYS_RESOURCE)?;
                    rustix::process::setrlimit(rustix::process::Resource::Nofile, limit)?;
                    Ok(())
                });
            }
        }
        let child = command
            .args(["node", "--name", &self.name])
            .args(["--socket", &self.socket.to_string_lossy()])
            .args(["--metrics", &self.metrics.to_string()])
            // A successor's start takes minutes where the programs are verified under
            // emulation (the 6.1 VM): as long as the tests wait for any agent to start.
            .args([
                "--handover-timeout-secs",
                &redirect_testkit::agent::start_timeout().as_secs().max(60).to_string(),
            ])
            .args(&self.extra)
            .args(redirect_testkit::agent::fast_path_default(&self.extra))
            .env(
                "RUST_LOG",
                std::env::var("REDIRECT_AGENT_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()?;
        let mut p = NodeProcess {
            child: Some(child),
            log,
        };
        let pid = p.pid();
        let deadline = Instant::now() + redirect_testkit::agent::start_timeout();
        loop {
            if self.state().is_some_and(|s| s.pid == pid)
                && std::os::unix::net::UnixStream::connect(&self.socket).is_ok()
            {
                return Ok(p);
            }
            if let Some(status) = p.child.as_mut().unwrap().try_wait()? {
                let log = p.take_log();
                p.child = None;
                return Err(std::io::Error::other(format!(
                    "node agent exited early ({status}): {}",
                    log.trim()
                )));
            }
            if Instant::now() > deadline {
                return Err(std::io::Error::other(format!(
                    "node agent not ready in 30 s: {}",
                    p.take_log()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn state(&self) -> Option<State> {
        State::read(&self.name)
    }

    /// `redirect-agent ARGS --socket S`, for enroll/unenroll/list.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        let mut all: Vec<&str> = args.to_vec();
        let socket = self.socket.to_string_lossy().into_owned();
        let at = all.iter().position(|a| *a == "--").unwrap_or(all.len());
        all.splice(at..at, ["--socket", socket.as_str()]);
        agent_cmd(&all)
    }

    /// `enroll --netns NETNS --id ID ARGS…`, which must succeed.
    pub fn enroll(&self, netns: &Path, id: &str, args: &[&str]) {
        let netns = netns.to_string_lossy();
        let mut all = vec!["enroll", "--netns", &netns, "--id", id];
        all.extend_from_slice(args);
        let out = self.cli(&all);
        assert!(
            out.status.success(),
            "enroll {id}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Workload ids, from `list --json`.
    pub fn ids(&self) -> Vec<String> {
        let out = self.cli(&["list", "--json"]);
        assert!(out.status.success(), "list: {}", String::from_utf8_lossy(&out.stderr));
        let list: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
        list.iter().map(|w| w["id"].as_str().unwrap().to_owned()).collect()
    }

    /// One scrape of the metrics endpoint: (status line, body).
    pub fn scrape(&self, path: &str) -> std::io::Result<(String, String)> {
        let mut s = TcpStream::connect_timeout(&self.metrics.into(), Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n")?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        Ok((head.lines().next().unwrap_or("").to_owned(), body.to_owned()))
    }

    /// The CNI plugin, run as a container runtime runs it.
    pub fn cni(&self, command: &str, container: &str, netns: Option<&Path>, conf: &serde_json::Value) -> CniOutput {
        let mut c = Command::new(cni_bin());
        c.env_clear()
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", container)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", "/opt/cni/bin")
            .env(
                "CNI_ARGS",
                format!("K8S_POD_NAMESPACE=default;K8S_POD_NAME={container}"),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(ns) = netns {
            c.env("CNI_NETNS", ns);
        }
        let mut child = c.spawn().expect("spawn redirect-cni");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(&serde_json::to_vec(conf).unwrap())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        CniOutput {
            status: out.status,
            stdout: serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// The network configuration a runtime would pass, for this agent, with `selector: all`:
    /// every pod not excluded is enrolled, those without a sidecar with the embedded proxy.
    pub fn cni_conf(&self, annotations: serde_json::Value) -> serde_json::Value {
        let mut conf = self.cni_conf_default(annotations);
        conf["selector"] = serde_json::json!("all");
        conf
    }

    /// The same with the plugin's defaults: istio-cni's choice of pods.
    pub fn cni_conf_default(&self, annotations: serde_json::Value) -> serde_json::Value {
        serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "k8s-pod-network",
            "type": "redirect-cni",
            "agentSocket": self.socket,
            "runtimeConfig": { "io.kubernetes.cri.pod-annotations": annotations },
            "prevResult": {
                "cniVersion": "1.0.0",
                "interfaces": [{ "name": "eth0", "sandbox": "/run/netns/x" }],
                "ips": [{ "address": "10.200.0.1/24", "interface": 0 }]
            }
        })
    }
}

pub struct CniOutput {
    pub status: ExitStatus,
    pub stdout: serde_json::Value,
    pub stderr: String,
}

impl Drop for NodeAgent {
    fn drop(&mut self) {
        // Processes are stopped by their own guards (declared after the agent in tests); the
        // pins outlive them by design, and go here.
        let out = agent_cmd(&["cleanup", "--name", &self.name]);
        if !out.status.success() {
            eprintln!("cleanup {}: {}", self.name, String::from_utf8_lossy(&out.stderr));
        }
    }
}

impl NodeProcess {
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(c.id() as i32, sig) };
        }
    }

    /// SIGTERM and wait (SIGKILL after `within`): exit status and log.
    pub fn stop(&mut self, within: Duration) -> (Option<ExitStatus>, String) {
        self.signal(libc::SIGTERM);
        self.wait(within)
    }

    /// SIGKILL: a crash.
    pub fn kill(&mut self) -> String {
        self.signal(libc::SIGKILL);
        self.wait(Duration::from_secs(10)).1
    }

    /// Waits for an exit it did not ask for (a handover), SIGKILL after `within`.
    pub fn wait(&mut self, within: Duration) -> (Option<ExitStatus>, String) {
        let Some(mut child) = self.child.take() else {
            return (None, self.take_log());
        };
        let status = wait_or_kill(&mut child, within);
        (status, self.take_log())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn take_log(&mut self) -> String {
        let text = self.log();
        let _ = std::fs::remove_file(&self.log);
        text
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.stop(Duration::from_secs(10));
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

/// The value of the sample `name{labels}` (labels as written, in order), if present. The
/// `namespace` and `pod` labels the agent appends for a workload enrolled with its pod (every
/// CNI enroll) need not be written: they name the same workload as its `workload` label.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        let without_pod = match name.find(",namespace=\"") {
            Some(at) if name.ends_with('}') => format!("{}}}", &name[..at]),
            _ => name.to_owned(),
        };
        (name == series || without_pod == series).then(|| value.trim().parse().ok())?
    })
}

/// A successor of a node agent played part-way by the test kit (`handover-peer`), under the
/// name `redirect-agent` (a hard link beside the test kit's binary) so that the running agent
/// takes it for an agent process; it holds the instance's lock file open as a successor does
/// when `with_lock`. Killed on drop.
pub struct HandoverPeer {
    child: Option<Child>,
    link: PathBuf,
}

impl HandoverPeer {
    pub fn start(agent: &NodeAgent, until: &str, with_lock: bool, stall: Duration) -> Self {
        // A hard link beside the test kit; where that tree is read-only (`vm-test`'s guest
        // sees the host's files so), a copy in the temporary directory.
        let beside = testkit_bin().with_file_name(unique("peer"));
        let link = match std::fs::create_dir_all(&beside) {
            Ok(()) => {
                let link = beside.join("redirect-agent");
                std::fs::hard_link(testkit_bin(), &link).expect("hard link of the test kit");
                link
            }
            Err(_) => {
                let dir = std::env::temp_dir().join(unique("peer"));
                std::fs::create_dir_all(&dir).expect("a directory for the peer");
                let copy = dir.join("redirect-agent");
                std::fs::copy(testkit_bin(), &copy).expect("copy of the test kit");
                copy
            }
        };
        let mut c = Command::new(&link);
        c.args(["handover-peer", "--socket", &agent.socket.to_string_lossy()])
            .args(["--until", until, "--stall-ms", &stall.as_millis().to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if with_lock {
            c.args(["--lock", &format!("/run/redirect/{}.lock", agent.name)]);
        }
        Self {
            child: Some(c.spawn().expect("spawn handover-peer")),
            link,
        }
    }

    /// The first line it prints: the agent's answer to the handover (it waits up to 60 s for
    /// it), so that the test knows the handover has started.
    pub fn answer(&mut self) -> String {
        let out = self.child.as_mut().and_then(|c| c.stdout.as_mut()).expect("running");
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while out.read(&mut byte).unwrap_or(0) == 1 && byte[0] != b'\n' {
            line.push(byte[0]);
        }
        String::from_utf8_lossy(&line).into_owned()
    }

    /// Waits for it to end (killed after `within`): (exit status, stdout, stderr).
    pub fn finish(&mut self, within: Duration) -> (Option<ExitStatus>, String, String) {
        let mut child = self.child.take().expect("running");
        let status = wait_or_kill(&mut child, within);
        let mut out = String::new();
        let mut err = String::new();
        let _ = child.stdout.take().unwrap().read_to_string(&mut out);
        let _ = child.stderr.take().unwrap().read_to_string(&mut err);
        (status, out, err)
    }
}

impl Drop for HandoverPeer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_file(&self.link);
        if let Some(dir) = self.link.parent() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// Waits for `child` to exit, killing it after `within`: its status, or `None` if it had to be
/// killed.
fn wait_or_kill(child: &mut std::process::Child, within: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Where a connection from the remote host to the pod's `port` landed: sk_lookup rewrites
/// nothing, so the app telling 127.0.0.6 as its peer is what shows it crossed the proxy.
#[derive(Debug, PartialEq, Eq)]
pub enum Inbound {
    Proxied,
    Direct,
    Failed(crate::Outcome),
}

pub fn inbound(w: &Workload, port: u16) -> Inbound {
    inbound_from(w, &w.pair.remote.path, w.pod(port).into())
}

/// [`inbound`] from the host of namespace `from`, to `to` (an address of the workload's).
pub fn inbound_from(w: &Workload, from: &std::path::Path, to: std::net::SocketAddr) -> Inbound {
    let r = w.probe(&redirect_testkit::probe::ProbeSpec::outside(from, to));
    match landing(&r) {
        Landing::Failed(o) => Inbound::Failed(o),
        _ if r.banner_field("peer").is_some_and(|p| p.starts_with("127.0.0.6:")) => Inbound::Proxied,
        _ => Inbound::Direct,
    }
}

/// Connections rule `rule` (1-based) of iptables' `chain` decided for workload `id`, from a
/// scrape.
pub fn rule_count(text: &str, id: &str, chain: &str, rule: usize) -> u64 {
    let prefix = format!(
        "redirect_rule_connections_total{{workload=\"{id}\",family=\"ipv4\",table=\"nat\",chain=\"{chain}\",rule=\"{rule}\","
    );
    text.lines()
        .find(|l| l.starts_with(&prefix))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {prefix} in:\n{text}"))
}
