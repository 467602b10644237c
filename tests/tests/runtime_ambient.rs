//! Ambient mode through a real container runtime: podman creates the pods, install-cni (run
//! with `--ambient`) chains redirect-cni, which reads each pod and its namespace from the API
//! server (a stand-in) and enrolls the pods istio-cni's ambient mode would, with its in-pod
//! rules, for a node-side proxy: here the agent's own, in ztunnel's place (`--ambient-proxy
//! embedded`), serving the pod's capture ports from the node's process. Deleting the pod
//! releases it.

use std::net::{Ipv4Addr, SocketAddrV4};

use redirect_testkit::{probe::ProbeSpec, server::TestServer};
use redirect_tests::{
    OUTBOUND_CAPTURE, banner_peer_ip,
    kube_api::ApiServer,
    landing,
    node::{NodeAgent, rule_count},
    proxied,
    runtime::{Node, Pod},
    testkit_bin,
};
use serde_json::json;

const APP: u16 = 8080;
const REMOTE: u16 = 9090;
/// ISTIO_PRERT's rules, 1-based as the metrics number them: the probes' ACCEPT, then the
/// redirect to 15006.
const PRERT_REDIRECT: usize = 2;
/// ISTIO_OUTPUT's redirect to 15001, after the probes', the inbound-proxied mark's and lo's
/// ACCEPTs, and DNS's two (DNS capture is on by default, as with istio-cni).
const OUTPUT_REDIRECT: usize = 6;

/// A pod in `namespace` as the API server returns it, with `labels`, a uid and a service
/// account, running the test kit's server on 8080.
fn start_pod(node: &Node, api: &ApiServer, namespace: &str, name: &str, labels: serde_json::Value) -> Pod {
    api.add(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "namespace": namespace,
            "name": name,
            "uid": format!("uid-{name}"),
            "labels": labels,
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

#[test]
fn an_ambient_pod_is_captured_to_the_node_side_proxy_and_released_when_deleted() {
    let agent = NodeAgent::new("rta", &[]);
    let node = Node::new("rta", 192);
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
    let _install = node.start_install_cni(
        "rta-install-cni",
        &agent,
        &api,
        token,
        &["--ambient", "--ambient-proxy", "embedded"],
    );
    let entry = &node.conflist()["plugins"][1];
    assert_eq!(entry["ambientEnabled"], true, "{entry}");
    let _agent = node.start_agent("rta-agent", &agent);

    let cart = start_pod(&node, &api, "shop", "cart", json!({ "app": "cart" }));
    let got = api.requests();
    assert!(
        got.iter().any(|r| r.starts_with("GET /api/v1/namespaces/shop ")),
        "the plugin read the namespace's labels: {got:?}"
    );
    // A pod of the namespace that opts out is left alone.
    let opted_out = start_pod(
        &node,
        &api,
        "shop",
        "legacy",
        json!({ "istio.io/dataplane-mode": "none" }),
    );
    assert_eq!(agent.ids(), std::slice::from_ref(&cart.sandbox));
    let out = agent.cli(&["list", "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let w = &list[0];
    assert_eq!(w["proxy"], "embedded", "{list}");
    assert_eq!(w["args"], json!(["--mode", "ambient", "--redirect-dns"]), "{list}");
    // Named as ztunnel would be told: uid and service account from the API server.
    assert_eq!(
        w["pod"],
        json!({
            "namespace": "shop",
            "name": "cart",
            "uid": "uid-cart",
            "service_account": "cart-sa"
        }),
        "{list}"
    );

    // Marked enrolled, as istio-cni's node agent marks it (istiod then sends it HBONE).
    let annotations = &api.get("/api/v1/namespaces/shop/pods/cart").unwrap()["metadata"]["annotations"];
    assert_eq!(annotations["ambient.istio.io/redirection"], "enabled", "{annotations}");
    let legacy = api.get("/api/v1/namespaces/shop/pods/legacy").unwrap();
    assert!(legacy["metadata"]["annotations"].is_null(), "{legacy}");

    // The agent's metrics listen in the node's namespace, where the DaemonSet runs it.
    let metrics = || {
        node.netns
            .open()
            .unwrap()
            .run(|| agent.scrape("/metrics"))
            .expect("the agent's metrics")
    };

    // Inbound: through the node-side proxy (ISTIO_PRERT's redirect counts it), and the app
    // sees the node's address, as behind ztunnel, which dials it as the client.
    let inbound = |pod: &Pod| {
        ProbeSpec::outside(&node.netns.path, SocketAddrV4::new(pod.ip, APP))
            .run(&testkit_bin())
            .unwrap()
    };
    let r = inbound(&cart);
    assert_eq!(r.banner_field("name"), Some("app"), "{r:?}");
    assert_eq!(banner_peer_ip(&r), node.gateway, "{r:?}");
    let (_, text) = metrics();
    assert_eq!(
        rule_count(&text, &cart.sandbox, "ISTIO_PRERT", PRERT_REDIRECT),
        1,
        "{text}"
    );
    // Outbound: lands on the proxy's 15001, which takes it to the remote host from the pod's
    // address.
    let r = ProbeSpec::outside(&cart.netns, SocketAddrV4::new(node.gateway, REMOTE))
        .run(&testkit_bin())
        .unwrap();
    assert_eq!(landing(&r), proxied(OUTBOUND_CAPTURE, "remote"), "{r:?}");
    assert_eq!(banner_peer_ip(&r), cart.ip, "{r:?}");
    let (_, text) = metrics();
    assert_eq!(
        rule_count(&text, &cart.sandbox, "ISTIO_OUTPUT", OUTPUT_REDIRECT),
        1,
        "{text}"
    );
    // The opted-out pod's traffic is its own.
    let r = inbound(&opted_out);
    assert_eq!(r.banner_field("name"), Some("app"), "{r:?}");
    let r = ProbeSpec::outside(&opted_out.netns, SocketAddrV4::new(node.gateway, REMOTE))
        .run(&testkit_bin())
        .unwrap();
    assert_eq!(r.banner_field("name"), Some("remote"), "{r:?}");
    assert_ne!(landing(&r), proxied(OUTBOUND_CAPTURE, "remote"), "{r:?}");

    // Deleting the pod runs CNI DEL: the agent lets it go, with its proxy and its metrics.
    node.remove_pod(&cart);
    assert!(agent.ids().is_empty());
    assert!(!cart.netns.exists(), "{}", cart.netns.display());
    let (_, text) = metrics();
    assert!(!text.contains(&cart.sandbox), "{text}");
    node.remove_pod(&opted_out);
}
