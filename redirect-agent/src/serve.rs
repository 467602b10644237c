//! `redirect-agent serve` (hidden): test servers run as a workload's own process, inside its
//! cgroup and namespace, so that the kernel treats their sockets as the workload's (sock_ops
//! sees their listen()). Each connection gets the [`crate::sandbox::TestServer`] protocol: a
//! banner naming the server, then an echo of the request. Prints `ready` once every socket
//! listens; exits when stdin closes (its parent is gone) or on a signal.

use std::{
    io::{self, Read as _, Write as _},
    net::{SocketAddrV4, TcpListener},
    path::PathBuf,
    process::ExitCode,
};

#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// cgroup v2 directory to join first.
    #[arg(long)]
    pub cgroup: Option<PathBuf>,
    /// Network namespace to enter.
    #[arg(long)]
    pub netns: Option<PathBuf>,
    /// NAME=ADDR:PORT to listen on; repeat for more.
    #[arg(long, required = true, value_parser = parse_listen)]
    pub listen: Vec<(String, SocketAddrV4)>,
}

fn parse_listen(s: &str) -> Result<(String, SocketAddrV4), String> {
    let (name, addr) = s
        .split_once('=')
        .ok_or_else(|| format!("'{s}': expected NAME=ADDR:PORT"))?;
    let addr = addr
        .parse()
        .map_err(|_| format!("'{addr}': expected an IPv4 ADDR:PORT"))?;
    Ok((name.to_owned(), addr))
}

pub fn main(args: &ServeArgs) -> ExitCode {
    // Before any thread exists: cgroup membership and namespace are per task.
    let listeners = crate::sys::join(args.cgroup.as_deref(), args.netns.as_deref()).and_then(|()| {
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
            eprintln!("redirect-agent serve: {e}");
            return ExitCode::FAILURE;
        }
    };
    for (name, listener) in listeners {
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let name = name.clone();
                std::thread::spawn(move || {
                    if let Ok(peer) = stream.peer_addr() {
                        let _ = crate::sandbox::serve_one(stream, peer, &name);
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
