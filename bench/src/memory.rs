//! The report's memory section: the interceptors' resident memory idle and holding proxied
//! connections, and the maps' kernel memory.

use std::{collections::BTreeMap, path::Path, process::Stdio, time::Duration};

use anyhow::{Context as _, bail};

use crate::{
    measure::{map_bytes, rss_bytes},
    orchestrate::{Config, Env, Guard, Plan, read_line},
};

/// One-off measurements.
#[derive(Debug, Default, Clone)]
pub struct Memory {
    /// (idle RSS, RSS holding N connections), per configuration with a process.
    pub rss: BTreeMap<Config, (u64, u64)>,
    pub held: usize,
    /// What the plan asked to hold, when the descriptor limit allowed fewer.
    pub wanted: Option<(usize, u64)>,
    pub map_bytes: u64,
}

/// The hard RLIMIT_NOFILE the interceptors inherit. Raising it takes CAP_SYS_RESOURCE, which
/// some sandboxes withhold even from root.
fn nofile_hard() -> u64 {
    redirect_agent::sys::nofile_limit().map_or(0, |l| l.rlim_max)
}

/// As many of `wanted` connections as a proxy can hold under the descriptor limit here (after
/// trying to raise it as the proxy would); fewer is reported as such, never silently.
pub(crate) fn holdable(wanted: usize) -> usize {
    redirect_agent::sys::raise_nofile_limit(wanted);
    wanted.min(redirect_agent::connections_fitting(nofile_hard()))
}

/// Resident memory idle and holding `hold` proxied connections, and map memory.
pub(crate) fn measure(
    config: Config,
    hold: usize,
    plan: &Plan,
    agent: &Path,
    me: &Path,
    memory: &mut Memory,
) -> anyhow::Result<()> {
    let env = Env::new(config, agent, me)?;
    let pid = env.interceptor_pid().context("no interceptor process")?;
    std::thread::sleep(Duration::from_millis(300));
    let idle = rss_bytes(pid).unwrap_or(0);
    let mut holder = Guard(
        env.client_command(me)
            .args(["--mode", "hold", "--conns", &hold.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?,
    );
    let line = read_line(&mut holder.0)?;
    if line != format!("held {hold}") {
        bail!("{}: holding {} connections failed ({line:?})", config.label(), hold);
    }
    let loaded = rss_bytes(pid).unwrap_or(0);
    memory.rss.insert(config, (idle, loaded));
    memory.held = hold;
    if hold < plan.hold {
        memory.wanted = Some((plan.hold, nofile_hard()));
    }
    if config == Config::Connect4 {
        memory.map_bytes = map_bytes(&env.name);
    }
    drop(holder);
    Ok(())
}
