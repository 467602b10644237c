//! The agent against its oracle: for the same flags, the kernel running istio-iptables' nat
//! rules (loaded from `redirect-agent explain` with iptables-restore, and from `explain --family
//! ipv6` with ip6tables-restore) and the kernel running the agent (`--proxy none`) must send
//! every connection to the same place.
//!
//! Each configuration builds two identical dual-stack topologies: a workload namespace
//! (10.200.1.1, fd00:200:0:1::1) with a veth to a remote-host namespace (10.200.1.2,
//! fd00:200:0:1::2), no default route, and a cgroup. In both, a workload process listens on the
//! two capture ports and on every port of the matrix, on 0.0.0.0 and on [::] (V6ONLY, as Envoy's
//! listeners are), and the remote host listens on the same ports on both its addresses; every
//! server answers with a banner naming itself. The same scenarios run in both twins, in three
//! phases: IPv4 from AF_INET sockets, the same over AF_INET6 sockets dialing v4-mapped
//! addresses (judged by the IPv4 chains), and native IPv6 (judged by ip6tables' chains). Each
//! one's verdict (which capture port, which original destination, what the app's own socket
//! says its addresses are, or which failure) must be equal, and after each phase so must the
//! per-rule counters of both families' chains.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6},
    process::Command,
};

use redirect_agent::{explain::Explanation, stats::InstanceStats};
use redirect_testkit::{
    agent::AgentProcess,
    cgroup::TestCgroup,
    netns::{NetnsPair, pair_ip6},
    probe::ProbeSpec,
    report::{Outcome, ProbeResult},
    serve::ServeProcess,
    unique,
};
use redirect_tests::{agent_bin, agent_cmd, ip6tables_restore, iptables_restore, require_root, testkit_bin};

const PASSTHROUGH: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);
/// istio-iptables' IPv6 inbound passthrough source, `::6`, which it adds to lo (and the agent
/// too, for a workload with IPv6).
const PASSTHROUGH6: Ipv6Addr = Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6);
/// istio-validation's probe: uid 1337 dials 127.0.0.6:15002 from a socket bound to 127.0.0.1
/// (over IPv6: [::6]:15002 from ::1).
const VALIDATION_PORT: u16 = 15002;
/// Ports every configuration probes: a remote service, the app, the tunnel, the status port
/// (excluded inbound by default) and a metrics port.
const BASE_PORTS: [u16; 5] = [8080, 9080, 15008, 15020, 15021];
/// The tables both twins have, by `stats --json`'s family name, with the command that lists
/// each in the oracle, and the chains compared.
const TABLES: [(&str, &str); 2] = [("ipv4", "iptables"), ("ipv6", "ip6tables")];
const CHAINS: [&str; 2] = ["ISTIO_OUTPUT", "ISTIO_INBOUND"];

/// Which flags a configuration passes, and the ports and ids they name.
struct Config {
    name: &'static str,
    flags: &'static [&'static str],
}

/// A twin topology. Fields drop in order: agent, servers, cgroup, namespaces.
struct Twin {
    agent: Option<AgentProcess>,
    _servers: Vec<ServeProcess>,
    cgroup: TestCgroup,
    pair: NetnsPair,
    name: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Iptables,
    Agent,
}

/// Per-rule counts of each (family, chain), in rule order.
type Counts = BTreeMap<(&'static str, &'static str), Vec<u64>>;

/// The flag's value in `flags`, if given (short form, as the configurations spell them).
fn flag<'a>(flags: &[&'a str], short: &str) -> Option<&'a str> {
    flags.windows(2).find(|w| w[0] == short).map(|w| w[1])
}

/// The comma list a flag was given (ports or ids), empty when absent.
fn list_of<T: std::str::FromStr>(flags: &[&str], short: &str) -> Vec<T> {
    flag(flags, short)
        .unwrap_or("")
        .split(',')
        .filter_map(|p| p.trim().parse().ok())
        .collect()
}

/// The nat tables istio-iptables writes for these flags: iptables' and ip6tables'.
struct Tables {
    ipv4: Explanation,
    ipv6: Explanation,
}

fn explain(flags: &[&str], family: &str) -> Explanation {
    let mut args = vec!["explain", "--json", "--family", family];
    args.extend_from_slice(flags);
    let out = agent_cmd(&args);
    assert!(
        out.status.success(),
        "explain --family {family} {flags:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice::<Explanation>(&out.stdout).expect("explain --json")
}

/// A server's listener: `base` (`cap-out`, `cap-in`, `pod`, `remote`), with a `6` on an IPv6
/// address, and the port for the servers of the matrix's ports (`cap-in6`, `pod-9080`,
/// `remote6-8080`), as the banner names it.
fn listener(base: &str, ip: IpAddr, port: u16) -> (String, SocketAddr) {
    let six = if ip.is_ipv6() { "6" } else { "" };
    let name = match base {
        "pod" | "remote" => format!("{base}{six}-{port}"),
        _ => format!("{base}{six}"),
    };
    (name, SocketAddr::new(ip, port))
}

impl Twin {
    fn new(kind: Kind, cfg: &Config, tables: &Tables, listen_ports: &[u16], capture: (u16, u16)) -> Self {
        let tag = match kind {
            Kind::Iptables => "dfi",
            Kind::Agent => "dfa",
        };
        let pair = NetnsPair::create(tag).expect("namespaces");
        let cgroup = TestCgroup::create(tag).expect("cgroup");
        let mut twin = Self {
            agent: None,
            _servers: Vec::new(),
            cgroup,
            pair,
            name: unique(tag),
        };
        // The servers' [::] listeners are V6ONLY, as Envoy's are, so that they and the 0.0.0.0
        // ones share their ports (each family's connections on its own listener, each asked
        // its original destination at its own level). The probes set V6ONLY themselves.
        for ns in [&twin.pair.workload, &twin.pair.remote] {
            ns.sysctl("net.ipv6.bindv6only", "1").expect("bindv6only");
        }
        // The remote host routes ::6 back to the pod (a host route, not a default one): a
        // connection from ::6 that leaves direct then completes where IPv4's from 127.0.0.6 is
        // refused at once (EINVAL), instead of waiting out its SYN retries. Both twins alike.
        let via = twin.pair.workload_ip6.to_string();
        twin.pair
            .remote
            .ip(&["-6", "route", "add", "::6/128", "via", &via, "dev", "r0"])
            .expect("route to ::6");
        match kind {
            Kind::Iptables => {
                let ns = &twin.pair.workload.name;
                iptables_restore(ns, &tables.ipv4.iptables_save);
                ip6tables_restore(ns, &tables.ipv6.iptables_save);
                // istio-iptables adds the IPv6 passthrough source with its ip6tables rules (the
                // agent does it itself).
                twin.pair
                    .workload
                    .ip(&["-6", "addr", "add", "::6/128", "dev", "lo"])
                    .expect("::6 on lo");
            }
            Kind::Agent => {
                let mut args = vec![
                    "--cgroup".to_string(),
                    twin.cgroup.path.to_string_lossy().into_owned(),
                    "--netns".into(),
                    twin.pair.workload.path.to_string_lossy().into_owned(),
                    "--proxy".into(),
                    "none".into(),
                ];
                args.extend(cfg.flags.iter().map(|s| s.to_string()));
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                twin.agent = Some(AgentProcess::start(&agent_bin(), &twin.name, &args).expect("agent starts"));
            }
        }
        // After the agent: a proxy that listens on the inbound capture port once capture is in
        // place is registered by sock_ops, as Envoy would be.
        let (mut workload, mut remote) = (Vec::new(), Vec::new());
        for (any, remote_ip) in [
            (Ipv4Addr::UNSPECIFIED.into(), twin.pair.remote_ip.into()),
            (Ipv6Addr::UNSPECIFIED.into(), twin.pair.remote_ip6.into()),
        ] {
            workload.push(listener("cap-out", any, capture.0));
            workload.push(listener("cap-in", any, capture.1));
            workload.extend(listen_ports.iter().map(|&p| listener("pod", any, p)));
            remote.extend(listen_ports.iter().map(|&p| listener("remote", remote_ip, p)));
        }
        let testkit = testkit_bin();
        twin._servers = vec![
            ServeProcess::start(&testkit, Some(&twin.cgroup.path), &twin.pair.workload.path, &workload)
                .expect("workload servers"),
            ServeProcess::start(&testkit, None, &twin.pair.remote.path, &remote).expect("remote servers"),
        ];
        twin
    }

    /// Per-rule counts of both families' ISTIO_OUTPUT and ISTIO_INBOUND: the agent's
    /// counters, or the packet counters of the nat rules (only a connection's first packet
    /// traverses nat, so those count connections too).
    fn counts(&self) -> Counts {
        let mut counts = Counts::new();
        match &self.agent {
            Some(_) => {
                let out = agent_cmd(&["stats", "--name", &self.name, "--json"]);
                assert!(out.status.success(), "stats: {}", String::from_utf8_lossy(&out.stderr));
                let stats: InstanceStats = serde_json::from_slice(&out.stdout).expect("stats --json");
                for (family, _) in TABLES {
                    for chain in CHAINS {
                        let rows = stats
                            .rules
                            .iter()
                            .filter(|r| r.chain == chain && r.family == family)
                            .map(|r| r.connections)
                            .collect();
                        counts.insert((family, chain), rows);
                    }
                }
            }
            None => {
                for (family, tool) in TABLES {
                    for chain in CHAINS {
                        let out = Command::new("ip")
                            .args(["netns", "exec", &self.pair.workload.name])
                            .args([tool, "-t", "nat", "-L", chain, "-v", "-n", "-x", "--line-numbers"])
                            .output()
                            .expect("iptables -L");
                        assert!(out.status.success(), "{tool} -L {chain}");
                        // Two header lines, then "num pkts bytes target ...".
                        let rows = String::from_utf8_lossy(&out.stdout)
                            .lines()
                            .skip(2)
                            .filter_map(|l| l.split_whitespace().nth(1)?.parse().ok())
                            .collect();
                        counts.insert((family, chain), rows);
                    }
                }
            }
        }
        counts
    }

    fn counters(&self) -> String {
        match &self.agent {
            Some(_) => {
                let out = agent_cmd(&["stats", "--name", &self.name]);
                String::from_utf8_lossy(&out.stdout).into_owned()
            }
            None => TABLES
                .iter()
                .map(|(_, tool)| {
                    let out = Command::new("ip")
                        .args(["netns", "exec", &self.pair.workload.name])
                        .args([*tool, "-t", "nat", "-L", "-v", "-n", "--line-numbers"])
                        .output()
                        .expect("iptables -L");
                    format!("{tool}:\n{}", String::from_utf8_lossy(&out.stdout))
                })
                .collect(),
        }
    }
}

/// How a phase's clients dial: IPv4 from AF_INET sockets, the same destinations from AF_INET6
/// sockets as `::ffff:a.b.c.d` (the IPv4 chains judge them), or native IPv6 (ip6tables').
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    V4,
    V4Mapped,
    V6,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Self::V4 => "IPv4",
            Self::V4Mapped => "v4-mapped",
            Self::V6 => "IPv6",
        }
    }
}

/// Who connects: from inside the workload (identity and source) or from the remote host.
#[derive(Clone, Debug)]
struct Client {
    inbound: bool,
    uid: u32,
    gid: u32,
    bind: Option<IpAddr>,
    /// IPv4 destinations (and source) dialed v4-mapped from an AF_INET6 socket.
    v4_mapped: bool,
    /// Real (uid, gid) of a set-id client, whose `uid`/`gid` are the effective ones.
    real: Option<(u32, u32)>,
    /// SO_MARK the client sets on its socket.
    mark: Option<u32>,
}

impl Client {
    fn label(&self) -> String {
        let mapped = if self.v4_mapped { " (v4-mapped)" } else { "" };
        if self.inbound {
            return format!("remote host{mapped}");
        }
        let bind = self.bind.map_or_else(String::new, |b| format!(" bind={b}"));
        let real = self.real.map_or_else(String::new, |(u, g)| format!(" real={u}/{g}"));
        let mark = self.mark.map_or_else(String::new, |m| format!(" mark={m:#x}"));
        format!("uid={} gid={}{real}{mark}{bind}{mapped}", self.uid, self.gid)
    }

    /// The destination as the client dials it (v4-mapped if it dials so).
    fn dialed(&self, to: SocketAddr) -> SocketAddr {
        match to {
            SocketAddr::V4(v4) if self.v4_mapped => SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0).into(),
            other => other,
        }
    }
}

/// The capture listener a banner name is: (its port, what the verdict calls it).
fn capture_listener(name: &str, capture: (u16, u16)) -> Option<(u16, &'static str)> {
    match name {
        "cap-out" => Some((capture.0, "outbound")),
        "cap-out6" => Some((capture.0, "outbound6")),
        "cap-in" => Some((capture.1, "inbound")),
        "cap-in6" => Some((capture.1, "inbound6")),
        _ => None,
    }
}

/// What the app sees of its own connection, which NAT leaves as the app made it: getpeername
/// exactly (under REDIRECT, the destination it dialed, never the capture port), and
/// getsockname's address (under REDIRECT, the source routing chose for that destination; the
/// port is ephemeral, so left out). Part of the verdict of every connection that completed,
/// captured or not.
fn app_view(r: &ProbeResult) -> String {
    let peer = r.peer.as_deref().unwrap_or("?");
    let local = r.local_addr().map_or_else(|| "?".to_owned(), |a| a.ip().to_string());
    format!("peer={peer} local={local}")
}

/// Where a connection landed, named the same way in both twins. A capture listener (the
/// stand-in for Envoy) also says what the original destination query answered on the accepted
/// socket (`SO_ORIGINAL_DST` on the 0.0.0.0 one, `IP6T_SO_ORIGINAL_DST` on the [::] one):
/// conntrack's answer in the iptables twin, the agent's getsockopt program's in the other. (On
/// a direct landing conntrack answers too, for any tracked connection, and the agent leaves the
/// kernel's ENOENT: only captured connections are compared. For the same reason a connection
/// made straight to a capture port, which nobody redirected, reads as `orig=none` in both:
/// ENOENT from the agent, and conntrack's identity answer, the socket's own address.) A
/// connection that completed also carries what the app's own socket says ([`app_view`]).
fn verdict(r: &ProbeResult, capture: (u16, u16)) -> String {
    let local = r.banner_field("local");
    let name = r.banner_field("name");
    let listener = name.and_then(|n| capture_listener(n, capture));
    // The port the accepting listener listens on (sk_lookup leaves a captured connection's
    // local port as it was dialed).
    let on_capture_port = local
        .and_then(|l| l.parse::<SocketAddr>().ok())
        .is_some_and(|l| Some(l.port()) == listener.map(|(p, _)| p));
    let orig = match r.banner_field("orig") {
        None | Some("-") => "none",
        Some(o) if on_capture_port && Some(o) == local => "none",
        Some(o) => o,
    };
    match r.outcome {
        Outcome::Ok => {
            let landed = match (listener, name) {
                (Some((_, what)), _) => format!("capture:{what} orig={orig}"),
                (None, Some(server)) => format!("original:{server}"),
                (None, None) => "no banner".into(),
            };
            format!("{landed} {}", app_view(r))
        }
        Outcome::Refused => "refused".into(),
        other => {
            let err = r.error.as_deref().unwrap_or("");
            format!("{other:?}: {err}").to_lowercase()
        }
    }
}

/// One phase's scenarios: each client with the destinations it dials, one after another.
type Scenarios = Vec<(Client, Vec<SocketAddr>)>;

struct Matrix {
    phases: Vec<(Phase, Scenarios)>,
    capture: (u16, u16),
}

/// What one twin saw: per phase, the verdicts in scenario order and the counters after it.
type Run = Vec<(Vec<String>, Counts)>;

impl Matrix {
    fn build(cfg: &Config, listen_ports: &[u16], capture: (u16, u16)) -> Self {
        let pod_ip = Ipv4Addr::new(10, 200, 1, 1);
        let remote_ip = Ipv4Addr::new(10, 200, 1, 2);
        let (pod_ip6, remote_ip6) = pair_ip6(1);
        let mut ids: Vec<(u32, u32)> = vec![(0, 0), (1337, 1337), (1337, 0), (1000, 1337)];
        for u in list_of::<u32>(cfg.flags, "-u") {
            ids.push((u, 0));
        }
        for g in list_of::<u32>(cfg.flags, "-g") {
            ids.push((1000, g));
        }
        ids.sort();
        ids.dedup();
        let mut inbound_ports: BTreeSet<u16> = listen_ports.iter().copied().collect();
        inbound_ports.extend([capture.0, capture.1]);

        // The same scenarios over either stack: `dsts` on every port, unbound and bound to
        // the passthrough source, istio-validation's probe, and the remote host to the pod.
        let scenarios = |v4_mapped: bool, dsts: &[IpAddr], passthrough: IpAddr, loopback: IpAddr, pod: IpAddr| {
            let client = |uid, gid, bind| Client {
                inbound: false,
                uid,
                gid,
                bind,
                v4_mapped,
                real: None,
                mark: None,
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
                clients.push((
                    client(uid, gid, Some(loopback)),
                    vec![SocketAddr::new(passthrough, VALIDATION_PORT)],
                ));
            }
            // The owner match reads the socket file's fsuid/fsgid, not the real ids; and the
            // agent's mark, set by the app itself, is nothing to the sidecar rules.
            for (uid, real, mark) in [
                (1000, Some((1337, 1337)), None),
                (1337, Some((1000, 1000)), None),
                (0, None, Some(redirect_common::AGENT_SOCKET_MARK)),
            ] {
                clients.push((
                    Client {
                        real,
                        mark,
                        ..client(uid, uid, None)
                    },
                    every_dst(),
                ));
            }
            clients.push((
                Client {
                    inbound: true,
                    ..client(0, 0, None)
                },
                inbound_ports.iter().map(|&p| SocketAddr::new(pod, p)).collect(),
            ));
            clients
        };
        let v4_dsts: Vec<IpAddr> = [remote_ip, pod_ip, Ipv4Addr::LOCALHOST, Ipv4Addr::new(127, 0, 0, 2)]
            .map(IpAddr::from)
            .to_vec();
        let v6_dsts: Vec<IpAddr> = [remote_ip6, pod_ip6, Ipv6Addr::LOCALHOST].map(IpAddr::from).to_vec();
        let v4 = |mapped| {
            scenarios(
                mapped,
                &v4_dsts,
                PASSTHROUGH.into(),
                Ipv4Addr::LOCALHOST.into(),
                pod_ip.into(),
            )
        };
        let phases = vec![
            (Phase::V4, v4(false)),
            (Phase::V4Mapped, v4(true)),
            (
                Phase::V6,
                scenarios(
                    false,
                    &v6_dsts,
                    PASSTHROUGH6.into(),
                    Ipv6Addr::LOCALHOST.into(),
                    pod_ip6.into(),
                ),
            ),
        ];
        Self { phases, capture }
    }

    fn run_phase(&self, twin: &Twin, scenarios: &Scenarios) -> Vec<String> {
        let testkit = testkit_bin();
        let mut out = Vec::new();
        for (client, targets) in scenarios {
            let mut spec = if client.inbound {
                ProbeSpec::outside(&twin.pair.remote.path, targets[0])
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
            if client.v4_mapped {
                spec = spec.v4_mapped();
            }
            let results = spec
                .bytes(16)
                .run_batch(&testkit, targets)
                .unwrap_or_else(|e| panic!("probes of {}: {e}", client.label()));
            out.extend(results.iter().map(|r| verdict(r, self.capture)));
        }
        out
    }

    /// Every phase in order, with the counters after each.
    fn run(&self, twin: &Twin) -> Run {
        self.phases
            .iter()
            .map(|(_, scenarios)| (self.run_phase(twin, scenarios), twin.counts()))
            .collect()
    }

    fn len(&self) -> usize {
        self.phases.iter().flat_map(|(_, s)| s).map(|(_, t)| t.len()).sum()
    }
}

fn differential(cfg: Config) {
    require_root();
    let tables = Tables {
        ipv4: explain(cfg.flags, "ipv4"),
        ipv6: explain(cfg.flags, "ipv6"),
    };
    let capture = (
        flag(cfg.flags, "-p").map_or(15001, |p| p.parse().unwrap()),
        flag(cfg.flags, "-z").map_or(15006, |p| p.parse().unwrap()),
    );
    let mut ports: BTreeSet<u16> = BASE_PORTS.into_iter().collect();
    for f in ["-q", "-o", "-b", "-d", "-e"] {
        ports.extend(list_of::<u16>(cfg.flags, f));
    }
    ports.remove(&capture.0);
    ports.remove(&capture.1);
    let ports: Vec<u16> = ports.into_iter().collect();

    let matrix = Matrix::build(&cfg, &ports, capture);
    // The twins share nothing, so they are built, and run, at once.
    let (oracle, agent) = std::thread::scope(|s| {
        let oracle = s.spawn(|| Twin::new(Kind::Iptables, &cfg, &tables, &ports, capture));
        let agent = Twin::new(Kind::Agent, &cfg, &tables, &ports, capture);
        (oracle.join().expect("oracle twin"), agent)
    });
    let (want, got) = std::thread::scope(|s| {
        let want = s.spawn(|| matrix.run(&oracle));
        let got = matrix.run(&agent);
        (want.join().expect("oracle run"), got)
    });

    let mut table = String::new();
    let _ = writeln!(table, "differential '{}' (flags {:?}):", cfg.name, cfg.flags);
    let all_verdicts = want.iter().chain(&got).flat_map(|(v, _)| v);
    let width = all_verdicts.map(|v| v.chars().count()).max().unwrap_or(0);
    let mut mismatches = 0;
    for ((phase, scenarios), ((want, _), (got, _))) in matrix.phases.iter().zip(want.iter().zip(&got)) {
        let _ = writeln!(table, "  {}:", phase.name());
        let _ = writeln!(
            table,
            "  {:<48} {:<28} {:<width$} agent",
            "client", "destination", "iptables"
        );
        let mut i = 0;
        for (client, targets) in scenarios {
            for &t in targets {
                let mark = if want[i] == got[i] { " " } else { "✗" };
                if want[i] != got[i] {
                    mismatches += 1;
                }
                let _ = writeln!(
                    table,
                    "{mark} {:<48} {:<28} {:<width$} {}",
                    client.label(),
                    client.dialed(t).to_string(),
                    want[i],
                    got[i]
                );
                i += 1;
            }
        }
    }
    let _ = writeln!(table, "  {} scenarios, {} mismatches", matrix.len(), mismatches);
    println!("{table}");

    // Every rule counted the same decisions as its iptables twin, phase by phase (the counters
    // are cumulative: each phase moves its own family's chains and leaves the other's alone).
    let mut counter_diffs = Vec::new();
    for ((phase, _), ((_, want), (_, got))) in matrix.phases.iter().zip(want.iter().zip(&got)) {
        for (key, w) in want {
            let g = &got[key];
            let mark = if w == g { " " } else { "✗" };
            let line = format!(
                "{mark} after {:<9} {} {:<13} iptables {w:?}, agent {g:?}",
                phase.name(),
                key.0,
                key.1
            );
            println!("  {line}");
            if w != g {
                counter_diffs.push(line);
            }
        }
    }
    if mismatches > 0 || !counter_diffs.is_empty() {
        panic!(
            "{mismatches} of {} scenarios differ for '{}':\n{table}\n{} counter rows differ:\n{}\n\
             agent counters:\n{}\niptables counters:\n{}",
            matrix.len(),
            cfg.name,
            counter_diffs.len(),
            counter_diffs.join("\n"),
            agent.counters(),
            oracle.counters()
        );
    }
    // Sanity: every phase exercised both kinds of landing, so equality means something.
    for ((phase, _), (want, _)) in matrix.phases.iter().zip(&want) {
        let kinds: BTreeSet<&str> = want.iter().map(|v| v.split(':').next().unwrap()).collect();
        assert!(
            kinds.contains("original") && kinds.contains("capture"),
            "{}: the matrix did not both capture and go direct: {kinds:?}",
            phase.name()
        );
    }
    // Conntrack answered the original destination of every connection it redirected in the
    // oracle (only one dialed straight at a capture port reads `none`), so the equal answers
    // above are the agent's getsockopt program answering, not two failures.
    let mut captured = 0;
    for ((_, scenarios), (want, _)) in matrix.phases.iter().zip(&want) {
        let targets = scenarios.iter().flat_map(|(_, t)| t);
        for (t, v) in targets.zip(want) {
            if !v.starts_with("capture:") {
                continue;
            }
            captured += 1;
            if t.port() != capture.0 && t.port() != capture.1 {
                assert!(
                    !v.contains("orig=none"),
                    "conntrack left the original destination of {t} unanswered: {v}"
                );
            }
        }
    }
    println!("  {captured} captured connections, original destinations and the app's addresses equal in both");
}

macro_rules! configs {
    ($($test:ident: $name:literal => [$($flag:literal),*];)*) => {$(
        #[test]
        fn $test() {
            differential(Config { name: $name, flags: &[$($flag),*] });
        }
    )*};
}

configs! {
    default_injection: "default" => [];
    include_two_cidrs: "-i two CIDRs" => ["-i", "10.200.9.0/24,10.200.1.2/32"];
    include_loopback_cidr: "-i with loopback" => ["-i", "10.200.9.0/24,127.0.0.0/8"];
    exclude_cidr: "-x" => ["-x", "10.200.1.2/32"];
    outbound_ports: "-q/-o" => ["-i", "", "-q", "8080,15021", "-o", "9080"];
    outbound_port_exclude_with_all: "-o with -i *" => ["-o", "8080,15008"];
    inbound_port_list: "-b list" => ["-b", "9080,15021"];
    inbound_excludes: "-d" => ["-d", "9080,15020"];
    owner_lists: "-u/-g" => ["-u", "1337,1500", "-g", "1337,1600"];
    no_inbound: "-b ''" => ["-b", ""];
    no_outbound: "-i ''" => ["-i", ""];
    tunnel_port: "-e" => ["-e", "9080"];
    capture_ports: "-p/-z" => ["-p", "15011", "-z", "15016"];
    include_v6_cidr: "-i IPv6 CIDR" => ["-i", "fd00:200::/48"];
    exclude_v6_cidr: "-x IPv6" => ["-x", "fd00:200:0:1::2/128"];
    include_v6_loopback: "-i with ::1" => ["-i", "fd00:200:0:9::/64,::1/128"];
    cidrs_of_both_families: "-i/-x both families" => [
        "-i", "10.200.0.0/16,fd00:200::/48", "-x", "10.200.1.1/32,fd00:200:0:1::2/128"
    ];
}

/// `explain`'s text output is what iptables itself prints: loaded with iptables-restore and
/// read back with iptables-save, every rule comes back spelled the same, in the same order.
#[test]
fn explain_matches_iptables_save_spelling() {
    require_root();
    let flag_sets: &[&[&str]] = &[
        &[],
        &[
            "-i",
            "10.0.0.0/8,172.16.0.0/12",
            "-x",
            "10.96.0.1",
            "-q",
            "3306",
            "-o",
            "5432,53",
        ],
        &[
            "-b",
            "9080,8443",
            "-u",
            "1337,0",
            "-g",
            "1337",
            "-e",
            "15009",
            "-p",
            "15011",
            "-z",
            "15016",
        ],
        &["-b", "", "-i", "127.0.0.0/8"],
    ];
    let v6_sets: &[&[&str]] = &[
        &["-i", "fd00::/8,10.0.0.0/8", "-x", "fd00:200::1,10.96.0.1"],
        &["-i", "::1/128"],
    ];
    let cases = flag_sets
        .iter()
        .map(|f| ("ipv4", *f))
        .chain(flag_sets.iter().chain(v6_sets).map(|f| ("ipv6", *f)));
    for (family, flags) in cases {
        let (restore, save) = match family {
            "ipv4" => ("iptables-restore", "iptables-save"),
            _ => ("ip6tables-restore", "ip6tables-save"),
        };
        let pair = NetnsPair::create("dfx").expect("namespaces");
        let mut args = vec!["explain", "--family", family];
        args.extend_from_slice(flags);
        let out = agent_cmd(&args);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8(out.stdout).unwrap();
        redirect_tests::restore_with(restore, &pair.workload.name, &text);
        let saved = Command::new("ip")
            .args(["netns", "exec", &pair.workload.name, save, "-t", "nat"])
            .output()
            .unwrap();
        let saved = String::from_utf8_lossy(&saved.stdout);
        // iptables-save orders chains its own way; within a chain, order is rule order.
        let rules_by_chain = |t: &str| {
            let mut m = std::collections::BTreeMap::<String, Vec<String>>::new();
            for l in t.lines().filter(|l| l.starts_with("-A ")) {
                let chain = l.split_whitespace().nth(1).unwrap().to_owned();
                m.entry(chain).or_default().push(l.to_owned());
            }
            m
        };
        assert_eq!(
            rules_by_chain(&text),
            rules_by_chain(&saved),
            "explain --family {family} {flags:?} differs from {save}:\n{text}\n---\n{saved}"
        );
    }
}
