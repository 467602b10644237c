//! Enrolling and removing workloads: every check before anything changes, then the steps
//! that make one live, in the order that keeps a failure part-way invisible to connections.

use std::{
    os::fd::OwnedFd,
    path::{Path, PathBuf},
};

use redirect_api::{PodRef, WorkloadInfo};
use redirect_common::{
    MAX_WORKLOADS,
    chain::{self, Compiled},
    config::{CaptureConfig, InboundPath},
    events, maps,
};

use super::{
    Engine, EnrollError,
    admit::{free_slot, is_under, valid_id},
    object::{InboundListener, SkLookupInstance, adopt_listener, open_typed},
    pins::{self, Mode},
};
use crate::{
    addrs::{self, AddrMaps, LocalAddrs, ModeAddrs, NodeProbes, VirtDevices},
    flags::ProxyMode,
    proxy::{
        AgentSockets, CgroupDialer, ChildSpec, Dialer, DnsUpstream, FastPath, FastPathSockets, InboundDial,
        LISTEN_BACKLOG, Listeners, Listening, NetnsDialer, OrigDstTable, OriginalDst, Proxy, ProxyConfig, Side,
    },
    sys::{self, Netns},
    tproxy_route::{Policy, TproxyRouting},
};

/// A workload to enroll, its values parsed.
#[derive(Debug, Clone)]
pub(crate) struct Request {
    pub id: String,
    pub netns: PathBuf,
    /// Capture only this cgroup's processes (under the attach point).
    pub cgroup: Option<PathBuf>,
    pub proxy: ProxyMode,
    pub capture: CaptureConfig,
    /// The flags as given, recorded for `list` and for a successor to parse again.
    pub args: Vec<String>,
    pub fast_path: bool,
    /// Its Kubernetes pod, checked: the metrics label its samples with it.
    pub pod: Option<PodRef>,
}

impl Request {
    /// From the control API, parsing the proxy mode and the istio-iptables flags.
    pub(crate) fn from_api(req: redirect_api::Enroll) -> Result<Self, EnrollError> {
        let proxy = ProxyMode::parse(&req.proxy).ok_or_else(|| EnrollError::BadProxy(req.proxy.clone()))?;
        if let Some(pod) = &req.pod {
            pod.check()?;
        }
        let (capture, named) = crate::flags::parse_args(&req.args).map_err(EnrollError::Flags)?;
        // istio-iptables' --network-namespace names the namespace to program: here the
        // enrollment's own, so another one is a contradiction, not a choice.
        if let Some(named) = named
            && !crate::sys::same_file(&named, &req.netns)
        {
            return Err(EnrollError::Flags(format!(
                "--network-namespace {} is not the enrollment's namespace {}: expected the same namespace or no \
                 --network-namespace",
                named.display(),
                req.netns.display()
            )));
        }
        Ok(Self {
            id: req.id,
            netns: req.netns,
            cgroup: req.cgroup,
            proxy,
            capture,
            args: req.args,
            fast_path: req.fast_path,
            pod: req.pod,
        })
    }
}

/// One enrolled workload, live.
pub(super) struct Enrolled {
    pub(super) info: WorkloadInfo,
    pub(super) netns: Netns,
    /// Its sk_lookup link (pinned too, in an instance that keeps its pins).
    _sk_lookup: OwnedFd,
    /// The sk_lookup program instance the link runs (its namespace's cookie built in): what a
    /// handover that did not complete moves the link back to.
    pub(super) sk_lookup_program: SkLookupInstance,
    pub(super) proxy: Option<Proxy>,
    /// Second descriptors of the proxy's listeners, for a handover.
    pub(super) listener_fds: Vec<(Side, OwnedFd)>,
    /// TPROXY mode's policy routing in the namespace: removed with the workload (unenroll, a
    /// run's end), left for the successor at a handover.
    pub(super) tproxy: Option<TproxyRouting>,
    /// `-k`'s tc attachments: like the routing, removed once the proxy drained, left for a
    /// successor.
    pub(super) virt: Option<super::virt::SharedVirt>,
    /// Served with ambient's rules (`--mode ambient`): ztunnel's pod, when it has no proxy here.
    pub(super) ambient: bool,
    _watcher: AbortOnDrop,
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Engine {
    pub(super) fn sk_lookup_pin(&self, netns_cookie: u64) -> PathBuf {
        pins::links_dir(&self.settings.name).join(format!("sk_lookup-{netns_cookie}"))
    }

    pub(super) fn open_map<T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(
        &self,
        name: &'static str,
    ) -> Result<T, EnrollError> {
        Ok(open_typed(&pins::pin_dir(&self.settings.name), name)?)
    }

    /// Enrolls a workload: checked whole first, then made live; a failure part-way removes
    /// whatever it had put in place.
    pub(crate) fn enroll(&mut self, req: Request) -> Result<WorkloadInfo, EnrollError> {
        if self.handed_over {
            return Err(EnrollError::HandedOver);
        }
        if !valid_id(&req.id) {
            return Err(EnrollError::BadId(req.id));
        }
        if self.workloads.contains_key(&req.id) || self.unserved.contains_key(&req.id) {
            return Err(EnrollError::IdTaken(req.id));
        }
        // The descriptor reserve is planned for this many.
        if self.workloads.len() >= self.settings.max_workloads {
            return Err(EnrollError::Full(self.settings.max_workloads));
        }
        let netns = Netns::open(&req.netns).map_err(EnrollError::Path)?;
        let (info, compiled) = self.check(&req, &netns)?;
        let cookie = info.netns_cookie;
        // A chain already in the maps for this namespace is a killed `run`'s, taken over:
        // should serving it fail, it stays (capturing, refused), as it was before this start.
        let took_over = self.maps.workloads.get(&cookie, 0).is_ok();
        match self.start_workload(info, &req.capture, &compiled, netns, None) {
            Ok(w) => {
                if took_over {
                    // The killed run's counters and members this chain has no use for (it ran
                    // other lists): in this run's maps, only its one workload's.
                    self.maps.rules.prune(|_| true);
                }
                let info = w.info.clone();
                tracing::info!(id = %info.id, netns = %info.netns.display(), netns_cookie = cookie, slot = info.slot, "enrolled");
                self.workloads.insert(info.id.clone(), w);
                self.persist();
                Ok(info)
            }
            Err(e) if took_over => {
                tracing::error!(netns_cookie = cookie, "{e}: the killed agent's capture stays (refused)");
                Err(e)
            }
            Err(e) => {
                self.purge(cookie);
                Err(e)
            }
        }
    }

    /// Every check of an enroll request, before anything changes; with the rules compiled.
    fn check(&self, req: &Request, netns: &Netns) -> Result<(WorkloadInfo, Compiled), EnrollError> {
        let compiled = chain::compile_packed(&req.capture).map_err(|e| EnrollError::Flags(e.to_string()))?;
        // The embedded proxy forwards DNS to the workload's resolvers: it must know them (a
        // node's own resolv.conf is not a sidecar pod's). In ambient mode it stands in for
        // ztunnel, a node proxy that forwards to its own resolvers (its pod's, the cluster's
        // DNS): the agent's resolv.conf is the one.
        let named = req.args.iter().any(|a| a.starts_with("--resolv-conf"));
        let node_proxy = req.capture.ambient.is_some();
        let unknown =
            req.capture.dns.upstreams.is_empty() || (self.settings.mode == pins::Mode::Node && !named && !node_proxy);
        if req.proxy == ProxyMode::Embedded && req.capture.dns.enabled() && unknown {
            return Err(EnrollError::Flags(
                "--redirect-dns with the embedded proxy: the resolv.conf names no resolver to forward DNS to (name \
                 the workload's with --resolv-conf PATH)"
                    .into(),
            ));
        }
        // The agent's own resolvers are dialed from the pod's namespace: a loopback one there
        // (systemd-resolved's 127.0.0.53) is no resolver at all.
        let upstreams = &req.capture.dns.upstreams;
        if req.proxy == ProxyMode::Embedded
            && req.capture.dns.enabled()
            && node_proxy
            && !named
            && upstreams.iter().all(|a| a.is_loopback())
        {
            let list: Vec<String> = upstreams.iter().map(ToString::to_string).collect();
            return Err(EnrollError::Flags(format!(
                "--redirect-dns with the embedded proxy in ambient mode: the agent's resolv.conf names only loopback \
                 resolvers ({}), which the pod's namespace cannot reach (name reachable ones with --resolv-conf PATH)",
                list.join(", ")
            )));
        }
        // Ambient's rules hold for every socket of the namespace, ztunnel's too, which lives in
        // a cgroup of its own.
        if req.capture.ambient.is_some() && req.cgroup.is_some() {
            return Err(EnrollError::Flags(
                "--cgroup with --mode ambient: ambient's rules are the whole namespace's (ztunnel's sockets there \
                 are in its own cgroup); enroll the pod without --cgroup"
                    .into(),
            ));
        }
        if req.fast_path && !self.settings.sizing.fast_path {
            return Err(EnrollError::FastPathOff);
        }
        let cookie = netns
            .cookie()
            .map_err(EnrollError::io(format!("netns cookie of {}", req.netns.display())))?;
        if cookie == self.host_netns_cookie && !self.settings.allow_host_netns {
            return Err(EnrollError::HostNetns(req.netns.clone()));
        }
        let taken = self.workloads.values().map(|w| &w.info).chain(self.unserved.values());
        if let Some(w) = taken.into_iter().find(|w| w.netns_cookie == cookie) {
            return Err(EnrollError::NetnsTaken {
                netns: req.netns.clone(),
                id: w.id.clone(),
            });
        }
        if let Some(by) = pins::captured_elsewhere(cookie, &self.settings.name) {
            return Err(EnrollError::CapturedElsewhere {
                netns: req.netns.clone(),
                by,
            });
        }
        if let Some(cg) = &req.cgroup {
            sys::open_cgroup2_dir(cg).map_err(EnrollError::Path)?;
            if !is_under(cg, &self.settings.attach) {
                return Err(EnrollError::CgroupOutside {
                    cgroup: cg.clone(),
                    attach: self.settings.attach.clone(),
                });
            }
        }
        // An address another workload holds too is no reason to refuse: each namespace's
        // inbound connections are judged by its own sk_lookup instance, whatever addresses
        // others hold (the address watcher says so in the log).
        let addresses = addrs::read(netns).map_err(EnrollError::io(format!("addresses of {}", req.netns.display())))?;
        let slot =
            free_slot(self.workloads.values().map(|w| &w.info)).ok_or(EnrollError::Full(MAX_WORKLOADS as usize))?;
        let info = WorkloadInfo {
            id: req.id.clone(),
            netns: req.netns.clone(),
            netns_cookie: cookie,
            cgroup: req.cgroup.clone(),
            proxy: req.proxy.as_str().to_owned(),
            args: req.args.clone(),
            fast_path: req.fast_path,
            slot,
            addresses: addresses.iter().map(ToString::to_string).collect(),
            interfaces: req.capture.interface_list().map(|i| i.as_str().to_owned()).collect(),
            pod: req.pod.clone(),
        };
        Ok((info, compiled))
    }

    fn zero_events(&mut self, slot: u32) -> Result<(), EnrollError> {
        let map_err = |map: &'static str| move |source| crate::error::LoadError::Map { map, source };
        for e in 0..events::PER_WORKLOAD {
            self.maps
                .events
                .set(slot * events::PER_WORKLOAD + e, 0, 0)
                .map_err(map_err(maps::EVENT_COUNTERS))?;
        }
        Ok(())
    }

    /// The proxy's listeners: handed over, made inside the workload's cgroup (so that
    /// sock_ops, attached there, sees the accepted ends the fast path needs), or bound in its
    /// namespace.
    fn listening(
        &self,
        info: &WorkloadInfo,
        netns: &Netns,
        cfg: &ProxyConfig,
        handed: Option<Vec<(Side, OwnedFd)>>,
        fast_path: bool,
    ) -> std::io::Result<Listening> {
        match handed {
            Some(fds) => Listening::from_fds(fds),
            // The workload's own cgroup: `run`'s attach point, or the one it was enrolled with.
            // (A node's attach point is a parent, which a process may not join once its
            // controllers are delegated to children.)
            None if fast_path
                && !self.agent_under_attach
                && let Some(cgroup) = self.workload_cgroup(info) =>
            {
                crate::listen_in::listeners(
                    cgroup,
                    &info.netns,
                    &cfg.listen_addrs(),
                    LISTEN_BACKLOG,
                    cfg.inbound_dial.transparent_mark().is_some(),
                )
                .and_then(Listening::from_fds)
                .and_then(|l| l.with_udp(netns, cfg))
            }
            None if fast_path && !self.agent_under_attach => {
                tracing::warn!(
                    id = %info.id,
                    "the fast path may miss the proxy's accepted connections: the agent's cgroup is not known to be \
                     under the attach point and the workload was enrolled without --cgroup; those it misses keep TCP"
                );
                Listeners::bind(netns, cfg).and_then(Listeners::listen)
            }
            None => Listeners::bind(netns, cfg).and_then(Listeners::listen),
        }
    }

    /// The cgroup v2 directory that holds exactly the workload's processes, if the engine
    /// knows one.
    fn workload_cgroup<'a>(&'a self, info: &'a WorkloadInfo) -> Option<&'a Path> {
        match (&info.cgroup, self.settings.mode) {
            (Some(cg), _) => Some(cg),
            (None, pins::Mode::Run) => Some(&self.settings.attach),
            (None, pins::Mode::Node) => None,
        }
    }

    /// The embedded proxy's upstream dialer: a child process in the workload's cgroup, which
    /// makes the sockets as the proxy identity (`-u`/`-g`), as a sidecar would, so that the
    /// workload's cgroup-scoped egress rules apply to them; a workload whose cgroup the
    /// engine does not know (node mode, enrolled without `--cgroup`) is dialled from the
    /// agent's own process, in its namespace.
    fn dialer(
        &self,
        info: &WorkloadInfo,
        capture: &CaptureConfig,
        netns: &Netns,
        agent_sockets: AgentSockets,
    ) -> Result<Dialer, EnrollError> {
        let keepalive = self.settings.sizing.liveness.keepalive;
        let Some(cgroup) = self.workload_cgroup(info) else {
            tracing::info!(
                id = %info.id,
                "enrolled without --cgroup: the proxy dials upstream from the agent's cgroup, so cgroup-scoped \
                 egress rules of the workload do not apply to its upstream connections"
            );
            return Ok(Dialer::Netns(
                NetnsDialer::start(netns, agent_sockets, keepalive).map_err(EnrollError::io("upstream dialer"))?,
            ));
        };
        let spec = ChildSpec {
            cgroup: cgroup.to_owned(),
            uid: capture.proxy_uids.first().copied().unwrap_or(0),
            gid: capture.proxy_gids.first().copied().unwrap_or(0),
        };
        match CgroupDialer::start(netns, spec, agent_sockets.clone(), keepalive) {
            Ok(d) => Ok(Dialer::Cgroup(d)),
            // EBUSY: a cgroup whose controllers are delegated to child cgroups, which no
            // process may join (a Kubernetes pod's, whose containers have one each). Enrolling
            // it worked before the dialer process existed, so it still does, dialled as then.
            Err(e) if e.kind() == std::io::ErrorKind::ResourceBusy => {
                tracing::warn!(
                    id = %info.id,
                    cgroup = %cgroup.display(),
                    "no process may join this cgroup ({e}): the proxy dials upstream from the agent's cgroup, so \
                     cgroup-scoped egress rules of the workload do not apply to its upstream connections"
                );
                Ok(Dialer::Netns(
                    NetnsDialer::start(netns, agent_sockets, keepalive).map_err(EnrollError::io("upstream dialer"))?,
                ))
            }
            Err(e) => Err(EnrollError::io("upstream dialer")(e)),
        }
    }

    /// Makes a checked workload live (new, adopted or handed over). The `WORKLOADS` entry
    /// goes in last: until then no connection is captured, so a failure part-way changes
    /// nothing a connection could see, and the caller's [`Engine::purge`] removes the rest.
    pub(super) fn start_workload(
        &mut self,
        mut info: WorkloadInfo,
        capture: &CaptureConfig,
        compiled: &Compiled,
        netns: Netns,
        handed: Option<Vec<(Side, OwnedFd)>>,
    ) -> Result<Enrolled, EnrollError> {
        let Compiled { rules, packed } = compiled;
        let cookie = info.netns_cookie;
        let embedded = ProxyMode::parse(&info.proxy) == Some(ProxyMode::Embedded);
        let fast_path = info.fast_path && self.settings.sizing.fast_path;
        let (cgroup_id, cgroup_level) = match &info.cgroup {
            Some(cg) => sys::cgroup_identity(cg).map_err(EnrollError::Path)?,
            None => (0, 0),
        };
        let adopted = handed.is_some() || self.maps.workloads.get(&cookie, 0).is_ok();
        if !adopted {
            self.zero_events(info.slot)?;
        }
        // Counters and set members before anything could be captured by them.
        self.maps.rules.install(cookie, rules.len(), packed, adopted)?;

        // The proxy, listening before anything is captured.
        let mut inbound = InboundListener::new(self.open_map(maps::INBOUND_LISTENERS)?, cookie);
        let (proxy, listener_fds) = if embedded {
            let cfg = ProxyConfig {
                outbound_port: capture.envoy_port,
                inbound_port: capture.inbound_capture_port,
                listen_on: ProxyConfig::LOOPBACK.to_vec(),
                outbound_on_any: !capture.kube_virt_interfaces.is_empty(),
                connect_timeout: self.settings.sizing.connect_timeout,
                max_connections: self.settings.sizing.max_proxy_connections,
                liveness: self.settings.sizing.liveness,
                dns_port: capture.dns.enabled().then_some(redirect_common::DNS_PROXY_PORT),
                inbound_dial: match capture.inbound_path() {
                    InboundPath::Ambient => InboundDial::Ambient,
                    InboundPath::Tproxy(t) => InboundDial::Tproxy(t.mark),
                    InboundPath::Passthrough => InboundDial::Passthrough,
                },
                splice: self.settings.sizing.relay == crate::flags::Relay::Splice && !fast_path,
            };
            // New listeners (not handed over): whatever sk_lookup gave the previous ones, which
            // closed with their proxy, never completes.
            if handed.is_none() {
                self.forget_pending(cookie);
            }
            let listening = self
                .listening(&info, &netns, &cfg, handed, fast_path)
                .map_err(EnrollError::io(format!("proxy listeners in {}", info.netns.display())))?;
            // sk_lookup hands connections from other hosts to these sockets, by family.
            for l in listening.of(Side::Inbound) {
                inbound.register(l)?;
            }
            let fds = listening.dup_fds().map_err(EnrollError::io("listener descriptors"))?;
            let table = OriginalDst::Maps(Box::new(OrigDstTable::new(
                self.open_map(maps::ORIG_BY_TUPLE)?,
                self.open_map(maps::INBOUND_PENDING)?,
                cookie,
            )));
            let agent_sockets = AgentSockets::new(self.open_map(maps::AGENT_SOCKETS)?);
            let dns = match capture.dns.enabled() {
                true => Some(
                    DnsUpstream::make(&netns, &capture.dns.upstreams, &agent_sockets)
                        .map_err(EnrollError::io("the DNS proxy's upstream sockets"))?,
                ),
                false => None,
            };
            let dialer = self.dialer(&info, capture, &netns, agent_sockets)?;
            // Where sock_ops does not see the proxy's upstream sockets (the agent's own,
            // outside the attach point), the proxy enrolls them in the fast path itself.
            let own_fast_path = match fast_path && !self.agent_under_attach && !matches!(dialer, Dialer::Cgroup(_)) {
                true => Some(FastPath {
                    sockets: FastPathSockets::new(
                        self.open_map(maps::FAST_PATH_SOCKETS)?,
                        self.open_map(maps::FAST_PATH_SENDERS)?,
                    ),
                    netns_cookie: cookie,
                }),
                false => None,
            };
            let proxy = Proxy::start(
                listening,
                table,
                dialer,
                cfg,
                own_fast_path,
                self.plan.budget.clone(),
                dns,
            )
            .map_err(EnrollError::io("starting the proxy"))?;
            (Some(proxy), fds)
        } else {
            // sock_ops registers the workload's proxy's listener when it calls listen(); one
            // that listened before is found here.
            if !capture.inbound_ports.is_empty() {
                let found = adopt_listener(&netns, capture.inbound_capture_port, &mut inbound, &info.id)?;
                if !found {
                    tracing::info!(
                        id = %info.id,
                        port = capture.inbound_capture_port,
                        "nothing listens on the inbound capture port yet; connections from other hosts are refused \
                         until a workload process listens on it"
                    );
                }
            }
            (None, Vec::new())
        };

        // Its addresses: what `-o lo` reaches, and where connections come from inside.
        let addr_maps = AddrMaps {
            local: self.open_map(maps::LOCAL_ADDRS)?,
            pods: self.open_map(maps::POD_ADDRS)?,
            routes: self.open_map(maps::ROUTE_SOURCES)?,
            ifaces: self.open_map(maps::IFACES)?,
            probe_snat: self.open_map(maps::PROBE_SNAT)?,
        };
        let interfaces = capture.interface_list().cloned().collect();
        // `-k` devices get their tc programs as the watcher finds them.
        let virt = self.virt_capture(capture, &netns, cookie)?;
        let hook = virt
            .clone()
            .map(|v| (chain::virt_entries(capture), Box::new(v) as Box<dyn VirtDevices>));
        let mode = match &capture.ambient {
            None => ModeAddrs::Sidecar,
            // The node's sockets (the kubelet's) are under node mode's attach point when that
            // is the cgroup root, never under a `run`'s.
            Some(ambient) if self.settings.mode == Mode::Node => {
                if sys::cgroup2_root().is_ok_and(|root| root == self.settings.attach) {
                    ModeAddrs::Ambient(Some(
                        NodeProbes::new(self.host_netns_cookie, cookie, ambient.clone())
                            .map_err(EnrollError::io("a route netlink socket in the node's namespace"))?,
                    ))
                } else {
                    tracing::warn!(
                        id = %info.id,
                        attach = %self.settings.attach.display(),
                        "the programs are not attached at the cgroup root (--cgroup-parent), so the node's \
                         connections to this ambient pod (the kubelet's probes) keep the node's source and are \
                         captured, where istio-cni would SNAT them to the probe address"
                    );
                    ModeAddrs::Ambient(None)
                }
            }
            Some(_) => ModeAddrs::Ambient(None),
        };
        let local = LocalAddrs::install(&netns, addr_maps, cookie, &info.id, interfaces, hook, mode).map_err(
            EnrollError::io(format!("addresses and -k devices of {}", info.netns.display())),
        )?;
        info.addresses = local.addresses().iter().map(ToString::to_string).collect();
        let watch_ns = netns.try_clone().map_err(EnrollError::io("namespace descriptor"))?;
        let id = info.id.clone();
        let watcher = AbortOnDrop(tokio::spawn(async move {
            if let Err(e) = local.watch(watch_ns).await {
                tracing::error!(%id, "local address watcher stopped: {e}; -o lo decisions may be stale");
            }
        }));

        let (sk_lookup, sk_lookup_program) = self.sk_lookup_link(cookie, &netns)?;
        let serving = chain::Serving {
            own_proxy: !embedded,
            fast_path,
        };
        let mut w = chain::workload(capture, packed, info.slot, serving);
        w.cgroup_id = cgroup_id;
        w.cgroup_level = cgroup_level;
        // TPROXY and ambient modes: the mark routes the app's replies to a transparent
        // connection (the proxy's, ztunnel's) back to it. In place before anything is
        // captured; taken away again if what follows fails. An adopted workload's routing (a
        // handover's, a killed predecessor's) is this agent's to remove now.
        let tproxy = match (Policy::of(capture), adopted) {
            (Some(policy), false) => Some(TproxyRouting::install(&netns, policy)?),
            (Some(policy), true) => Some(TproxyRouting::adopt(&netns, policy)?),
            (None, _) => None,
        };
        let live = self
            .maps
            .workloads
            .insert(cookie, w, 0)
            .map_err(|source| {
                EnrollError::from(crate::error::LoadError::Map {
                    map: maps::WORKLOADS,
                    source,
                })
            })
            // sock_ops registers a listen() only once the entry is in: a listener the
            // workload's proxy opened between the search above and now is found by searching
            // again.
            .and_then(|()| match !embedded && !capture.inbound_ports.is_empty() {
                true => adopt_listener(&netns, capture.inbound_capture_port, &mut inbound, &info.id).map(drop),
                false => Ok(()),
            });
        if let Err(e) = live {
            if let Some(t) = tproxy {
                t.remove();
            }
            return Err(e);
        }
        Ok(Enrolled {
            info,
            netns,
            _sk_lookup: sk_lookup,
            sk_lookup_program,
            proxy,
            listener_fds,
            tproxy,
            virt,
            ambient: capture.ambient.is_some(),
            _watcher: watcher,
        })
    }
}
