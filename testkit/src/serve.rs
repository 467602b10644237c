//! Test servers run as a workload's own process, inside its cgroup and namespace, so that the
//! kernel treats their sockets as the workload's (sock_ops sees their listen()).
//!
//! [`ServeProcess`] is the test's side: it runs `redirect-testkit serve` as a child process.
//! [`main`] is the child's side: each connection gets the [`crate::server`] protocol (a banner
//! naming the server, then an echo of the request). It prints `ready` once every socket
//! listens, and exits when stdin closes (its parent is gone) or on a signal.

use std::{
    io::{self, BufRead as _, Read as _, Write as _},
    net::{SocketAddr, TcpListener, UdpSocket},
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
    #[arg(long, required_unless_present_any = ["udp", "dns"], value_parser = parse_listen)]
    pub listen: Vec<(String, SocketAddr)>,
    /// NAME=ADDR:PORT to answer UDP on: each datagram gets the banner back, its peer the
    /// sender as the server saw it.
    #[arg(long, value_parser = parse_listen)]
    pub udp: Vec<(String, SocketAddr)>,
    /// ADDR:PORT to answer DNS on (UDP and TCP): every A query gets `--dns-a`.
    #[arg(long, requires = "dns_a")]
    pub dns: Vec<SocketAddr>,
    #[arg(long)]
    pub dns_a: Option<std::net::Ipv4Addr>,
    /// NAME of a `--listen` socket to make IP_TRANSPARENT before it binds (Envoy's TPROXY-mode
    /// listeners are: iptables' TPROXY target hands connections only to such a socket).
    #[arg(long)]
    pub transparent: Vec<String>,
    /// Once every socket is bound, run as this uid and gid (istio-agent's 1337, say, whose
    /// sockets the owner rules leave alone).
    #[arg(long)]
    pub uid: Option<u32>,
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

/// A listener on `addr`, IP_TRANSPARENT first when asked (needs CAP_NET_ADMIN: set while still
/// root, before any `--uid`).
fn bind(addr: SocketAddr, transparent: bool) -> io::Result<TcpListener> {
    if !transparent {
        return TcpListener::bind(addr);
    }
    let s = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
    if addr.is_ipv6() {
        // As the namespaces of the tests that ask for one set `bindv6only`, and Envoy does.
        s.set_only_v6(true)?;
        s.set_ip_transparent_v6(true)?;
    } else {
        s.set_ip_transparent_v4(true)?;
    }
    // What std's bind sets too.
    s.set_reuse_address(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    Ok(s.into())
}

/// `redirect-testkit serve`.
pub fn main(args: &ServeArgs) -> ExitCode {
    // Before any thread exists: cgroup membership and namespace are per task.
    // As the given uid from here on, so that the sockets (their files) are its, as an owner
    // match reads them.
    let joined = sys::join(args.cgroup.as_deref(), args.netns.as_deref()).and_then(|()| {
        let Some(id) = args.uid else {
            return Ok(());
        };
        // SAFETY: plain syscalls on integers (a null list of no groups); the groups and gid
        // first, while still root.
        let rc = unsafe { (libc::setgroups(0, std::ptr::null()), libc::setgid(id), libc::setuid(id)) };
        match rc {
            (0, 0, 0) => Ok(()),
            _ => Err(io::Error::last_os_error()),
        }
    });
    let listeners = joined.and_then(|()| {
        args.listen
            .iter()
            .map(|(name, addr)| {
                bind(*addr, args.transparent.contains(name))
                    .map(|l| (name.clone(), l))
                    .map_err(|e| io::Error::new(e.kind(), format!("listen {name}={addr}: {e}")))
            })
            .collect::<io::Result<Vec<_>>>()
    });
    let listeners = listeners.and_then(|l| {
        for &addr in &args.dns {
            let a = args.dns_a.unwrap_or(std::net::Ipv4Addr::UNSPECIFIED);
            crate::dns_server::spawn(addr, a).map_err(|e| io::Error::new(e.kind(), format!("dns {addr}: {e}")))?;
        }
        Ok(l)
    });
    let udp = listeners.and_then(|l| {
        let udp = args
            .udp
            .iter()
            .map(|(name, addr)| {
                UdpSocket::bind(addr)
                    .map(|s| (name.clone(), s))
                    .map_err(|e| io::Error::new(e.kind(), format!("udp {name}={addr}: {e}")))
            })
            .collect::<io::Result<Vec<_>>>()?;
        Ok((l, udp))
    });
    let (listeners, udp) = match udp {
        Ok(l) => l,
        Err(e) => {
            eprintln!("redirect-testkit serve: {e}");
            return ExitCode::FAILURE;
        }
    };
    for (name, socket) in udp {
        std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            let local = socket.local_addr().ok();
            while let Ok((_, peer)) = socket.recv_from(&mut buf) {
                if let Some(local) = local {
                    let _ = socket.send_to(crate::server::server_banner(&name, local, peer, None).as_bytes(), peer);
                }
            }
        });
    }
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
        Self::start_with_udp(testkit, cgroup, netns, listen, &[])
    }

    /// [`ServeProcess::start`], also answering UDP on `udp` (see `--udp`).
    pub fn start_with_udp<A: Into<SocketAddr> + Copy>(
        testkit: &Path,
        cgroup: Option<&Path>,
        netns: &Path,
        listen: &[(String, A)],
        udp: &[(String, SocketAddr)],
    ) -> io::Result<Self> {
        Self::start_full(testkit, cgroup, netns, listen, udp, None)
    }

    /// A resolver on `addr` (UDP and TCP) in `netns`, answering every A query with `a`.
    pub fn start_dns(testkit: &Path, netns: &Path, addr: SocketAddr, a: std::net::Ipv4Addr) -> io::Result<Self> {
        let mut c = Command::new(testkit);
        c.args(["serve", "--netns", &netns.to_string_lossy()]);
        c.args(["--dns", &addr.to_string(), "--dns-a", &a.to_string()]);
        Self::spawn(c)
    }

    /// [`ServeProcess::start_with_udp`], running as `uid` (and gid) once its sockets are bound.
    pub fn start_full<A: Into<SocketAddr> + Copy>(
        testkit: &Path,
        cgroup: Option<&Path>,
        netns: &Path,
        listen: &[(String, A)],
        udp: &[(String, SocketAddr)],
        uid: Option<u32>,
    ) -> io::Result<Self> {
        Self::start_transparent(testkit, cgroup, netns, listen, udp, uid, &[])
    }

    /// [`ServeProcess::start_full`], with the `transparent` listeners (by name) IP_TRANSPARENT.
    pub fn start_transparent<A: Into<SocketAddr> + Copy>(
        testkit: &Path,
        cgroup: Option<&Path>,
        netns: &Path,
        listen: &[(String, A)],
        udp: &[(String, SocketAddr)],
        uid: Option<u32>,
        transparent: &[&str],
    ) -> io::Result<Self> {
        let mut c = Command::new(testkit);
        c.arg("serve");
        for name in transparent {
            c.args(["--transparent", name]);
        }
        if let Some(id) = uid {
            c.args(["--uid", &id.to_string()]);
        }
        if let Some(cg) = cgroup {
            c.args(["--cgroup", &cg.to_string_lossy()]);
        }
        c.args(["--netns", &netns.to_string_lossy()]);
        for (name, addr) in listen {
            c.args(["--listen", &format!("{name}={}", (*addr).into())]);
        }
        for (name, addr) in udp {
            c.args(["--udp", &format!("{name}={addr}")]);
        }
        Self::spawn(c)
    }

    /// Starts `c` (a `serve` command) and waits for its `ready`.
    fn spawn(mut c: Command) -> io::Result<Self> {
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
