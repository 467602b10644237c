//! A throw-away cgroup v2 directory for a workload.

use std::{
    io,
    path::PathBuf,
    time::{Duration, Instant},
};

use redirect_agent::sys;

use crate::util::unique;

/// A cgroup v2 directory under the cgroup2 mount; its processes are killed and the directory
/// removed on drop.
pub struct TestCgroup {
    pub path: PathBuf,
}

impl TestCgroup {
    pub fn create(tag: &str) -> io::Result<Self> {
        let root = sys::cgroup2_root().map_err(io::Error::other)?;
        let path = root.join(unique(tag));
        std::fs::create_dir(&path)?;
        Ok(Self { path })
    }

    pub fn procs(&self) -> Vec<i32> {
        std::fs::read_to_string(self.path.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            for pid in self.procs() {
                // SAFETY: kill(2) takes no pointers; a pid that has gone meanwhile gets ESRCH.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            if std::fs::remove_dir(&self.path).is_ok() || Instant::now() > deadline {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
