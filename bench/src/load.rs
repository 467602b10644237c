//! The load generator: connection-per-request (CRR), request/response on persistent
//! connections at a fixed rate (RR), and bulk writes (STREAM). Every loop is bounded by a
//! deadline; it runs inside the workload (its cgroup, namespace and identity), as the
//! application would.

use std::{
    io::{self, Read, Write},
    net::{Shutdown, SocketAddrV4, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use crate::proto::{Kind, header};

const IO_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LoadResult {
    /// Completed requests (CRR: connections).
    pub completed: u64,
    pub errors: u64,
    pub elapsed_s: f64,
    pub per_second: f64,
    /// Latency percentiles in microseconds (RR), from the scheduled send time.
    pub p50_us: Option<f64>,
    pub p99_us: Option<f64>,
    pub p999_us: Option<f64>,
    /// STREAM: bytes the server counted, and the rate.
    pub bytes: u64,
    pub mb_per_s: f64,
    /// What ended a run that failed (STREAM: its one connection).
    #[serde(default)]
    pub error: Option<String>,
}

/// A blocking connection that waits out EAGAIN. On 6.18 a blocking socket in a sockhash (the
/// fast path, D) can end a read or write with EAGAIN long before its timeout, when a wakeup
/// brings nothing; event-driven clients retry on readiness, and so does this one, within the
/// same timeout. On other sockets EAGAIN only ever means the timeout passed.
struct Conn {
    stream: TcpStream,
}

impl Conn {
    fn retry<T>(&self, events: libc::c_short, mut op: impl FnMut(&TcpStream) -> io::Result<T>) -> io::Result<T> {
        let deadline = Instant::now() + IO_TIMEOUT;
        loop {
            match op(&self.stream) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(e);
                    }
                    let mut pfd = libc::pollfd {
                        fd: std::os::fd::AsRawFd::as_raw_fd(&self.stream),
                        events,
                        revents: 0,
                    };
                    // SAFETY: `pfd` is one live, initialised pollfd for the call (nfds 1); poll only writes
                    // its `revents`, and the descriptor stays open, borrowed from `self.stream`.
                    unsafe { libc::poll(&raw mut pfd, 1, left.as_millis().min(i32::MAX as u128) as i32) };
                }
                other => return other,
            }
        }
    }

    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        self.stream.shutdown(how)
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.retry(libc::POLLIN, |mut s| s.read(buf))
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.retry(libc::POLLOUT, |mut s| s.write(buf))
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn connect(to: SocketAddrV4) -> io::Result<Conn> {
    let s = TcpStream::connect_timeout(&to.into(), IO_TIMEOUT)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(Conn { stream: s })
}

fn exchange(s: &mut Conn, kind: Kind, request: &[u8], response: &mut [u8]) -> io::Result<()> {
    let mut msg = Vec::with_capacity(9 + request.len());
    msg.extend_from_slice(&header(kind, request.len() as u32, response.len() as u32));
    msg.extend_from_slice(request);
    s.write_all(&msg)?;
    s.read_exact(response)
}

/// New connection per request: `workers` threads, each connect, 1 request, read the answer,
/// wait for the server's close, until the deadline.
pub fn crr(to: SocketAddrV4, workers: usize, size: usize, duration: Duration) -> LoadResult {
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + duration;
    std::thread::scope(|s| {
        for _ in 0..workers {
            let (done, errors) = (done.clone(), errors.clone());
            s.spawn(move || {
                let request = vec![7u8; size];
                let mut response = vec![0u8; size];
                while Instant::now() < deadline {
                    let mut one = || -> io::Result<()> {
                        let mut c = connect(to)?;
                        exchange(&mut c, Kind::Close, &request, &mut response)?;
                        // The server closes first; reading its EOF keeps TIME_WAIT over there.
                        let mut rest = [0u8; 1];
                        let _ = c.read(&mut rest)?;
                        Ok(())
                    };
                    match one() {
                        Ok(()) => done.fetch_add(1, Ordering::Relaxed),
                        Err(_) => errors.fetch_add(1, Ordering::Relaxed),
                    };
                }
            });
        }
    });
    let elapsed = start.elapsed().as_secs_f64();
    let completed = done.load(Ordering::Relaxed);
    LoadResult {
        completed,
        errors: errors.load(Ordering::Relaxed),
        elapsed_s: elapsed,
        per_second: completed as f64 / elapsed,
        ..LoadResult::default()
    }
}

fn percentile(sorted: &[u32], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    Some(f64::from(sorted[i]))
}

/// Persistent connections at a fixed total rate. Latency runs from each request's scheduled
/// time, so a stall counts against every request it delays (no coordinated omission).
pub fn rr(to: SocketAddrV4, conns: usize, rate: f64, size: usize, duration: Duration) -> LoadResult {
    let errors = AtomicU64::new(0);
    let start = Instant::now();
    let per_conn_interval = Duration::from_secs_f64(conns as f64 / rate);
    let mut all: Vec<u32> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..conns)
            .map(|k| {
                let errors = &errors;
                s.spawn(move || {
                    let mut lat = Vec::new();
                    let Ok(mut c) = connect(to) else {
                        errors.fetch_add(1, Ordering::Relaxed);
                        return lat;
                    };
                    let request = vec![7u8; size];
                    let mut response = vec![0u8; size];
                    // Stagger the connections across one interval.
                    let mut next = start + per_conn_interval.mul_f64(k as f64 / conns as f64);
                    while next < start + duration {
                        if let Some(wait) = next.checked_duration_since(Instant::now()) {
                            std::thread::sleep(wait);
                        }
                        if exchange(&mut c, Kind::Keep, &request, &mut response).is_err() {
                            errors.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                        lat.push(next.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
                        next += per_conn_interval;
                    }
                    lat
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap_or_default()).collect()
    });
    all.sort_unstable();
    let elapsed = start.elapsed().as_secs_f64();
    LoadResult {
        completed: all.len() as u64,
        errors: errors.load(Ordering::Relaxed),
        elapsed_s: elapsed,
        per_second: all.len() as f64 / elapsed,
        p50_us: percentile(&all, 0.50),
        p99_us: percentile(&all, 0.99),
        p999_us: percentile(&all, 0.999),
        ..LoadResult::default()
    }
}

/// One connection writing `size`-byte buffers until the deadline; the rate is what the
/// server says it received over the time until it said so.
pub fn stream(to: SocketAddrV4, size: usize, duration: Duration) -> LoadResult {
    let run = || -> io::Result<(u64, f64)> {
        let mut c = connect(to)?;
        c.write_all(&header(Kind::Sink, 0, 0))?;
        let buf = vec![7u8; size];
        let start = Instant::now();
        while start.elapsed() < duration {
            c.write_all(&buf)?;
        }
        c.shutdown(Shutdown::Write)?;
        let mut count = [0u8; 8];
        c.read_exact(&mut count)?;
        Ok((u64::from_be_bytes(count), start.elapsed().as_secs_f64()))
    };
    match run() {
        Ok((bytes, elapsed)) => LoadResult {
            completed: 1,
            elapsed_s: elapsed,
            bytes,
            mb_per_s: bytes as f64 / elapsed / 1e6,
            ..LoadResult::default()
        },
        Err(e) => LoadResult {
            errors: 1,
            error: Some(e.to_string()),
            ..LoadResult::default()
        },
    }
}

/// Opens `conns` connections, each proven end to end with one small exchange, and holds them
/// until stdin closes. Prints `held N` when they are all up.
pub fn hold(to: SocketAddrV4, conns: usize) -> io::Result<()> {
    let mut held = Vec::with_capacity(conns);
    let mut response = [0u8; 1];
    for _ in 0..conns {
        let mut c = connect(to)?;
        exchange(&mut c, Kind::Keep, &[1], &mut response)?;
        held.push(c);
    }
    println!("held {}", held.len());
    io::stdout().flush()?;
    let _ = io::stdin().read_to_end(&mut Vec::new());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_pick_from_the_sorted_samples() {
        let v: Vec<u32> = (1..=1000).collect();
        assert_eq!(percentile(&v, 0.5), Some(501.0));
        assert_eq!(percentile(&v, 0.99), Some(990.0));
        assert_eq!(percentile(&v, 0.999), Some(999.0));
        assert_eq!(percentile(&[], 0.5), None);
    }
}
