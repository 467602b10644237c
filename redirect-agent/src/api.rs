//! The node agent's side of the control socket ([`redirect_api`]): one JSON request per
//! connection, one answer, then the connection closes; a handover keeps it for the
//! descriptors that follow.

use std::{io::Write as _, os::unix::net::UnixStream, sync::Arc, time::Duration};

use redirect_api::{ApiError, ErrorKind, Request, Response};
use tokio::{net::UnixListener, sync::Mutex};

use crate::engine::{self, Engine, EnrollError};

/// How the node's serving ended.
pub(crate) enum Ended {
    Signal,
    HandedOver,
}

/// Serves API connections until one of them is a completed handover.
pub(crate) async fn serve(listener: &UnixListener, engine: Arc<Mutex<Engine>>) -> Ended {
    let (done_tx, mut done_rx) = tokio::sync::mpsc::channel::<()>(1);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let engine = engine.clone();
                    let done = done_tx.clone();
                    tokio::spawn(async move {
                        if handle(stream, engine).await {
                            let _ = done.send(()).await;
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!("control socket accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = done_rx.recv() => return Ended::HandedOver,
        }
    }
}

/// What a request asks of the engine, answered (a handover is answered by the engine itself,
/// on the stream).
fn answer(engine: &mut Engine, request: Request) -> Response {
    let result = match request {
        Request::Enroll(req) => engine::Request::from_api(req)
            .and_then(|r| engine.enroll(r))
            .map(Response::Enrolled),
        Request::Unenroll { id, netns } => engine.unenroll(id, netns).map(|id| Response::Unenrolled { id }),
        Request::List if engine.handed_over() => Err(EnrollError::HandedOver),
        Request::List => Ok(Response::Workloads(engine.workloads())),
        Request::Handover => Ok(Response::Error(ApiError::new(
            ErrorKind::Internal,
            "a handover is answered on its own stream",
        ))),
    };
    result.unwrap_or_else(|e| Response::Error(e.into()))
}

/// One request. `true`: it was a handover, and this agent must stop serving.
async fn handle(stream: tokio::net::UnixStream, engine: Arc<Mutex<Engine>>) -> bool {
    let Ok(std) = stream.into_std() else { return false };
    // The API is tiny and rare: a blocking exchange on a worker thread keeps it simple, with
    // timeouts so that a stuck client cannot hold the engine's lock.
    let outcome = tokio::task::spawn_blocking(move || -> std::io::Result<bool> {
        std.set_nonblocking(false)?;
        std.set_read_timeout(Some(Duration::from_secs(10)))?;
        std.set_write_timeout(Some(Duration::from_secs(10)))?;
        let line = redirect_api::read_line(&std)?;
        let request: Request = match serde_json::from_slice(&line) {
            Ok(r) => r,
            Err(e) => {
                let e = ApiError::new(ErrorKind::Invalid, format!("unreadable request: {e}"));
                reply(&std, &Response::Error(e))?;
                return Ok(false);
            }
        };
        let mut engine = engine.blocking_lock();
        if matches!(request, Request::Handover) {
            if engine.handed_over() {
                reply(&std, &Response::Error(EnrollError::HandedOver.into()))?;
                return Ok(false);
            }
            return engine.hand_over(std);
        }
        reply(&std, &answer(&mut engine, request))?;
        Ok(false)
    })
    .await;
    match outcome {
        Ok(Ok(handed_over)) => handed_over,
        // A client that connects and leaves (a liveness check) is not worth a warning.
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            tracing::debug!("control connection closed without a request");
            false
        }
        Ok(Err(e)) => {
            tracing::warn!("control request: {e}");
            false
        }
        Err(e) => {
            tracing::error!("control request handler failed: {e}");
            false
        }
    }
}

fn reply(stream: &UnixStream, response: &Response) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(response)?;
    line.push(b'\n');
    (&*stream).write_all(&line)
}
