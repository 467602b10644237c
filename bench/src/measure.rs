//! What a benchmark reads of processes and programs: CPU time and RSS from /proc, each
//! program's run time and count (kernel.bpf_stats_enabled), the maps' memory, and what the
//! agent's `check` says of the fast path's default.

use std::process::Command;

use redirect_agent::engine::pins::pin_dir;

/// utime + stime of a process (all its threads), in seconds.
pub(crate) fn process_cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(11) + ticks(12)) / hz
}

pub(crate) fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse::<u64>()
        .ok()?;
    Some(kb * 1024)
}

pub(crate) fn bpftool_json(args: &[&str]) -> Option<serde_json::Value> {
    let out = Command::new("bpftool").arg("-j").args(args).output().ok()?;
    out.status.success().then(|| serde_json::from_slice(&out.stdout).ok())?
}

/// (run_time_ns, run_cnt) of a program, from kernel.bpf_stats_enabled accounting.
pub(crate) fn prog_stats(id: u32) -> Option<(u64, u64)> {
    let v = bpftool_json(&["prog", "show", "id", &id.to_string()])?;
    Some((
        v["run_time_ns"].as_u64().unwrap_or(0),
        v["run_cnt"].as_u64().unwrap_or(0),
    ))
}

/// Kernel memory charged for the instance's maps (bytes_memlock of each pinned map).
pub(crate) fn map_bytes(name: &str) -> u64 {
    let dir = pin_dir(name);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| bpftool_json(&["map", "show", "pinned", &e.path().to_string_lossy()]))
        .filter_map(|v| v["bytes_memlock"].as_u64())
        .sum()
}

/// Turns kernel.bpf_stats_enabled on until dropped (it costs a little on every program run).
pub(crate) struct BpfStats {
    before: String,
}

impl BpfStats {
    const PATH: &'static str = "/proc/sys/kernel/bpf_stats_enabled";

    pub(crate) fn enable() -> Option<Self> {
        let before = std::fs::read_to_string(Self::PATH).ok()?;
        std::fs::write(Self::PATH, "1").ok()?;
        Some(Self { before })
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = std::fs::write(Self::PATH, self.before.trim());
    }
}

/// `check`'s line for the fast path's default on this kernel (after its "…(--fast-path=auto): ").
pub(crate) fn fast_path_default(agent: &std::path::Path) -> String {
    let out = match Command::new(agent).arg("check").output() {
        Ok(out) => out,
        Err(e) => return format!("– (`check` did not run: {e})"),
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.split_once("(--fast-path=auto): ").map(|(_, v)| v.to_owned()))
        .unwrap_or_else(|| "– (`check` printed no fast-path line)".to_owned())
}
