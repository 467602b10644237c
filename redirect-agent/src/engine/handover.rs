//! Handing the workloads to a new agent process without dropping a connection, and adopting
//! a stopped one's.
//!
//! The successor asks over the control socket; the predecessor answers with its workloads and,
//! once the successor is ready for them, each workload's namespace and listening sockets
//! (SCM_RIGHTS), so connections queued or arriving meanwhile wait in the same accept queues.
//! Both accept from them until the successor says it serves; only then does the predecessor
//! stop, let go of the lock and drain. A successor that fails before that costs nothing.

use std::{
    collections::BTreeMap,
    io::Write as _,
    os::{
        fd::{AsFd as _, BorrowedFd, OwnedFd},
        unix::net::UnixStream,
    },
    path::Path,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use redirect_api::{HandoverWorkload, Request, Response, WorkloadInfo};

use super::{Engine, EnrollError, links};
use crate::{error::LoadError, proxy::Side, sys};

/// Descriptors a predecessor handed over for one workload.
pub(crate) struct Handed {
    pub(crate) netns: OwnedFd,
    pub(crate) listeners: Vec<(Side, OwnedFd)>,
}

/// What a predecessor handed over: its workloads, their descriptors by workload id, and the
/// connection on which this process confirms it serves them.
pub(crate) struct Handover {
    pub(crate) infos: Vec<WorkloadInfo>,
    pub(crate) handed: BTreeMap<String, Handed>,
    /// The predecessor's metrics listener, when it was asked for (this process could not
    /// bind the port, which the predecessor holds).
    pub(crate) metrics: Option<OwnedFd>,
    predecessor: UnixStream,
    /// The instance's lock file, open from before the ask: the predecessor checks that the
    /// peer awaits its lock ([`super::peer`]).
    _awaiting: std::fs::File,
}

/// The names descriptors go by in [`HandoverWorkload::fds`].
const NETNS: &str = "netns";

/// Where each named descriptor of a handed-over workload goes.
fn sort_descriptors(id: &str, names: &[String], fds: Vec<OwnedFd>) -> anyhow::Result<Handed> {
    anyhow::ensure!(
        fds.len() == names.len(),
        "workload {id}: {} descriptors for {names:?}",
        fds.len()
    );
    let mut netns = None;
    let mut listeners = Vec::new();
    for (name, fd) in names.iter().zip(fds) {
        match name.as_str() {
            NETNS => netns = Some(fd),
            other => match Side::from_name(other) {
                Some(side) => listeners.push((side, fd)),
                None => anyhow::bail!("unknown descriptor '{other}' in a handover"),
            },
        }
    }
    let netns = netns.with_context(|| format!("workload {id}: no namespace in the handover"))?;
    Ok(Handed { netns, listeners })
}

/// Asks a running predecessor of instance `name` to hand over. `None`: nobody answers on the
/// socket. With `want_metrics`, it also asks for the predecessor's metrics listener.
pub(crate) fn receive(socket: &Path, name: &str, want_metrics: bool) -> anyhow::Result<Option<Handover>> {
    let Ok(stream) = UnixStream::connect(socket) else {
        return Ok(None);
    };
    // Opened once somebody answers, before the ask: a start refused later (a busy ZDS socket,
    // a taken port) must not leave a lock file where there was none.
    let awaiting = super::pins::open_lock(name).context("opening the instance lock")?;
    let timeout = Some(Duration::from_secs(30));
    stream.set_read_timeout(timeout)?;
    stream.set_write_timeout(timeout)?;
    let mut line = serde_json::to_vec(&Request::Handover)?;
    line.push(b'\n');
    (&stream).write_all(&line)?;
    let answer: Response = serde_json::from_slice(&redirect_api::read_line(&stream)?)?;
    let list = match answer {
        Response::Handover(list) => list,
        Response::Error(e) => anyhow::bail!("the running agent refused to hand over: {e}"),
        other => anyhow::bail!("unexpected answer to a handover: {other:?}"),
    };
    // Descriptors only after this: nothing of them can sit unread behind the answer.
    (&stream).write_all(b"ready\n")?;
    let mut infos = Vec::new();
    let mut handed = BTreeMap::new();
    for HandoverWorkload { info, fds: names } in list {
        let fds = sys::recv_fds(&stream).with_context(|| format!("descriptors of workload {}", info.id))?;
        handed.insert(info.id.clone(), sort_descriptors(&info.id, &names, fds)?);
        infos.push(info);
    }
    let mut metrics = None;
    if want_metrics {
        (&stream).write_all(format!("{METRICS}\n").as_bytes())?;
        // One message, with the listener or without any descriptor; read as a message and not
        // as a line, so that no descriptor is dropped with buffered bytes.
        metrics = sys::recv_fds(&stream)
            .context("asking for the metrics listener")?
            .into_iter()
            .next();
    }
    Ok(Some(Handover {
        infos,
        handed,
        metrics,
        predecessor: stream,
        _awaiting: awaiting,
    }))
}

/// The successor's ask for the metrics listener (answered with one message of [`sys::send_fds`],
/// holding it or nothing).
const METRICS: &str = "metrics";

impl Handover {
    /// Tells the predecessor that this process serves the workloads now, and waits for it to
    /// stop serving them (its answer comes once it has).
    pub(crate) fn confirm(self) -> anyhow::Result<()> {
        (&self.predecessor)
            .write_all(b"serving\n")
            .context("confirming the handover")?;
        let bye = redirect_api::read_line(&self.predecessor).context("waiting for the predecessor to stop")?;
        anyhow::ensure!(
            bye == b"bye",
            "the predecessor answered {:?} to the takeover (it serves on)",
            String::from_utf8_lossy(&bye)
        );
        Ok(())
    }
}

/// What a start with no live predecessor does with what a stopped one left.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Adoption {
    /// Its pins and state: serve its workloads again.
    Adopt(Vec<WorkloadInfo>),
    /// Pins without a state: nobody can say whose they are; start afresh.
    RemovePins,
    /// Nothing was left.
    Fresh,
}

/// Decides [`Adoption`] from the state file and the pins; pins attached elsewhere than this
/// start's attach point are refused (moving them would leave workloads uncaptured).
pub(crate) fn adoption(
    name: &str,
    state: Option<super::pins::State>,
    pins_exist: bool,
    attach: &Path,
) -> anyhow::Result<Adoption> {
    match (state, pins_exist) {
        // A `run` of this name that was killed: its pins serve nobody.
        (Some(state), true) if state.mode == super::pins::Mode::Run => Ok(Adoption::RemovePins),
        (Some(state), true) if state.cgroup_parent != attach => anyhow::bail!(
            "the pinned programs of '{name}' are attached at {}, not {}: run `redirect-agent cleanup --name {name}` \
             to move them",
            state.cgroup_parent.display(),
            attach.display(),
        ),
        (Some(state), true) => Ok(Adoption::Adopt(state.workloads)),
        (None, true) => Ok(Adoption::RemovePins),
        (_, false) => Ok(Adoption::Fresh),
    }
}

/// What a predecessor hands: the list, and second descriptors of everything in it, taken
/// under the engine's lock and sent without it.
pub(crate) struct Offer {
    list: Vec<HandoverWorkload>,
    fds: Vec<Vec<OwnedFd>>,
}

/// How long a successor may take to say it is ready for the descriptors (to say it serves:
/// `--handover-timeout-secs`, [`super::Sizing::handover_within`]).
const READY_WITHIN: Duration = Duration::from_secs(10);

impl Engine {
    /// How long a successor may take to say it serves.
    pub(crate) fn handover_within(&self) -> Duration {
        self.settings.sizing.handover_within
    }

    /// Starts a handover: one at a time, and from now until it ends, no workload changes (the
    /// successor is given them as they are now).
    pub(crate) fn begin_handover(&mut self) -> Result<Offer, EnrollError> {
        if self.handed_over {
            return Err(EnrollError::HandedOver);
        }
        if self.handing_over {
            return Err(EnrollError::HandoverInProgress);
        }
        let dup = |fd: BorrowedFd<'_>| fd.try_clone_to_owned().map_err(EnrollError::io("a handed descriptor"));
        let mut list = Vec::new();
        let mut fds = Vec::new();
        for w in self.workloads.values() {
            let mut names = vec![NETNS.to_owned()];
            let mut these = vec![dup(w.netns.as_fd())?];
            for (side, fd) in &w.listener_fds {
                names.push(side.name().to_owned());
                these.push(dup(fd.as_fd())?);
            }
            list.push(HandoverWorkload {
                info: w.info.clone(),
                fds: names,
            });
            fds.push(these);
        }
        self.handing_over = true;
        Ok(Offer { list, fds })
    }

    /// Ends a handover: `taken`, the successor serves and this process changes nothing more.
    pub(crate) fn end_handover(&mut self, taken: bool) {
        self.handing_over = false;
        self.handed_over = taken;
    }

    /// Whether the peer `pid` moved every cgroup link to programs of its own.
    pub(crate) fn check_successor(&self, pid: u32) -> Result<(), super::peer::Refusal> {
        let links: Vec<BorrowedFd<'_>> = self.cgroup_links.iter().map(|l| l.as_fd()).collect();
        let own: Vec<u32> = self.object.program_ids().into_values().collect();
        super::peer::attached_by(pid, &links, &own)
    }

    /// After a handover that did not complete: every link runs this process's programs again
    /// and the pins say so (a successor may have moved them before it failed).
    pub(crate) fn reclaim(&mut self) -> Result<(), LoadError> {
        for ((prog, _), link) in super::CGROUP_LINKS.iter().zip(&self.cgroup_links) {
            links::update(link.as_fd(), self.object.program_fd(prog)?).map_err(|source| LoadError::Link {
                what: format!("moving the {prog} link back to this agent's program"),
                source,
            })?;
        }
        let dir = super::pins::links_dir(&self.settings.name);
        for w in self.workloads.values() {
            let pin = dir.join(format!("sk_lookup-{}", w.info.netns_cookie));
            if let Ok(link) = links::open_pinned(&pin) {
                links::update(link.as_fd(), w.sk_lookup_program.fd()?).map_err(|source| LoadError::Link {
                    what: format!("moving {} back to this agent's program", pin.display()),
                    source,
                })?;
            }
        }
        for v in self.workloads.values().filter_map(|w| w.virt.as_ref()) {
            v.reclaim()?;
        }
        if self.settings.sizing.fast_path {
            self.object.attach_fast_path()?;
        }
        self.pin_programs()
    }

    /// The instance lock's file, to check a successor against; `None` if this process does
    /// not hold it (then it has nothing to hand over).
    pub(crate) fn lock_file(&self) -> Option<std::fs::File> {
        self.lock.as_ref().and_then(|l| l.file().try_clone().ok())
    }

    /// Lets go of the lock, for a successor to take.
    pub(crate) fn release_lock(&mut self) {
        drop(self.lock.take());
    }
}

/// One line (without its newline) that must arrive whole by `deadline`: a client that sends
/// slowly is cut off like one that sends nothing. Read a byte at a time, so that nothing after
/// the line (descriptors of a handover) is taken from the stream.
pub(crate) fn read_line_by(stream: &UnixStream, deadline: Instant, max: usize) -> std::io::Result<Vec<u8>> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no whole line in time",
            ));
        }
        stream.set_read_timeout(Some(left))?;
        match std::io::Read::read(&mut &*stream, &mut byte) {
            Ok(0) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "connection closed before a whole request",
                ));
            }
            Ok(_) if byte[0] == b'\n' => return Ok(line),
            Ok(_) if line.len() >= max => {
                return Err(std::io::Error::other(format!("a line longer than {max} bytes")));
            }
            Ok(_) => line.push(byte[0]),
            // The read timed out: the deadline above says so.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::Interrupted | std::io::ErrorKind::WouldBlock
                ) => {}
            Err(e) => return Err(e),
        }
    }
}

/// The predecessor's side of the exchange, on the successor's connection, without the
/// engine's lock: the list, (once the successor is ready for them) each workload's
/// descriptors, the metrics listener if asked for, then the successor's word that it serves.
/// `sent` says whether descriptors went out (after which the successor may have moved links).
pub(crate) fn offer(
    stream: &UnixStream,
    offer: Offer,
    metrics: Option<BorrowedFd<'_>>,
    serving_within: Duration,
    sent: &mut bool,
) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_write_timeout(Some(READY_WITHIN))?;
    let mut line = serde_json::to_vec(&Response::Handover(offer.list))?;
    line.push(b'\n');
    (&*stream).write_all(&line)?;
    // Words are read a byte at a time: one that follows another at once must not be taken
    // into a buffer and lost.
    let word = |within: Duration| read_line_by(stream, Instant::now() + within, 64);
    if word(READY_WITHIN)? != b"ready" {
        return Err(std::io::Error::other("the successor did not say it was ready"));
    }
    *sent = true;
    for fds in &offer.fds {
        let fds: Vec<BorrowedFd<'_>> = fds.iter().map(|f| f.as_fd()).collect();
        sys::send_fds(stream, &fds)?;
    }
    let mut said = word(serving_within)?;
    if said == METRICS.as_bytes() {
        match metrics {
            Some(fd) => sys::send_fds(stream, &[fd])?,
            // The same one-byte message, without descriptors.
            None => drop(rustix::net::send(stream, b"N", rustix::net::SendFlags::NOSIGNAL)?),
        }
        said = word(serving_within)?;
    }
    if said != b"serving" {
        return Err(std::io::Error::other(format!(
            "the successor answered {:?}",
            String::from_utf8_lossy(&said)
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fds(n: usize) -> Vec<OwnedFd> {
        (0..n)
            .map(|_| std::fs::File::open("/dev/null").unwrap().into())
            .collect()
    }

    fn names(n: &[&str]) -> Vec<String> {
        n.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn handed_descriptors_go_where_their_names_say() {
        let h = sort_descriptors("a", &names(&["netns", "outbound", "inbound"]), fds(3)).unwrap();
        let sides: Vec<Side> = h.listeners.iter().map(|(s, _)| *s).collect();
        assert_eq!(sides, [Side::Outbound, Side::Inbound]);
        // A workload whose own proxy listens hands over its namespace alone.
        assert!(
            sort_descriptors("b", &names(&["netns"]), fds(1))
                .unwrap()
                .listeners
                .is_empty()
        );
    }

    fn state(attach: &str, ids: &[&str]) -> super::super::pins::State {
        let w = |id: &&str| WorkloadInfo {
            id: id.to_string(),
            netns: "/run/netns/x".into(),
            netns_cookie: 1,
            cgroup: None,
            proxy: "embedded".into(),
            args: Vec::new(),
            fast_path: false,
            slot: 0,
            addresses: Vec::new(),
            interfaces: Vec::new(),
            pod: None,
        };
        super::super::pins::State {
            name: "node".into(),
            pid: 1,
            mode: super::super::pins::Mode::Node,
            layout: String::new(),
            cgroup_parent: attach.into(),
            socket: None,
            metrics: None,
            programs: BTreeMap::new(),
            workloads: ids.iter().map(w).collect(),
        }
    }

    #[test]
    fn a_stopped_agents_pins_are_adopted_only_where_they_are_attached() {
        let root = Path::new("/sys/fs/cgroup");
        let adopted = adoption("node", Some(state("/sys/fs/cgroup", &["a"])), true, root).unwrap();
        assert!(matches!(adopted, Adoption::Adopt(w) if w.len() == 1 && w[0].id == "a"));
        let e = adoption("node", Some(state("/sys/fs/cgroup/k8s", &["a"])), true, root).unwrap_err();
        assert!(e.to_string().contains("cleanup --name node"), "{e}");
        assert_eq!(adoption("node", None, true, root).unwrap(), Adoption::RemovePins);
        let mut killed_run = state("/sys/fs/cgroup/pod", &["default"]);
        killed_run.mode = super::super::pins::Mode::Run;
        assert_eq!(
            adoption("node", Some(killed_run), true, root).unwrap(),
            Adoption::RemovePins
        );
        // A state without pins describes nothing the kernel still runs.
        assert_eq!(
            adoption("node", Some(state("/x", &["a"])), false, root).unwrap(),
            Adoption::Fresh
        );
        assert_eq!(adoption("node", None, false, root).unwrap(), Adoption::Fresh);
    }

    #[test]
    fn a_handover_that_does_not_add_up_is_refused() {
        let e = sort_descriptors("a", &names(&["netns", "outbound"]), fds(1))
            .err()
            .unwrap();
        assert!(e.to_string().contains("1 descriptors"), "{e}");
        let e = sort_descriptors("a", &names(&["outbound"]), fds(1)).err().unwrap();
        assert!(e.to_string().contains("no namespace"), "{e}");
        let e = sort_descriptors("a", &names(&["netns", "udp"]), fds(2)).err().unwrap();
        assert!(e.to_string().contains("'udp'"), "{e}");
    }
}
