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
    net::{SocketAddrV4, TcpListener},
    os::fd::{AsRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
};

#[derive(clap::Args, Debug, Clone)]
pub struct ListenInArgs {
    /// cgroup v2 directory to join first.
    #[arg(long)]
    pub cgroup: PathBuf,
    /// Network namespace to enter.
    #[arg(long)]
    pub netns: PathBuf,
    /// ADDR:PORT to listen on; repeat for more.
    #[arg(long, required = true)]
    pub listen: Vec<SocketAddrV4>,
    #[arg(long, default_value_t = 1024)]
    pub backlog: i32,
}

/// The child: prints `fds N M ...` once every socket listens, then holds them until stdin
/// closes.
pub fn main(args: &ListenInArgs) -> ExitCode {
    let made = crate::sys::join(Some(&args.cgroup), Some(&args.netns)).and_then(|()| {
        args.listen
            .iter()
            .map(|addr| {
                let l =
                    TcpListener::bind(addr).map_err(|e| io::Error::new(e.kind(), format!("listen on {addr}: {e}")))?;
                // std's backlog is fixed; listen() again only sets a new one.
                rustix::net::listen(&l, args.backlog)?;
                Ok(l)
            })
            .collect::<io::Result<Vec<_>>>()
    });
    let listeners = match made {
        Ok(l) => l,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let fds: Vec<String> = listeners.iter().map(|l| l.as_raw_fd().to_string()).collect();
    println!("fds {}", fds.join(" "));
    let _ = io::stdout().flush();
    let _ = io::stdin().read_to_end(&mut Vec::new());
    ExitCode::SUCCESS
}

/// Listening sockets on `addrs`, made inside `cgroup` and `netns` by a child, owned by us.
pub fn listeners(cgroup: &Path, netns: &Path, addrs: &[SocketAddrV4], backlog: u32) -> io::Result<Vec<OwnedFd>> {
    let exe = std::env::current_exe()?;
    let mut cmd = Command::new(exe);
    cmd.arg("listen-in")
        .arg("--cgroup")
        .arg(cgroup)
        .arg("--netns")
        .arg(netns)
        .arg("--backlog")
        .arg(backlog.to_string());
    for a in addrs {
        cmd.arg("--listen").arg(a.to_string());
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
        fds.split_whitespace()
            .map(|fd| {
                let fd: i32 = fd.parse().map_err(|_| io::Error::other(format!("bad fd '{fd}'")))?;
                crate::adopt::dup_from(pid, fd)
            })
            .collect::<io::Result<Vec<_>>>()
    });
    // Closing its stdin ends it; our duplicates keep the sockets.
    drop(child.stdin.take());
    let _ = child.wait();
    taken
}
