//! Upstream sockets made by a child process inside the workload's cgroup (`dial_in.rs`), as a
//! sidecar's are: the workload's cgroup-scoped egress rules apply to them.
//!
//! One child per workload, started and restarted by a supervisor thread (the child's
//! PR_SET_PDEATHSIG follows the thread that started it, so that thread lives as long as the
//! dialer). Each address family has a pump thread that asks the child for sockets in batches
//! and keeps [`SPARE_SOCKETS`] ready, marked, with keepalive set and registered in
//! `AGENT_SOCKETS`: a connection takes a ready one, with no hop on its path. While the child
//! is gone (died, hung, restarting) a connection that finds no ready socket gets an error and
//! is reset; none is ever dialled from anywhere else.

use std::{
    io,
    os::fd::{AsFd as _, OwnedFd},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketFlags, SocketType};
use tokio::net::TcpSocket;

use super::{
    Keepalive,
    dialer::{AgentSockets, Pool, SPARE_SOCKETS, mark_as_agent},
};
use crate::{
    dial_in::{FAILED, READY, recv_reply},
    sys::{DIAL_BATCH, Netns},
};

/// How long the agent waits for the child's answer before it takes it for hung, kills it and
/// starts another.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a new child may take to be ready: it execs the agent's binary, joins the cgroup and
/// the network namespace. On a slow or loaded machine (an emulated VM, CI's 2 cores) the exec
/// alone can outlast [`ANSWER_TIMEOUT`], and a first start that fails ends the workload's start.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Waits between restarts of a child that keeps dying: doubled each time up to the maximum,
/// back to the minimum after one that lived for [`STABLE`].
const RESTART_MIN: Duration = Duration::from_millis(100);
const RESTART_MAX: Duration = Duration::from_secs(5);
const STABLE: Duration = Duration::from_secs(10);

/// Who the child is and where it lives.
#[derive(Clone, Debug)]
pub struct ChildSpec {
    pub cgroup: PathBuf,
    pub uid: u32,
    pub gid: u32,
}

/// Makes upstream sockets through the workload's dialer child.
#[derive(Clone)]
pub struct CgroupDialer {
    v4: Pool,
    v6: Arc<tokio::sync::OnceCell<Pool>>,
    shared: Arc<Shared>,
    agent: AgentSockets,
    keepalive: Option<Keepalive>,
    /// Stops the child when the last clone goes.
    _stop: Arc<StopOnDrop>,
}

/// The child now serving, if any.
struct Live {
    conn: OwnedFd,
    pidfd: OwnedFd,
    /// One request and its answer at a time (the two families' pumps share the child).
    exchange: Mutex<()>,
}

struct Shared {
    live: Mutex<Option<Arc<Live>>>,
    stopped: AtomicBool,
}

impl Shared {
    fn current(&self) -> Option<Arc<Live>> {
        self.live.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Ends the child: its end of the pair sees EOF, and SIGKILL covers one that is stopped
    /// or hung. The supervisor reaps it.
    fn end(&self, live: &Live) {
        let _ = rustix::net::shutdown(&live.conn, rustix::net::Shutdown::Both);
        let _ = rustix::process::pidfd_send_signal(&live.pidfd, rustix::process::Signal::KILL);
    }
}

struct StopOnDrop(Arc<Shared>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.stopped.store(true, Ordering::SeqCst);
        if let Some(live) = self.0.live.lock().unwrap_or_else(|e| e.into_inner()).take() {
            self.0.end(&live);
        }
    }
}

impl CgroupDialer {
    /// Starts the child and waits until it is ready: an error (a cgroup the child may not
    /// join, say) is the caller's to report, and nothing is left running.
    pub fn start(
        netns: &Netns,
        spec: ChildSpec,
        agent: AgentSockets,
        keepalive: Option<Keepalive>,
    ) -> io::Result<Self> {
        let shared = Arc::new(Shared {
            live: Mutex::new(None),
            stopped: AtomicBool::new(false),
        });
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let netns = netns.try_clone()?;
        let sup = shared.clone();
        std::thread::Builder::new()
            .name("dialer-child".into())
            .spawn(move || supervise(&sup, &netns, &spec, &started_tx))?;
        started_rx
            .recv()
            .map_err(|_| io::Error::other("the upstream dialer's supervisor died"))??;
        let stop = Arc::new(StopOnDrop(shared.clone()));
        let v4 = pump(&shared, false, agent.clone(), keepalive)?;
        Ok(Self {
            v4,
            v6: Arc::default(),
            shared,
            agent,
            keepalive,
            _stop: stop,
        })
    }

    pub async fn socket(&self, v6: bool) -> io::Result<TcpSocket> {
        if !v6 {
            return self.v4.take().await;
        }
        // Started with the first IPv6 connection, as NetnsDialer's.
        let pool = self
            .v6
            .get_or_try_init(|| async { pump(&self.shared, true, self.agent.clone(), self.keepalive) })
            .await?;
        pool.take().await
    }
}

/// The family's pump: asks the child for as many sockets as the pool has room for (at least
/// one, at most a message's worth), readies them, queues them; an error is queued as it is
/// (that connection is reset), then a short pause. Ends when the pool's receiver goes.
fn pump(shared: &Arc<Shared>, v6: bool, agent: AgentSockets, keepalive: Option<Keepalive>) -> io::Result<Pool> {
    let shared = shared.clone();
    Pool::spawn(if v6 { "dialer-pump6" } else { "dialer-pump" }, move |room| {
        if shared.stopped.load(Ordering::SeqCst) {
            return None;
        }
        let want = room.clamp(1, DIAL_BATCH);
        let (fds, err) = match ask(&shared, v6, want) {
            Ok(answer) => answer,
            Err(e) => (Vec::new(), Some(e)),
        };
        let mut out: Vec<io::Result<TcpSocket>> = fds
            .into_iter()
            .map(|fd| {
                let s = TcpSocket::from_std_stream(std::net::TcpStream::from(fd));
                let s = mark_as_agent(s)?;
                keepalive.map_or(Ok(()), |k| k.apply(&s))?;
                agent.register(&s)?;
                Ok(s)
            })
            .collect();
        // An error is what a connection that finds nothing ready gets (it is reset); one in an
        // empty queue is enough, and more would fail connections after the child is back.
        if out.is_empty() && room < SPARE_SOCKETS {
            return Some(out);
        }
        out.extend(err.map(Err));
        Some(out)
    })
}

/// One request to the child now serving: `want` sockets of the family.
fn ask(shared: &Shared, v6: bool, want: usize) -> io::Result<(Vec<OwnedFd>, Option<io::Error>)> {
    let live = shared
        .current()
        .ok_or_else(|| io::Error::other("the upstream dialer process is restarting"))?;
    let _turn = live.exchange.lock().unwrap_or_else(|e| e.into_inner());
    let req = [if v6 { 6 } else { 4 }, want as u8];
    let answer = rustix::net::send(&live.conn, &req, SendFlags::NOSIGNAL)
        .map_err(io::Error::from)
        .and_then(|_| recv_reply(&live.conn));
    if let Err(e) = &answer {
        // Dead, hung (the receive timed out) or talking nonsense: replaced. (At a stop the
        // child is ended on purpose.)
        if !shared.stopped.load(Ordering::SeqCst) {
            tracing::warn!("upstream dialer process failed: {e}; restarting it");
        }
        shared.end(&live);
    }
    answer
}

/// Starts the child, serves until it exits, starts another, until the dialer stops. The first
/// start's result goes to `started`; a first start that fails ends the supervisor.
fn supervise(shared: &Shared, netns: &Netns, spec: &ChildSpec, started: &std::sync::mpsc::Sender<io::Result<()>>) {
    let mut first = true;
    let mut backoff = RESTART_MIN;
    while !shared.stopped.load(Ordering::SeqCst) {
        let since = Instant::now();
        match spawn(netns, spec) {
            Ok((mut child, live)) => {
                let pid = child.id();
                *shared.live.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(live));
                if first {
                    let _ = started.send(Ok(()));
                    first = false;
                } else {
                    tracing::info!(pid, cgroup = %spec.cgroup.display(), "upstream dialer process restarted");
                }
                // A stop that came while the child started saw no child to end.
                if shared.stopped.load(Ordering::SeqCst)
                    && let Some(live) = shared.current()
                {
                    shared.end(&live);
                }
                let status = child.wait();
                if let Some(live) = shared.live.lock().unwrap_or_else(|e| e.into_inner()).take() {
                    shared.end(&live);
                }
                if shared.stopped.load(Ordering::SeqCst) {
                    return;
                }
                tracing::warn!(pid, ?status, "upstream dialer process exited; starting another");
            }
            Err(e) if first => {
                let _ = started.send(Err(e));
                return;
            }
            Err(e) => tracing::warn!(cgroup = %spec.cgroup.display(), "starting the upstream dialer process: {e}"),
        }
        backoff = if since.elapsed() > STABLE {
            RESTART_MIN
        } else {
            (backoff * 2).min(RESTART_MAX)
        };
        // In slices, so that a stop is not held up by the wait.
        let until = Instant::now() + backoff;
        while Instant::now() < until && !shared.stopped.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// One child, ready to serve, or an error naming why it could not start (it is reaped then).
fn spawn(netns: &Netns, spec: &ChildSpec) -> io::Result<(Child, Live)> {
    let (conn, theirs) =
        rustix::net::socketpair(AddressFamily::UNIX, SocketType::SEQPACKET, SocketFlags::CLOEXEC, None)?;
    rustix::net::sockopt::set_socket_timeout(&conn, rustix::net::sockopt::Timeout::Recv, Some(START_TIMEOUT))?;
    // The binary this process runs, even if the file was replaced since.
    let mut child = Command::new("/proc/self/exe")
        .arg("dial-in")
        .arg("--cgroup")
        .arg(&spec.cgroup)
        .args(["--uid", &spec.uid.to_string(), "--gid", &spec.gid.to_string()])
        .args(["--parent", &std::process::id().to_string()])
        .stdin(Stdio::from(theirs))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let ready = handshake(&conn, netns, &spec.cgroup).and_then(|()| {
        let pid = rustix::process::Pid::from_raw(child.id() as i32)
            .ok_or_else(|| io::Error::other("the dialer process has no pid"))?;
        let pidfd = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty())?;
        // Ready: from now on an answer is a dial's, and a child that takes longer is hung.
        rustix::net::sockopt::set_socket_timeout(&conn, rustix::net::sockopt::Timeout::Recv, Some(ANSWER_TIMEOUT))?;
        Ok(pidfd)
    });
    match ready {
        Ok(pidfd) => Ok((
            child,
            Live {
                conn,
                pidfd,
                exchange: Mutex::new(()),
            },
        )),
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(e)
        }
    }
}

/// Steps 1 and 2 of the protocol (`dial_in.rs`).
fn handshake(conn: &OwnedFd, netns: &Netns, cgroup: &Path) -> io::Result<()> {
    crate::sys::send_fds(conn, &[netns.as_fd()])?;
    let mut answer = [0u8; 512];
    let (n, _) = rustix::net::recv(conn, &mut answer, RecvFlags::empty()).map_err(|e| match e {
        rustix::io::Errno::AGAIN => io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "upstream dialer process in cgroup {}: not ready within {} s",
                cgroup.display(),
                START_TIMEOUT.as_secs()
            ),
        ),
        e => io::Error::new(e.kind(), format!("waiting for the upstream dialer process: {e}")),
    })?;
    match answer.get(..n) {
        Some([READY]) => Ok(()),
        Some([FAILED, a, b, c, d, text @ ..]) => {
            let errno = i32::from_le_bytes([*a, *b, *c, *d]);
            let kind = match errno {
                0 => io::ErrorKind::Other,
                e => io::Error::from_raw_os_error(e).kind(),
            };
            Err(io::Error::new(
                kind,
                format!(
                    "upstream dialer process in cgroup {}: {}",
                    cgroup.display(),
                    String::from_utf8_lossy(text)
                ),
            ))
        }
        _ => Err(io::Error::other(format!(
            "upstream dialer process in cgroup {}: exited before it was ready",
            cgroup.display()
        ))),
    }
}
