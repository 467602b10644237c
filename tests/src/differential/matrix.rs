//! The scenarios of a configuration: every client with the destinations it dials, phase by
//! phase, and their run in one twin.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use redirect_testkit::{netns::pair_ip6, probe::ProbeSpec};

use super::{
    Config, PASSTHROUGH, PASSTHROUGH6, SIDE_SUBNET, VALIDATION_PORT, list_of,
    twin::{Counts, Twin},
    verdict::{Client, Phase, verdict},
};
use crate::testkit_bin;

/// One phase's scenarios: each client with the destinations it dials, one after another.
pub(super) type Scenarios = Vec<(Client, Vec<SocketAddr>)>;

pub(super) struct Matrix {
    pub(super) phases: Vec<(Phase, Scenarios)>,
    capture: (u16, u16),
}

/// One family's addresses a phase's clients use.
#[derive(Clone, Copy)]
struct Addrs {
    /// The inbound passthrough source, 127.0.0.6 or `::6`.
    passthrough: IpAddr,
    loopback: IpAddr,
    /// The pod's address on its primary interface.
    pod: IpAddr,
    /// The pod's address on the side link.
    side_pod: IpAddr,
    remote: IpAddr,
}

/// What one twin saw: per phase, the verdicts in scenario order and the counters after it.
pub(super) type Run = Vec<(Vec<String>, Counts)>;

impl Matrix {
    pub(super) fn build(cfg: &Config, listen_ports: &[u16], capture: (u16, u16)) -> Self {
        let pod_ip = Ipv4Addr::new(10, 200, 1, 1);
        let remote_ip = Ipv4Addr::new(10, 200, 1, 2);
        let (pod_ip6, remote_ip6) = pair_ip6(1);
        let (side_pod_ip, side_ip) = (
            Ipv4Addr::new(10, 200, SIDE_SUBNET, 1),
            Ipv4Addr::new(10, 200, SIDE_SUBNET, 2),
        );
        let (side_pod_ip6, side_ip6) = pair_ip6(SIDE_SUBNET);
        let mut ids: Vec<(u32, u32)> = vec![(0, 0), (1337, 1337), (1337, 0), (1000, 1337)];
        for u in list_of::<u32>(cfg.flags, "-u") {
            ids.push((u, 0));
        }
        for g in list_of::<u32>(cfg.flags, "-g") {
            ids.push((1000, g));
        }
        ids.extend_from_slice(cfg.ids);
        ids.sort();
        ids.dedup();
        let mut inbound_ports: BTreeSet<u16> = listen_ports.iter().copied().collect();
        inbound_ports.extend([capture.0, capture.1]);

        // The same scenarios over either stack: `dsts` on every port, unbound and bound to
        // the passthrough source, istio-validation's probe, the remote host to the pod, and the
        // side host's (the VM's).
        let scenarios = |v4_mapped: bool, dsts: &[IpAddr], a: &Addrs| {
            let Addrs {
                passthrough,
                loopback,
                pod,
                side_pod,
                remote,
            } = *a;
            let client = |uid, gid, bind| Client {
                inbound: false,
                from_side: false,
                uid,
                gid,
                bind,
                v4_mapped,
                real: None,
                mark: None,
                transparent: false,
            };
            let mut clients: Scenarios = Vec::new();
            let every_dst = || -> Vec<SocketAddr> {
                dsts.iter()
                    .flat_map(|&ip| listen_ports.iter().map(move |&p| SocketAddr::new(ip, p)))
                    .collect()
            };
            for &(uid, gid) in &ids {
                for bind in [None, Some(passthrough)] {
                    clients.push((client(uid, gid, bind), every_dst()));
                }
                // istio-validation is a sidecar's init container. Ambient has none, and no
                // `::6` to reach: a connect to an address with no route fails (ENETUNREACH)
                // before nat sees it, where the agent would capture it (istio.md, "What differs").
                if !cfg.ambient() {
                    clients.push((
                        client(uid, gid, Some(loopback)),
                        vec![SocketAddr::new(passthrough, VALIDATION_PORT)],
                    ));
                }
            }
            // The owner match reads the socket file's fsuid/fsgid, not the real ids; and the
            // agent's mark, set by the app itself, is nothing to the sidecar rules.
            let set_ids = cfg
                .set_ids
                .iter()
                .map(|&((uid, gid), real)| (uid, gid, Some(real), None));
            for (uid, gid, real, mark) in [
                (1000, 1000, Some((1337, 1337)), None),
                (1337, 1337, Some((1000, 1000)), None),
                (0, 0, None, Some(redirect_common::AGENT_SOCKET_MARK)),
            ]
            .into_iter()
            .chain(set_ids)
            {
                clients.push((
                    Client {
                        real,
                        mark,
                        ..client(uid, gid, None)
                    },
                    every_dst(),
                ));
            }
            // As root: setting a mark takes CAP_NET_ADMIN (ztunnel has it).
            for &mark in cfg.marks {
                let marked = Client {
                    mark: Some(mark),
                    ..client(0, 0, None)
                };
                clients.push((marked, every_dst()));
            }
            let to_pod = || inbound_ports.iter().map(|&p| SocketAddr::new(pod, p)).collect();
            clients.push((
                Client {
                    inbound: true,
                    ..client(0, 0, None)
                },
                to_pod(),
            ));
            for &from in cfg.spoofed_from.iter().filter(|a| a.is_ipv4() == pod.is_ipv4()) {
                let ztunnel = Client {
                    mark: Some(redirect_common::AMBIENT_MARK),
                    transparent: true,
                    ..client(0, 0, Some(from))
                };
                clients.push((ztunnel, to_pod()));
            }
            for &from in cfg.inbound_from.iter().filter(|a| a.is_ipv4() == pod.is_ipv4()) {
                let bound = Client {
                    inbound: true,
                    ..client(0, 0, Some(from))
                };
                clients.push((bound, to_pod()));
            }
            let side_host = Client {
                inbound: true,
                from_side: true,
                ..client(0, 0, None)
            };
            if cfg.side_host() {
                let to_side_pod = inbound_ports.iter().map(|&p| SocketAddr::new(side_pod, p));
                clients.push((side_host.clone(), to_side_pod.collect()));
            }
            // The VM's connections through the pod (to the remote host and its further
            // addresses of the family, on the ports it serves) and to the pod's primary
            // address (on every port the pod's own clients dial, the capture ports too), both
            // arriving on the side link.
            if cfg.vm {
                let remotes = cfg.remote_addrs.iter().filter(|a| a.is_ipv4() == remote.is_ipv4());
                let through = std::iter::once(&remote)
                    .chain(remotes)
                    .flat_map(|&r| listen_ports.iter().map(move |&p| SocketAddr::new(r, p)));
                let to_pod = inbound_ports.iter().map(|&p| SocketAddr::new(pod, p));
                clients.push((side_host.clone(), through.collect()));
                clients.push((side_host, to_pod.collect()));
            }
            clients
        };
        let mut v4_dsts: Vec<IpAddr> = [remote_ip, pod_ip, Ipv4Addr::LOCALHOST, Ipv4Addr::new(127, 0, 0, 2)]
            .map(IpAddr::from)
            .to_vec();
        let mut v6_dsts: Vec<IpAddr> = [remote_ip6, pod_ip6, Ipv6Addr::LOCALHOST].map(IpAddr::from).to_vec();
        let dsts = || cfg.dsts.iter().chain(cfg.remote_addrs);
        v4_dsts.extend(dsts().filter(|d| d.is_ipv4()));
        v6_dsts.extend(dsts().filter(|d| d.is_ipv6()));
        if cfg.side_host() {
            v4_dsts.push(side_ip.into());
            v6_dsts.push(side_ip6.into());
        }
        // The v4-mapped phase's side host dials the same IPv4 addresses from AF_INET6 sockets.
        let v4 = Addrs {
            passthrough: PASSTHROUGH.into(),
            loopback: Ipv4Addr::LOCALHOST.into(),
            pod: pod_ip.into(),
            side_pod: side_pod_ip.into(),
            remote: remote_ip.into(),
        };
        let v6 = Addrs {
            passthrough: PASSTHROUGH6.into(),
            loopback: Ipv6Addr::LOCALHOST.into(),
            pod: pod_ip6.into(),
            side_pod: side_pod_ip6.into(),
            remote: remote_ip6.into(),
        };
        let phases = vec![
            (Phase::V4, scenarios(false, &v4_dsts, &v4)),
            (Phase::V4Mapped, scenarios(true, &v4_dsts, &v4)),
            (Phase::V6, scenarios(false, &v6_dsts, &v6)),
        ];
        Self { phases, capture }
    }

    fn run_phase(&self, twin: &Twin, scenarios: &Scenarios) -> Vec<String> {
        let testkit = testkit_bin();
        let mut out = Vec::new();
        for (client, targets) in scenarios {
            let mut spec = if client.inbound {
                let from = match (&twin.side, client.from_side) {
                    (Some(side), true) => &side.path,
                    _ => &twin.pair.remote.path,
                };
                ProbeSpec::outside(from, targets[0])
            } else {
                ProbeSpec::new(&twin.cgroup.path, &twin.pair.workload.path, targets[0])
                    .uid(client.uid)
                    .gid(client.gid)
            };
            if let Some(b) = client.bind {
                spec = spec.bind(b);
            }
            if let Some((uid, gid)) = client.real {
                spec = spec.real_ids(uid, gid);
            }
            if let Some(m) = client.mark {
                spec = spec.mark(m);
            }
            if client.transparent {
                spec = spec.transparent();
            }
            if client.v4_mapped {
                spec = spec.v4_mapped();
            }
            let results = spec
                .bytes(16)
                .run_batch(&testkit, targets)
                .unwrap_or_else(|e| panic!("probes of {}: {e}", client.label()));
            let verdicts: Vec<String> = results.iter().map(|r| verdict(r, self.capture)).collect();
            // A client that could not set itself up fails alike in both twins, and would test
            // nothing.
            if let Some(v) = verdicts.iter().find(|v| v.starts_with("other: setsockopt")) {
                panic!("{}: {v}", client.label());
            }
            out.extend(verdicts);
        }
        out
    }

    /// Every phase in order, with the counters after each.
    pub(super) fn run(&self, twin: &Twin) -> Run {
        self.phases
            .iter()
            .map(|(_, scenarios)| (self.run_phase(twin, scenarios), twin.counts()))
            .collect()
    }

    pub(super) fn len(&self) -> usize {
        self.phases.iter().flat_map(|(_, s)| s).map(|(_, t)| t.len()).sum()
    }
}
