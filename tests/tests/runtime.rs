//! Through a real container runtime: podman creates the pods, the reference `bridge` plugin
//! gives them their network, and redirect-cni, chained after it by the install-cni container,
//! reads each pod from the API server (a stand-in, with the kubeconfig install-cni wrote from
//! its service account) and enrolls the pods Istio injected with the agent, which runs as the
//! DaemonSet's agent container. Every container is from the image `cargo xtask image` builds,
//! the one deploy/daemonset.yaml names; the test kit is mounted into the pods' app containers.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use redirect_testkit::{probe::ProbeSpec, server::TestServer};
use redirect_tests::{
    OUTBOUND_CAPTURE, banner_peer_ip,
    kube_api::{self, ApiServer},
    landing,
    node::NodeAgent,
    proxied,
    runtime::{self, Node, Pod},
    testkit_bin,
};

const APP: u16 = 8080;
/// The app's second port, which its annotation excludes from capture.
const ADMIN: u16 = 8081;
const REMOTE: u16 = 9090;
/// What Istio's sidecar needs of its own, as the stand-in (`redirect-agent proxy`) asks for:
/// it takes the proxy's uid and gid, and its listeners are made in the pod's namespace.
const SIDECAR_CAPS: &[&str] = &["NET_ADMIN", "SYS_ADMIN", "SETUID", "SETGID"];

/// What the injector writes in CNI mode: istio-validation in place of istio-init.
const INJECTED: &str = r#"{"initContainers":["istio-validation"],"containers":["istio-proxy"],"volumes":["istio-envoy"],"imagePullSecrets":null,"revision":"default"}"#;

/// A pod as the injector leaves it, known to the API server: the app (the test kit's server on
/// 8080 and 8081, which its annotation excludes) and its sidecar.
fn meshed_pod(node: &Node, api: &ApiServer, name: &str) -> Result<Pod, String> {
    api.add(kube_api::pod(
        "default",
        name,
        &["istio-proxy", "app"],
        serde_json::json!({
            "sidecar.istio.io/status": INJECTED,
            "traffic.sidecar.istio.io/excludeInboundPorts": ADMIN.to_string(),
        }),
    ));
    let sidecar = format!("{name}-sidecar");
    let app = format!("{name}-app");
    let listen = format!("app=0.0.0.0:{APP}");
    let admin = format!("admin=0.0.0.0:{ADMIN}");
    let pod = node.pod(
        name,
        "default",
        &[
            (&sidecar, SIDECAR_CAPS, &["redirect-agent", "proxy"]),
            (
                &app,
                &[],
                &["/testkit", "serve", "--listen", &listen, "--listen", &admin],
            ),
        ],
    )?;
    node.wait_for_output(&sidecar, "proxy serving");
    node.wait_for_output(&app, "ready");
    Ok(pod)
}

/// Inbound to `port` of `pod` from the node: whether the app saw it come from the sidecar.
fn through_sidecar(node: &Node, pod: &Pod, port: u16) -> bool {
    let r = ProbeSpec::outside(&node.netns.path, SocketAddrV4::new(pod.ip, port))
        .run(&testkit_bin())
        .unwrap();
    assert!(r.banner_field("name").is_some(), "{}:{port}: {r:?}", pod.name);
    r.banner_field("peer").is_some_and(|p| p.starts_with("127.0.0.6:"))
}

/// Both directions of `pod` go through its sidecar, as behind istio-iptables' REDIRECT: in,
/// the app sees the sidecar's 127.0.0.6; out, the connection lands on the sidecar's 15001 and
/// the remote host sees the pod's address.
/// Its excluded port is left alone.
fn assert_captured(node: &Node, pod: &Pod) {
    assert!(
        through_sidecar(node, pod, APP),
        "{} inbound not through its sidecar",
        pod.name
    );
    assert!(
        !through_sidecar(node, pod, ADMIN),
        "{}'s excluded port captured",
        pod.name
    );
    let r = ProbeSpec::outside(&pod.netns, SocketAddrV4::new(node.gateway, REMOTE))
        .run(&testkit_bin())
        .unwrap();
    assert_eq!(landing(&r), proxied(OUTBOUND_CAPTURE, "remote"), "{}: {r:?}", pod.name);
    assert_eq!(banner_peer_ip(&r), pod.ip, "{}: {r:?}", pod.name);
}

fn wait_until(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The DaemonSet as the API server returns it (what install-cni reads of it: its uid).
fn api_object(ds: &serde_yaml::Value) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {
            "name": ds["metadata"]["name"].as_str(),
            "namespace": ds["metadata"]["namespace"].as_str(),
            "uid": "6b1e0a52-0d7e-4f4e-9c1a-5f1f0d3b2a10"
        }
    })
}

#[test]
fn pods_of_a_real_runtime_are_captured_to_their_sidecar_deleted_and_kept_through_a_restart() {
    let agent = NodeAgent::new("rt", &[]);
    let node = Node::new("rt", 191);
    // On every address of the node's namespace: the bridge's comes with the first pod.
    let _remote = TestServer::start(&node.netns, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, REMOTE), "remote").unwrap();
    let ds = runtime::daemonset();
    // The API server, on the node's loopback (the plugin runs there, in the runtime's
    // namespace), and the service account the kubelet would mount into install-cni.
    let token = "rt-service-account-token";
    let api = ApiServer::start(&node.netns, token);
    // The DaemonSet is there while its pods run.
    let ds_path = format!(
        "/apis/apps/v1/namespaces/{}/daemonsets/{}",
        ds["metadata"]["namespace"].as_str().unwrap(),
        ds["metadata"]["name"].as_str().unwrap()
    );
    api.put(&ds_path, api_object(&ds));
    let start_install = |name: &str| node.start_install_cni(name, &agent, &api, token, &[]);
    let install = start_install("rt-install-cni");
    // What it copied onto the node links nothing of the node's: a node's glibc may be older.
    let ldd = std::process::Command::new("ldd")
        .arg(node.plugin("redirect-cni"))
        .output()
        .unwrap();
    let ldd = String::from_utf8_lossy(&ldd.stdout);
    assert!(ldd.contains("statically linked"), "{ldd}");
    let entry = &node.conflist()["plugins"][1];
    assert_eq!(entry["agentSocket"], agent.socket.to_string_lossy().as_ref(), "{entry}");

    // With the plugin chained and no agent, an injected pod's sandbox fails: nothing starts
    // uncaptured.
    let early = meshed_pod(&node, &api, "early");
    let err = early.err().expect("a pod with no agent to enroll it must not start");
    assert!(err.contains("redirect-cni"), "{err}");
    let out = node.podman(&["pod", "rm", "--force", "early"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let first = node.start_agent("rt-agent-1", &agent);
    // A pod with no sidecar is left alone, as istio-cni leaves it.
    api.add(kube_api::pod("default", "plain", &["app"], serde_json::json!({})));
    let plain = node
        .pod(
            "plain",
            "default",
            &[("plain-app", &[], &["/testkit", "serve", "--listen", "app=0.0.0.0:8080"])],
        )
        .expect("plain starts");
    node.wait_for_output("plain-app", "ready");
    assert!(!through_sidecar(&node, &plain, APP));
    let web = meshed_pod(&node, &api, "web").expect("web starts");
    let got = api.requests();
    assert!(
        got.iter()
            .any(|r| r.starts_with("GET /api/v1/namespaces/default/pods/web ")),
        "{got:?}"
    );
    assert_eq!(agent.ids(), std::slice::from_ref(&web.sandbox));
    let out = agent.cli(&["list", "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list[0]["proxy"], "none", "{list}");
    assert_eq!(list[0]["netns"], web.netns.to_string_lossy().as_ref(), "{list}");
    // Named by the kubelet's CNI_ARGS (podman puts its own K8S_POD_NAME first).
    assert_eq!(
        list[0]["pod"],
        serde_json::json!({ "namespace": "default", "name": "web" }),
        "{list}"
    );
    assert_captured(&node, &web);

    // A rolling update: the new agent pod starts beside the old one and takes over; the old
    // one exits by itself, cleanly.
    let second = node.start_agent("rt-agent-2", &agent);
    assert_eq!(first.exited(Duration::from_secs(60)), Some(0), "{}", first.logs());
    assert_eq!(agent.ids(), std::slice::from_ref(&web.sandbox));
    assert_captured(&node, &web);
    let shop = meshed_pod(&node, &api, "shop").expect("shop starts under the new agent");
    let mut ids = agent.ids();
    ids.sort();
    let mut want = vec![web.sandbox.clone(), shop.sandbox.clone()];
    want.sort();
    assert_eq!(ids, want);
    assert_captured(&node, &shop);

    // Deleting a pod runs CNI DEL: it leaves the agent, its namespace goes.
    node.remove_pod(&web);
    assert_eq!(agent.ids(), std::slice::from_ref(&shop.sandbox));
    assert!(!web.netns.exists(), "{}", web.netns.display());
    assert_captured(&node, &shop);

    // The primary CNI rewrites its configuration (as Cilium does): install-cni chains again.
    let primary = {
        let mut c = node.conflist();
        c["plugins"].as_array_mut().unwrap().truncate(1);
        c
    };
    std::fs::write(node.conflist_path(), serde_json::to_vec_pretty(&primary).unwrap()).unwrap();
    wait_until("install-cni chains redirect-cni again", Duration::from_secs(30), || {
        node.chained()
    });
    node.remove_pod(&shop);
    node.remove_pod(&plain);
    assert!(agent.ids().is_empty());

    // install-cni stopped while its DaemonSet stays (an update, a drain, a reboot): the plugin
    // stays chained, so that no pod starts uncaptured.
    assert_eq!(install.stop(), Some(0), "{}", install.logs());
    let said = format!("{ds_path} stays");
    let said = said
        .trim_start_matches("/apis/apps/v1/namespaces/")
        .replacen("/daemonsets/", "/", 1);
    assert!(
        install.logs().contains(&format!("daemonset {said}")),
        "{}",
        install.logs()
    );
    assert!(node.chained(), "{}", node.conflist());
    let got = api.requests();
    assert!(got.iter().any(|r| r.starts_with(&format!("GET {ds_path}"))), "{got:?}");

    // Stopped because the DaemonSet is gone (`kubectl delete`): the plugin leaves the chain,
    // and its binary and kubeconfig go, so that pods start without it.
    let ds_object = api_object(&ds);
    let removed = |install: &runtime::Container<'_>| {
        assert_eq!(install.stop(), Some(0), "{}", install.logs());
        let types: Vec<_> = node.conflist()["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["type"].clone())
            .collect();
        assert_eq!(types, ["bridge"], "{}", install.logs());
        assert!(!node.plugin("redirect-cni").exists());
        assert!(!node.conf_dir().join("ZZZ-redirect-cni-kubeconfig").exists());
    };
    let again = start_install("rt-install-cni-2");
    wait_until("install-cni finds its daemonset", Duration::from_secs(30), || {
        again.logs().contains("found")
    });
    api.delete(&ds_path);
    removed(&again);
    // `kubectl delete -k` deletes the service account and the roles with the DaemonSet, often
    // before install-cni stops: a token the API server no longer accepts means the same.
    api.put(&ds_path, ds_object);
    let third = start_install("rt-install-cni-3");
    wait_until("install-cni finds its daemonset", Duration::from_secs(30), || {
        third.logs().contains("found")
    });
    api.revoke();
    removed(&third);
    assert_eq!(second.stop(), Some(0), "{}", second.logs());
}
