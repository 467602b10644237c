//! The node agent's side of the control socket ([`redirect_api`]): one JSON request per
//! connection, one answer, then the connection closes; a handover keeps it for the
//! descriptors that follow.
//!
//! Every connection is served on its own thread with a deadline for its request, and the
//! engine's lock is held only to compute an answer, never while waiting on a client: a client
//! that connects and stalls (or starts a handover and stalls) holds up nobody else. A
//! handover is only taken from a peer that passes [`crate::engine::handover`]'s checks.
//!
//! What becomes of a workload beside the engine (node mode hands an ambient pod to ztunnel)
//! is a [`Handoff`]'s, called between the engine's steps without its lock.

use std::{
    io::Write as _,
    os::{
        fd::{AsFd as _, OwnedFd},
        unix::net::UnixStream,
    },
    sync::Arc,
    time::{Duration, Instant},
};

use redirect_api::{ApiError, ErrorKind, Request, Response, WorkloadInfo};
use tokio::{net::UnixListener, sync::Mutex};

use crate::engine::{self, Engine, EnrollError, handover};

/// How long a client may take to send its request, in all.
const REQUEST_WITHIN: Duration = Duration::from_secs(5);
/// How long an answer may take to be taken.
const REPLY_WITHIN: Duration = Duration::from_secs(5);
/// The largest request, as [`redirect_api::read_line`] takes.
const MAX_REQUEST: usize = redirect_api::MAX_MESSAGE as usize;
/// Clients served at once; the next waits in the listen backlog until one is done (each is
/// done within [`REQUEST_WITHIN`] + [`REPLY_WITHIN`] of its accept, plus its turn at the
/// engine). Bounds the control plane's descriptors, which the engine's budget sets aside.
pub(crate) const MAX_CONNECTIONS: usize = 32;

/// How the node's serving ended.
pub(crate) enum Ended {
    Signal,
    /// Handed over to the process `successor`, which said it serves and attached.
    HandedOver {
        successor: u32,
    },
}

/// What becomes of a workload beside the engine. Called on a connection's blocking thread,
/// never with the engine's lock held, so that it may wait (on ztunnel, say).
pub(crate) trait Handoff: Send + Sync {
    /// Refuses, before the engine is asked, an enrollment that could not be handed on.
    fn admit(&self, req: &engine::Request) -> Result<(), ApiError>;
    /// Hands on a workload the engine has just enrolled. An error is the enroll's answer: the
    /// workload is taken back out of the engine, then [`Handoff::released`].
    fn enrolled(&self, engine: &Mutex<Engine>, info: &WorkloadInfo) -> Result<(), ApiError>;
    /// The engine no longer serves `info`. A failure to say so on is logged, not returned: the
    /// workload is released either way.
    fn released(&self, info: &WorkloadInfo);
}

/// Serves API connections until one of them is a completed handover. `metrics`: a second
/// descriptor of the metrics listener, for a successor that asks for it.
pub(crate) async fn serve(
    listener: &UnixListener,
    engine: Arc<Mutex<Engine>>,
    metrics: Option<Arc<OwnedFd>>,
    handoff: Option<Arc<dyn Handoff>>,
) -> Ended {
    let (done_tx, mut done_rx) = tokio::sync::mpsc::channel::<u32>(1);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        // A slot first, then the accept: past the bound, clients wait in the backlog rather
        // than take descriptors.
        // (Never closed: `ok()` only keeps this free of a panic path.)
        let slot = slots.clone().acquire_owned().await.ok();
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let engine = engine.clone();
                    let done = done_tx.clone();
                    let metrics = metrics.clone();
                    let handoff = handoff.clone();
                    tokio::spawn(async move {
                        let handed_over = handle(stream, engine, metrics, handoff).await;
                        drop(slot);
                        if let Some(pid) = handed_over {
                            let _ = done.send(pid).await;
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!("control socket accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(successor) = done_rx.recv() => return Ended::HandedOver { successor },
        }
    }
}

/// What a request asks, answered (a handover is answered on its stream). The engine's lock is
/// taken for each step that needs it, and not held while the workload is handed on.
fn answer(engine: &Mutex<Engine>, handoff: Option<&dyn Handoff>, request: Request) -> Response {
    let result = match request {
        Request::Enroll(req) => enroll(engine, handoff, req).map(Response::Enrolled),
        Request::Unenroll { id, netns } => unenroll(engine, handoff, id, netns).map(|id| Response::Unenrolled { id }),
        Request::List => {
            let engine = engine.blocking_lock();
            match engine.handed_over() {
                true => Err(EnrollError::HandedOver.into()),
                false => Ok(Response::Workloads(engine.workloads())),
            }
        }
        Request::Handover => Err(ApiError::new(
            ErrorKind::Internal,
            "a handover is answered on its own stream",
        )),
    };
    result.unwrap_or_else(Response::Error)
}

/// Enrolls under the engine's lock, then hands the workload on without it; a workload that
/// could not be handed on is taken back out.
fn enroll(
    engine: &Mutex<Engine>,
    handoff: Option<&dyn Handoff>,
    req: redirect_api::Enroll,
) -> Result<WorkloadInfo, ApiError> {
    let req = engine::Request::from_api(req)?;
    match handoff {
        Some(h) => h.admit(&req)?,
        // Nothing would serve the pod's ports: ambient's proxy is a node proxy, handed the pod.
        None if req.proxy == crate::flags::ProxyMode::None && req.capture.ambient.is_some() => {
            return Err(ApiError::new(
                ErrorKind::Invalid,
                format!(
                    "workload '{}': --mode ambient with --proxy none, but this agent serves no ztunnel: start it with                      --ztunnel-socket PATH, or enroll the pod with --proxy embedded",
                    req.id
                ),
            ));
        }
        None => {}
    }
    let info = {
        let mut engine = engine.blocking_lock();
        // Until the handover ends, the successor is being given the workloads as they are.
        if engine.handing_over() {
            return Err(EnrollError::HandoverInProgress.into());
        }
        engine.enroll(req)?
    };
    let Some(h) = handoff else { return Ok(info) };
    let Err(e) = h.enrolled(engine, &info) else {
        return Ok(info);
    };
    // Not left half-attached: captured, with nothing to serve it, and told to nobody. Unless a
    // successor is being handed the workloads as they are, this one among them: then it stays,
    // the successor's, and the CNI's DEL for the failed ADD removes it there.
    let undone = {
        let mut engine = engine.blocking_lock();
        if engine.handing_over() {
            tracing::warn!(id = %info.id, "not handed on, and a handover is in progress: left to the successor");
            false
        } else if let Err(undo) = engine.unenroll(Some(info.id.clone()), None) {
            tracing::error!(id = %info.id, "taking back a workload that was not handed on: {undo}");
            false
        } else {
            true
        }
    };
    if undone {
        h.released(&info);
    }
    Err(e)
}

/// Unenrolls under the engine's lock, then tells the [`Handoff`] without it.
fn unenroll(
    engine: &Mutex<Engine>,
    handoff: Option<&dyn Handoff>,
    id: Option<String>,
    netns: Option<std::path::PathBuf>,
) -> Result<String, ApiError> {
    let (id, info) = {
        let mut engine = engine.blocking_lock();
        if engine.handing_over() {
            return Err(EnrollError::HandoverInProgress.into());
        }
        // What it was, for the handoff (the engine finds it by id or by namespace).
        let before = handoff.map(|_| engine.workloads()).unwrap_or_default();
        let id = engine.unenroll(id, netns)?;
        let info = before.into_iter().find(|w| w.id == id);
        (id, info)
    };
    if let (Some(h), Some(info)) = (handoff, info) {
        h.released(&info);
    }
    Ok(id)
}

/// One connection. `Some(pid)`: it was a handover to process `pid`, and this agent must stop
/// serving.
async fn handle(
    stream: tokio::net::UnixStream,
    engine: Arc<Mutex<Engine>>,
    metrics: Option<Arc<OwnedFd>>,
    handoff: Option<Arc<dyn Handoff>>,
) -> Option<u32> {
    let std = stream.into_std().ok()?;
    let outcome = tokio::task::spawn_blocking(move || -> std::io::Result<Option<u32>> {
        std.set_nonblocking(false)?;
        std.set_write_timeout(Some(REPLY_WITHIN))?;
        let line = handover::read_line_by(&std, Instant::now() + REQUEST_WITHIN, MAX_REQUEST)?;
        let request: Request = match serde_json::from_slice(&line) {
            Ok(r) => r,
            Err(e) => {
                let e = ApiError::new(ErrorKind::Invalid, format!("unreadable request: {e}"));
                reply(&std, &Response::Error(e))?;
                return Ok(None);
            }
        };
        if matches!(request, Request::Handover) {
            return hand_over(&std, &engine, metrics.as_deref());
        }
        // Answered under the lock (handed on without it), sent without it.
        let response = answer(&engine, handoff.as_deref(), request);
        reply(&std, &response)?;
        Ok(None)
    })
    .await;
    match outcome {
        Ok(Ok(handed_over)) => handed_over,
        // A client that connects and leaves (a liveness check) is not worth a warning.
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            tracing::debug!("control connection closed without a request");
            None
        }
        Ok(Err(e)) => {
            tracing::warn!("control request: {e}");
            None
        }
        Err(e) => {
            tracing::error!("control request handler failed: {e}");
            None
        }
    }
}

/// A handover asked on `stream`: refused unless the peer is a successor of this instance; the
/// exchange runs without the engine's lock; taken only if the successor then shows, in the
/// kernel, that it attached. Otherwise this process serves on, with its own programs.
fn hand_over(stream: &UnixStream, engine: &Mutex<Engine>, metrics: Option<&OwnedFd>) -> std::io::Result<Option<u32>> {
    let refuse = |e: ApiError| reply(stream, &Response::Error(e)).map(|()| None);
    let Some(lock) = engine.blocking_lock().lock_file() else {
        return refuse(EnrollError::HandedOver.into());
    };
    let pid = match engine::peer_check(stream, &lock) {
        Ok(pid) => pid,
        Err(why) => {
            tracing::warn!("handover refused: {why}");
            return refuse(ApiError::new(ErrorKind::Invalid, format!("handover refused: {why}")));
        }
    };
    let offer = match engine.blocking_lock().begin_handover() {
        Ok(offer) => offer,
        Err(e) => return refuse(e.into()),
    };
    tracing::info!(successor = pid, "handing over");
    let mut sent = false;
    let within = engine.blocking_lock().handover_within();
    let verdict = handover::offer(stream, offer, metrics.map(|m| m.as_fd()), within, &mut sent)
        .map_err(|e| e.to_string())
        .and_then(|()| engine.blocking_lock().check_successor(pid));
    let mut engine = engine.blocking_lock();
    match verdict {
        Ok(()) => {
            engine.end_handover(true);
            // A successor that is gone by now shows when this process checks it serves.
            let _ = (&*stream).write_all(b"bye\n");
            Ok(Some(pid))
        }
        Err(why) => {
            tracing::error!("the successor did not take over ({why}); serving on");
            if sent && let Err(e) = engine.reclaim() {
                tracing::error!("taking the links back: {e}");
            }
            engine.end_handover(false);
            let _ = (&*stream).write_all(format!("refused: {why}\n").as_bytes());
            Ok(None)
        }
    }
}

fn reply(stream: &UnixStream, response: &Response) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(response)?;
    line.push(b'\n');
    (&*stream).write_all(&line)
}
