//! The agent against its oracle: for the same flags, the kernel running istio-iptables' nat
//! rules (loaded from `redirect-agent explain` with iptables-restore) and the kernel running
//! the agent (`--proxy none`) must send every connection to the same place.
//!
//! Each configuration builds two identical topologies: a workload namespace (10.200.1.1) with a
//! veth to a remote-host namespace (10.200.1.2), no default route, and a cgroup. In both, a
//! workload process listens on the two capture ports and on every port of the matrix, and the
//! remote host listens on the same ports; every server answers with a banner naming itself.
//! The same scenarios run in both twins, and each one's verdict (which capture port, which
//! original destination, or which failure) must be equal.

use std::{
    collections::BTreeSet,
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddrV4},
    process::Command,
};

use redirect_agent::{explain::Explanation, stats::InstanceStats};
use redirect_testkit::{
    agent::AgentProcess,
    cgroup::TestCgroup,
    netns::NetnsPair,
    probe::ProbeSpec,
    report::{Outcome, ProbeResult},
    serve::ServeProcess,
    unique,
};
use redirect_tests::{agent_bin, agent_cmd, iptables_restore, require_root, testkit_bin};

const PASSTHROUGH: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);
/// istio-validation's probe: uid 1337 dials 127.0.0.6:15002 from a socket bound to 127.0.0.1.
const VALIDATION_PORT: u16 = 15002;
/// Ports every configuration probes: a remote service, the app, the tunnel, the status port
/// (excluded inbound by default) and a metrics port.
const BASE_PORTS: [u16; 5] = [8080, 9080, 15008, 15020, 15021];

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

impl Twin {
    fn new(kind: Kind, cfg: &Config, explain: &Explanation, listen_ports: &[u16], capture: (u16, u16)) -> Self {
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
        match kind {
            Kind::Iptables => iptables_restore(&twin.pair.workload.name, &explain.iptables_save),
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
        let any = |p| SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, p);
        let mut workload = vec![
            ("cap-out".to_string(), any(capture.0)),
            ("cap-in".to_string(), any(capture.1)),
        ];
        workload.extend(listen_ports.iter().map(|&p| (format!("pod-{p}"), any(p))));
        let remote: Vec<_> = listen_ports
            .iter()
            .map(|&p| (format!("remote-{p}"), SocketAddrV4::new(twin.pair.remote_ip, p)))
            .collect();
        let testkit = testkit_bin();
        twin._servers = vec![
            ServeProcess::start(&testkit, Some(&twin.cgroup.path), &twin.pair.workload.path, &workload)
                .expect("workload servers"),
            ServeProcess::start(&testkit, None, &twin.pair.remote.path, &remote).expect("remote servers"),
        ];
        twin
    }

    /// Per-rule counts of `chain`, in rule order: the agent's counters, or the packet counters
    /// of the nat rules (only a connection's first packet traverses nat, so those count
    /// connections too).
    fn counts(&self, chain: &str) -> Vec<u64> {
        match &self.agent {
            Some(_) => {
                let out = agent_cmd(&["stats", "--name", &self.name, "--json"]);
                let stats: InstanceStats = serde_json::from_slice(&out.stdout).expect("stats --json");
                stats
                    .rules
                    .iter()
                    .filter(|r| r.chain == chain && r.family == "ipv4")
                    .map(|r| r.connections)
                    .collect()
            }
            None => {
                let out = Command::new("ip")
                    .args(["netns", "exec", &self.pair.workload.name])
                    .args(["iptables", "-t", "nat", "-L", chain, "-v", "-n", "-x", "--line-numbers"])
                    .output()
                    .expect("iptables -L");
                assert!(out.status.success(), "iptables -L {chain}");
                // Two header lines, then "num pkts bytes target ...".
                String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .skip(2)
                    .filter_map(|l| l.split_whitespace().nth(1)?.parse().ok())
                    .collect()
            }
        }
    }

    fn counters(&self) -> String {
        match &self.agent {
            Some(_) => {
                let out = agent_cmd(&["stats", "--name", &self.name]);
                String::from_utf8_lossy(&out.stdout).into_owned()
            }
            None => {
                let out = Command::new("ip")
                    .args(["netns", "exec", &self.pair.workload.name])
                    .args(["iptables", "-t", "nat", "-L", "-v", "-n", "--line-numbers"])
                    .output()
                    .expect("iptables -L");
                String::from_utf8_lossy(&out.stdout).into_owned()
            }
        }
    }
}

/// Who connects: from inside the workload (identity and source) or from the remote host.
#[derive(Clone, Debug)]
struct Client {
    inbound: bool,
    uid: u32,
    gid: u32,
    bind: Option<Ipv4Addr>,
}

impl Client {
    fn label(&self) -> String {
        if self.inbound {
            return "remote host".into();
        }
        let bind = self.bind.map_or_else(String::new, |b| format!(" bind={b}"));
        format!("uid={} gid={}{bind}", self.uid, self.gid)
    }
}

/// Where a connection landed, named the same way in both twins. A capture listener (the
/// stand-in for Envoy) also says what `getsockopt(SO_ORIGINAL_DST)` answered on the accepted
/// socket: conntrack's answer in the iptables twin, the agent's getsockopt program's in the
/// other. (On a direct landing conntrack answers too, for any tracked connection, and the agent
/// leaves the kernel's ENOENT: only captured connections are compared. For the same reason a
/// connection made straight to a capture port, which nobody redirected, reads as `orig=none`
/// in both: ENOENT from the agent, and conntrack's identity answer, the socket's own address.)
fn verdict(r: &ProbeResult, capture: (u16, u16)) -> String {
    let local = r.banner_field("local");
    // The port the accepting listener listens on (sk_lookup leaves a captured connection's
    // local port as it was dialed).
    let listener_port = match r.banner_field("name") {
        Some("cap-out") => Some(capture.0),
        Some("cap-in") => Some(capture.1),
        _ => None,
    };
    let on_capture_port = local
        .and_then(|l| l.parse::<SocketAddrV4>().ok())
        .is_some_and(|l| Some(l.port()) == listener_port);
    let orig = match r.banner_field("orig") {
        None | Some("-") => "none",
        Some(o) if on_capture_port && Some(o) == local => "none",
        Some(o) => o,
    };
    match r.outcome {
        Outcome::Ok => match r.banner_field("name") {
            Some("cap-out") => format!("capture:outbound orig={orig}"),
            Some("cap-in") => format!("capture:inbound orig={orig}"),
            Some(server) => format!("original:{server}"),
            None => "no banner".into(),
        },
        Outcome::Refused => "refused".into(),
        other => {
            let err = r.error.as_deref().unwrap_or("");
            format!("{other:?}: {err}").to_lowercase()
        }
    }
}

struct Matrix {
    clients: Vec<(Client, Vec<SocketAddrV4>)>,
    capture: (u16, u16),
}

impl Matrix {
    fn build(cfg: &Config, listen_ports: &[u16], capture: (u16, u16)) -> Self {
        let pod_ip = Ipv4Addr::new(10, 200, 1, 1);
        let remote_ip = Ipv4Addr::new(10, 200, 1, 2);
        let mut ids: Vec<(u32, u32)> = vec![(0, 0), (1337, 1337), (1337, 0), (1000, 1337)];
        for u in list_of::<u32>(cfg.flags, "-u") {
            ids.push((u, 0));
        }
        for g in list_of::<u32>(cfg.flags, "-g") {
            ids.push((1000, g));
        }
        ids.sort();
        ids.dedup();
        let dsts = [remote_ip, pod_ip, Ipv4Addr::LOCALHOST, Ipv4Addr::new(127, 0, 0, 2)];
        let mut clients = Vec::new();
        for &(uid, gid) in &ids {
            for bind in [None, Some(PASSTHROUGH)] {
                let targets = dsts
                    .iter()
                    .flat_map(|&ip| listen_ports.iter().map(move |&p| SocketAddrV4::new(ip, p)))
                    .collect();
                clients.push((
                    Client {
                        inbound: false,
                        uid,
                        gid,
                        bind,
                    },
                    targets,
                ));
            }
            clients.push((
                Client {
                    inbound: false,
                    uid,
                    gid,
                    bind: Some(Ipv4Addr::LOCALHOST),
                },
                vec![SocketAddrV4::new(PASSTHROUGH, VALIDATION_PORT)],
            ));
        }
        let mut inbound_ports: BTreeSet<u16> = listen_ports.iter().copied().collect();
        inbound_ports.extend([capture.0, capture.1]);
        clients.push((
            Client {
                inbound: true,
                uid: 0,
                gid: 0,
                bind: None,
            },
            inbound_ports.iter().map(|&p| SocketAddrV4::new(pod_ip, p)).collect(),
        ));
        Self { clients, capture }
    }

    fn run(&self, twin: &Twin) -> Vec<String> {
        let testkit = testkit_bin();
        let mut out = Vec::new();
        for (client, targets) in &self.clients {
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
            let results = spec
                .bytes(16)
                .run_batch(&testkit, targets)
                .unwrap_or_else(|e| panic!("probes of {}: {e}", client.label()));
            out.extend(results.iter().map(|r| verdict(r, self.capture)));
        }
        out
    }

    fn len(&self) -> usize {
        self.clients.iter().map(|(_, t)| t.len()).sum()
    }
}

fn differential(cfg: Config) {
    require_root();
    let explain = {
        let mut args = vec!["explain", "--json"];
        args.extend_from_slice(cfg.flags);
        let out = agent_cmd(&args);
        assert!(
            out.status.success(),
            "explain {:?}: {}",
            cfg.flags,
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<Explanation>(&out.stdout).expect("explain --json")
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
    let oracle = Twin::new(Kind::Iptables, &cfg, &explain, &ports, capture);
    let agent = Twin::new(Kind::Agent, &cfg, &explain, &ports, capture);
    let want = matrix.run(&oracle);
    let got = matrix.run(&agent);

    let mut table = String::new();
    let _ = writeln!(table, "differential '{}' (flags {:?}):", cfg.name, cfg.flags);
    let _ = writeln!(
        table,
        "  {:<34} {:<20} {:<44} {:<44}",
        "client", "destination", "iptables", "agent"
    );
    let mut mismatches = 0;
    let mut i = 0;
    for (client, targets) in &matrix.clients {
        for t in targets {
            let mark = if want[i] == got[i] { " " } else { "✗" };
            if want[i] != got[i] {
                mismatches += 1;
            }
            let _ = writeln!(
                table,
                "{mark} {:<34} {:<20} {:<44} {:<44}",
                client.label(),
                t.to_string(),
                want[i],
                got[i]
            );
            i += 1;
        }
    }
    let _ = writeln!(table, "  {} scenarios, {} mismatches", matrix.len(), mismatches);
    println!("{table}");
    if mismatches > 0 {
        panic!(
            "{mismatches} of {} scenarios differ for '{}':\n{table}\nagent counters:\n{}\niptables counters:\n{}",
            matrix.len(),
            cfg.name,
            agent.counters(),
            oracle.counters()
        );
    }
    // Every rule counted the same decisions as its iptables twin.
    for chain in ["ISTIO_OUTPUT", "ISTIO_INBOUND"] {
        let (want, got) = (oracle.counts(chain), agent.counts(chain));
        println!("  {chain} per rule: iptables {want:?}, agent {got:?}");
        assert_eq!(
            got,
            want,
            "{chain} counters differ for '{}'\nagent:\n{}\niptables:\n{}",
            cfg.name,
            agent.counters(),
            oracle.counters()
        );
    }
    // Sanity: the matrix exercised every kind of verdict it can, so equality means something.
    let kinds: BTreeSet<&str> = want.iter().map(|v| v.split(':').next().unwrap()).collect();
    assert!(kinds.contains("original"), "no scenario went direct: {kinds:?}");
    // Conntrack answered SO_ORIGINAL_DST for every captured connection in the oracle, so the
    // equal answers above are the agent's getsockopt program answering, not two failures.
    let captured: Vec<&String> = want.iter().filter(|v| v.starts_with("capture:")).collect();
    assert!(
        captured.iter().all(|v| !v.ends_with("orig=-")),
        "conntrack left SO_ORIGINAL_DST unanswered: {captured:?}"
    );
    println!(
        "  {} captured connections, SO_ORIGINAL_DST equal in both",
        captured.len()
    );
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
    for flags in flag_sets {
        let pair = NetnsPair::create("dfx").expect("namespaces");
        let mut args = vec!["explain"];
        args.extend_from_slice(flags);
        let out = agent_cmd(&args);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8(out.stdout).unwrap();
        iptables_restore(&pair.workload.name, &text);
        let saved = Command::new("ip")
            .args(["netns", "exec", &pair.workload.name, "iptables-save", "-t", "nat"])
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
            "explain {flags:?} differs from iptables-save:\n{text}\n---\n{saved}"
        );
    }
}
