//! Ambient mode through a real container runtime: podman creates the pods; the DaemonSet runs
//! with deploy/ambient.yaml applied, as an overlay applies it: install-cni chains redirect-cni
//! with `--ambient`, and the agent serves ztunnel over ZDS on the node's
//! /var/run/ztunnel/ztunnel.sock. The plugin reads each pod and its namespace from the API
//! server (a stand-in) and enrolls the pods istio-cni's ambient mode would, with its in-pod
//! rules, for a node-side proxy: ztunnel (a fake one, on the node, handed each pod's namespace
//! over ZDS, listening in it as ztunnel does), or the agent's own proxy for a pod that asks
//! for it. Deleting a pod releases it, and ztunnel is told.

use std::{
    fs::File,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use redirect_agent::sys::Netns;
use redirect_testkit::{probe::ProbeSpec, server::TestServer};
use redirect_tests::{
    OUTBOUND_CAPTURE, banner_peer_ip,
    kube_api::ApiServer,
    landing,
    node::{NodeAgent, rule_count},
    proxied,
    runtime::{Node, Pod},
    testkit_bin,
    ztunnel::{Event, FakeZtunnel, fd_ns_id, listen_in, ns_id},
};
use serde_json::json;

const APP: u16 = 8080;
const REMOTE: u16 = 9090;
/// ISTIO_PRERT's rules, 1-based as the metrics number them: the probes' ACCEPT, then the
/// redirect to 15006.
const PRERT_PROBE: usize = 1;
const PRERT_REDIRECT: usize = 2;
/// istio-cni's probe SNAT source, which the node's connections to an ambient pod leave from.
const PROBE_SOURCE: Ipv4Addr = Ipv4Addr::new(169, 254, 7, 127);
/// ISTIO_OUTPUT's redirect to 15001 with DNS capture (on by default, as with istio-cni): after
/// the probes', the inbound-proxied mark's and lo's ACCEPTs, and DNS's two.
const OUTPUT_REDIRECT_DNS: usize = 6;
/// The same without DNS capture.
const OUTPUT_REDIRECT: usize = 4;
const WAIT: Duration = Duration::from_secs(20);

/// A pod in `namespace` as the API server returns it, with `labels` and `annotations`, a uid
/// and a service account, running the test kit's server on 8080.
fn start_pod(
    node: &Node,
    api: &ApiServer,
    (namespace, name): (&str, &str),
    labels: serde_json::Value,
    annotations: serde_json::Value,
) -> Pod {
    api.add(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "namespace": namespace,
            "name": name,
            "uid": format!("uid-{name}"),
            "labels": labels,
            "annotations": annotations,
        },
        "spec": { "serviceAccountName": format!("{name}-sa"), "containers": [{ "name": "app" }] }
    }));
    let app = format!("{name}-app");
    let listen = format!("app=0.0.0.0:{APP}");
    let pod = node
        .pod(
            name,
            namespace,
            &[(&app, &[], &["/testkit", "serve", "--listen", &listen])],
        )
        .unwrap_or_else(|e| panic!("{name} starts: {e}"));
    node.wait_for_output(&app, "ready");
    pod
}

/// The node's ztunnel, played on a thread of its own: it connects (retrying until the agent
/// listens), takes the opening snapshot, then acks every request and hands it to the test.
struct Ztunnel {
    events: mpsc::Receiver<Event>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Ztunnel {
    fn start(socket: PathBuf) -> Self {
        let (tx, events) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let zt = FakeZtunnel::connect(&socket, WAIT).expect("ztunnel connects to the agent's socket");
            for pod in zt.snapshot(WAIT).expect("the opening snapshot") {
                let _ = tx.send(pod);
            }
            while !stopped.load(Ordering::Relaxed) {
                match zt.recv(Duration::from_millis(200)) {
                    Ok(Some(event)) => {
                        zt.ack().expect("ack");
                        let _ = tx.send(event);
                    }
                    Ok(None) => return,
                    Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                    Err(e) => panic!("ztunnel: {e}"),
                }
            }
        });
        Self {
            events,
            stop,
            thread: Some(thread),
        }
    }

    fn next(&self) -> Event {
        self.events.recv_timeout(WAIT).expect("a request to ztunnel")
    }
}

impl Drop for Ztunnel {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn accept_within(listener: &TcpListener) -> (TcpStream, SocketAddr) {
    let deadline = Instant::now() + WAIT;
    loop {
        match listener.accept() {
            Ok(accepted) => return accepted,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("ztunnel's listener accepts nothing: {e}"),
        }
    }
}

/// A TCP connection to `to` from inside the namespace `netns`.
fn dial_from(netns: &std::path::Path, to: SocketAddrV4) -> TcpStream {
    Netns::open(netns)
        .unwrap()
        .run(move || TcpStream::connect_timeout(&to.into(), Duration::from_secs(5)))
        .unwrap_or_else(|e| panic!("a connection from {} to {to}: {e}", netns.display()))
}

#[test]
fn ambient_pods_go_to_the_nodes_ztunnel_or_the_embedded_proxy_and_are_released_when_deleted() {
    let agent = NodeAgent::new("rta", &[]);
    let node = Node::new("rta", 192);
    node.patch_daemonset("ambient.yaml");
    let _remote = TestServer::start(&node.netns, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, REMOTE), "remote").unwrap();
    let token = "rta-service-account-token";
    let api = ApiServer::start(&node.netns, token);
    // The namespace is ambient's; its pods are, unless they opt out.
    api.put(
        "/api/v1/namespaces/shop",
        json!({
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": { "name": "shop", "labels": { "istio.io/dataplane-mode": "ambient" } }
        }),
    );
    let _install = node.start_install_cni("rta-install-cni", &agent, &api, token, &[]);
    let entry = &node.conflist()["plugins"][1];
    assert_eq!(entry["ambientEnabled"], true, "{entry}");
    let _agent = node.start_agent("rta-agent", &agent);
    let zt = Ztunnel::start(node.volume_dir("ztunnel").join("ztunnel.sock"));
    // The agent's metrics listen in the node's namespace, where the DaemonSet runs it.
    let metrics = || {
        node.netns
            .open()
            .unwrap()
            .run(|| agent.scrape("/metrics"))
            .expect("the agent's metrics")
            .1
    };

    // A pod of the namespace: ztunnel is handed its namespace, named by its uid.
    let cart = start_pod(&node, &api, ("shop", "cart"), json!({ "app": "cart" }), json!({}));
    let got = api.requests();
    assert!(
        got.iter().any(|r| r.starts_with("GET /api/v1/namespaces/shop ")),
        "the plugin read the namespace's labels: {got:?}"
    );
    let Event::Add { uid, info, netns } = zt.next() else {
        panic!("not an AddWorkload")
    };
    assert_eq!(uid, "uid-cart");
    assert_eq!(
        (
            info.name.as_str(),
            info.namespace.as_str(),
            info.service_account.as_str()
        ),
        ("cart", "shop", "cart-sa")
    );
    assert_eq!(
        fd_ns_id(&netns).unwrap(),
        ns_id(&File::open(&cart.netns).unwrap()).unwrap(),
        "the descriptor is the pod's namespace"
    );
    let out = agent.cli(&["list", "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list[0]["proxy"], "none", "{list}");
    assert_eq!(
        list[0]["args"],
        json!(["--mode", "ambient", "--redirect-dns"]),
        "{list}"
    );
    // Marked enrolled, as istio-cni's node agent marks it: istiod then sends it HBONE.
    let annotations = &api.get("/api/v1/namespaces/shop/pods/cart").unwrap()["metadata"]["annotations"];
    assert_eq!(annotations["ambient.istio.io/redirection"], "enabled", "{annotations}");

    // A pod of the namespace that opts out is left alone (checked below): here, another pod
    // of the node that dials the ambient ones.
    let legacy = start_pod(
        &node,
        &api,
        ("shop", "legacy"),
        json!({ "istio.io/dataplane-mode": "none" }),
        json!({}),
    );

    // ztunnel's listeners, made in the namespace it was handed and marked as its own.
    let outbound = listen_in(&netns, SocketAddr::from((Ipv4Addr::UNSPECIFIED, 15001))).unwrap();
    let inbound = listen_in(&netns, SocketAddr::from((Ipv4Addr::UNSPECIFIED, 15006))).unwrap();
    // The pod's outbound lands on ztunnel's 15001, with where it dialed as SO_ORIGINAL_DST.
    let remote = SocketAddrV4::new(node.gateway, REMOTE);
    let _app = dial_from(&cart.netns, remote);
    let (accepted, peer) = accept_within(&outbound);
    assert_eq!(peer.ip(), cart.ip, "from the pod's address");
    assert_eq!(
        redirect_testkit::sock::original_dst(&accepted).unwrap(),
        SocketAddr::from(remote)
    );
    // Inbound from another pod lands on ztunnel's 15006, addressed as it was sent.
    let _client = dial_from(&legacy.netns, SocketAddrV4::new(cart.ip, APP));
    let (accepted, peer) = accept_within(&inbound);
    assert_eq!(peer.ip(), legacy.ip, "from the client's address");
    assert_eq!(accepted.local_addr().unwrap(), SocketAddr::from((cart.ip, APP)));
    // The node's own (the kubelet's probes) leave from the probe source, which the pod's
    // ISTIO_PRERT lets through to the app, not to ztunnel. The app's replies go back through
    // the node, as a pod's default route takes them (the test's pods have none).
    let route = std::process::Command::new("nsenter")
        .arg(format!("--net={}", cart.netns.display()))
        .args([
            "ip",
            "route",
            "add",
            &format!("{PROBE_SOURCE}/32"),
            "via",
            &node.gateway.to_string(),
        ])
        .output()
        .expect("nsenter ip route");
    assert!(route.status.success(), "{}", String::from_utf8_lossy(&route.stderr));
    let r = ProbeSpec::outside(&node.netns.path, SocketAddrV4::new(cart.ip, APP))
        .run(&testkit_bin())
        .unwrap();
    assert_eq!(r.banner_field("name"), Some("app"), "{r:?}");
    assert_eq!(banner_peer_ip(&r), PROBE_SOURCE, "{r:?}");
    let text = metrics();
    assert_eq!(
        rule_count(&text, &cart.sandbox, "ISTIO_PRERT", PRERT_PROBE),
        1,
        "{text}"
    );
    assert_eq!(
        rule_count(&text, &cart.sandbox, "ISTIO_OUTPUT", OUTPUT_REDIRECT_DNS),
        1,
        "{text}"
    );
    assert_eq!(
        rule_count(&text, &cart.sandbox, "ISTIO_PRERT", PRERT_REDIRECT),
        1,
        "{text}"
    );

    // A pod that asks for the agent's proxy in ztunnel's place (and no DNS capture, so that
    // its upstream resolvers do not matter here): served by it, not ztunnel's, and not marked
    // for HBONE, which that proxy does not serve.
    let edge = start_pod(
        &node,
        &api,
        ("shop", "edge"),
        json!({}),
        json!({ "redirect.dev/proxy": "embedded", "ambient.istio.io/dns-capture": "false" }),
    );
    let r = ProbeSpec::outside(&legacy.netns, SocketAddrV4::new(edge.ip, APP))
        .run(&testkit_bin())
        .unwrap();
    assert_eq!(r.banner_field("name"), Some("app"), "{r:?}");
    // The app sees the client's address, as behind ztunnel, which dials it as the client.
    assert_eq!(banner_peer_ip(&r), legacy.ip, "{r:?}");
    let r = ProbeSpec::outside(&edge.netns, remote).run(&testkit_bin()).unwrap();
    assert_eq!(landing(&r), proxied(OUTBOUND_CAPTURE, "remote"), "{r:?}");
    assert_eq!(banner_peer_ip(&r), edge.ip, "{r:?}");
    let text = metrics();
    assert_eq!(
        rule_count(&text, &edge.sandbox, "ISTIO_PRERT", PRERT_REDIRECT),
        1,
        "{text}"
    );
    assert_eq!(
        rule_count(&text, &edge.sandbox, "ISTIO_OUTPUT", OUTPUT_REDIRECT),
        1,
        "{text}"
    );
    let edge_pod = api.get("/api/v1/namespaces/shop/pods/edge").unwrap();
    assert!(
        edge_pod["metadata"]["annotations"]
            .get("ambient.istio.io/redirection")
            .is_none(),
        "{edge_pod}"
    );

    // The pod of the namespace that opts out is left alone.
    let mut ids = agent.ids();
    ids.sort();
    let mut want = vec![cart.sandbox.clone(), edge.sandbox.clone()];
    want.sort();
    assert_eq!(ids, want);
    let r = ProbeSpec::outside(&legacy.netns, remote).run(&testkit_bin()).unwrap();
    assert_eq!(r.banner_field("name"), Some("remote"), "{r:?}");
    assert_ne!(landing(&r), proxied(OUTBOUND_CAPTURE, "remote"), "{r:?}");

    // Deleting a pod runs CNI DEL: the agent lets it go, and tells ztunnel.
    node.remove_pod(&cart);
    let Event::Del { uid } = zt.next() else {
        panic!("not a DelWorkload")
    };
    assert_eq!(uid, "uid-cart");
    assert_eq!(agent.ids(), std::slice::from_ref(&edge.sandbox));
    assert!(!cart.netns.exists(), "{}", cart.netns.display());
    node.remove_pod(&edge);
    assert!(agent.ids().is_empty());
    // The probe source leaves the node's lo with the last ambient pod.
    let lo = std::process::Command::new("ip")
        .args(["-n", &node.netns.name, "addr", "show", "dev", "lo"])
        .output()
        .expect("ip addr");
    let lo = String::from_utf8_lossy(&lo.stdout);
    assert!(!lo.contains(&PROBE_SOURCE.to_string()), "{lo}");
    let text = metrics();
    assert!(!text.contains(&cart.sandbox) && !text.contains(&edge.sandbox), "{text}");
    node.remove_pod(&legacy);
    // Nothing else went to ztunnel: the embedded pod and the opted-out one are not its.
    assert!(zt.events.try_recv().is_err());
}
