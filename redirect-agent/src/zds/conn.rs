//! One ztunnel connection: its datagrams, its exchanges, and the task that serves it.

use std::{
    io,
    os::fd::{AsFd as _, BorrowedFd, OwnedFd},
    sync::Arc,
    time::Duration,
};

use prost::Message as _;
use rustix::net::RecvFlags;
use tokio::{
    io::{Interest, unix::AsyncFd},
    sync::{mpsc, oneshot, watch},
};

use super::{
    MAX_MESSAGE, ZdsError, ZdsPod,
    proto::{self, WorkloadRequest, WorkloadResponse, workload_response},
    server::Shared,
};

/// A request the server hands a connection's task, and where its outcome goes.
pub(super) struct Job {
    pub(super) what: Outgoing,
    pub(super) reply: oneshot::Sender<Result<(), ZdsError>>,
}

/// What the agent sends. Only a pod's `AddWorkload` carries a descriptor, and it is the one
/// variant that has one to carry.
pub(super) enum Outgoing {
    Add(Arc<ZdsPod>),
    Del(String),
    SnapshotSent,
}

impl Outgoing {
    fn request(&self) -> WorkloadRequest {
        match self {
            Self::Add(pod) => pod.request(),
            Self::Del(uid) => WorkloadRequest::del(uid),
            Self::SnapshotSent => WorkloadRequest::snapshot_sent(),
        }
    }

    fn descriptor(&self) -> Option<BorrowedFd<'_>> {
        match self {
            Self::Add(pod) => Some(pod.netns.as_fd()),
            Self::Del(_) | Self::SnapshotSent => None,
        }
    }

    /// For logs and errors: "AddWorkload for pod UID".
    pub(super) fn describe(&self) -> String {
        match self {
            Self::Add(pod) => format!("AddWorkload for pod {}", pod.uid),
            Self::Del(uid) => format!("DelWorkload for pod {uid}"),
            Self::SnapshotSent => "SnapshotSent".into(),
        }
    }
}

/// A connected ztunnel's socket (non-blocking, in the runtime's reactor).
struct Conn {
    socket: AsyncFd<OwnedFd>,
    timeout: Duration,
}

impl Conn {
    /// Sends one datagram, with `fd` as its one SCM_RIGHTS descriptor if there is one.
    async fn send(&self, bytes: &[u8], fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
        let fds = fd.as_slice();
        let sent = self
            .socket
            .async_io(Interest::WRITABLE, |s| crate::sys::send_with_fds(s, bytes, fds))
            .await?;
        if sent != bytes.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("{sent} of {} bytes sent", bytes.len()),
            ));
        }
        Ok(())
    }

    /// Receives one datagram; `None` when ztunnel closed the connection (or sent an empty
    /// datagram, which no message of its is). One longer than [`MAX_MESSAGE`] is an error, as
    /// ztunnel takes one for its own buffer. Cancel-safe: nothing is read until a datagram is.
    async fn recv(&self) -> io::Result<Option<Vec<u8>>> {
        let mut buf = [0u8; MAX_MESSAGE];
        let (got, len) = self
            .socket
            .async_io(Interest::READABLE, |s| {
                // TRUNC: the datagram's whole length, even past the buffer.
                rustix::net::recv(s, &mut buf, RecvFlags::TRUNC).map_err(io::Error::from)
            })
            .await?;
        if len == 0 {
            return Ok(None);
        }
        if len > got {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("a {len}-byte message (expected at most {MAX_MESSAGE})"),
            ));
        }
        Ok(Some(buf[..got].to_vec()))
    }

    /// Sends `out` and waits for its ack, within the timeout.
    async fn exchange(&self, out: &Outgoing) -> Result<(), ZdsError> {
        let what = || out.describe();
        let bytes = out.request().encode_to_vec();
        let answer = tokio::time::timeout(self.timeout, async {
            self.send(&bytes, out.descriptor()).await?;
            self.recv().await
        })
        .await
        .map_err(|_| ZdsError::Timeout {
            what: what(),
            timeout: self.timeout,
        })?
        .map_err(|source| ZdsError::Send { what: what(), source })?;
        let Some(answer) = answer else {
            return Err(ZdsError::Closed { what: what() });
        };
        match WorkloadResponse::decode(answer.as_slice()) {
            Ok(WorkloadResponse {
                payload: Some(workload_response::Payload::Ack(ack)),
            }) if ack.error.is_empty() => Ok(()),
            Ok(WorkloadResponse {
                payload: Some(workload_response::Payload::Ack(ack)),
            }) => Err(ZdsError::Nack {
                what: what(),
                error: ack.error,
            }),
            Ok(WorkloadResponse { payload: None }) => Err(ZdsError::Protocol {
                what: what(),
                got: "a WorkloadResponse with no payload".into(),
            }),
            Err(e) => Err(ZdsError::Protocol {
                what: what(),
                got: format!("{} bytes that are no WorkloadResponse ({e})", answer.len()),
            }),
        }
    }

    /// Reads ztunnel's hello, within the timeout. `Ok(false)`: it closed without one.
    async fn hello(&self) -> Result<bool, ZdsError> {
        let got = tokio::time::timeout(self.timeout, self.recv())
            .await
            .map_err(|_| ZdsError::Hello {
                got: format!("none within {}", super::seconds(self.timeout)),
            })?
            .map_err(|e| ZdsError::Hello { got: e.to_string() })?;
        let Some(bytes) = got else { return Ok(false) };
        match proto::ZdsHello::decode(bytes.as_slice()) {
            Ok(hello) if hello.version == proto::Version::V1 as i32 => Ok(true),
            Ok(hello) => Err(ZdsError::Hello {
                got: format!("version {}", hello.version),
            }),
            Err(e) => Err(ZdsError::Hello {
                got: format!("{} bytes that are no ZdsHello ({e})", bytes.len()),
            }),
        }
    }
}

/// `fd` in the runtime's reactor, for `async_io`.
pub(super) fn register(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: an `OwnedFd` is an open descriptor that only its drop closes, and its `as_raw_fd`
    // always returns that one; the AsyncFd owns it until it drops, and nothing here swaps it
    // (no `get_mut` or `async_io_mut`).
    Ok(unsafe { AsyncFd::register(fd)? })
}

/// Serves one accepted connection until it closes, fails, or the server stops.
pub(super) async fn serve(shared: Arc<Shared>, socket: OwnedFd, id: u64, mut stop: watch::Receiver<()>) {
    let socket = match register(socket) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(conn = id, "registering a ztunnel connection with the runtime: {e}");
            return;
        }
    };
    let conn = Conn {
        socket,
        timeout: shared.timeout,
    };
    tokio::select! {
        // Err: the server's sender is gone, it was dropped.
        _ = stop.changed() => tracing::debug!(conn = id, "ZDS server stopped; connection closed"),
        end = run(&shared, &conn, id) => match end {
            Ok(()) => tracing::info!(conn = id, "ztunnel disconnected"),
            Err(e) => tracing::warn!(conn = id, "closing the ztunnel connection: {e}"),
        },
    }
}

/// The protocol on one connection. `Err`: why it is closed from this side.
async fn run(shared: &Arc<Shared>, conn: &Conn, id: u64) -> Result<(), String> {
    match conn.hello().await {
        Ok(true) => {}
        Ok(false) => {
            tracing::debug!(conn = id, "a ZDS client closed without a hello");
            return Ok(());
        }
        Err(e) => return Err(e.to_string()),
    }
    tracing::info!(conn = id, "ztunnel connected");
    let (jobs, mut queue) = mpsc::unbounded_channel();
    // The snapshot and the registration are one step: a pod added or removed from now on is
    // queued here, one before is in the snapshot. Unregistered when this returns.
    let (snapshot, _registration) = shared.register(id, jobs);
    let count = snapshot.len();
    for pod in snapshot {
        exchange_in_snapshot(conn, Outgoing::Add(pod)).await?;
    }
    exchange_in_snapshot(conn, Outgoing::SnapshotSent).await?;
    tracing::info!(conn = id, pods = count, "snapshot sent to ztunnel");
    loop {
        tokio::select! {
            job = queue.recv() => {
                // The sender lives in the registration, which outlives this loop.
                let Some(Job { what, reply }) = job else { return Ok(()) };
                let result = conn.exchange(&what).await;
                let fatal = match &result {
                    Err(e) if !e.is_nack() => Some(e.to_string()),
                    _ => None,
                };
                // The caller may have given up waiting; the outcome is logged below either way.
                let _ = reply.send(result);
                if let Some(e) = fatal {
                    return Err(e);
                }
            }
            got = conn.recv() => return match got {
                Ok(None) => Ok(()),
                Ok(Some(bytes)) => Err(format!("ztunnel sent {} bytes unasked (expected nothing between acks)", bytes.len())),
                Err(e) => Err(format!("reading from ztunnel: {e}")),
            },
        }
    }
}

/// One exchange of the snapshot: a NACK is logged and the snapshot goes on (ztunnel keeps the
/// connection); anything else ends the connection.
async fn exchange_in_snapshot(conn: &Conn, out: Outgoing) -> Result<(), String> {
    match conn.exchange(&out).await {
        Ok(()) => Ok(()),
        Err(e) if e.is_nack() => {
            tracing::warn!("{e}");
            Ok(())
        }
        Err(e) => Err(e.to_string()),
    }
}
