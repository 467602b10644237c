//! The probe: one connection (or several, one after another) made from inside a workload.
//!
//! [`ProbeSpec`] is the test's side: it runs `redirect-testkit probe` as a child process and
//! parses its report. [`main`] is the child's side: it joins the cgroup and namespace and drops
//! to the given uid/gid itself, before any thread exists, so what the kernel sees is exactly a
//! workload process; then it connects and prints one JSON line ([`ProbeResult`]) per
//! connection.
//!
//! The report says where the connection landed: `local` and `peer` are what getsockname and
//! getpeername return right after connect (what the app sees: under capture, its original
//! destination as peer), `kernel_peer` where the kernel really connected the socket (the
//! capture port when captured), `banner` what the server that answered said about itself and
//! the addresses it saw.
//!
//! Either family: an IPv4 destination is dialed from an AF_INET socket, an IPv6 one from an
//! AF_INET6 socket, and with `--v4-mapped` an IPv4 destination `a.b.c.d` from an AF_INET6
//! socket (not V6ONLY) as `::ffff:a.b.c.d`, as a dual-stack application does. The addresses an
//! AF_INET6 socket reports stay as the kernel gave them (`[::ffff:10.200.1.1]:40000`).

use std::{
    io::{self, BufReader, Read, Write},
    net::{IpAddr, Shutdown, SocketAddr, TcpStream, UdpSocket},
    num::NonZeroUsize,
    os::fd::{FromRawFd, OwnedFd},
    path::PathBuf,
    process::ExitCode,
    time::{Duration, Instant},
};

use redirect_agent::sys;

mod spec;
mod with_tokio;

pub use spec::ProbeSpec;

use with_tokio::with_tokio;

use crate::{
    report::{Outcome, ProbeResult, SockoptReport},
    server::read_banner,
    sock::{self, RawSockAddr},
};

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
    /// Keep this real uid while `--uid` becomes the effective (and so filesystem) one, as a
    /// set-uid program runs: iptables' owner match reads the fsuid.
    #[arg(long)]
    pub real_uid: Option<u32>,
    /// Keep this real gid while `--gid` becomes the effective (and filesystem) one.
    #[arg(long)]
    pub real_gid: Option<u32>,
    /// SO_MARK to set on the socket before connecting (needs CAP_NET_ADMIN in the namespace).
    #[arg(long)]
    pub mark: Option<u32>,
    /// IP_TRANSPARENT (IPV6_TRANSPARENT) before binding: `--bind` may name an address no
    /// interface has, as a proxy dialing as its client does (CAP_NET_ADMIN).
    #[arg(long)]
    pub transparent: bool,
    /// SO_BINDTODEVICE: the device the socket is bound to before connecting (CAP_NET_RAW).
    #[arg(long)]
    pub device: Option<String>,
    /// Source address to bind before connecting (port 0): IPv4 or IPv6, in the family of the
    /// socket (an IPv4 one is bound v4-mapped by an AF_INET6 socket).
    #[arg(long)]
    pub bind: Option<IpAddr>,
    /// Destination, `A.B.C.D:PORT` or `[IPV6]:PORT`; repeat for several connections made one
    /// after another (one JSON line each, in order).
    #[arg(long, required = true)]
    pub connect: Vec<SocketAddr>,
    /// Dial each IPv4 destination from an AF_INET6 socket (not V6ONLY), as its v4-mapped
    /// address `::ffff:A.B.C.D`; IPv6 destinations are dialed as they are.
    #[arg(long)]
    pub v4_mapped: bool,
    /// Bytes to send (then half-close) and expect back.
    #[arg(long, default_value_t = 1024)]
    pub bytes: usize,
    /// Send `--bytes` as consecutive writes of at most this many bytes each (slices of the
    /// same data) instead of one, as a streaming app writes (the fast path must carry any write
    /// size).
    #[arg(long, conflicts_with_all = ["round_trips", "fill"])]
    pub write_size: Option<NonZeroUsize>,
    #[arg(long, default_value_t = 10_000)]
    pub timeout_ms: u64,
    /// After the banner, half-close, then block in a read that nothing answers until the
    /// timeout, as a blocking client waits for its reply: over TCP it ends `Timeout` after
    /// `--timeout-ms`; a wakeup without data can end it sooner on a sockhash socket (see
    /// docs/fast-path.md).
    #[arg(long, conflicts_with_all = ["round_trips", "fill", "tokio", "write_size", "sockopts"])]
    pub half_close_then_wait: bool,
    /// connect() a UDP socket instead, and report where the kernel connected it (no data).
    #[arg(long)]
    pub udp: bool,
    /// Send one UDP datagram instead (`sendto`, or `send` on a socket connected first with
    /// `--udp-connected`) and wait for the answer: the banner is its text, `peer` who sent it
    /// (`recvfrom`'s address; on a connected socket, `getpeername`).
    #[arg(long)]
    pub udp_exchange: bool,
    #[arg(long, requires = "udp_exchange")]
    pub udp_connected: bool,
    /// Instead of one exchange: this many request/response round trips of `--bytes` each
    /// (the server must echo as it reads), reporting the slowest.
    #[arg(long, default_value_t = 0)]
    pub round_trips: u64,
    /// Instead of one exchange: write until a write blocks for a second (or `--fill-cap` went),
    /// reporting how much the connection took in: a reader that stops must push back.
    #[arg(long)]
    pub fill: bool,
    /// The most `--fill` writes before it stops.
    #[arg(long, default_value_t = FILL_CAP)]
    pub fill_cap: usize,
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

/// Most `--fill` writes before giving up on back-pressure, unless `--fill-cap` says.
const FILL_CAP: usize = 256 << 20;

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

/// Moves this (single-threaded) process into the workload: cgroup, namespace, identity.
fn enter(args: &ProbeArgs) -> io::Result<()> {
    sys::join(args.cgroup.as_deref(), args.netns.as_deref())?;
    if args.real_uid.is_some() || args.real_gid.is_some() {
        become_setid(args)
    } else {
        sys::become_user(args.uid, args.gid)
    }
}

/// [`sys::become_user`] for a set-id program: effective (and so filesystem) ids `--uid` and
/// `--gid`, real and saved ones `--real-uid`/`--real-gid`; no supplementary groups. From root,
/// in this single-threaded process.
fn become_setid(args: &ProbeArgs) -> io::Result<()> {
    let (ruid, rgid) = (args.real_uid.unwrap_or(args.uid), args.real_gid.unwrap_or(args.gid));
    let check = |rc: libc::c_int, what: &str| {
        if rc == 0 {
            Ok(())
        } else {
            let e = io::Error::last_os_error();
            Err(io::Error::new(e.kind(), format!("{what}: {e}")))
        }
    };
    // SAFETY: plain id syscalls on this single-threaded process (the probe starts no thread
    // before it connects); groups first, while still root.
    unsafe {
        check(libc::setgroups(0, std::ptr::null()), "setgroups")?;
        check(libc::setresgid(rgid, args.gid, rgid), "setresgid")?;
        check(libc::setresuid(ruid, args.uid, ruid), "setresuid")
    }
}

/// A socket of `to`'s family, close-on-exec; an AF_INET6 one accepts v4-mapped addresses
/// whatever `net.ipv6.bindv6only` says. Bound to `--bind` if given, else (with `always_bind`)
/// to its family's unspecified address and port 0.
fn socket(args: &ProbeArgs, to: SocketAddr, ty: libc::c_int, always_bind: bool) -> io::Result<OwnedFd> {
    let family = RawSockAddr::from(to).family();
    // SAFETY: plain socket creation; ownership taken at once.
    let fd = unsafe { libc::socket(family, ty | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("socket: {e}")));
    }
    // SAFETY: `fd` is the descriptor socket() just returned (checked not negative above), and
    // nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let inet6 = family == libc::AF_INET6;
    if let Some(mark) = args.mark {
        sock::set_int_option(&fd, libc::SOL_SOCKET, libc::SO_MARK, mark as libc::c_int)?;
    }
    if let Some(device) = &args.device {
        sock::bind_to_device(&fd, device)?;
    }
    if args.transparent {
        let (level, option) = match inet6 {
            true => (libc::IPPROTO_IPV6, libc::IPV6_TRANSPARENT),
            false => (libc::IPPROTO_IP, libc::IP_TRANSPARENT),
        };
        sock::set_int_option(&fd, level, option, 1)?;
    }
    if inet6 {
        sock::set_int_option(&fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 0)?;
    }
    let unspecified = if inet6 {
        IpAddr::from(std::net::Ipv6Addr::UNSPECIFIED)
    } else {
        IpAddr::from(std::net::Ipv4Addr::UNSPECIFIED)
    };
    match args.bind {
        Some(ip) => sock::bind(&fd, sock::bind_addr(ip, inet6)?)?,
        None if always_bind => sock::bind(&fd, sock::bind_addr(unspecified, inet6)?)?,
        None => {}
    }
    Ok(fd)
}

/// `to` is the address as dialed (already v4-mapped if asked).
fn connect(args: &ProbeArgs, to: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let stream = TcpStream::from(socket(args, to, libc::SOCK_STREAM, false)?);
    // connect() honours SO_SNDTIMEO on Linux, which bounds a SYN nobody answers.
    stream.set_write_timeout(Some(timeout))?;
    stream.set_read_timeout(Some(timeout))?;
    sock::connect(&stream, to)?;
    Ok(stream)
}

fn pattern(n: usize) -> Vec<u8> {
    // Not a repeating short cycle, so a shifted or duplicated chunk shows up.
    (0..n).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect()
}

/// The writes one exchange sends `data` in: all of it at once, or `--write-size` slices.
fn writes<'a>(args: &ProbeArgs, data: &'a [u8]) -> std::slice::Chunks<'a, u8> {
    data.chunks(args.write_size.map_or(data.len().max(1), NonZeroUsize::get))
}

/// Where the kernel connected `stream` (the socket table's view), as the socket holds it:
/// v4-mapped on an AF_INET6 socket of an IPv4 connection.
fn kernel_peer(stream: &TcpStream) -> Option<SocketAddr> {
    crate::sockdiag::remote_of(stream.local_addr().ok()?).ok().flatten()
}

/// One datagram to `to` and its answer (`--udp-exchange`).
fn udp_exchange(args: &ProbeArgs, to: SocketAddr, result: &mut ProbeResult) -> io::Result<()> {
    let socket = UdpSocket::from(socket(args, to, libc::SOCK_DGRAM, args.bind.is_some())?);
    socket.set_read_timeout(Some(Duration::from_millis(args.timeout_ms)))?;
    let request = b"REDIRECT-TEST udp request\n";
    if args.udp_connected {
        sock::connect(&socket, to)?;
        socket.send(request)?;
    } else {
        socket.send_to(request, to)?;
    }
    let mut buf = [0u8; 512];
    let (n, from) = socket.recv_from(&mut buf)?;
    result.local = socket.local_addr().ok().map(|a| a.to_string());
    result.peer = Some(match args.udp_connected {
        true => socket.peer_addr()?.to_string(),
        false => from.to_string(),
    });
    result.banner = Some(String::from_utf8_lossy(&buf[..n]).trim_end().to_owned());
    Ok(())
}

/// `to` is the address as dialed (already v4-mapped if asked).
fn exchange(args: &ProbeArgs, to: SocketAddr, result: &mut ProbeResult) -> io::Result<()> {
    if args.udp_exchange {
        return udp_exchange(args, to, result);
    }
    if args.udp {
        let socket = UdpSocket::from(socket(args, to, libc::SOCK_DGRAM, true)?);
        sock::connect(&socket, to)?;
        result.local = socket.local_addr().ok().map(|a| a.to_string());
        result.peer = socket.peer_addr().ok().map(|a| a.to_string());
        return Ok(());
    }
    let timeout = Duration::from_millis(args.timeout_ms);
    let stream = connect(args, to, timeout)?;
    result.local = stream.local_addr().ok().map(|a| a.to_string());
    result.peer = stream.peer_addr().ok().map(|a| a.to_string());
    result.kernel_peer = kernel_peer(&stream).map(|a| a.to_string());
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
        return fill(&stream, args.fill_cap, result);
    }
    if args.half_close_then_wait {
        return half_close_then_wait(&stream, &mut reader, result);
    }
    let data = pattern(args.bytes);
    for chunk in writes(args, &data) {
        (&stream).write_all(chunk)?;
        result.sent += chunk.len();
    }
    stream.shutdown(Shutdown::Write)?;
    let mut back = Vec::with_capacity(data.len());
    reader.take(data.len() as u64 + 1).read_to_end(&mut back)?;
    result.received = back.len();
    result.intact = back == data;
    Ok(())
}

fn sockopts(stream: &TcpStream) -> io::Result<SockoptReport> {
    let mut report = SockoptReport::default();
    let mut buf = vec![0u8; 512];
    report.tcp_info_len = sock::getsockopt_bytes(stream, libc::IPPROTO_TCP, libc::TCP_INFO, &mut buf)?;
    report.tcp_state = buf[0];
    report.orig_dst_errno = sock::original_dst(stream).err().and_then(|e| e.raw_os_error());

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
    report.peer_groups_len = sock::getsockopt_bytes(&a, libc::SOL_SOCKET, libc::SO_PEERGROUPS, &mut buf)?;
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

/// `--half-close-then-wait`: the half-close comes from another thread once this one sleeps in
/// its read (`S` in its `/proc/self/task/TID/stat`, looked at for up to a second), so that
/// the read is blocked when the peer's ACK of the FIN wakes the socket.
fn half_close_then_wait(stream: &TcpStream, reader: &mut impl Read, result: &mut ProbeResult) -> io::Result<()> {
    let closer = stream.try_clone()?;
    // The reading thread is the process's first (the probe is single-threaded until here):
    // its id is the process's.
    let reader_tid = std::process::id();
    let half_close = std::thread::spawn(move || {
        redirect_agent::sys::wait_until_asleep(reader_tid, Duration::from_secs(1));
        closer.shutdown(Shutdown::Write)
    });
    let read = reader.read(&mut [0u8; 64]);
    half_close
        .join()
        .map_err(|_| io::Error::other("the half-closing thread panicked"))??;
    result.received = read?;
    Ok(())
}

fn fill(stream: &TcpStream, cap: usize, result: &mut ProbeResult) -> io::Result<()> {
    stream.set_write_timeout(Some(Duration::from_secs(1)))?;
    let chunk = pattern(64 * 1024);
    while result.sent < cap {
        match (&*stream).write(&chunk) {
            Ok(n) => result.sent += n,
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => break,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

pub fn main(args: &ProbeArgs) -> ExitCode {
    if let Err(e) = enter(args) {
        eprintln!("redirect-testkit probe: {e}");
        return ExitCode::FAILURE;
    }
    let mut out = io::stdout().lock();
    for &to in &args.connect {
        let start = Instant::now();
        let to = sock::dial_addr(to, args.v4_mapped);
        let mut result = ProbeResult {
            outcome: Outcome::Ok,
            error: None,
            dialed: Some(to.to_string()),
            local: None,
            peer: None,
            kernel_peer: None,
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
                eprintln!("redirect-testkit probe: {e}");
                return ExitCode::FAILURE;
            }
        };
        if writeln!(out, "{line}").is_err() {
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use std::path::Path;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        probe: ProbeArgs,
    }

    fn parse(args: &[&str]) -> Result<ProbeArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("probe").chain(args.iter().copied())).map(|c| c.probe)
    }

    #[test]
    fn connect_takes_either_family() {
        let a = parse(&[
            "--connect",
            "10.200.1.2:8080",
            "--connect",
            "[fd00::1]:80",
            "--connect",
            "[::ffff:10.200.1.2]:8080",
        ])
        .unwrap();
        let want: Vec<SocketAddr> = vec![
            "10.200.1.2:8080".parse().unwrap(),
            "[fd00::1]:80".parse().unwrap(),
            "[::ffff:10.200.1.2]:8080".parse().unwrap(),
        ];
        assert_eq!(a.connect, want);
        assert!(!a.v4_mapped);
        assert!(a.bind.is_none());
        assert!(parse(&["--connect", "fd00::1:80"]).is_err(), "IPv6 without brackets");
        assert!(parse(&["--connect", "[fd00::1]"]).is_err(), "no port");
    }

    #[test]
    fn v4_mapped_and_bind_of_either_family() {
        let a = parse(&["--v4-mapped", "--bind", "127.0.0.6", "--connect", "10.200.1.2:8080"]).unwrap();
        assert!(a.v4_mapped);
        assert_eq!(a.bind, Some(IpAddr::from([127, 0, 0, 6])));
        assert_eq!(
            sock::dial_addr(a.connect[0], a.v4_mapped).to_string(),
            "[::ffff:10.200.1.2]:8080"
        );
        let a = parse(&["--bind", "fd00:200:0:1::1", "--connect", "[fd00:200:0:1::2]:8080"]).unwrap();
        assert_eq!(a.bind, Some("fd00:200:0:1::1".parse().unwrap()));
    }

    #[test]
    fn a_spec_takes_either_family_and_stays_what_it_was_for_ipv4() {
        let v4 = std::net::SocketAddrV4::new([10, 200, 1, 2].into(), 8080);
        let spec = ProbeSpec::new(Path::new("/cg"), Path::new("/ns"), v4).bind(std::net::Ipv4Addr::LOCALHOST);
        assert_eq!(spec.connect, SocketAddr::from(v4));
        assert_eq!(spec.bind, Some(IpAddr::from([127, 0, 0, 1])));
        assert!(!spec.v4_mapped);
        assert!(spec.v4_mapped().v4_mapped);
        let v6: std::net::SocketAddrV6 = "[fd00:200:0:1::2]:8080".parse().unwrap();
        let spec = ProbeSpec::outside(Path::new("/ns"), v6);
        assert_eq!(spec.connect.to_string(), "[fd00:200:0:1::2]:8080");
        assert!(spec.cgroup.is_none());
    }

    #[test]
    fn a_write_size_slices_the_one_exchange() {
        let with = |more: &[&str]| parse(&[&["--connect", "10.200.1.2:8080"][..], more].concat());
        let sizes = |a: &ProbeArgs| writes(a, &pattern(a.bytes)).map(<[u8]>::len).collect::<Vec<_>>();
        let a = with(&["--bytes", "10", "--write-size", "4"]).unwrap();
        assert_eq!(sizes(&a), [4, 4, 2]);
        let data = pattern(10);
        assert_eq!(
            writes(&a, &data).collect::<Vec<_>>().concat(),
            data,
            "the slices make up the data"
        );
        assert_eq!(sizes(&with(&["--bytes", "10"]).unwrap()), [10], "one write without it");
        assert!(sizes(&with(&["--bytes", "0"]).unwrap()).is_empty());
        assert!(with(&["--write-size", "0"]).is_err(), "a write of nothing");
        assert!(with(&["--write-size", "4", "--fill"]).is_err());
        assert!(with(&["--write-size", "4", "--round-trips", "2"]).is_err());
    }
}
