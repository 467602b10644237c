//! The node agent's side of ZDS, the protocol istio-cni's node agent speaks to ztunnel.
//!
//! The agent listens on a Unix SOCK_SEQPACKET socket (Istio's default
//! [`DEFAULT_SOCKET`]); ztunnel connects. Every datagram holds one protobuf message
//! ([`proto`]), with no length prefix, of at most [`MAX_MESSAGE`] bytes (ztunnel's buffer).
//! On each connection:
//!
//! 1. ztunnel sends `ZdsHello { version: V1 }`; any other hello closes the connection.
//! 2. The agent sends its snapshot: an `AddWorkload` per known pod, with the pod's network
//!    namespace as one SCM_RIGHTS descriptor, then `SnapshotSent`. ztunnel acks each one
//!    (`WorkloadResponse { ack }`) before the next goes.
//! 3. Then a pod added is an `AddWorkload` to the newest connection, and a pod removed a
//!    `DelWorkload` to every connection, each acked.
//!
//! Only `AddWorkload` carries a descriptor. An ack whose `error` is not empty is a NACK: the
//! request failed, and the connection stays open (ztunnel's answer to a proxy it could not
//! start). Every exchange (request and ack) must end within [`DEFAULT_TIMEOUT`] (Istio's
//! deadline); one that does not, or an I/O error, or an answer that is no ack, closes that
//! connection, whose ztunnel then reconnects and receives a fresh snapshot.
//!
//! [`ZdsServer`] is the whole of it: it keeps the pods for later snapshots, serves each
//! connection on its own task, and stops when dropped.

mod conn;
pub mod proto;
mod server;
#[cfg(test)]
mod tests;

use std::{io, os::fd::OwnedFd, path::PathBuf, time::Duration};

pub use server::ZdsServer;

/// Where istio-cni's node agent listens, and where ztunnel connects by default.
pub const DEFAULT_SOCKET: &str = "/var/run/ztunnel/ztunnel.sock";

/// How long one exchange (a request and its ack, or the hello) may take: Istio's deadline.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// The largest message ztunnel reads (its receive buffer); larger ones it rejects as truncated.
pub const MAX_MESSAGE: usize = 1024;

/// A pod ztunnel should serve.
#[derive(Debug)]
pub struct ZdsPod {
    /// The pod's Kubernetes uid: the key of every message about it.
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    /// The pod's network namespace (`/proc/PID/ns/net`, `/run/netns/NAME`), sent to ztunnel
    /// with each `AddWorkload` and held while the pod is known.
    pub netns: OwnedFd,
}

impl ZdsPod {
    /// Whether ztunnel could take the pod: a uid, and an `AddWorkload` that fits its buffer.
    pub fn check(&self) -> Result<(), ZdsError> {
        let invalid = |detail: String| ZdsError::InvalidPod {
            uid: self.uid.clone(),
            detail,
        };
        if self.uid.is_empty() {
            return Err(invalid("empty uid (expected the pod's Kubernetes uid)".into()));
        }
        let size = prost::Message::encoded_len(&self.request());
        if size > MAX_MESSAGE {
            return Err(invalid(format!(
                "its AddWorkload is {size} bytes (expected at most ztunnel's {MAX_MESSAGE})"
            )));
        }
        Ok(())
    }

    /// The pod's `AddWorkload` (its descriptor travels beside it).
    fn request(&self) -> proto::WorkloadRequest {
        proto::WorkloadRequest::add(
            &self.uid,
            proto::WorkloadInfo {
                name: self.name.clone(),
                namespace: self.namespace.clone(),
                service_account: self.service_account.clone(),
                windows_namespace: None,
            },
        )
    }
}

/// What went wrong serving ztunnel; every message names the value and what was expected.
/// `what` names the request, e.g. "AddWorkload for pod 1234-…".
#[derive(Debug, thiserror::Error)]
pub enum ZdsError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("ZDS socket {0} is in use: a server listens on it (expected none, or a stale socket file)")]
    InUse(PathBuf),
    #[error("ZDS socket {0} exists and is not a socket (expected a socket file or nothing)")]
    NotSocket(PathBuf),
    #[error("pod {uid:?}: {detail}")]
    InvalidPod { uid: String, detail: String },
    #[error("ztunnel refused {what}: {error}")]
    Nack { what: String, error: String },
    #[error("ztunnel did not ack {what} within {}", seconds(*.timeout))]
    Timeout { what: String, timeout: Duration },
    #[error("the ztunnel connection closed before it acked {what}")]
    Closed { what: String },
    #[error("sending {what} to ztunnel: {source}")]
    Send {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("ztunnel answered {what} with {got} (expected a WorkloadResponse holding an Ack)")]
    Protocol { what: String, got: String },
    #[error("ztunnel's hello: {got} (expected ZdsHello with version V1)")]
    Hello { got: String },
}

impl ZdsError {
    /// Whether ztunnel answered with an error: the request failed, the connection is fine.
    pub fn is_nack(&self) -> bool {
        matches!(self, Self::Nack { .. })
    }
}

/// "5 s", or "200 ms" for a timeout that is no whole number of seconds.
fn seconds(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{} ms", d.as_millis())
    }
}
