//! `redirect-cni`: a chained CNI plugin (spec 1.0) that enrolls a pod's network namespace with
//! the node agent on ADD and removes it on DEL, so a pod is captured from its first process on.
//!
//! It runs after the main plugin, as the container runtime calls every plugin: the command and
//! the pod in environment variables (`CNI_COMMAND`, `CNI_CONTAINERID`, `CNI_NETNS`, `CNI_ARGS`),
//! the network configuration on stdin, the result (the previous plugin's, passed through) or an
//! error object on stdout. Which pods, and with which istio-iptables flags, comes from its
//! configuration and, where the runtime passes them (containerd's
//! `io.kubernetes.cri.pod-annotations` capability), the pod's annotations, named as Istio names
//! them.

use std::{
    collections::BTreeMap,
    io::Read as _,
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use redirect_api::{ClientError, ErrorKind, PodRef, Request, Response};
use serde::Deserialize;
use serde_json::{Value, json};

mod ambient;
mod install;
mod kube;
mod pod;

use pod::{Decision, Pod, Selection, Selector};

const SUPPORTED: [&str; 4] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0"];

/// CNI's well-known error codes (spec, "Error").
mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const INVALID_ENV: u32 = 4;
    pub const DECODING: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// Plugin-specific: the agent refused the workload.
    pub const REFUSED: u32 = 100;
    /// Plugin-specific: CHECK found the pod not enrolled.
    pub const NOT_ENROLLED: u32 = 101;
    /// Plugin-specific: an annotation of the pod has a value Istio would refuse.
    pub const BAD_POD: u32 = 102;
}

/// Annotation that carries the runtime's pod annotations in `runtimeConfig`.
const POD_ANNOTATIONS: &str = "io.kubernetes.cri.pod-annotations";

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct NetConf {
    cni_version: String,
    #[serde(default)]
    prev_result: Option<Value>,
    #[serde(default)]
    runtime_config: BTreeMap<String, Value>,
    /// The node agent's control socket.
    #[serde(default = "default_socket")]
    agent_socket: PathBuf,
    /// The proxy of a pod without a sidecar that `selector: all` captures (`embedded` or
    /// `none`); a pod's `redirect.dev/proxy` annotation overrides it. A pod with a sidecar is
    /// always `none`: its Envoy serves the capture ports.
    #[serde(default = "redirect_api::default_proxy")]
    proxy: String,
    /// istio-iptables flags (pairs, `["-b", "9080"]`) in place of Istio's defaults for every
    /// pod; a pod's annotations override them.
    #[serde(default)]
    args: Vec<String>,
    /// `injected` (istio-cni's choice): pods Istio injected with a sidecar, and pods that ask
    /// for a proxy of redirect's (`redirect.dev/proxy`). `all`: every other pod as well.
    #[serde(default = "default_selector")]
    selector: String,
    /// Kubernetes namespaces never enrolled. istio-cni's spelling is accepted, at the top level
    /// (Istio 1.23+) and under `kubernetes` (earlier).
    #[serde(default = "default_excluded", alias = "exclude_namespaces")]
    exclude_namespaces: Vec<String>,
    #[serde(default)]
    kubernetes: Option<KubernetesConf>,
    /// A kubeconfig for the API server (istio-cni's `ZZZ-istio-cni-kubeconfig`): each pod is
    /// then read from the API, as istio-cni reads it, not from the runtime's annotations.
    #[serde(default)]
    kubeconfig: Option<PathBuf>,
    /// Ambient mode (istio-cni's `ambient_enabled`): pods labelled `istio.io/dataplane-mode=ambient`,
    /// or in a namespace so labelled, are enrolled with istio-cni's in-pod rules
    /// (`--mode ambient`) for a node proxy. Needs `kubeconfig`: labels come from the API server.
    #[serde(default, alias = "ambient_enabled")]
    ambient_enabled: bool,
    /// An ambient pod's proxy: `none` (ztunnel, handed the pod by the agent over ZDS) or
    /// `embedded`; a pod's `redirect.dev/proxy` annotation overrides it.
    #[serde(default = "default_ambient_proxy")]
    ambient_proxy: String,
    /// istio-cni's `AMBIENT_DNS_CAPTURE`: an ambient pod's DNS goes to 15053 unless its
    /// `ambient.istio.io/dns-capture` annotation says otherwise.
    #[serde(default = "default_true")]
    ambient_dns_capture: bool,
    /// The agent's own pods (a name prefix in a namespace), let through unenrolled while the
    /// API server fails, so that a new agent can start (istio-cni's fail-safe).
    #[serde(default = "default_agent_pod_prefix")]
    agent_pod_prefix: String,
    #[serde(default = "default_agent_namespace")]
    agent_namespace: String,
}

/// istio-cni's configuration before 1.23 nested its Kubernetes settings.
#[derive(Debug, Deserialize)]
struct KubernetesConf {
    #[serde(default)]
    exclude_namespaces: Option<Vec<String>>,
}

impl NetConf {
    fn selection(&self) -> Selection {
        let excluded = self
            .kubernetes
            .as_ref()
            .and_then(|k| k.exclude_namespaces.clone())
            .unwrap_or_else(|| self.exclude_namespaces.clone());
        Selection {
            selector: if self.selector == "all" {
                Selector::All
            } else {
                Selector::Injected
            },
            exclude_namespaces: excluded,
            proxy: self.proxy.clone(),
            args: self.args.clone(),
            ambient: self.ambient_enabled.then(|| ambient::AmbientSelection {
                proxy: self.ambient_proxy.clone(),
                dns_capture: self.ambient_dns_capture,
            }),
        }
    }
}

fn default_socket() -> PathBuf {
    redirect_api::default_socket("node")
}
fn default_ambient_proxy() -> String {
    "none".into()
}
fn default_true() -> bool {
    true
}
fn default_selector() -> String {
    "injected".into()
}
fn default_excluded() -> Vec<String> {
    vec!["kube-system".into()]
}
fn default_agent_pod_prefix() -> String {
    kube::ApiConf::new("").agent_pod_prefix
}
fn default_agent_namespace() -> String {
    kube::ApiConf::new("").agent_namespace
}

/// A failure as CNI reports it.
#[derive(Debug)]
struct CniError {
    code: u32,
    msg: String,
    details: String,
}

fn fail(code: u32, msg: impl Into<String>) -> CniError {
    CniError {
        code,
        msg: msg.into(),
        details: String::new(),
    }
}

fn env(name: &str) -> Result<String, CniError> {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .ok_or_else(|| fail(code::INVALID_ENV, format!("{name} is not set")))
}

/// The runtime's CNI_ARGS, by key.
fn cni_args() -> BTreeMap<String, String> {
    split_cni_args(&std::env::var("CNI_ARGS").unwrap_or_default())
}

/// `K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p;…`
fn split_cni_args(text: &str) -> BTreeMap<String, String> {
    text.split(';')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// The pod as the runtime names it, for the agent's metrics and `list`: both parts or none
/// (a sandbox that is not a Kubernetes pod has neither). Names Kubernetes would not accept are
/// left out, not sent: they only label metrics, and the agent would refuse the whole
/// enrollment for them.
fn pod_ref(args: &BTreeMap<String, String>, read: &Pod) -> Option<PodRef> {
    let part = |key| args.get(key).filter(|v| !v.is_empty()).cloned();
    let pod = PodRef {
        uid: read.uid.clone().or_else(|| part("K8S_POD_UID")),
        service_account: read.service_account.clone(),
        ..PodRef::new(part("K8S_POD_NAMESPACE")?, part("K8S_POD_NAME")?)
    };
    match pod.check() {
        Ok(()) => Some(pod),
        Err(e) => {
            eprintln!("redirect-cni: {e}; the workload is enrolled without its pod's name");
            None
        }
    }
}

fn annotations(conf: &NetConf) -> BTreeMap<String, String> {
    conf.runtime_config
        .get(POD_ANNOTATIONS)
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                .collect()
        })
        .unwrap_or_default()
}

/// The pod: read from the API server when a kubeconfig is configured (istio-cni's way), else as
/// far as the runtime tells it. `Ok(Err(why))`: a pod left alone without reading it.
fn pod_of(conf: &NetConf, args: &BTreeMap<String, String>) -> Result<Result<Pod, String>, CniError> {
    let namespace = args.get("K8S_POD_NAMESPACE").filter(|v| !v.is_empty());
    let Some(kubeconfig) = &conf.kubeconfig else {
        return Ok(Ok(Pod::from_annotations(namespace.cloned(), annotations(conf))));
    };
    let name = args.get("K8S_POD_NAME").filter(|v| !v.is_empty());
    let (Some(namespace), Some(name)) = (namespace, name) else {
        return Ok(Err("not a kubernetes pod".into()));
    };
    // istio-cni's order: an excluded namespace is never read, so its pods start while the API
    // server is down.
    if conf.selection().exclude_namespaces.contains(namespace) {
        return Ok(Err(format!("namespace {namespace} is excluded")));
    }
    let api = api_conf(conf, kubeconfig);
    match kube::fetch_pod(&api, namespace, name) {
        Ok(pod) => Ok(Ok(pod)),
        Err(e @ kube::FetchError::AgentPod(_)) => Ok(Err(e.to_string())),
        Err(kube::FetchError::Failed(e)) => Err(fail(code::TRY_AGAIN_LATER, e)),
    }
}

/// How the plugin reaches the API server with `kubeconfig`.
fn api_conf(conf: &NetConf, kubeconfig: &Path) -> kube::ApiConf {
    kube::ApiConf {
        agent_pod_prefix: conf.agent_pod_prefix.clone(),
        agent_namespace: conf.agent_namespace.clone(),
        namespace_labels: conf.ambient_enabled,
        ..kube::ApiConf::new(kubeconfig)
    }
}

fn call(socket: &Path, request: &Request) -> Result<Response, ClientError> {
    redirect_api::call(socket, request, Duration::from_secs(30))
}

fn api_error(e: ClientError) -> CniError {
    match e {
        ClientError::Refused(a) if a.kind == ErrorKind::Unavailable => fail(code::TRY_AGAIN_LATER, a.message),
        ClientError::Refused(a) => CniError {
            code: code::REFUSED,
            msg: a.message,
            details: format!("{:?}", a.kind),
        },
        other @ ClientError::Connect { .. } => fail(code::TRY_AGAIN_LATER, other.to_string()),
        other => fail(code::TRY_AGAIN_LATER, other.to_string()),
    }
}

fn parse(stdin: &[u8]) -> Result<NetConf, CniError> {
    let conf: NetConf = serde_json::from_slice(stdin)
        .map_err(|e| fail(code::DECODING, format!("network configuration on stdin: {e}")))?;
    if !SUPPORTED.contains(&conf.cni_version.as_str()) {
        return Err(CniError {
            code: code::INCOMPATIBLE_VERSION,
            msg: format!("cniVersion {} is not supported", conf.cni_version),
            details: format!("supported: {}", SUPPORTED.join(", ")),
        });
    }
    if !matches!(conf.selector.as_str(), "all" | "injected") {
        return Err(fail(
            code::INVALID_CONFIG,
            format!("selector '{}': expected injected or all", conf.selector),
        ));
    }
    for (key, value) in [("proxy", &conf.proxy), ("ambientProxy", &conf.ambient_proxy)] {
        if !matches!(value.as_str(), "embedded" | "none") {
            return Err(fail(
                code::INVALID_CONFIG,
                format!("{key} '{value}': expected embedded or none"),
            ));
        }
    }
    if conf.ambient_enabled && conf.kubeconfig.is_none() {
        return Err(fail(
            code::INVALID_CONFIG,
            "ambientEnabled needs kubeconfig: ambient pods are chosen by labels, which only the API server has",
        ));
    }
    pod::check_args(&conf.args).map_err(|e| fail(code::INVALID_CONFIG, e))?;
    Ok(conf)
}

/// Runs one CNI command; `Ok(Some(v))` is printed as the result.
fn cni(command: &str, stdin: &[u8]) -> Result<Option<Value>, CniError> {
    if command == "VERSION" {
        return Ok(Some(json!({ "cniVersion": "1.0.0", "supportedVersions": SUPPORTED })));
    }
    let conf = parse(stdin)?;
    let id = env("CNI_CONTAINERID")?;
    let args = cni_args();
    match command {
        "ADD" => {
            let netns = PathBuf::from(env("CNI_NETNS")?);
            // The previous plugin's result is this one's: it adds no interface or address.
            let mut result = conf.prev_result.clone().unwrap_or_else(|| json!({}));
            result["cniVersion"] = json!(conf.cni_version);
            let pod = match pod_of(&conf, &args)? {
                Ok(pod) => pod,
                Err(why) => {
                    eprintln!("redirect-cni: {id}: not enrolled: {why}");
                    return Ok(Some(result));
                }
            };
            let (proxy, flags, ambient) =
                match pod::decide(&conf.selection(), &pod).map_err(|e| fail(code::BAD_POD, e))? {
                    Decision::Skip(why) => {
                        eprintln!("redirect-cni: {id}: not enrolled: {why}");
                        return Ok(Some(result));
                    }
                    Decision::Enroll { proxy, flags, ambient } => (proxy, flags, ambient),
                };
            // Reachable over HBONE only when ztunnel serves it (it took the pod, or the enroll
            // failed): the embedded proxy serves no 15008.
            let hbone = ambient && proxy == "none";
            let named = pod_ref(&args, &pod);
            let request = Request::Enroll(redirect_api::Enroll {
                id: id.clone(),
                netns,
                cgroup: None,
                proxy,
                args: flags,
                fast_path: pod.annotations.get("redirect.dev/fast-path").map(String::as_str) == Some("true"),
                pod: named.clone(),
            });
            call(&conf.agent_socket, &request).map_err(api_error)?;
            // As istio-cni's node agent does once ztunnel has the pod: istiod then sends it HBONE.
            // Informational: the capture is in place whatever the API server answers, so ADD
            // stands.
            if hbone
                && let (Some(kubeconfig), Some(pod)) = (&conf.kubeconfig, &named)
                && let Err(e) = kube::annotate_ambient(&api_conf(&conf, kubeconfig), &pod.namespace, &pod.name)
            {
                eprintln!(
                    "redirect-cni: {id}: enrolled, but not annotated {}: {e}",
                    kube::AMBIENT_REDIRECTION
                );
            }
            Ok(Some(result))
        }
        "DEL" => {
            let request = Request::Unenroll {
                id: Some(id.clone()),
                netns: None,
            };
            match call(&conf.agent_socket, &request) {
                Ok(_) => Ok(None),
                // DEL must succeed for what is already gone (spec: "should not return an error").
                Err(ClientError::Refused(e)) if e.kind == ErrorKind::NotFound => Ok(None),
                // No agent on this node: nothing is enrolled to remove.
                Err(ClientError::Connect { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                    eprintln!(
                        "redirect-cni: {id}: no agent socket at {}; nothing to remove",
                        conf.agent_socket.display()
                    );
                    Ok(None)
                }
                Err(e) => Err(api_error(e)),
            }
        }
        "CHECK" => {
            let Response::Workloads(list) = call(&conf.agent_socket, &Request::List).map_err(api_error)? else {
                return Err(fail(code::TRY_AGAIN_LATER, "unexpected answer from the agent"));
            };
            let should = match pod_of(&conf, &args)? {
                Ok(pod) => matches!(pod::decide(&conf.selection(), &pod), Ok(Decision::Enroll { .. })),
                Err(_) => false,
            };
            match (should, list.iter().any(|w| w.id == id)) {
                (true, false) => Err(fail(
                    code::NOT_ENROLLED,
                    format!("container {id} is not enrolled with the agent"),
                )),
                _ => Ok(None),
            }
        }
        other => Err(fail(
            code::INVALID_ENV,
            format!("CNI_COMMAND '{other}': expected ADD, DEL, CHECK or VERSION"),
        )),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(first) = args.first() {
        let run = match first.as_str() {
            "install" => install::install,
            "uninstall" => install::uninstall,
            _ => {
                eprintln!(
                    "redirect-cni: unknown command '{first}': a runtime calls this plugin without arguments; `install` installs it, `uninstall` removes it"
                );
                return ExitCode::from(2);
            }
        };
        return match run(&args[1..]) {
            Ok(done) => {
                println!("redirect-cni: {done}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("redirect-cni: {first}: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let command = std::env::var("CNI_COMMAND").unwrap_or_default();
    let mut stdin = Vec::new();
    // VERSION may come without a configuration.
    if command != "VERSION" && std::io::stdin().take(1 << 20).read_to_end(&mut stdin).is_err() {
        stdin.clear();
    }
    let version = serde_json::from_slice::<Value>(&stdin)
        .ok()
        .and_then(|v| v["cniVersion"].as_str().map(str::to_owned))
        .unwrap_or_else(|| "1.0.0".into());
    match cni(&command, &stdin) {
        Ok(Some(v)) => {
            println!("{v}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("redirect-cni: {}", e.msg);
            println!(
                "{}",
                json!({ "cniVersion": version, "code": e.code, "msg": e.msg, "details": e.details })
            );
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conf(extra: Value) -> NetConf {
        let mut v = json!({ "cniVersion": "1.0.0", "name": "k8s", "type": "redirect-cni" });
        v.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        parse(&serde_json::to_vec(&v).unwrap()).unwrap()
    }

    #[test]
    fn istio_cnis_spellings_of_excluded_namespaces_are_read() {
        assert_eq!(conf(json!({})).selection().exclude_namespaces, ["kube-system"]);
        assert_eq!(conf(json!({})).selection().selector, Selector::Injected);
        let top = conf(json!({ "exclude_namespaces": ["istio-system", "kube-system"] }));
        assert_eq!(top.selection().exclude_namespaces, ["istio-system", "kube-system"]);
        let nested = conf(json!({ "kubernetes": { "exclude_namespaces": ["a"] } }));
        assert_eq!(nested.selection().exclude_namespaces, ["a"]);
        let ours = conf(json!({ "excludeNamespaces": [] }));
        assert!(ours.selection().exclude_namespaces.is_empty());
    }

    #[test]
    fn the_pod_is_named_only_when_the_runtime_gives_both_parts() {
        let args = split_cni_args;
        let none = Pod::default();
        let pod_ref = |a: &BTreeMap<String, String>| pod_ref(a, &none);
        let both = pod_ref(&args("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0"));
        assert_eq!(both.map(|p| p.to_string()).as_deref(), Some("default/web-0"));
        assert_eq!(pod_ref(&args("K8S_POD_NAMESPACE=default")), None);
        assert_eq!(pod_ref(&args("K8S_POD_NAMESPACE=default;K8S_POD_NAME=")), None);
        assert_eq!(pod_ref(&args("")), None);
        // A name Kubernetes would not give is left out, not sent for the agent to refuse.
        assert_eq!(pod_ref(&args("K8S_POD_NAMESPACE=default;K8S_POD_NAME=Web_1")), None);
        // podman puts its own K8S_POD_NAME (the infra container's) before the caller's
        // CNI_ARGS; the last one is the pod's, as libcni's LoadArgs reads them too.
        let podman = args("IgnoreUnknown=1;K8S_POD_NAME=3352eefd608c-infra;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=cart-0");
        assert_eq!(pod_ref(&podman).map(|p| p.to_string()).as_deref(), Some("shop/cart-0"));
    }

    #[test]
    fn the_uid_is_the_api_servers_or_the_kubelets_and_the_account_the_api_servers() {
        let args = split_cni_args("K8S_POD_NAMESPACE=shop;K8S_POD_NAME=cart-0;K8S_POD_UID=uid-from-kubelet");
        let got = pod_ref(&args, &Pod::default()).unwrap();
        assert_eq!(
            (got.uid.as_deref(), got.service_account),
            (Some("uid-from-kubelet"), None)
        );
        let read = Pod {
            uid: Some("uid-from-api".into()),
            service_account: Some("cart".into()),
            ..Pod::default()
        };
        let got = pod_ref(&args, &read).unwrap();
        assert_eq!(
            (got.uid.as_deref(), got.service_account.as_deref()),
            (Some("uid-from-api"), Some("cart"))
        );
    }

    #[test]
    fn versions_and_bad_configuration() {
        let v = cni("VERSION", b"").unwrap().unwrap();
        assert_eq!(v["supportedVersions"], json!(SUPPORTED));
        let e = parse(br#"{"cniVersion":"0.2.0"}"#).unwrap_err();
        assert_eq!(e.code, code::INCOMPATIBLE_VERSION);
        assert_eq!(parse(b"{").unwrap_err().code, code::DECODING);
        for bad in [
            r#"{"cniVersion":"1.0.0","selector":"some"}"#,
            r#"{"cniVersion":"1.0.0","proxy":"envoy"}"#,
            r#"{"cniVersion":"1.0.0","args":["-b"]}"#,
            r#"{"cniVersion":"1.0.0","ambientProxy":"ztunnel","kubeconfig":"/k"}"#,
            r#"{"cniVersion":"1.0.0","ambientEnabled":true}"#,
        ] {
            let e = parse(bad.as_bytes()).unwrap_err();
            assert_eq!(e.code, code::INVALID_CONFIG, "{bad}: {}", e.msg);
        }
        let e = parse(br#"{"cniVersion":"1.0.0","ambient_enabled":true}"#).unwrap_err();
        assert!(e.msg.starts_with("ambientEnabled needs kubeconfig"), "{}", e.msg);
        // istio-cni's spelling, and the defaults: ztunnel serves, DNS is captured.
        let conf = parse(br#"{"cniVersion":"1.0.0","ambient_enabled":true,"kubeconfig":"/k"}"#).unwrap();
        let a = conf.selection().ambient.unwrap();
        assert_eq!((a.proxy.as_str(), a.dns_capture), ("none", true));
        assert!(
            parse(br#"{"cniVersion":"1.0.0"}"#)
                .unwrap()
                .selection()
                .ambient
                .is_none()
        );
    }
}
