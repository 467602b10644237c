//! DNS capture against its oracle: for the same flags (`--redirect-dns`, with the resolvers of
//! a resolv.conf or `--capture-all-dns`), the kernel running istio-iptables' tables (nat with
//! ISTIO_OUTPUT_DNS, raw with its conntrack zones, loaded from `explain`) and the kernel running
//! the agent (`--proxy none`, a stand-in for istio-agent's DNS proxy listening on 15053 in the
//! workload) must send every query to the same place, the app must see the same answering
//! address (NAT's reverse translation in one, recvmsg/getpeername in the other), and every
//! rule of ISTIO_OUTPUT and ISTIO_OUTPUT_DNS must count the same: UDP flows included, each
//! counted once as conntrack sends only a flow's first datagram through nat.
//!
//! Each twin: a workload namespace (10.200.1.1) with a veth to a remote-host namespace that
//! holds a resolver on 10.200.1.2:53 and another on 10.200.1.3:53 (UDP and TCP), and a UDP
//! service on 10.200.1.2:5353; no default route. The workload listens on 127.0.0.1:15053 (UDP
//! and TCP: "dnsproxy") and 127.0.0.1:15001 (TCP: "cap-out").

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
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
use redirect_tests::{agent_bin, agent_cmd, ip6tables_restore, iptables_restore, require_root, testkit_bin};

const RESOLVER: Ipv4Addr = Ipv4Addr::new(10, 200, 1, 2);
/// A resolver the workload's resolv.conf does not name.
const OTHER: Ipv4Addr = Ipv4Addr::new(10, 200, 1, 3);
/// The same over IPv6: the resolver resolv.conf names, and one it does not.
const RESOLVER6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x200, 0, 1, 0, 0, 0, 2);
const OTHER6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x200, 0, 1, 0, 0, 0, 3);
const CHAINS: [&str; 2] = ["ISTIO_OUTPUT", "ISTIO_OUTPUT_DNS"];
/// A client: its uid (and gid), and the mark it sets on its socket.
type Client = (u32, Option<u32>);
/// The sidecar's clients: the app, and the proxy (exempt by its uid).
const SIDECAR_CLIENTS: &[Client] = &[(0, None), (1337, None)];
/// Both families' tables: `stats --json`'s family name and the oracle's command.
const TABLES: [(&str, &str); 2] = [("ipv4", "iptables"), ("ipv6", "ip6tables")];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Iptables,
    Agent,
}

/// What a client does, from inside the workload.
#[derive(Clone, Copy, Debug)]
enum Ask {
    /// One datagram with `sendto`, and its answer.
    Udp,
    /// One datagram on a socket `connect`ed first.
    UdpConnected,
    /// A TCP connection (its banner).
    Tcp,
}

/// A twin. Fields drop in order: agent, servers, cgroup, namespaces, the resolv.conf.
struct Twin {
    agent: Option<AgentProcess>,
    _servers: Vec<ServeProcess>,
    cgroup: TestCgroup,
    pair: NetnsPair,
    name: String,
}

fn explain(flags: &[String], family: &str) -> Explanation {
    let mut args = vec!["explain", "--json", "--family", family];
    args.extend(flags.iter().map(String::as_str));
    let out = agent_cmd(&args);
    assert!(
        out.status.success(),
        "explain {flags:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("explain --json")
}

impl Twin {
    fn new(kind: Kind, flags: &[String]) -> Self {
        let tag = match kind {
            Kind::Iptables => "dni",
            Kind::Agent => "dna",
        };
        let pair = NetnsPair::create(tag).expect("namespaces");
        assert_eq!(pair.remote_ip, RESOLVER, "the pair's remote address");
        assert_eq!(pair.remote_ip6, RESOLVER6, "the pair's remote IPv6 address");
        pair.remote
            .ip(&["addr", "add", &format!("{OTHER}/24"), "dev", "r0"])
            .expect("second resolver address");
        pair.remote
            .ip(&["addr", "add", &format!("{OTHER6}/64"), "dev", "r0", "nodad"])
            .expect("second IPv6 resolver address");
        let cgroup = TestCgroup::create(tag).expect("cgroup");
        let mut twin = Self {
            agent: None,
            _servers: Vec::new(),
            cgroup,
            pair,
            name: unique(tag),
        };
        match kind {
            Kind::Iptables => {
                let ns = &twin.pair.workload.name;
                iptables_restore(ns, &explain(flags, "ipv4").iptables_save);
                ip6tables_restore(ns, &explain(flags, "ipv6").iptables_save);
                // istio-iptables adds the IPv6 passthrough source with its ip6tables rules.
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
                args.extend(flags.iter().cloned());
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                twin.agent = Some(AgentProcess::start(&agent_bin(), &twin.name, &args).expect("agent starts"));
            }
        }
        let local = |port| SocketAddr::from(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port));
        let local6 = |port| SocketAddr::new(Ipv6Addr::LOCALHOST.into(), port);
        let remote = |ip: IpAddr, port| SocketAddr::new(ip, port);
        let (r4, o4, r6, o6) = (RESOLVER.into(), OTHER.into(), RESOLVER6.into(), OTHER6.into());
        let proxy = vec![
            ("dnsproxy".to_string(), local(15053)),
            ("dnsproxy6".to_string(), local6(15053)),
        ];
        let testkit = testkit_bin();
        twin._servers = vec![
            // istio-agent's DNS proxy runs as the proxy's uid: the raw table's zones (and the
            // owner rules) know its answers by it.
            ServeProcess::start_full(
                &testkit,
                Some(&twin.cgroup.path),
                &twin.pair.workload.path,
                &proxy,
                &proxy,
                Some(1337),
            )
            .expect("DNS proxy stand-in"),
            ServeProcess::start(
                &testkit,
                Some(&twin.cgroup.path),
                &twin.pair.workload.path,
                &[
                    ("cap-out".to_string(), local(15001)),
                    ("cap-out6".to_string(), local6(15001)),
                ],
            )
            .expect("workload servers"),
            ServeProcess::start_with_udp(
                &testkit,
                None,
                &twin.pair.remote.path,
                &[
                    ("resolver".to_string(), remote(r4, 53)),
                    ("other".to_string(), remote(o4, 53)),
                    ("resolver6".to_string(), remote(r6, 53)),
                    ("other6".to_string(), remote(o6, 53)),
                ],
                &[
                    ("resolver".to_string(), remote(r4, 53)),
                    ("other".to_string(), remote(o4, 53)),
                    ("svc".to_string(), remote(r4, 5353)),
                    ("resolver6".to_string(), remote(r6, 53)),
                    ("other6".to_string(), remote(o6, 53)),
                    ("svc6".to_string(), remote(r6, 5353)),
                ],
            )
            .expect("remote servers"),
        ];
        twin
    }

    /// Per-rule counts of both families' ISTIO_OUTPUT and ISTIO_OUTPUT_DNS (ambient: its
    /// ISTIO_OUTPUT; iptables' nat packet counters count flows: only a flow's first packet
    /// traverses nat).
    fn counts(&self, chains: &[&'static str]) -> BTreeMap<(&'static str, &'static str), Vec<u64>> {
        let mut counts = BTreeMap::new();
        match &self.agent {
            Some(_) => {
                let out = agent_cmd(&["stats", "--name", &self.name, "--json"]);
                assert!(out.status.success(), "stats: {}", String::from_utf8_lossy(&out.stderr));
                let stats: InstanceStats = serde_json::from_slice(&out.stdout).expect("stats --json");
                for ((family, _), &chain) in TABLES.iter().flat_map(|t| chains.iter().map(move |c| (*t, c))) {
                    let rows = stats
                        .rules
                        .iter()
                        .filter(|r| r.chain == chain && r.family == family)
                        .map(|r| r.connections)
                        .collect();
                    counts.insert((family, chain), rows);
                }
            }
            None => {
                for ((family, tool), &chain) in TABLES.iter().flat_map(|t| chains.iter().map(move |c| (*t, c))) {
                    let out = Command::new("ip")
                        .args(["netns", "exec", &self.pair.workload.name])
                        .args([tool, "-t", "nat", "-L", chain, "-v", "-n", "-x"])
                        .output()
                        .expect("iptables -L");
                    // ip6tables has no ISTIO_OUTPUT_DNS without an IPv6 server to capture.
                    let rows = String::from_utf8_lossy(&out.stdout)
                        .lines()
                        .skip(2)
                        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
                        .collect();
                    counts.insert((family, chain), rows);
                }
            }
        }
        counts
    }

    fn ask(&self, (uid, mark): Client, ask: Ask, to: SocketAddr) -> String {
        let spec = ProbeSpec::new(&self.cgroup.path, &self.pair.workload.path, to)
            .uid(uid)
            .gid(uid);
        let spec = match mark {
            Some(m) => spec.mark(m),
            None => spec,
        };
        let spec = match ask {
            Ask::Udp => spec.udp_exchange(false),
            Ask::UdpConnected => spec.udp_exchange(true),
            Ask::Tcp => spec,
        };
        verdict(&spec.run(&testkit_bin()).expect("probe runs"))
    }
}

/// Who answered, and who the app's socket says answered (for UDP, the datagram's source or
/// the connected peer; for TCP, its peer).
fn verdict(r: &ProbeResult) -> String {
    match r.outcome {
        Outcome::Ok => format!(
            "{} from {}",
            r.banner_field("name").unwrap_or("?"),
            r.peer.as_deref().unwrap_or("?")
        ),
        other => format!("{other:?}"),
    }
}

fn resolv_conf(dir: &Path) -> PathBuf {
    let path = dir.join("resolv.conf");
    std::fs::write(
        &path,
        format!("search svc.cluster.local\nnameserver {RESOLVER}\nnameserver {RESOLVER6}\n"),
    )
    .unwrap();
    path
}

/// Runs the clients in both twins and holds the agent to iptables, verdict by verdict and
/// counter by counter.
fn dns_differential(extra: &[&str], clients: &[Client]) {
    let ambient = extra.contains(&"ambient");
    let chains: &[&str] = if ambient { &CHAINS[..1] } else { &CHAINS };
    require_root();
    let dir = std::env::temp_dir().join(unique("dns"));
    std::fs::create_dir_all(&dir).unwrap();
    let mut flags: Vec<String> = vec!["--redirect-dns".into(), "--resolv-conf".into()];
    flags.push(resolv_conf(&dir).to_string_lossy().into_owned());
    flags.extend(extra.iter().map(|s| s.to_string()));
    let twins = [Twin::new(Kind::Iptables, &flags), Twin::new(Kind::Agent, &flags)];
    let to = |ip: IpAddr, port| SocketAddr::new(ip, port);
    let mut scenarios = Vec::new();
    for &client in clients {
        for (resolver, other) in [(RESOLVER.into(), OTHER.into()), (RESOLVER6.into(), OTHER6.into())] {
            for ask in [Ask::Udp, Ask::UdpConnected, Ask::Tcp] {
                for dst in [to(resolver, 53), to(other, 53)] {
                    scenarios.push((client, ask, dst));
                }
            }
            scenarios.push((client, Ask::Udp, to(resolver, 5353)));
        }
    }
    let mut report = String::new();
    let mut differ = 0;
    for &(client, ask, dst) in &scenarios {
        let [a, b] = [&twins[0], &twins[1]].map(|t| t.ask(client, ask, dst));
        let mark = if a == b { " " } else { "!" };
        if a != b {
            differ += 1;
        }
        report.push_str(&format!(
            "{mark} {client:<18?} {ask:<13?} {dst:<24} iptables: {a:<48} agent: {b}\n"
        ));
    }
    let [ca, cb] = [&twins[0], &twins[1]].map(|t| t.counts(chains));
    println!("DNS capture {extra:?}:\n{report}counters iptables {ca:?}\n         agent    {cb:?}");
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(differ, 0, "{differ} verdicts differ:\n{report}");
    assert_eq!(ca, cb, "counters differ");
    // The scenarios reached the DNS rules (each twin alike, so this is about the scenarios):
    // queries of either family answered by the DNS proxy.
    for proxy in ["dnsproxy from", "dnsproxy6 from"] {
        assert!(report.contains(proxy), "no query reached {proxy}:\n{report}");
    }
    if !ambient {
        for family in ["ipv4", "ipv6"] {
            assert!(
                ca[&(family, "ISTIO_OUTPUT_DNS")].iter().sum::<u64>() > 0,
                "no {family} query was captured: {ca:?}"
            );
        }
    }
}

/// DNS to the resolvers of resolv.conf goes to the DNS proxy; the proxy's own queries, and
/// queries to another resolver, do not (the latter are ordinary outbound traffic: TCP to
/// ISTIO_REDIRECT, UDP left alone).
#[test]
fn dns_to_resolv_conf_servers_is_captured_as_iptables_does() {
    dns_differential(&[], SIDECAR_CLIENTS);
}

/// With `--capture-all-dns`, port 53 to any address.
#[test]
fn capture_all_dns_is_captured_as_iptables_does() {
    dns_differential(&["--capture-all-dns"], SIDECAR_CLIENTS);
}

/// Ambient's DNS capture: port 53 to anywhere (UDP not over lo, TCP not to 127.0.0.1) to
/// 15053, but ztunnel's own queries (its mark, whatever the uid).
#[test]
fn ambient_dns_is_captured_as_iptables_does() {
    dns_differential(&["--mode", "ambient"], &[(0, None), (1337, None), (0, Some(0x539))]);
}

/// `/etc/netns/NAME/resolv.conf`, which `ip netns exec NAME` mounts over the resolver's file;
/// removed on drop.
struct NetnsResolvConf(PathBuf);

impl NetnsResolvConf {
    fn write(netns: &str, text: &str) -> Self {
        let dir = Path::new("/etc/netns").join(netns);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("resolv.conf"), text).unwrap();
        Self(dir)
    }
}

impl Drop for NetnsResolvConf {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A resolver in the remote namespace answering every A query with one address, and the
/// resolv.conf that names it (a file to give the agent, and the workload namespace's own for
/// `ip netns exec`); everything removed on drop.
struct ResolverWorld {
    resolv_conf: PathBuf,
    dir: PathBuf,
    _netns_conf: NetnsResolvConf,
    _resolver: ServeProcess,
}

impl ResolverWorld {
    fn new(w: &redirect_tests::Workload, conf: String, answer: Ipv4Addr) -> Self {
        let dir = std::env::temp_dir().join(unique("dnsw"));
        std::fs::create_dir_all(&dir).unwrap();
        let resolv_conf = dir.join("resolv.conf");
        std::fs::write(&resolv_conf, &conf).unwrap();
        let resolver = SocketAddr::from(SocketAddrV4::new(w.pair.remote_ip, 53));
        Self {
            resolv_conf,
            dir,
            _netns_conf: NetnsResolvConf::write(&w.pair.workload.name, &conf),
            _resolver: ServeProcess::start_dns(&testkit_bin(), &w.pair.remote.path, resolver, answer)
                .expect("resolver"),
        }
    }
}

impl Drop for ResolverWorld {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `svc.test` as glibc's resolver in the workload finds it (`getent`, inside its cgroup, where
/// `run` captures, and namespace), with `RES_OPTIONS` `options`: what it printed.
fn resolve(w: &redirect_tests::Workload, options: &str) -> String {
    let script = format!(
        "echo $$ > {}/cgroup.procs && exec ip netns exec {} getent ahostsv4 svc.test",
        w.cgroup.path.display(),
        w.pair.workload.name
    );
    let out = Command::new("timeout")
        .args(["20", "sh", "-c", &script])
        .env("RES_OPTIONS", options)
        .output()
        .expect("getent");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Node mode: a pod enrolled with DNS capture resolves through the embedded proxy, and still
/// does after a new agent took over (the DNS proxy's sockets are handed over with the
/// listeners: the new one could not bind 15053 while the old one holds it).
#[test]
fn embedded_dns_survives_a_node_handover() {
    require_root();
    let answer = Ipv4Addr::new(10, 200, 1, 78);
    let agent = redirect_tests::node::NodeAgent::new("node-dns", &[]);
    let first = agent.start().expect("node agent starts");
    let w = redirect_tests::Workload::new_on("ndns", 61);
    let world = ResolverWorld::new(&w, format!("nameserver {}\n", w.pair.remote_ip), answer);
    let file = &world.resolv_conf;
    let cg = w.cgroup.path.to_string_lossy().into_owned();
    let file_arg = file.to_string_lossy().into_owned();
    agent.enroll(
        &w.pair.workload.path,
        "dns",
        &["--cgroup", &cg, "--", "--redirect-dns", "--resolv-conf", &file_arg],
    );
    let before = resolve(&w, "attempts:1");
    assert!(before.contains(&answer.to_string()), "before the handover: {before:?}");
    let second = agent.start().expect("the new agent takes over");
    assert!(second.log().contains("a running agent handed over"), "{}", second.log());
    drop(first);
    let after = resolve(&w, "attempts:2");
    assert!(
        after.contains(&answer.to_string()),
        "after the handover: {after:?}\n{}",
        second.log()
    );
}

/// An app resolves a name with glibc's resolver (`getent`), over UDP and (`use-vc`) over TCP,
/// against a resolver in the remote namespace, through the embedded proxy's DNS on 15053: it
/// gets the resolver's answer, and the DNS rules counted each query.
#[test]
fn the_embedded_proxy_answers_dns_from_the_workloads_resolver() {
    require_root();
    let answer = Ipv4Addr::new(10, 200, 1, 77);
    let mut w = redirect_tests::Workload::new("dnse");
    let world = ResolverWorld::new(&w, format!("nameserver {}\n", w.pair.remote_ip), answer);
    let file = &world.resolv_conf;
    w.start_agent(&["--redirect-dns", "--resolv-conf", &file.to_string_lossy()])
        .expect("agent starts");
    let resolve = |options: &str| resolve(&w, options);
    let dns_counts = |w: &redirect_tests::Workload| w.chain_counts("ISTIO_OUTPUT_DNS");
    assert_eq!(dns_counts(&w), [0, 0]);
    let udp = resolve("attempts:1");
    assert!(udp.contains(&answer.to_string()), "over UDP: {udp:?}");
    let after_udp = dns_counts(&w);
    assert!(
        after_udp[0] == 0 && after_udp[1] >= 1,
        "the UDP rule counted the query: {after_udp:?}"
    );
    let tcp = resolve("use-vc attempts:1");
    assert!(tcp.contains(&answer.to_string()), "over TCP: {tcp:?}");
    let after_tcp = dns_counts(&w);
    assert!(after_tcp[0] >= 1, "the TCP rule counted the query: {after_tcp:?}");
}

/// Runs python `script` in the twin's workload (its cgroup and namespace) and `remote` in the
/// remote namespace, at once; what each printed.
fn run_py(t: &Twin, script: &str, remote: &str) -> (String, String) {
    let workload = format!(
        "echo $$ > {}/cgroup.procs && exec ip netns exec {} timeout 90 python3 -c \"$SCRIPT\"",
        t.cgroup.path.display(),
        t.pair.workload.name
    );
    let text = |o: std::process::Output| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    };
    std::thread::scope(|s| {
        let a = s.spawn(|| {
            Command::new("sh")
                .args(["-c", &workload])
                .env("SCRIPT", script)
                .output()
                .expect("python in the workload")
        });
        let b = s.spawn(|| {
            Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &t.pair.remote.name,
                    "timeout",
                    "90",
                    "python3",
                    "-c",
                    remote,
                ])
                .output()
                .expect("python in the remote namespace")
        });
        (text(a.join().unwrap()), text(b.join().unwrap()))
    })
}

/// Runs the scripts in both twins at once and holds the agent's counters to iptables'.
fn udp_flows(workload: &str, remote: &str) {
    require_root();
    let dir = std::env::temp_dir().join(unique("dnsf"));
    std::fs::create_dir_all(&dir).unwrap();
    let flags = vec![
        "--redirect-dns".to_string(),
        "--resolv-conf".into(),
        resolv_conf(&dir).to_string_lossy().into_owned(),
    ];
    let twins = [Twin::new(Kind::Iptables, &flags), Twin::new(Kind::Agent, &flags)];
    let out: Vec<(String, String)> = std::thread::scope(|s| {
        twins
            .each_ref()
            .map(|t| s.spawn(|| run_py(t, workload, remote)))
            .map(|h| h.join().unwrap())
            .into()
    });
    let [ca, cb] = twins.each_ref().map(|t| t.counts(&CHAINS));
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(
        ca, cb,
        "counters differ; iptables twin: {:?}\nagent twin: {:?}",
        out[0], out[1]
    );
    assert!(
        ca[&("ipv4", "ISTIO_OUTPUT")].iter().sum::<u64>() > 0,
        "no flow counted: {ca:?} {out:?}"
    );
}

/// Several datagrams of one flow count once, and one socket's flows to several destinations
/// each once.
#[test]
fn udp_flows_count_once_per_flow() {
    udp_flows(
        r#"
import socket
a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); a.settimeout(3)
for i in range(5):
    a.sendto(b'x', ('10.200.1.2', 5353)); print(a.recvfrom(512)[1])
for i in range(3):
    a.sendto(b'\0' * 12, ('10.200.1.2', 53)); print(a.recvfrom(512)[1])
    a.sendto(b'\0' * 12, ('10.200.1.3', 53)); print(a.recvfrom(512)[1])
"#,
        "pass",
    );
}

/// conntrack's timeouts: an answered flow lives 120 s quiet (not 30), and a datagram from a
/// peer whose old flow with the socket expired begins a flow of the peer's, whose answer nat
/// never sees. About 40 s.
#[test]
fn udp_flows_age_as_conntrack_does() {
    udp_flows(
        r#"
import socket, time
R = ('10.200.1.2', 5353)
a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); a.settimeout(3)
a.sendto(b'x', R); print('a1', a.recvfrom(512)[1])
time.sleep(3)
a.sendto(b'x', R); print('a2', a.recvfrom(512)[1])
b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); b.bind(('0.0.0.0', 9001))
b.sendto(b'y', ('10.200.1.2', 7000))
time.sleep(36)
a.sendto(b'x', R); print('a3', a.recvfrom(512)[1])
b.settimeout(15); d, p = b.recvfrom(512); print('b got', p); b.sendto(b'reply', p)
"#,
        r#"
import socket, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(('10.200.1.2', 7000))
time.sleep(40)
s.sendto(b'hello', ('10.200.1.1', 9001)); s.settimeout(5); print('remote got', s.recvfrom(512))
"#,
    );
}

/// resolv.conf names an unreachable resolver first: the embedded proxy asks the next, as the
/// app's own resolver would have.
#[test]
fn the_embedded_proxy_fails_over_to_the_next_resolver() {
    require_root();
    let answer = Ipv4Addr::new(10, 200, 1, 79);
    let mut w = redirect_tests::Workload::new("dnsv");
    let world = ResolverWorld::new(
        &w,
        format!("nameserver 10.200.1.99\nnameserver {}\n", w.pair.remote_ip),
        answer,
    );
    let file = &world.resolv_conf;
    w.start_agent(&["--redirect-dns", "--resolv-conf", &file.to_string_lossy()])
        .expect("agent starts");
    // One attempt of 5 s at the first server the app knows: the proxy must fail over within it.
    let got = resolve(&w, "attempts:1 timeout:5");
    assert!(
        got.contains(&answer.to_string()),
        "through the second resolver: {got:?}"
    );
}
