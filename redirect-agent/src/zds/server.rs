//! The listening socket, the pods, and the connections ztunnel made.

use std::{
    collections::BTreeMap,
    io,
    os::{
        fd::OwnedFd,
        unix::fs::{FileTypeExt as _, MetadataExt as _},
    },
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use rustix::{
    io::Errno,
    net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType},
};
use tokio::{
    io::{Interest, unix::AsyncFd},
    sync::{mpsc, oneshot, watch},
};

use super::{
    DEFAULT_TIMEOUT, ZdsError, ZdsPod,
    conn::{self, Job, Outgoing},
};

/// Connections ztunnel may have waiting to be accepted.
const BACKLOG: i32 = 16;
/// The pause after a failed accept (out of descriptors, say) before the next.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// Serves ztunnel the node's pods over ZDS (see the [module](super)).
///
/// Dropping it stops it: the accept loop ends, every connection is closed, and the socket
/// file is removed (if it is still the one this server made).
pub struct ZdsServer {
    shared: Arc<Shared>,
    path: PathBuf,
    /// The socket file's device and inode, so a drop never removes another server's.
    file: (u64, u64),
    /// Every task watches it; dropped with the server, which ends them.
    _stop: watch::Sender<()>,
}

/// What the server and its connections' tasks share.
pub(super) struct Shared {
    state: Mutex<State>,
    pub(super) timeout: Duration,
}

#[derive(Default)]
struct State {
    /// Every pod known, by uid: the next connection's snapshot.
    pods: BTreeMap<String, Arc<ZdsPod>>,
    /// Connections past their hello, oldest first.
    conns: Vec<Registered>,
}

struct Registered {
    id: u64,
    jobs: mpsc::UnboundedSender<Job>,
}

/// A connection's place in [`State::conns`], given up when dropped.
pub(super) struct Registration {
    shared: Arc<Shared>,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.shared.lock().conns.retain(|c| c.id != self.id);
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a connection that said hello, and returns the snapshot it is to send, in
    /// one step under the lock (see `conn::run`).
    pub(super) fn register(
        self: &Arc<Self>,
        id: u64,
        jobs: mpsc::UnboundedSender<Job>,
    ) -> (Vec<Arc<ZdsPod>>, Registration) {
        let mut state = self.lock();
        state.conns.push(Registered { id, jobs });
        let snapshot = state.pods.values().cloned().collect();
        (
            snapshot,
            Registration {
                shared: self.clone(),
                id,
            },
        )
    }
}

impl ZdsServer {
    /// Listens on `path` with Istio's 5 s deadline per exchange. See [`Self::bind_with_timeout`].
    pub async fn bind(path: &Path) -> Result<Self, ZdsError> {
        Self::bind_with_timeout(path, DEFAULT_TIMEOUT).await
    }

    /// Listens on `path`, and serves the connections made there on the current runtime, each
    /// exchange (hello, or request and ack) within `timeout`.
    ///
    /// The parent directory is made if missing. A socket file already there is removed when
    /// nothing listens on it (a killed agent's); one that something listens on, or a file of
    /// another kind, is an error naming the path.
    pub async fn bind_with_timeout(path: &Path, timeout: Duration) -> Result<Self, ZdsError> {
        Self::bind_with_pods(path, timeout, Vec::new()).await
    }

    /// [`Self::bind_with_timeout`], with `pods` known from the start: the first connection's
    /// snapshot holds them however soon ztunnel connects. A restarted agent's pods go in so:
    /// added after the bind, a ztunnel quick to reconnect could get a snapshot without them,
    /// and drop them. A pod [`ZdsPod::check`] refuses is an error, before anything is bound.
    pub async fn bind_with_pods(path: &Path, timeout: Duration, pods: Vec<ZdsPod>) -> Result<Self, ZdsError> {
        for pod in &pods {
            pod.check()?;
        }
        let io_err = |what: &'static str, path: &Path| {
            let path = path.to_owned();
            move |e: io::Error| ZdsError::Io { what, path, source: e }
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io_err("create the ZDS socket's directory", dir))?;
        }
        let addr = SocketAddrUnix::new(path).map_err(|e| io_err("ZDS socket path", path)(e.into()))?;
        remove_stale(path, &addr)?;
        let listener = socket().map_err(io_err("create a socket for", path))?;
        rustix::net::bind(&listener, &addr).map_err(|e| match e {
            Errno::ADDRINUSE => ZdsError::InUse(path.to_owned()),
            e => io_err("bind ZDS socket", path)(e.into()),
        })?;
        // From here on the file is this server's: removed again if it does not start.
        let started = (|| {
            rustix::net::listen(&listener, BACKLOG)?;
            let file = file_id(path)?;
            Ok::<_, io::Error>((file, conn::register(listener)?))
        })();
        let (file, listener) = match started {
            Ok(started) => started,
            Err(e) => {
                let _ = std::fs::remove_file(path);
                return Err(io_err("listen on ZDS socket", path)(e));
            }
        };
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                pods: pods.into_iter().map(|p| (p.uid.clone(), Arc::new(p))).collect(),
                conns: Vec::new(),
            }),
            timeout,
        });
        let (stop, stopped) = watch::channel(());
        tokio::spawn(accept_loop(shared.clone(), listener, path.to_owned(), stopped));
        tracing::info!(path = %path.display(), "ZDS server listening for ztunnel");
        Ok(Self {
            shared,
            path: path.to_owned(),
            file,
            _stop: stop,
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Adds `pod` (or replaces the one of its uid), kept for every later snapshot, and sends
    /// its `AddWorkload` to the newest connection, waiting for the ack. With no ztunnel
    /// connected, nothing is sent and this is `Ok`: the pod goes in the next snapshot. The
    /// timeout bounds each exchange: a request queued behind a snapshot in progress waits for
    /// it first.
    ///
    /// A NACK is [`ZdsError::Nack`], with ztunnel's error text; an exchange that outlasts the
    /// timeout is [`ZdsError::Timeout`] (and that connection is closed). Either way the pod is
    /// kept: [`Self::remove`] forgets it.
    pub async fn add(&self, pod: ZdsPod) -> Result<(), ZdsError> {
        pod.check()?;
        let pod = Arc::new(pod);
        let what = Outgoing::Add(pod.clone()).describe();
        let pending = {
            let mut state = self.shared.lock();
            state.pods.insert(pod.uid.clone(), pod.clone());
            // The newest connection whose task still runs.
            state
                .conns
                .iter()
                .rev()
                .find_map(|c| queue(c, Outgoing::Add(pod.clone())))
        };
        let Some(ack) = pending else {
            tracing::debug!(uid = %pod.uid, "no ztunnel connected; the pod waits for the next snapshot");
            return Ok(());
        };
        ack.await.unwrap_or(Err(ZdsError::Closed { what }))
    }

    /// Forgets the pod `uid` and sends its `DelWorkload` to every connection, waiting for
    /// every ack. An error is the first connection's that failed (the others' are logged).
    pub async fn remove(&self, uid: &str) -> Result<(), ZdsError> {
        let what = Outgoing::Del(uid.to_owned()).describe();
        let pending: Vec<_> = {
            let mut state = self.shared.lock();
            state.pods.remove(uid);
            state
                .conns
                .iter()
                .filter_map(|c| queue(c, Outgoing::Del(uid.to_owned())))
                .collect()
        };
        let mut first = None;
        for ack in pending {
            // Each connection's task works on its own: awaiting them in turn waits for the slowest.
            let Err(e) = ack
                .await
                .unwrap_or_else(|_| Err(ZdsError::Closed { what: what.clone() }))
            else {
                continue;
            };
            match first {
                None => first = Some(e),
                Some(_) => tracing::warn!("{e}"),
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// Connections whose ztunnel said hello and that are still open.
    pub fn connections(&self) -> usize {
        self.shared.lock().conns.iter().filter(|c| !c.jobs.is_closed()).count()
    }
}

impl Drop for ZdsServer {
    fn drop(&mut self) {
        // Only the file this server made: another server may have replaced it since.
        if file_id(&self.path).is_ok_and(|id| id == self.file)
            && let Err(e) = std::fs::remove_file(&self.path)
        {
            tracing::warn!(path = %self.path.display(), "removing the ZDS socket: {e}");
        }
        // `_stop` goes next, which ends the accept loop and the connections.
    }
}

/// A file's device and inode.
fn file_id(path: &Path) -> io::Result<(u64, u64)> {
    let m = std::fs::symlink_metadata(path)?;
    Ok((m.dev(), m.ino()))
}

/// Hands `out` to a connection's task; its ack's receiver, or `None` if the task has ended.
fn queue(conn: &Registered, out: Outgoing) -> Option<oneshot::Receiver<Result<(), ZdsError>>> {
    let (reply, ack) = oneshot::channel();
    conn.jobs.send(Job { what: out, reply }).ok().map(|()| ack)
}

/// A non-blocking, close-on-exec SOCK_SEQPACKET Unix socket.
fn socket() -> io::Result<OwnedFd> {
    Ok(rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
        None,
    )?)
}

/// Removes the socket file at `path` if nothing listens on it; refuses if something does, or
/// if the file is not a socket.
fn remove_stale(path: &Path, addr: &SocketAddrUnix) -> Result<(), ZdsError> {
    let io_err = |what: &'static str| {
        let path = path.to_owned();
        move |e: io::Error| ZdsError::Io { what, path, source: e }
    };
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err("inspect ZDS socket")(e)),
        Ok(m) if !m.file_type().is_socket() => return Err(ZdsError::NotSocket(path.to_owned())),
        Ok(_) => {}
    }
    // A listener answers a connect (or has a full backlog: EAGAIN); a stream listener refuses
    // the type (EPROTOTYPE) but is a listener all the same. Only ECONNREFUSED means nobody.
    let probe = socket().map_err(io_err("create a socket to probe"))?;
    match rustix::net::connect(&probe, addr) {
        Err(Errno::CONNREFUSED) => {}
        Err(Errno::NOENT) => return Ok(()),
        Ok(()) | Err(Errno::AGAIN | Errno::PROTOTYPE) => return Err(ZdsError::InUse(path.to_owned())),
        Err(e) => return Err(io_err("probe ZDS socket")(e.into())),
    }
    match std::fs::remove_file(path) {
        Ok(()) => {
            tracing::info!(path = %path.display(), "removed a stale ZDS socket (nothing listened on it)");
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("remove stale ZDS socket")(e)),
    }
}

/// Accepts ztunnel's connections, each served on its own task, until the server is dropped.
async fn accept_loop(shared: Arc<Shared>, listener: AsyncFd<OwnedFd>, path: PathBuf, mut stop: watch::Receiver<()>) {
    let mut next_id = 0u64;
    loop {
        let accepted = tokio::select! {
            // Err: the server's sender is gone, it was dropped.
            _ = stop.changed() => return,
            accepted = listener.async_io(Interest::READABLE, |l| {
                rustix::net::accept_with(l, SocketFlags::NONBLOCK | SocketFlags::CLOEXEC).map_err(io::Error::from)
            }) => accepted,
        };
        match accepted {
            Ok(socket) => {
                next_id += 1;
                tracing::debug!(conn = next_id, "ZDS connection accepted");
                tokio::spawn(conn::serve(shared.clone(), socket, next_id, stop.clone()));
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), "accepting a ZDS connection: {e}");
                tokio::time::sleep(ACCEPT_RETRY).await;
            }
        }
    }
}
