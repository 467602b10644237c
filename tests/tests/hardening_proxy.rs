//! The embedded proxy under careless or dead peers: idle connections are closed and their
//! descriptors freed, both legs of a connection carry TCP keepalive.

use std::{
    io::{self, Read as _},
    net::{Ipv4Addr, Shutdown, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use redirect_tests::{
    Workload,
    procfd::{PeerSocket, connected_sockets, fd_count},
};

/// A port of the workload's nobody else uses: the test's own server holds its connections.
const HELD_PORT: u16 = 9301;
/// Generous: the idle timeout in these tests is 1.5 s.
const BOUND: Duration = Duration::from_secs(30);

/// The next connection `l` accepts (bounded).
fn accept(l: &TcpListener) -> TcpStream {
    let deadline = Instant::now() + BOUND;
    loop {
        match l.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).unwrap();
                return s;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("the proxy never connected upstream: {e}"),
        }
    }
}

/// The agent's descriptor count once it stops changing (its dialer makes spare sockets after
/// start): two equal readings 200 ms apart, within the bound.
fn settled_fd_count(pid: u32) -> usize {
    let deadline = Instant::now() + BOUND;
    let mut last = fd_count(pid);
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let now = fd_count(pid);
        if now == last || Instant::now() > deadline {
            return now;
        }
        last = now;
    }
}

/// What a read on a connection the proxy closed returns: EOF (FIN) or a reset; never a
/// timeout.
fn closed_by_proxy(s: &mut TcpStream) -> Result<(), String> {
    s.set_read_timeout(Some(BOUND)).unwrap();
    let mut buf = [0u8; 16];
    match s.read(&mut buf) {
        Ok(0) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => Ok(()),
        other => Err(format!("still open after {BOUND:?}: {other:?}")),
    }
}

/// A connection nobody writes to, and one half-closed by its client whose server never
/// answers, are both closed after `--idle-timeout-ms`: each side sees the close, and the
/// agent's descriptors go back to what it held before them.
#[test]
fn idle_and_half_closed_connections_are_closed_and_their_descriptors_freed() {
    let w = Workload::with_agent("hard-idle", &["--idle-timeout-ms", "1500"]);
    let pid = w.agent.as_ref().unwrap().pid().unwrap();
    let listener = w.listen(HELD_PORT);
    let idle_fds = settled_fd_count(pid);

    let mut held = w.dial_from_remote(HELD_PORT, BOUND).unwrap();
    let mut held_server = accept(&listener);
    let mut half = w.dial_from_remote(HELD_PORT, BOUND).unwrap();
    let mut half_server = accept(&listener);
    half.shutdown(Shutdown::Write).unwrap();
    // The client's FIN crossed the proxy: the server reads EOF, and holds its side open.
    half_server.set_read_timeout(Some(BOUND)).unwrap();
    assert_eq!(half_server.read(&mut [0u8; 16]).unwrap(), 0);

    // Both are proxied: the agent holds a socket on each leg of each.
    let ours = |s: &PeerSocket, client: &TcpStream| s.peer == client.local_addr().unwrap();
    let sockets = connected_sockets(pid).unwrap();
    assert!(
        sockets.iter().any(|s| ours(s, &held)) && sockets.iter().any(|s| ours(s, &half)),
        "the agent does not hold the connections"
    );
    // Our copies of its sockets would keep them open.
    drop(sockets);

    closed_by_proxy(&mut held).expect("the idle connection's client");
    closed_by_proxy(&mut held_server).expect("the idle connection's server");
    closed_by_proxy(&mut half).expect("the half-closed connection's client");

    let deadline = Instant::now() + BOUND;
    while fd_count(pid) > idle_fds {
        assert!(
            Instant::now() < deadline,
            "the agent holds {} descriptors, {idle_fds} before the connections",
            fd_count(pid)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let left: Vec<_> = connected_sockets(pid)
        .unwrap()
        .iter()
        .filter(|s| ours(s, &held) || ours(s, &half) || s.peer.port() == HELD_PORT)
        .map(|s| format!("{} -> {}", s.local, s.peer))
        .collect();
    assert!(left.is_empty(), "the agent still holds {left:?}");
}

/// Keepalive values of one socket: (on, idle, interval, probes).
fn keepalive_of(s: &PeerSocket) -> (bool, Duration, Duration, u32) {
    use rustix::net::sockopt;
    (
        sockopt::socket_keepalive(&s.fd).unwrap(),
        sockopt::tcp_keepidle(&s.fd).unwrap(),
        sockopt::tcp_keepintvl(&s.fd).unwrap(),
        sockopt::tcp_keepcnt(&s.fd).unwrap(),
    )
}

/// Both legs of a proxied connection (the accepted socket and the upstream one) carry TCP
/// keepalive, with the defaults and with the values given by the flags: asked of the agent's
/// own sockets, taken with pidfd_getfd.
#[test]
fn both_legs_of_a_proxied_connection_keep_alive() {
    let s = Duration::from_secs;
    let cases: [(&[&str], _); 2] = [
        (&[], (true, s(180), s(180), 9)),
        (
            &[
                "--keepalive-time-secs",
                "7",
                "--keepalive-interval-secs",
                "3",
                "--keepalive-probes",
                "4",
            ],
            (true, s(7), s(3), 4),
        ),
    ];
    for (flags, want) in cases {
        let w = Workload::with_agent("hard-keepalive", flags);
        let pid = w.agent.as_ref().unwrap().pid().unwrap();
        let listener = w.listen(HELD_PORT);
        let client = w.dial_from_remote(HELD_PORT, BOUND).unwrap();
        let server = accept(&listener);
        let sockets = connected_sockets(pid).unwrap();
        let downstream = sockets
            .iter()
            .find(|s| s.peer == client.local_addr().unwrap())
            .expect("the agent's accepted socket");
        let upstream = sockets
            .iter()
            .find(|s| s.local == server.peer_addr().unwrap())
            .expect("the agent's upstream socket");
        assert_eq!(keepalive_of(downstream), want, "downstream, flags {flags:?}");
        assert_eq!(keepalive_of(upstream), want, "upstream, flags {flags:?}");
    }
}

/// The agent's log without the colour codes `tracing` writes.
fn plain(log: &str) -> String {
    let mut out = String::with_capacity(log.len());
    let mut chars = log.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters final-byte
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Thousands of connections straight to the capture port (nothing redirected them, so there
/// is no original destination) are each reset, and logged as a handful of lines whose counts
/// add up to all of them: the first with its addresses, then at most one a second, the rest
/// when the agent stops.
#[test]
fn direct_hits_on_a_capture_port_log_a_bounded_number_of_lines() {
    const N: u64 = 2000;
    let mut w = Workload::with_agent("hard-noise", &[]);
    let t0 = Instant::now();
    let resets = w
        .pair
        .workload
        .open()
        .unwrap()
        .run(|| {
            let mut resets = 0;
            for _ in 0..N {
                let mut s = match TcpStream::connect((Ipv4Addr::LOCALHOST, redirect_tests::OUTBOUND_CAPTURE)) {
                    Ok(s) => s,
                    // The reset can reach the socket before connect() returns (seen in the
                    // emulated guest): reset all the same.
                    Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                        resets += 1;
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                s.set_read_timeout(Some(BOUND))?;
                // Waiting for each reset also means the agent handled each one.
                if s.read(&mut [0u8; 16])
                    .is_err_and(|e| e.kind() == io::ErrorKind::ConnectionReset)
                {
                    resets += 1;
                }
            }
            Ok(resets)
        })
        .unwrap();
    assert_eq!(resets, N, "every direct hit is reset");
    let (_, log) = w.agent.as_mut().unwrap().stop().unwrap();
    let elapsed = t0.elapsed();

    let lines: Vec<String> = plain(&log)
        .lines()
        .filter(|l| l.contains("no original destination"))
        .map(str::to_owned)
        .collect();
    let count = |l: &str| -> u64 {
        let at = l.find("count=").unwrap_or_else(|| panic!("no count in {l:?}")) + "count=".len();
        let digits: String = l[at..].chars().take_while(char::is_ascii_digit).collect();
        digits.parse().unwrap()
    };
    // The first, one a second at most, and the last at the stop.
    let bound = 2 + elapsed.as_secs() as usize + 1;
    assert!(
        lines.len() <= bound,
        "{} lines for {N} direct hits in {elapsed:?} (at most {bound}):\n{}",
        lines.len(),
        lines[..lines.len().min(5)].join("\n")
    );
    assert_eq!(
        lines.iter().map(|l| count(l)).sum::<u64>(),
        N,
        "the counts add up to every hit:\n{}",
        lines.join("\n")
    );
}
