//! `redirect-bench scale` (`cargo xtask bench --scale`): one node agent and many workloads.
//! How long each enrollment takes as the node fills up; what the agent's process and its maps
//! hold with one workload and with all of them; and what connect4 costs a process that belongs
//! to no workload (every process under the attach point pays it) with one workload enrolled and
//! with all of them. The workloads are sidecar pods in effect: a namespace each, enrolled with
//! `--proxy none` (no proxy of the agent's), as the CNI plugin enrolls injected pods.

use std::{
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use redirect_agent::engine::pins::{self, State};
use redirect_common::programs;
use redirect_testkit::{
    agent::{AgentProcess, Pins},
    cgroup::TestCgroup,
    netns::NamedNetns,
    unique,
};

use crate::measure::{BpfStats, map_bytes, prog_stats, rss_bytes};

/// Connects a process of no workload makes per connect4 measurement.
pub(crate) const CONNECTS: u32 = 20_000;
/// Measurements at each point, reported as their median and range: one is within a few tens
/// of percent of the next on a shared machine.
pub(crate) const ROUNDS: usize = 7;
/// Where the process of no workload connects: a closed loopback port, refused at once, so
/// each connect is a run of connect4 and little else.
const CLOSED_PORT: u16 = 9;

/// What one run measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Outcome {
    pub workloads: usize,
    /// Each enrollment's latency, in milliseconds, in order (the control API's answer, as
    /// the CNI plugin waits for it; the namespace is made before the clock starts).
    pub enroll_ms: Vec<f64>,
    /// Agent RSS with one workload enrolled, and with all.
    pub rss_bytes: (u64, u64),
    /// Kernel memory of the instance's maps (bytes_memlock), with one workload and with all.
    pub map_bytes: (u64, u64),
    /// The agent's open descriptors, with one workload and with all.
    pub fds: (u64, u64),
    /// connect4's mean run time for a process of no workload, in ns, [`ROUNDS`] measurements
    /// each: with one workload enrolled, with all, and with one again after the others were
    /// unenrolled (what drifted over the run, whatever the number of workloads).
    pub connect4_ns: [Vec<f64>; 3],
    /// Each unenrollment's latency, in milliseconds, in order (all but the first workload).
    pub unenroll_ms: Vec<f64>,
    pub elapsed_s: f64,
}

impl Outcome {
    /// The `q` quantile of the enrollment latencies (nearest rank).
    pub fn enroll_quantile(&self, q: f64) -> f64 {
        quantile(&self.enroll_ms, q)
    }

    /// Mean of the enrollment latencies `range` (by order of enrollment).
    pub fn enroll_mean(&self, range: std::ops::Range<usize>) -> f64 {
        let v = &self.enroll_ms[range.start.min(self.enroll_ms.len())..range.end.min(self.enroll_ms.len())];
        v.iter().sum::<f64>() / v.len().max(1) as f64
    }
}

/// The `q` quantile of `values` (nearest rank; 0 for none).
pub(crate) fn quantile(values: &[f64], q: f64) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len().max(1));
    v.get(rank - 1).copied().unwrap_or(0.0)
}

/// `median [min-max]` of `values`, rounded.
pub(crate) fn spread(values: &[f64]) -> String {
    format!(
        "{:.0} [{:.0}-{:.0}]",
        quantile(values, 0.5),
        quantile(values, 0.0),
        quantile(values, 1.0)
    )
}

pub fn run(agent: &Path, me: &Path, workloads: usize) -> anyhow::Result<Outcome> {
    let started = Instant::now();
    let _stats = BpfStats::enable().context("turning kernel.bpf_stats_enabled on")?;
    // The node's attach point, and under it the cgroup of the process of no workload.
    let attach = TestCgroup::create("scale")?;
    let bystander_cg = attach.path.join("bystander");
    std::fs::create_dir(&bystander_cg).context("the bystander's cgroup")?;
    let _bystander_cg = RemoveDir(bystander_cg.clone());
    let mut node = Node::start(
        agent,
        "scale",
        &attach.path,
        &["--max-workloads", &workloads.to_string()],
    )?;
    let (name, socket, connect4) = (node.name.clone(), node.socket.clone(), node.connect4);
    let pid = node.process.pid().context("the node agent's pid")?;
    let bystander = NamedNetns::create(&format!("{name}-by"))?;

    let mut namespaces = Vec::with_capacity(workloads);
    let mut enroll_ms = Vec::with_capacity(workloads);
    let mut first = None;
    for i in 0..workloads {
        let ns = NamedNetns::create(&format!("{name}-{i}"))?;
        let request = redirect_api::Request::Enroll(redirect_api::Enroll {
            id: format!("pod-{i}"),
            netns: ns.path.clone(),
            cgroup: None,
            proxy: "none".into(),
            args: Vec::new(),
            fast_path: false,
            pod: None,
        });
        let t = Instant::now();
        let answer = redirect_api::call(&socket, &request, Duration::from_secs(60))
            .with_context(|| format!("enrolling workload {i}"))?;
        enroll_ms.push(t.elapsed().as_secs_f64() * 1e3);
        if let redirect_api::Response::Error(e) = answer {
            bail!("enrolling workload {i}: {e}");
        }
        namespaces.push(ns);
        if i == 0 {
            first = Some((
                rss_bytes(pid).unwrap_or(0),
                map_bytes(&name),
                open_fds(pid),
                connect4_rounds(me, &bystander_cg, &bystander, connect4)?,
            ));
        }
        if (i + 1) % 100 == 0 {
            eprintln!("scale: {} workloads enrolled", i + 1);
        }
    }
    let (rss1, maps1, fds1, c1) = first.context("no workload enrolled")?;
    let (rss_n, maps_n, fds_n) = (rss_bytes(pid).unwrap_or(0), map_bytes(&name), open_fds(pid));
    let cn = connect4_rounds(me, &bystander_cg, &bystander, connect4)?;
    // All but the first go again, which measures unenrolling and, with one workload left,
    // what the machine drifted meanwhile.
    let mut unenroll_ms = Vec::with_capacity(workloads);
    for i in 1..workloads {
        let request = redirect_api::Request::Unenroll {
            id: Some(format!("pod-{i}")),
            netns: None,
        };
        let t = Instant::now();
        let answer = redirect_api::call(&socket, &request, Duration::from_secs(60))
            .with_context(|| format!("unenrolling workload {i}"))?;
        unenroll_ms.push(t.elapsed().as_secs_f64() * 1e3);
        if let redirect_api::Response::Error(e) = answer {
            bail!("unenrolling workload {i}: {e}");
        }
    }
    let c1_again = connect4_rounds(me, &bystander_cg, &bystander, connect4)?;
    let outcome = Outcome {
        workloads,
        rss_bytes: (rss1, rss_n),
        map_bytes: (maps1, maps_n),
        fds: (fds1, fds_n),
        connect4_ns: [c1, cn, c1_again],
        enroll_ms,
        unenroll_ms,
        elapsed_s: 0.0,
    };
    // The agent first (it lets go of every workload), then the namespaces, then the cgroups.
    node.process.stop()?;
    drop(namespaces);
    Ok(Outcome {
        elapsed_s: started.elapsed().as_secs_f64(),
        ..outcome
    })
}

/// A node agent under a benchmark: attached at a test cgroup, with its control socket and
/// metrics off, and connect4's program id (for its run statistics).
pub(crate) struct Node {
    pub process: AgentProcess,
    pub name: String,
    pub socket: std::path::PathBuf,
    pub connect4: u32,
    /// A node keeps its pins when it stops: `cleanup` releases them, however the run ends
    /// (after the process: fields drop in order).
    _pins: Pins,
}

impl Node {
    pub(crate) fn start(agent: &Path, tag: &str, attach: &Path, extra: &[&str]) -> anyhow::Result<Self> {
        let name = unique(tag);
        let socket = std::env::temp_dir().join(format!("{name}.sock"));
        let pins = Pins::new(agent, &name);
        let mut args = vec![
            "--cgroup-parent".to_owned(),
            attach.to_string_lossy().into_owned(),
            "--socket".to_owned(),
            socket.to_string_lossy().into_owned(),
            "--metrics".to_owned(),
            "off".to_owned(),
        ];
        args.extend(extra.iter().map(|a| (*a).to_owned()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let process = AgentProcess::start_as(agent, "node", &name, &args)?;
        let state: State = serde_json::from_slice(&std::fs::read(pins::state_path(&name))?)?;
        let connect4 = *state
            .programs
            .get(programs::CONNECT4)
            .context("connect4's id in the state file")?;
        Ok(Self {
            process,
            name,
            socket,
            connect4,
            _pins: pins,
        })
    }
}

/// Descriptors process `pid` holds.
fn open_fds(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64)
}

/// [`ROUNDS`] measurements of [`connect4_cost`], connecting to a closed loopback port.
fn connect4_rounds(me: &Path, cgroup: &Path, netns: &NamedNetns, prog: u32) -> anyhow::Result<Vec<f64>> {
    let to = SocketAddrV4::new(Ipv4Addr::LOCALHOST, CLOSED_PORT);
    (0..ROUNDS)
        .map(|_| connect4_cost(me, cgroup, netns, prog, to))
        .collect()
}

/// connect4's mean run time over [`CONNECTS`] connects to `to` of a process in `cgroup` and
/// `netns`: the delta of its run time over the delta of its runs.
pub(crate) fn connect4_cost(
    me: &Path,
    cgroup: &Path,
    netns: &NamedNetns,
    prog: u32,
    to: SocketAddrV4,
) -> anyhow::Result<f64> {
    let (t0, n0) = prog_stats(prog).context("connect4's run statistics")?;
    let out = Command::new(me)
        .arg("connects")
        .arg("--cgroup")
        .arg(cgroup)
        .arg("--netns")
        .arg(&netns.path)
        .arg("--count")
        .arg(CONNECTS.to_string())
        .arg("--to")
        .arg(to.to_string())
        .stdin(Stdio::null())
        .output()?;
    if !out.status.success() {
        bail!("connects: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    let (t1, n1) = prog_stats(prog).context("connect4's run statistics")?;
    let runs = n1.saturating_sub(n0);
    if runs < u64::from(CONNECTS) {
        bail!("connect4 ran {runs} times for {CONNECTS} connects: is the process under the attach point?");
    }
    Ok(t1.saturating_sub(t0) as f64 / runs as f64)
}

/// The connecting process (`redirect-bench connects`, after joining its cgroup and
/// namespace): `count` connects to `to`, each failing at once (a closed loopback port, or an
/// address with no route).
pub fn connects(count: u32, to: SocketAddrV4) -> anyhow::Result<()> {
    for _ in 0..count {
        if TcpStream::connect(to).is_ok() {
            bail!("{to} accepted a connection: expected it to fail");
        }
    }
    Ok(())
}

/// A directory removed on drop (a cgroup made under a test cgroup, which must go first).
struct RemoveDir(std::path::PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// The section `cargo xtask bench --scale` writes into docs/benchmarks.md, between these
/// markers; `redirect-bench run` keeps it when it rewrites the rest.
pub const BEGIN: &str = "<!-- scale: written by `cargo xtask bench --scale` -->";
pub const END: &str = "<!-- /scale -->";

/// `doc` with its scale section replaced by `section` (appended when it has none).
pub fn with_section(doc: &str, section: &str) -> String {
    with_marked(doc, (BEGIN, END), section)
}

/// The scale section of `doc`, if it has one (markers excluded).
pub fn section_of(doc: &str) -> Option<&str> {
    marked(doc, (BEGIN, END))
}

/// `doc` with the section between `markers` replaced by `section` (appended when it has
/// none).
pub fn with_marked(doc: &str, (begin, end): (&str, &str), section: &str) -> String {
    let block = format!("{begin}\n{}\n{end}\n", section.trim_end());
    match (doc.find(begin), doc.find(end)) {
        (Some(b), Some(e)) if e > b => format!("{}{block}{}", &doc[..b], doc[e + end.len()..].trim_start_matches('\n')),
        _ => format!("{}\n\n{block}", doc.trim_end()),
    }
}

/// The section of `doc` between `markers`, if it has one (markers excluded).
pub fn marked<'a>(doc: &'a str, (begin, end): (&str, &str)) -> Option<&'a str> {
    let b = doc.find(begin)? + begin.len();
    let e = doc[b..].find(end)? + b;
    Some(doc[b..e].trim_matches('\n'))
}

/// The section's text.
pub fn markdown(o: &Outcome, machine: &crate::report::Machine) -> String {
    let mib = |b: u64| b as f64 / f64::from(1u32 << 20);
    let n = o.workloads;
    format!(
        "## Scale: {n} workloads on one node agent\n\n\
         {written} \
         One `redirect-agent node` (release build) enrolls {n} workloads one after another over \
         its control socket, each a network namespace of its own enrolled with `--proxy none` \
         (a sidecar pod: capture without the agent's proxy), then unenrolls all but the first. A \
         process of no workload under the attach point connects {connects} times to a closed \
         loopback port, {rounds} times over, with one workload enrolled, with all {n}, and with \
         one again after the others went (what the machine drifted over the run, whatever the \
         number of workloads); connect4's run time per connect is the kernel's own accounting \
         (`kernel.bpf_stats_enabled`), given as the median of the {rounds} and their range.\n\n\
         | | |\n|---|---|\n\
         | enroll latency p50 / p99 / max | {p50:.1} / {p99:.1} / {max:.1} ms |\n\
         | enroll latency, mean of the first 100 / the last 100 | {first:.1} / {last:.1} ms |\n\
         | agent RSS, 1 / {n} workloads | {rss1:.1} / {rssn:.1} MiB |\n\
         | map memory (bytes_memlock), 1 / {n} workloads | {m1:.1} / {mn:.1} MiB |\n\
         | agent descriptors, 1 / {n} workloads | {f1} / {fnn} |\n\
         | unenroll latency p50 / p99 / max | {u50:.1} / {u99:.1} / {umax:.1} ms |\n\
         | connect4 per connect of a process of no workload: 1 / {n} / 1 again | {c1} / {cn} / {c1again} ns |\n",
        written = machine.written_by("cargo xtask bench --scale", o.elapsed_s),
        connects = CONNECTS,
        rounds = ROUNDS,
        p50 = o.enroll_quantile(0.5),
        p99 = o.enroll_quantile(0.99),
        max = o.enroll_quantile(1.0),
        first = o.enroll_mean(0..100),
        last = o.enroll_mean(n.saturating_sub(100)..n),
        rss1 = mib(o.rss_bytes.0),
        rssn = mib(o.rss_bytes.1),
        f1 = o.fds.0,
        fnn = o.fds.1,
        m1 = mib(o.map_bytes.0),
        mn = mib(o.map_bytes.1),
        u50 = quantile(&o.unenroll_ms, 0.5),
        u99 = quantile(&o.unenroll_ms, 0.99),
        umax = quantile(&o.unenroll_ms, 1.0),
        c1 = spread(&o.connect4_ns[0]),
        cn = spread(&o.connect4_ns[1]),
        c1again = spread(&o.connect4_ns[2]),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_section_is_replaced_in_place_or_appended() {
        let doc = "# Benchmarks\n\nbody\n";
        let once = with_section(doc, "## Scale\nA");
        assert!(once.starts_with("# Benchmarks\n\nbody\n\n<!-- scale"));
        assert_eq!(section_of(&once), Some("## Scale\nA"));
        let twice = with_section(&format!("{once}\n## After\n"), "## Scale\nB");
        assert_eq!(section_of(&twice), Some("## Scale\nB"));
        assert!(twice.ends_with("<!-- /scale -->\n## After\n"), "{twice}");
        assert_eq!(twice.matches(BEGIN).count(), 1);
    }

    #[test]
    fn quantiles_take_the_nearest_rank() {
        let o = Outcome {
            workloads: 4,
            enroll_ms: vec![4.0, 1.0, 3.0, 2.0],
            rss_bytes: (0, 0),
            map_bytes: (0, 0),
            fds: (0, 0),
            connect4_ns: [vec![3.0, 1.0, 2.0], Vec::new(), Vec::new()],
            unenroll_ms: Vec::new(),
            elapsed_s: 0.0,
        };
        assert_eq!(spread(&o.connect4_ns[0]), "2 [1-3]");
        assert_eq!(o.enroll_quantile(0.5), 2.0);
        assert_eq!(o.enroll_quantile(0.99), 4.0);
        assert_eq!(o.enroll_mean(0..2), 2.5);
    }
}
