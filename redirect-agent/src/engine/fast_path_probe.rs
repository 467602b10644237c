//! Whether this kernel is safe for the fast path, found by trying it (`--fast-path=auto`, the
//! default): two behaviours of sockets in a sockhash decide it (docs/fast-path.md, "When it is
//! on"), and neither follows from a kernel version, since stable kernels take and drop fixes.
//!
//! The probe loads sk_msg and the verdict with maps of their own ([`super::object::fast_path_trial`]),
//! connects two pairs of sockets over loopback in the agent's own namespace, enrolls both ends
//! of each as sock_ops would, and watches what the kernel does:
//!
//! - **A stopped reader pushes back.** One end writes, non-blocking, to a peer with a small
//!   receive buffer that never reads. Over TCP the writes would stop (EAGAIN) once the peer's
//!   buffer and the writer's filled; a redirected message is charged to the peer without a
//!   look at its buffer (`bpf_tcp_ingress`), so on kernels that still do that the writer gets
//!   [`PUSH_BACK_CAP`] in without one refusal. The messages must have been redirected (the
//!   sender's state says so), or the probe proved nothing.
//! - **A blocking read waits out its timeout.** One end blocks in `read()` with a timeout, and
//!   once it sleeps there another thread half-closes it: the peer's ACK of the FIN moves it to
//!   FIN_WAIT2 and wakes its waiters, with no data. A TCP socket goes on waiting; `tcp_bpf_recvmsg(_parser)` ends
//!   the read with EAGAIN at that wakeup, long before the timeout, which fails blocking
//!   clients ([`EARLY`] after the half-close is "early").
//!
//! Both take well under a second on a kernel that has the faults (the first fills 8 MiB at
//! memory speed, the second returns at the wakeup), and at most [`READ_TIMEOUT`] more on one
//! that does not.

use std::{
    io::{self, Read as _, Write as _},
    net::{Ipv4Addr, Shutdown, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use redirect_common::{TupleKey, fast_path};
use serde::Serialize;

use crate::{error::LoadError, flags::FastPathWhen, proxy::FastPathSockets};

/// What the writer may get in, to a peer that never reads, before the probe calls it
/// unbounded: TCP stops it at the two sockets' buffers, a few hundred KiB with both set to
/// [`PROBE_BUF`].
pub const PUSH_BACK_CAP: u64 = 8 << 20;
const PROBE_BUF: usize = 64 << 10;
/// The blocked read's timeout, and how soon after the half-close it counts as ended early
/// (the slack between them is for a loaded machine, where the half-close may come late).
const READ_TIMEOUT: Duration = Duration::from_millis(1000);
const EARLY: Duration = Duration::from_millis(300);

/// What the probe found.
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Findings {
    /// A writer whose peer stopped reading was refused (EAGAIN) before [`PUSH_BACK_CAP`].
    pub pushes_back: bool,
    /// What that writer got in before it was refused or reached the cap, in bytes.
    pub taken_in: u64,
    /// How its last write ended when it was not EAGAIN (ENOMEM on a machine short of TCP
    /// memory): the kernel's words.
    pub write_error: Option<String>,
    /// A blocking read outlived a wakeup without data.
    pub blocking_reads_wait: bool,
    /// How long that read went on after the half-close, in milliseconds (its timeout,
    /// [`READ_TIMEOUT`], counts from before it).
    pub read_ms: u64,
}

impl Findings {
    /// The fast path can be on by default: neither fault showed.
    pub fn safe(&self) -> bool {
        self.pushes_back && self.blocking_reads_wait
    }

    /// Why not, in a phrase per fault; empty when [`Findings::safe`].
    pub fn faults(&self) -> Vec<String> {
        let mut faults = Vec::new();
        if !self.pushes_back {
            let how = match &self.write_error {
                Some(e) => format!("until its write failed ({e})"),
                None => "without one refusal".to_owned(),
            };
            faults.push(format!(
                "a writer whose reader stopped took {} KiB in {how}: sk_msg's redirect does not push back",
                self.taken_in >> 10
            ));
        }
        if !self.blocking_reads_wait {
            faults.push(format!(
                "a blocking read with a {} ms timeout ended {} ms after a wakeup without data (a half-close)",
                READ_TIMEOUT.as_millis(),
                self.read_ms
            ));
        }
        faults
    }
}

/// Why the probe could not tell.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("loading the fast path's programs: {0}")]
    Load(#[from] LoadError),
    #[error("{0}: {1}")]
    Io(&'static str, io::Error),
    #[error("enrolling a socket in the probe's sockhash: {0}")]
    Map(#[from] aya::maps::MapError),
    #[error("the probe's messages did not take the fast path (sender state {0})")]
    NotRedirected(u8),
}

fn io(what: &'static str) -> impl FnOnce(io::Error) -> ProbeError {
    move |e| ProbeError::Io(what, e)
}

/// What `--fast-path` decided, and why: said in the log once the start succeeded
/// ([`Decision::log`]), so that a refused start prints only why it was refused.
pub struct Decision {
    pub on: bool,
    how: How,
}

enum How {
    /// `--fast-path=on` or `off`.
    Said,
    /// `auto` with pins: as the pinned maps were made.
    Pinned,
    /// `auto` without: what the probe found, or why it could not tell.
    Probed(Result<Findings, String>),
}

impl Decision {
    pub fn log(&self) {
        let on = if self.on { "on" } else { "off" };
        match &self.how {
            How::Said => tracing::info!("fast path: {on}, as --fast-path says"),
            How::Pinned => tracing::info!(
                "fast path: {on} (--fast-path=auto), as the pinned maps were made (after a `cleanup` the probe \
                 decides anew)"
            ),
            How::Probed(p @ Ok(_)) => tracing::info!("fast path (--fast-path=auto): {}", verdict(p)),
            How::Probed(p @ Err(_)) => tracing::warn!("fast path (--fast-path=auto): {}", verdict(p)),
        }
    }
}

/// The probe's answer in a line, `on: …` or `off: …` with why: what the agent logs and
/// `check` prints.
pub fn verdict(probed: &Result<Findings, String>) -> String {
    match probed {
        Ok(f) if f.safe() => format!(
            "on: a stopped reader pushed back after {} KiB, a blocking read waited out its timeout",
            f.taken_in >> 10
        ),
        Ok(f) => format!("off: {}", f.faults().join("; ")),
        Err(e) => format!("off: the probe failed: {e}"),
    }
}

/// Whether the fast path is on for `--fast-path=when`. For `auto`: as the instance's pinned
/// maps were made (`pinned`, [`super::pins::pinned_fast_path`]), since a start that decided
/// otherwise could not reuse them (a node's restart or handover, a killed run's successor);
/// without pins, the probe's answer (a probe that cannot tell leaves it off).
pub fn decide(when: FastPathWhen, pinned: Option<bool>) -> Decision {
    match (when, pinned) {
        (FastPathWhen::On, _) => Decision {
            on: true,
            how: How::Said,
        },
        (FastPathWhen::Off, _) => Decision {
            on: false,
            how: How::Said,
        },
        (FastPathWhen::Auto, Some(on)) => Decision { on, how: How::Pinned },
        (FastPathWhen::Auto, None) => {
            let probed = probe().map_err(|e| e.to_string());
            Decision {
                on: probed.as_ref().is_ok_and(Findings::safe),
                how: How::Probed(probed),
            }
        }
    }
}

/// Tries both behaviours on this kernel. Needs what loading programs needs (CAP_BPF,
/// CAP_NET_ADMIN) and loopback in the calling thread's namespace.
pub fn probe() -> Result<Findings, ProbeError> {
    let (_ebpf, map, senders) = super::object::fast_path_trial()?;
    let mut sockets = FastPathSockets::new(map, senders);
    let netns = crate::sys::current_netns_cookie().map_err(io("the namespace's cookie"))?;
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(io("a loopback listener"))?;
    let pair = |sockets: &mut FastPathSockets| -> Result<(TcpStream, TcpStream, TupleKey), ProbeError> {
        let to = listener.local_addr().map_err(io("its address"))?;
        // Bounded: a firewall that drops SYNs to loopback must not stall the start.
        let near = TcpStream::connect_timeout(&to, Duration::from_secs(2)).map_err(io("connect"))?;
        let (far, _) = listener.accept().map_err(io("accept"))?;
        let key = |s: &TcpStream| -> Result<TupleKey, ProbeError> {
            let (l, p) = (s.local_addr(), s.peer_addr());
            Ok(TupleKey::from_addrs(
                netns,
                l.map_err(io("an address"))?,
                p.map_err(io("an address"))?,
            ))
        };
        let (near_key, far_key) = (key(&near)?, key(&far)?);
        sockets.enroll(near_key, &near)?;
        sockets.enroll(far_key, &far)?;
        Ok((near, far, near_key))
    };

    // A stopped reader: `far` never reads.
    let (writer, far, writer_key) = pair(&mut sockets)?;
    let (pushes_back, taken_in, write_error) = stopped_reader(&writer, &far)?;
    let state = sockets.state(&writer_key)?;
    if state != fast_path::REDIRECT {
        return Err(ProbeError::NotRedirected(state));
    }
    drop((writer, far));
    let (peer, reader, _) = pair(&mut sockets)?;
    let (blocking_reads_wait, read) = blocked_read(reader)?;
    drop(peer);
    Ok(Findings {
        pushes_back,
        taken_in,
        write_error,
        blocking_reads_wait,
        read_ms: read.as_millis() as u64,
    })
}

/// `writer` writes, non-blocking, to `far`, which never reads: whether it was refused (EAGAIN)
/// before [`PUSH_BACK_CAP`], what it got in, and how a write failed otherwise.
fn stopped_reader(writer: &TcpStream, far: &TcpStream) -> Result<(bool, u64, Option<String>), ProbeError> {
    socket2::SockRef::from(far)
        .set_recv_buffer_size(PROBE_BUF)
        .map_err(io("SO_RCVBUF"))?;
    socket2::SockRef::from(writer)
        .set_send_buffer_size(PROBE_BUF)
        .map_err(io("SO_SNDBUF"))?;
    writer.set_nonblocking(true).map_err(io("O_NONBLOCK"))?;
    let chunk = vec![0u8; 64 << 10];
    let mut taken_in = 0u64;
    while taken_in < PUSH_BACK_CAP {
        match (&*writer).write(&chunk) {
            Ok(n) => taken_in += n as u64,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok((true, taken_in, None)),
            Err(e) => return Ok((false, taken_in, Some(e.to_string()))),
        }
    }
    Ok((false, taken_in, None))
}

/// `reader` blocks in `read()` with a timeout while another thread half-closes it, once it
/// sleeps in the read (the peer's ACK of the FIN then wakes it, with no data): whether the
/// read went on for [`EARLY`] after the half-close and ended with its timeout, and how long it
/// went on after it.
fn blocked_read(reader: TcpStream) -> Result<(bool, Duration), ProbeError> {
    reader.set_read_timeout(Some(READ_TIMEOUT)).map_err(io("SO_RCVTIMEO"))?;
    let closer = reader.try_clone().map_err(io("dup"))?;
    let tid = rustix::thread::gettid().as_raw_nonzero().get().unsigned_abs();
    let half_close = std::thread::spawn(move || {
        // A wakeup before the reader sleeps would prove nothing.
        crate::sys::wait_until_asleep(tid, READ_TIMEOUT);
        closer.shutdown(Shutdown::Write).map(|()| Instant::now())
    });
    let read = (&reader).read(&mut [0u8; 16]);
    let ended = Instant::now();
    let closed_at = half_close
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("the half-closing thread panicked")))
        .map_err(io("shutdown"))?;
    let after = ended.saturating_duration_since(closed_at);
    // Nothing is ever sent to it: any answer but a timeout's is the fault, however it ends.
    let timed_out = matches!(&read, Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut));
    Ok((timed_out && after >= EARLY, after))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp_pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let near = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        (near, listener.accept().unwrap().0)
    }

    /// The measurements on plain TCP, which has neither fault: the writer is refused once the
    /// buffers fill, and the read waits out its timeout through the half-close. So the probe's
    /// "unsafe" on a kernel is the sockhash's doing, not the measurement's.
    #[test]
    fn plain_tcp_pushes_back_and_waits() {
        let (writer, far) = tcp_pair();
        let (pushes_back, taken_in, error) = stopped_reader(&writer, &far).unwrap();
        assert!(pushes_back && error.is_none(), "{taken_in} {error:?}");
        assert!(taken_in < PUSH_BACK_CAP / 8, "{taken_in}");
        let (_peer, reader) = tcp_pair();
        let (waited, took) = blocked_read(reader).unwrap();
        assert!(waited, "{took:?}");
        assert!(took >= EARLY, "{took:?}");
    }
}
