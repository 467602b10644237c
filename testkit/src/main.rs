//! `redirect-testkit`: the child processes the tests and the demo run inside a workload
//! (`probe`, `serve`), and the demo itself.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use redirect_testkit::{demo, flood, handover_peer, probe, serve, stress};

/// Test kit of redirect: throw-away workloads for its tests and demo.
#[derive(Parser, Debug)]
#[command(name = "redirect-testkit", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run redirect-agent on a throw-away workload and show where its connections land (root).
    Demo(demo::DemoArgs),
    /// One client connection from inside a workload (used by demo and the tests).
    #[command(hide = true)]
    Probe(probe::ProbeArgs),
    /// Test servers inside a workload (used by the tests).
    #[command(hide = true)]
    Serve(serve::ServeArgs),
    /// A node agent's successor, played part-way (used by the tests).
    #[command(hide = true)]
    HandoverPeer(handover_peer::HandoverPeerArgs),
    /// Idle or slow connections held against a port (used by the tests, as an unprivileged
    /// user).
    #[command(hide = true)]
    Flood(flood::FloodArgs),
    /// The stress routines (memory over bursts, held connections, churn, SIGKILL and SIGSTOP
    /// under load) against agents of their own; prints every figure as JSON, and fails when a
    /// check did (root).
    Stress {
        /// The redirect-agent binary to run.
        #[arg(long, value_name = "PATH")]
        agent: std::path::PathBuf,
        #[command(flatten)]
        args: stress::StressArgs,
    },
    /// A stress routine's load generator, inside a workload or the remote host (used by
    /// `stress`).
    #[command(hide = true)]
    StressLoad(stress::load::LoadArgs),
}

fn main() -> ExitCode {
    // Nothing before the dispatch starts a thread: the probe and the servers switch cgroup,
    // namespace and identity, which are per task.
    match Cli::parse().command {
        Command::Probe(args) => probe::main(&args),
        Command::Serve(args) => serve::main(&args),
        Command::HandoverPeer(args) => handover_peer::main(&args),
        Command::Flood(args) => flood::main(&args),
        Command::StressLoad(args) => stress::load::main(&args),
        Command::Stress { agent, args } => {
            let report = stress::run_all(&agent, &args);
            println!("{}", serde_json::to_string_pretty(&report).unwrap_or_default());
            let problems = report.problems();
            for p in &problems {
                eprintln!("redirect-testkit stress: {p}");
            }
            if problems.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Command::Demo(args) => match demo::run(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("redirect-testkit demo: error: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}
