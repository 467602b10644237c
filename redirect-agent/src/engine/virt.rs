//! `-k` devices (a KubeVirt VM's): the workload's tc programs attached to each device its `-k`
//! entries name, as devices come and go, and the addresses their REDIRECT sends to.
//!
//! iptables names a device in a rule and the rule applies whenever a device of that name
//! exists; a VM's device typically appears after the pod started. So the attachments follow
//! the address watcher ([`crate::addrs::VirtDevices`]): each `-k` device present gets its
//! `VIRT_IFACES` entry (written first: the programs pass over a device without one), then
//! ingress and egress; a device that goes takes its attachments with it.
//!
//! How they attach and outlive the agent, which the kernel decides:
//! - Linux 6.6+: tcx links, pinned next to the workload's sk_lookup link when the instance
//!   keeps its pins (capture survives a killed agent, fail-closed) and moved to a successor's
//!   programs in place (`BPF_LINK_UPDATE`);
//! - before: cls_bpf filters on a clsact qdisc, at a fixed priority and handle, which the
//!   kernel keeps until deleted (so a killed agent's keep capturing too) and which a successor
//!   replaces in place.
//!
//! Removed at unenroll and at the end of an instance that keeps nothing; left for the
//! successor otherwise ([`VirtCapture::release`]).

use std::{
    collections::BTreeMap,
    io,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use aya::{
    maps::{HashMap, MapData},
    programs::{
        LinkOrder, SchedClassifier, TcAttachType,
        links::{FdLink, PinnedLink},
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcError, TcHandle},
    },
};
use redirect_common::{IfaceKey, TupleKey, VirtFlow, VirtFlowKey, VirtIface, addr, maps as names, programs};

use super::object::VirtInstance;
use crate::{
    addrs::{VirtDevice, VirtDevices, remove_keys},
    error::LoadError,
    sys::Netns,
};

/// cls_bpf's priority and handle for the filters (before 6.6): fixed, so that a successor
/// finds and replaces its predecessor's, and `tc filter show` tells them apart.
const NL_PRIORITY: u16 = 1;
const NL_HANDLE: TcHandle = TcHandle::new(0, 0x5244);

/// Ethernet's header, before the IP one in what tc sees on such a device.
const ETH_HLEN: u32 = 14;

/// One direction's attachment to one device.
enum Attachment {
    /// tcx (6.6+): the link, and its pin when the instance keeps its pins.
    Tcx { link: FdLink, pin: Option<PathBuf> },
    /// cls_bpf (before 6.6): the filter, which aya deletes when the link is dropped.
    Netlink(SchedClassifierLink),
}

struct Attached {
    name: String,
    ingress: Attachment,
    egress: Attachment,
}

impl Attached {
    /// The tcx links, to move to other programs; a cls_bpf filter is found again by its
    /// priority and handle, and its handle must not delete it on the way.
    fn into_held(self) -> [Option<FdLink>; 2] {
        [self.ingress, self.egress].map(|x| match x {
            Attachment::Tcx { link, .. } => Some(link),
            Attachment::Netlink(link) => {
                std::mem::forget(link);
                None
            }
        })
    }
}

/// A workload's `-k` capture: shared by the address watcher (which attaches as devices come
/// and go) and the engine (which removes or releases it with the workload).
#[derive(Clone)]
pub(crate) struct SharedVirt(Arc<Mutex<VirtCapture>>);

/// The maps a capture writes, and the one that says whether its workload is enrolled again.
pub(crate) struct VirtMaps {
    pub(crate) devices: HashMap<MapData, IfaceKey, VirtIface>,
    pub(crate) flows: HashMap<MapData, TupleKey, VirtFlow>,
    pub(crate) replies: HashMap<MapData, VirtFlowKey, VirtFlow>,
    pub(crate) workloads: HashMap<MapData, u64, redirect_common::Workload>,
}

/// Why a capture goes, which says how to tell that another has taken its place since.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Removal {
    /// Unenrolled: the namespace may be enrolled again (by this process) during the drain.
    Unenrolled,
    /// Its instance stopped: another process may have taken the instance's name since.
    Stopped,
}

pub(crate) struct VirtCapture {
    programs: VirtInstance,
    netns: Netns,
    netns_cookie: u64,
    maps: VirtMaps,
    /// The instance's name, whose lock a successor holds.
    instance: String,
    attached: BTreeMap<u32, Attached>,
    /// Where tcx links are pinned (`virt-COOKIE-IFINDEX-DIRECTION`); `None`: not pinned.
    pin_dir: Option<PathBuf>,
    tcx: bool,
    /// Left for a successor: dropping detaches nothing.
    released: bool,
    /// Removed already (at unenroll or a run's end): dropping does nothing more.
    removed: bool,
    /// The devices whose `VIRT_IFACES` entry this capture wrote.
    written: std::collections::BTreeSet<u32>,
    /// TPROXY mode's route table: each device gets its rule delivering the VM's TPROXYed
    /// connections locally (`tproxy_route::divert_device`), removed with the TPROXY routing.
    divert_table: Option<u32>,
}

impl SharedVirt {
    fn new(
        programs: VirtInstance,
        netns: Netns,
        netns_cookie: u64,
        maps: VirtMaps,
        (instance, pin_dir, tcx, divert_table): (String, Option<PathBuf>, bool, Option<u32>),
    ) -> Self {
        Self(Arc::new(Mutex::new(VirtCapture {
            programs,
            netns,
            netns_cookie,
            maps,
            instance,
            attached: BTreeMap::new(),
            pin_dir,
            tcx,
            released: false,
            removed: false,
            written: std::collections::BTreeSet::new(),
            divert_table,
        })))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VirtCapture> {
        // A panic while attaching leaves nothing half-written that a later call could not
        // redo: every call re-reads the devices.
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Detaches from every device and forgets the workload's devices and flows, unless
    /// another capture took its place since (then all of that is the other's, and this one
    /// only lets go of its handles).
    pub(crate) fn remove(&self, why: Removal) {
        let mut me = self.lock();
        let cookie = me.netns_cookie;
        let taken_over = match why {
            Removal::Unenrolled => me.maps.workloads.get(&cookie, 0).is_ok(),
            Removal::Stopped => super::pins::is_locked(&me.instance),
        };
        if taken_over {
            tracing::info!(
                netns_cookie = cookie,
                "-k devices taken over by a newer enrollment: left to it"
            );
            me.released = true;
        } else {
            me.remove();
        }
    }

    /// Leaves the attachments (and pins) for a successor, which replaces them in place.
    pub(crate) fn release(&self) {
        self.lock().released = true;
    }

    /// After a handover that did not complete: this process's programs on every device again
    /// (a successor may have moved the attachments to its own before it failed).
    pub(crate) fn reclaim(&self) -> Result<(), LoadError> {
        let mut me = self.lock();
        for (ifindex, a) in std::mem::take(&mut me.attached) {
            let name = a.name.clone();
            let held = a.into_held();
            let a = me.attach(ifindex, &name, held).map_err(|source| LoadError::Link {
                what: format!("moving the tc programs of {name} back to this agent's"),
                source,
            })?;
            me.attached.insert(ifindex, a);
        }
        Ok(())
    }
}

impl VirtDevices for SharedVirt {
    fn devices(&mut self, devices: &[VirtDevice]) -> io::Result<()> {
        self.lock().follow(devices)
    }
}

impl VirtCapture {
    /// Attaches to the devices that are new, updates every present device's
    /// addresses, and lets go of those gone.
    fn follow(&mut self, devices: &[VirtDevice]) -> io::Result<()> {
        let mut first_error = None;
        for d in devices {
            let ifindex = d.link.ifindex;
            let addr_of = |ip: Option<IpAddr>| ip.map(addr::from_ip);
            let entry = VirtIface::new(addr_of(d.v4), addr_of(d.v6), if d.link.ether { ETH_HLEN } else { 0 });
            let key = IfaceKey::new(self.netns_cookie, ifindex);
            if self.maps.devices.get(&key, 0).ok() != Some(entry) {
                self.maps.devices.insert(key, entry, 0).map_err(io::Error::other)?;
                self.written.insert(ifindex);
                tracing::info!(
                    device = d.link.name,
                    ifindex,
                    v4 = ?d.v4,
                    v6 = ?d.v6,
                    "-k device: REDIRECT addresses"
                );
            }
            // Attached already (under another name, if renamed: the device is the same, but
            // the divert rule names it, and the kernel unbinds a rule from a renamed device).
            if let Some(a) = self.attached.get_mut(&ifindex) {
                if a.name != d.link.name
                    && let Some(table) = self.divert_table
                    && let Err(e) = crate::tproxy_route::divert_device(&self.netns, &d.link.name, table)
                {
                    tracing::error!(device = d.link.name, "-k device renamed: {e}");
                    first_error.get_or_insert(io::Error::other(e.to_string()));
                }
                a.name.clone_from(&d.link.name);
                continue;
            }
            // The rule before the programs: a packet they mark must already route locally.
            if let Some(table) = self.divert_table
                && let Err(e) = crate::tproxy_route::divert_device(&self.netns, &d.link.name, table)
            {
                tracing::error!(device = d.link.name, "-k device: {e}");
                first_error.get_or_insert(io::Error::other(e.to_string()));
                continue;
            }
            match self.attach(ifindex, &d.link.name, [None, None]) {
                Ok(a) => {
                    tracing::info!(
                        device = d.link.name,
                        ifindex,
                        tcx = self.tcx,
                        "-k device: tc programs attached"
                    );
                    self.attached.insert(ifindex, a);
                }
                Err(e) => {
                    tracing::error!(device = d.link.name, "-k device: attaching the tc programs: {e}");
                    first_error.get_or_insert(e);
                }
            }
        }
        let gone: Vec<u32> = self
            .attached
            .keys()
            .filter(|i| !devices.iter().any(|d| d.link.ifindex == **i))
            .copied()
            .collect();
        for ifindex in gone {
            if let Some(a) = self.attached.remove(&ifindex) {
                tracing::info!(device = a.name, ifindex, "-k device gone");
                self.forget_device(ifindex, a);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    fn forget_device(&mut self, ifindex: u32, a: Attached) {
        for pin in [&a.ingress, &a.egress].into_iter().filter_map(|x| match x {
            Attachment::Tcx { pin, .. } => pin.as_ref(),
            Attachment::Netlink(_) => None,
        }) {
            let _ = std::fs::remove_file(pin);
        }
        // aya deletes a cls_bpf filter when its handle drops, over netlink by device index:
        // that index is the workload namespace's, so it drops there.
        if let Err(e) = self.netns.run(move || {
            drop(a);
            Ok(())
        }) {
            tracing::warn!(ifindex, "detaching the tc programs of a -k device: {e}");
        }
        let _ = self.maps.devices.remove(&IfaceKey::new(self.netns_cookie, ifindex));
        self.written.remove(&ifindex);
    }

    /// Both directions on device `name` (index `ifindex`), in the workload's namespace;
    /// `held`: this process's tcx links there already (ingress, egress), moved instead.
    fn attach(&mut self, ifindex: u32, name: &str, held: [Option<FdLink>; 2]) -> io::Result<Attached> {
        let pin = |dir: &str| {
            self.pin_dir
                .as_ref()
                .map(|d| d.join(format!("virt-{}-{ifindex}-{dir}", self.netns_cookie)))
        };
        let (pin_in, pin_eg) = (pin("ingress"), pin("egress"));
        let tcx = self.tcx;
        let netns = self.netns.try_clone()?;
        let [held_in, held_eg] = held;
        let (ingress, egress) = self.programs.both_mut().map_err(io::Error::other)?;
        // Both directions in one visit to the namespace, or neither: ingress alone would send
        // the VM's connections to the proxy with no way back. A failed egress takes ingress's
        // attachment down there too (a cls_bpf filter is deleted by the namespace's ifindex).
        let (ingress, egress) = netns.run(|| {
            let ingress = attach_one(ingress, name, TcAttachType::Ingress, pin_in.as_deref(), tcx, held_in)?;
            match attach_one(egress, name, TcAttachType::Egress, pin_eg.as_deref(), tcx, held_eg) {
                Ok(egress) => Ok((ingress, egress)),
                Err(e) => {
                    if let Attachment::Tcx { pin: Some(pin), .. } = &ingress {
                        let _ = std::fs::remove_file(pin);
                    }
                    drop(ingress);
                    Err(e)
                }
            }
        })?;
        Ok(Attached {
            name: name.to_owned(),
            ingress,
            egress,
        })
    }

    /// Once: what this capture attached and wrote, and the namespace's flows (a killed
    /// predecessor's pins are [`super::Engine::purge`]'s).
    fn remove(&mut self) {
        if std::mem::replace(&mut self.removed, true) {
            return;
        }
        for (ifindex, a) in std::mem::take(&mut self.attached) {
            self.forget_device(ifindex, a);
        }
        for ifindex in std::mem::take(&mut self.written) {
            let _ = self.maps.devices.remove(&IfaceKey::new(self.netns_cookie, ifindex));
        }
        let cookie = self.netns_cookie;
        remove_keys(&mut self.maps.flows, |k| k.netns_cookie == cookie);
        remove_keys(&mut self.maps.replies, |k| k.netns_cookie == cookie);
        // Every device's, renamed or gone ones' too (here, not with the TPROXY routing: this
        // is skipped when a newer capture took the namespace over, whose rules they are).
        if let Some(table) = self.divert_table
            && let Err(e) = crate::tproxy_route::remove_divert_rules(&self.netns, table)
        {
            tracing::warn!("{e}");
        }
    }
}

/// Removed unless released: a workload that failed to start, or went, leaves nothing.
impl Drop for VirtCapture {
    fn drop(&mut self) {
        if !self.released {
            self.remove();
        } else {
            // What is attached stays: cls_bpf filters are the kernel's until deleted, pinned
            // tcx links the pins'; the aya handles must not detach them on their way out.
            for (_, a) in std::mem::take(&mut self.attached) {
                let _ = a.into_held();
            }
        }
    }
}

/// Removes the tcx link pins of the workload `netns_cookie` in `dir`: a link nothing else holds
/// is detached with its last pin.
pub(crate) fn remove_pins(dir: &Path, netns_cookie: u64) {
    let prefix = format!("virt-{netns_cookie}-");
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_name().to_string_lossy().starts_with(&prefix) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Attaches `prog` to device `dev` of the calling thread's namespace, in place of an
/// attachment there already (`held`, this process's; else a predecessor's) where there is one.
fn attach_one(
    prog: &mut SchedClassifier,
    dev: &str,
    direction: TcAttachType,
    pin: Option<&Path>,
    tcx: bool,
    held: Option<FdLink>,
) -> io::Result<Attachment> {
    if tcx {
        // A link on this device already: moved to this program without a gap.
        let existing = held.or_else(|| pin.and_then(|p| PinnedLink::from_pin(p).ok()).map(FdLink::from));
        if let Some(old) = existing {
            let moved = SchedClassifierLink::try_from(old)
                .map_err(io::Error::other)
                .and_then(|link| prog.attach_to_link(link).map_err(io::Error::other))
                .and_then(|id| prog.take_link(id).map_err(io::Error::other))
                .and_then(|link| FdLink::try_from(link).map_err(io::Error::other));
            match moved {
                Ok(link) => {
                    return Ok(Attachment::Tcx {
                        link,
                        pin: pin.map(Path::to_owned),
                    });
                }
                // Its device is gone (a link outlives it, detached): a new one below.
                Err(e) => {
                    tracing::debug!(dev, "not moving the tc link there: {e}");
                    if let Some(pin) = pin {
                        let _ = std::fs::remove_file(pin);
                    }
                }
            }
        }
        let id = prog
            .attach_with_options(dev, direction, TcAttachOptions::TcxOrder(LinkOrder::default()))
            .map_err(io::Error::other)?;
        let link = FdLink::try_from(prog.take_link(id).map_err(io::Error::other)?).map_err(io::Error::other)?;
        let link = match pin {
            Some(path) => FdLink::from(link.pin(path).map_err(io::Error::other)?),
            None => link,
        };
        return Ok(Attachment::Tcx {
            link,
            pin: pin.map(Path::to_owned),
        });
    }
    // Already there (another filter's, or a predecessor's): fine, the filter goes on it.
    let _ = tc::qdisc_add_clsact(dev);
    let options = || {
        TcAttachOptions::Netlink(NlOptions {
            priority: NL_PRIORITY,
            handle: NL_HANDLE,
            classid: None,
        })
    };
    let id = match prog.attach_with_options(dev, direction, options()) {
        Ok(id) => id,
        // A predecessor's filter: replaced in place.
        Err(aya::programs::ProgramError::TcError(TcError::NetlinkError(e)))
            if e.raw_os_error() == Some(libc::EEXIST) =>
        {
            let old = SchedClassifierLink::attached(dev, direction, NL_PRIORITY, NL_HANDLE, None)?;
            prog.attach_to_link(old).map_err(io::Error::other)?
        }
        Err(e) => return Err(io::Error::other(e)),
    };
    Ok(Attachment::Netlink(prog.take_link(id).map_err(io::Error::other)?))
}

impl super::Engine {
    /// The `-k` capture of the workload whose namespace is `netns`, when its flags name `-k`
    /// devices: its tc programs loaded, attached by the address watcher as devices appear.
    pub(super) fn virt_capture(
        &self,
        capture: &redirect_common::config::CaptureConfig,
        netns: &Netns,
        netns_cookie: u64,
    ) -> Result<Option<SharedVirt>, super::EnrollError> {
        if capture.kube_virt_interfaces.is_empty() {
            return Ok(None);
        }
        let tcx = aya::util::KernelVersion::current().is_ok_and(|v| v >= aya::util::KernelVersion::new(6, 6, 0));
        // Before 6.6 the programs are cls_bpf filters, which the kernel keeps until deleted:
        // they would outlive a killed --fail-open agent and refuse the VM's connections.
        if !self.settings.keep_links && !tcx {
            return Err(super::EnrollError::Flags(format!(
                "-k with --fail-open needs Linux 6.6 or later (tcx links, which end with the agent; before 6.6 \
                 the tc filters outlive it and would keep refusing the VM's connections); this kernel is {}",
                crate::features::kernel_string()
            )));
        }
        let programs = self.object.virt_for(netns_cookie)?;
        let maps = VirtMaps {
            devices: self.open_map(names::VIRT_IFACES)?,
            flows: self.open_map(names::VIRT_FLOWS)?,
            replies: self.open_map(names::VIRT_REPLIES)?,
            workloads: self.open_map(names::WORKLOADS)?,
        };
        let netns = netns
            .try_clone()
            .map_err(super::EnrollError::io("namespace descriptor"))?;
        let pin_dir = self
            .settings
            .keep_links
            .then(|| super::pins::links_dir(&self.settings.name));
        let divert_table = (capture.inbound_mode == redirect_common::config::InterceptionMode::Tproxy)
            .then_some(capture.tproxy.route_table);
        let how = (self.settings.name.clone(), pin_dir, tcx, divert_table);
        Ok(Some(SharedVirt::new(programs, netns, netns_cookie, maps, how)))
    }
}

/// `--cleanup-only`: deletes the cls_bpf filters (before 6.6) a killed agent left on the
/// namespace's devices, found by their programs' names; tcx links go with their pins. Returns
/// how many devices had one.
pub(crate) fn cleanup(netns: &Netns) -> io::Result<usize> {
    let devices = crate::addrs::links(netns)?;
    netns.run(|| {
        let mut cleaned = 0;
        for dev in devices.iter().map(|l| l.name.clone()) {
            let mut had = false;
            for (direction, prog) in [
                (TcAttachType::Ingress, programs::VIRT_INGRESS),
                (TcAttachType::Egress, programs::VIRT_EGRESS),
            ] {
                match tc::qdisc_detach_program(&dev, direction, prog) {
                    Ok(()) => had = true,
                    Err(TcError::IoError(e)) if e.kind() == io::ErrorKind::NotFound => {}
                    // No clsact qdisc: nothing was ever attached there this way.
                    Err(TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EINVAL) => {}
                    Err(e) => return Err(io::Error::other(format!("removing {prog} from {dev}: {e}"))),
                }
            }
            cleaned += usize::from(had);
        }
        Ok(cleaned)
    })
}
