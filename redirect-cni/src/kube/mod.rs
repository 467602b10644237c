//! The pod from the Kubernetes API server, as istio-cni reads it on ADD (`getK8sPodInfo` in
//! `cni/pkg/plugin/kubernetes.go`, the retry loop and fail-safe of `doAddRun`; see
//! docs/research/istio-cni.md §1 step 5 and §2).
//!
//! A plain GET of `/api/v1/namespaces/{ns}/pods/{name}` with the server, CA and token of a
//! kubeconfig the agent writes, tried again after a pause while it fails. Each try is bounded in
//! time, so ADD cannot hang on an API server that accepts and never answers. The plugin is a
//! short-lived synchronous process: the async client runs on a current-thread runtime that lives
//! for one call.
//!
//! The module shares its name with the `kube` crate: `::kube` below is always the crate.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    path::PathBuf,
    time::Duration,
};

use ::kube::{
    Api, Client, Config,
    config::{KubeConfigOptions, Kubeconfig, KubeconfigError},
};
use k8s_openapi::api::core::v1::{Container, Namespace, Pod as K8sPod};

use crate::pod::{Pod, ProxyContainer};

/// istio-cni's `ISTIOPROXY`: the one container whose spec it reads.
const ISTIO_PROXY: &str = "istio-proxy";

/// How to reach the API server, and how long to keep trying.
#[derive(Debug, Clone)]
pub struct ApiConf {
    /// A kubeconfig: its current context's server, CA and user (a bearer token, inline or as
    /// `tokenFile`). Read again on every try, so a token the agent rotates meanwhile is used.
    pub kubeconfig: PathBuf,
    /// Tries in all (istio-cni's `podRetrievalMaxRetries`, 30); 0 counts as 1.
    pub tries: u32,
    /// The pause after a failed try (istio-cni's `podRetrievalInterval`, 1 s).
    pub interval: Duration,
    /// The bound on one try: connecting, sending, and the whole answer.
    pub timeout: Duration,
    /// The bound on all tries: no try starts that could end after it. The kubelet gives a
    /// sandbox's creation 2 minutes, and ADD must answer within them; istio-cni has no bound,
    /// so 30 tries at an API server that accepts and never answers would take minutes.
    pub within: Duration,
    /// The agent's own pods: names start with `agent_pod_prefix` in `agent_namespace`. While the
    /// API fails, such a pod is let through so that a replacement agent, which may be what the
    /// API needs, can start. An empty prefix matches no pod.
    pub agent_pod_prefix: String,
    pub agent_namespace: String,
    /// Read the pod's namespace too, for its labels (ambient mode's
    /// `istio.io/dataplane-mode`), as istio-cni's `isAmbientPod` does.
    pub namespace_labels: bool,
}

impl ApiConf {
    /// istio-cni's tries and interval, a 5 s bound per try, and the DaemonSet's pods
    /// (`redirect-agent-*` in `kube-system`, deploy/daemonset.yaml).
    pub fn new(kubeconfig: impl Into<PathBuf>) -> Self {
        Self {
            kubeconfig: kubeconfig.into(),
            tries: 30,
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(5),
            within: Duration::from_secs(60),
            agent_pod_prefix: "redirect-agent-".into(),
            agent_namespace: "kube-system".into(),
            namespace_labels: false,
        }
    }
}

/// Why no pod came back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FetchError {
    /// A try failed and the pod is the agent's own: the caller lets it through unenrolled
    /// (istio-cni's fail-safe). The error of that try.
    AgentPod(String),
    /// Every try failed: the last error, with the number of tries.
    Failed(String),
}

impl fmt::Display for FetchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::AgentPod(e) => write!(f, "{e}; the pod looks like the agent's own, let through"),
            Self::Failed(e) => f.write_str(e),
        }
    }
}

impl std::error::Error for FetchError {}

/// Reads pod `namespace/name` from the API server, trying `api.tries` times, and returns it as
/// istio-cni sees it.
pub fn fetch_pod(api: &ApiConf, namespace: &str, name: &str) -> Result<Pod, FetchError> {
    if namespace.is_empty() || name.is_empty() {
        return Err(FetchError::Failed(format!(
            "pod '{namespace}/{name}': a namespace and a name are needed"
        )));
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| FetchError::Failed(format!("cannot start the async runtime: {e}")))?;
    let agent =
        !api.agent_pod_prefix.is_empty() && name.starts_with(&api.agent_pod_prefix) && namespace == api.agent_namespace;
    let tries = api.tries.max(1);
    let deadline = std::time::Instant::now() + api.within;
    let mut last = String::new();
    let mut n = 0;
    while n < tries {
        n += 1;
        match runtime.block_on(get(api, namespace, name)) {
            Ok((pod, labels)) => {
                let mut pod = from_k8s(pod, namespace);
                pod.namespace_labels = labels;
                return Ok(pod);
            }
            Err(e) => last = format!("pod {namespace}/{name}: {e}"),
        }
        if agent {
            return Err(FetchError::AgentPod(last));
        }
        if n < tries {
            if std::time::Instant::now() + api.interval + api.timeout > deadline {
                break;
            }
            std::thread::sleep(api.interval);
        }
    }
    let plural = if n == 1 { "try" } else { "tries" };
    Err(FetchError::Failed(format!("{last} ({n} {plural})")))
}

/// One try: the kubeconfig, a client for it, the pod's GET and, if asked, its namespace's.
/// The error names what failed. A namespace that cannot be read fails the try, where
/// istio-cni would go on to its sidecar checks: an ambient pod would start uncaptured.
async fn get(api: &ApiConf, namespace: &str, name: &str) -> Result<(K8sPod, BTreeMap<String, String>), String> {
    let path = api.kubeconfig.display();
    let bad_kubeconfig = |e: KubeconfigError| match e {
        // Its message repeats the path, quoted twice.
        KubeconfigError::ReadConfig(io, _) => format!("kubeconfig {path}: {io}"),
        other => format!("kubeconfig {path}: {}", chain(&other)),
    };
    let kubeconfig = Kubeconfig::read_from(&api.kubeconfig).map_err(bad_kubeconfig)?;
    let (client, server) = client(kubeconfig, api.timeout).await.map_err(|e| match e {
        ClientError::Kubeconfig(e) => bad_kubeconfig(e),
        ClientError::Client(e) => e,
    })?;
    // Connecting, TLS, the token, the request and the whole answer: one bound, whatever the
    // client's own timeouts cover.
    let pods = Api::<K8sPod>::namespaced(client.clone(), namespace);
    let pod = match tokio::time::timeout(api.timeout, pods.get(name)).await {
        Ok(Ok(pod)) => pod,
        Ok(Err(e)) => return Err(format!("GET from {server}: {}", describe(&e))),
        Err(_) => return Err(format!("GET from {server}: no answer within {:?}", api.timeout)),
    };
    if !api.namespace_labels {
        return Ok((pod, BTreeMap::new()));
    }
    let namespaces = Api::<Namespace>::all(client);
    match tokio::time::timeout(api.timeout, namespaces.get(namespace)).await {
        Ok(Ok(ns)) => Ok((pod, ns.metadata.labels.unwrap_or_default())),
        Ok(Err(e)) => Err(format!("GET namespace {namespace} from {server}: {}", describe(&e))),
        Err(_) => Err(format!(
            "GET namespace {namespace} from {server}: no answer within {:?}",
            api.timeout
        )),
    }
}

enum ClientError {
    Kubeconfig(KubeconfigError),
    /// Building the client failed; the message names the server.
    Client(String),
}

/// A client for `kubeconfig` whose every request is one try bounded by `timeout`, and the
/// server it talks to (for messages).
async fn client(kubeconfig: Kubeconfig, timeout: Duration) -> Result<(Client, String), ClientError> {
    // Local work only (files, no request): the callers bound what the network can stall.
    let mut config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(ClientError::Kubeconfig)?;
    let server = config.cluster_url.to_string();
    config.connect_timeout = Some(timeout);
    config.read_timeout = Some(timeout);
    config.write_timeout = Some(timeout);
    // Each try is one request: the pause between tries is ours, istio-cni's.
    config.default_retry = false;
    // TLS through rustls wants one process-wide crypto provider; this crate enables ring only,
    // but should another dependency enable a second one, rustls would have to guess (and panic).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client =
        Client::try_from(config).map_err(|e| ClientError::Client(format!("client for {server}: {}", chain(&e))))?;
    Ok((client, server))
}

/// A client error in one line: the HTTP status and the server's message where there is one,
/// else what failed underneath (connecting, TLS, a malformed answer).
fn describe(e: &::kube::Error) -> String {
    match e {
        ::kube::Error::Api(status) => {
            let message = if status.message.is_empty() {
                status.reason.as_str()
            } else {
                status.message.as_str()
            };
            one_line(&format!("HTTP {}: {message}", status.code))
        }
        other => chain(other),
    }
}

/// An error and its sources, each once: the client's errors often say only "client error" and
/// leave the cause (refused, reset, a bad certificate) to their sources.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    one_line(&out)
}

/// CNI's `msg` and the kubelet's event are one line; a server's answer may not be.
fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// What istio-cni's node agent writes on a pod once ztunnel's node agent has it
/// (`ambient.istio.io/redirection: enabled`): istiod then tells other workloads to reach the
/// pod over HBONE, and tools read it as "captured".
pub const AMBIENT_REDIRECTION: &str = "ambient.istio.io/redirection";

/// Marks pod `namespace/name` as enrolled in ambient mode: a merge patch of its
/// [`AMBIENT_REDIRECTION`] annotation through `pods/status` (the lower privilege, as istio-cni
/// patches it). One try, bounded by `api.timeout`; the error names what failed.
pub fn annotate_ambient(api: &ApiConf, namespace: &str, name: &str) -> Result<(), String> {
    use ::kube::api::{Patch, PatchParams};
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    runtime.block_on(async {
        let path = api.kubeconfig.display();
        let kubeconfig =
            Kubeconfig::read_from(&api.kubeconfig).map_err(|e| format!("kubeconfig {path}: {}", chain(&e)))?;
        let (client, server) = client(kubeconfig, api.timeout).await.map_err(|e| match e {
            ClientError::Kubeconfig(e) => format!("kubeconfig {path}: {}", chain(&e)),
            ClientError::Client(e) => e,
        })?;
        let pods = Api::<K8sPod>::namespaced(client, namespace);
        let patch = serde_json::json!({ "metadata": { "annotations": { AMBIENT_REDIRECTION: "enabled" } } });
        match tokio::time::timeout(
            api.timeout,
            pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch)),
        )
        .await
        {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!(
                "PATCH pod {namespace}/{name} status at {server}: {}",
                describe(&e)
            )),
            Err(_) => Err(format!(
                "PATCH pod {namespace}/{name} status at {server}: no answer within {:?}",
                api.timeout
            )),
        }
    })
}

/// What the API server says of a DaemonSet (`install --uninstall-if-removed`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DaemonSetState {
    /// There, not being deleted: its uid.
    Present(String),
    /// Marked for deletion (foreground deletion keeps it while its pods stop).
    Deleting,
    /// 404: deleted (background deletion removes it before its pods stop).
    Gone,
    /// 401 or 403: the service account or its role is gone, which `kubectl delete -k` does
    /// in the same breath as the DaemonSet.
    Revoked(u16),
}

/// One GET of DaemonSet `namespace/name` with the kubeconfig `kubeconfig` (its text), bounded
/// by `timeout`. An error is everything that is not an answer about the DaemonSet.
pub fn daemonset_state(
    kubeconfig: &str,
    namespace: &str,
    name: &str,
    timeout: Duration,
) -> Result<DaemonSetState, String> {
    use k8s_openapi::api::apps::v1::DaemonSet;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    runtime.block_on(async {
        let kubeconfig = Kubeconfig::from_yaml(kubeconfig).map_err(|e| format!("kubeconfig: {}", chain(&e)))?;
        let (client, server) = client(kubeconfig, timeout).await.map_err(|e| match e {
            ClientError::Kubeconfig(e) => format!("kubeconfig: {}", chain(&e)),
            ClientError::Client(e) => e,
        })?;
        let daemonsets = Api::<DaemonSet>::namespaced(client, namespace);
        match tokio::time::timeout(timeout, daemonsets.get_opt(name)).await {
            Ok(Ok(None)) => Ok(DaemonSetState::Gone),
            Ok(Ok(Some(ds))) if ds.metadata.deletion_timestamp.is_some() => Ok(DaemonSetState::Deleting),
            Ok(Ok(Some(ds))) => Ok(DaemonSetState::Present(ds.metadata.uid.unwrap_or_default())),
            Ok(Err(::kube::Error::Api(s))) if s.code == 401 || s.code == 403 => Ok(DaemonSetState::Revoked(s.code)),
            Ok(Err(e)) => Err(format!(
                "GET daemonset {namespace}/{name} from {server}: {}",
                describe(&e)
            )),
            Err(_) => Err(format!(
                "GET daemonset {namespace}/{name} from {server}: no answer within {timeout:?}"
            )),
        }
    })
}

/// What `getK8sPodInfo` keeps of the pod.
fn from_k8s(pod: K8sPod, namespace: &str) -> Pod {
    let meta = pod.metadata;
    let spec = pod.spec.unwrap_or_default();
    // Init containers first, as istio-cni lists them: a native sidecar (Kubernetes 1.28+) is an
    // init container with `restartPolicy: Always`, and `istio-init` is one too.
    let all: Vec<Container> = spec
        .init_containers
        .unwrap_or_default()
        .into_iter()
        .chain(spec.containers)
        .collect();
    let containers: BTreeSet<String> = all.iter().map(|c| c.name.clone()).collect();
    let proxy = all.into_iter().find(|c| c.name == ISTIO_PROXY).map(proxy_of);
    Pod {
        namespace: Some(meta.namespace.unwrap_or_else(|| namespace.to_owned())),
        labels: meta.labels.unwrap_or_default(),
        annotations: meta.annotations.unwrap_or_default(),
        containers,
        proxy,
        namespace_labels: BTreeMap::new(),
        host_network: spec.host_network.unwrap_or(false),
        uid: meta.uid,
        service_account: spec.service_account_name.filter(|a| !a.is_empty()),
    }
}

/// The `istio-proxy` container's env, type, uid and gid.
fn proxy_of(c: Container) -> ProxyContainer {
    // Literal values only: istio-cni reads `e.Value`, which is empty for `valueFrom`.
    let env: BTreeMap<String, String> = c
        .env
        .unwrap_or_default()
        .into_iter()
        .map(|e| (e.name, e.value.unwrap_or_default()))
        .collect();
    let args = c.args.unwrap_or_default();
    // Go's empty ProxyType is "no type", which the decision reads as a sidecar: an empty
    // `args[1]` is None here, not Some("").
    let proxy_type = match args.as_slice() {
        [first, kind, ..] if first == "proxy" && !kind.is_empty() => Some(kind.clone()),
        _ => None,
    };
    // The container's own securityContext only: istio-cni does not consult the pod's.
    let security = c.security_context.unwrap_or_default();
    ProxyContainer {
        env,
        proxy_type,
        run_as_user: security.run_as_user,
        run_as_group: security.run_as_group,
    }
}

#[cfg(test)]
mod tests;
