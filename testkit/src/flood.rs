//! `redirect-testkit flood`: what any local user can do to a TCP port, such as the node
//! agent's metrics endpoint: open connections as fast as they are taken and hold them, saying
//! nothing (or one byte of a request at a time), to use up the server's descriptors. Run by
//! the tests as an unprivileged user. Prints `connected N` after every 100 connections made and
//! a last `done N` line, so the test can tell that the flood was real.

use std::{
    collections::VecDeque,
    io::Write as _,
    net::{SocketAddr, TcpStream},
    process::ExitCode,
    time::{Duration, Instant},
};

#[derive(clap::Args, Debug)]
pub struct FloodArgs {
    /// Where to connect.
    #[arg(long)]
    pub to: SocketAddr,
    /// Connections held at once; past it, the oldest is closed for a new one.
    #[arg(long, default_value_t = 2000)]
    pub hold: usize,
    /// Send a request one byte every half second on each held connection (a slow client),
    /// rather than nothing (an idle one).
    #[arg(long)]
    pub slow: bool,
    /// How long to keep it up, in milliseconds.
    #[arg(long, default_value_t = 30_000)]
    pub for_ms: u64,
}

/// Time between connects: fast enough to outrun a server that holds every connection for
/// seconds, bounded so that two floods leave the machine's CPUs to the test.
const PACE: Duration = Duration::from_millis(1);
const REQUEST: &[u8] = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n";

pub fn main(args: &FloodArgs) -> ExitCode {
    // Up to the hard limit, which an unprivileged process may do.
    redirect_agent::sys::raise_nofile_limit(args.hold);
    let deadline = Instant::now() + Duration::from_millis(args.for_ms);
    let mut held: VecDeque<(TcpStream, usize)> = VecDeque::new();
    let mut made = 0usize;
    let mut next_byte = Instant::now();
    let mut out = std::io::stdout();
    while Instant::now() < deadline {
        match TcpStream::connect_timeout(&args.to, Duration::from_secs(1)) {
            Ok(s) => {
                made += 1;
                held.push_back((s, 0));
                if made.is_multiple_of(100) {
                    let _ = writeln!(out, "connected {made}");
                    let _ = out.flush();
                }
            }
            // Our own descriptors spent, or the server's backlog full: let some go.
            Err(_) => {
                held.pop_front();
            }
        }
        while held.len() > args.hold {
            held.pop_front();
        }
        if args.slow && Instant::now() >= next_byte {
            next_byte = Instant::now() + Duration::from_millis(500);
            for (s, sent) in held.iter_mut() {
                if *sent < REQUEST.len() - 1 && (&*s).write(&REQUEST[*sent..*sent + 1]).is_ok() {
                    *sent += 1;
                }
            }
        }
        std::thread::sleep(PACE);
    }
    let _ = writeln!(out, "done {made}");
    ExitCode::SUCCESS
}
