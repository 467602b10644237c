//! Hold: many connections open at once through one `run` agent (the remote host to the app,
//! through sk_lookup and the proxy), each exchanging a request when it opens and another
//! after all have been held for a while; then all close, and the agent's descriptors and the
//! per-connection maps come back to their idle values.

use std::{
    net::{SocketAddr, SocketAddrV4},
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde::Serialize;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::{
    StressArgs,
    churn::uncaptured,
    fd_count,
    maps::{self, Counts},
    rss_kib,
    servers::{APP_PORT, REQUEST, TallyCounts},
    settled_fds,
    target::{Mode, Target},
    wait_fds_at_most,
};

/// Every wait of the routine is bounded by this.
const BOUND: Duration = Duration::from_secs(300);
const SETTLE: Duration = Duration::from_secs(15);

#[derive(Debug, Serialize)]
pub struct HoldReport {
    /// Connections asked for, and held: fewer when RLIMIT_NOFILE (`nofile`, raised as far as
    /// this process may) cannot fit both ends here and in the agent.
    pub asked: usize,
    pub nofile: u64,
    pub connections: usize,
    pub held_secs: u64,
    /// From the first connect until every connection had its first answer.
    pub open_secs: f64,
    pub failed: usize,
    pub app: TallyCounts,
    pub idle_fds: usize,
    pub held_fds: usize,
    pub after_fds: usize,
    pub idle_kib: u64,
    pub held_kib: u64,
    pub idle_maps: Counts,
    pub held_maps: Counts,
    pub after_maps: Counts,
    pub problems: Vec<String>,
}

pub fn run(agent: &Path, args: &StressArgs) -> anyhow::Result<HoldReport> {
    let asked = args.hold;
    // Both ends of every connection are this process's (the app's server runs here); the
    // agent holds two descriptors per connection as well, under the same limits (it raises
    // its own). Without CAP_SYS_RESOURCE neither can go past the hard limit: hold what fits
    // both, with room for everything else, and say so.
    let nofile = redirect_agent::sys::raise_nofile_limit(asked);
    let fits = usize::try_from(nofile.saturating_sub(redirect_agent::sys::RESERVED_FDS) / 2)
        .unwrap_or(usize::MAX)
        .saturating_sub(64);
    let n = asked.min(fits);
    if n == 0 {
        bail!("RLIMIT_NOFILE is {nofile}: no room to hold connections");
    }
    let max = (n + 64).to_string();
    let t = Target::start(agent, Mode::Run, "hold", &["--max-proxy-connections", &max])?;
    let pid = t.pid()?;
    let idle_fds = settled_fds(pid);
    let idle_maps = maps::counts(&t.name)?;
    let idle_kib = rss_kib(pid)?;
    let to = SocketAddr::from(SocketAddrV4::new(t.pair.workload_ip, APP_PORT));
    let sockets = t.pair.remote.open()?.run(|| {
        (0..n)
            .map(|_| tokio::net::TcpSocket::new_v4())
            .collect::<std::io::Result<Vec<_>>>()
    })?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let all_open = Arc::new(tokio::sync::Barrier::new(n + 1));
    let (release, released) = tokio::sync::watch::channel(false);
    let t0 = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, socket) in sockets.into_iter().enumerate() {
        let (all_open, mut released) = (all_open.clone(), released.clone());
        tasks.spawn_on(
            async move {
                // Which step failed goes with the error: a reset at the connect, at the first
                // answer or after the hold points at different parts of the path.
                let step =
                    |what: &'static str| move |e: std::io::Error| std::io::Error::new(e.kind(), format!("{what}: {e}"));
                let opened = async {
                    let mut s = socket.connect(to).await.map_err(step("connect"))?;
                    exchange(&mut s, b'H', i).await.map_err(step("first exchange"))?;
                    Ok::<_, std::io::Error>(s)
                }
                .await;
                all_open.wait().await;
                let _ = released.wait_for(|r| *r).await;
                let mut s = opened?;
                // Still through the proxy after the hold: a second round, then the close.
                exchange(&mut s, b'h', i)
                    .await
                    .map_err(step("exchange after the hold"))?;
                s.shutdown().await.map_err(step("shutdown"))?;
                let mut rest = Vec::new();
                (&mut s).take(1).read_to_end(&mut rest).await.map_err(step("close"))?;
                if !rest.is_empty() {
                    return Err(std::io::Error::other("bytes after the last answer"));
                }
                Ok(())
            },
            rt.handle(),
        );
    }
    rt.block_on(async { tokio::time::timeout(BOUND, all_open.wait()).await })
        .context("the held connections did not all open in time")?;
    let open_secs = t0.elapsed().as_secs_f64();
    let held_fds = fd_count(pid);
    let held_maps = maps::counts(&t.name)?;
    let held_kib = rss_kib(pid)?;
    std::thread::sleep(Duration::from_secs(args.hold_secs));
    let _ = release.send(true);
    let mut failed = 0;
    let mut first = None;
    rt.block_on(async {
        while let Some(r) = tokio::time::timeout(BOUND, tasks.join_next())
            .await
            .context("the held connections did not close in time")?
        {
            let e = match r {
                Ok(Ok(())) => continue,
                Ok(Err(e)) => e.to_string(),
                Err(e) => e.to_string(),
            };
            failed += 1;
            first.get_or_insert(e);
        }
        Ok::<_, anyhow::Error>(())
    })?;
    rt.shutdown_timeout(Duration::from_secs(2));
    let after_fds = wait_fds_at_most(pid, idle_fds, SETTLE);
    let (after_maps, map_problems) = maps::back_to_idle(&t.name, &idle_maps, SETTLE)?;
    let app = t.servers.app.counts();

    let mut problems = Vec::new();
    if let Some(first) = first {
        // The agent's own account (warnings and up, each kind at most once a second): why it
        // reset, if it did.
        let log = t.agent_log();
        let said: Vec<&str> = log.lines().rev().take(8).collect();
        problems.push(format!(
            "{failed} of {n} held connections failed (the first: {first}); the agent's last log lines: {}",
            if said.is_empty() {
                "none".to_owned()
            } else {
                said.into_iter().rev().collect::<Vec<_>>().join(" | ")
            }
        ));
    }
    problems.extend(uncaptured("the app", app, &t.servers.app));
    if after_fds > idle_fds {
        problems.push(format!(
            "the agent holds {after_fds} descriptors {} s after the connections closed, {idle_fds} when idle",
            SETTLE.as_secs()
        ));
    }
    problems.extend(map_problems);
    Ok(HoldReport {
        asked,
        nofile,
        connections: n,
        held_secs: args.hold_secs,
        open_secs,
        failed,
        app,
        idle_fds,
        held_fds,
        after_fds,
        idle_kib,
        held_kib,
        idle_maps,
        held_maps,
        after_maps,
        problems,
    })
}

/// One request (`kind` and the connection's number) and its echo.
async fn exchange(s: &mut tokio::net::TcpStream, kind: u8, i: usize) -> std::io::Result<()> {
    let mut req = [b'.'; REQUEST];
    req[0] = kind;
    let tag = i.to_string();
    req[1..=tag.len()].copy_from_slice(tag.as_bytes());
    s.write_all(&req).await?;
    let mut got = [0u8; REQUEST];
    s.read_exact(&mut got).await?;
    if got != req {
        return Err(std::io::Error::other("the answer came back changed"));
    }
    Ok(())
}
