//! `install --watch`: keeps the plugin installed and chained while the node's configuration
//! changes under it, as Istio's install-cni does (`Run`, `sleepWatchInstall`,
//! `checkValidCNIConfig`): another file becoming the runtime's (Cilium writes
//! `05-cilium.conflist`), or the file rewritten without the plugin, re-chains it.

use std::{
    collections::BTreeSet,
    io::Read as _,
    mem::MaybeUninit,
    os::{fd::OwnedFd, unix::net::UnixStream},
    path::PathBuf,
    time::{Duration, Instant},
};

use rustix::{
    event::{PollFd, PollFlags, Timespec, poll},
    fs::inotify::{self, ReadFlags, WatchFlags},
    io::Errno,
};
use serde_json::Value;
use signal_hook::{
    SigId,
    consts::{SIGINT, SIGTERM},
};

use super::{
    Bin, Node, OnExit, PLUGIN, Stamp, conf,
    conf::Chained,
    find, install_bin_cached, kubeconfig, missing,
    removal::{AtStop, RemovalCheck},
    remove, write_kubeconfig,
};

/// The safety net under inotify: events can be lost (queue overflow, a directory mounted over).
const RECHECK: Duration = Duration::from_secs(10);
/// A burst of events (a tool writing several files) makes one check once it has been quiet this
/// long...
const QUIET: Duration = Duration::from_millis(100);
/// ...or this long after its first event, whichever comes first.
const MAX_DELAY: Duration = Duration::from_secs(1);
/// Between a check that wrote and the next: another installer that insists on its own version
/// of the file makes us rewrite once a second at most, not in a tight loop.
const MIN_GAP: Duration = Duration::from_secs(1);

/// Runs until SIGTERM or SIGINT.
pub(super) fn run(node: &Node, entry: &Value, on_exit: &OnExit) -> Result<String, String> {
    // First, so that a signal during the first install ends the loop instead of the process.
    let signals = Signals::new()?;
    let mut w = Watcher {
        node,
        entry,
        chained: None,
        bin: None,
        said: BTreeSet::new(),
        last_write: None,
        kubeconfig: kubeconfig::Writer::new(),
        removal: match on_exit {
            OnExit::UninstallIfRemoved(namespace, name) => Some(RemovalCheck::new(namespace, name)),
            _ => None,
        },
        said_removal: None,
    };
    // As plain install, errors included; only a missing configuration is waited for.
    let bin = install_bin_cached(&node.bin_dir, &mut w.bin)?;
    eprintln!("{PLUGIN}: {bin}");
    if let Some(path) = write_kubeconfig(node, &mut w.kubeconfig)? {
        eprintln!("{PLUGIN}: wrote {path}");
    }
    w.look_for_daemonset();
    let scan = find(node)?;
    w.said = scan.skipped.iter().map(|(f, why)| skip_line(f, why)).collect();
    w.said.iter().for_each(|l| eprintln!("{PLUGIN}: {l}"));
    if let Some(chosen) = scan.chosen {
        let done = conf::chain(&chosen, entry)?;
        eprintln!("{PLUGIN}: {done}");
        w.chained = Some(done.path().to_owned());
    }
    let mut inotify = Inotify::new(node);
    eprintln!(
        "{PLUGIN}: watching {} and {} (and every {} s)",
        node.conf_dir.display(),
        node.bin_dir.display(),
        RECHECK.as_secs()
    );
    if w.chained.is_none() {
        w.check();
    }
    let mut periodic = Instant::now() + RECHECK;
    // First and latest event of the burst not yet checked.
    let mut pending: Option<(Instant, Instant)> = None;
    loop {
        let gap = w.last_write.map(|t| t + MIN_GAP);
        let burst = pending.map(|(first, last)| (last + QUIET).min(first + MAX_DELAY));
        let mut due = burst.map_or(periodic, |b| b.min(periodic));
        if let Some(gap) = gap {
            due = due.max(gap);
        }
        let wait = due.saturating_duration_since(Instant::now());
        let timeout = Timespec::try_from(wait).unwrap_or(Timespec { tv_sec: 10, tv_nsec: 0 });
        let (signalled, notified) = {
            let mut fds = vec![PollFd::new(&signals.rx, PollFlags::IN)];
            if let Some(fd) = inotify.fd.as_ref() {
                fds.push(PollFd::new(fd, PollFlags::IN));
            }
            match poll(&mut fds, Some(&timeout)) {
                Ok(_) => {}
                Err(Errno::INTR) => continue,
                Err(e) => return Err(format!("watch: poll: {e}")),
            }
            let ready = |fd: Option<&PollFd<'_>>| fd.is_some_and(|f| !f.revents().is_empty());
            (ready(fds.first()), ready(fds.get(1)))
        };
        if signalled && signals.received() {
            break;
        }
        if notified && inotify.drain() {
            let now = Instant::now();
            pending = Some((pending.map_or(now, |(first, _)| first), now));
        }
        let now = Instant::now();
        let burst_due = pending.is_some_and(|(first, last)| now >= (last + QUIET).min(first + MAX_DELAY));
        if (burst_due || now >= periodic) && gap.is_none_or(|g| now >= g) {
            if now >= periodic {
                inotify.rewatch(node);
                w.look_for_daemonset();
            }
            if w.check() {
                w.last_write = Some(Instant::now());
            }
            pending = None;
            periodic = Instant::now() + RECHECK;
        }
    }
    let kept = |why: &str| -> String {
        match &w.chained {
            // An upgrade or a reboot restarts this; pods started meanwhile must still be captured.
            Some(file) if conf::chains_us(file) => {
                format!(
                    "stopped; {PLUGIN} stays installed and chained in {}{why}",
                    file.display()
                )
            }
            _ => format!(
                "stopped; no configuration in {} chains {PLUGIN} now",
                node.conf_dir.display()
            ),
        }
    };
    match on_exit {
        OnExit::Keep => Ok(kept("")),
        OnExit::Uninstall => remove(node).map(|done| format!("stopped; {done}")),
        OnExit::UninstallIfRemoved(..) => match w.removal.as_ref().map(|r| r.at_stop(node)) {
            Some(AtStop::Uninstall(why)) => remove(node).map(|done| format!("stopped; {why}; {done}")),
            Some(AtStop::Keep(why)) => Ok(kept(&format!(": {why}"))),
            None => Ok(kept("")),
        },
    }
}

fn skip_line(file: &std::path::Path, why: &str) -> String {
    format!("skipped {}: {why}", file.display())
}

struct Watcher<'a> {
    node: &'a Node,
    entry: &'a Value,
    /// The file that chains us, as far as we know.
    chained: Option<PathBuf>,
    bin: Option<Stamp>,
    /// Lines about the standing state (files skipped, errors, waiting), said once each while
    /// they hold, not at every check.
    said: BTreeSet<String>,
    last_write: Option<Instant>,
    kubeconfig: kubeconfig::Writer,
    removal: Option<RemovalCheck>,
    /// The last line said about looking for the DaemonSet, so that it is said once.
    said_removal: Option<String>,
}

impl Watcher<'_> {
    /// `--uninstall-if-removed`: looks for the DaemonSet until it is seen.
    fn look_for_daemonset(&mut self) {
        let Some(removal) = self.removal.as_mut() else {
            return;
        };
        let line = match removal.look(self.node) {
            Ok(None) => return,
            Ok(Some(found)) => found,
            Err(why) => why,
        };
        if self.said_removal.as_ref() != Some(&line) {
            eprintln!("{PLUGIN}: {line}");
            self.said_removal = Some(line);
        }
    }

    /// One pass over the binary and the configuration; whether it wrote anything.
    fn check(&mut self) -> bool {
        let mut standing = BTreeSet::new();
        let mut wrote = false;
        match install_bin_cached(&self.node.bin_dir, &mut self.bin) {
            Ok(Bin::Copied(p)) => {
                eprintln!("{PLUGIN}: re-installed {}: it was missing or differed", p.display());
                wrote = true;
            }
            Ok(Bin::Current(_)) => {}
            Err(e) => {
                standing.insert(e);
            }
        }
        // A projected token rotates (hourly by default): the plugin's copy follows it.
        match write_kubeconfig(self.node, &mut self.kubeconfig) {
            Ok(Some(path)) => {
                eprintln!("{PLUGIN}: rewrote {path}: the service account's token or CA changed");
                wrote = true;
            }
            Ok(None) => {}
            Err(e) => {
                standing.insert(e);
            }
        }
        match find(self.node) {
            Err(e) => {
                standing.insert(e);
            }
            Ok(scan) => {
                standing.extend(scan.skipped.iter().map(|(f, why)| skip_line(f, why)));
                match scan.chosen {
                    None => {
                        standing.insert(format!("{}; waiting for one", missing(self.node)));
                        self.chained = None;
                    }
                    Some(chosen) => match conf::chain(&chosen, self.entry) {
                        Err(e) => {
                            standing.insert(e);
                        }
                        Ok(done) => {
                            if let Some(line) = self.describe(&done) {
                                eprintln!("{PLUGIN}: {line}");
                            }
                            wrote |= !matches!(done, Chained::UpToDate(_));
                            self.chained = Some(done.path().to_owned());
                        }
                    },
                }
            }
        }
        for line in standing.difference(&self.said) {
            eprintln!("{PLUGIN}: {line}");
        }
        self.said = standing;
        wrote
    }

    /// The log line for a chaining, `None` when nothing changed.
    fn describe(&self, done: &Chained) -> Option<String> {
        let now = done.path();
        let Some(before) = &self.chained else {
            return Some(done.to_string());
        };
        let reason = if before != now {
            if before.exists() {
                format!("it preempts {}", before.display())
            } else {
                format!("{} is gone", before.display())
            }
        } else {
            match done {
                Chained::UpToDate(_) => return None,
                Chained::Added(_) => format!("it was rewritten without {PLUGIN}"),
                Chained::Updated(_) => format!("{PLUGIN}'s entry in it had changed"),
                Chained::Converted { from, .. } => format!("{} was written again", from.display()),
            }
        };
        Some(format!("re-chained into {}: {reason}", now.display()))
    }
}

/// SIGTERM and SIGINT as bytes on a socket the loop polls: no flag checked between a test and
/// a sleep, so no signal is slept through.
struct Signals {
    rx: UnixStream,
    ids: Vec<SigId>,
}

impl Signals {
    fn new() -> Result<Self, String> {
        let err = |e: std::io::Error| format!("watch: signal handling: {e}");
        let (rx, tx) = UnixStream::pair().map_err(err)?;
        rx.set_nonblocking(true).map_err(err)?;
        let mut signals = Self { rx, ids: Vec::new() };
        for signal in [SIGTERM, SIGINT] {
            let tx = tx.try_clone().map_err(err)?;
            signals
                .ids
                .push(signal_hook::low_level::pipe::register(signal, tx).map_err(err)?);
        }
        Ok(signals)
    }

    /// Whether a signal came, rather than a spurious wake-up. A closed socket (end of stream)
    /// counts too, as the loop would otherwise wake at once for ever.
    fn received(&self) -> bool {
        match (&self.rx).read_exact(&mut [0u8; 1]) {
            Ok(()) => true,
            Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
        }
    }
}

impl Drop for Signals {
    fn drop(&mut self) {
        for id in self.ids.drain(..) {
            signal_hook::low_level::unregister(id);
        }
    }
}

/// inotify on the two directories; without it (no watches left on the node, say) the periodic
/// check still runs.
struct Inotify {
    fd: Option<OwnedFd>,
    conf: Option<i32>,
    bin: Option<i32>,
}

impl Inotify {
    fn new(node: &Node) -> Self {
        let fd = inotify::init(inotify::CreateFlags::CLOEXEC | inotify::CreateFlags::NONBLOCK)
            .map_err(|e| eprintln!("{PLUGIN}: inotify: {e}; checking every {} s only", RECHECK.as_secs()))
            .ok();
        let mut me = Self {
            fd,
            conf: None,
            bin: None,
        };
        me.rewatch(node);
        me
    }

    /// Adds the watches that are missing (a directory removed and made again loses its watch).
    fn rewatch(&mut self, node: &Node) {
        let Some(fd) = &self.fd else { return };
        let flags = WatchFlags::CREATE
            | WatchFlags::DELETE
            | WatchFlags::CLOSE_WRITE
            | WatchFlags::MOVED_FROM
            | WatchFlags::MOVED_TO
            | WatchFlags::DELETE_SELF
            | WatchFlags::MOVE_SELF
            | WatchFlags::ONLYDIR;
        for (slot, dir) in [(&mut self.conf, &node.conf_dir), (&mut self.bin, &node.bin_dir)] {
            if slot.is_none() {
                *slot = inotify::add_watch(fd, dir, flags).ok();
            }
        }
    }

    /// Reads every queued event; whether one of them may change what a check finds.
    fn drain(&mut self) -> bool {
        let Some(fd) = &self.fd else { return false };
        let mut buf = [MaybeUninit::<u8>::uninit(); 4096];
        let mut reader = inotify::Reader::new(fd, &mut buf);
        let mut relevant = false;
        let mut broken = None;
        loop {
            let event = match reader.next() {
                Ok(event) => event,
                Err(Errno::INTR) => continue,
                Err(Errno::AGAIN) => break,
                Err(e) => {
                    broken = Some(e);
                    break;
                }
            };
            let flags = event.events();
            let wd = Some(event.wd());
            if flags.contains(ReadFlags::QUEUE_OVERFLOW) {
                relevant = true;
                continue;
            }
            if flags.contains(ReadFlags::IGNORED) {
                // The watch is gone with its directory; the periodic check adds it again.
                if wd == self.conf {
                    self.conf = None;
                }
                if wd == self.bin {
                    self.bin = None;
                }
                relevant = true;
                continue;
            }
            let name = event.file_name().map(|n| n.to_bytes());
            // Our own temporary files show up here too; only what the runtime reads counts.
            relevant |= match name {
                None => true,
                Some(n) if wd == self.conf => n.ends_with(b".conf") || n.ends_with(b".conflist"),
                Some(n) if wd == self.bin => n == PLUGIN.as_bytes(),
                Some(_) => false,
            };
        }
        if let Some(e) = broken {
            // Polled again, the descriptor would be ready again at once: give it up.
            eprintln!("{PLUGIN}: inotify: {e}; checking every {} s only", RECHECK.as_secs());
            *self = Self {
                fd: None,
                conf: None,
                bin: None,
            };
            return true;
        }
        relevant
    }
}
