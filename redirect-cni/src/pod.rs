//! Which pods are captured, and with which istio-iptables flags: istio-cni's decision for a
//! sidecar pod (`cni/pkg/plugin/plugin.go`, `doAddRun`; `sidecar_redirect.go`, `NewRedirect`),
//! step by step, as docs/research/istio-cni.md records it, plus redirect's own opt-in for pods
//! without a sidecar.
//!
//! istio-cni reads the pod from the API server. Here the pod is what the plugin can learn: the
//! annotations the runtime passes (containerd's `io.kubernetes.cri.pod-annotations`), and from
//! the injector's `sidecar.istio.io/status` annotation the containers it added. What only the
//! pod spec holds (the proxy's uid and gid, its environment, its arguments) is taken as the
//! injector writes it by default; [`Pod`] has room for the spec's values.

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;

use crate::ambient::{self, AmbientSelection};

/// The sidecar's container, and the init container that means istio-init programs iptables
/// itself (istio-cni's `ISTIOPROXY`, `ISTIOINIT`).
const ISTIO_PROXY: &str = "istio-proxy";
const ISTIO_INIT: &str = "istio-init";

/// The sidecar's own ports, which istio-cni always appends to `-d`, in its order.
const STATUS_PORTS: [&str; 3] = ["15020", "15021", "15090"];

/// istio-cni's uid and gid for a proxy whose spec names none, or root (a TPROXY sidecar runs as
/// root and its traffic is still the proxy's: 1337).
const PROXY_ID: i64 = 1337;

/// What the plugin knows of a pod.
#[derive(Debug, Default, Clone)]
pub struct Pod {
    pub namespace: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    /// Names of its init and regular containers (a native sidecar is an init container).
    pub containers: BTreeSet<String>,
    /// The `istio-proxy` container's facts, when it has one.
    pub proxy: Option<ProxyContainer>,
    /// Its namespace's labels (read from the API server only when ambient mode is on).
    pub namespace_labels: BTreeMap<String, String>,
    /// `spec.hostNetwork`: never captured in ambient mode.
    pub host_network: bool,
    /// `metadata.uid` and `spec.serviceAccountName`, which ztunnel names the pod by.
    pub uid: Option<String>,
    pub service_account: Option<String>,
}

/// What istio-cni reads from the `istio-proxy` container.
#[derive(Debug, Default, Clone)]
pub struct ProxyContainer {
    /// Literal `env` values (`valueFrom` reads as empty, as istio-cni reads it).
    pub env: BTreeMap<String, String>,
    /// `args[1]` when `args[0] == "proxy"`: `sidecar`, or `router` for a gateway.
    pub proxy_type: Option<String>,
    pub run_as_user: Option<i64>,
    pub run_as_group: Option<i64>,
}

/// The injector's `sidecar.istio.io/status`: what it added to the pod.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct InjectionStatus {
    #[serde(default)]
    init_containers: Option<Vec<String>>,
    #[serde(default)]
    containers: Option<Vec<String>>,
}

impl Pod {
    /// A pod known by its annotations only: its containers are the ones the injector's status
    /// lists, its proxy the injector's default one.
    pub fn from_annotations(namespace: Option<String>, annotations: BTreeMap<String, String>) -> Self {
        let mut containers = BTreeSet::new();
        if let Some(status) = annotations.get("sidecar.istio.io/status")
            && let Ok(s) = serde_json::from_str::<InjectionStatus>(status)
        {
            containers.extend(s.init_containers.into_iter().flatten());
            containers.extend(s.containers.into_iter().flatten());
        }
        let proxy = containers.contains(ISTIO_PROXY).then(ProxyContainer::default);
        Self {
            namespace,
            annotations,
            containers,
            proxy,
            ..Self::default()
        }
    }
}

/// The plugin configuration's part in the decision.
#[derive(Debug, Clone)]
pub struct Selection {
    /// `injected`: pods with a sidecar, and pods that ask for the embedded proxy
    /// (`redirect.dev/proxy`). `all`: every pod, those without a sidecar with `proxy`.
    pub selector: Selector,
    pub exclude_namespaces: Vec<String>,
    /// The proxy for a pod without a sidecar under `all`.
    pub proxy: String,
    /// istio-iptables flags (pairs) in place of Istio's defaults; a pod's annotations win.
    pub args: Vec<String>,
    /// Ambient mode on (istio-cni's `ambient_enabled`), and its defaults.
    pub ambient: Option<AmbientSelection>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Selector {
    Injected,
    All,
}

/// What to do with a pod.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// Left alone, and why (istio-cni's log line where it has one).
    Skip(String),
    Enroll {
        proxy: String,
        flags: Vec<String>,
        /// Ambient mode's pod (`--mode ambient`), which istio-cni marks as enrolled.
        ambient: bool,
    },
}

/// istio-cni's sequence (§1 of the research note), then redirect's opt-in. `Err`: a value the
/// pod sets is invalid, which fails ADD (as in current Istio; the sandbox is retried).
pub fn decide(sel: &Selection, pod: &Pod) -> Result<Decision, String> {
    let skip = |why: &str| Ok(Decision::Skip(why.to_owned()));
    if let Some(ns) = &pod.namespace
        && sel.exclude_namespaces.contains(ns)
    {
        return skip(&format!("namespace {ns} is excluded"));
    }
    // istio-cni's order: an ambient pod is ztunnel's, and the sidecar checks never see it.
    if let Some(a) = &sel.ambient
        && ambient::selected(pod)
    {
        let proxy = pod.annotations.get("redirect.dev/proxy").unwrap_or(&a.proxy).clone();
        return Ok(Decision::Enroll {
            proxy,
            flags: ambient::flags(a, pod)?,
            ambient: true,
        });
    }
    if pod.containers.contains(ISTIO_INIT) {
        return skip("already injected with the istio-init container, which installs iptables rules itself");
    }
    if let Some(p) = &pod.proxy
        && p.env.get("DISABLE_ENVOY").and_then(|v| parse_bool(v)) == Some(true)
    {
        return skip("DISABLE_ENVOY is set on istio-proxy");
    }
    // The label is the newer API: when both are there, the label decides.
    let inject = pod
        .labels
        .get("sidecar.istio.io/inject")
        .or_else(|| pod.annotations.get("sidecar.istio.io/inject"));
    if inject.and_then(|v| parse_bool(v)) == Some(false) {
        return skip("sidecar.istio.io/inject is false");
    }
    let sidecar = match &pod.proxy {
        Some(p) if !matches!(p.proxy_type.as_deref(), None | Some("sidecar")) => {
            return skip(&format!(
                "istio-proxy has proxy type {}",
                p.proxy_type.as_deref().unwrap_or_default()
            ));
        }
        Some(_) if pod.annotations.contains_key("sidecar.istio.io/status") => true,
        _ => false,
    };
    let asked = pod.annotations.get("redirect.dev/proxy");
    let proxy = if sidecar {
        // The sidecar's Envoy listens on 15001/15006: nothing of ours may bind them.
        if asked.is_some_and(|p| p != "none") {
            return Err(format!(
                "redirect.dev/proxy '{}': the pod has an istio-proxy sidecar, which serves the capture ports; expected none or no annotation",
                asked.map(String::as_str).unwrap_or_default()
            ));
        }
        "none".to_owned()
    } else if let Some(p) = asked {
        p.clone()
    } else if sel.selector == Selector::All {
        sel.proxy.clone()
    } else {
        let why = if pod.proxy.is_none() {
            "no istio-proxy container and no redirect.dev/proxy annotation"
        } else {
            "no sidecar.istio.io/status annotation"
        };
        return skip(why);
    };
    // istio-init's NONE: no capture at all. istio-cni would fail ADD on it (its validator knows
    // only REDIRECT and TPROXY); the injector writes it for pods that want none.
    if pod
        .annotations
        .get("sidecar.istio.io/interceptionMode")
        .map(String::as_str)
        == Some("NONE")
    {
        return skip("sidecar.istio.io/interceptionMode is NONE");
    }
    Ok(Decision::Enroll {
        proxy,
        flags: flags(sel, pod)?,
        ambient: false,
    })
}

type Validator = fn(&str) -> Result<(), String>;

/// Each annotation istio-cni reads, the flag it sets and its check (`NewRedirect`).
const ANNOTATIONS: [(&str, &str, Validator); 8] = [
    ("sidecar.istio.io/interceptionMode", "-m", interception_mode),
    (
        "traffic.sidecar.istio.io/includeOutboundIPRanges",
        "-i",
        cidrs_or_wildcard,
    ),
    ("traffic.sidecar.istio.io/excludeOutboundIPRanges", "-x", cidrs),
    ("traffic.sidecar.istio.io/includeInboundPorts", "-b", ports_or_wildcard),
    ("traffic.sidecar.istio.io/excludeInboundPorts", "-d", ports_or_wildcard),
    ("traffic.sidecar.istio.io/includeOutboundPorts", "-q", ports_or_wildcard),
    ("traffic.sidecar.istio.io/excludeOutboundPorts", "-o", ports_or_wildcard),
    ("traffic.sidecar.istio.io/excludeInterfaces", "-c", interface_names),
];

/// The newer name of the `-k` annotation, read first; the older one only in its absence.
const VIRT_ANNOTATIONS: [&str; 2] = [
    "istio.io/reroute-virtual-interfaces",
    "traffic.sidecar.istio.io/kubevirtInterfaces",
];

/// The pod's flags: Istio's defaults, replaced by the configuration's `args`, replaced by the
/// pod's annotations and its proxy's spec; `-d` always ends with the sidecar's status ports.
pub fn flags(sel: &Selection, pod: &Pod) -> Result<Vec<String>, String> {
    let mut set: Vec<(String, String)> = [("-i", "*"), ("-b", "*"), ("-d", "15020"), ("-o", "15020")]
        .map(|(f, v)| (f.to_owned(), v.to_owned()))
        .to_vec();
    fn put(set: &mut Vec<(String, String)>, flag: &str, value: String) {
        set.retain(|(f, _)| f != flag);
        set.push((flag.to_owned(), value));
    }
    check_args(&sel.args)?;
    for pair in sel.args.chunks(2) {
        put(&mut set, &pair[0], pair[1].clone());
    }
    for (annotation, flag, valid) in ANNOTATIONS {
        if let Some(value) = pod.annotations.get(annotation) {
            valid(value).map_err(|e| format!("annotation {annotation}: '{value}': {e}"))?;
            put(&mut set, flag, value.clone());
        }
    }
    if let Some(value) = VIRT_ANNOTATIONS.iter().find_map(|a| pod.annotations.get(*a)) {
        put(&mut set, "-k", value.clone());
    }
    if let Some(p) = &pod.proxy {
        // Root or nothing: the proxy's traffic is still 1337's (a TPROXY sidecar runs as root).
        let id = |v: Option<i64>| v.filter(|&v| v != 0).unwrap_or(PROXY_ID).to_string();
        if p.run_as_user.is_some() || p.run_as_group.is_some() {
            put(&mut set, "-u", id(p.run_as_user));
            put(&mut set, "-g", id(p.run_as_group));
        }
    }
    let d = set
        .iter()
        .find(|(f, _)| f == "-d")
        .map(|(_, v)| v.trim().to_owned())
        .unwrap_or_default();
    let mut ports: Vec<&str> = Vec::new();
    for p in d.split(',').filter(|p| !p.is_empty()).chain(STATUS_PORTS) {
        if !ports.contains(&p) {
            ports.push(p);
        }
    }
    put(&mut set, "-d", ports.join(","));
    let mut out: Vec<String> = set.into_iter().flat_map(|(f, v)| [f, v]).collect();
    // The proxy's environment, which istio-cni reads for three switches. DNS capture in CNI
    // mode is all of port 53: the plugin cannot read the pod's resolv.conf.
    let env = |name: &str| {
        pod.proxy
            .as_ref()
            .and_then(|p| p.env.get(name))
            .and_then(|v| parse_bool(v))
            == Some(true)
    };
    if env("ISTIO_META_DNS_CAPTURE") {
        out.extend(["--redirect-dns".into(), "--capture-all-dns".into()]);
    }
    if env("ISTIO_DUAL_STACK") {
        out.push("--dual-stack".into());
    }
    if env("INVALID_DROP") {
        out.push("--drop-invalid".into());
    }
    Ok(out)
}

/// The configuration's `args`: pairs of a flag and its value.
pub fn check_args(args: &[String]) -> Result<(), String> {
    for pair in args.chunks(2) {
        match pair {
            [flag, value] if flag.len() > 1 && flag.starts_with('-') && !value.starts_with('-') => {}
            [flag, ..] if !flag.starts_with('-') || flag.len() == 1 => {
                return Err(format!(
                    "args: '{flag}' is not an istio-iptables flag: expected FLAG VALUE pairs"
                ));
            }
            [flag, ..] => return Err(format!("args: {flag} has no value: expected FLAG VALUE pairs")),
            [] => {}
        }
    }
    Ok(())
}

/// Go's `strconv.ParseBool`, which istio-cni uses: anything else is neither.
pub(crate) fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

fn interception_mode(v: &str) -> Result<(), String> {
    match v {
        "REDIRECT" | "TPROXY" => Ok(()),
        _ => Err("expected REDIRECT or TPROXY (or NONE for no capture)".into()),
    }
}

fn cidrs_or_wildcard(v: &str) -> Result<(), String> {
    if v == "*" { Ok(()) } else { cidrs(v) }
}

/// A comma list of prefixes (`10.0.0.0/8`, `fd00::/8`), no spaces; empty is none.
fn cidrs(v: &str) -> Result<(), String> {
    for c in v.split(',').filter(|_| !v.is_empty()) {
        let ok = c.split_once('/').is_some_and(|(ip, len)| {
            let max = match ip.parse::<std::net::IpAddr>() {
                Ok(std::net::IpAddr::V4(_)) => 32,
                Ok(std::net::IpAddr::V6(_)) => 128,
                Err(_) => return false,
            };
            !len.is_empty() && len.bytes().all(|b| b.is_ascii_digit()) && len.parse::<u8>().is_ok_and(|l| l <= max)
        });
        if !ok {
            return Err(format!("'{c}' is not a CIDR: expected a comma list of address/length"));
        }
    }
    Ok(())
}

fn ports_or_wildcard(v: &str) -> Result<(), String> {
    if v == "*" {
        return Ok(());
    }
    for p in v.split(',').filter(|_| !v.is_empty()) {
        let t = p.trim();
        if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) || t.parse::<u16>().is_err() {
            return Err(format!("'{p}' is not a port: expected * or a comma list of 0-65535"));
        }
    }
    Ok(())
}

/// Linux interface names, as Istio checks them (`netutil.ValidateInterfaceNames`).
pub(crate) fn interface_names(v: &str) -> Result<(), String> {
    for name in v.split(',').filter(|_| !v.is_empty()) {
        let n = name.trim();
        let mut bytes = n.bytes();
        let first_ok = bytes.next().is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_');
        let rest_ok = bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
        if !first_ok || !rest_ok || n.len() > 15 {
            return Err(format!(
                "'{name}' is not an interface name: expected up to 15 of a-z A-Z 0-9 _ . - (not first . or -)"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
#[path = "pod_tests.rs"]
mod tests;
