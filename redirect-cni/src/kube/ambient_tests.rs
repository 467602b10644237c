//! Ambient mode's reads: the pod's namespace for its labels, after the pod, and what ztunnel
//! names the pod by.

use super::*;

fn ambient_conf(kubeconfig: PathBuf) -> ApiConf {
    ApiConf {
        namespace_labels: true,
        tries: 1,
        ..conf(kubeconfig)
    }
}

#[test]
fn in_ambient_mode_the_namespace_is_read_after_the_pod() {
    let server = Server::start(|n| match n {
        0 => {
            let mut pod = pod_json(
                "shop",
                "cart-0",
                json!({
                    "serviceAccountName": "cart",
                    "hostNetwork": true,
                    "containers": [{ "name": "cart" }]
                }),
            );
            pod["metadata"]["uid"] = json!("0d4b3c6e-9f2a-4a51-8f0e-3c1d2b4a5e6f");
            Reply::Json(200, pod)
        }
        _ => Reply::Json(
            200,
            json!({
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": { "name": "shop", "labels": { "istio.io/dataplane-mode": "ambient" } }
            }),
        ),
    });
    let dir = Dir::new();
    let pod = fetch_pod(&ambient_conf(dir.kubeconfig(&server.url("http"))), "shop", "cart-0").unwrap();
    let paths: Vec<String> = server.seen().into_iter().map(|s| s.path).collect();
    assert_eq!(
        paths,
        ["/api/v1/namespaces/shop/pods/cart-0", "/api/v1/namespaces/shop"]
    );
    assert_eq!(pod.namespace_labels["istio.io/dataplane-mode"], "ambient");
    assert_eq!(pod.uid.as_deref(), Some("0d4b3c6e-9f2a-4a51-8f0e-3c1d2b4a5e6f"));
    assert_eq!(pod.service_account.as_deref(), Some("cart"));
    assert!(pod.host_network);
}

#[test]
fn a_namespace_that_cannot_be_read_fails_the_read_rather_than_passing_the_pod() {
    let server = Server::start(|n| match n {
        0 => Reply::Json(
            200,
            pod_json("shop", "cart-0", json!({ "containers": [{ "name": "cart" }] })),
        ),
        _ => Reply::Json(
            403,
            status(
                403,
                "Forbidden",
                "namespaces \"shop\" is forbidden: cannot get resource",
            ),
        ),
    });
    let dir = Dir::new();
    let e = fetch_pod(&ambient_conf(dir.kubeconfig(&server.url("http"))), "shop", "cart-0").unwrap_err();
    let FetchError::Failed(e) = e else { panic!("{e}") };
    assert!(e.contains("GET namespace shop from http://"), "{e}");
    assert!(e.contains("forbidden"), "{e}");
    // Without ambient mode the namespace is never asked for.
    let server = Server::start(|_| Reply::Json(200, pod_json("shop", "cart-0", json!({ "containers": [] }))));
    let pod = fetch_pod(&conf(dir.kubeconfig(&server.url("http"))), "shop", "cart-0").unwrap();
    assert_eq!(server.seen().len(), 1);
    assert!(pod.namespace_labels.is_empty() && pod.uid.is_none());
}
