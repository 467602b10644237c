//! `redirect-agent probe` (hidden): one connection made from inside a workload, reported as
//! one JSON line. It joins the cgroup and namespace and drops to the given uid/gid itself,
//! before any thread exists, so what the kernel sees is exactly a workload process.
//!
//! The report says where the connection landed as the kernel saw it: `peer` is what
//! getpeername returns after connect (the capture port when connect4 rewrote it), `banner` is
//! what the server that answered said about itself and the addresses it saw.

use std::{
    io::{self, BufReader, Read, Write},
    net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpStream},
    os::fd::{FromRawFd, OwnedFd},
    path::PathBuf,
    process::ExitCode,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use crate::sandbox::read_banner;

#[derive(clap::Args, Debug, Clone)]
pub struct ProbeArgs {
    /// cgroup v2 directory to join first.
    #[arg(long)]
    pub cgroup: Option<PathBuf>,
    /// Network namespace to enter.
    #[arg(long)]
    pub netns: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    pub uid: u32,
    #[arg(long, default_value_t = 0)]
    pub gid: u32,
    /// Source address to bind before connecting.
    #[arg(long)]
    pub bind: Option<Ipv4Addr>,
    /// Destination; repeat for several connections made one after another (one JSON line
    /// each, in order).
    #[arg(long, required = true)]
    pub connect: Vec<SocketAddrV4>,
    /// Bytes to send (then half-close) and expect back.
    #[arg(long, default_value_t = 1024)]
    pub bytes: usize,
    #[arg(long, default_value_t = 10_000)]
    pub timeout_ms: u64,
    /// connect() a UDP socket instead, and report where the kernel connected it (no data).
    #[arg(long)]
    pub udp: bool,
    /// Instead of one exchange: this many request/response round trips of `--bytes` each
    /// (the server must echo as it reads), reporting the slowest.
    #[arg(long, default_value_t = 0)]
    pub round_trips: u64,
    /// Instead of one exchange: write until a write blocks for a second (or 256 MiB went),
    /// reporting how much the connection took in: a reader that stops must push back.
    #[arg(long)]
    pub fill: bool,
    /// Exchange the bytes with tokio (non-blocking socket, epoll readiness), as the proxy and
    /// most servers do, instead of blocking calls.
    #[arg(long)]
    pub tokio: bool,
    /// Instead of an exchange: ask the kernel for socket options the agent's getsockopt
    /// program must leave alone (see [`SockoptReport`]).
    #[arg(long)]
    pub sockopts: bool,
}

/// Supplementary groups the `--sockopts` probe takes: 2,000 of them make SO_PEERGROUPS 8,000
/// bytes, past the page the getsockopt program sees.
const PEER_GROUPS: u32 = 2000;

/// What `--sockopts` saw, from inside the workload's cgroup (where the program runs).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SockoptReport {
    /// TCP_INFO on the probe's connection: length and `tcpi_state`.
    pub tcp_info_len: u32,
    pub tcp_state: u8,
    /// SO_PEERGROUPS of a unix socketpair, asked with a 16 KiB buffer: the length the kernel
    /// returned, and whether the groups were ours.
    pub peer_groups_len: u32,
    pub peer_groups_intact: bool,
    /// errno of SO_ORIGINAL_DST on the probe's own (connecting) socket, which nobody
    /// redirected *to*: the kernel's answer must stand.
    pub orig_dst_errno: Option<i32>,
}

/// Most `--fill` writes before giving up on back-pressure.
const FILL_CAP: usize = 256 << 20;

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Connected, exchanged the bytes, saw a clean EOF.
    Ok,
    Refused,
    Reset,
    Timeout,
    Unreachable,
    /// A clean EOF before the exchange finished.
    Closed,
    Other,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProbeResult {
    pub outcome: Outcome,
    pub error: Option<String>,
    /// The socket's local address after connect.
    pub local: Option<String>,
    /// getpeername after connect: where the kernel connected the socket.
    pub peer: Option<String>,
    /// The first line the server sent (see `sandbox::server_banner`).
    pub banner: Option<String>,
    pub sent: usize,
    pub received: usize,
    /// The bytes that came back are the bytes that were sent.
    pub intact: bool,
    pub elapsed_ms: u64,
    /// `--round-trips`: how many completed, and the slowest one.
    #[serde(default)]
    pub round_trips: u64,
    #[serde(default)]
    pub slowest_round_trip_us: u64,
    #[serde(default)]
    pub sockopts: Option<SockoptReport>,
}

impl ProbeResult {
    /// A `key=value` field of the banner (`name`, `local`, `peer`).
    pub fn banner_field(&self, key: &str) -> Option<&str> {
        let b = self.banner.as_deref()?;
        b.split_whitespace()
            .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
    }

    /// The port the kernel connected the socket to.
    pub fn peer_port(&self) -> Option<u16> {
        self.peer.as_deref()?.parse::<SocketAddr>().ok().map(|a| a.port())
    }
}

fn classify(e: &io::Error) -> Outcome {
    match e.raw_os_error() {
        Some(libc::ECONNREFUSED) => Outcome::Refused,
        Some(libc::ECONNRESET | libc::EPIPE | libc::ECONNABORTED) => Outcome::Reset,
        Some(libc::ETIMEDOUT | libc::EAGAIN | libc::EINPROGRESS) => Outcome::Timeout,
        Some(libc::ENETUNREACH | libc::EHOSTUNREACH) => Outcome::Unreachable,
        _ if e.kind() == io::ErrorKind::UnexpectedEof => Outcome::Closed,
        _ => Outcome::Other,
    }
}

fn check(rc: libc::c_int, what: &str) -> io::Result<()> {
    if rc < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    Ok(())
}

/// Moves this (single-threaded) process into the workload: cgroup, namespace, identity.
fn enter(args: &ProbeArgs) -> io::Result<()> {
    crate::sys::join(args.cgroup.as_deref(), args.netns.as_deref())?;
    crate::sys::become_user(args.uid, args.gid)?;
    Ok(())
}

fn connect(args: &ProbeArgs, to: SocketAddrV4, timeout: Duration) -> io::Result<TcpStream> {
    // SAFETY: plain socket creation; ownership taken at once.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    check(fd, "socket")?;
    // SAFETY: fresh valid fd.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let stream = TcpStream::from(fd);
    // connect() honours SO_SNDTIMEO on Linux, which bounds a SYN nobody answers.
    stream.set_write_timeout(Some(timeout))?;
    stream.set_read_timeout(Some(timeout))?;
    let raw = std::os::fd::AsRawFd::as_raw_fd(&stream);
    let sockaddr = |a: SocketAddrV4| libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*a.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as u32;
    if let Some(ip) = args.bind {
        let sa = sockaddr(SocketAddrV4::new(ip, 0));
        // SAFETY: pointer and length describe `sa`.
        check(unsafe { libc::bind(raw, (&raw const sa).cast(), len) }, "bind")?;
    }
    let sa = sockaddr(to);
    // SAFETY: pointer and length describe `sa`.
    if unsafe { libc::connect(raw, (&raw const sa).cast(), len) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stream)
}

fn pattern(n: usize) -> Vec<u8> {
    // Not a repeating short cycle, so a shifted or duplicated chunk shows up.
    (0..n).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect()
}

fn exchange(args: &ProbeArgs, to: SocketAddrV4, result: &mut ProbeResult) -> io::Result<()> {
    if args.udp {
        let socket = std::net::UdpSocket::bind(SocketAddrV4::new(args.bind.unwrap_or(Ipv4Addr::UNSPECIFIED), 0))?;
        socket.connect(to)?;
        result.local = socket.local_addr().ok().map(|a| a.to_string());
        result.peer = socket.peer_addr().ok().map(|a| a.to_string());
        return Ok(());
    }
    let timeout = Duration::from_millis(args.timeout_ms);
    let stream = connect(args, to, timeout)?;
    result.local = stream.local_addr().ok().map(|a| a.to_string());
    result.peer = stream.peer_addr().ok().map(|a| a.to_string());
    if args.tokio {
        return with_tokio(args, stream, timeout, result);
    }
    if args.sockopts {
        result.sockopts = Some(sockopts(&stream)?);
        return Ok(());
    }
    let mut reader = BufReader::new(stream.try_clone()?);
    result.banner = Some(read_banner(&mut reader)?);
    if args.round_trips > 0 {
        return round_trips(args, &stream, &mut reader, result);
    }
    if args.fill {
        return fill(&stream, result);
    }
    let data = pattern(args.bytes);
    (&stream).write_all(&data)?;
    result.sent = data.len();
    stream.shutdown(Shutdown::Write)?;
    let mut back = Vec::with_capacity(data.len());
    reader.take(data.len() as u64 + 1).read_to_end(&mut back)?;
    result.received = back.len();
    result.intact = back == data;
    Ok(())
}

fn raw_getsockopt(fd: &impl std::os::fd::AsRawFd, level: i32, name: i32, buf: &mut [u8]) -> io::Result<u32> {
    let mut len = buf.len() as libc::socklen_t;
    // SAFETY: the buffer is `len` bytes; the kernel writes at most that many.
    let rc = unsafe { libc::getsockopt(fd.as_raw_fd(), level, name, buf.as_mut_ptr().cast(), &raw mut len) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(len)
}

fn sockopts(stream: &TcpStream) -> io::Result<SockoptReport> {
    let mut report = SockoptReport::default();
    let mut buf = vec![0u8; 512];
    report.tcp_info_len = raw_getsockopt(stream, libc::IPPROTO_TCP, libc::TCP_INFO, &mut buf)?;
    report.tcp_state = buf[0];
    report.orig_dst_errno = crate::sys::original_dst(stream).err().and_then(|e| e.raw_os_error());

    let groups: Vec<libc::gid_t> = (0..PEER_GROUPS).map(|i| 100_000 + i).collect();
    // SAFETY: plain credential syscall with a valid slice.
    if unsafe { libc::setgroups(groups.len(), groups.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = [0; 2];
    // SAFETY: fds has room for two descriptors.
    if unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    } != 0
    {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fresh descriptors, owned from here.
    let (a, _b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let mut buf = vec![0u8; 16 * 1024];
    report.peer_groups_len = raw_getsockopt(&a, libc::SOL_SOCKET, libc::SO_PEERGROUPS, &mut buf)?;
    let got: Vec<libc::gid_t> = buf[..report.peer_groups_len as usize]
        .chunks_exact(4)
        .map(|c| libc::gid_t::from_ne_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    report.peer_groups_intact = got == groups;
    Ok(report)
}

fn round_trips(
    args: &ProbeArgs,
    stream: &TcpStream,
    reader: &mut BufReader<TcpStream>,
    result: &mut ProbeResult,
) -> io::Result<()> {
    let data = pattern(args.bytes);
    let mut back = vec![0u8; data.len()];
    result.intact = true;
    for _ in 0..args.round_trips {
        let start = Instant::now();
        (&*stream).write_all(&data)?;
        reader.read_exact(&mut back)?;
        result.slowest_round_trip_us = result.slowest_round_trip_us.max(start.elapsed().as_micros() as u64);
        result.sent += data.len();
        result.received += back.len();
        result.intact &= back == data;
        result.round_trips += 1;
    }
    stream.shutdown(Shutdown::Write)?;
    Ok(())
}

fn fill(stream: &TcpStream, result: &mut ProbeResult) -> io::Result<()> {
    stream.set_write_timeout(Some(Duration::from_secs(1)))?;
    let chunk = pattern(64 * 1024);
    while result.sent < FILL_CAP {
        match (&*stream).write(&chunk) {
            Ok(n) => result.sent += n,
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => break,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The same exchanges as the blocking path, driven by a current-thread tokio runtime (made
/// after the process entered the workload, so it stays one thread).
fn with_tokio(args: &ProbeArgs, stream: TcpStream, timeout: Duration, result: &mut ProbeResult) -> io::Result<()> {
    use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _};

    // Each step is bounded: a lost wakeup shows as a timeout, never as a hang.
    async fn bounded<T>(t: Duration, f: impl std::future::Future<Output = io::Result<T>>) -> io::Result<T> {
        tokio::time::timeout(t, f)
            .await
            .map_err(|_| io::Error::from_raw_os_error(libc::ETIMEDOUT))?
    }

    stream.set_nonblocking(true)?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let mut stream = tokio::net::TcpStream::from_std(stream)?;
        let (r, mut w) = stream.split();
        let mut r = tokio::io::BufReader::new(r);
        let mut banner = Vec::new();
        bounded(timeout, (&mut r).take(512).read_until(b'\n', &mut banner)).await?;
        if banner.last() != Some(&b'\n') {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "no banner from server"));
        }
        result.banner = Some(String::from_utf8_lossy(&banner).trim_end().to_owned());
        let data = pattern(args.bytes);
        if args.round_trips > 0 {
            let mut back = vec![0u8; data.len()];
            result.intact = true;
            for _ in 0..args.round_trips {
                let start = Instant::now();
                bounded(timeout, w.write_all(&data)).await?;
                bounded(timeout, r.read_exact(&mut back)).await?;
                let took = start.elapsed().as_micros() as u64;
                result.slowest_round_trip_us = result.slowest_round_trip_us.max(took);
                result.sent += data.len();
                result.received += back.len();
                result.intact &= back == data;
                result.round_trips += 1;
            }
            return bounded(timeout, w.shutdown()).await;
        }
        if args.fill {
            let chunk = pattern(64 * 1024);
            while result.sent < FILL_CAP {
                match tokio::time::timeout(Duration::from_secs(1), w.write(&chunk)).await {
                    Ok(n) => result.sent += n?,
                    Err(_) => break,
                }
            }
            return Ok(());
        }
        bounded(timeout, w.write_all(&data)).await?;
        result.sent = data.len();
        bounded(timeout, w.shutdown()).await?;
        let mut back = Vec::with_capacity(data.len());
        bounded(timeout, (&mut r).take(data.len() as u64 + 1).read_to_end(&mut back)).await?;
        result.received = back.len();
        result.intact = back == data;
        Ok(())
    })
}

pub fn main(args: &ProbeArgs) -> ExitCode {
    if let Err(e) = enter(args) {
        eprintln!("redirect-agent probe: {e}");
        return ExitCode::FAILURE;
    }
    let mut out = io::stdout().lock();
    for &to in &args.connect {
        let start = Instant::now();
        let mut result = ProbeResult {
            outcome: Outcome::Ok,
            error: None,
            local: None,
            peer: None,
            banner: None,
            sent: 0,
            received: 0,
            intact: false,
            elapsed_ms: 0,
            round_trips: 0,
            slowest_round_trip_us: 0,
            sockopts: None,
        };
        if let Err(e) = exchange(args, to, &mut result) {
            result.outcome = classify(&e);
            result.error = Some(e.to_string());
        }
        result.elapsed_ms = start.elapsed().as_millis() as u64;
        let line = match serde_json::to_string(&result) {
            Ok(line) => line,
            Err(e) => {
                eprintln!("redirect-agent probe: {e}");
                return ExitCode::FAILURE;
            }
        };
        if writeln!(out, "{line}").is_err() {
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}
