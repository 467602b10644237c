//! Test servers run as a workload's own process, inside its cgroup and namespace, so that the
//! kernel treats their sockets as the workload's (sock_ops sees their listen()).
//!
//! [`ServeProcess`] is the test's side: it runs `redirect-testkit serve` as a child process.
//! [`main`] is the child's side: each connection gets the [`crate::server`] protocol (a banner
//! naming the server, then an echo of the request). It prints `ready` once every socket
//! listens, and exits when stdin closes (its parent is gone) or on a signal.

use std::{
    io::{self, BufRead as _, Read as _, Write as _},
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, ExitCode, Stdio},
};

use redirect_agent::sys;

use crate::server::serve_one;

#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// cgroup v2 directory to join first.
    #[arg(long)]
    pub cgroup: Option<PathBuf>,
    /// Network namespace to enter.
    #[arg(long)]
    pub netns: Option<PathBuf>,
    /// NAME=ADDR:PORT (`remote=10.200.1.2:8080`, `remote6=[fd00:200:0:1::2]:8080`) to listen
    /// on; repeat for more.
    #[arg(long, required = true, value_parser = parse_listen)]
    pub listen: Vec<(String, SocketAddr)>,
}

/// `NAME=A.B.C.D:PORT` or `NAME=[IPV6]:PORT`.
pub fn parse_listen(s: &str) -> Result<(String, SocketAddr), String> {
    let (name, addr) = s
        .split_once('=')
        .ok_or_else(|| format!("'{s}': expected NAME=ADDR:PORT"))?;
    let addr = addr
        .parse()
        .map_err(|_| format!("'{addr}': expected A.B.C.D:PORT or [IPV6]:PORT"))?;
    Ok((name.to_owned(), addr))
}

/// `redirect-testkit serve`.
pub fn main(args: &ServeArgs) -> ExitCode {
    // Before any thread exists: cgroup membership and namespace are per task.
    let listeners = sys::join(args.cgroup.as_deref(), args.netns.as_deref()).and_then(|()| {
        args.listen
            .iter()
            .map(|(name, addr)| {
                TcpListener::bind(addr)
                    .map(|l| (name.clone(), l))
                    .map_err(|e| io::Error::new(e.kind(), format!("listen {name}={addr}: {e}")))
            })
            .collect::<io::Result<Vec<_>>>()
    });
    let listeners = match listeners {
        Ok(l) => l,
        Err(e) => {
            eprintln!("redirect-testkit serve: {e}");
            return ExitCode::FAILURE;
        }
    };
    for (name, listener) in listeners {
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let name = name.clone();
                std::thread::spawn(move || {
                    if let Ok(peer) = stream.peer_addr() {
                        let _ = serve_one(stream, peer, &name);
                    }
                });
            }
        });
    }
    println!("ready");
    let _ = io::stdout().flush();
    // Until the parent closes our stdin (or dies).
    let _ = io::stdin().read_to_end(&mut Vec::new());
    ExitCode::SUCCESS
}

/// `redirect-testkit serve` as a child process: test servers inside a cgroup and namespace,
/// as a workload's own process (sock_ops sees its listen()). Killed on drop.
pub struct ServeProcess {
    child: Child,
}

impl ServeProcess {
    /// `testkit`: the `redirect-testkit` binary. `listen`: (name, address) pairs, the address a
    /// `SocketAddrV4`, `SocketAddrV6` or `SocketAddr`. Returns once every socket listens.
    pub fn start<A: Into<SocketAddr> + Copy>(
        testkit: &Path,
        cgroup: Option<&Path>,
        netns: &Path,
        listen: &[(String, A)],
    ) -> io::Result<Self> {
        let mut c = Command::new(testkit);
        c.arg("serve");
        if let Some(cg) = cgroup {
            c.args(["--cgroup", &cg.to_string_lossy()]);
        }
        c.args(["--netns", &netns.to_string_lossy()]);
        for (name, addr) in listen {
            c.args(["--listen", &format!("{name}={}", (*addr).into())]);
        }
        let child = c
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let mut me = Self { child };
        let stdout = me.child.stdout.take().ok_or_else(|| io::Error::other("no stdout"))?;
        let mut line = String::new();
        io::BufReader::new(stdout).read_line(&mut line)?;
        if line.trim() != "ready" {
            let mut err = String::new();
            if let Some(mut e) = me.child.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            return Err(io::Error::other(format!("serve did not start: {}", err.trim())));
        }
        Ok(me)
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_takes_either_family() {
        let (name, addr) = parse_listen("remote=10.200.1.2:8080").unwrap();
        assert_eq!(
            (name.as_str(), addr.to_string().as_str()),
            ("remote", "10.200.1.2:8080")
        );
        let (name, addr) = parse_listen("remote6=[fd00:200:0:1::2]:8080").unwrap();
        assert_eq!(name, "remote6");
        assert_eq!(addr, "[fd00:200:0:1::2]:8080".parse::<SocketAddr>().unwrap());
        let (_, addr) = parse_listen("any6=[::]:15006").unwrap();
        assert!(addr.is_ipv6() && addr.ip().is_unspecified());
        assert!(parse_listen("10.200.1.2:8080").is_err(), "no name");
        assert!(parse_listen("x=fd00::2:8080").is_err(), "IPv6 without brackets");
    }
}
