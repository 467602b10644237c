//! The DaemonSet of deploy/daemonset.yaml as the test's node runs it: its containers as
//! `podman run` options (what the kubelet would make of the pod spec), and the agent's.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use super::{Container, Node};
use crate::{kube_api::ApiServer, node::NodeAgent};

/// deploy/daemonset.yaml, parsed.
pub fn daemonset() -> serde_yaml::Value {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/daemonset.yaml"))
        .expect("deploy/daemonset.yaml");
    serde_yaml::from_str(&text).expect("deploy/daemonset.yaml parses")
}

/// Applies a JSON patch of `add` operations (RFC 6902, the only operation deploy/'s patches
/// use) to `doc`; `-` at the end of a path appends to a list.
fn add_all(doc: &mut serde_yaml::Value, patch: &serde_yaml::Value) {
    for op in patch.as_sequence().expect("a JSON patch is a list") {
        assert_eq!(op["op"], "add", "the harness applies add operations only: {op:?}");
        let path = op["path"].as_str().expect("a path");
        let mut parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let last = parts.pop().expect("a path with a key");
        let mut at = &mut *doc;
        for part in parts {
            at = match part.parse::<usize>() {
                Ok(i) if at.is_sequence() => &mut at[i],
                _ => &mut at[part],
            };
        }
        let value = op["value"].clone();
        match (at, last) {
            (serde_yaml::Value::Sequence(list), "-") => list.push(value),
            (at, key) => at[key] = value,
        }
    }
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

/// The one image the DaemonSet's containers run.
pub(super) fn image_name() -> String {
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

impl Node {
    /// The DaemonSet this node runs.
    pub fn daemonset(&self) -> serde_yaml::Value {
        self.daemonset.borrow().clone()
    }

    /// From now on the node runs the DaemonSet with `file` of deploy/ (a JSON patch, such as
    /// ambient.yaml) applied, as an overlay would apply it.
    pub fn patch_daemonset(&self, file: &str) {
        let path = format!("{}/../deploy/{file}", env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let patch: serde_yaml::Value = serde_yaml::from_str(&text).expect("a YAML JSON patch");
        add_all(&mut self.daemonset.borrow_mut(), &patch);
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
        let ds = self.daemonset();
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
                // ztunnel's socket directory (deploy/ambient.yaml): the node's own.
                Some("/var/run/ztunnel") => self.volume_dir("ztunnel"),
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

    /// The DaemonSet's install-cni container, as it runs it (`install --watch`), with `extra`
    /// arguments, returned once the plugin is chained. The kubelet's KUBERNETES_SERVICE_*
    /// point at `api` (plain HTTP: istio-cni's KUBERNETES_SERVICE_PROTOCOL), `token` is its
    /// service account's, and it writes the node's view of the CNI directory.
    pub fn start_install_cni(
        &self,
        name: &str,
        agent: &NodeAgent,
        api: &ApiServer,
        token: &str,
        extra: &[&str],
    ) -> Container<'_> {
        let account = self.volume_dir("cni-token");
        std::fs::create_dir_all(&account).unwrap();
        std::fs::write(account.join("token"), token).unwrap();
        let conf_dir = self.conf_dir().to_string_lossy().into_owned();
        let mut args = vec!["--host-cni-conf-dir", conf_dir.as_str()];
        args.extend_from_slice(extra);
        let env = [
            ("KUBERNETES_SERVICE_HOST", api.addr.ip().to_string()),
            ("KUBERNETES_SERVICE_PORT", api.addr.port().to_string()),
            ("KUBERNETES_SERVICE_PROTOCOL", "http".into()),
        ];
        let c = self.run_daemonset_container(name, &container(&self.daemonset(), "install-cni"), agent, &args, &env);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.chained() {
            assert!(
                Instant::now() < deadline,
                "install-cni {name} did not chain redirect-cni within 30 s: {}",
                c.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        c
    }

    /// Whether redirect-cni is chained after the bridge, installed, and given its kubeconfig.
    pub fn chained(&self) -> bool {
        let conf = self.conflist();
        let types: Vec<&str> = conf["plugins"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p["type"].as_str())
            .collect();
        let kubeconfig = conf["plugins"][1]["kubeconfig"].as_str().unwrap_or_default();
        types == ["bridge", "redirect-cni"] && self.plugin("redirect-cni").is_file() && Path::new(kubeconfig).is_file()
    }

    /// The DaemonSet's agent container as instance `agent`, waited for until it serves.
    pub fn start_agent(&self, name: &str, agent: &NodeAgent) -> Container<'_> {
        let spec = container(&self.daemonset(), "agent");
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
}
