//! A fake ztunnel: the client side of ZDS, as ztunnel speaks it to its node agent. It connects
//! to the agent's SOCK_SEQPACKET socket, says `ZdsHello` V1, and receives one request per
//! datagram (an `AddWorkload` with the pod's network namespace as its one SCM_RIGHTS
//! descriptor), which the test answers with an ack or a NACK of its choice. Every wait is
//! bounded.

use std::{
    io,
    net::{SocketAddr, TcpListener},
    os::fd::{AsFd as _, OwnedFd},
    path::Path,
    time::{Duration, Instant},
};

use prost::Message as _;
use redirect_agent::zds::proto::{
    Ack, Version, WorkloadInfo, WorkloadRequest, WorkloadResponse, ZdsHello, workload_request::Payload,
    workload_response,
};
use rustix::net::{AddressFamily, SendFlags, SocketAddrUnix, SocketFlags, SocketType, sockopt};

/// The mark ztunnel gives every socket it owns in a pod's namespace.
pub const ZTUNNEL_MARK: u32 = 0x539;

/// What the agent sent.
#[derive(Debug)]
pub enum Event {
    /// A pod to serve, with its network namespace.
    Add {
        uid: String,
        info: WorkloadInfo,
        netns: OwnedFd,
    },
    /// A pod to stop serving.
    Del { uid: String },
    /// The end of the snapshot that opens a connection.
    SnapshotSent,
}

/// One connection of a fake ztunnel, past its hello.
pub struct FakeZtunnel {
    socket: OwnedFd,
}

/// A datagram of the agent's, read into this buffer (ztunnel's is as large).
const MAX_MESSAGE: usize = redirect_agent::zds::MAX_MESSAGE;

impl FakeZtunnel {
    /// Connects to the agent's ZDS socket at `path` and says hello, trying again until
    /// `within` has passed while nothing listens there yet (ztunnel retries so too).
    pub fn connect(path: &Path, within: Duration) -> io::Result<Self> {
        let addr = SocketAddrUnix::new(path)?;
        let deadline = Instant::now() + within;
        let socket = loop {
            let s = rustix::net::socket_with(AddressFamily::UNIX, SocketType::SEQPACKET, SocketFlags::CLOEXEC, None)?;
            match rustix::net::connect(&s, &addr) {
                Ok(()) => break s,
                Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => {
                    return Err(io::Error::new(
                        io::Error::from(e).kind(),
                        format!("connecting to {} for {within:?}: {e}", path.display()),
                    ));
                }
            }
        };
        let zt = Self { socket };
        zt.send(
            &ZdsHello {
                version: Version::V1 as i32,
            }
            .encode_to_vec(),
        )?;
        Ok(zt)
    }

    fn send(&self, bytes: &[u8]) -> io::Result<()> {
        let sent = rustix::net::send(&self.socket, bytes, SendFlags::NOSIGNAL)?;
        if sent != bytes.len() {
            return Err(io::Error::other(format!("{sent} of {} bytes sent", bytes.len())));
        }
        Ok(())
    }

    /// The next request, within `within`: `Ok(None)` if the agent closed the connection, an
    /// error of kind `TimedOut` if nothing came, `InvalidData` for a request that is not as
    /// ZDS has it (an `AddWorkload` without exactly one descriptor, a descriptor on anything
    /// else).
    pub fn recv(&self, within: Duration) -> io::Result<Option<Event>> {
        sockopt::set_socket_timeout(&self.socket, sockopt::Timeout::Recv, Some(within))?;
        let mut buf = [0u8; MAX_MESSAGE];
        let (n, mut fds) = match redirect_agent::sys::recv_with_fds(&self.socket, &mut buf) {
            Ok(got) => got,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no request within {within:?}"),
                ));
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(None),
            Err(e) => return Err(e),
        };
        if n == 0 {
            return Ok(None);
        }
        let bad = |what: String| io::Error::new(io::ErrorKind::InvalidData, what);
        let request = WorkloadRequest::decode(&buf[..n]).map_err(|e| bad(format!("{n} bytes, no request: {e}")))?;
        let event = match request.payload {
            Some(Payload::Add(add)) => {
                if fds.len() != 1 {
                    return Err(bad(format!("AddWorkload {} with {} descriptors", add.uid, fds.len())));
                }
                Event::Add {
                    uid: add.uid,
                    info: add.workload_info.unwrap_or_default(),
                    netns: fds.remove(0),
                }
            }
            Some(Payload::Del(del)) => Event::Del { uid: del.uid },
            Some(Payload::SnapshotSent(_)) => Event::SnapshotSent,
            other => return Err(bad(format!("unexpected request {other:?}"))),
        };
        if !fds.is_empty() {
            return Err(bad(format!("{event:?} came with {} descriptors", fds.len())));
        }
        Ok(Some(event))
    }

    /// The next request, which must come within `within`.
    pub fn expect(&self, within: Duration) -> io::Result<Event> {
        self.recv(within)?
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "the agent closed the connection"))
    }

    /// Acks the last request.
    pub fn ack(&self) -> io::Result<()> {
        self.answer("")
    }

    /// Refuses the last request with `error`, as ztunnel does when it cannot serve a pod.
    pub fn nack(&self, error: &str) -> io::Result<()> {
        assert!(!error.is_empty(), "a NACK carries an error");
        self.answer(error)
    }

    fn answer(&self, error: &str) -> io::Result<()> {
        let ack = WorkloadResponse {
            payload: Some(workload_response::Payload::Ack(Ack { error: error.into() })),
        };
        self.send(&ack.encode_to_vec())
    }

    /// The snapshot that opens the connection, each request acked: the pods up to
    /// `SnapshotSent`, which must all come within `within`.
    pub fn snapshot(&self, within: Duration) -> io::Result<Vec<Event>> {
        let deadline = Instant::now() + within;
        let mut pods = Vec::new();
        loop {
            let left = deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1));
            let event = self.expect(left)?;
            self.ack()?;
            match event {
                Event::SnapshotSent => return Ok(pods),
                add @ Event::Add { .. } => pods.push(add),
                other => return Err(io::Error::other(format!("{other:?} in a snapshot"))),
            }
        }
    }

    /// Whether the agent closed the connection within `within` (any request meanwhile is an
    /// error).
    pub fn closed_within(&self, within: Duration) -> io::Result<bool> {
        match self.recv(within) {
            Ok(None) => Ok(true),
            Ok(Some(event)) => Err(io::Error::other(format!("{event:?} instead of the end"))),
            Err(e) if e.kind() == io::ErrorKind::TimedOut => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// A TCP listener on `addr` inside the network namespace `netns` (a descriptor, as ZDS gives
/// it), its socket marked [`ZTUNNEL_MARK`]: what ztunnel opens in a pod it was handed. Made on
/// a thread of its own, which enters the namespace; the socket stays there.
pub fn listen_in(netns: &OwnedFd, addr: SocketAddr) -> io::Result<TcpListener> {
    let ns = redirect_agent::sys::Netns::from_fd(netns.try_clone()?, Path::new("the namespace from ZDS"))
        .map_err(io::Error::other)?;
    let listener = ns.run(|| {
        let family = match addr {
            SocketAddr::V4(_) => AddressFamily::INET,
            SocketAddr::V6(_) => AddressFamily::INET6,
        };
        let s = rustix::net::socket_with(family, SocketType::STREAM, SocketFlags::CLOEXEC, None)?;
        redirect_testkit::sock::set_int_option(&s, libc::SOL_SOCKET, libc::SO_MARK, ZTUNNEL_MARK as libc::c_int)?;
        sockopt::set_socket_reuseaddr(&s, true)?;
        redirect_testkit::sock::bind(&s, addr)?;
        rustix::net::listen(&s, 16)?;
        Ok(TcpListener::from(s))
    })?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// The (device, inode) of a namespace file or descriptor: equal for the same namespace.
pub fn ns_id(file: &std::fs::File) -> io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    let m = file.metadata()?;
    Ok((m.dev(), m.ino()))
}

/// [`ns_id`] of a descriptor.
pub fn fd_ns_id(fd: &OwnedFd) -> io::Result<(u64, u64)> {
    ns_id(&std::fs::File::from(fd.as_fd().try_clone_to_owned()?))
}
