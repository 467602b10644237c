//! Why the engine refused or failed a workload. Every message is one line naming the value at
//! fault and what would be accepted; [`EnrollError::kind`] is what the control API answers.

use std::path::PathBuf;

use redirect_api::{ApiError, ErrorKind};
use redirect_common::MAX_WORKLOADS;

use crate::error::{LoadError, SysError};

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("workload id '{0}' is invalid: expected 1-128 characters of A-Z a-z 0-9 _ - .")]
    BadId(String),
    #[error("--proxy '{0}' is invalid: expected embedded or none")]
    BadProxy(String),
    /// A pod namespace or name Kubernetes would not accept (it would label the metrics).
    #[error(transparent)]
    BadPod(#[from] redirect_api::BadPodRef),
    /// istio-iptables flags that do not parse or cannot work together (clap's or ours).
    #[error("{0}")]
    Flags(String),
    #[error(
        "--fast-path: the fast path is off on this node agent (--fast-path=off, or the default auto on a kernel its \
         probe found unsafe: `redirect-agent check` says why); start it with --fast-path=on to offer it anyway"
    )]
    FastPathOff,
    #[error(
        "{0} is the agent's own network namespace: capturing it would capture the host itself, inbound included \
         (expected a workload's namespace; only `run --host-netns` captures the agent's own, on purpose)"
    )]
    HostNetns(PathBuf),
    #[error(
        "cgroup {cgroup} is not under the agent's attach point {attach}: the programs would never see its processes"
    )]
    CgroupOutside { cgroup: PathBuf, attach: PathBuf },
    #[error(
        "{0} workloads are enrolled, the most this node agent serves (its --max-workloads, at most {MAX_WORKLOADS})"
    )]
    Full(usize),
    #[error(
        "{map} has no room for this workload's {needed} entries (it holds {max} for all workloads together): \
         unenroll workloads, or shorten this one's CIDR or port lists"
    )]
    RulesFull { map: &'static str, needed: usize, max: u32 },
    #[error("workload '{0}' is already enrolled; unenroll it first")]
    IdTaken(String),
    #[error("network namespace {netns} is already enrolled as workload '{id}'")]
    NetnsTaken { netns: PathBuf, id: String },
    #[error("network namespace {netns} is already captured by {by}: one namespace, one agent")]
    CapturedElsewhere { netns: PathBuf, by: String },
    #[error("no workload '{0}' is enrolled")]
    NoSuchId(String),
    #[error("no workload is enrolled for {0}")]
    NoSuchNetns(PathBuf),
    #[error("unenroll needs an id or a network namespace")]
    NoTarget,
    #[error("this agent has handed the node over to a new process; retry (its socket takes over)")]
    HandedOver,
    #[error("this agent is handing the node over to a new process; retry in a moment")]
    HandoverInProgress,
    /// A path that is not what it should be (a namespace, a cgroup directory).
    #[error(transparent)]
    Path(SysError),
    /// Something that should have worked: a map, a listener, a link.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Load(#[from] LoadError),
    /// TPROXY mode's policy routing could not be put in place (undone whole).
    #[error(transparent)]
    TproxyRoute(#[from] crate::tproxy_route::TproxyRouteError),
}

impl EnrollError {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let what = what.into();
        move |source| Self::Io { what, source }
    }

    /// The control API's category: bad input, a clash, a missing workload, a failure.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::BadId(_)
            | Self::BadProxy(_)
            | Self::BadPod(_)
            | Self::Flags(_)
            | Self::FastPathOff
            | Self::HostNetns(_)
            | Self::CgroupOutside { .. }
            | Self::Full(_)
            | Self::RulesFull { .. }
            | Self::NoTarget
            | Self::Path(_) => ErrorKind::Invalid,
            Self::IdTaken(_) | Self::NetnsTaken { .. } | Self::CapturedElsewhere { .. } => ErrorKind::Exists,
            Self::NoSuchId(_) | Self::NoSuchNetns(_) => ErrorKind::NotFound,
            Self::HandedOver | Self::HandoverInProgress => ErrorKind::Unavailable,
            Self::Io { .. } | Self::Load(_) | Self::TproxyRoute(_) => ErrorKind::Internal,
        }
    }
}

impl From<EnrollError> for ApiError {
    fn from(e: EnrollError) -> Self {
        ApiError::new(e.kind(), e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clashes_and_bad_values_are_told_apart() {
        assert_eq!(EnrollError::IdTaken("a".into()).kind(), ErrorKind::Exists);
        assert_eq!(
            EnrollError::HostNetns("/proc/1/ns/net".into()).kind(),
            ErrorKind::Invalid
        );
        assert_eq!(EnrollError::NoSuchId("a".into()).kind(), ErrorKind::NotFound);
        assert_eq!(EnrollError::HandedOver.kind(), ErrorKind::Unavailable);
        let e = ApiError::from(EnrollError::IdTaken("good".into()));
        assert_eq!(e.message, "workload 'good' is already enrolled; unenroll it first");
    }

    #[test]
    fn a_bad_pod_is_refused_as_a_bad_value_before_anything_else() {
        let enroll = |namespace: &str| redirect_api::Enroll {
            id: "a".into(),
            netns: "/run/netns/a".into(),
            cgroup: None,
            proxy: "none".into(),
            args: Vec::new(),
            fast_path: false,
            pod: Some(redirect_api::PodRef::new(namespace, "web")),
        };
        let e = super::super::Request::from_api(enroll("Bad_NS")).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Invalid);
        let message = ApiError::from(e).message;
        assert!(
            message.starts_with("pod namespace 'Bad_NS' is invalid: expected"),
            "{message}"
        );
        let ok = super::super::Request::from_api(enroll("default")).unwrap();
        assert_eq!(ok.pod.map(|p| p.to_string()).as_deref(), Some("default/web"));
    }
}
