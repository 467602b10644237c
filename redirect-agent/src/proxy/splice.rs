//! Bulk directions through a pipe: `splice(2)` moves a socket's received pages into a pipe and
//! from there into the other socket's send queue, so the bytes never cross into user space
//! (two copies fewer than a read and a write), and each call moves up to a pipe's worth.
//!
//! A direction starts on the copy path ([`super::relay`]) and takes a pipe only once a read
//! fills the whole scratch buffer: a request and its answer never pay for a pipe, a stream
//! does. It gives the pipe back for good, and copies on, once its segments prove small
//! ([`Pumped::Fragmented`]): a pipe passes segments on as they came, each in a slot and a
//! fragment of its own, where a read and a write coalesce them. The pipe's two descriptors are a share of the connection budget the process's
//! proxies share, taken only while half of it is free, so a burst of streams never makes the
//! proxy turn new connections away; without a share a direction goes on copying.

use std::{
    io,
    os::fd::OwnedFd,
    sync::atomic::{AtomicU64, Ordering},
};

use rustix::pipe::{PipeFlags, SpliceFlags, pipe_with, splice};
use tokio::{io::Interest, net::TcpStream, sync::OwnedSemaphorePermit};

use super::{Budget, relay::Activity};

/// What one splice moves at most: a pipe's default capacity, 16 slots of a page, kept as it
/// is. Larger pipes (256 KiB, 1 MiB) moved streams no faster on the benchmark's machine, and
/// while a receiver is slow a pipe holds at most its 16 buffers (pages, or parts of the
/// sender's page fragments), near what the copy path's 64 KiB would.
const PIPE_SIZE: usize = 64 * 1024;

/// How [`pump`] ended.
pub(super) enum Pumped {
    /// EOF: every byte passed on.
    Eof,
    /// A splice took in less than half of [`PIPE_SIZE`] from a socket that held all of it:
    /// the pipe's slots ran out on small segments. The pipe is empty; the caller copies on.
    Fragmented,
}

/// One direction's pipe, and its share of the budget.
pub(super) struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    _share: OwnedSemaphorePermit,
}

impl Pipe {
    /// A pipe, if the budget has a share to spare and the process a pipe to make.
    pub(super) fn take(budget: &Budget) -> Option<Self> {
        let share = budget.take_spare()?;
        let (read, write) = pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK).ok()?;
        Some(Self {
            read,
            write,
            _share: share,
        })
    }
}

/// Copies `from` to `to` through `pipe` until EOF (without shutting `to` down: the caller's
/// part) or until the stream proves fragmented; adds what it moved to `total`. Every splice
/// into the pipe is drained out of it before the next, so a splice that cannot go on is always
/// the socket's doing, never a full pipe's.
pub(super) async fn pump(
    from: &TcpStream,
    to: &TcpStream,
    pipe: &Pipe,
    bytes: &AtomicU64,
    activity: &Activity,
    total: &mut u64,
) -> io::Result<Pumped> {
    let flags = SpliceFlags::MOVE | SpliceFlags::NONBLOCK;
    loop {
        from.readable().await?;
        // What the socket held before: a splice that took in less than half of a pipe's worth
        // of it ran out of slots (bytes that arrive meanwhile only add to it).
        let queued = rustix::io::ioctl_fionread(from).unwrap_or(0);
        let read = match from.try_io(Interest::READABLE, || {
            Ok(splice(from, None, &pipe.write, None, PIPE_SIZE, flags)?)
        }) {
            Ok(0) => return Ok(Pumped::Eof),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        let mut left = read;
        let mut held = None;
        while left > 0 {
            // Into a socket whose peer is gone, splice fails with EPIPE and may raise SIGPIPE
            // (unlike the copy path's send, it cannot ask for MSG_NOSIGNAL); Rust's runtime
            // ignores SIGPIPE, so it is an error here like any other, and the relay ends failed.
            match to.try_io(Interest::WRITABLE, || {
                Ok(splice(&pipe.read, None, to, None, left, flags)?)
            }) {
                Ok(n) => {
                    left -= n;
                    activity.touch();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // The receiver is behind: the pipe holds bytes until it takes them.
                    held.get_or_insert_with(|| activity.hold());
                    to.writable().await?;
                }
                Err(e) => return Err(e),
            }
        }
        drop(held);
        activity.touch();
        *total += read as u64;
        bytes.fetch_add(read as u64, Ordering::Relaxed);
        if read < PIPE_SIZE / 2 && queued >= PIPE_SIZE as u64 {
            return Ok(Pumped::Fragmented);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::{
        super::{
            ProxyCounters,
            relay::{COPY_BUF, Ended, relay, tests::pair},
        },
        *,
    };

    /// `len` bytes that differ from any shifted copy of themselves.
    fn pattern(len: usize, seed: usize) -> Vec<u8> {
        (0..len).map(|i| ((i * seed + i / 251) % 251) as u8).collect()
    }

    /// Waits until `s` holds at least `n` unread bytes (at most 10 s), so that the relay's
    /// first read of it fills the buffer.
    async fn queued(s: &TcpStream, n: usize) {
        for _ in 0..1000 {
            if rustix::io::ioctl_fionread(s).unwrap() >= n as u64 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{n} bytes never arrived");
    }

    /// One end of a relayed connection: writes `data` and half-closes, and reads until EOF
    /// (or an error, whose kind it returns).
    fn talk(s: TcpStream, data: Vec<u8>) -> tokio::task::JoinHandle<Result<Vec<u8>, io::ErrorKind>> {
        let (mut r, mut w) = s.into_split();
        tokio::spawn(async move {
            let writer = tokio::spawn(async move {
                let _ = w.write_all(&data).await;
                let _ = w.shutdown().await;
                w
            });
            let mut got = Vec::new();
            let read = r.read_to_end(&mut got).await;
            drop(writer.await);
            read.map(|_| got).map_err(|e| e.kind())
        })
    }

    /// Relays 4 MiB each way between `app` and `server` through `client` and `upstream`, to a
    /// clean end with every byte delivered.
    async fn stream_both_ways(budget: Option<&Budget>, counters: &ProxyCounters) {
        let (app, client) = pair().await;
        let (upstream, server) = pair().await;
        let (up, down) = (pattern(4 << 20, 7), pattern(4 << 20, 13));
        let app = talk(app, up.clone());
        let server = talk(server, down.clone());
        queued(&client, COPY_BUF).await;
        queued(&upstream, COPY_BUF).await;
        let ended = tokio::time::timeout(
            Duration::from_secs(60),
            relay(&client, &upstream, None, counters, budget),
        )
        .await
        .expect("the relay ends");
        // Closed as the proxy closes them once done.
        drop((client, upstream));
        let (got_app, got_server) = (app.await.unwrap().unwrap(), server.await.unwrap().unwrap());
        assert!(got_server == up, "the server got the app's bytes, in order");
        assert!(got_app == down, "the app got the server's bytes, in order");
        assert!(
            matches!(ended, Ended::Done { up, down } if up == 4 << 20 && down == 4 << 20),
            "{ended:?}"
        );
    }

    #[tokio::test]
    async fn a_stream_goes_through_a_pipe_intact_both_ways_with_its_half_closes() {
        let budget = Budget::new(8);
        let counters = ProxyCounters::default();
        stream_both_ways(Some(&budget), &counters).await;
        assert_eq!(counters.spliced.load(Ordering::Relaxed), 2, "both directions spliced");
        assert_eq!(budget.in_use(), 0, "the pipes' shares came back");
    }

    #[tokio::test]
    async fn with_half_the_budget_spent_a_stream_keeps_copying() {
        let budget = Budget::new(2);
        let _held = budget.take().unwrap();
        let counters = ProxyCounters::default();
        stream_both_ways(Some(&budget), &counters).await;
        assert_eq!(counters.spliced.load(Ordering::Relaxed), 0, "no pipe taken");
        // And never where the caller says no (the fast path).
        stream_both_ways(None, &counters).await;
        assert_eq!(counters.spliced.load(Ordering::Relaxed), 0);
    }

    /// A stream of small segments fills the pipe's 16 slots long before its 64 KiB: the pump
    /// hands the stream back to the copy path with the pipe empty and every byte so far passed
    /// on, in order.
    #[tokio::test]
    async fn small_segments_give_the_pipe_back() {
        let (mut app, client) = pair().await;
        let (upstream, mut server) = pair().await;
        // Room for everything the app sends before anyone reads (no pruning of the queue).
        socket2::SockRef::from(&client).set_recv_buffer_size(8 << 20).unwrap();
        app.set_nodelay(true).unwrap();
        let data = pattern(256 << 10, 5);
        for chunk in data.chunks(256) {
            app.write_all(chunk).await.unwrap();
        }
        queued(&client, 128 << 10).await;
        let budget = Budget::new(8);
        let pipe = Pipe::take(&budget).unwrap();
        let (bytes, activity, mut total) = (AtomicU64::new(0), Activity::new(), 0u64);
        let pumped = tokio::time::timeout(
            Duration::from_secs(10),
            pump(&client, &upstream, &pipe, &bytes, &activity, &mut total),
        )
        .await
        .expect("the pump returns")
        .unwrap();
        assert!(
            matches!(pumped, Pumped::Fragmented),
            "small segments are not worth a pipe"
        );
        assert!(total > 0 && total < data.len() as u64, "{total}");
        let mut got = vec![0u8; total as usize];
        server.read_exact(&mut got).await.unwrap();
        assert!(
            got[..] == data[..total as usize],
            "what went through the pipe, in order"
        );
    }

    /// A reset from the destination while its bytes go through the pipe ends the relay as
    /// failed (so the proxy resets the app's side too), never as a clean end.
    #[tokio::test]
    async fn a_reset_while_splicing_ends_the_relay_failed() {
        let budget = Budget::new(8);
        let counters = ProxyCounters::default();
        let (app, client) = pair().await;
        let (upstream, mut server) = pair().await;
        let app = talk(app, Vec::new());
        // The server writes (what its socket takes before anyone reads need not be all of it)
        // and, when told, resets.
        let (reset, told) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            let _ = server.write_all(&pattern(4 << 20, 3)).await;
            let _ = told.await;
            server.set_zero_linger().unwrap();
        });
        queued(&upstream, COPY_BUF).await;
        let ended = {
            let relayed = relay(&client, &upstream, None, &counters, Some(&budget));
            tokio::pin!(relayed);
            // Until the server's direction has taken its pipe.
            let spliced = async {
                while counters.spliced.load(Ordering::Relaxed) == 0 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            };
            let spliced = tokio::time::timeout(Duration::from_secs(10), spliced);
            tokio::select! {
                ended = &mut relayed => panic!("ended before the reset: {ended:?}"),
                r = spliced => r.expect("the server's direction takes a pipe"),
            }
            reset.send(()).unwrap();
            server.await.unwrap();
            tokio::time::timeout(Duration::from_secs(10), relayed)
                .await
                .expect("the relay ends")
        };
        assert!(
            matches!(&ended, Ended::Failed(e) if e.kind() == io::ErrorKind::ConnectionReset),
            "{ended:?}"
        );
        drop((client, upstream));
        let _ = app.await;
    }
}
