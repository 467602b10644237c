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

use redirect_api::{ClientError, ErrorKind, Request, Response};
use serde::Deserialize;
use serde_json::{Value, json};

mod install;

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
}

/// Annotation that carries the runtime's pod annotations in `runtimeConfig`.
const POD_ANNOTATIONS: &str = "io.kubernetes.cri.pod-annotations";

/// Istio's per-pod annotations, and the istio-iptables flag each sets.
const ANNOTATION_FLAGS: [(&str, &str); 7] = [
    ("traffic.sidecar.istio.io/includeOutboundIPRanges", "-i"),
    ("traffic.sidecar.istio.io/excludeOutboundIPRanges", "-x"),
    ("traffic.sidecar.istio.io/includeInboundPorts", "-b"),
    ("traffic.sidecar.istio.io/excludeInboundPorts", "-d"),
    ("traffic.sidecar.istio.io/includeOutboundPorts", "-q"),
    ("traffic.sidecar.istio.io/excludeOutboundPorts", "-o"),
    ("sidecar.istio.io/interceptionMode", "-m"),
];

/// The sidecar's own ports, which Istio's injector always adds to `-d`.
const STATUS_PORTS: &str = "15090,15021,15020";

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
    /// `embedded` or `none`; a pod's `redirect.dev/proxy` annotation overrides it.
    #[serde(default = "redirect_api::default_proxy")]
    proxy: String,
    /// istio-iptables flags for every pod, as pairs (`["-d", "15090,15021,15020"]`).
    #[serde(default)]
    args: Vec<String>,
    /// `all`: every pod but those excluded; `injected`: only pods Istio's injector marked
    /// (annotation `sidecar.istio.io/status`), which needs the runtime to pass annotations.
    #[serde(default = "default_selector")]
    selector: String,
    /// Kubernetes namespaces never enrolled.
    #[serde(default = "default_excluded")]
    exclude_namespaces: Vec<String>,
}

fn default_socket() -> PathBuf {
    redirect_api::default_socket("node")
}
fn default_selector() -> String {
    "all".into()
}
fn default_excluded() -> Vec<String> {
    vec!["kube-system".into()]
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

/// `K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p;…`
fn cni_args() -> BTreeMap<String, String> {
    std::env::var("CNI_ARGS")
        .unwrap_or_default()
        .split(';')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
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

/// The flags for one pod: the configuration's pairs, each overridden by its annotation.
fn pod_flags(conf: &NetConf, annotations: &BTreeMap<String, String>) -> Result<Vec<String>, CniError> {
    if !conf.args.len().is_multiple_of(2) || conf.args.iter().step_by(2).any(|f| !f.starts_with('-')) {
        return Err(fail(
            code::INVALID_CONFIG,
            format!(
                "args {:?}: expected pairs of an istio-iptables flag and its value",
                conf.args
            ),
        ));
    }
    let mut flags: Vec<(String, String)> = conf.args.chunks(2).map(|p| (p[0].clone(), p[1].clone())).collect();
    for (annotation, flag) in ANNOTATION_FLAGS {
        let Some(value) = annotations.get(annotation) else {
            continue;
        };
        let value = if flag == "-d" {
            [value.as_str(), STATUS_PORTS]
                .into_iter()
                .filter(|s| !s.is_empty())
                .collect::<Vec<_>>()
                .join(",")
        } else {
            value.clone()
        };
        flags.retain(|(f, _)| f != flag);
        flags.push((flag.to_owned(), value));
    }
    Ok(flags.into_iter().flat_map(|(f, v)| [f, v]).collect())
}

/// Whether this pod is the mesh's, and why not when it is not.
fn selected(
    conf: &NetConf,
    annotations: &BTreeMap<String, String>,
    args: &BTreeMap<String, String>,
) -> Result<(), String> {
    if let Some(ns) = args.get("K8S_POD_NAMESPACE")
        && conf.exclude_namespaces.contains(ns)
    {
        return Err(format!("namespace {ns} is excluded"));
    }
    if annotations.get("sidecar.istio.io/inject").map(String::as_str) == Some("false") {
        return Err("annotated sidecar.istio.io/inject=false".into());
    }
    match conf.selector.as_str() {
        "all" => Ok(()),
        "injected" if annotations.contains_key("sidecar.istio.io/status") => Ok(()),
        "injected" => Err("no sidecar.istio.io/status annotation (selector: injected)".into()),
        _ => unreachable!("checked in parse"),
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
            format!("selector '{}': expected all or injected", conf.selector),
        ));
    }
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
            let annotations = annotations(&conf);
            // The previous plugin's result is this one's: it adds no interface or address.
            let mut result = conf.prev_result.clone().unwrap_or_else(|| json!({}));
            result["cniVersion"] = json!(conf.cni_version);
            if let Err(why) = selected(&conf, &annotations, &args) {
                eprintln!("redirect-cni: {id}: not enrolled: {why}");
                return Ok(Some(result));
            }
            let proxy = annotations
                .get("redirect.dev/proxy")
                .cloned()
                .unwrap_or_else(|| conf.proxy.clone());
            let request = Request::Enroll(redirect_api::Enroll {
                id: id.clone(),
                netns,
                cgroup: None,
                proxy,
                args: pod_flags(&conf, &annotations)?,
                fast_path: annotations.get("redirect.dev/fast-path").map(String::as_str) == Some("true"),
            });
            call(&conf.agent_socket, &request).map_err(api_error)?;
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
            let annotations = annotations(&conf);
            let should = selected(&conf, &annotations, &args).is_ok();
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
        if first != "install" {
            eprintln!(
                "redirect-cni: unknown command '{first}': a runtime calls this plugin without arguments; `install` installs it"
            );
            return ExitCode::from(2);
        }
        return match install::install(&args[1..]) {
            Ok(done) => {
                println!("redirect-cni: {done}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("redirect-cni: install: {e}");
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
    fn annotations_override_configured_flags_and_keep_status_ports_excluded() {
        let c = conf(json!({ "args": ["-b", "*", "-i", "10.0.0.0/8"] }));
        let a = BTreeMap::from([
            (
                "traffic.sidecar.istio.io/includeOutboundIPRanges".to_owned(),
                "10.96.0.0/12".to_owned(),
            ),
            (
                "traffic.sidecar.istio.io/excludeInboundPorts".to_owned(),
                "9090".to_owned(),
            ),
        ]);
        assert_eq!(
            pod_flags(&c, &a).unwrap(),
            ["-b", "*", "-i", "10.96.0.0/12", "-d", "9090,15090,15021,15020"]
        );
        assert!(pod_flags(&conf(json!({ "args": ["-b"] })), &a).is_err());
    }

    #[test]
    fn selection_follows_namespace_annotations_and_selector() {
        let c = conf(json!({}));
        let sys = BTreeMap::from([("K8S_POD_NAMESPACE".to_owned(), "kube-system".to_owned())]);
        assert!(selected(&c, &BTreeMap::new(), &sys).is_err());
        assert!(selected(&c, &BTreeMap::new(), &BTreeMap::new()).is_ok());
        let off = BTreeMap::from([("sidecar.istio.io/inject".to_owned(), "false".to_owned())]);
        assert!(selected(&c, &off, &BTreeMap::new()).is_err());
        let injected = conf(json!({ "selector": "injected" }));
        assert!(selected(&injected, &BTreeMap::new(), &BTreeMap::new()).is_err());
        let status = BTreeMap::from([("sidecar.istio.io/status".to_owned(), "{}".to_owned())]);
        assert!(selected(&injected, &status, &BTreeMap::new()).is_ok());
    }

    #[test]
    fn versions_and_bad_configuration() {
        let v = cni("VERSION", b"").unwrap().unwrap();
        assert_eq!(v["supportedVersions"], json!(SUPPORTED));
        let e = parse(br#"{"cniVersion":"0.2.0"}"#).unwrap_err();
        assert_eq!(e.code, code::INCOMPATIBLE_VERSION);
        assert_eq!(parse(b"{").unwrap_err().code, code::DECODING);
        let e = parse(br#"{"cniVersion":"1.0.0","selector":"some"}"#).unwrap_err();
        assert_eq!(e.code, code::INVALID_CONFIG);
    }
}
