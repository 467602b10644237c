//! One proxied connection's copying, both ways: half-closes carried across, an idle timer, and
//! a dead peer noticed also where nobody reads from it any more.

use std::{
    io,
    sync::atomic::{AtomicU32, AtomicU64, Ordering},
    time::Duration,
};

use tokio::{io::Interest, net::TcpStream, time::Instant};

use super::{
    Budget, ProxyCounters,
    splice::{self, Pipe, Pumped},
};

/// Bytes one read takes (the size of each worker thread's scratch buffer).
pub(super) const COPY_BUF: usize = 64 * 1024;

/// How a relay ended.
#[derive(Debug)]
pub(super) enum Ended {
    /// Both directions reached EOF and passed it on: `up` and `down` bytes.
    Done { up: u64, down: u64 },
    /// No byte moved either way for the idle timeout. `stalled`: a direction still held bytes
    /// it could not deliver (its receiver stopped reading), so the stream was cut short.
    Idle { stalled: bool },
    /// A socket failed (reset, keepalive gave up, ...).
    Failed(io::Error),
}

/// When a byte last moved, and whether a direction holds bytes not yet written.
pub(super) struct Activity {
    start: Instant,
    /// Milliseconds from `start` to the last write.
    last_ms: AtomicU64,
    /// Directions holding bytes they read and have not written yet.
    holding: AtomicU32,
}

impl Activity {
    pub(super) fn new() -> Self {
        Self {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
            holding: AtomicU32::new(0),
        }
    }

    pub(super) fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// A direction holds bytes it read and has not written, until the guard drops.
    pub(super) fn hold(&self) -> Held<'_> {
        self.holding.fetch_add(1, Ordering::Relaxed);
        Held(self)
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// [`Activity::hold`]'s guard.
pub(super) struct Held<'a>(&'a Activity);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.holding.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Copies `client` to `upstream` and back until both directions ended, a socket failed, or
/// nothing moved for `idle_timeout` (`None`: never). The caller closes the sockets as the
/// outcome says. `pipes`: where a bulk direction may take a pipe to splice through
/// ([`super::splice`]); `None` where it must not (the fast path's sockets, whose bytes sk_msg
/// queues where splice does not read).
pub(super) async fn relay(
    client: &TcpStream,
    upstream: &TcpStream,
    idle_timeout: Option<Duration>,
    counters: &ProxyCounters,
    pipes: Option<&Budget>,
) -> Ended {
    let activity = Activity::new();
    let up = pump(
        client,
        upstream,
        &counters.bytes_to_upstream,
        &activity,
        pipes,
        &counters.spliced,
    );
    let down = pump(
        upstream,
        client,
        &counters.bytes_from_upstream,
        &activity,
        pipes,
        &counters.spliced,
    );
    let idle = async {
        match idle_timeout {
            Some(t) => idle(&activity, t).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(up, down, idle);
    let (mut up_done, mut down_done) = (None, None);
    loop {
        tokio::select! {
            r = &mut up, if up_done.is_none() => match r {
                Ok(n) => up_done = Some(n),
                Err(e) => return Ended::Failed(e),
            },
            r = &mut down, if down_done.is_none() => match r {
                Ok(n) => down_done = Some(n),
                Err(e) => return Ended::Failed(e),
            },
            // Half-closed: nobody reads the socket whose direction has ended, so its peer
            // dying (keepalive gives up, or a reset) would go unheard until the other
            // direction writes to it. Its error is watched instead.
            e = client.ready(Interest::ERROR), if up_done.is_some() => return Ended::Failed(dead(client, e)),
            e = upstream.ready(Interest::ERROR), if down_done.is_some() => return Ended::Failed(dead(upstream, e)),
            () = &mut idle => {
                return Ended::Idle {
                    stalled: activity.holding.load(Ordering::Relaxed) > 0,
                };
            }
        }
        if let (Some(up), Some(down)) = (up_done, down_done) {
            return Ended::Done { up, down };
        }
    }
}

/// The error a socket reported ready.
fn dead(s: &TcpStream, ready: io::Result<tokio::io::Ready>) -> io::Error {
    match ready {
        Err(e) => e,
        Ok(_) => s
            .take_error()
            .ok()
            .flatten()
            .unwrap_or_else(|| io::Error::other("socket error")),
    }
}

/// Resolves once nothing was written for `timeout`.
async fn idle(activity: &Activity, timeout: Duration) {
    loop {
        let deadline = activity.last() + timeout;
        if Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep_until(deadline).await;
    }
}

std::thread_local! {
    /// Each runtime worker's read buffer, shared by every connection it serves.
    static SCRATCH: std::cell::RefCell<Box<[u8]>> = std::cell::RefCell::new(vec![0; COPY_BUF].into_boxed_slice());
}

/// What one read moved.
enum Step {
    Eof,
    /// Readiness was stale.
    Again,
    /// `read` bytes, of which `rest` could not be written yet.
    Moved {
        read: usize,
        rest: Vec<u8>,
    },
}

/// Copies `from` to `to` until EOF, then shuts down writing on `to`.
///
/// A read goes into the worker thread's scratch buffer and is written on at once, with no await
/// in between, so the buffer is free again before the task yields. Only bytes the receiver
/// would not take yet are copied into a buffer of the connection's own, of their size, until
/// written. A connection holds no buffer while it is quiet, nor while its receiver keeps up, and
/// a burst of thousands does not leave the allocator with thousands of freed 64 KiB blocks it
/// cannot give back (issue 16: 108 MB grew to 671 MB that way, 0.6 MB of it in use).
///
/// A read that fills the whole scratch buffer is a stream: the rest goes through a pipe
/// ([`super::splice`]) if `pipes` spares one (`spliced` counts those), unless its segments
/// prove small, when it copies on.
async fn pump(
    from: &TcpStream,
    to: &TcpStream,
    bytes: &AtomicU64,
    activity: &Activity,
    pipes: Option<&Budget>,
    spliced: &AtomicU64,
) -> io::Result<u64> {
    let mut total = 0u64;
    let mut pipe = None;
    // Once a pipe proved the stream fragmented, it copies for the rest of its life.
    let mut fragmented = false;
    loop {
        if let Some(p) = &pipe {
            match splice::pump(from, to, p, bytes, activity, &mut total).await? {
                Pumped::Eof => break,
                Pumped::Fragmented => {
                    pipe = None;
                    fragmented = true;
                    continue;
                }
            }
        }
        from.readable().await?;
        let step = SCRATCH.with_borrow_mut(|buf| -> io::Result<Step> {
            let read = match from.try_read(buf) {
                Ok(0) => return Ok(Step::Eof),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Step::Again),
                Err(e) => return Err(e),
            };
            let mut sent = 0;
            while sent < read {
                match to.try_write(&buf[sent..read]) {
                    Ok(n) => sent += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e),
                }
            }
            // Empty when all went: no allocation.
            Ok(Step::Moved {
                read,
                rest: buf[sent..read].to_vec(),
            })
        })?;
        let (read, rest) = match step {
            Step::Eof => break,
            Step::Again => continue,
            Step::Moved { read, rest } => (read, rest),
        };
        if !rest.is_empty() {
            let _held = activity.hold();
            write_all(to, &rest, activity).await?;
        }
        activity.touch();
        total += read as u64;
        bytes.fetch_add(read as u64, Ordering::Relaxed);
        if read == COPY_BUF && !fragmented {
            pipe = pipes.and_then(Pipe::take);
            if pipe.is_some() {
                spliced.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    // SHUT_WR on a connection the peer already closed only fails with ENOTCONN, which changes
    // nothing here.
    let _ = rustix::net::shutdown(to, rustix::net::Shutdown::Write);
    Ok(total)
}

/// Writes what a receiver did not take at once; each piece it takes counts as activity, so a
/// slow receiver is not taken for a stalled one.
async fn write_all(to: &TcpStream, mut data: &[u8], activity: &Activity) -> io::Result<()> {
    while !data.is_empty() {
        to.writable().await?;
        match to.try_write(data) {
            Ok(n) => {
                data = &data[n..];
                activity.touch();
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// TCP keepalive for both legs of every proxied connection: a peer that vanished (host gone,
/// cable pulled, a NAT that forgot the flow) is found and its connection closed, also while
/// the connection is half-closed and only one direction still could flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    /// Silence before the first probe (`TCP_KEEPIDLE`).
    pub time: Duration,
    /// Between unanswered probes (`TCP_KEEPINTVL`).
    pub interval: Duration,
    /// Unanswered probes before the connection is dropped (`TCP_KEEPCNT`).
    pub probes: u32,
}

impl Keepalive {
    /// Istio's own L4 proxy's (ztunnel's) defaults, on every socket it makes: 180 s idle,
    /// then 9 probes 180 s apart, so a dead peer is dropped after 30 minutes.
    pub const DEFAULT: Self = Self {
        time: Duration::from_secs(180),
        interval: Duration::from_secs(180),
        probes: 9,
    };

    /// Turns keepalive on for `socket` with these timings. On a listener, the sockets it
    /// accepts inherit all four options.
    pub fn apply(&self, socket: impl std::os::fd::AsFd) -> io::Result<()> {
        use rustix::net::sockopt;
        let fd = socket.as_fd();
        sockopt::set_tcp_keepidle(fd, self.time)?;
        sockopt::set_tcp_keepintvl(fd, self.interval)?;
        sockopt::set_tcp_keepcnt(fd, self.probes)?;
        sockopt::set_socket_keepalive(fd, true)?;
        Ok(())
    }
}

/// What bounds a proxied connection's life when its peers go quiet or away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Liveness {
    /// Close after this long without a byte either way (`None`: never).
    pub idle_timeout: Option<Duration>,
    /// Keepalive on both legs (`None`: off).
    pub keepalive: Option<Keepalive>,
}

impl Liveness {
    /// Envoy's TCP proxy's `idle_timeout` default: 1 h.
    pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A pair of connected loopback streams.
    pub(in crate::proxy) async fn pair() -> (TcpStream, TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    /// Paused clock: time moves only when every task waits, so the instants are exact.
    #[tokio::test(start_paused = true)]
    async fn the_idle_timer_runs_from_the_last_byte() {
        let activity = Activity::new();
        let t0 = Instant::now();
        let talk = async {
            for _ in 0..2 {
                tokio::time::sleep(Duration::from_millis(600)).await;
                activity.touch();
            }
            std::future::pending::<()>().await;
        };
        tokio::select! {
            () = idle(&activity, Duration::from_secs(1)) => {}
            () = talk => unreachable!(),
        }
        assert_eq!(t0.elapsed(), Duration::from_millis(2200));
    }

    #[tokio::test]
    async fn a_quiet_connection_ends_idle_and_a_finished_one_done() {
        let (_app, client) = pair().await;
        let (upstream, _server) = pair().await;
        let counters = ProxyCounters::default();
        let ended = tokio::time::timeout(
            Duration::from_secs(30),
            relay(&client, &upstream, Some(Duration::from_millis(100)), &counters, None),
        )
        .await
        .expect("an idle relay ends");
        assert!(matches!(ended, Ended::Idle { stalled: false }), "{ended:?}");

        let (mut app, client) = pair().await;
        let (upstream, mut server) = pair().await;
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        app.write_all(b"hello").await.unwrap();
        app.shutdown().await.unwrap();
        server.write_all(b"back").await.unwrap();
        server.shutdown().await.unwrap();
        let ended = relay(&client, &upstream, None, &counters, None).await;
        assert!(matches!(ended, Ended::Done { up: 5, down: 4 }), "{ended:?}");
        let (mut got_app, mut got_server) = (Vec::new(), Vec::new());
        app.read_to_end(&mut got_app).await.unwrap();
        server.read_to_end(&mut got_server).await.unwrap();
        assert_eq!((&got_app[..], &got_server[..]), (&b"back"[..], &b"hello"[..]));
    }

    #[test]
    fn keepalive_is_set_as_given() {
        let s = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        Keepalive::DEFAULT.apply(&s).unwrap();
        use rustix::net::sockopt;
        assert!(sockopt::socket_keepalive(&s).unwrap());
        assert_eq!(sockopt::tcp_keepidle(&s).unwrap(), Duration::from_secs(180));
        assert_eq!(sockopt::tcp_keepintvl(&s).unwrap(), Duration::from_secs(180));
        assert_eq!(sockopt::tcp_keepcnt(&s).unwrap(), 9);
    }
}
