//! Through a real container runtime: podman creates the pods, the reference `bridge` plugin
//! gives them their network, and redirect-cni, chained after it by the install-cni container,
//! enrolls them with the agent, which runs as the DaemonSet's agent container. Every container
//! is from the image `cargo xtask image` builds, the one deploy/daemonset.yaml names; the
//! test kit is mounted into the pods' app containers.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use redirect_testkit::{probe::ProbeSpec, server::TestServer};
use redirect_tests::{
    OUTBOUND_CAPTURE, banner_peer_ip, landing,
    node::NodeAgent,
    proxied,
    runtime::{self, Node, Pod},
    testkit_bin,
};

const APP: u16 = 8080;
const REMOTE: u16 = 9090;
/// What Istio's sidecar needs of its own, as the stand-in (`redirect-agent proxy`) asks for:
/// it takes the proxy's uid and gid, and its listeners are made in the pod's namespace.
const SIDECAR_CAPS: &[&str] = &["NET_ADMIN", "SYS_ADMIN", "SETUID", "SETGID"];

/// A pod as the injector leaves it: the app (the test kit's server on 8080) and its sidecar.
fn meshed_pod(node: &Node, name: &str) -> Result<Pod, String> {
    let sidecar = format!("{name}-sidecar");
    let app = format!("{name}-app");
    let listen = format!("app=0.0.0.0:{APP}");
    let pod = node.pod(
        name,
        "default",
        &[
            (&sidecar, SIDECAR_CAPS, &["redirect-agent", "proxy"]),
            (&app, &[], &["/testkit", "serve", "--listen", &listen]),
        ],
    )?;
    node.wait_for_output(&sidecar, "proxy serving");
    node.wait_for_output(&app, "ready");
    Ok(pod)
}

/// Both directions of `pod` go through its sidecar, as behind istio-iptables' REDIRECT: in,
/// the app sees the sidecar's 127.0.0.6; out, the connection lands on the sidecar's 15001 and
/// the remote host sees the pod's address.
fn assert_captured(node: &Node, pod: &Pod) {
    let testkit = testkit_bin();
    let r = ProbeSpec::outside(&node.netns.path, SocketAddrV4::new(pod.ip, APP))
        .run(&testkit)
        .unwrap();
    assert_eq!(r.banner_field("name"), Some("app"), "{}: {r:?}", pod.name);
    assert!(
        r.banner_field("peer").is_some_and(|p| p.starts_with("127.0.0.6:")),
        "{} inbound not through its sidecar: {r:?}",
        pod.name
    );
    let r = ProbeSpec::outside(&pod.netns, SocketAddrV4::new(node.gateway, REMOTE))
        .run(&testkit)
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

fn chained(node: &Node) -> bool {
    let conf = node.conflist();
    let types: Vec<&str> = conf["plugins"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["type"].as_str())
        .collect();
    types == ["bridge", "redirect-cni"] && node.plugin("redirect-cni").is_file()
}

#[test]
fn pods_of_a_real_runtime_are_captured_to_their_sidecar_deleted_and_kept_through_a_restart() {
    let agent = NodeAgent::new("rt", &[]);
    let node = Node::new("rt", 191);
    // On every address of the node's namespace: the bridge's comes with the first pod.
    let _remote = TestServer::start(&node.netns, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, REMOTE), "remote").unwrap();
    let ds = runtime::daemonset();

    // install-cni, as the DaemonSet runs it (`install --watch`), told to enroll every pod
    // toward its own sidecar (the runtime passes no annotations: `selector all`).
    let install = node.run_daemonset_container(
        "rt-install-cni",
        &runtime::container(&ds, "install-cni"),
        &agent,
        &["--selector", "all", "--proxy", "none"],
    );
    wait_until("install-cni chains redirect-cni", Duration::from_secs(30), || {
        chained(&node)
    });
    let entry = &node.conflist()["plugins"][1];
    assert_eq!(entry["agentSocket"], agent.socket.to_string_lossy().as_ref(), "{entry}");

    // With the plugin chained and no agent, a pod's sandbox fails: nothing starts uncaptured.
    let early = node.pod(
        "early",
        "default",
        &[("early-app", &[], &["/testkit", "serve", "--listen", "app=0.0.0.0:8080"])],
    );
    let err = early.err().expect("a pod with no agent to enroll it must not start");
    assert!(err.contains("redirect-cni"), "{err}");
    let out = node.podman(&["pod", "rm", "--force", "early"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let first = node.start_agent("rt-agent-1", &agent);
    let web = meshed_pod(&node, "web").expect("web starts");
    assert_eq!(agent.ids(), std::slice::from_ref(&web.sandbox));
    let out = agent.cli(&["list", "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list[0]["proxy"], "none", "{list}");
    assert_eq!(list[0]["netns"], web.netns.to_string_lossy().as_ref(), "{list}");
    assert_captured(&node, &web);

    // A rolling update: the new agent pod starts beside the old one and takes over; the old
    // one exits by itself, cleanly.
    let second = node.start_agent("rt-agent-2", &agent);
    assert_eq!(first.exited(Duration::from_secs(60)), Some(0), "{}", first.logs());
    assert_eq!(agent.ids(), std::slice::from_ref(&web.sandbox));
    assert_captured(&node, &web);
    let api = meshed_pod(&node, "api").expect("api starts under the new agent");
    let mut ids = agent.ids();
    ids.sort();
    let mut want = vec![web.sandbox.clone(), api.sandbox.clone()];
    want.sort();
    assert_eq!(ids, want);
    assert_captured(&node, &api);

    // Deleting a pod runs CNI DEL: it leaves the agent, its namespace goes.
    node.remove_pod(&web);
    assert_eq!(agent.ids(), std::slice::from_ref(&api.sandbox));
    assert!(!web.netns.exists(), "{}", web.netns.display());
    assert_captured(&node, &api);

    // The primary CNI rewrites its configuration (as Cilium does): install-cni chains again.
    let primary = {
        let mut c = node.conflist();
        c["plugins"].as_array_mut().unwrap().truncate(1);
        c
    };
    std::fs::write(node.conflist_path(), serde_json::to_vec_pretty(&primary).unwrap()).unwrap();
    wait_until("install-cni chains redirect-cni again", Duration::from_secs(30), || {
        chained(&node)
    });
    // Its stop (an update, a reboot) leaves the plugin chained: pods must not start uncaptured.
    assert_eq!(install.stop(), Some(0), "{}", install.logs());
    assert!(chained(&node), "{}", node.conflist());

    node.remove_pod(&api);
    assert!(agent.ids().is_empty());
    assert_eq!(second.stop(), Some(0), "{}", second.logs());
}
