//! `fetch_pod` against a stand-in API server: HTTP/1.1 on 127.0.0.1 in a thread (plain, or TLS
//! with a test CA), serving pods as JSON, with a kubeconfig in a temporary directory.

use std::{
    fs,
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use super::*;
use crate::pod::{self, Decision, Selection, Selector};

const TOKEN: &str = "test-token-1234";

/// A CA and a server certificate for `IP:127.0.0.1` it signed, valid 2000-2100. Test material
/// only, made with `openssl ca`: a real TLS handshake without a certificate generator.
const CA_PEM: &str = "-----BEGIN CERTIFICATE-----
MIIBaTCCAQ+gAwIBAgIBATAKBggqhkjOPQQDAjAbMRkwFwYDVQQDDBByZWRpcmVj
dC10ZXN0LWNhMCAXDTAwMDEwMTAwMDAwMFoYDzIxMDAwMTAxMDAwMDAwWjAbMRkw
FwYDVQQDDBByZWRpcmVjdC10ZXN0LWNhMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcD
QgAEhF1dS2RrGAu+IO4/oEWspvOClkhHgyMr+1NjFjjWhzxG1JIJArbPBZQlX4m7
5Ip6v2D8PGkEQfR4VWavnKGmu6NCMEAwDwYDVR0TAQH/BAUwAwEB/zAOBgNVHQ8B
Af8EBAMCAQYwHQYDVR0OBBYEFIPhOpZj5VjeHcIhRexZ68zjlONCMAoGCCqGSM49
BAMCA0gAMEUCIQCExJsY03KBbmZIx19+Us6dz2q8TLsKF0iiuPG1cCMqswIgdz2A
s6ml6utULoUvWSX7iuTPxFuBvgHKXPqK0rFmzUc=
-----END CERTIFICATE-----
";
const SERVER_PEM: &str = "-----BEGIN CERTIFICATE-----
MIIBpjCCAUugAwIBAgIBAjAKBggqhkjOPQQDAjAbMRkwFwYDVQQDDBByZWRpcmVj
dC10ZXN0LWNhMCAXDTAwMDEwMTAwMDAwMFoYDzIxMDAwMTAxMDAwMDAwWjAUMRIw
EAYDVQQDDAkxMjcuMC4wLjEwWTATBgcqhkjOPQIBBggqhkjOPQMBBwNCAAQ1qi3R
hdC3cieIuKrvGZQJ5CXg7QgOQU/bjyfMRoKmZ471OCSqiW/L98yk34k0axtzvDU+
pFQ+HXER89l+eGgDo4GEMIGBMAkGA1UdEwQCMAAwDwYDVR0RBAgwBocEfwAAATAT
BgNVHSUEDDAKBggrBgEFBQcDATAOBgNVHQ8BAf8EBAMCB4AwHwYDVR0jBBgwFoAU
g+E6lmPlWN4dwiFF7FnrzOOU40IwHQYDVR0OBBYEFM32C2/9lE0qm+nRnjSMiqfp
YEnUMAoGCCqGSM49BAMCA0kAMEYCIQDUkI41Anm4JFJKSDbPSbap4IngSH8pfpfg
C3HgHlD89QIhAJU8D8nPpHRnOwiIQqHonAuWgjHXbL0TlPelnY08YcBz
-----END CERTIFICATE-----
";
const SERVER_KEY: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgdG8GUf2BXN78StiA
kkd4BBYjsZHcFOIMvw2jyXi/pnehRANCAAQ1qi3RhdC3cieIuKrvGZQJ5CXg7QgO
QU/bjyfMRoKmZ471OCSqiW/L98yk34k0axtzvDU+pFQ+HXER89l+eGgD
-----END PRIVATE KEY-----
";

/// What the stand-in does with its n-th request (from 0).
enum Reply {
    Json(u16, Value),
    /// Reads the request and never answers, holding the connection open.
    Silent,
}

/// A request as the stand-in saw it.
#[derive(Debug, Clone)]
struct Seen {
    path: String,
    authorization: Option<String>,
}

/// The stand-in API server; stopped and joined however the test ends.
struct Server {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<Seen>>>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    fn start(reply: impl Fn(usize) -> Reply + Send + 'static) -> Self {
        Self::spawn(reply, None)
    }

    fn start_tls(reply: impl Fn(usize) -> Reply + Send + 'static) -> Self {
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
        let certs = vec![CertificateDer::from_pem_slice(SERVER_PEM.as_bytes()).unwrap()];
        let key = PrivateKeyDer::from_pem_slice(SERVER_KEY.as_bytes()).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        Self::spawn(reply, Some(Arc::new(config)))
    }

    fn spawn(reply: impl Fn(usize) -> Reply + Send + 'static, tls: Option<Arc<rustls::ServerConfig>>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (stop2, seen2) = (stop.clone(), seen.clone());
        let thread = std::thread::spawn(move || {
            // Connections left unanswered stay open until the server stops.
            let mut held = Vec::new();
            for (n, conn) in listener.incoming().enumerate() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(tcp) = conn else { continue };
                // Bounded, so a client that stops talking cannot wedge the server.
                let _ = tcp.set_read_timeout(Some(Duration::from_secs(5)));
                let r = reply(n);
                match &tls {
                    Some(config) => {
                        let Ok(conn) = rustls::ServerConnection::new(config.clone()) else {
                            continue;
                        };
                        let mut stream = rustls::StreamOwned::new(conn, tcp);
                        if serve(&mut stream, &r, &seen2) {
                            stream.conn.send_close_notify();
                            let _ = stream.flush();
                        } else {
                            held.push(stream.sock);
                        }
                    }
                    None => {
                        let mut stream = tcp;
                        if !serve(&mut stream, &r, &seen2) {
                            held.push(stream);
                        }
                    }
                }
            }
        });
        Self {
            addr,
            stop,
            seen,
            thread: Some(thread),
        }
    }

    fn url(&self, scheme: &str) -> String {
        format!("{scheme}://{}", self.addr)
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the blocking accept, which then sees the flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Reads one request and answers it; false when the reply is to stay silent.
fn serve(stream: &mut (impl Read + Write), reply: &Reply, seen: &Mutex<Vec<Seen>>) -> bool {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return true,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        // Not HTTP (a TLS hello to a plain server): answer 400 at once, as HTTP servers do.
        if !buf[0].is_ascii_uppercase() {
            seen.lock().unwrap().push(Seen {
                path: "(not HTTP)".into(),
                authorization: None,
            });
            let _ = stream.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            return true;
        }
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    let mut lines = head.lines();
    let path = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or_default()
        .to_owned();
    let authorization = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.eq_ignore_ascii_case("authorization"))
        .map(|(_, v)| v.trim().to_owned());
    seen.lock().unwrap().push(Seen { path, authorization });
    let Reply::Json(code, body) = reply else { return false };
    let body = body.to_string();
    let answer = format!(
        "HTTP/1.1 {code} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(answer.as_bytes());
    let _ = stream.flush();
    true
}

/// A temporary directory with a kubeconfig, removed however the test ends.
struct Dir(PathBuf);

impl Dir {
    fn new() -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("redirect-cni-kube-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    /// A kubeconfig shaped like the one istio-cni's installer writes: one cluster, one token.
    fn kubeconfig(&self, server: &str) -> PathBuf {
        self.kubeconfig_trusting(server, CA_PEM)
    }

    fn kubeconfig_trusting(&self, server: &str, ca_pem: &str) -> PathBuf {
        let ca = self.0.join("ca.crt");
        fs::write(&ca, ca_pem).unwrap();
        let path = self.0.join("ZZZ-redirect-cni-kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: local\n  cluster:\n    server: {server}\n    certificate-authority: {}\nusers:\n- name: redirect-cni\n  user:\n    token: {TOKEN}\ncontexts:\n- name: redirect-cni-context\n  context:\n    cluster: local\n    user: redirect-cni\ncurrent-context: redirect-cni-context\n",
            ca.display()
        );
        fs::write(&path, text).unwrap();
        path
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Small tries, interval and timeout: the tests wait for no real second.
fn conf(kubeconfig: PathBuf) -> ApiConf {
    ApiConf {
        tries: 3,
        interval: Duration::from_millis(10),
        timeout: Duration::from_secs(5),
        ..ApiConf::new(kubeconfig)
    }
}

fn pod_json(namespace: &str, name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": { "app": "reviews", "sidecar.istio.io/inject": "true" },
            "annotations": {
                "sidecar.istio.io/status": "{\"initContainers\":[\"istio-validation\"],\"containers\":[\"istio-proxy\"]}",
                "traffic.sidecar.istio.io/excludeInboundPorts": "3306"
            }
        },
        "spec": spec
    })
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({ "kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message, "reason": reason, "code": code })
}

/// The injector's sidecar: istio-proxy as a regular container.
fn sidecar_spec() -> Value {
    json!({
        // The pod's own securityContext is not the proxy's: istio-cni ignores it.
        "securityContext": { "runAsUser": 5, "runAsGroup": 6 },
        "initContainers": [{ "name": "istio-validation", "image": "proxyv2" }],
        "containers": [
            { "name": "reviews", "image": "reviews" },
            {
                "name": "istio-proxy",
                "image": "proxyv2",
                "args": ["proxy", "sidecar", "--domain", "$(POD_NAMESPACE).svc.cluster.local"],
                "env": [
                    { "name": "ISTIO_META_DNS_CAPTURE", "value": "true" },
                    { "name": "POD_NAME", "valueFrom": { "fieldRef": { "fieldPath": "metadata.name" } } }
                ],
                "securityContext": { "runAsUser": 1000670000, "runAsGroup": 1000670001 }
            }
        ]
    })
}

fn selection() -> Selection {
    Selection {
        selector: Selector::Injected,
        exclude_namespaces: vec!["kube-system".into()],
        proxy: "embedded".into(),
        args: Vec::new(),
        ambient: None,
    }
}

#[test]
fn a_sidecar_pod_is_read_as_istio_cni_reads_it() {
    let server = Server::start(|_| Reply::Json(200, pod_json("shop", "reviews-1", sidecar_spec())));
    let dir = Dir::new();
    let pod = fetch_pod(&conf(dir.kubeconfig(&server.url("http"))), "shop", "reviews-1").unwrap();
    let seen = server.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path, "/api/v1/namespaces/shop/pods/reviews-1");
    assert_eq!(
        seen[0].authorization.as_deref(),
        Some(format!("Bearer {TOKEN}").as_str())
    );

    assert_eq!(pod.namespace.as_deref(), Some("shop"));
    assert_eq!(pod.labels["app"], "reviews");
    assert_eq!(pod.annotations["traffic.sidecar.istio.io/excludeInboundPorts"], "3306");
    let names: Vec<&str> = pod.containers.iter().map(String::as_str).collect();
    assert_eq!(names, ["istio-proxy", "istio-validation", "reviews"]);
    let proxy = pod.proxy.as_ref().unwrap();
    assert_eq!(proxy.proxy_type.as_deref(), Some("sidecar"));
    assert_eq!(
        (proxy.run_as_user, proxy.run_as_group),
        (Some(1000670000), Some(1000670001))
    );
    assert_eq!(proxy.env["ISTIO_META_DNS_CAPTURE"], "true");
    assert_eq!(proxy.env["POD_NAME"], "", "valueFrom reads as empty");

    // And the decision takes the spec's uid, gid and DNS switch.
    let Ok(Decision::Enroll { flags, .. }) = pod::decide(&selection(), &pod) else {
        panic!("not enrolled: {pod:?}")
    };
    let joined = flags.join(" ");
    assert!(joined.contains("-u 1000670000 -g 1000670001"), "{joined}");
    assert!(joined.contains("-d 3306,15020,15021,15090"), "{joined}");
    assert!(joined.contains("--capture-all-dns"), "{joined}");
}

#[test]
fn a_native_sidecar_is_found_among_init_containers() {
    let spec = json!({
        "initContainers": [
            { "name": "istio-validation", "image": "proxyv2" },
            { "name": "istio-proxy", "image": "proxyv2", "restartPolicy": "Always",
              "args": ["proxy", "sidecar"], "env": [{ "name": "ISTIO_DUAL_STACK", "value": "true" }] }
        ],
        "containers": [{ "name": "reviews", "image": "reviews" }]
    });
    let server = Server::start(move |_| Reply::Json(200, pod_json("shop", "reviews-2", spec.clone())));
    let dir = Dir::new();
    let pod = fetch_pod(&conf(dir.kubeconfig(&server.url("http"))), "shop", "reviews-2").unwrap();
    assert!(pod.containers.contains("istio-proxy"));
    let proxy = pod.proxy.as_ref().unwrap();
    assert_eq!(proxy.env["ISTIO_DUAL_STACK"], "true");
    assert_eq!((proxy.run_as_user, proxy.run_as_group), (None, None));
    assert!(matches!(pod::decide(&selection(), &pod), Ok(Decision::Enroll { .. })));
}

#[test]
fn a_gateway_has_proxy_type_router_and_is_skipped() {
    let spec = json!({ "containers": [{ "name": "istio-proxy", "image": "proxyv2", "args": ["proxy", "router"] }] });
    let server = Server::start(move |_| Reply::Json(200, pod_json("istio-system", "gw-1", spec.clone())));
    let dir = Dir::new();
    let pod = fetch_pod(&conf(dir.kubeconfig(&server.url("http"))), "istio-system", "gw-1").unwrap();
    assert_eq!(pod.proxy.as_ref().unwrap().proxy_type.as_deref(), Some("router"));
    assert!(matches!(pod::decide(&selection(), &pod), Ok(Decision::Skip(_))));
}

#[test]
fn a_pod_not_found_yet_is_tried_again() {
    let server = Server::start(|n| match n {
        0 | 1 => Reply::Json(404, status(404, "NotFound", "pods \"late-1\" not found")),
        _ => Reply::Json(200, pod_json("shop", "late-1", sidecar_spec())),
    });
    let dir = Dir::new();
    let pod = fetch_pod(&conf(dir.kubeconfig(&server.url("http"))), "shop", "late-1").unwrap();
    assert!(pod.proxy.is_some());
    assert_eq!(server.seen().len(), 3);
}

#[test]
fn every_try_failing_is_an_error_naming_the_status() {
    let server = Server::start(|_| Reply::Json(500, status(500, "InternalError", "etcd\nis down")));
    let dir = Dir::new();
    let err = fetch_pod(&conf(dir.kubeconfig(&server.url("http"))), "shop", "reviews-1").unwrap_err();
    let FetchError::Failed(msg) = &err else {
        panic!("{err:?}")
    };
    assert_eq!(server.seen().len(), 3);
    assert!(msg.contains("shop/reviews-1"), "{msg}");
    assert!(msg.contains(&server.url("http")), "{msg}");
    assert!(msg.contains("HTTP 500: etcd is down"), "{msg}");
    assert!(msg.ends_with("(3 tries)"), "{msg}");
    assert!(!msg.contains('\n'), "{msg}");
}

#[test]
fn an_error_body_that_is_not_a_status_still_names_the_code() {
    let server = Server::start(|_| Reply::Json(502, json!("bad gateway")));
    let dir = Dir::new();
    let api = ApiConf {
        tries: 1,
        ..conf(dir.kubeconfig(&server.url("http")))
    };
    let err = fetch_pod(&api, "shop", "reviews-1").unwrap_err();
    assert!(err.to_string().contains("HTTP 502"), "{err}");
    assert!(err.to_string().ends_with("(1 try)"), "{err}");
}

#[test]
fn the_agents_own_pod_escapes_after_one_failed_try() {
    let server = Server::start(|_| Reply::Json(503, status(503, "ServiceUnavailable", "apiserver is starting")));
    let dir = Dir::new();
    let api = conf(dir.kubeconfig(&server.url("http")));
    let err = fetch_pod(&api, "kube-system", "redirect-agent-x7k2p").unwrap_err();
    let FetchError::AgentPod(msg) = &err else {
        panic!("{err:?}")
    };
    assert!(msg.contains("HTTP 503"), "{msg}");
    assert_eq!(server.seen().len(), 1);
    // The same name elsewhere, or another pod in the agent's namespace, is not the agent.
    for (ns, name) in [("shop", "redirect-agent-x7k2p"), ("kube-system", "coredns-1")] {
        let err = fetch_pod(&api, ns, name).unwrap_err();
        assert!(matches!(err, FetchError::Failed(_)), "{ns}/{name}: {err:?}");
    }
    assert_eq!(server.seen().len(), 7);
}

#[test]
fn a_server_that_never_answers_is_bounded_by_the_timeout() {
    let server = Server::start(|_| Reply::Silent);
    let dir = Dir::new();
    let api = ApiConf {
        tries: 2,
        timeout: Duration::from_millis(300),
        ..conf(dir.kubeconfig(&server.url("http")))
    };
    let start = Instant::now();
    let err = fetch_pod(&api, "shop", "reviews-1").unwrap_err();
    // A bound that only a hang misses, not a measurement.
    assert!(start.elapsed() < Duration::from_secs(30), "{:?}", start.elapsed());
    assert!(
        err.to_string()
            .contains(&format!("{}/: no answer within 300ms", server.url("http"))),
        "{err}"
    );
    assert_eq!(server.seen().len(), 2);
}

/// All tries together stay within `within`: no try starts that could end after it, so a
/// server that never answers cannot hold a sandbox past the kubelet's patience.
#[test]
fn every_try_together_is_bounded() {
    let server = Server::start(|_| Reply::Silent);
    let dir = Dir::new();
    let api = ApiConf {
        tries: 30,
        timeout: Duration::from_millis(200),
        within: Duration::from_secs(1),
        ..conf(dir.kubeconfig(&server.url("http")))
    };
    let err = fetch_pod(&api, "shop", "reviews-1").unwrap_err().to_string();
    let tries = server.seen().len();
    // 200 ms each and 10 ms between: at most 5 fit in 1 s.
    assert!((1..=5).contains(&tries), "{tries} tries: {err}");
    assert!(
        err.ends_with(&format!("({tries} tries)")) || err.ends_with("(1 try)"),
        "{err}"
    );
}

#[test]
fn https_with_the_clusters_ca_and_a_bearer_token() {
    let server = Server::start_tls(|_| Reply::Json(200, pod_json("shop", "reviews-1", sidecar_spec())));
    let dir = Dir::new();
    let pod = fetch_pod(&conf(dir.kubeconfig(&server.url("https"))), "shop", "reviews-1").unwrap();
    assert!(pod.proxy.is_some());
    let seen = server.seen();
    assert_eq!(
        seen[0].authorization.as_deref(),
        Some(format!("Bearer {TOKEN}").as_str())
    );

    // A CA that did not sign the server's certificate: refused before any request is sent.
    let api = ApiConf {
        tries: 1,
        ..conf(dir.kubeconfig_trusting(&server.url("https"), SERVER_PEM))
    };
    let err = fetch_pod(&api, "shop", "reviews-1").unwrap_err().to_string();
    assert!(err.contains("certificate"), "{err}");
    assert_eq!(server.seen().len(), 1, "no request without a trusted server");
}

#[test]
fn a_server_not_speaking_tls_fails_the_handshake_in_one_line() {
    let server = Server::start(|_| Reply::Json(200, json!({})));
    let dir = Dir::new();
    let api = ApiConf {
        tries: 1,
        ..conf(dir.kubeconfig(&server.url("https")))
    };
    let err = fetch_pod(&api, "shop", "reviews-1").unwrap_err().to_string();
    assert!(err.contains(&server.url("https")), "{err}");
    assert!(!err.contains("no answer"), "a handshake error, not a timeout: {err}");
    assert!(!err.contains('\n'), "{err}");
    assert_eq!(server.seen()[0].path, "(not HTTP)");
}

#[test]
fn kubeconfig_and_connection_failures_are_named() {
    let dir = Dir::new();
    let missing = dir.0.join("absent-kubeconfig");
    let api = ApiConf {
        tries: 2,
        ..conf(missing)
    };
    let err = fetch_pod(&api, "shop", "reviews-1").unwrap_err().to_string();
    assert!(err.contains("absent-kubeconfig"), "{err}");
    assert!(err.ends_with("(2 tries)"), "{err}");

    let garbage = dir.0.join("garbage");
    fs::write(&garbage, "clusters: [").unwrap();
    let err = fetch_pod(
        &ApiConf {
            tries: 1,
            ..conf(garbage)
        },
        "shop",
        "reviews-1",
    )
    .unwrap_err();
    assert!(err.to_string().contains("garbage"), "{err}");

    // A port nothing listens on: bind one, note it, let it go.
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let api = ApiConf {
        tries: 1,
        ..conf(dir.kubeconfig(&format!("http://127.0.0.1:{port}")))
    };
    let err = fetch_pod(&api, "shop", "reviews-1").unwrap_err().to_string();
    assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
    assert!(err.to_lowercase().contains("refused"), "{err}");

    let err = fetch_pod(&api, "", "reviews-1").unwrap_err();
    assert!(matches!(err, FetchError::Failed(_)), "{err:?}");
}

/// The fine points of `getK8sPodInfo`, without a server.
#[test]
fn proxy_type_env_and_ids_follow_istio_cni() {
    let read = |container: Value| {
        let p: K8sPod = serde_json::from_value(json!({ "spec": { "containers": [container] } })).unwrap();
        from_k8s(p, "ns")
    };
    let kind = |args: Value| {
        read(json!({ "name": "istio-proxy", "args": args }))
            .proxy
            .unwrap()
            .proxy_type
    };
    assert_eq!(kind(json!(["proxy", "sidecar"])), Some("sidecar".into()));
    assert_eq!(kind(json!(["proxy"])), None);
    assert_eq!(kind(json!(["run", "router"])), None);
    assert_eq!(kind(json!(["proxy", ""])), None, "Go's empty type");
    assert_eq!(kind(json!(null)), None);

    // The last of a repeated name wins, as in istio-cni's map.
    let pod = read(json!({ "name": "istio-proxy", "env": [
        { "name": "DISABLE_ENVOY", "value": "false" },
        { "name": "DISABLE_ENVOY", "value": "true" },
        { "name": "EMPTY" }
    ]}));
    let env = &pod.proxy.as_ref().unwrap().env;
    assert_eq!((env["DISABLE_ENVOY"].as_str(), env["EMPTY"].as_str()), ("true", ""));
    assert_eq!(
        pod.namespace.as_deref(),
        Some("ns"),
        "the asked namespace when the pod has none"
    );

    let other = read(json!({ "name": "app", "args": ["proxy", "router"] }));
    assert!(other.proxy.is_none());
    let bare: K8sPod = serde_json::from_value(json!({ "metadata": { "namespace": "a" } })).unwrap();
    let bare = from_k8s(bare, "b");
    assert!(bare.containers.is_empty() && bare.proxy.is_none());
    assert_eq!(bare.namespace.as_deref(), Some("a"));
}

#[path = "ambient_tests.rs"]
mod ambient;
