//! The load generator: `redirect-testkit stress-load`, a child process that joins a workload
//! (its cgroup and namespace) or the remote host's namespace and makes short connections
//! ([`super::servers`]' churn protocol), a fixed number at once, until it has made its count,
//! its time is up or its stdin closes (the routine's "stop"). It writes a [`LoadReport`] to a
//! file: every outcome, and per 10 ms of the shared clock ([`super::epoch_ms`]) what ended
//! then, so that the routine can tell what happened during an outage.
//!
//! [`LoadProcess`] is the routine's side.

use std::{
    collections::BTreeMap,
    io::Read as _,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, ExitCode, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::{epoch_ms, servers::REQUEST};

/// The resolution of [`LoadReport::by_tick`], in ms.
pub const TICK_MS: u64 = 10;

#[derive(clap::Args, Debug, Clone)]
pub struct LoadArgs {
    /// cgroup v2 directory to join first.
    #[arg(long)]
    pub cgroup: Option<PathBuf>,
    /// Network namespace to enter.
    #[arg(long)]
    pub netns: PathBuf,
    /// Source address to bind each socket to (port 0).
    #[arg(long)]
    pub bind: Option<IpAddr>,
    #[arg(long)]
    pub to: SocketAddr,
    /// Connections in all, at most.
    #[arg(long)]
    pub connections: u64,
    /// Connections going at once.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// Stop after this long, at most.
    #[arg(long, default_value_t = 600)]
    pub seconds: u64,
    /// Bound of each connection, connect to close.
    #[arg(long, default_value_t = 10_000)]
    pub timeout_ms: u64,
    /// Where the report goes (JSON).
    #[arg(long)]
    pub report: PathBuf,
}

/// How connections ended, by kind.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Outcomes {
    /// Sent their request and read it back whole, then EOF.
    pub ok: u64,
    pub refused: u64,
    /// Reset, or a broken pipe.
    pub reset: u64,
    /// EOF before the answer was whole, or a changed answer.
    pub cut: u64,
    pub timed_out: u64,
    pub other: u64,
}

impl Outcomes {
    pub fn total(&self) -> u64 {
        self.ok + self.failed()
    }

    pub fn failed(&self) -> u64 {
        self.refused + self.reset + self.cut + self.timed_out + self.other
    }

    fn add(&mut self, o: &Self) {
        self.ok += o.ok;
        self.refused += o.refused;
        self.reset += o.reset;
        self.cut += o.cut;
        self.timed_out += o.timed_out;
        self.other += o.other;
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LoadReport {
    pub outcomes: Outcomes,
    /// Outcomes by the 10 ms of [`epoch_ms`] each connection ended in (its key / 10).
    pub by_tick: BTreeMap<u64, Outcomes>,
    /// The first error of each kind other than ok.
    pub first_errors: Vec<String>,
    pub seconds: f64,
    /// Epoch ms of the first connection that succeeded.
    pub first_ok_ms: Option<u64>,
}

impl LoadReport {
    /// What ended within `[from_ms, to_ms)`, to the 10 ms: a tick belongs to the phase it
    /// begins in, so that consecutive phases never count a connection twice.
    pub fn between(&self, from_ms: u64, to_ms: u64) -> Outcomes {
        let mut sum = Outcomes::default();
        for (_, o) in self.by_tick.range(from_ms / TICK_MS..to_ms / TICK_MS) {
            sum.add(o);
        }
        sum
    }

    /// Epoch ms (to 10 ms) of the first success at or after `from_ms`.
    pub fn first_ok_after(&self, from_ms: u64) -> Option<u64> {
        self.by_tick
            .range(from_ms / TICK_MS..)
            .find(|(_, o)| o.ok > 0)
            .map(|(t, _)| t * TICK_MS)
    }
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Ok,
    Refused,
    Reset,
    Cut,
    TimedOut,
    Other,
}

/// The child's side: joins, loads, writes the report.
pub fn main(args: &LoadArgs) -> ExitCode {
    match generate(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("redirect-testkit stress-load: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn generate(args: &LoadArgs) -> anyhow::Result<()> {
    // Before any thread: cgroup and namespace are per task.
    redirect_agent::sys::join(args.cgroup.as_deref(), Some(&args.netns))?;
    redirect_agent::sys::raise_nofile_limit(args.concurrency * 2);
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        std::thread::spawn(move || {
            // Anything or EOF on stdin: stop.
            let _ = std::io::stdin().read(&mut [0u8; 1]);
            stop.store(true, Ordering::Relaxed);
        });
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs(args.seconds);
    let next = Arc::new(AtomicU64::new(0));
    let report = Arc::new(Mutex::new(LoadReport::default()));
    let timeout = Duration::from_millis(args.timeout_ms);
    rt.block_on(async {
        let mut workers = tokio::task::JoinSet::new();
        for _ in 0..args.concurrency.max(1) {
            let (stop, next, report) = (stop.clone(), next.clone(), report.clone());
            let (to, bind, max) = (args.to, args.bind, args.connections);
            workers.spawn(async move {
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= max {
                        break;
                    }
                    let (kind, error) = match tokio::time::timeout(timeout, one(to, bind, n)).await {
                        Ok(Ok(())) => (Kind::Ok, None),
                        Ok(Err(e)) => (classify(&e), Some(e.to_string())),
                        Err(_) => (Kind::TimedOut, Some("timed out".to_owned())),
                    };
                    record(&report, kind, error);
                    if !matches!(kind, Kind::Ok) {
                        // A refused connect returns at once: do not spin.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            });
        }
        while workers.join_next().await.is_some() {}
    });
    rt.shutdown_timeout(Duration::from_secs(1));
    let mut report = std::mem::take(&mut *report.lock().unwrap_or_else(|e| e.into_inner()));
    report.seconds = t0.elapsed().as_secs_f64();
    std::fs::write(&args.report, serde_json::to_vec(&report)?)
        .with_context(|| format!("writing {}", args.report.display()))?;
    Ok(())
}

fn record(report: &Mutex<LoadReport>, kind: Kind, error: Option<String>) {
    let now = epoch_ms();
    let mut r = report.lock().unwrap_or_else(|e| e.into_inner());
    bump(r.by_tick.entry(now / TICK_MS).or_default(), kind);
    bump(&mut r.outcomes, kind);
    if matches!(kind, Kind::Ok) {
        r.first_ok_ms.get_or_insert(now);
    } else if let Some(e) = error {
        let label = format!("{kind:?}");
        if !r.first_errors.iter().any(|f| f.starts_with(&label)) {
            r.first_errors.push(format!("{label}: {e}"));
        }
    }
}

fn bump(o: &mut Outcomes, kind: Kind) {
    *match kind {
        Kind::Ok => &mut o.ok,
        Kind::Refused => &mut o.refused,
        Kind::Reset => &mut o.reset,
        Kind::Cut => &mut o.cut,
        Kind::TimedOut => &mut o.timed_out,
        Kind::Other => &mut o.other,
    } += 1;
}

fn classify(e: &std::io::Error) -> Kind {
    use std::io::ErrorKind as K;
    match e.kind() {
        K::ConnectionRefused => Kind::Refused,
        K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe => Kind::Reset,
        K::UnexpectedEof | K::InvalidData => Kind::Cut,
        K::TimedOut => Kind::TimedOut,
        _ => Kind::Other,
    }
}

/// One connection: the request (`C` and the connection's number), its echo, the server's EOF.
async fn one(to: SocketAddr, bind: Option<IpAddr>, n: u64) -> std::io::Result<()> {
    let socket = if to.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    if let Some(ip) = bind {
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    let mut s = socket.connect(to).await?;
    let mut req = [b'.'; REQUEST];
    req[0] = b'C';
    let tag = n.to_string();
    req[1..=tag.len()].copy_from_slice(tag.as_bytes());
    s.write_all(&req).await?;
    let mut got = Vec::with_capacity(REQUEST);
    (&mut s).take(REQUEST as u64 + 1).read_to_end(&mut got).await?;
    if got != req {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("{} of {REQUEST} bytes came back intact", common_prefix(&got, &req)),
        ));
    }
    Ok(())
}

fn common_prefix(a: &[u8], b: &[u8]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// A running `stress-load`, stopped (stdin closed, then killed past its bound) on drop.
pub struct LoadProcess {
    child: Option<Child>,
    report: PathBuf,
}

impl LoadProcess {
    /// Starts the generator (`redirect-testkit` is this process's own executable).
    pub fn start(
        cgroup: Option<&Path>,
        netns: &Path,
        bind: Option<IpAddr>,
        to: SocketAddr,
        connections: u64,
        concurrency: usize,
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        let report = std::env::temp_dir().join(format!("{}.load.json", crate::unique("stress")));
        let mut c = Command::new(std::env::current_exe()?);
        c.arg("stress-load")
            .arg("--netns")
            .arg(netns)
            .args(["--to", &to.to_string()])
            .args(["--connections", &connections.to_string()])
            .args(["--concurrency", &concurrency.to_string()])
            .args(["--timeout-ms", &timeout.as_millis().to_string()])
            .arg("--report")
            .arg(&report)
            .stdin(Stdio::piped())
            .stdout(Stdio::null());
        if let Some(cg) = cgroup {
            c.arg("--cgroup").arg(cg);
        }
        if let Some(ip) = bind {
            c.args(["--bind", &ip.to_string()]);
        }
        Ok(Self {
            child: Some(c.spawn().context("starting redirect-testkit stress-load")?),
            report,
        })
    }

    /// Whether it has ended (made its count).
    pub fn done(&mut self) -> bool {
        self.child
            .as_mut()
            .is_none_or(|c| c.try_wait().ok().flatten().is_some())
    }

    /// Tells it to stop, waits (killed after `within`), and reads its report.
    pub fn finish(mut self, within: Duration) -> anyhow::Result<LoadReport> {
        let mut child = self.child.take().context("finished already")?;
        drop(child.stdin.take());
        let deadline = Instant::now() + within;
        let status = loop {
            if let Some(s) = child.try_wait()? {
                break s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("the load generator did not stop within {} s", within.as_secs());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        if !status.success() {
            bail!("the load generator failed ({status})");
        }
        let bytes = std::fs::read(&self.report).context("the load generator's report")?;
        Ok(serde_json::from_slice(&bytes)?)
    }
}

impl Drop for LoadProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_file(&self.report);
    }
}
