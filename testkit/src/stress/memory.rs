//! Bursts of concurrent proxied connections against a running agent, with the agent's
//! resident memory measured idle, at each burst's peak and after each burst: whether the
//! proxy gives memory back (issue 16, item 4). Bounded in count and time.
//!
//! A burst: `connections` clients in the remote namespace connect at once to a server in the
//! workload's namespace (inbound capture: through sk_lookup and the proxy), each sends
//! `bytes` and reads them back, all are held until every one has, then all close. The next
//! burst starts once the agent holds no more descriptors than before the first.

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde::Serialize;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::{StressArgs, fd_count, rss_kib, settled_fds, status_kib};
use crate::{agent::AgentProcess, cgroup::TestCgroup, netns::NetnsPair};

/// The workload's port the bursts dial (captured inbound, served by the stress's own server).
const PORT: u16 = 9400;
/// The target: after a burst, within 20 % of the idle size.
pub const MAX_RATIO: f64 = 1.2;
/// Every wait of a burst is bounded by this.
const BOUND: Duration = Duration::from_secs(120);

/// Resident memory of the agent, in KiB (VmRSS).
#[derive(Debug, Clone, Serialize)]
pub struct Burst {
    pub peak_kib: u64,
    pub after_kib: u64,
    /// Of `after_kib`: the heap and other anonymous memory, and mapped files (the binary's
    /// code, paged in as paths are first taken).
    pub after_anon_kib: u64,
    pub after_file_kib: u64,
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct StressReport {
    pub connections: usize,
    pub bytes: usize,
    pub idle_kib: u64,
    pub idle_anon_kib: u64,
    pub idle_file_kib: u64,
    pub bursts: Vec<Burst>,
}

impl StressReport {
    /// The largest resident size after a burst, as a ratio of the idle one.
    pub fn worst_ratio(&self) -> f64 {
        let worst = self.bursts.iter().map(|b| b.after_kib).max().unwrap_or(self.idle_kib);
        worst as f64 / self.idle_kib.max(1) as f64
    }
}

/// Waits (bounded) until `pid` holds at most `fds` descriptors.
fn wait_fds(pid: u32, fds: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + BOUND;
    while fd_count(pid) > fds {
        if Instant::now() > deadline {
            bail!("the agent holds {} descriptors, {fds} before the burst", fd_count(pid));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// The agent's resident memory once the burst is over: the proxy gives memory back from its
/// once-a-second housekeeping, so this waits at least 2 s, then until two readings half a
/// second apart agree (at most 10 s).
fn settled_rss(pid: u32) -> anyhow::Result<u64> {
    let start = Instant::now();
    let mut last = rss_kib(pid)?;
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let now = rss_kib(pid)?;
        if (now == last && start.elapsed() >= Duration::from_secs(2)) || start.elapsed() > Duration::from_secs(10) {
            return Ok(now);
        }
        last = now;
    }
}

/// Runs `args.bursts` bursts against `redirect-agent run` (`agent`) on a throw-away workload.
pub fn run(agent: &Path, args: &StressArgs) -> anyhow::Result<StressReport> {
    if args.connections == 0 || args.bursts == 0 {
        bail!("stress: --connections and --bursts must be at least 1");
    }
    // Client and server ends of every connection, in this process.
    let nofile = redirect_agent::sys::raise_nofile_limit(args.connections * 2);
    if (nofile as usize) < args.connections * 2 + 64 {
        bail!(
            "stress: RLIMIT_NOFILE is {nofile}, too low for {} connections (two descriptors each)",
            args.connections
        );
    }
    let pair = NetnsPair::create("stress")?;
    let cgroup = TestCgroup::create("stress")?;
    let name = crate::unique("stress");
    let cg = cgroup.path.to_string_lossy().into_owned();
    let ns = pair.workload.path.to_string_lossy().into_owned();
    let max = (args.connections + 16).to_string();
    let agent = AgentProcess::start(
        agent,
        &name,
        &["--cgroup", &cg, "--netns", &ns, "--max-proxy-connections", &max],
    )?;
    let pid = agent.pid().context("agent pid")?;

    let any = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, PORT);
    let socket = pair.workload.open()?.run(move || {
        let s = tokio::net::TcpSocket::new_v4()?;
        s.set_reuseaddr(true)?;
        s.bind(any.into())?;
        Ok(s)
    })?;
    let rt = tokio::runtime::Runtime::new()?;
    let server = {
        let _guard = rt.enter();
        // Room for a whole burst's SYNs.
        socket.listen(u32::try_from(args.connections).unwrap_or(u32::MAX))?
    };
    rt.spawn(echo_server(server));

    let idle_fds = settled_fds(pid);
    let idle_kib = rss_kib(pid)?;
    let (idle_anon_kib, idle_file_kib) = (status_kib(pid, "RssAnon")?, status_kib(pid, "RssFile")?);
    let to = SocketAddr::from(SocketAddrV4::new(pair.workload_ip, PORT));
    let mut bursts = Vec::new();
    for _ in 0..args.bursts {
        let t0 = Instant::now();
        let remote = pair.remote.open()?;
        let sockets = remote.run(|| {
            (0..args.connections)
                .map(|_| tokio::net::TcpSocket::new_v4())
                .collect::<std::io::Result<Vec<_>>>()
        })?;
        let peak_kib = rt.block_on(burst(sockets, to, args.bytes, pid))?;
        wait_fds(pid, idle_fds)?;
        let after_kib = settled_rss(pid)?;
        bursts.push(Burst {
            peak_kib,
            after_kib,
            after_anon_kib: status_kib(pid, "RssAnon")?,
            after_file_kib: status_kib(pid, "RssFile")?,
            seconds: t0.elapsed().as_secs_f64(),
        });
    }
    drop(agent);
    Ok(StressReport {
        connections: args.connections,
        bytes: args.bytes,
        idle_kib,
        idle_anon_kib,
        idle_file_kib,
        bursts,
    })
}

/// Echoes each connection until its EOF.
async fn echo_server(listener: tokio::net::TcpListener) {
    loop {
        let Ok((mut s, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        tokio::spawn(async move {
            let mut buf = vec![0u8; 16 << 10];
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if s.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
    }
}

/// One burst: every socket connects, sends `bytes` and reads them back; all are held until
/// each has; the agent's RSS is read then (the peak), and all close. Returns the peak.
async fn burst(sockets: Vec<tokio::net::TcpSocket>, to: SocketAddr, bytes: usize, pid: u32) -> anyhow::Result<u64> {
    let n = sockets.len();
    let all_done = Arc::new(tokio::sync::Barrier::new(n + 1));
    let (release, released) = tokio::sync::watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    for socket in sockets {
        let (all_done, mut released) = (all_done.clone(), released.clone());
        tasks.spawn(async move {
            let exchanged = async {
                let mut s = socket.connect(to).await?;
                let (mut r, mut w) = s.split();
                let data = vec![0x5au8; bytes];
                let send = async {
                    w.write_all(&data).await?;
                    Ok::<_, std::io::Error>(())
                };
                let recv = async {
                    let mut got = vec![0u8; bytes];
                    r.read_exact(&mut got).await?;
                    Ok::<_, std::io::Error>(got == data)
                };
                let ((), intact) = tokio::try_join!(send, recv)?;
                Ok::<_, std::io::Error>((s, intact))
            }
            .await;
            all_done.wait().await;
            // Held until every connection of the burst has exchanged its bytes.
            let _ = released.wait_for(|r| *r).await;
            exchanged.map(|(_, intact)| intact)
        });
    }
    tokio::time::timeout(BOUND, all_done.wait())
        .await
        .context("the burst's connections did not finish their exchange in time")?;
    let peak = rss_kib(pid)?;
    let _ = release.send(true);
    let (mut failed, mut first) = (0, None);
    while let Some(r) = tokio::time::timeout(BOUND, tasks.join_next())
        .await
        .context("the burst's connections did not close in time")?
    {
        match r {
            Ok(Ok(true)) => {}
            Ok(Ok(false)) => {
                failed += 1;
                first.get_or_insert_with(|| "bytes came back changed".to_owned());
            }
            Ok(Err(e)) => {
                failed += 1;
                first.get_or_insert_with(|| e.to_string());
            }
            Err(e) => {
                failed += 1;
                first.get_or_insert_with(|| e.to_string());
            }
        }
    }
    if let Some(first) = first {
        bail!("{failed} of {n} connections failed (the first: {first})");
    }
    Ok(peak)
}
