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

mod daemonset;

use daemonset::image_name;
pub use daemonset::{capabilities, container, daemonset};

use crate::{agent_bin, require_root, testkit_bin};

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
    /// The DaemonSet this node runs: deploy/daemonset.yaml, with the patches of
    /// [`Node::patch_daemonset`].
    daemonset: std::cell::RefCell<serde_yaml::Value>,
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
            daemonset: daemonset().into(),
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

    /// podman's run root: in /tmp whatever TMPDIR says, as podman refuses one longer than 50
    /// bytes.
    fn runroot(&self) -> PathBuf {
        PathBuf::from(format!("/tmp/{}.run", self.network))
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
            .arg(self.runroot())
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
        // libcni's cached results, which a DEL that failed leaves (`NETWORK-CONTAINER-IFNAME`).
        if let Ok(cached) = std::fs::read_dir("/var/lib/cni/results") {
            let ours = format!("{}-", self.network);
            for entry in cached.flatten() {
                if entry.file_name().to_string_lossy().starts_with(&ours) {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        remove_cgroups(&self.cgroup_parent());
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = std::fs::remove_dir_all(self.runroot());
    }
}
