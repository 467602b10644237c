//! Where CRR's CPU goes (`cargo xtask bench --profile`): `perf record` during one CRR run
//! through an interceptor.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

use crate::orchestrate::{Config, Env, Guard, Plan, secs};

/// Where the CPU goes during CRR through an interceptor: a system-wide `perf record` (cpu-clock:
/// hardware counters are often absent in VMs) for the length of one CRR run, reported as the
/// hottest symbols by self time. System-wide, because most of the cost is kernel work done in
/// softirq on behalf of whichever task happens to be running.
pub fn profile(config: Config, plan: &Plan, agent: &Path, data: &Path) -> anyhow::Result<String> {
    let me: PathBuf = std::env::current_exe()?;
    let env = Env::new(config, agent, &me)?;
    let mut perf = Guard(
        Command::new("perf")
            .args(["record", "-e", "cpu-clock", "-F", "997", "-a", "-g", "-q", "-o"])
            .arg(data)
            .args(["--", "sleep", &secs(plan.crr)])
            .stdout(Stdio::null())
            .spawn()
            .context("perf (Debian package linux-perf) is needed for --profile")?,
    );
    let crr = env.crr(&me, plan.crr)?;
    let status = perf.0.wait()?;
    if !status.success() {
        bail!("perf record failed: {status}");
    }
    let report = |args: &[&str], rows: usize| -> anyhow::Result<String> {
        let out = Command::new("perf")
            .args(["report", "--stdio", "-g", "none", "--percent-limit", "0.5"])
            .args(args)
            .arg("-i")
            .arg(data)
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let rows: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .take(rows)
            .collect();
        Ok(rows.join("\n"))
    };
    Ok(format!(
        "{} connections in {:?} ({:.0}/s), {} errors\n\nBy thread name (swapper: idle):\n{}\n\n\
         The proxy's threads alone, inclusive of callees (children, then self; share of all \
         the machine's samples; a sample counts toward every function on its stack, and user \
         space stacks without frame pointers unwind poorly, so read the kernel rows):\n{}\n\nBy symbol, self time:\n{}\n",
        crr.completed,
        plan.crr,
        crr.per_second,
        crr.errors,
        report(&["--no-children", "--sort", "comm"], 30)?,
        report(
            &[
                "--children",
                "--percentage",
                "absolute",
                "--comms",
                "tokio-rt-worker,netns-dialer",
                "--sort",
                "sym",
            ],
            40
        )?,
        report(&["--no-children", "--sort", "comm,dso,sym"], 30)?
    ))
}
