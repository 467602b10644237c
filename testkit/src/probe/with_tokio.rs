//! `probe --tokio`: the exchanges of the blocking path, driven by tokio (non-blocking socket,
//! epoll readiness), as the proxy and most servers do.

use std::{
    io,
    net::TcpStream,
    time::{Duration, Instant},
};

use super::{ProbeArgs, pattern, writes};
use crate::report::ProbeResult;

/// The same exchanges as the blocking path, driven by a current-thread tokio runtime (made
/// after the process entered the workload, so it stays one thread).
pub(super) fn with_tokio(
    args: &ProbeArgs,
    stream: TcpStream,
    timeout: Duration,
    result: &mut ProbeResult,
) -> io::Result<()> {
    use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _};

    // Each step is bounded: a lost wakeup shows as a timeout, never as a hang.
    async fn bounded<T>(t: Duration, f: impl std::future::Future<Output = io::Result<T>>) -> io::Result<T> {
        tokio::time::timeout(t, f)
            .await
            .map_err(|_| io::Error::from_raw_os_error(libc::ETIMEDOUT))?
    }

    stream.set_nonblocking(true)?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let mut stream = tokio::net::TcpStream::from_std(stream)?;
        let (r, mut w) = stream.split();
        let mut r = tokio::io::BufReader::new(r);
        let mut banner = Vec::new();
        bounded(timeout, (&mut r).take(512).read_until(b'\n', &mut banner)).await?;
        if banner.last() != Some(&b'\n') {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "no banner from server"));
        }
        result.banner = Some(String::from_utf8_lossy(&banner).trim_end().to_owned());
        let data = pattern(args.bytes);
        if args.round_trips > 0 {
            let mut back = vec![0u8; data.len()];
            result.intact = true;
            for _ in 0..args.round_trips {
                let start = Instant::now();
                bounded(timeout, w.write_all(&data)).await?;
                bounded(timeout, r.read_exact(&mut back)).await?;
                let took = start.elapsed().as_micros() as u64;
                result.slowest_round_trip_us = result.slowest_round_trip_us.max(took);
                result.sent += data.len();
                result.received += back.len();
                result.intact &= back == data;
                result.round_trips += 1;
            }
            return bounded(timeout, w.shutdown()).await;
        }
        if args.fill {
            let chunk = pattern(64 * 1024);
            while result.sent < args.fill_cap {
                match tokio::time::timeout(Duration::from_secs(1), w.write(&chunk)).await {
                    Ok(n) => result.sent += n?,
                    Err(_) => break,
                }
            }
            return Ok(());
        }
        // Each write bounded on its own: `--write-size` slices, or all of it at once.
        for chunk in writes(args, &data) {
            bounded(timeout, w.write_all(chunk)).await?;
            result.sent += chunk.len();
        }
        bounded(timeout, w.shutdown()).await?;
        let mut back = Vec::with_capacity(data.len());
        bounded(timeout, (&mut r).take(data.len() as u64 + 1).read_to_end(&mut back)).await?;
        result.received = back.len();
        result.intact = back == data;
        Ok(())
    })
}
