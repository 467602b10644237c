//! The command line: clap's definitions, and each command's call into the modules that do it.

mod node_args;

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand, error::ErrorKind};
use redirect_api::PodRef;
use tokio::signal::unix::{Signal, SignalKind, signal};

use crate::{
    engine::{self, Sizing},
    explain,
    flags::{self, CaptureFlags, FastPathFlags, FastPathWhen, LivenessFlags, ProxyMode, RelayFlags},
    logging::{self, LogFormat},
    node,
    run::{self, RunOptions},
    standalone, stats,
};

/// eBPF replacement for istio-iptables' NAT chains, with an embedded proxy loop.
#[derive(Parser, Debug)]
#[command(name = "redirect-agent", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log lines on stderr as text or as JSON objects, one a line (RUST_LOG filters both).
    #[arg(
        long,
        global = true,
        value_name = "FORMAT",
        value_enum,
        env = "REDIRECT_LOG_FORMAT",
        default_value_t = LogFormat::Text
    )]
    log_format: LogFormat,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Capture one workload's connections until SIGINT/SIGTERM, then detach.
    #[command(args_override_self = true)]
    Run(Box<RunArgs>),
    /// Serve every meshed workload of this node: attach once (pinned), then enroll and
    /// remove workloads over a Unix socket; a restart adopts the pins or takes over from the
    /// running agent without dropping connections.
    Node(Box<node_args::NodeArgs>),
    /// Enroll a workload with the node agent (its network namespace and istio-iptables flags).
    Enroll(Box<EnrollArgs>),
    /// Remove a workload from the node agent: its connections are no longer captured.
    Unenroll(UnenrollArgs),
    /// List the node agent's workloads.
    List {
        #[command(flatten)]
        agent: AgentSocket,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove every pin, link and state file of a stopped instance (node or run): its
    /// workloads are no longer captured.
    Cleanup {
        /// Instance name.
        #[arg(long, default_value = "node")]
        name: String,
    },
    /// Print a running instance's per-rule counters.
    Stats {
        /// Instance name (as given to `run --name` or `node --name`).
        #[arg(long, default_value = "default")]
        name: String,
        /// Print JSON: {"rules":[{"chain","rule","match","target","connections"}, ...]}.
        #[arg(long)]
        json: bool,
    },
    /// Print the nat table istio-iptables writes for these flags (iptables-save text, ready
    /// for iptables-restore) and the counter slot that implements each line.
    #[command(args_override_self = true)]
    Explain(Box<ExplainArgs>),
    /// Probe this kernel for every feature the programs use; with --verifier, also load them
    /// and report their sizes. Exits 1 when a feature is missing.
    Check {
        /// Load (verify) the programs too, and print instruction counts.
        #[arg(long)]
        verifier: bool,
        /// Print JSON: {"kernel", "features": [...], "programs": [...]}.
        #[arg(long)]
        json: bool,
    },
    /// Run only the proxy loop, behind istio-iptables' own REDIRECT rules (original
    /// destinations from SO_ORIGINAL_DST), inside the workload as its proxy identity.
    Proxy(Box<standalone::ProxyArgs>),
    /// Listens inside a workload's cgroup for the agent's proxy (`run --fast-path`).
    #[command(hide = true)]
    ListenIn(crate::listen_in::ListenInArgs),
    /// Makes the embedded proxy's upstream sockets inside a workload's cgroup for the agent.
    #[command(hide = true)]
    DialIn(crate::dial_in::DialInArgs),
    /// istio-validation's probe inside a workload, for `run --run-validation`.
    #[command(hide = true)]
    ValidateIn(crate::validate::ValidateInArgs),
}

#[derive(clap::Args, Debug)]
struct ExplainArgs {
    /// Print JSON: {"family", "iptables_save": TEXT, "lines": [{"table","line","chain","num","slot","by"}, ...]}.
    #[arg(long)]
    json: bool,
    /// Whose table: `ipv4` (iptables) or `ipv6` (ip6tables, installed for a pod with an IPv6
    /// address).
    #[arg(long, value_enum, default_value_t = FamilyArg::Ipv4)]
    family: FamilyArg,
    #[command(flatten)]
    capture: CaptureFlags,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum FamilyArg {
    Ipv4,
    Ipv6,
}

impl From<FamilyArg> for redirect_common::addr::Family {
    fn from(f: FamilyArg) -> Self {
        match f {
            FamilyArg::Ipv4 => Self::V4,
            FamilyArg::Ipv6 => Self::V6,
        }
    }
}

#[derive(clap::Args, Debug)]
struct AgentSocket {
    /// The node agent's control socket.
    #[arg(long, value_name = "PATH", default_value = "/run/redirect/node.sock")]
    socket: PathBuf,
}

#[derive(clap::Args, Debug)]
struct EnrollArgs {
    /// The workload's network namespace (/run/netns/NAME or /proc/PID/ns/net).
    #[arg(long, value_name = "PATH")]
    netns: PathBuf,
    /// Capture only this cgroup v2 directory's processes (under the agent's attach point);
    /// default: every process of the namespace.
    #[arg(long, value_name = "PATH")]
    cgroup: Option<PathBuf>,
    /// Workload id, unique on the node (default: the namespace's file name).
    #[arg(long)]
    id: Option<String>,
    /// Serve the capture ports with the agent's embedded proxy, or leave them to the
    /// workload's own proxy.
    #[arg(long, value_enum, default_value_t = ProxyMode::Embedded)]
    proxy: ProxyMode,
    /// Hand bytes between the workload's local pairs with sk_msg (the node agent must have
    /// the fast path on: `node --fast-path`, or `auto` on a kernel its probe finds safe). See
    /// docs/fast-path.md.
    #[arg(long)]
    fast_path: bool,
    /// The workload's Kubernetes pod, for the metrics' namespace and pod labels and `list`.
    #[arg(long, value_name = "NAMESPACE/NAME", value_parser = pod_arg)]
    pod: Option<PodRef>,
    /// The pod's uid (`metadata.uid`): ZDS names the pod by it, so an ambient pod with `--proxy
    /// none` needs it on a node that serves ztunnel (`node --ztunnel-socket`).
    #[arg(long, value_name = "UID", requires = "pod")]
    pod_uid: Option<String>,
    /// The pod's service account, which ztunnel is told with it.
    #[arg(long, value_name = "NAME", requires = "pod")]
    pod_service_account: Option<String>,
    #[command(flatten)]
    agent: AgentSocket,
    /// istio-iptables flags for this workload (after `--`), e.g. `-- -b 8080 -d ''`.
    #[arg(last = true, value_name = "FLAGS", allow_hyphen_values = true)]
    flags: Vec<String>,
}

#[derive(clap::Args, Debug)]
#[group(required = true, multiple = false)]
struct UnenrollTarget {
    /// Workload id.
    #[arg(long)]
    id: Option<String>,
    /// The workload's network namespace.
    #[arg(long, value_name = "PATH")]
    netns: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
struct UnenrollArgs {
    #[command(flatten)]
    target: UnenrollTarget,
    #[command(flatten)]
    agent: AgentSocket,
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// cgroup v2 directory whose processes are captured.
    #[arg(long, value_name = "PATH")]
    cgroup: PathBuf,
    /// The workload's network namespace (/run/netns/NAME or /proc/PID/ns/net).
    #[arg(long, value_name = "PATH")]
    netns: Option<PathBuf>,
    /// Capture the agent's own network namespace instead, inbound included: the host's,
    /// unless the agent runs in a container's. Only on purpose, never by default.
    #[arg(long, conflicts_with = "netns")]
    host_netns: bool,
    /// While no agent runs (killed, crashed), let the workload's connections go direct instead
    /// of being refused: capture then ends with the process. Off by default (fail-closed).
    #[arg(long)]
    fail_open: bool,
    /// Serve the capture ports with the embedded proxy, or leave them to another proxy.
    #[arg(long, value_enum, default_value_t = ProxyMode::Embedded)]
    proxy: ProxyMode,
    /// Instance name: pins go to /sys/fs/bpf/redirect/NAME/.
    #[arg(long, default_value = "default")]
    name: String,
    /// Size of the original-destination and UDP-flow maps (LRU): connections and UDP flows
    /// tracked at once, about 580 bytes of kernel memory each (1,048,576 take about 600 MiB;
    /// the start log says how much).
    #[arg(long, default_value_t = 65536, value_parser = clap::value_parser!(u32).range(1024..=1_048_576))]
    max_tracked_connections: u32,
    /// Connections the embedded proxy serves at once; more are reset.
    #[arg(long, default_value_t = 16384, value_parser = clap::value_parser!(u32).range(1..=1_048_576))]
    max_proxy_connections: u32,
    /// Upstream connect timeout of the embedded proxy, in milliseconds.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=600_000))]
    connect_timeout_ms: u64,
    /// On SIGTERM, after detaching: how long open proxied connections may finish before they
    /// are reset, in milliseconds (istio's terminationDrainDuration is 5 s).
    #[arg(long, default_value_t = 5_000, value_parser = clap::value_parser!(u64).range(0..=600_000))]
    drain_timeout_ms: u64,
    #[command(flatten)]
    fast_path: FastPathFlags,
    #[command(flatten)]
    liveness: LivenessFlags,
    #[command(flatten)]
    relay: RelayFlags,
    #[command(flatten)]
    capture: CaptureFlags,
}

/// `run`'s and `node`'s shared flags (each with its own defaults) as the engine takes them.
fn sizing(
    max_tracked: u32,
    max_proxy: u32,
    connect_timeout_ms: u64,
    drain_timeout_ms: u64,
    fast_path: bool,
    liveness: LivenessFlags,
    relay: RelayFlags,
) -> Sizing {
    Sizing {
        liveness: liveness.to_liveness(),
        relay: relay.relay,
        max_tracked_connections: max_tracked,
        max_proxy_connections: max_proxy as usize,
        connect_timeout: Duration::from_millis(connect_timeout_ms),
        drain: Duration::from_millis(drain_timeout_ms),
        fast_path,
        handover_within: Duration::from_secs(60),
    }
}

/// How long the CLI waits for the node agent (an enroll binds listeners and reads addresses).
const API_TIMEOUT: Duration = Duration::from_secs(30);

/// The agent resolves paths in its own mount namespace and working directory, not ours.
fn absolute(p: &std::path::Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_owned())
}

/// `--pod NAMESPACE/NAME`, checked here as the agent checks it, so that a typo is told before
/// anything is sent.
fn pod_arg(s: &str) -> Result<PodRef, String> {
    let (namespace, name) = s.split_once('/').ok_or("expected NAMESPACE/NAME, e.g. default/web-0")?;
    let pod = PodRef::new(namespace, name);
    pod.check().map_err(|e| e.to_string())?;
    Ok(pod)
}

/// One line, non-zero exit: what the guide asks of every bad input.
fn fail(e: &anyhow::Error) -> ExitCode {
    eprintln!("redirect-agent: error: {}", one_line(e));
    // istio-validation's status, which an init container's caller may test for.
    if e.downcast_ref::<crate::validate::ValidationFailed>().is_some() {
        return ExitCode::from(crate::validate::FAILED_STATUS);
    }
    ExitCode::FAILURE
}

/// The error and its causes on one line; a cause that its parent's message already quotes
/// (typed errors name their source) is not repeated.
fn one_line(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

/// `redirect-agent`'s whole command line.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // clap's first paragraph names the flag and the value (a missing argument on the
            // lines under it); the rest is a usage hint.
            let text = e.render().to_string();
            let first: Vec<&str> = text.lines().map(str::trim).take_while(|l| !l.is_empty()).collect();
            let first = if first.is_empty() {
                "invalid arguments".into()
            } else {
                first.join(" ")
            };
            eprintln!("redirect-agent: {}", first.trim_start_matches("error: "));
            return ExitCode::from(2);
        }
    };
    // listen-in switches cgroup and namespace: it must stay single-threaded.
    if let Command::ListenIn(args) = &cli.command {
        return crate::listen_in::main(args);
    }
    // So does dial-in, and it takes another identity.
    if let Command::DialIn(args) = &cli.command {
        return crate::dial_in::main(args);
    }
    // And the validation probe.
    if let Command::ValidateIn(args) = &cli.command {
        return crate::validate::main(args);
    }
    // Before the runtime's threads: see proxy/trim.rs.
    crate::proxy::one_arena();
    logging::init(cli.log_format);
    // Namespace, cgroup and identity are per task: taken before the runtime's threads exist.
    if let Command::Proxy(args) = &cli.command
        && let Err(e) = standalone::enter(args)
    {
        return fail(&e);
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => return fail(&e.into()),
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run(args) => {
                let termination = Termination::install()?;
                let capture = args.capture.to_config_with(&flags::process_env)?;
                let execution = args.capture.execution.to_execution(&flags::process_env)?;
                let opts = RunOptions {
                    name: args.name,
                    cgroup: args.cgroup,
                    netns: args.netns,
                    execution,
                    host_netns: args.host_netns,
                    fail_open: args.fail_open,
                    proxy: args.proxy,
                    capture,
                    fast_path: args.fast_path.fast_path,
                    sizing: sizing(
                        args.max_tracked_connections,
                        args.max_proxy_connections,
                        args.connect_timeout_ms,
                        args.drain_timeout_ms,
                        args.fast_path.fast_path == FastPathWhen::On,
                        args.liveness,
                        args.relay,
                    ),
                };
                run::main(opts, termination.wait()).await
            }
            Command::Stats { name, json } => {
                let s = stats::read(&name)?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&s)?);
                } else {
                    print!("{}", stats::render_text(&s));
                }
                Ok(())
            }
            Command::Explain(args) => {
                let cfg = args.capture.to_config_with(&flags::process_env)?;
                // Checked, so a bad value fails here as it would in `run`; none changes the tables.
                args.capture.execution.to_execution(&flags::process_env)?;
                let e = explain::Explanation::new(&cfg, args.family.into())?;
                if args.json {
                    println!("{}", serde_json::to_string_pretty(&e)?);
                } else {
                    print!("{}", e.render_text());
                }
                Ok(())
            }
            Command::Check { verifier, json } => crate::check::check(verifier, json),
            Command::Proxy(args) => {
                let termination = Termination::install()?;
                standalone::serve(&args, termination.wait()).await
            }
            Command::Node(args) => {
                let termination = Termination::install()?;
                node::run(args.into_options()?, termination.wait()).await
            }
            Command::Enroll(args) => {
                let id = match args.id {
                    Some(id) => id,
                    None => args
                        .netns
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .filter(|n| n != "net")
                        .ok_or_else(|| {
                            anyhow::anyhow!(
                                "--netns {} has no usable name: give the workload an --id",
                                args.netns.display()
                            )
                        })?,
                };
                let pod = args.pod.clone().map(|pod| PodRef {
                    uid: args.pod_uid.clone(),
                    service_account: args.pod_service_account.clone(),
                    ..pod
                });
                let req = redirect_api::Request::Enroll(redirect_api::Enroll {
                    id,
                    netns: absolute(&args.netns),
                    cgroup: args.cgroup.as_deref().map(absolute),
                    proxy: args.proxy.as_str().to_owned(),
                    args: args.flags,
                    fast_path: args.fast_path,
                    pod: pod.map(|pod| pod.check().map(|()| pod)).transpose()?,
                });
                let answer = redirect_api::call(&args.agent.socket, &req, API_TIMEOUT)?;
                println!("{}", serde_json::to_string_pretty(&answer)?);
                Ok(())
            }
            Command::Unenroll(args) => {
                let req = redirect_api::Request::Unenroll {
                    id: args.target.id,
                    netns: args.target.netns.as_deref().map(absolute),
                };
                if let redirect_api::Response::Unenrolled { id } =
                    redirect_api::call(&args.agent.socket, &req, API_TIMEOUT)?
                {
                    println!("unenrolled {id}");
                }
                Ok(())
            }
            Command::List { agent, json } => {
                let answer = redirect_api::call(&agent.socket, &redirect_api::Request::List, API_TIMEOUT)?;
                let redirect_api::Response::Workloads(list) = answer else {
                    anyhow::bail!("unexpected answer: {answer:?}");
                };
                if json {
                    println!("{}", serde_json::to_string_pretty(&list)?);
                } else {
                    // The pod last: the columns before it read as they did before pods were known.
                    println!(
                        "{:<24} {:>6} {:>4} {:<9} {:<32} {:<24} pod",
                        "id", "cookie", "slot", "proxy", "netns", "flags"
                    );
                    for w in list {
                        let pod = w.pod.as_ref().map_or_else(|| "-".to_owned(), PodRef::to_string);
                        println!(
                            "{:<24} {:>6} {:>4} {:<9} {:<32} {:<24} {pod}",
                            w.id,
                            w.netns_cookie,
                            w.slot,
                            w.proxy,
                            w.netns.display(),
                            w.args.join(" ")
                        );
                    }
                }
                Ok(())
            }
            Command::Cleanup { name } => {
                let removed = engine::pins::cleanup(&name)?;
                if removed.is_empty() {
                    println!("nothing of instance '{name}' was left");
                }
                for p in removed {
                    println!("removed {}", p.display());
                }
                Ok(())
            }
            Command::ListenIn(_) | Command::DialIn(_) | Command::ValidateIn(_) => {
                unreachable!("handled before the runtime starts")
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

/// SIGINT/SIGTERM, registered before any work starts: a stop that arrives while the agent is
/// still attaching is held until it can unwind, instead of killing it half-way (which would
/// leave pins and a lock behind).
struct Termination {
    int: Signal,
    term: Signal,
}

impl Termination {
    /// Must be called inside the runtime, before anything is created.
    fn install() -> std::io::Result<Self> {
        Ok(Self {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
        })
    }

    async fn wait(mut self) {
        tokio::select! {
            _ = self.int.recv() => tracing::info!("SIGINT: stopping"),
            _ = self.term.recv() => tracing::info!("SIGTERM: stopping"),
        }
    }
}
