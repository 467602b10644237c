//! The workload a stress routine loads: a namespace pair with a second pod address for the
//! load generator, a cgroup, the [`Servers`], and an agent of its own serving it in `run` or
//! `node` mode (enrolled there), which the routine can kill, stop and start again. Dropped in
//! order: the agent (continued first if stopped), its pins (`redirect-agent cleanup`), the
//! servers, the cgroup, the namespaces.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use super::servers::{GENERATOR_IP, Servers};
use crate::{
    agent::{AgentProcess, Pins},
    cgroup::TestCgroup,
    netns::NetnsPair,
    unique,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// `redirect-agent run --cgroup --netns` on the workload.
    Run,
    /// `redirect-agent node` with the workload enrolled over its control socket.
    Node,
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Run => "run",
            Self::Node => "node",
        })
    }
}

pub struct Target {
    agent: Option<AgentProcess>,
    stopped: bool,
    _pins: Pins,
    pub servers: Servers,
    pub cgroup: TestCgroup,
    pub pair: NetnsPair,
    pub mode: Mode,
    pub name: String,
    agent_bin: PathBuf,
    args: Vec<String>,
    socket: PathBuf,
}

impl Target {
    /// The workload and its servers, with an agent in `mode` serving it (`flags` added to
    /// `run`'s or `node`'s own).
    pub fn start(agent_bin: &Path, mode: Mode, tag: &str, flags: &[&str]) -> anyhow::Result<Self> {
        let pair = NetnsPair::create(tag)?;
        pair.workload
            .ip(&["addr", "add", &format!("{GENERATOR_IP}/32"), "dev", "w0"])?;
        let cgroup = TestCgroup::create(tag)?;
        let servers = Servers::start(&pair.remote, &pair.workload, pair.workload_ip, pair.remote_ip)?;
        let name = unique(tag);
        let socket = PathBuf::from(format!("/run/redirect/{name}.sock"));
        let mut args: Vec<String> = match mode {
            Mode::Run => vec![
                "--cgroup".into(),
                cgroup.path.to_string_lossy().into_owned(),
                "--netns".into(),
                pair.workload.path.to_string_lossy().into_owned(),
            ],
            Mode::Node => vec![
                "--socket".into(),
                socket.to_string_lossy().into_owned(),
                "--metrics".into(),
                "off".into(),
            ],
        };
        args.extend(flags.iter().map(|s| s.to_string()));
        let mut me = Self {
            agent: None,
            stopped: false,
            _pins: Pins::new(agent_bin, &name),
            servers,
            cgroup,
            pair,
            mode,
            name,
            agent_bin: agent_bin.to_owned(),
            args,
            socket,
        };
        me.start_agent()?;
        if mode == Mode::Node {
            let out = Command::new(agent_bin)
                .args(["enroll", "--socket", &me.socket.to_string_lossy()])
                .args(["--netns", &me.pair.workload.path.to_string_lossy(), "--id", "stress"])
                .stdin(Stdio::null())
                .output()?;
            if !out.status.success() {
                bail!("enroll: {}", String::from_utf8_lossy(&out.stderr).trim());
            }
        }
        Ok(me)
    }

    /// Starts a process of the instance: the first, or after a kill the one that takes over
    /// (`run`: the same name) or adopts (`node`).
    pub fn start_agent(&mut self) -> anyhow::Result<()> {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        let agent = AgentProcess::start_as(&self.agent_bin, &self.mode.to_string(), &self.name, &args)
            .with_context(|| format!("starting redirect-agent {}", self.mode))?;
        if self.mode == Mode::Node {
            // Serving once its control socket answers.
            let deadline = Instant::now() + Duration::from_secs(30);
            while std::os::unix::net::UnixStream::connect(&self.socket).is_err() {
                if Instant::now() > deadline {
                    bail!(
                        "the node agent's socket {} did not answer in 30 s",
                        self.socket.display()
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.agent = Some(agent);
        Ok(())
    }

    /// The running agent's pid.
    /// The running agent's log so far (empty when none runs).
    pub fn agent_log(&self) -> String {
        self.agent.as_ref().map(AgentProcess::log).unwrap_or_default()
    }

    pub fn pid(&self) -> anyhow::Result<u32> {
        self.agent
            .as_ref()
            .and_then(AgentProcess::pid)
            .context("no agent running")
    }

    /// SIGKILL, and the process reaped.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        let mut agent = self.agent.take().context("no agent running")?;
        agent.signal(libc::SIGKILL);
        agent.wait(Duration::from_secs(10))?;
        self.stopped = false;
        Ok(())
    }

    /// SIGSTOP (`stop = true`) or SIGCONT.
    pub fn pause(&mut self, stop: bool) -> anyhow::Result<()> {
        let agent = self.agent.as_ref().context("no agent running")?;
        agent.signal(if stop { libc::SIGSTOP } else { libc::SIGCONT });
        self.stopped = stop;
        Ok(())
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        if let Some(mut agent) = self.agent.take() {
            if self.stopped {
                agent.signal(libc::SIGCONT);
            }
            let _ = agent.stop();
        }
    }
}
