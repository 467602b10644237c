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
        fd::{AsFd as _, OwnedFd},
        unix::net::UnixStream,
    },
    path::Path,
    time::Duration,
};

use anyhow::Context as _;
use redirect_api::{HandoverWorkload, Request, Response, WorkloadInfo};

use super::Engine;
use crate::{proxy::Side, sys};

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
    predecessor: UnixStream,
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
            n if n == Side::Outbound.name() => listeners.push((Side::Outbound, fd)),
            n if n == Side::Inbound.name() => listeners.push((Side::Inbound, fd)),
            other => anyhow::bail!("unknown descriptor '{other}' in a handover"),
        }
    }
    let netns = netns.with_context(|| format!("workload {id}: no namespace in the handover"))?;
    Ok(Handed { netns, listeners })
}

/// Asks a running predecessor to hand over. `None`: nobody answers on the socket.
pub(crate) fn receive(socket: &Path) -> anyhow::Result<Option<Handover>> {
    let Ok(stream) = UnixStream::connect(socket) else {
        return Ok(None);
    };
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
    Ok(Some(Handover {
        infos,
        handed,
        predecessor: stream,
    }))
}

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
            "the predecessor answered {:?} to the takeover",
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

impl Engine {
    /// The predecessor's side: the answer, then (once the successor is ready for them) each
    /// workload's descriptors, then its word that it serves them. Until that word this process
    /// keeps serving (both accept from the same queues meanwhile), so a successor that fails
    /// to start costs nothing: `Ok(false)`, and this process goes on. `Ok(true)`: from now on
    /// this process changes nothing.
    pub(crate) fn hand_over(&mut self, stream: UnixStream) -> std::io::Result<bool> {
        stream.set_nonblocking(false)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let list: Vec<HandoverWorkload> = self
            .workloads
            .values()
            .map(|w| {
                let mut fds = vec![NETNS.to_owned()];
                fds.extend(w.listener_fds.iter().map(|(s, _)| s.name().to_owned()));
                HandoverWorkload {
                    info: w.info.clone(),
                    fds,
                }
            })
            .collect();
        let mut line = serde_json::to_vec(&Response::Handover(list))?;
        line.push(b'\n');
        (&stream).write_all(&line)?;
        if redirect_api::read_line(&stream)? != b"ready" {
            return Err(std::io::Error::other("successor did not confirm"));
        }
        for w in self.workloads.values() {
            let mut fds = vec![w.netns.as_fd()];
            fds.extend(w.listener_fds.iter().map(|(_, fd)| fd.as_fd()));
            sys::send_fds(&stream, &fds)?;
        }
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        let taken = match redirect_api::read_line(&stream) {
            Ok(word) if word == b"serving" => {
                (&stream).write_all(b"bye\n")?;
                true
            }
            Ok(other) => {
                tracing::error!(answer = %String::from_utf8_lossy(&other), "the successor did not take over; serving on");
                false
            }
            Err(e) => {
                tracing::error!("the successor did not take over ({e}); serving on");
                false
            }
        };
        self.handed_over = taken;
        Ok(taken)
    }
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
