//! The node agent's control API: one JSON request per connection on a Unix socket, one JSON
//! answer, newline-terminated. Small enough to speak with `socat`, and shared by the agent's
//! own `enroll`/`unenroll`/`list` commands and by `redirect-cni`, which must not link aya.
//!
//! The socket is created mode 0600 by a root agent: the API is as privileged as the agent.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

/// Where `redirect-agent node --name NAME` listens unless told otherwise.
pub fn default_socket(name: &str) -> PathBuf {
    Path::new("/run/redirect").join(format!("{name}.sock"))
}

/// Longest request or answer accepted, so that a confused client cannot make the agent buffer
/// without bound.
pub const MAX_MESSAGE: u64 = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Enroll(Enroll),
    /// By id, or by the namespace (whichever is given; the id wins).
    Unenroll {
        #[serde(default)]
        id: Option<String>,
        #[serde(default)]
        netns: Option<PathBuf>,
    },
    List,
    /// From a new agent process: take over the listeners and the workloads (see the agent's
    /// `node` module). The answer carries descriptors, so only the agent itself sends this.
    Handover,
}

/// One workload to capture: its network namespace, and istio-iptables' flags for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enroll {
    /// A name unique on the node: the CNI container id, or any name for manual use.
    pub id: String,
    /// `/run/netns/NAME`, `/var/run/netns/cni-…` or `/proc/PID/ns/net`.
    pub netns: PathBuf,
    /// Optional: only this cgroup's processes (and its descendants') are captured outbound,
    /// as with `run --cgroup`; it must be a cgroup v2 directory under the agent's attach
    /// point. Without it, every process of the namespace is (a pod's containers share one).
    #[serde(default)]
    pub cgroup: Option<PathBuf>,
    /// `embedded` (the agent's proxy listens on the capture ports) or `none` (the workload's
    /// own proxy does).
    #[serde(default = "default_proxy")]
    pub proxy: String,
    /// istio-iptables flags (`-p 15001 -b '*' …`), parsed by the agent exactly as `run` parses
    /// them; unspecified flags take the sidecar injection's defaults.
    #[serde(default)]
    pub args: Vec<String>,
    /// Hand bytes between the workload's local pairs with sk_msg (the node agent must run
    /// with `--fast-path`).
    #[serde(default)]
    pub fast_path: bool,
    /// The Kubernetes pod the namespace belongs to (the CNI plugin knows it from CNI_ARGS), so
    /// that metrics and `list` can name it instead of the container id alone. Optional and
    /// left out when absent: clients that predate it (and manual enrolls) send none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodRef>,
}

/// A Kubernetes pod, by namespace and name, and what ztunnel keys it by.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    /// The pod's `metadata.uid` (the CNI's `K8S_POD_UID`): the key ZDS names the pod by, so an
    /// ambient pod is handed to ztunnel only with it. Left out when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    /// `spec.serviceAccountName`, which ztunnel's `WorkloadInfo` carries. Left out when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
}

/// A [`PodRef`] part that Kubernetes would not accept as a namespace or pod name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("pod {part} '{value}' is invalid: expected {expected}")]
pub struct BadPodRef {
    /// `namespace` or `name`.
    pub part: &'static str,
    pub value: String,
    pub expected: &'static str,
}

impl PodRef {
    /// A pod by namespace and name, with no uid or service account.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
            uid: None,
            service_account: None,
        }
    }

    /// Checks each part as the API server would: the namespace is an RFC 1123 label, the
    /// name and the service account DNS subdomains, the uid a UUID's characters. Label values
    /// built from anything else could not be joined with the pods Kubernetes reports, so they
    /// are refused rather than published.
    pub fn check(&self) -> Result<(), BadPodRef> {
        let bad = |part, value: &str, expected| BadPodRef {
            part,
            value: value.to_owned(),
            expected,
        };
        if !rfc1123_label(&self.namespace) {
            return Err(bad(
                "namespace",
                &self.namespace,
                "an RFC 1123 label, 1-63 characters of a-z 0-9 - starting and ending with a letter or digit",
            ));
        }
        if !dns_subdomain(&self.name) {
            return Err(bad(
                "name",
                &self.name,
                "a DNS subdomain, 1-253 characters of a-z 0-9 - . starting and ending with a letter or digit",
            ));
        }
        if let Some(uid) = &self.uid
            && !((1..=128).contains(&uid.len()) && uid.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
        {
            return Err(bad("uid", uid, "a Kubernetes uid, 1-128 characters of a-z A-Z 0-9 -"));
        }
        if let Some(account) = &self.service_account
            && !dns_subdomain(account)
        {
            return Err(bad(
                "service account",
                account,
                "a DNS subdomain, 1-253 characters of a-z 0-9 - . starting and ending with a letter or digit",
            ));
        }
        Ok(())
    }
}

/// `NAMESPACE/NAME`, as kubectl writes a pod.
impl std::fmt::Display for PodRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

fn alnum_ends(s: &str) -> bool {
    let ok = |b: Option<&u8>| b.is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    ok(s.as_bytes().first()) && ok(s.as_bytes().last())
}

/// A Kubernetes namespace name: an RFC 1123 label.
pub fn rfc1123_label(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && alnum_ends(s)
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// A Kubernetes object name (a pod's, a DaemonSet's): a DNS subdomain. Kubernetes'
/// IsDNS1123Subdomain checks the characters and the ends only (not each dot-separated label),
/// and so does this.
pub fn dns_subdomain(s: &str) -> bool {
    (1..=253).contains(&s.len())
        && alnum_ends(s)
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'.'))
}

/// The proxy a workload gets when nobody says: the agent's embedded one.
pub fn default_proxy() -> String {
    "embedded".into()
}

/// A workload as the agent holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadInfo {
    pub id: String,
    pub netns: PathBuf,
    pub netns_cookie: u64,
    pub cgroup: Option<PathBuf>,
    pub proxy: String,
    pub args: Vec<String>,
    #[serde(default)]
    pub fast_path: bool,
    /// Its place among the programs' workloads: its block of event counters.
    pub slot: u32,
    /// The namespace's addresses (both families) the programs know.
    pub addresses: Vec<String>,
    /// Its interface list (`-c`'s, then `-k`'s entries), which its rules name by number.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<String>,
    /// Its pod, if the enroll named one. Optional both ways: the state file of an agent that
    /// predates it, and a predecessor's handover, have none; an older successor reading ours
    /// ignores it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodRef>,
}

/// An answer. One is made per request and sent at once, so the size of its largest variant
/// costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Response {
    Enrolled(WorkloadInfo),
    Unenrolled {
        id: String,
    },
    Workloads(Vec<WorkloadInfo>),
    /// Followed, on the same connection, by the descriptors of [`HandoverWorkload::fds`].
    Handover(Vec<HandoverWorkload>),
    Error(ApiError),
}

/// A workload passed to a new agent process, with the names of the descriptors sent after it
/// (in this order, in one SCM_RIGHTS message per workload).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandoverWorkload {
    pub info: WorkloadInfo,
    pub fds: Vec<String>,
}

/// What went wrong, in one line, and whether anything could have changed (never, by design:
/// a refused request leaves the node as it was).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// A value in the request (flag, path, namespace) cannot be used.
    Invalid,
    /// The workload (id or namespace) is already enrolled.
    Exists,
    /// No such workload.
    NotFound,
    /// The agent failed doing something that should have worked (a map, a listener).
    Internal,
    /// The agent cannot take requests now (it is handing over to a new process): retry.
    Unavailable,
}

impl ApiError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot reach the node agent at {socket}: {source} (is `redirect-agent node` running? its --socket must match)"
    )]
    Connect { socket: PathBuf, source: std::io::Error },
    #[error("talking to the node agent at {socket}: {source}")]
    Io { socket: PathBuf, source: std::io::Error },
    #[error("the node agent at {socket} answered something unreadable: {source}")]
    Decode { socket: PathBuf, source: serde_json::Error },
    #[error(transparent)]
    Refused(#[from] ApiError),
}

/// Sends one request and reads its answer; an [`Response::Error`] comes back as
/// [`ClientError::Refused`].
pub fn call(socket: &Path, request: &Request, timeout: Duration) -> Result<Response, ClientError> {
    let io = |source| ClientError::Io {
        socket: socket.to_owned(),
        source,
    };
    let stream = UnixStream::connect(socket).map_err(|source| ClientError::Connect {
        socket: socket.to_owned(),
        source,
    })?;
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    let mut line = serde_json::to_vec(request).map_err(|source| ClientError::Decode {
        socket: socket.to_owned(),
        source,
    })?;
    line.push(b'\n');
    (&stream).write_all(&line).map_err(io)?;
    let answer = read_line(&stream).map_err(io)?;
    match serde_json::from_slice(&answer).map_err(|source| ClientError::Decode {
        socket: socket.to_owned(),
        source,
    })? {
        Response::Error(e) => Err(ClientError::Refused(e)),
        ok => Ok(ok),
    }
}

/// One newline-terminated message, at most [`MAX_MESSAGE`] bytes.
pub fn read_line(stream: &UnixStream) -> std::io::Result<Vec<u8>> {
    use std::io::Read as _;
    let mut line = Vec::new();
    BufReader::new(stream.take(MAX_MESSAGE)).read_until(b'\n', &mut line)?;
    if line.last() != Some(&b'\n') {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "message ended early or exceeded 1 MiB",
        ));
    }
    line.pop();
    Ok(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_tagged_json_with_defaults() {
        let r: Request = serde_json::from_str(r#"{"op":"enroll","id":"a","netns":"/run/netns/a"}"#).unwrap();
        let Request::Enroll(e) = r else { panic!("{r:?}") };
        assert_eq!((e.proxy.as_str(), e.args.len(), e.cgroup), ("embedded", 0, None));
        let text = serde_json::to_string(&Request::Unenroll {
            id: Some("a".into()),
            netns: None,
        })
        .unwrap();
        assert_eq!(text, r#"{"op":"unenroll","id":"a","netns":null}"#);
        let e = Response::Error(ApiError::new(ErrorKind::Exists, "x"));
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"error":{"kind":"exists","message":"x"}}"#
        );
    }

    #[test]
    fn the_pod_is_optional_both_ways() {
        let mut e = Enroll {
            id: "a".into(),
            netns: "/run/netns/a".into(),
            cgroup: None,
            proxy: default_proxy(),
            args: Vec::new(),
            fast_path: false,
            pod: None,
        };
        // Without one, the message is what an older agent reads.
        let text = serde_json::to_string(&e).unwrap();
        assert!(!text.contains("pod"), "{text}");
        e.pod = Some(PodRef::new("default", "web-0"));
        let text = serde_json::to_string(&e).unwrap();
        assert!(
            text.ends_with(r#","pod":{"namespace":"default","name":"web-0"}}"#),
            "{text}"
        );
        assert_eq!(serde_json::from_str::<Enroll>(&text).unwrap(), e);
        // An older agent's state file (or handover) names no pod.
        let old = r#"{"id":"a","netns":"/n","netns_cookie":1,"cgroup":null,"proxy":"none","args":[],"slot":0,"addresses":[]}"#;
        assert_eq!(serde_json::from_str::<WorkloadInfo>(old).unwrap().pod, None);
    }

    #[test]
    fn pod_names_are_checked_as_kubernetes_does() {
        let pod = |namespace: &str, name: &str| PodRef::new(namespace, name);
        for good in [
            pod("default", "web"),
            pod("a", "b"),
            pod("kube-system", "coredns-5d78c9869d-x.y"),
        ] {
            assert_eq!(good.check(), Ok(()), "{good}");
        }
        let long = "x".repeat(64);
        for bad_ns in ["", "-a", "a-", "A", "a.b", "a_b", long.as_str()] {
            assert_eq!(pod(bad_ns, "web").check().unwrap_err().part, "namespace", "{bad_ns:?}");
        }
        let long = "x".repeat(254);
        for bad_name in ["", ".a", "a-", "Web", "a/b", "a b", long.as_str()] {
            assert_eq!(
                pod("default", bad_name).check().unwrap_err().part,
                "name",
                "{bad_name:?}"
            );
        }
        assert!(pod("default", &"x".repeat(253)).check().is_ok());
        let e = pod("Default", "web").check().unwrap_err().to_string();
        assert!(
            e.starts_with("pod namespace 'Default' is invalid: expected an RFC 1123 label"),
            "{e}"
        );
        assert_eq!(pod("default", "web").to_string(), "default/web");
        let with = |uid: &str, account: &str| PodRef {
            uid: Some(uid.into()),
            service_account: Some(account.into()),
            ..pod("default", "web")
        };
        assert_eq!(
            with("0d4b3c6e-9f2a-4a51-8f0e-3c1d2b4a5e6f", "bookinfo-reviews").check(),
            Ok(())
        );
        assert_eq!(with("", "default").check().unwrap_err().part, "uid");
        assert_eq!(with("a/b", "default").check().unwrap_err().part, "uid");
        assert_eq!(with(&"a".repeat(129), "default").check().unwrap_err().part, "uid");
        assert_eq!(with("abc", "Default").check().unwrap_err().part, "service account");
        // An older agent reads a pod with both (it ignores them); a newer reads an older's.
        let text = serde_json::to_string(&with("u-1", "sa")).unwrap();
        assert_eq!(
            text,
            r#"{"namespace":"default","name":"web","uid":"u-1","service_account":"sa"}"#
        );
    }
}
