//! `redirect-cni install --watch`, run as the DaemonSet runs it, against a configuration
//! directory that changes under it.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use rustix::process::{Pid, Signal, kill_process};
use serde_json::{Value, json};

/// Bin and conf directories and the watcher's log, removed however the test ends.
struct Node(PathBuf);

impl Node {
    fn new() -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("redirect-cni-watch-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("bin")).unwrap();
        fs::create_dir_all(dir.join("net.d")).unwrap();
        Self(dir)
    }

    fn conf(&self, name: &str) -> PathBuf {
        self.0.join("net.d").join(name)
    }

    fn log(&self) -> String {
        fs::read_to_string(self.0.join("log")).unwrap_or_default()
    }

    /// Starts `install --watch`, its stderr in the log.
    fn watch(&self, extra: &[&str]) -> Watch {
        let log = fs::File::create(self.0.join("log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_redirect-cni"))
            .args(["install", "--watch", "--cni-bin-dir"])
            .arg(self.0.join("bin"))
            .arg("--cni-conf-dir")
            .arg(self.0.join("net.d"))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        Watch(Some(child))
    }

    /// Polls `cond` every 50 ms for 10 s at most.
    fn wait(&self, what: &str, mut cond: impl FnMut() -> bool) {
        let start = Instant::now();
        while !cond() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "{what}: not within 10 s; watcher's log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// The watcher; killed if a test fails with it still running.
struct Watch(Option<Child>);

impl Watch {
    fn terminate(&mut self) -> ExitStatus {
        let child = self.0.as_mut().unwrap();
        let pid = Pid::from_raw(i32::try_from(child.id()).unwrap()).unwrap();
        kill_process(pid, Signal::TERM).unwrap();
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.0 = None;
                return status;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "no exit within 10 s of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn list(plugins: Value) -> String {
    json!({ "cniVersion": "1.0.0", "name": "k8s", "plugins": plugins }).to_string()
}

fn chains(path: &Path) -> bool {
    fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .is_some_and(|v| {
            v["plugins"]
                .as_array()
                .is_some_and(|p| p.iter().any(|p| p["type"] == "redirect-cni"))
        })
}

#[test]
fn watch_rechains_after_a_rewrite_and_a_preemption_and_stays_chained_on_sigterm() {
    let node = Node::new();
    let main = node.conf("10-main.conflist");
    fs::write(&main, list(json!([{ "type": "cilium-cni" }]))).unwrap();
    let mut watch = node.watch(&[]);
    node.wait("first chaining", || chains(&main));
    assert!(node.0.join("bin/redirect-cni").is_file());

    // The main plugin's agent rewrites its file without us, as Cilium does at every start.
    fs::write(&main, list(json!([{ "type": "cilium-cni" }]))).unwrap();
    node.wait("re-chaining after a rewrite", || chains(&main));
    node.wait("the re-chain logged", || {
        node.log().contains("re-chained into") && node.log().contains("rewritten without redirect-cni")
    });

    // A file that sorts first becomes the runtime's.
    let other = node.conf("05-other.conflist");
    fs::write(&other, list(json!([{ "type": "ptp" }]))).unwrap();
    node.wait("chaining into the preempting file", || chains(&other));
    node.wait("the preemption logged", || node.log().contains("it preempts"));

    // The binary removed from the bin directory comes back.
    fs::remove_file(node.0.join("bin/redirect-cni")).unwrap();
    node.wait("the binary re-installed", || node.0.join("bin/redirect-cni").is_file());

    let status = watch.terminate();
    assert!(status.success(), "{status}; log:\n{}", node.log());
    assert!(chains(&other), "SIGTERM took the plugin out");
    assert!(node.0.join("bin/redirect-cni").is_file());
}

#[test]
fn watch_waits_for_a_configuration_and_uninstalls_on_exit_when_asked() {
    let node = Node::new();
    let mut watch = node.watch(&["--uninstall-on-exit"]);
    node.wait("waiting logged", || node.log().contains("waiting for one"));
    let main = node.conf("10-main.conflist");
    fs::write(&main, list(json!([{ "type": "bridge" }]))).unwrap();
    node.wait("chaining into the new file", || chains(&main));

    let status = watch.terminate();
    assert!(status.success(), "{status}; log:\n{}", node.log());
    assert!(!chains(&main), "still chained after --uninstall-on-exit");
    assert!(!node.0.join("bin/redirect-cni").exists());
}
