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
}

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
    let mut reader = BufReader::new(stream.try_clone()?);
    result.banner = Some(read_banner(&mut reader)?);
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
