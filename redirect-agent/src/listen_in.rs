//! Capture listeners that belong to the workload's cgroup, for the embedded proxy with
//! `--fast-path`.
//!
//! A socket belongs to the cgroup of the task that made it, and an accepted socket to its
//! listener's; sock_ops only runs for sockets of the cgroup it is attached to. The proxy's
//! end of app -> 15001 must join the sockhash at its handshake, before the app's first
//! write, so the listener must be the workload's, as a sidecar's are. The agent cannot move
//! one of its threads into the cgroup (cgroup v2 moves whole processes), so a short-lived
//! child of its own binary (`redirect-agent listen-in`, hidden) joins the cgroup and namespace,
//! listens, and waits while the agent takes the sockets with `pidfd_getfd`; then it exits.

use std::{
    io::{self, BufRead as _, BufReader, Read as _, Write as _},
    net::SocketAddr,
    os::fd::{AsRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
};

use crate::proxy::{Side, no_ipv6};

#[derive(clap::Args, Debug, Clone)]
pub struct ListenInArgs {
    /// cgroup v2 directory to join first.
    #[arg(long)]
    pub cgroup: PathBuf,
    /// Network namespace to enter.
    #[arg(long)]
    pub netns: PathBuf,
    /// ADDR:PORT to listen on (`[ADDR]:PORT` for IPv6); repeat for more.
    #[arg(long, required = true)]
    pub listen: Vec<SocketAddr>,
    #[arg(long, default_value_t = 1024)]
    pub backlog: i32,
    /// A `--listen` address to make IP_TRANSPARENT before it binds (TPROXY mode's inbound
    /// listener); repeat for more.
    #[arg(long)]
    pub transparent: Vec<SocketAddr>,
}

/// The child: prints `fds N M ...` once every socket listens (one word per `--listen`, in
/// order; `-` for an IPv6 one the namespace has no IPv6 for), then holds them until stdin
/// closes.
pub fn main(args: &ListenInArgs) -> ExitCode {
    let made = crate::sys::join(Some(&args.cgroup), Some(&args.netns)).and_then(|()| {
        args.listen
            .iter()
            .map(
                |addr| match listen(*addr, args.backlog, args.transparent.contains(addr)) {
                    Ok(l) => Ok(Some(l)),
                    Err(e) if addr.is_ipv6() && no_ipv6(&e) => Ok(None),
                    Err(e) => Err(io::Error::new(e.kind(), format!("listen on {addr}: {e}"))),
                },
            )
            .collect::<io::Result<Vec<_>>>()
    });
    let listeners = match made {
        Ok(l) => l,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let fds: Vec<String> = listeners
        .iter()
        .map(|l| l.as_ref().map_or_else(|| "-".to_owned(), |l| l.as_raw_fd().to_string()))
        .collect();
    println!("fds {}", fds.join(" "));
    let _ = io::stdout().flush();
    let _ = io::stdin().read_to_end(&mut Vec::new());
    ExitCode::SUCCESS
}

/// A capture listener as the proxy makes them (`proxy::listen::bind`), listening.
fn listen(addr: SocketAddr, backlog: i32, transparent: bool) -> io::Result<std::net::TcpListener> {
    let s = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    match (transparent, addr) {
        (true, SocketAddr::V4(_)) => s.set_ip_transparent_v4(true)?,
        (true, SocketAddr::V6(_)) => s.set_ip_transparent_v6(true)?,
        _ => {}
    }
    s.set_reuse_address(true)?;
    s.bind(&addr.into())?;
    s.listen(backlog)?;
    Ok(s.into())
}

/// Listening sockets on `addrs`, made inside `cgroup` and `netns` by a child, owned by us
/// (without the IPv6 ones where the namespace has no IPv6).
pub fn listeners(
    cgroup: &Path,
    netns: &Path,
    addrs: &[(Side, SocketAddr)],
    backlog: u32,
    transparent_inbound: bool,
) -> io::Result<Vec<(Side, OwnedFd)>> {
    let exe = std::env::current_exe()?;
    let mut cmd = Command::new(exe);
    cmd.arg("listen-in")
        .arg("--cgroup")
        .arg(cgroup)
        .arg("--netns")
        .arg(netns)
        .arg("--backlog")
        .arg(backlog.to_string());
    for (side, a) in addrs {
        cmd.arg("--listen").arg(a.to_string());
        if transparent_inbound && *side == Side::Inbound {
            cmd.arg("--transparent").arg(a.to_string());
        }
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let pid = child.id() as i32;
    let mut line = String::new();
    let read = BufReader::new(child.stdout.take().expect("piped")).read_line(&mut line);
    let taken = read.and_then(|_| {
        let Some(fds) = line.trim().strip_prefix("fds ") else {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            return Err(io::Error::other(format!(
                "listening inside cgroup {}: {}",
                cgroup.display(),
                err.trim()
            )));
        };
        let words: Vec<&str> = fds.split_whitespace().collect();
        if words.len() != addrs.len() {
            return Err(io::Error::other(format!("listen-in answered '{}'", line.trim())));
        }
        let mut out = Vec::new();
        for ((side, addr), fd) in addrs.iter().zip(words) {
            if fd == "-" {
                tracing::warn!(%addr, "no IPv6 in this namespace: listening on IPv4 only");
                continue;
            }
            let fd: i32 = fd.parse().map_err(|_| io::Error::other(format!("bad fd '{fd}'")))?;
            out.push((*side, crate::adopt::dup_from(pid, fd)?));
        }
        Ok(out)
    });
    // Closing its stdin ends it; our duplicates keep the sockets.
    drop(child.stdin.take());
    let _ = child.wait();
    taken
}
