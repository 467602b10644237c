//! The DaemonSet and its RBAC against the Kubernetes API types (k8s-openapi, API 1.33), and the systemd
//! unit against what the agent needs.

use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{Container, ServiceAccount},
    rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding},
};

fn manifest() -> (serde_yaml::Value, DaemonSet) {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/daemonset.yaml")).unwrap();
    let raw: serde_yaml::Value = serde_yaml::from_str(&text).expect("daemonset.yaml is YAML");
    let ds: DaemonSet = serde_yaml::from_str(&text).expect("daemonset.yaml is an apps/v1 DaemonSet");
    (raw, ds)
}

/// The API types ignore fields they do not know; serialising them back and comparing catches
/// a misspelt or misplaced field, which the API server would reject (or silently drop).
#[test]
fn every_field_is_one_the_api_knows() {
    let (raw, ds) = manifest();
    let raw: serde_json::Value = serde_json::to_value(raw).unwrap();
    let typed = serde_json::to_value(&ds).unwrap();
    assert_eq!(typed, raw, "a field of daemonset.yaml is not in the Kubernetes API");
}

fn agent(ds: &DaemonSet) -> &Container {
    let pod = ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    pod.containers
        .iter()
        .find(|c| c.name == "agent")
        .expect("an agent container")
}

fn arg_after<'a>(c: &'a Container, flag: &str) -> &'a str {
    let cmd = c.command.as_ref().unwrap();
    let i = cmd
        .iter()
        .position(|a| a == flag)
        .unwrap_or_else(|| panic!("no {flag} in {cmd:?}"));
    &cmd[i + 1]
}

#[test]
fn the_agent_gets_what_node_mode_needs() {
    let (_, ds) = manifest();
    let spec = ds.spec.as_ref().unwrap();
    let pod = spec.template.spec.as_ref().unwrap();
    let c = agent(&ds);
    assert_eq!(c.command.as_ref().unwrap()[..2], ["redirect-agent", "node"]);
    // Least privilege: a list of capabilities, not privileged (tests/tests/node_privilege.rs
    // runs node mode with exactly this list).
    let sc = c.security_context.as_ref().unwrap();
    assert_eq!(sc.privileged, Some(false));
    let caps = sc.capabilities.as_ref().unwrap();
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_owned()][..]));
    let mut added = caps.add.clone().unwrap();
    added.sort();
    assert_eq!(added, ["BPF", "NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE"]);
    assert_eq!(pod.host_pid, Some(true));
    // The handover passes the metrics listener, so both pods of an update share the node's
    // network; and no container declares a port, which hostNetwork would make a host port
    // that the update's surge pod could not be scheduled with.
    assert_eq!(pod.host_network, Some(true));
    for c in pod.containers.iter().chain(pod.init_containers.iter().flatten()) {
        assert!(c.ports.is_none(), "{} declares a port", c.name);
    }

    // Mounts: bpffs shared back to the node (pins outlive the pod), the cgroup root, the
    // runtime directory both pods of an update share, and the runtime's netns directory.
    let mounts = c.volume_mounts.as_ref().unwrap();
    let volumes = pod.volumes.as_ref().unwrap();
    let host_path = |mount_path: &str| {
        let m = mounts
            .iter()
            .find(|m| m.mount_path == mount_path)
            .unwrap_or_else(|| panic!("no mount at {mount_path}"));
        let v = volumes.iter().find(|v| v.name == m.name).unwrap();
        (
            v.host_path.as_ref().expect("a hostPath volume").path.clone(),
            m.mount_propagation.clone(),
        )
    };
    assert_eq!(
        host_path("/sys/fs/bpf"),
        ("/sys/fs/bpf".into(), Some("Bidirectional".into()))
    );
    assert_eq!(host_path("/sys/fs/cgroup").0, "/sys/fs/cgroup");
    assert_eq!(host_path("/run/redirect").0, "/run/redirect");
    assert_eq!(
        host_path("/var/run/netns"),
        ("/var/run/netns".into(), Some("HostToContainer".into()))
    );
    assert!(arg_after(c, "--socket").starts_with("/run/redirect/"));

    // Metrics on the node's address (scraped in the cluster, named for Prometheus), and
    // readiness is their /ready there: the kubelet probes the pod's address, the node's.
    let metrics = arg_after(c, "--metrics");
    let probe = c.readiness_probe.as_ref().unwrap().http_get.as_ref().unwrap();
    assert_eq!(probe.path.as_deref(), Some("/ready"));
    assert_eq!(probe.host, None);
    let port = match &probe.port {
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(p) => p.to_string(),
        other => panic!("numeric port expected: {other:?}"),
    };
    assert_eq!(metrics, format!("$(NODE_IP):{port}"));
    let node_ip = c
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "NODE_IP")
        .and_then(|e| e.value_from.as_ref()?.field_ref.as_ref())
        .map(|f| f.field_path.as_str());
    assert_eq!(node_ip, Some("status.hostIP"));
    let annotations = spec.template.metadata.as_ref().unwrap().annotations.as_ref().unwrap();
    assert_eq!(annotations["prometheus.io/port"], port);

    let requests = c.resources.as_ref().unwrap().requests.as_ref().unwrap();
    assert!(requests.contains_key("cpu") && requests.contains_key("memory"));

    // An update must overlap old and new pod (the handover), and the kubelet must let the
    // old one drain.
    let rolling = spec.update_strategy.as_ref().unwrap().rolling_update.as_ref().unwrap();
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int;
    assert_eq!(rolling.max_surge, Some(Int(1)));
    assert_eq!(rolling.max_unavailable, Some(Int(0)));
    let drain_s: i64 = arg_after(c, "--drain-timeout-ms").parse::<i64>().unwrap() / 1000;
    assert!(pod.termination_grace_period_seconds.unwrap() > drain_s);
}

#[test]
fn the_install_sidecar_keeps_the_cni_plugin_chained_for_the_agents_socket() {
    let (_, ds) = manifest();
    let pod = ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    let init = &pod.init_containers.as_ref().unwrap()[0];
    let cmd = init.command.as_ref().unwrap();
    assert_eq!(cmd[..3], ["redirect-cni", "install", "--watch"]);
    // A native sidecar: before the agent, and running while it runs.
    assert_eq!(init.restart_policy.as_deref(), Some("Always"));
    let sc = init.security_context.as_ref().unwrap();
    assert_eq!(sc.capabilities.as_ref().unwrap().add, None);
    let after = |f: &str| &cmd[cmd.iter().position(|a| a == f).unwrap() + 1];
    assert_eq!(after("--agent-socket"), arg_after(agent(&ds), "--socket"));
    let mounted: Vec<&str> = init
        .volume_mounts
        .as_ref()
        .unwrap()
        .iter()
        .map(|m| m.mount_path.as_str())
        .collect();
    assert!(mounted.contains(&after("--cni-bin-dir").as_str()));
    assert!(mounted.contains(&after("--cni-conf-dir").as_str()));
    assert!(mounted.contains(&after("--service-account").as_str()));
}

/// deploy/rbac.yaml's documents, each against its API type.
fn rbac() -> (ServiceAccount, ClusterRole, ClusterRoleBinding, Role, RoleBinding) {
    use serde::Deserialize as _;
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/rbac.yaml")).unwrap();
    let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde_yaml::Value::deserialize(d).expect("rbac.yaml is YAML"))
        .collect();
    assert_eq!(
        docs.len(),
        5,
        "a ServiceAccount, a ClusterRole, a Role and their bindings"
    );
    // As for the DaemonSet: a field the types drop is one the API server would not know.
    fn typed<T: serde::de::DeserializeOwned + serde::Serialize>(raw: &serde_yaml::Value) -> T {
        let v: T = serde_yaml::from_value(raw.clone()).expect("an API object");
        assert_eq!(
            serde_json::to_value(&v).unwrap(),
            serde_json::to_value(raw).unwrap(),
            "a field of rbac.yaml is not in the Kubernetes API"
        );
        v
    }
    (
        typed(&docs[0]),
        typed(&docs[1]),
        typed(&docs[2]),
        typed(&docs[3]),
        typed(&docs[4]),
    )
}

#[test]
fn the_plugin_may_read_pods_and_namespaces_and_its_daemonset_and_only_install_cni_has_the_token() {
    let (sa, role, binding, ds_role, ds_binding) = rbac();
    let rules = role.rules.unwrap();
    assert_eq!(rules.len(), 2);
    // A pod at ADD, and its namespace's labels in ambient mode.
    assert_eq!(rules[0].api_groups.as_deref(), Some(&["".to_owned()][..]));
    let read = ["pods".to_owned(), "namespaces".to_owned()];
    assert_eq!(rules[0].resources.as_deref(), Some(&read[..]));
    assert_eq!(rules[0].verbs, ["get"]);
    // An ambient pod's enrolled annotation, through the status subresource only.
    assert_eq!(rules[1].api_groups.as_deref(), Some(&["".to_owned()][..]));
    assert_eq!(rules[1].resources.as_deref(), Some(&["pods/status".to_owned()][..]));
    assert_eq!(rules[1].verbs, ["patch"]);
    assert_eq!(binding.role_ref.name, role.metadata.name.unwrap());
    let subject = &binding.subjects.unwrap()[0];
    assert_eq!(subject.kind, "ServiceAccount");
    assert_eq!(Some(&subject.name), sa.metadata.name.as_ref());
    assert_eq!(subject.namespace, sa.metadata.namespace);

    let (_, ds) = manifest();
    assert_eq!(ds.metadata.namespace, sa.metadata.namespace);
    // The one DaemonSet install-cni asks about, in its own namespace, read only.
    let rules = ds_role.rules.unwrap();
    assert_eq!(rules.len(), 1);
    assert_eq!(rules[0].api_groups.as_deref(), Some(&["apps".to_owned()][..]));
    assert_eq!(rules[0].resources.as_deref(), Some(&["daemonsets".to_owned()][..]));
    assert_eq!(rules[0].resource_names, ds.metadata.name.clone().map(|n| vec![n]));
    assert_eq!(rules[0].verbs, ["get"]);
    assert_eq!(ds_role.metadata.namespace, ds.metadata.namespace);
    assert_eq!(ds_binding.role_ref.kind, "Role");
    assert_eq!(ds_binding.role_ref.name, ds_role.metadata.name.unwrap());
    assert_eq!(ds_binding.subjects.unwrap()[0].name, subject.name);
    let init = &ds
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
        .init_containers
        .as_ref()
        .unwrap()[0];
    let cmd = init.command.as_ref().unwrap();
    let asked = &cmd[cmd.iter().position(|a| a == "--uninstall-if-removed").unwrap() + 1];
    assert_eq!(
        asked,
        &format!("$(POD_NAMESPACE)/{}", ds.metadata.name.as_ref().unwrap())
    );
    let pod = ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    assert_eq!(pod.service_account_name, sa.metadata.name);
    assert_eq!(pod.automount_service_account_token, Some(false));
    // The token's volume is mounted in install-cni and nowhere else.
    let mounts_token = |c: &Container| c.volume_mounts.iter().flatten().any(|m| m.name == "cni-token");
    assert!(mounts_token(&pod.init_containers.as_ref().unwrap()[0]));
    assert!(!mounts_token(agent(&ds)));
    let volume = pod.volumes.iter().flatten().find(|v| v.name == "cni-token").unwrap();
    let sources = volume.projected.as_ref().unwrap().sources.as_ref().unwrap();
    assert!(
        sources
            .iter()
            .any(|s| s.service_account_token.as_ref().is_some_and(|t| t.path == "token"))
    );
}

#[test]
fn the_systemd_unit_runs_node_mode_and_keeps_its_state_across_restarts() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/redirect-agent.service")).unwrap();
    let mut section = "";
    let mut keys = std::collections::BTreeMap::new();
    for line in text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        if let Some(s) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = s;
            continue;
        }
        let (k, v) = line.split_once('=').unwrap_or_else(|| panic!("not KEY=VALUE: {line}"));
        keys.insert(format!("{section}.{k}"), v.to_owned());
    }
    let exec = &keys["Service.ExecStart"];
    assert!(exec.starts_with("/usr/local/bin/redirect-agent node "), "{exec}");
    assert_eq!(keys["Service.KillSignal"], "SIGTERM");
    // /run/redirect holds the state a restart adopts: systemd must not remove it on stop.
    assert_eq!(keys["Service.RuntimeDirectory"], "redirect");
    assert_eq!(keys["Service.RuntimeDirectoryPreserve"], "yes");
    let drain_s: u64 = exec
        .split("--drain-timeout-ms ")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .parse::<u64>()
        .unwrap()
        / 1000;
    assert!(keys["Service.TimeoutStopSec"].parse::<u64>().unwrap() > drain_s);
    assert_eq!(keys["Install.WantedBy"], "multi-user.target");
}
