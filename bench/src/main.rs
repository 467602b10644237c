//! redirect-bench: the cost of interception, measured side by side (`cargo xtask bench`).
//!
//! `run` builds each configuration in its own namespace pair and cgroup and drives the load
//! generator (`client`, inside the workload) against the server (`serve`, on the remote host
//! namespace); the same binary plays all three parts.

use std::{
    net::SocketAddrV4,
    path::PathBuf,
    process::{Command, ExitCode},
    time::Duration,
};

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};

mod baseline;
mod goals;
mod load;
mod measure;
mod memory;
mod nft;
mod orchestrate;
mod profile;
mod proto;
mod report;
mod rules;
mod scale;
mod sustained;

#[derive(Parser)]
#[command(name = "redirect-bench", version)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum Mode {
    Crr,
    Rr,
    Stream,
    Hold,
}

#[derive(Subcommand)]
enum Cmd {
    /// Measure every configuration and write the report (root).
    Run {
        /// The short development run (under 2 minutes).
        #[arg(long)]
        quick: bool,
        /// The redirect-agent binary to measure.
        #[arg(long)]
        agent: PathBuf,
        /// Where the report goes; the plot is written beside it as benchmarks.svg.
        #[arg(long, default_value = "docs/benchmarks.md")]
        out: PathBuf,
        /// Proxied connections to hold for the memory measure (default: 1,000 quick, 10,000 full).
        #[arg(long)]
        hold: Option<usize>,
        /// Also profile CRR through B and C with `perf record` and write profile.md beside
        /// the report.
        #[arg(long)]
        profile: bool,
    },
    /// One node agent and many workloads: enrollment latency, memory, connect4's cost for a
    /// process of no workload; writes its section of docs/benchmarks.md (root).
    Scale {
        /// The redirect-agent binary to measure.
        #[arg(long)]
        agent: PathBuf,
        #[arg(long, default_value_t = 1000)]
        workloads: usize,
        /// The report whose scale section is (re)written.
        #[arg(long, default_value = "docs/benchmarks.md")]
        out: PathBuf,
    },
    /// connect4's cost for a workload's connect as its CIDR and port lists grow (1, 64,
    /// 1,000); writes its section of docs/benchmarks.md (root).
    Rules {
        /// The redirect-agent binary to measure.
        #[arg(long)]
        agent: PathBuf,
        /// The report whose rules section is (re)written.
        #[arg(long, default_value = "docs/benchmarks.md")]
        out: PathBuf,
    },
    /// Outbound CRR through B and then C for `seconds` each, interval by interval
    /// (connections/s, errors, conntrack entries, slab memory); writes its section of
    /// docs/benchmarks.md (root).
    Sustained {
        /// The redirect-agent binary to measure.
        #[arg(long)]
        agent: PathBuf,
        #[arg(long, default_value_t = 180, value_parser = clap::value_parser!(u64).range(10..=3600))]
        seconds: u64,
        /// The report whose sustained section is (re)written.
        #[arg(long, default_value = "docs/benchmarks.md")]
        out: PathBuf,
    },
    /// A connecting process (`scale`, `rules`): connects to `to`, `count` times, each failing.
    #[command(hide = true)]
    Connects {
        #[arg(long)]
        cgroup: PathBuf,
        #[arg(long)]
        netns: PathBuf,
        #[arg(long)]
        count: u32,
        #[arg(long)]
        to: SocketAddrV4,
    },
    /// The benchmark server (in the remote host's namespace).
    #[command(hide = true)]
    Serve {
        /// A cgroup to join first (the app of an inbound run, in the workload).
        #[arg(long)]
        cgroup: Option<PathBuf>,
        #[arg(long)]
        netns: Option<PathBuf>,
        #[arg(long)]
        listen: SocketAddrV4,
    },
    /// The load generator (in the workload).
    #[command(hide = true)]
    Client {
        #[arg(long)]
        cgroup: Option<PathBuf>,
        #[arg(long)]
        netns: Option<PathBuf>,
        #[arg(long)]
        connect: SocketAddrV4,
        #[arg(long, value_enum)]
        mode: Mode,
        #[arg(long, default_value_t = 2)]
        workers: usize,
        #[arg(long, default_value_t = 1)]
        conns: usize,
        #[arg(long, default_value_t = 1000.0)]
        rate: f64,
        #[arg(long, default_value_t = 1024)]
        size: usize,
        /// Seconds.
        #[arg(long, default_value_t = 2.0)]
        duration: f64,
    },
}

fn first_line(c: &mut Command) -> String {
    c.output()
        .ok()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_owned()
        })
        .unwrap_or_default()
}

fn machine() -> report::Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")?
                .split_once(':')
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            let kb: f64 = m
                .lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))?
                .split_whitespace()
                .next()?
                .parse()
                .ok()?;
            Some(format!("{:.0} GiB", kb / (1u64 << 20) as f64))
        })
        .unwrap_or_else(|| "? GiB".into());
    report::Machine {
        cpu,
        cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
        memory,
        kernel: first_line(Command::new("uname").arg("-r")),
        date: first_line(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"])),
    }
}

fn run(quick: bool, agent: PathBuf, out: PathBuf, hold: Option<usize>, profile: bool) -> anyhow::Result<()> {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        anyhow::bail!("redirect-bench run creates namespaces and loads programs: run it as root");
    }
    let mut plan = orchestrate::Plan::new(quick);
    if let Some(n) = hold {
        plan.hold = n;
    }
    let outcome = orchestrate::run(&plan, &agent)?;
    let mut md = report::markdown(&outcome, &plan, &machine());
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // `--scale`'s, `--rules`' and `--sustained`'s sections are those commands' to write: kept
    // as they are.
    let old = std::fs::read_to_string(&out).unwrap_or_default();
    if let Some(section) = scale::section_of(&old) {
        md = scale::with_section(&md, section);
    }
    for markers in [rules::MARKERS, sustained::MARKERS] {
        if let Some(section) = scale::marked(&old, markers) {
            md = scale::with_marked(&md, markers, section);
        }
    }
    std::fs::write(&out, &md).with_context(|| format!("writing {}", out.display()))?;
    let svg = out.with_file_name("benchmarks.svg");
    std::fs::write(&svg, report::svg(&outcome.samples)).with_context(|| format!("writing {}", svg.display()))?;
    let json = out.with_file_name("benchmarks.json");
    std::fs::write(
        &json,
        serde_json::to_string_pretty(&report::json(&outcome, &plan, &machine()))?,
    )
    .with_context(|| format!("writing {}", json.display()))?;
    print!("{md}");
    eprintln!(
        "bench: wrote {}, {} and {}",
        out.display(),
        svg.display(),
        json.display()
    );
    if profile {
        let path = out.with_file_name("profile.md");
        let mut md = format!(
            "# Where CRR spends CPU\n\nWritten by `cargo xtask bench --profile` on {}, kernel {}: \
             system-wide `perf record -e cpu-clock -g` during one CRR run: CPU by thread name, then \
             the hottest symbols by self time (comm, object, symbol), rows of 0.5% and more. \
             `redirect-bench` is both the load client (in the workload) and the server (remote \
             host); `tokio-rt-worker` and `netns-dialer` are the proxy. Without hardware counters \
             (a VM) samples come from the timer interrupt, so kernel time that ran with \
             interrupts off shows up at `_raw_spin_unlock_irqrestore`.\n",
            machine().cpu,
            machine().kernel
        );
        for config in [orchestrate::Config::Iptables, orchestrate::Config::Connect4] {
            eprintln!("bench: profiling {}", config.label());
            let data = std::env::temp_dir().join(format!("redirect-bench-{}.perf", std::process::id()));
            let result = profile::profile(config, &plan, &agent, &data);
            let _ = std::fs::remove_file(&data);
            md.push_str(&format!("\n## {}\n\n```text\n{}```\n", config.label(), result?));
        }
        std::fs::write(&path, md).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("bench: wrote {}", path.display());
    }
    Ok(())
}

fn scale_run(agent: &std::path::Path, workloads: usize, out: &std::path::Path) -> anyhow::Result<()> {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        anyhow::bail!("redirect-bench scale creates namespaces and loads programs: run it as root");
    }
    let me = std::env::current_exe()?;
    let outcome = scale::run(agent, &me, workloads)?;
    let section = scale::markdown(&outcome, &machine());
    let doc = std::fs::read_to_string(out).unwrap_or_else(|_| "# Benchmarks\n".into());
    std::fs::write(out, scale::with_section(&doc, &section)).with_context(|| format!("writing {}", out.display()))?;
    print!("{section}");
    eprintln!("bench: wrote the scale section of {}", out.display());
    Ok(())
}

fn rules_run(agent: &std::path::Path, out: &std::path::Path) -> anyhow::Result<()> {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        anyhow::bail!("redirect-bench rules creates namespaces and loads programs: run it as root");
    }
    let me = std::env::current_exe()?;
    let outcome = rules::run(agent, &me)?;
    let section = rules::markdown(&outcome, &machine());
    let doc = std::fs::read_to_string(out).unwrap_or_else(|_| "# Benchmarks\n".into());
    std::fs::write(out, scale::with_marked(&doc, rules::MARKERS, &section))
        .with_context(|| format!("writing {}", out.display()))?;
    print!("{section}");
    eprintln!("bench: wrote the rules section of {}", out.display());
    Ok(())
}

fn sustained_run(agent: &std::path::Path, seconds: u64, out: &std::path::Path) -> anyhow::Result<()> {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        anyhow::bail!("redirect-bench sustained creates namespaces and loads programs: run it as root");
    }
    let me = std::env::current_exe()?;
    let outcome = sustained::run(agent, &me, seconds)?;
    let section = sustained::markdown(&outcome, &machine());
    let doc = std::fs::read_to_string(out).unwrap_or_else(|_| "# Benchmarks\n".into());
    std::fs::write(out, scale::with_marked(&doc, sustained::MARKERS, &section))
        .with_context(|| format!("writing {}", out.display()))?;
    print!("{section}");
    eprintln!("bench: wrote the sustained section of {}", out.display());
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Run {
            quick,
            agent,
            out,
            hold,
            profile,
        } => run(quick, agent, out, hold, profile),
        Cmd::Scale { agent, workloads, out } => scale_run(&agent, workloads, &out),
        Cmd::Rules { agent, out } => rules_run(&agent, &out),
        Cmd::Sustained { agent, seconds, out } => sustained_run(&agent, seconds, &out),
        Cmd::Connects {
            cgroup,
            netns,
            count,
            to,
        } => (|| {
            redirect_agent::sys::join(Some(&cgroup), Some(&netns))?;
            scale::connects(count, to)
        })(),
        Cmd::Serve { cgroup, netns, listen } => (|| {
            redirect_agent::sys::raise_nofile_limit(50_000);
            redirect_agent::sys::join(cgroup.as_deref(), netns.as_deref())?;
            proto::serve(listen)?;
            Ok(())
        })(),
        Cmd::Client {
            cgroup,
            netns,
            connect,
            mode,
            workers,
            conns,
            rate,
            size,
            duration,
        } => (|| {
            redirect_agent::sys::raise_nofile_limit(conns);
            // Before any thread: cgroup and namespace are per task.
            redirect_agent::sys::join(cgroup.as_deref(), netns.as_deref())?;
            let d = Duration::from_secs_f64(duration);
            let result = match mode {
                Mode::Crr => load::crr(connect, workers, size, d),
                Mode::Rr => load::rr(connect, conns, rate, size, d),
                Mode::Stream => load::stream(connect, size, d),
                Mode::Hold => {
                    load::hold(connect, conns)?;
                    return Ok(());
                }
            };
            println!("{}", serde_json::to_string(&result)?);
            Ok(())
        })(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("redirect-bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
