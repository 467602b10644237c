//! Which pods are ambient, and their in-pod capture's settings: istio-cni's decision for a pod
//! without a sidecar (`PodRedirectionEnabled` in `cni/pkg/util/podutil.go`, with the default
//! enablement selectors of its chart) and the pod-level overrides its node agent reads
//! (`getPodLevelTrafficOverrides`), turned into `redirect-agent`'s `--mode ambient` flags.
//!
//! Both labels are read from the API server: the runtime passes annotations, not labels, and a
//! namespace's labels only the API server has. So ambient pods are selected only with a
//! kubeconfig.

use crate::pod::{Pod, parse_bool};

/// The label that puts a pod, or every pod of a namespace, in ambient mode; `none` on a pod
/// opts it out of its namespace's.
pub const DATAPLANE_MODE: &str = "istio.io/dataplane-mode";
const BYPASS_INBOUND: &str = "ambient.istio.io/bypass-inbound-capture";
const DNS_CAPTURE: &str = "ambient.istio.io/dns-capture";
const VIRTUAL_INTERFACES: &str = "istio.io/reroute-virtual-interfaces";

/// The plugin configuration's part: ambient mode on, and what an ambient pod gets by default.
#[derive(Debug, Clone)]
pub struct AmbientSelection {
    /// `none` (ztunnel serves the pod's capture ports, handed the pod over ZDS) or `embedded`
    /// (the agent's proxy plays ztunnel's part); a pod's `redirect.dev/proxy` overrides it.
    pub proxy: String,
    /// istio-cni's `AMBIENT_DNS_CAPTURE`: DNS to port 53 goes to 15053 unless the pod says
    /// otherwise.
    pub dns_capture: bool,
}

/// Whether istio-cni would redirect `pod` to ztunnel: the label `ambient` on the pod, or on its
/// namespace without `none` on the pod; never a pod with a sidecar (the injector's status
/// annotation) or on the host's network (its rules would be the node's).
pub fn selected(pod: &Pod) -> bool {
    let label = pod.labels.get(DATAPLANE_MODE).map(String::as_str);
    let namespace = pod.namespace_labels.get(DATAPLANE_MODE).map(String::as_str);
    (label == Some("ambient") || (namespace == Some("ambient") && label != Some("none")))
        && !pod.annotations.contains_key("sidecar.istio.io/status")
        && !pod.host_network
}

/// The pod's `--mode ambient` flags. A boolean annotation that is not one of Go's booleans is
/// refused, where istio-cni logs it and goes on with the default: a pod's capture is not
/// decided on a value nobody can read.
pub fn flags(sel: &AmbientSelection, pod: &Pod) -> Result<Vec<String>, String> {
    let boolean = |name: &str| -> Result<Option<bool>, String> {
        pod.annotations
            .get(name)
            .map(|v| {
                parse_bool(v).ok_or_else(|| {
                    format!("annotation {name}: '{v}': expected a boolean (true, false, 1, 0, t, f, True, False, TRUE, FALSE)")
                })
            })
            .transpose()
    };
    let mut out = vec!["--mode".to_owned(), "ambient".to_owned()];
    if boolean(DNS_CAPTURE)?.unwrap_or(sel.dns_capture) {
        out.push("--redirect-dns".into());
    }
    if boolean(BYPASS_INBOUND)? == Some(true) {
        out.push("--bypass-inbound-capture".into());
    }
    if let Some(v) = pod.annotations.get(VIRTUAL_INTERFACES) {
        // istio-cni's reading: split on commas, trimmed, empty parts dropped.
        let names: Vec<&str> = v.split(',').map(str::trim).filter(|n| !n.is_empty()).collect();
        if !names.is_empty() {
            let list = names.join(",");
            crate::pod::interface_names(&list).map_err(|e| format!("annotation {VIRTUAL_INTERFACES}: '{v}': {e}"))?;
            out.extend(["-k".into(), list]);
        }
    }
    Ok(out)
}
