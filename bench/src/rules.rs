//! `redirect-bench rules` (`cargo xtask bench --rules`): what connect4 costs a workload's own
//! connect as its CIDR and port lists grow. istio-iptables writes one rule per CIDR and per
//! port, which iptables walks one by one; the agent packs each list into one set entry
//! (`chain::pack`), so the walk should cost the same at 1,000 as at 64.
//!
//! One node agent; per list length N, a workload (a namespace of its own, `--proxy none`)
//! enrolled with `-x` and `-i` of N IPv4 CIDRs each and `-o` of N ports, and a process of the
//! workload that connects to an address with no route (10.201.0.1, in no list, on a port in
//! none): the walk visits every entry and decides nothing, and the connect fails at once.
//!
//! Then what a connection costs end to end with such lists, against istio-iptables' own rules
//! for them: CRR through B (those rules and `redirect-agent proxy`), Bn (the same as Istio's
//! nftables backend writes them) and C (`redirect-agent run` with the same flags), the server's address the last entry of `-i`, so that iptables walks
//! every `-x`, `-o` and `-i` rule before the one that captures it.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use redirect_testkit::{cgroup::TestCgroup, netns::NamedNetns};

use crate::{
    goals::rounds_text,
    measure::{BpfStats, map_bytes},
    orchestrate::{Config, Env},
    report::median,
    scale::{CONNECTS, Node, ROUNDS, connect4_cost, spread},
};

/// Interleaved rounds of CRR per list length, B, Bn then C in each.
const CRR_ROUNDS: usize = 3;
/// How long each CRR run lasts.
const CRR_RUN: Duration = Duration::from_secs(5);

/// The list lengths measured.
pub const SIZES: [usize; 3] = [1, 64, 1000];

/// Where the workload's process connects: no route in its namespace, in none of the lists.
const UNROUTED: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 201, 0, 1), 9);

/// What one list length measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Point {
    pub size: usize,
    /// Rules in the workload's chains (both families), as istio-iptables would write them.
    pub rules: usize,
    /// The enroll's latency over the control socket, in ms.
    pub enroll_ms: f64,
    /// connect4's mean run time per connect, ns, [`ROUNDS`] measurements.
    pub connect4_ns: Vec<f64>,
    /// Kernel memory of the instance's maps with the workload enrolled.
    pub map_bytes: u64,
    /// CRR connections/s through B, Bn and C with lists of this length, one per round.
    pub crr_b: Vec<f64>,
    pub crr_bn: Vec<f64>,
    pub crr_c: Vec<f64>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Outcome {
    pub points: Vec<Point>,
    pub elapsed_s: f64,
}

/// The flags of a workload with lists of `n`: `-x` 172.16+.i.0/24, `-i` 10.16+.i.0/24 (IPv4, so
/// that ip6tables' chains stay short), `-o` ports 20000+i. With `capture`, that address is
/// `-i`'s last entry in place of the last /24: its connections are captured by the list's last
/// rule.
fn flags(n: usize, capture: Option<Ipv4Addr>) -> Vec<String> {
    let cidrs = |first: u8| (0..n).map(move |i| format!("{}.{}.{}.0/24", first, 16 + i / 256, i % 256));
    let mut include: Vec<String> = cidrs(10).collect();
    if let Some(ip) = capture {
        include.pop();
        include.push(format!("{ip}/32"));
    }
    let ports = (0..n).map(|i| (20_000 + i).to_string()).collect::<Vec<_>>().join(",");
    let exclude = cidrs(172).collect::<Vec<_>>().join(",");
    ["-x".into(), exclude, "-i".into(), include.join(","), "-o".into(), ports].into()
}

/// CRR through `config` with lists of `n`: connections per second, failing on any error.
fn crr(config: Config, n: usize, agent: &Path, me: &Path) -> anyhow::Result<f64> {
    let env = Env::with_flags(config, agent, me, |server| flags(n, Some(*server.ip())))?;
    let redirected = env.redirected()?;
    let r = env.crr(me, CRR_RUN)?;
    env.check_redirected(redirected, r.completed)?;
    if r.errors > 0 || r.completed == 0 {
        bail!(
            "CRR through {} with lists of {n}: {} errors, {} completed",
            config.label(),
            r.errors,
            r.completed
        );
    }
    Ok(r.per_second)
}

pub fn run(agent: &Path, me: &Path) -> anyhow::Result<Outcome> {
    let started = Instant::now();
    let stats = BpfStats::enable().context("turning kernel.bpf_stats_enabled on")?;
    let attach = TestCgroup::create("rules")?;
    let mut node = Node::start(agent, "rules", &attach.path, &[])?;
    let (name, socket, connect4) = (node.name.clone(), node.socket.clone(), node.connect4);
    let mut points = Vec::new();
    for size in SIZES {
        let ns = NamedNetns::create(&format!("{name}-{size}"))?;
        // The workload's process runs in a cgroup of its own under the attach point.
        let cgroup = attach.path.join(format!("n{size}"));
        std::fs::create_dir(&cgroup).context("the workload's cgroup")?;
        let result = measure(&socket, &ns, &cgroup, me, connect4, size, &name);
        let _ = std::fs::remove_dir(&cgroup);
        points.push(result?);
        eprintln!("rules: lists of {size} measured");
    }
    node.process.stop()?;
    // bpf_stats times every program run: off for the CRR runs, as in the main bench's.
    drop(stats);
    for p in &mut points {
        for _ in 0..CRR_ROUNDS {
            p.crr_b.push(crr(Config::Iptables, p.size, agent, me)?);
            p.crr_bn.push(crr(Config::Nftables, p.size, agent, me)?);
            p.crr_c.push(crr(Config::Connect4, p.size, agent, me)?);
        }
        eprintln!("rules: CRR with lists of {} measured", p.size);
    }
    Ok(Outcome {
        points,
        elapsed_s: started.elapsed().as_secs_f64(),
    })
}

fn measure(
    socket: &Path,
    ns: &NamedNetns,
    cgroup: &Path,
    me: &Path,
    connect4: u32,
    size: usize,
    instance: &str,
) -> anyhow::Result<Point> {
    let args = flags(size, None);
    let id = format!("lists-{size}");
    let request = redirect_api::Request::Enroll(redirect_api::Enroll {
        id: id.clone(),
        netns: ns.path.clone(),
        cgroup: None,
        proxy: "none".into(),
        args,
        fast_path: false,
        pod: None,
    });
    let t = Instant::now();
    let answer = redirect_api::call(socket, &request, Duration::from_secs(60)).context("enrolling")?;
    let enroll_ms = t.elapsed().as_secs_f64() * 1e3;
    if let redirect_api::Response::Error(e) = answer {
        bail!("enrolling the workload with lists of {size}: {e}");
    }
    let connect4_ns = (0..ROUNDS)
        .map(|_| connect4_cost(me, cgroup, ns, connect4, UNROUTED))
        .collect::<anyhow::Result<Vec<f64>>>();
    let map_bytes = map_bytes(instance);
    // The rules as `stats` lists them from the kernel's maps: every one istio-iptables would
    // write, packed or not.
    let rules = redirect_agent::stats::read(instance)?
        .workloads
        .iter()
        .find(|w| w.id.as_deref() == Some(id.as_str()))
        .map_or(0, |w| w.rules.len());
    let unenroll = redirect_api::Request::Unenroll {
        id: Some(id),
        netns: None,
    };
    let _ = redirect_api::call(socket, &unenroll, Duration::from_secs(60));
    Ok(Point {
        size,
        rules,
        enroll_ms,
        connect4_ns: connect4_ns?,
        map_bytes,
        crr_b: Vec::new(),
        crr_bn: Vec::new(),
        crr_c: Vec::new(),
    })
}

/// The section `cargo xtask bench --rules` writes into docs/benchmarks.md.
pub const MARKERS: (&str, &str) = (
    "<!-- rules: written by `cargo xtask bench --rules` -->",
    "<!-- /rules -->",
);

pub fn markdown(o: &Outcome, machine: &crate::report::Machine) -> String {
    let mut crr_rows = String::new();
    for p in &o.points {
        let over = |d: &[f64]| rounds_text(&p.crr_c.iter().zip(d).map(|(c, d)| c / d).collect::<Vec<_>>());
        crr_rows.push_str(&format!(
            "| {} | {:.0} | {:.0} | {:.0} | {} | {} |\n",
            p.size,
            median(&p.crr_b).unwrap_or(f64::NAN),
            median(&p.crr_bn).unwrap_or(f64::NAN),
            median(&p.crr_c).unwrap_or(f64::NAN),
            over(&p.crr_b),
            over(&p.crr_bn),
        ));
    }
    let mut rows = String::new();
    for p in &o.points {
        rows.push_str(&format!(
            "| {} | {} | {} ns | {:.1} ms | {:.1} MiB |\n",
            p.size,
            p.rules,
            spread(&p.connect4_ns),
            p.enroll_ms,
            p.map_bytes as f64 / f64::from(1u32 << 20),
        ));
    }
    format!(
        "## Rule lists: connect4's cost as the lists grow\n\n\
         {written} \
         One `redirect-agent node` (release build); per list length N, a workload enrolled with \
         `-x` and `-i` of N IPv4 CIDRs each and `-o` of N ports, whose process connects \
         {connects} times to an address with no route and in no list, {rounds} times over: \
         connect4 walks every entry of ISTIO_OUTPUT and decides nothing. Its run time per \
         connect is the kernel's own accounting (`kernel.bpf_stats_enabled`), the median of \
         the {rounds} and their range. Goal (issue 19): the same cost at every length.\n\n\
         | N | rules (both families) | connect4 per connect | enroll | map memory |\n\
         |---|---|---|---|---|\n{rows}\n\
         CRR with the same lists, the server's address the last entry of `-i` (iptables walks \
         every `-x`, `-o` and `-i` rule before the one that captures it): **B** \
         istio-iptables' rules for those flags (`explain`) and `redirect-agent proxy`, **Bn** the \
         same rules as Istio's nftables backend writes them (one rule per entry, as there) and \
         that proxy, **C** `redirect-agent run` with them, as in the main table ({workers} workers, {size} B each \
         way, {secs} s per run, {crr_rounds} interleaved rounds; connections/s, medians).\n\n\
         | N | B iptables | Bn nftables | C agent | C/B per round | C/Bn per round |\n\
         |---|---:|---:|---:|---|---|\n{crr_rows}",
        written = machine.written_by("cargo xtask bench --rules", o.elapsed_s),
        connects = CONNECTS,
        rounds = ROUNDS,
        workers = crate::orchestrate::CRR_WORKERS,
        size = crate::orchestrate::MESSAGE,
        secs = CRR_RUN.as_secs(),
        crr_rounds = CRR_ROUNDS,
    )
}
