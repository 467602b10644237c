//! Node mode with the plugin's defaults, which choose pods as istio-cni does: a pod Istio
//! injected is captured toward its own sidecar (nothing of redirect's binds the sidecar's
//! ports); a pod without one, or one istio-init captures already, is left alone; a pod whose
//! annotation Istio would refuse fails its sandbox and changes nothing.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use redirect_testkit::server::TestServer;
use redirect_tests::{
    APP_PORT, OUTBOUND_CAPTURE, PodProxy, REMOTE_PORT, Workload, landing,
    node::{Inbound, NodeAgent, inbound},
    proxied,
};
use serde_json::json;

/// What the injector writes in CNI mode: istio-validation in place of istio-init.
const INJECTED: &str = r#"{"initContainers":["istio-validation"],"containers":["istio-proxy"],"volumes":["istio-envoy"],"imagePullSecrets":null,"revision":"default"}"#;

#[test]
fn by_default_an_injected_pod_is_captured_to_its_sidecar_and_other_pods_are_left_alone() {
    let agent = NodeAgent::new("node-istio", &[]);
    let _node = agent.start().expect("node agent starts");
    let injected = Workload::new_on("ni1", 81);
    let plain = Workload::new_on("ni2", 82);
    let init = Workload::new_on("ni3", 83);

    let conf = agent.cni_conf_default(json!({
        "sidecar.istio.io/status": INJECTED,
        "sidecar.istio.io/interceptionMode": "REDIRECT",
        "traffic.sidecar.istio.io/includeInboundPorts": "*",
        "traffic.sidecar.istio.io/excludeInboundPorts": "15020"
    }));
    let add = agent.cni("ADD", "pod-injected", Some(&injected.pair.workload.path), &conf);
    assert!(add.status.success(), "{:?} {}", add.stdout, add.stderr);
    assert_eq!(add.stdout, conf["prevResult"]);

    // Left alone: no sidecar and no request for redirect's proxy; istio-init's own capture.
    let conf_plain = agent.cni_conf_default(json!({}));
    let add = agent.cni("ADD", "pod-plain", Some(&plain.pair.workload.path), &conf_plain);
    assert!(add.status.success(), "{:?} {}", add.stdout, add.stderr);
    assert_eq!(
        add.stdout, conf_plain["prevResult"],
        "a skipped pod's result is passed on"
    );
    assert!(add.stderr.contains("not enrolled"), "{}", add.stderr);
    let conf_init = agent.cni_conf_default(json!({
        "sidecar.istio.io/status": r#"{"initContainers":["istio-init"],"containers":["istio-proxy"]}"#
    }));
    let add = agent.cni("ADD", "pod-init", Some(&init.pair.workload.path), &conf_init);
    assert!(
        add.status.success() && add.stderr.contains("istio-init"),
        "{}",
        add.stderr
    );
    assert_eq!(agent.ids(), ["pod-injected"]);
    // CHECK agrees: a pod that should not be enrolled is fine unenrolled.
    assert!(
        agent
            .cni("CHECK", "pod-plain", Some(&plain.pair.workload.path), &conf_plain)
            .status
            .success()
    );
    assert!(
        agent
            .cni("CHECK", "pod-injected", Some(&injected.pair.workload.path), &conf)
            .status
            .success()
    );
    assert_eq!(inbound(&plain, APP_PORT), Inbound::Direct);
    let r = plain.probe(&plain.spec(plain.remote(REMOTE_PORT)));
    assert_eq!(landing(&r), redirect_tests::direct("remote"), "{r:?}");

    // The sidecar takes its ports (it would exit on EADDRINUSE) and gets both directions.
    let _sidecar = PodProxy::start(&injected);
    let deadline = Instant::now() + Duration::from_secs(20);
    let r = loop {
        let r = injected.probe(&injected.spec(injected.remote(REMOTE_PORT)));
        if landing(&r) == proxied(OUTBOUND_CAPTURE, "remote") || Instant::now() > deadline {
            break r;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(landing(&r), proxied(OUTBOUND_CAPTURE, "remote"), "{r:?}");
    assert_eq!(inbound(&injected, APP_PORT), Inbound::Proxied);
    // Its status port is excluded, as istio-cni always excludes 15020/15021/15090.
    let _status = TestServer::start(
        &injected.pair.workload,
        SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 15021),
        "status",
    )
    .unwrap();
    assert_eq!(inbound(&injected, 15021), Inbound::Direct);

    // An annotation Istio refuses fails the sandbox, naming it; nothing is enrolled.
    let bad = Workload::new_on("ni4", 84);
    let conf_bad = agent.cni_conf_default(json!({
        "sidecar.istio.io/status": INJECTED,
        "traffic.sidecar.istio.io/excludeOutboundPorts": "http"
    }));
    let add = agent.cni("ADD", "pod-bad", Some(&bad.pair.workload.path), &conf_bad);
    assert!(!add.status.success());
    assert_eq!(add.stdout["code"], 102, "{:?}", add.stdout);
    let msg = add.stdout["msg"].as_str().unwrap_or_default();
    assert!(msg.contains("excludeOutboundPorts") && msg.contains("'http'"), "{msg}");
    assert_eq!(agent.ids(), ["pod-injected"]);
}
