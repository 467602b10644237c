//! A real container runtime as a test's node: Debian's podman (CNI backend, runc) with the
//! reference `bridge` and `host-local` plugins, and redirect-cni chained after them by the
//! install-cni container of deploy/daemonset.yaml, run from the image `cargo xtask image`
//! builds. The agent runs as that DaemonSet's agent container. Pods get their network from
//! the real plugins; redirect-cni gets the bridge plugin's real `prevResult`.
//!
//! Each [`Node`] has everything of its own: a podman store, configuration and lock directory,
//! a CNI configuration and binary directory, a CNI network name (host-local keeps its leases
//! by name), and a network namespace in which podman runs, so the bridge, the pods' veths and
//! the test's remote host are inside it, with no default route. All of it goes on drop.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use redirect_testkit::{netns::NamedNetns, unique};
use serde_json::Value;

use crate::{agent_bin, node::NodeAgent, require_root, testkit_bin};

/// The image archive `cargo xtask test` builds beside the binaries it tests.
pub fn image_archive() -> PathBuf {
    let path = std::env::var_os("REDIRECT_IMAGE_ARCHIVE")
        .map(PathBuf::from)
        .unwrap_or_else(|| agent_bin().with_file_name("redirect.oci.tar"));
    assert!(
        path.is_file(),
        "image archive {} not found: `cargo xtask test` builds it (or `cargo xtask image --debug`)",
        path.display()
    );
    path
}

/// deploy/daemonset.yaml, parsed.
pub fn daemonset() -> serde_yaml::Value {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/daemonset.yaml"))
        .expect("deploy/daemonset.yaml");
    serde_yaml::from_str(&text).expect("deploy/daemonset.yaml parses")
}

/// The DaemonSet's pod spec's container (or init container) `name`.
pub fn container(ds: &serde_yaml::Value, name: &str) -> serde_yaml::Value {
    let spec = &ds["spec"]["template"]["spec"];
    spec["containers"]
        .as_sequence()
        .into_iter()
        .chain(spec["initContainers"].as_sequence())
        .flatten()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name} in deploy/daemonset.yaml"))
        .clone()
}

fn strings(v: &serde_yaml::Value) -> Vec<String> {
    v.as_sequence()
        .into_iter()
        .flatten()
        .map(|s| s.as_str().expect("a string").to_owned())
        .collect()
}

/// The capabilities a container of the DaemonSet adds over `drop: [ALL]`.
pub fn capabilities(container: &serde_yaml::Value) -> Vec<String> {
    let caps = &container["securityContext"]["capabilities"];
    assert_eq!(caps["drop"][0], "ALL", "{caps:?}");
    strings(&caps["add"])
}

/// A pod the runtime created and started: its infra container is the sandbox redirect-cni saw.
pub struct Pod {
    pub name: String,
    /// CNI_CONTAINERID: the id the agent lists the workload under.
    pub sandbox: String,
    pub netns: PathBuf,
    pub ip: Ipv4Addr,
}

/// One podman "node"; see the module's documentation.
pub struct Node {
    dir: PathBuf,
    pub netns: NamedNetns,
    pub network: String,
    /// The bridge's address: the node's own on the pod network (the remote host of the tests).
    pub gateway: Ipv4Addr,
    pub subnet: u8,
    pub image: String,
    /// The pods' namespaces, removed on drop if the runtime left any (a DEL that failed).
    netns_made: std::cell::RefCell<Vec<PathBuf>>,
}

/// A running container, removed on drop (after `grace` for SIGTERM).
pub struct Container<'a> {
    node: &'a Node,
    pub name: String,
    grace: Duration,
}

impl Node {
    /// A node on 10.200.`subnet`.0/24 with the image loaded and the primary CNI configuration
    /// (bridge + host-local) written, as a cluster's network add-on leaves it.
    pub fn new(tag: &str, subnet: u8) -> Self {
        require_root();
        let name = unique(tag);
        let dir = std::env::temp_dir().join(&name);
        for sub in ["net.d", "bin", "tmp"] {
            std::fs::create_dir_all(dir.join(sub)).expect("the node's directories");
        }
        let netns = NamedNetns::create(&name).expect("the node's network namespace");
        let gateway = Ipv4Addr::new(10, 200, subnet, 1);
        let node = Self {
            netns,
            network: name.clone(),
            gateway,
            subnet,
            image: image_name(),
            netns_made: Default::default(),
            dir,
        };
        // No default route, no masquerade: the pods reach the node's namespace and nothing
        // past it. The hard RLIMIT_NOFILE here is 20000; podman's defaults exceed it.
        std::fs::write(
            node.dir.join("containers.conf"),
            format!(
                r#"[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]
[network]
network_backend = "cni"
cni_plugin_dirs = ["{bin}", "/usr/lib/cni"]
network_config_dir = "{netd}"
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
tmp_dir = "{tmp}"
lock_type = "file"
volume_path = "{tmp}/volumes"
"#,
                bin = node.dir.join("bin").display(),
                netd = node.dir.join("net.d").display(),
                tmp = node.dir.join("tmp").display(),
            ),
        )
        .expect("containers.conf");
        let primary = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": node.network,
            "plugins": [{
                "type": "bridge",
                "bridge": format!("rdt{subnet}"),
                "isGateway": true,
                "ipMasq": false,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{ "subnet": format!("10.200.{subnet}.0/24"), "gateway": gateway.to_string() }]]
                }
            }]
        });
        std::fs::write(node.conflist_path(), serde_json::to_vec_pretty(&primary).unwrap())
            .expect("the primary CNI configuration");
        let out = node.podman(&["load", "--quiet", "--input", &image_archive().to_string_lossy()]);
        assert!(
            out.status.success(),
            "podman load: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        node
    }

    pub fn conflist_path(&self) -> PathBuf {
        self.dir.join("net.d/10-pods.conflist")
    }

    pub fn conflist(&self) -> Value {
        serde_json::from_slice(&std::fs::read(self.conflist_path()).unwrap()).unwrap()
    }

    pub fn bin_dir(&self) -> PathBuf {
        self.dir.join("bin")
    }

    /// The CNI configuration directory: the node's /etc/cni/net.d.
    pub fn conf_dir(&self) -> PathBuf {
        self.dir.join("net.d")
    }

    /// Where a volume of the DaemonSet that is not a host path (a projected service account
    /// token) comes from; the test fills it.
    pub fn volume_dir(&self, volume: &str) -> PathBuf {
        self.dir.join("volumes").join(volume)
    }

    /// `podman ARGS` on this node's store, in its network namespace; `env` as the kubelet
    /// passes a pod's identity (CNI_ARGS, which podman passes on to the plugins).
    pub fn podman_with(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut c = Command::new("nsenter");
        // nsenter, not `ip netns exec`: that remounts /sys, and runc needs the cgroup mounts.
        c.arg(format!("--net={}", self.netns.path.display()))
            .arg("podman")
            .arg("--root")
            .arg(self.dir.join("store"))
            .arg("--runroot")
            .arg(self.dir.join("run"))
            .args(["--storage-driver", "vfs"])
            .args(args)
            .env("CONTAINERS_CONF", self.dir.join("containers.conf"))
            .env_remove("CNI_ARGS")
            .stdin(Stdio::null());
        for (k, v) in env {
            c.env(k, v);
        }
        c.output().expect("run podman")
    }

    pub fn podman(&self, args: &[&str]) -> Output {
        self.podman_with(args, &[])
    }

    /// `podman run --detach` of the DaemonSet's container `spec`, for the agent instance
    /// `agent`: its command with the instance's socket, name and metrics address; its
    /// capabilities, security options, environment; the node's namespaces as `hostNetwork`
    /// and `hostPID` give them; its hostPath volumes, with the test's CNI directories in place
    /// of /opt/cni/bin and /etc/cni/net.d. Volumes that are not hostPath (the service
    /// account's projected token) come from [`Node::volume_dir`]; `env` adds to the
    /// container's (as the kubelet adds `KUBERNETES_SERVICE_HOST`).
    pub fn run_daemonset_container(
        &self,
        name: &str,
        spec: &serde_yaml::Value,
        agent: &NodeAgent,
        extra: &[&str],
        env: &[(&str, String)],
    ) -> Container<'_> {
        let ds = daemonset();
        let pod = &ds["spec"]["template"]["spec"];
        let mut args: Vec<String> = vec!["run".into(), "--detach".into(), "--name".into(), name.into()];
        args.extend(["--cgroup-parent".into(), self.cgroup_parent()]);
        if pod["hostNetwork"].as_bool() == Some(true) {
            args.extend(["--network".into(), "host".into()]);
        } else {
            args.extend(["--network".into(), "none".into()]);
        }
        if pod["hostPID"].as_bool() == Some(true) {
            args.extend(["--pid".into(), "host".into()]);
        }
        // Kubernetes on cgroup v2 gives each container a cgroup namespace of its own.
        args.extend(["--cgroupns".into(), "private".into()]);
        // The agent's descriptors: this machine's hard limit is 20000.
        args.extend([
            "--ulimit".into(),
            "nofile=16384:16384".into(),
            "--ulimit".into(),
            "nproc=1024:1024".into(),
        ]);
        let security = &spec["securityContext"];
        if security["privileged"].as_bool() == Some(true) {
            args.push("--privileged".into());
        }
        args.extend(["--cap-drop".into(), "ALL".into()]);
        for cap in capabilities(spec) {
            args.extend(["--cap-add".into(), cap]);
        }
        if security["seccompProfile"]["type"] == "Unconfined" {
            args.extend(["--security-opt".into(), "seccomp=unconfined".into()]);
        }
        if let Some(uid) = security["runAsUser"].as_u64() {
            args.extend(["--user".into(), uid.to_string()]);
        }
        // The container's environment as the kubelet makes it (`fieldRef`s resolved), which
        // its command's `$(VAR)`s then take.
        let mut vars: Vec<(String, String)> = Vec::new();
        for env in spec["env"].as_sequence().into_iter().flatten() {
            let key = env["name"].as_str().unwrap();
            let value = match (
                env["value"].as_str(),
                env["valueFrom"]["fieldRef"]["fieldPath"].as_str(),
            ) {
                (Some(v), _) => v.to_owned(),
                // Where the test's metrics listen.
                (None, Some("status.hostIP")) => agent.metrics.ip().to_string(),
                (None, Some("metadata.namespace")) => ds["metadata"]["namespace"].as_str().unwrap().to_owned(),
                other => panic!("env {key}: {other:?} is not one the harness resolves"),
            };
            vars.push((key.to_owned(), value));
        }
        vars.extend(env.iter().map(|(k, v)| (k.to_string(), v.clone())));
        for (key, value) in &vars {
            args.extend(["--env".into(), format!("{key}={value}")]);
        }
        let volumes = pod["volumes"].as_sequence().unwrap();
        for mount in spec["volumeMounts"].as_sequence().into_iter().flatten() {
            let volume = volumes
                .iter()
                .find(|v| v["name"] == mount["name"])
                .expect("a volume of each mount");
            let host = match volume["hostPath"]["path"].as_str() {
                Some("/opt/cni/bin") => self.bin_dir(),
                Some("/etc/cni/net.d") => self.conf_dir(),
                Some(other) => PathBuf::from(other),
                None => self.volume_dir(volume["name"].as_str().unwrap()),
            };
            std::fs::create_dir_all(&host).unwrap();
            let propagation = match mount["mountPropagation"].as_str() {
                Some("Bidirectional") => ":rshared",
                Some("HostToContainer") => ":rslave",
                _ => "",
            };
            args.extend([
                "--volume".into(),
                format!(
                    "{}:{}{propagation}",
                    host.display(),
                    mount["mountPath"].as_str().unwrap()
                ),
            ]);
        }
        args.push(self.image.clone());
        let socket = agent.socket.to_string_lossy().into_owned();
        let metrics = agent.metrics.to_string();
        let mut command = strings(&spec["command"]);
        for arg in command.iter_mut() {
            match arg.as_str() {
                "/run/redirect/node.sock" => *arg = socket.clone(),
                "$(NODE_IP):15030" => *arg = metrics.clone(),
                _ => {
                    for (key, value) in &vars {
                        *arg = arg.replace(&format!("$({key})"), value);
                    }
                }
            }
        }
        args.extend(command);
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = self.podman(&args);
        assert!(
            out.status.success(),
            "podman run {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Container {
            node: self,
            name: name.into(),
            grace: Duration::from_secs(45),
        }
    }

    /// The DaemonSet's agent container as instance `agent`, waited for until it serves.
    pub fn start_agent(&self, name: &str, agent: &NodeAgent) -> Container<'_> {
        let spec = container(&daemonset(), "agent");
        let c = self.run_daemonset_container(name, &spec, agent, &["--name", &agent.name], &[]);
        let deadline = Instant::now() + redirect_testkit::agent::start_timeout();
        loop {
            let pid = c.pid();
            if pid != 0
                && agent.state().is_some_and(|s| s.pid == pid)
                && std::os::unix::net::UnixStream::connect(&agent.socket).is_ok()
            {
                return c;
            }
            assert!(c.running(), "agent container {name} exited: {}", c.logs());
            assert!(
                Instant::now() < deadline,
                "agent container {name} not ready: {}",
                c.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Creates pod `name` in `namespace` and starts it with `containers` (name, capabilities,
    /// command), each from the image with the test kit mounted at /testkit. Starting the pod
    /// runs the CNI chain; `Err` is podman's message when it fails.
    pub fn pod(&self, name: &str, namespace: &str, containers: &[(&str, &[&str], &[&str])]) -> Result<Pod, String> {
        let cni_args = format!("K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name}");
        let env = [("CNI_ARGS", cni_args.as_str())];
        let parent = self.cgroup_parent();
        let out = self.podman_with(
            &[
                "pod",
                "create",
                "--name",
                name,
                "--network",
                &self.network,
                "--cgroup-parent",
                &parent,
            ],
            &env,
        );
        assert!(
            out.status.success(),
            "pod create: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let testkit = format!("{}:/testkit:ro", testkit_bin().display());
        for (cname, caps, command) in containers {
            let mut args = vec![
                "create",
                "--pod",
                name,
                "--name",
                cname,
                "--interactive",
                "--volume",
                &testkit,
            ];
            args.extend(["--cap-drop", "ALL"]);
            for cap in *caps {
                args.extend(["--cap-add", cap]);
            }
            args.push(&self.image);
            args.extend_from_slice(command);
            let out = self.podman_with(&args, &env);
            assert!(
                out.status.success(),
                "create {cname}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let out = self.podman_with(&["pod", "start", name], &env);
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_owned());
        }
        let infra = self.inspect(&["pod", "inspect", name, "--format", "{{.InfraContainerID}}"]);
        let netns = self.inspect(&["inspect", &infra, "--format", "{{.NetworkSettings.SandboxKey}}"]);
        self.netns_made.borrow_mut().push(PathBuf::from(&netns));
        let ip = self.inspect(&[
            "inspect",
            &infra,
            "--format",
            &format!(
                "{{{{(index .NetworkSettings.Networks \"{}\").IPAddress}}}}",
                self.network
            ),
        ]);
        Ok(Pod {
            name: name.into(),
            sandbox: infra,
            netns: netns.into(),
            ip: ip.parse().unwrap_or_else(|_| panic!("pod {name}'s address: '{ip}'")),
        })
    }

    fn inspect(&self, args: &[&str]) -> String {
        let out = self.podman(args);
        assert!(
            out.status.success(),
            "podman {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// `podman pod rm --force`: the runtime stops the containers and runs CNI DEL.
    pub fn remove_pod(&self, pod: &Pod) {
        let out = self.podman(&["pod", "rm", "--force", "--time", "5", &pod.name]);
        assert!(out.status.success(), "pod rm: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// A container's lines of output so far.
    pub fn logs(&self, name: &str) -> String {
        let out = self.podman(&["logs", name]);
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    /// The test kit's `serve` in a pod prints `ready` once it listens.
    pub fn wait_for_output(&self, container: &str, text: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.logs(container).contains(text) {
            assert!(
                Instant::now() < deadline,
                "{container} never printed '{text}': {}",
                self.logs(container)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A file the runtime's plugin directory holds.
    pub fn plugin(&self, name: &str) -> PathBuf {
        self.bin_dir().join(name)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Every container's and pod's cgroups (and their conmons') go under this one, in each
    /// hierarchy, so that the node removes them all.
    fn cgroup_parent(&self) -> String {
        format!("/{}", self.network)
    }
}

/// Removes `tree` (a path from a hierarchy's root) from every cgroup hierarchy mounted, the
/// deepest directories first; each must be empty of processes by then.
fn remove_cgroups(tree: &str) {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    for mount in mounts.lines().filter_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.len() > 2 && (f[2] == "cgroup" || f[2] == "cgroup2")).then(|| f[1].to_owned())
    }) {
        let top = Path::new(&mount).join(tree.trim_start_matches('/'));
        let mut dirs = vec![];
        let mut todo = vec![top];
        while let Some(d) = todo.pop() {
            if let Ok(entries) = std::fs::read_dir(&d) {
                todo.extend(entries.flatten().filter(|e| e.path().is_dir()).map(|e| e.path()));
                dirs.push(d);
            }
        }
        for d in dirs.iter().rev() {
            let _ = std::fs::remove_dir(d);
        }
    }
}

fn image_name() -> String {
    let ds = daemonset();
    let image = container(&ds, "agent")["image"]
        .as_str()
        .expect("the agent's image")
        .to_owned();
    assert_eq!(
        container(&ds, "install-cni")["image"].as_str(),
        Some(image.as_str()),
        "the DaemonSet runs one image"
    );
    image
}

impl Container<'_> {
    /// The host's pid of its first process (0 when it is not running): with `hostPID`, the
    /// agent's own.
    pub fn pid(&self) -> u32 {
        let out = self.node.podman(&["inspect", &self.name, "--format", "{{.State.Pid}}"]);
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(0)
    }

    pub fn running(&self) -> bool {
        let out = self
            .node
            .podman(&["inspect", &self.name, "--format", "{{.State.Running}}"]);
        String::from_utf8_lossy(&out.stdout).trim() == "true"
    }

    /// Its exit code once it has exited, within `within`.
    pub fn exited(&self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        while self.running() {
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let out = self
            .node
            .podman(&["inspect", &self.name, "--format", "{{.State.ExitCode}}"]);
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    }

    /// `podman stop`: SIGTERM, SIGKILL after `grace`, as the kubelet stops a container.
    pub fn stop(&self) -> Option<i32> {
        let grace = self.grace.as_secs().to_string();
        let out = self.node.podman(&["stop", "--time", &grace, &self.name]);
        assert!(
            out.status.success(),
            "stop {}: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        self.exited(Duration::from_secs(10))
    }

    pub fn logs(&self) -> String {
        self.node.logs(&self.name)
    }
}

impl Drop for Container<'_> {
    fn drop(&mut self) {
        let grace = self.grace.as_secs().to_string();
        let _ = self.node.podman(&["rm", "--force", "--time", &grace, &self.name]);
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // Pods first: their CNI DEL runs while the plugin and its configuration are there.
        let _ = self.podman(&["pod", "rm", "--all", "--force", "--time", "5"]);
        let _ = self.podman(&["rm", "--all", "--force", "--time", "5"]);
        let _ = self.podman(&["system", "reset", "--force"]);
        for netns in self.netns_made.borrow().iter() {
            if netns.exists()
                && let Some(name) = netns.file_name()
            {
                let _ = Command::new("ip").arg("netns").arg("del").arg(name).status();
            }
        }
        let _ = std::fs::remove_dir_all(format!("/var/lib/cni/networks/{}", self.network));
        remove_cgroups(&self.cgroup_parent());
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
