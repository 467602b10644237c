//! `redirect-agent run` as a child process, driven as a user drives it: the binary, its
//! signals, and its documented state file.

use std::{
    io,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use redirect_agent::sys;

/// The file a running `redirect-agent run --name NAME` writes once it has attached:
/// `/run/redirect/NAME.json`. Of its contents only `"pid"` is relied on.
/// How long an agent may take to load, verify, attach and serve before a test gives up on it:
/// 30 s, or `REDIRECT_TEST_START_SECS` (`cargo xtask vm-test` sets 180 for its guest, whose
/// kernel runs under software emulation: the verifier there is tens of times slower).
pub fn start_timeout() -> Duration {
    std::env::var("REDIRECT_TEST_START_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .map_or(Duration::from_secs(30), Duration::from_secs)
}

pub fn state_file(name: &str) -> PathBuf {
    Path::new(sys::RUN_DIR).join(format!("{name}.json"))
}

/// The `"pid"` recorded in an instance's state file, if the file exists and says.
pub fn state_pid(name: &str) -> Option<u64> {
    let bytes = std::fs::read(state_file(name)).ok()?;
    let state: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    state.get("pid")?.as_u64()
}

/// What a harness agent (`run` or `node`) adds to its arguments: `--fast-path=off` unless
/// they say something of the fast path themselves, so that what a test or a benchmark checks
/// does not change with what the kernel's probe finds (`--fast-path=auto` spells out the
/// product's default).
pub fn fast_path_default<S: AsRef<str>>(args: &[S]) -> Option<&'static str> {
    let said = args.iter().any(|a| a.as_ref().starts_with("--fast-path"));
    (!said).then_some("--fast-path=off")
}

/// `redirect-agent run` as a child process, stopped with SIGTERM (then SIGKILL) on drop.
pub struct AgentProcess {
    pub name: String,
    child: Option<Child>,
    /// The agent's stderr goes to a file: a pipe nobody drains could stall it.
    log: PathBuf,
}

impl AgentProcess {
    /// Starts the agent and waits until it has attached (its state file names this child).
    pub fn start(agent: &Path, name: &str, args: &[&str]) -> io::Result<Self> {
        Self::start_as(agent, "run", name, args)
    }

    /// [`AgentProcess::start`] with environment variables set for the agent (istio-iptables'
    /// `ISTIO_*`, which `run` reads for flags left off its command line), beside what it
    /// inherits.
    pub fn start_with_env(agent: &Path, name: &str, args: &[&str], env: &[(&str, &str)]) -> io::Result<Self> {
        Self::spawn(agent, "run", name, args, env)
    }

    /// [`AgentProcess::start`] of another mode of the agent (`node`), ready by the same sign.
    pub fn start_as(agent: &Path, mode: &str, name: &str, args: &[&str]) -> io::Result<Self> {
        Self::spawn(agent, mode, name, args, &[])
    }

    fn spawn(agent: &Path, mode: &str, name: &str, args: &[&str], env: &[(&str, &str)]) -> io::Result<Self> {
        // One file per process: a restart under the same name must not share the file its
        // predecessor's handle removes when dropped.
        static STARTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = STARTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let log = std::env::temp_dir().join(format!("{name}.{n}.agent.log"));
        let log_file = std::fs::File::create(&log)?;
        let child = Command::new(agent)
            .arg(mode)
            .args(["--name", name])
            .args(args)
            .args(fast_path_default(args))
            .env(
                "RUST_LOG",
                std::env::var("REDIRECT_AGENT_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()?;
        let mut me = Self {
            name: name.into(),
            child: Some(child),
            log,
        };
        let pid = u64::from(me.child_mut().id());
        let within = start_timeout();
        let deadline = Instant::now() + within;
        // Ready means a state file written by this child, not one left by an earlier process.
        while state_pid(name) != Some(pid) {
            if let Some(status) = me.child_mut().try_wait()? {
                let err = me.take_log();
                me.child = None;
                return Err(io::Error::other(format!(
                    "agent exited early ({status}): {}",
                    err.trim()
                )));
            }
            if Instant::now() > deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("agent did not attach within {} s", within.as_secs()),
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(me)
    }

    fn child_mut(&mut self) -> &mut Child {
        self.child.as_mut().expect("child present until stopped")
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGTERM, then wait (SIGKILL after 10 s). Returns the exit status and what it logged.
    pub fn stop(&mut self) -> io::Result<(ExitStatus, String)> {
        self.terminate();
        self.wait(Duration::from_secs(10))
    }

    /// SIGTERM, without waiting: the agent detaches, then drains.
    pub fn terminate(&self) {
        self.signal(libc::SIGTERM);
    }

    /// Sends `signal` (SIGKILL, SIGSTOP, SIGCONT…) to the agent, if it has not been reaped.
    pub fn signal(&self, signal: i32) {
        if let Some(child) = &self.child {
            // SAFETY: kill(2) takes no pointers; the pid is our own child, not yet reaped.
            unsafe { libc::kill(child.id() as i32, signal) };
        }
    }

    /// Waits for the agent to exit (SIGKILL after `within`). Returns the exit status and what
    /// it logged.
    pub fn wait(&mut self, within: Duration) -> io::Result<(ExitStatus, String)> {
        let mut child = self.child.take().ok_or_else(|| io::Error::other("already stopped"))?;
        let deadline = Instant::now() + within;
        let status = loop {
            if let Some(s) = child.try_wait()? {
                break s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                break child.wait()?;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        Ok((status, self.take_log()))
    }

    /// What the agent has logged so far; the file is removed.
    /// What it has logged so far (its stderr; `warn` and up unless `REDIRECT_AGENT_LOG` says).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn take_log(&mut self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let _ = std::fs::remove_file(&self.log);
        text
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.stop();
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

/// Removes an instance's pins (`redirect-agent cleanup --name`) on drop: a killed agent's stay
/// by design, and a node's outlive its process.
pub struct Pins {
    agent_bin: PathBuf,
    name: String,
}

impl Pins {
    pub fn new(agent_bin: &Path, name: &str) -> Self {
        Self {
            agent_bin: agent_bin.to_owned(),
            name: name.to_owned(),
        }
    }
}

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = Command::new(&self.agent_bin)
            .args(["cleanup", "--name", &self.name])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}
