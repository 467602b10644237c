//! Pins nobody else can move (issue 16, item 9): the pin directories are refused when another
//! user could rename what is in them, and `cleanup` says an instance is gone only once the
//! kernel runs none of its programs.

use std::{
    os::unix::fs::{PermissionsExt as _, symlink},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use redirect_agent::engine::pins::{pin_dir, state_path};
use redirect_testkit::unique;
use redirect_tests::{
    REMOTE_PORT, Workload, agent_bin, agent_cmd, agent_cmd_within, direct, landing, node::NodeAgent, require_root,
};

/// Removes a path (a directory and what is in it, or a symlink) on drop.
struct Removed(PathBuf);

impl Drop for Removed {
    fn drop(&mut self) {
        let _ = match std::fs::symlink_metadata(&self.0) {
            Ok(m) if m.is_dir() => std::fs::remove_dir_all(&self.0),
            _ => std::fs::remove_file(&self.0),
        };
    }
}

/// `cleanup --name NAME` on drop, for a start that must have been refused (and so, if it was
/// not, leaves pins or a state file of that name).
struct Cleanup(String);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = agent_cmd(&["cleanup", "--name", &self.0]);
    }
}

/// `/sys/fs/bpf/redirect` itself, a shared directory whose entries other sessions make and
/// remove: made (bounded retries, since an exiting instance removes it when empty) so that an
/// entry of the test can be put into it.
fn pin_root() {
    for _ in 0..20 {
        if std::fs::create_dir_all("/sys/fs/bpf/redirect").is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("cannot make /sys/fs/bpf/redirect");
}

/// The reported attack, word for word: an unprivileged user makes `/sys/fs/bpf/redirect`
/// before any agent (bpffs is world-writable), so that it owns the directory the instances'
/// pins go to and can later rename them. In a mount namespace of its own with a fresh bpffs,
/// so that the node's real `/sys/fs/bpf/redirect` (other tests' instances) is not touched. The
/// agent must refuse to start, naming the directory, its owner and mode.
#[test]
fn a_pin_root_another_user_made_is_refused_before_anything_is_attached() {
    require_root();
    let name = unique("pins-root");
    let _cleanup = Cleanup(name.clone());
    let socket = format!("/run/redirect/{name}.sock");
    let script = format!(
        "set -e; mount -t bpf bpf /sys/fs/bpf; \
         setpriv --reuid 65534 --regid 65534 --clear-groups mkdir -m 0777 /sys/fs/bpf/redirect; \
         exec timeout -s TERM 20 {agent} node --name {name} --socket {socket} --metrics off",
        agent = agent_bin().display(),
    );
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .env("RUST_LOG", "warn")
        .output()
        .expect("unshare");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "the start must be refused: {err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(
        err.contains("/sys/fs/bpf/redirect ") && err.contains("uid 65534") && err.contains("0777"),
        "names the directory, its owner and mode: {err}"
    );
    assert!(!state_path(&name).exists(), "nothing was started");
}

/// An instance directory others may write, or a symlink in its place (a directory elsewhere
/// that would hold the pins), is refused before anything changes.
#[test]
fn an_instance_dir_others_can_write_or_a_symlink_is_refused() {
    require_root();
    let name = unique("pins-dir");
    let _cleanup = Cleanup(name.clone());
    let dir = pin_dir(&name);
    let socket = format!("/run/redirect/{name}.sock");
    let start = || {
        agent_cmd_within(
            &["node", "--name", &name, "--socket", &socket, "--metrics", "off"],
            Duration::from_secs(20),
        )
        .expect("a refused start ends at once")
    };

    pin_root();
    let _dir = Removed(dir.clone());
    std::fs::create_dir(&dir).unwrap();
    std::os::unix::fs::chown(&dir, Some(65534), Some(65534)).unwrap();
    let out = start();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains(&format!("{} is owned by uid 65534", dir.display())),
        "{err}"
    );
    assert!(!state_path(&name).exists(), "nothing was started");

    // Root's, but writable by others.
    std::os::unix::fs::chown(&dir, Some(0), Some(0)).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let err = String::from_utf8_lossy(&start().stderr).into_owned();
    assert!(err.contains("mode 0777"), "{err}");

    // A symlink to a directory elsewhere on bpffs.
    std::fs::remove_dir(&dir).unwrap();
    let elsewhere = PathBuf::from(format!("/sys/fs/bpf/{name}-elsewhere"));
    let _elsewhere = Removed(elsewhere.clone());
    std::fs::create_dir(&elsewhere).unwrap();
    symlink(&elsewhere, &dir).unwrap();
    let out = start();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("is a symlink"), "{err}");
    assert_eq!(
        std::fs::read_dir(&elsewhere).unwrap().count(),
        0,
        "nothing was pinned through the symlink"
    );
    assert!(!state_path(&name).exists(), "nothing was started");
}

/// The pin directories an agent makes are root's and 0700.
#[test]
fn pin_directories_are_made_0700() {
    use std::os::unix::fs::MetadataExt as _;
    let agent = NodeAgent::new("pins-mode", &[]);
    let _p = agent.start().expect("node agent starts");
    let dir = pin_dir(&agent.name);
    for d in [dir.clone(), dir.join("links"), dir.join("programs")] {
        let m = std::fs::symlink_metadata(&d).unwrap();
        assert!(m.is_dir(), "{}", d.display());
        assert_eq!(
            (m.uid(), format!("{:04o}", m.mode() & 0o7777)),
            (0, "0700".to_owned()),
            "{}",
            d.display()
        );
    }
}

/// Pins moved away keep the programs attached. `cleanup` must not report the instance gone
/// then: it names the links still running its programs, fails, and keeps the state; once the
/// pins are back, it removes everything and the workload's traffic goes direct.
#[test]
fn cleanup_fails_while_moved_pins_keep_the_programs_attached() {
    let agent = NodeAgent::new("pins-moved", &[]);
    let mut p = agent.start().expect("node agent starts");
    let w = Workload::new_on("pm", 161);
    agent.enroll(&w.pair.workload.path, "moved", &[]);
    let (status, log) = p.stop(Duration::from_secs(10));
    assert!(status.is_some_and(|s| s.success()), "{log}");

    let dir = pin_dir(&agent.name);
    let moved = PathBuf::from(format!("/sys/fs/bpf/{}-moved", agent.name));
    let _moved = Removed(moved.clone());
    std::fs::rename(&dir, &moved).unwrap();

    let out = agent_cmd(&["cleanup", "--name", &agent.name]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "cleanup must not succeed while programs are attached: {} {err}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("still runs its programs") && err.contains("running redirect_connect4"),
        "{err}"
    );
    eprintln!("cleanup said: {err}");
    assert!(state_path(&agent.name).exists(), "the state is kept for another try");
    // Still captured (refused: no agent serves it), as the error says.
    assert_ne!(landing(&w.probe(&w.spec(w.remote(REMOTE_PORT)))), direct("remote"));

    // (cleanup removed the shared root, now empty.)
    pin_root();
    std::fs::rename(&moved, &dir).unwrap();
    let out = agent_cmd(&["cleanup", "--name", &agent.name]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!Path::new(&dir).exists());
    assert!(!state_path(&agent.name).exists());
    assert_eq!(landing(&w.probe(&w.spec(w.remote(REMOTE_PORT)))), direct("remote"));
}
