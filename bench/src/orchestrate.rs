//! One benchmark run: every configuration in a fresh namespace pair and cgroup, interleaved
//! round by round (A B Bn C D C0 Cc Ai Bi Ci, A B Bn ...) so that drift on the machine lands on all
//! of them.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader},
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use redirect_agent::engine::pins::{self, State};
use redirect_common::programs;
use redirect_testkit::{agent::AgentProcess, cgroup::TestCgroup, netns::NetnsPair, unique};

use crate::{
    baseline,
    load::LoadResult,
    measure::{BpfStats, process_cpu_seconds, prog_stats},
    memory::{self, Memory},
};

pub const SERVER_PORT: u16 = 8080;

#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Config {
    /// A: client to server, no interception.
    Direct,
    /// B: istio-iptables' default rules (from `explain`) and `redirect-agent proxy`.
    Iptables,
    /// Bn: the same capture as Istio's native nftables backend writes it (`--native-nftables`,
    /// Istio 1.27+), and `redirect-agent proxy`.
    Nftables,
    /// C: the agent with its defaults and its embedded proxy, the fast path off (the harness's
    /// `fast_path_default`).
    Connect4,
    /// D: C with `--fast-path` (sk_msg between the app and the proxy).
    FastPath,
    /// C0: the agent's programs attached, with flags under which no rule matches the client
    /// (`-i '' -b ''`): the cost of connect4 alone.
    Connect4Idle,
    /// C with `--relay copy`: the proxy reads and writes every byte (STREAM only: a request
    /// of CRR or RR never fills a read, so never takes a pipe).
    Connect4Copy,
    /// Inbound (CRR only): the remote host connects to an app in the workload, directly.
    InDirect,
    /// Inbound through istio-iptables' nat PREROUTING REDIRECT to `redirect-agent proxy`.
    InIptables,
    /// Inbound through the agent: sk_lookup hands the connection to the embedded proxy.
    InSkLookup,
}

impl Config {
    pub fn label(self) -> &'static str {
        match self {
            Self::Direct => "A direct",
            Self::Iptables => "B iptables + proxy",
            Self::Nftables => "Bn nftables + proxy",
            Self::Connect4 => "C connect4 + proxy",
            Self::FastPath => "D connect4 + sk_msg + proxy",
            Self::Connect4Idle => "C0 connect4, no match",
            Self::Connect4Copy => "Cc connect4 + proxy, --relay copy",
            Self::InDirect => "Ai inbound direct",
            Self::InIptables => "Bi inbound iptables + proxy",
            Self::InSkLookup => "Ci inbound sk_lookup + proxy",
        }
    }

    /// The remote host dials an app in the workload (the server), instead of the workload
    /// dialling the remote host.
    pub fn inbound(self) -> bool {
        matches!(self, Self::InDirect | Self::InIptables | Self::InSkLookup)
    }
}

pub struct Plan {
    pub quick: bool,
    pub rounds: usize,
    pub crr: Duration,
    pub rr: Duration,
    pub stream: Duration,
    pub hold: usize,
}

impl Plan {
    pub fn new(quick: bool) -> Self {
        if quick {
            Self {
                quick,
                rounds: 1,
                crr: Duration::from_secs(2),
                rr: Duration::from_secs(2),
                stream: Duration::from_secs(1),
                hold: 1_000,
            }
        } else {
            Self {
                quick,
                rounds: 3,
                crr: Duration::from_secs(10),
                rr: Duration::from_secs(10),
                stream: Duration::from_secs(5),
                hold: 10_000,
            }
        }
    }
}

/// CRR: 1 KiB each way, two workers (one per core here).
pub const CRR_WORKERS: usize = 2;
pub const MESSAGE: usize = 1024;
/// RR rates, well below what any configuration saturates at on 2 cores.
pub const RR1_RATE: f64 = 1000.0;
pub const RR64_RATE: f64 = 3200.0;
pub const STREAM_SIZES: [usize; 5] = [64, 1024, 16 << 10, 256 << 10, 1 << 20];

/// A child process killed on drop.
pub(crate) struct Guard(pub(crate) Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One configuration's topology. Fields drop in order: interception first, then the server,
/// the cgroup and the namespaces.
pub(crate) struct Env {
    agent: Option<AgentProcess>,
    proxy: Option<Guard>,
    _server: Guard,
    cgroup: TestCgroup,
    pair: NetnsPair,
    pub(crate) name: String,
    config: Config,
}

/// Where the server listens: the remote host, or (inbound) the workload.
fn server_ip(config: Config, pair: &NetnsPair) -> Ipv4Addr {
    match config.inbound() {
        true => pair.workload_ip,
        false => pair.remote_ip,
    }
}

pub(crate) fn read_line(child: &mut Child) -> anyhow::Result<String> {
    let out = child.stdout.as_mut().context("no stdout")?;
    let mut line = String::new();
    BufReader::new(out).read_line(&mut line)?;
    Ok(line.trim().to_owned())
}

impl Env {
    pub(crate) fn new(config: Config, agent: &Path, me: &Path) -> anyhow::Result<Self> {
        Self::with_flags(config, agent, me, |_| Vec::new())
    }

    /// [`Env::new`], with istio-iptables flags beside the defaults, the same for B's `explain`
    /// and C's `run`: `flags` makes them from the server's address (a list that must capture
    /// it, say).
    pub(crate) fn with_flags(
        config: Config,
        agent: &Path,
        me: &Path,
        flags: impl FnOnce(SocketAddrV4) -> Vec<String>,
    ) -> anyhow::Result<Self> {
        let pair = NetnsPair::create("bn")?;
        let cgroup = TestCgroup::create("bn")?;
        // Outbound, the server is the remote host's; inbound, it is the app in the workload.
        let mut serve = Command::new(me);
        serve.arg("serve");
        match config.inbound() {
            true => serve
                .arg("--cgroup")
                .arg(&cgroup.path)
                .arg("--netns")
                .arg(&pair.workload.path),
            false => serve.arg("--netns").arg(&pair.remote.path),
        };
        let listen = SocketAddrV4::new(server_ip(config, &pair), SERVER_PORT);
        let flags = flags(listen);
        serve.arg("--listen").arg(listen.to_string());
        let mut server = Guard(serve.stdin(Stdio::null()).stdout(Stdio::piped()).spawn()?);
        if read_line(&mut server.0)? != "ready" {
            bail!("the benchmark server did not start");
        }
        let mut env = Self {
            agent: None,
            proxy: None,
            _server: server,
            cgroup,
            pair,
            name: unique("bench"),
            config,
        };
        let run_args = |extra: &[&str]| -> Vec<String> {
            let mut a = vec![
                "--cgroup".to_owned(),
                env.cgroup.path.to_string_lossy().into_owned(),
                "--netns".to_owned(),
                env.pair.workload.path.to_string_lossy().into_owned(),
            ];
            a.extend(extra.iter().map(|s| s.to_string()));
            a
        };
        match config {
            Config::Direct | Config::InDirect => {}
            Config::Iptables | Config::InIptables | Config::Nftables => {
                baseline::install(config, agent, &flags, &env.pair.workload.name)?;
                let proxy = Command::new(agent)
                    .arg("proxy")
                    .args(run_args(&[]))
                    // The readiness check below connects straight to :15001 and is reset on
                    // purpose; its warning is not news.
                    .env(
                        "RUST_LOG",
                        std::env::var("REDIRECT_BENCH_LOG").unwrap_or_else(|_| "error".into()),
                    )
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .spawn()?;
                env.proxy = Some(Guard(proxy));
                env.wait_listening(15001)?;
            }
            Config::Connect4 | Config::Connect4Idle | Config::FastPath | Config::Connect4Copy | Config::InSkLookup => {
                let extra: &[&str] = match config {
                    Config::Connect4Idle => &["-i", "", "-b", "", "--proxy", "none"],
                    Config::FastPath => &["--fast-path"],
                    Config::Connect4Copy => &["--relay", "copy"],
                    _ => &[],
                };
                let mut args = run_args(extra);
                args.extend(flags);
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                env.agent = Some(AgentProcess::start(agent, &env.name, &args)?);
            }
        }
        Ok(env)
    }

    /// Until something accepts on 127.0.0.1:`port` inside the workload (bounded). The proxy
    /// resets a connection made straight to its port (no original destination), and when
    /// its RST comes before `connect_timeout`'s poll has seen the handshake complete, the
    /// connect itself fails with ECONNRESET: an answer from a listener all the same. (Taken
    /// for a failure, every attempt of 10 s could lose that race, and B's setup failed now and
    /// then.) A failure says how the last attempt failed and whether the proxy still runs.
    fn wait_listening(&mut self, port: u16) -> anyhow::Result<()> {
        let ns = self.pair.workload.open()?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut last = None;
        while Instant::now() < deadline {
            let attempt = ns.run(move || {
                Ok(TcpStream::connect_timeout(
                    &SocketAddrV4::new(Ipv4Addr::LOCALHOST, port).into(),
                    Duration::from_millis(200),
                ))
            })?;
            match attempt {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(()),
                Err(e) => last = Some(e),
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let proxy = match self.proxy.as_mut().map(|g| g.0.try_wait()) {
            Some(Ok(Some(status))) => format!("the proxy exited ({status})"),
            Some(Ok(None)) => "the proxy is still running".to_owned(),
            Some(Err(e)) => format!("the proxy's state is unknown: {e}"),
            None => "no proxy".to_owned(),
        };
        let last = last.map_or_else(|| "no attempt".to_owned(), |e| e.to_string());
        bail!("nothing listens on {port} in the workload after 10 s (last connect: {last}; {proxy})")
    }

    fn server(&self) -> SocketAddrV4 {
        SocketAddrV4::new(server_ip(self.config, &self.pair), SERVER_PORT)
    }

    /// The load generator, to run inside the workload against the server (inbound: on the
    /// remote host, against the app).
    pub(crate) fn client_command(&self, me: &Path) -> Command {
        let mut c = Command::new(me);
        c.arg("client");
        match self.config.inbound() {
            true => c.arg("--netns").arg(&self.pair.remote.path),
            false => c
                .arg("--cgroup")
                .arg(&self.cgroup.path)
                .arg("--netns")
                .arg(&self.pair.workload.path),
        };
        c.arg("--connect").arg(self.server().to_string());
        c
    }

    /// Runs the load generator and parses its report.
    fn client(&self, me: &Path, args: &[String]) -> anyhow::Result<LoadResult> {
        let out = self.client_command(me).args(args).stdin(Stdio::null()).output()?;
        if !out.status.success() {
            bail!("client {args:?}: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// CRR for `duration`: new connection per request, CRR_WORKERS at once.
    pub(crate) fn crr(&self, me: &Path, duration: Duration) -> anyhow::Result<LoadResult> {
        let args = [
            "--mode".to_owned(),
            "crr".into(),
            "--workers".into(),
            CRR_WORKERS.to_string(),
            "--size".into(),
            MESSAGE.to_string(),
            "--duration".into(),
            secs(duration),
        ];
        self.client(me, &args)
    }

    /// Connections B's or Bn's rules have sent to the proxy so far; `None` for the others.
    pub(crate) fn redirected(&self) -> anyhow::Result<Option<u64>> {
        baseline::redirected(self.config, &self.pair.workload.name)
    }

    /// A CRR that completed `completed` connections while the redirect count went from
    /// `before` to now: a configuration whose rules let connections go direct measured A.
    pub(crate) fn check_redirected(&self, before: Option<u64>, completed: u64) -> anyhow::Result<()> {
        if let (Some(before), Some(after)) = (before, self.redirected()?)
            && after - before < completed
        {
            bail!(
                "{}: its rules redirected {} of the {completed} connections the client completed",
                self.config.label(),
                after - before
            );
        }
        Ok(())
    }

    /// `nf_conntrack_count` of the workload's namespace (read from inside it: /proc/sys/net
    /// is the reader's namespace's); `None` where there is no conntrack.
    pub(crate) fn conntrack_count(&self) -> Option<u64> {
        let ns = self.pair.workload.open().ok()?;
        let text = ns
            .run(|| std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_count"))
            .ok()?;
        text.trim().parse().ok()
    }

    /// The process doing the interception, for CPU and memory: the agent, or the proxy.
    pub(crate) fn interceptor_pid(&self) -> Option<u32> {
        self.agent
            .as_ref()
            .and_then(AgentProcess::pid)
            .or_else(|| self.proxy.as_ref().map(|g| g.0.id()))
    }

    /// CPU seconds of the workload's cgroup (client and, for B, the proxy inside it) plus the
    /// agent's (outside it).
    fn cpu_seconds(&self) -> f64 {
        let cgroup = std::fs::read_to_string(self.cgroup.path.join("cpu.stat"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("usage_usec ")?.trim().parse::<f64>().ok())
            })
            .unwrap_or(0.0)
            / 1e6;
        let agent = match (&self.agent, self.interceptor_pid()) {
            (Some(_), Some(pid)) => process_cpu_seconds(pid),
            _ => 0.0,
        };
        cgroup + agent
    }

    fn connect4_prog_id(&self) -> Option<u32> {
        let state: State = serde_json::from_slice(&std::fs::read(pins::state_path(&self.name)).ok()?).ok()?;
        state.programs.get(programs::CONNECT4).copied()
    }
}

/// Samples: metric key -> configuration -> one value per round.
pub type Samples = BTreeMap<&'static str, BTreeMap<Config, Vec<f64>>>;

pub(crate) fn secs(d: Duration) -> String {
    format!("{}", d.as_secs_f64())
}

fn record(samples: &mut Samples, key: &'static str, config: Config, v: Option<f64>) {
    if let Some(v) = v.filter(|v| v.is_finite()) {
        samples.entry(key).or_default().entry(config).or_default().push(v);
    }
}

fn run_config(
    config: Config,
    plan: &Plan,
    agent: &Path,
    me: &Path,
    samples: &mut Samples,
    failures: &mut Vec<String>,
) -> anyhow::Result<()> {
    let env = Env::new(config, agent, me).with_context(|| format!("setting up {}", config.label()))?;
    let s = |v: &str| v.to_owned();
    if config == Config::Connect4Copy {
        return streams(&env, config, plan, me, samples, failures);
    }
    if config.inbound() {
        return crr_with_cpu(&env, config, plan, me, samples, ("in_crr_cps", "in_crr_cpu"));
    }
    crr_with_cpu(&env, config, plan, me, samples, ("crr_cps", "crr_cpu"))?;

    if matches!(config, Config::Connect4 | Config::Connect4Idle) {
        // Program cost per connect(), on a separate run: the accounting slows every run.
        if let (Some(id), Some(_stats)) = (env.connect4_prog_id(), BpfStats::enable()) {
            let before = prog_stats(id);
            env.crr(me, plan.crr / 2)?;
            if let (Some((t0, n0)), Some((t1, n1))) = (before, prog_stats(id))
                && n1 > n0
            {
                record(
                    samples,
                    "connect4_ns",
                    config,
                    Some((t1 - t0) as f64 / (n1 - n0) as f64),
                );
            }
        }
    }
    if config == Config::Connect4Idle {
        return Ok(());
    }

    for (conns, rate, key50, key99, key999) in [
        (1usize, RR1_RATE, "rr1_p50", "rr1_p99", "rr1_p999"),
        (64, RR64_RATE, "rr64_p50", "rr64_p99", "rr64_p999"),
    ] {
        let rr = env.client(
            me,
            &[
                s("--mode"),
                s("rr"),
                s("--conns"),
                conns.to_string(),
                s("--rate"),
                rate.to_string(),
                s("--size"),
                MESSAGE.to_string(),
                s("--duration"),
                secs(plan.rr),
            ],
        )?;
        if rr.errors > 0 {
            eprintln!(
                "bench: {}: {} RR errors ({conns} connections)",
                config.label(),
                rr.errors
            );
        }
        record(samples, key50, config, rr.p50_us);
        record(samples, key99, config, rr.p99_us);
        record(samples, key999, config, rr.p999_us);
    }

    streams(&env, config, plan, me, samples, failures)
}

/// CRR, with the CPU it costs (the workload's cgroup, and the agent's), under `keys`: the
/// rate's and the CPU's.
fn crr_with_cpu(
    env: &Env,
    config: Config,
    plan: &Plan,
    me: &Path,
    samples: &mut Samples,
    keys: (&'static str, &'static str),
) -> anyhow::Result<()> {
    let (cpu0, redirected) = (env.cpu_seconds(), env.redirected()?);
    let crr = env.crr(me, plan.crr)?;
    let cpu = env.cpu_seconds() - cpu0;
    env.check_redirected(redirected, crr.completed)?;
    if crr.errors > 0 {
        eprintln!("bench: {}: {} CRR errors", config.label(), crr.errors);
    }
    record(samples, keys.0, config, Some(crr.per_second));
    if crr.completed > 0 {
        record(samples, keys.1, config, Some(cpu / crr.completed as f64 * 10_000.0));
    }
    Ok(())
}

/// STREAM at each write size.
fn streams(
    env: &Env,
    config: Config,
    plan: &Plan,
    me: &Path,
    samples: &mut Samples,
    failures: &mut Vec<String>,
) -> anyhow::Result<()> {
    let s = |v: &str| v.to_owned();
    for ((size, key), cpu_key) in STREAM_SIZES
        .into_iter()
        .zip(["stream_64", "stream_1k", "stream_16k", "stream_256k", "stream_1m"])
        .zip([
            "stream_64_cpu",
            "stream_1k_cpu",
            "stream_16k_cpu",
            "stream_256k_cpu",
            "stream_1m_cpu",
        ])
    {
        let cpu0 = env.cpu_seconds();
        let st = env.client(
            me,
            &[
                s("--mode"),
                s("stream"),
                s("--size"),
                size.to_string(),
                s("--duration"),
                secs(plan.stream),
            ],
        )?;
        if st.errors > 0 {
            let what = format!(
                "{}: STREAM {size} B writes failed: {}",
                config.label(),
                st.error.as_deref().unwrap_or("?")
            );
            eprintln!("bench: {what}");
            failures.push(what);
        }
        let cpu = env.cpu_seconds() - cpu0;
        record(samples, key, config, (st.errors == 0).then_some(st.mb_per_s));
        // CPU seconds per GB the server counted (the server's own CPU left out, as for CRR).
        let per_gb = (st.errors == 0 && st.bytes > 0).then(|| cpu / (st.bytes as f64 / 1e9));
        record(samples, cpu_key, config, per_gb);
    }
    Ok(())
}

pub struct Outcome {
    pub samples: Samples,
    /// Runs that produced no sample, and why (shown as "–" in the tables).
    pub failures: Vec<String>,
    pub memory: Memory,
    pub elapsed: Duration,
    /// What `--fast-path=auto` decides on this kernel, and why: `check`'s line for it.
    pub fast_path_default: String,
}

pub fn run(plan: &Plan, agent: &Path) -> anyhow::Result<Outcome> {
    let me: PathBuf = std::env::current_exe()?;
    let started = Instant::now();
    let mut samples = Samples::new();
    let mut failures = Vec::new();
    let order = [
        Config::Direct,
        Config::Iptables,
        Config::Nftables,
        Config::Connect4,
        Config::FastPath,
        Config::Connect4Idle,
        Config::Connect4Copy,
        Config::InDirect,
        Config::InIptables,
        Config::InSkLookup,
    ];
    for round in 1..=plan.rounds {
        for config in order {
            eprintln!("bench: round {round}/{}: {}", plan.rounds, config.label());
            run_config(config, plan, agent, &me, &mut samples, &mut failures)?;
        }
    }
    let mut held = Memory::default();
    let hold = memory::holdable(plan.hold);
    for config in [Config::Iptables, Config::Connect4] {
        eprintln!("bench: memory: {} holding {hold} connections", config.label());
        memory::measure(config, hold, plan, agent, &me, &mut held)?;
    }
    Ok(Outcome {
        samples,
        failures,
        memory: held,
        elapsed: started.elapsed(),
        fast_path_default: crate::measure::fast_path_default(agent),
    })
}
