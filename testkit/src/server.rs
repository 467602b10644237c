//! The test servers' protocol, and a server run on a thread of the test process.
//!
//! On accept a server sends one line naming itself and both addresses of the connection, reads
//! the request until EOF (the client's half-close), then echoes it and closes. Servers whose
//! name starts with `echo` answer each chunk as it arrives; `sink` ones never read.
//!
//! Servers listen on IPv4 or IPv6 addresses (`[fd00:200:0:1::2]:8080`, `[::1]:9080`; `[::]`
//! is dual-stack unless `net.ipv6.bindv6only` says otherwise, and an IPv4 peer then shows
//! v4-mapped, as the kernel reports it).

use std::{
    io::{self, BufRead, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use crate::{netns::NamedNetns, sock};

/// Largest request a test server buffers before answering.
const SERVER_MAX_BYTES: usize = 16 << 20;
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// A plain TCP server on a thread of this process (see the module's protocol). It records
/// every peer it accepted.
pub struct TestServer {
    pub name: String,
    /// The address it listens on, as given.
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    accepted: Arc<Mutex<Vec<SocketAddr>>>,
    thread: Option<JoinHandle<()>>,
}

/// The first line a [`TestServer`] sends: its name, the connection's addresses, and what
/// the original destination query answered on the accepted socket (`-` for an error):
/// `SO_ORIGINAL_DST` on an AF_INET socket, `IP6T_SO_ORIGINAL_DST` on an AF_INET6 one (see
/// [`sock::original_dst`]). Addresses are written as `SocketAddr` displays them:
/// `10.200.1.2:8080`, `[fd00:200:0:1::2]:8080`, `[::ffff:10.200.1.1]:40000`.
pub fn server_banner(name: &str, local: SocketAddr, peer: SocketAddr, orig: Option<SocketAddr>) -> String {
    let orig = orig.map_or_else(|| "-".to_owned(), |o| o.to_string());
    format!("REDIRECT-TEST name={name} local={local} peer={peer} orig={orig}\n")
}

impl TestServer {
    /// `addr`: a `SocketAddrV4`, `SocketAddrV6` or `SocketAddr` to listen on inside `netns`.
    pub fn start(netns: &NamedNetns, addr: impl Into<SocketAddr>, name: &str) -> io::Result<Self> {
        let addr = addr.into();
        let listener = netns.open()?.run(move || TcpListener::bind(addr))?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(Mutex::new(Vec::new()));
        let (stop2, accepted2, name2) = (stop.clone(), accepted.clone(), name.to_owned());
        let thread = std::thread::spawn(move || {
            let mut workers = Vec::new();
            while !stop2.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, peer)) => {
                        accepted2.lock().unwrap_or_else(|e| e.into_inner()).push(peer);
                        let name = name2.clone();
                        // A finished thread's stack stays until it is joined: under a long
                        // load that would be thousands of them.
                        workers.retain_mut(|h: &mut Option<JoinHandle<()>>| match h.take_if(|h| h.is_finished()) {
                            Some(done) => {
                                let _ = done.join();
                                false
                            }
                            None => true,
                        });
                        workers.push(Some(std::thread::spawn(move || {
                            let _ = serve_one(stream, peer, &name);
                        })));
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
            for w in workers.into_iter().flatten() {
                let _ = w.join();
            }
        });
        Ok(Self {
            name: name.into(),
            addr,
            stop,
            accepted,
            thread: Some(thread),
        })
    }

    /// Peers accepted so far.
    pub fn accepted(&self) -> Vec<SocketAddr> {
        self.accepted.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One accepted connection, served as the module says (also by `redirect-testkit serve`).
pub fn serve_one(mut stream: TcpStream, peer: SocketAddr, name: &str) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let local = stream.local_addr()?;
    let orig = sock::original_dst(&stream).ok();
    stream.write_all(server_banner(name, local, peer, orig).as_bytes())?;
    if name.starts_with("echo") {
        // Request/response: every chunk straight back, until EOF.
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = stream.read(&mut buf)?;
            if n == 0 {
                return stream.shutdown(Shutdown::Write);
            }
            stream.write_all(&buf[..n])?;
        }
    }
    if name.starts_with("sink") {
        // A reader that stops reading: holds the connection, reads nothing, until the peer
        // goes or the timeout.
        std::thread::sleep(IO_TIMEOUT);
        return Ok(());
    }
    let mut body = Vec::new();
    (&mut stream).take(SERVER_MAX_BYTES as u64).read_to_end(&mut body)?;
    stream.write_all(&body)?;
    stream.shutdown(Shutdown::Write)
}

/// Reads the banner line a [`TestServer`] sends (bounded).
pub fn read_banner(r: &mut impl BufRead) -> io::Result<String> {
    let mut line = Vec::new();
    r.take(512).read_until(b'\n', &mut line)?;
    if line.last() != Some(&b'\n') {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "no banner from server"));
    }
    Ok(String::from_utf8_lossy(&line).trim_end().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{Outcome, ProbeResult};

    #[test]
    fn the_banner_writes_addresses_as_given_and_they_read_back() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        let line = server_banner(
            "cap-out",
            a("[::ffff:127.0.0.1]:15001"),
            a("[::ffff:10.200.1.1]:40000"),
            Some(a("[fd00:200:0:1::2]:8080")),
        );
        assert_eq!(
            line,
            "REDIRECT-TEST name=cap-out local=[::ffff:127.0.0.1]:15001 peer=[::ffff:10.200.1.1]:40000 \
             orig=[fd00:200:0:1::2]:8080\n"
        );
        let v4 = server_banner("remote", a("10.200.1.2:8080"), a("10.200.1.1:40000"), None);
        assert_eq!(
            v4,
            "REDIRECT-TEST name=remote local=10.200.1.2:8080 peer=10.200.1.1:40000 orig=-\n"
        );

        let r = ProbeResult {
            outcome: Outcome::Ok,
            error: None,
            dialed: Some("[::ffff:10.200.1.2]:8080".into()),
            local: Some("[::ffff:10.200.1.1]:40000".into()),
            peer: Some("[::ffff:10.200.1.2]:8080".into()),
            kernel_peer: Some("[::ffff:127.0.0.1]:15001".into()),
            banner: Some(line.trim_end().to_owned()),
            sent: 0,
            received: 0,
            intact: false,
            elapsed_ms: 0,
            round_trips: 0,
            slowest_round_trip_us: 0,
            sockopts: None,
        };
        // Captured: the app sees the original destination, the socket table the listener.
        assert_eq!(r.peer_port(), Some(15001));
        assert_eq!(r.peer_addr(), Some(a("[::ffff:10.200.1.2]:8080")));
        assert_eq!(r.local_addr(), Some(a("[::ffff:10.200.1.1]:40000")));
        assert_eq!(r.banner_field("orig"), Some("[fd00:200:0:1::2]:8080"));
        assert_eq!(r.banner_addr("orig"), Some(a("[fd00:200:0:1::2]:8080")));
        assert_eq!(r.banner_addr("local"), Some(a("[::ffff:127.0.0.1]:15001")));
        // A report of an older probe, without `dialed`, still reads.
        let mut json: serde_json::Value = serde_json::to_value(&r).unwrap();
        json.as_object_mut().unwrap().remove("dialed");
        let old: ProbeResult = serde_json::from_value(json).unwrap();
        assert_eq!(old.dialed, None);
        assert_eq!(old.peer, r.peer);
    }
}
