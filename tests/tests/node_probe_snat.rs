//! The node's half of ambient mode's probe exemption: istio-cni's node agent SNATs every TCP
//! connection a socket of the node makes to an ambient pod (the kubelet's probes) to
//! 169.254.7.127, and fd16:9254:7127:1337:ffff:ffff:ffff:ffff for IPv6, whose ISTIO_PRERT
//! then accepts them uncaptured:
//!
//! ```text
//! -t nat -A POSTROUTING -j ISTIO_POSTRT
//! -t nat -A ISTIO_POSTRT -m owner --socket-exists -p tcp -m set --match-set istio-inpod-probes-v4 dst -j SNAT --to-source 169.254.7.127
//! ```
//!
//! Each test's node is a namespace of its own, with the node agent running inside (its
//! processes' namespace is the node's to them). The oracle is that rule (the set's one member
//! written as `-d`) in another node namespace, with the pod's rules from `explain --mode
//! ambient`: the app must see the same source, and ISTIO_PRERT count the same, in both.

use std::{
    io::BufReader,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream},
    process::Command,
    time::Duration,
};

use redirect_agent::{explain::Explanation, stats::InstanceStats};
use redirect_testkit::{
    netns::{NamedNetns, NetnsPair, veth},
    server::{TestServer, read_banner},
};
use redirect_tests::{
    agent_cmd, ip6tables_restore, iptables_restore,
    node::{NodeAgent, metric},
};

const PROBE_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 7, 127);
const PROBE_V6: Ipv6Addr = Ipv6Addr::new(0xfd16, 0x9254, 0x7127, 0x1337, 0xffff, 0xffff, 0xffff, 0xffff);
const APP_PORT: u16 = 8080;
const AMBIENT: &[&str] = &["--", "--mode", "ambient"];

/// A pod on the node, with an app listening on both families' wildcard addresses.
struct Pod {
    ns: NamedNetns,
    v4: Ipv4Addr,
    v6: Ipv6Addr,
    _app: [TestServer; 2],
}

/// A node with its pods: `pair.remote` is the node, `pair.workload` the first pod (moved
/// into `pods`), each other pod wired to the node on a subnet of its own.
struct Node {
    ns: NamedNetns,
    /// The node's own addresses toward the first pod.
    v4: Ipv4Addr,
    v6: Ipv6Addr,
    pods: Vec<Pod>,
}

impl Node {
    fn new(tag: &str, subnet: u8, more_pods: u8) -> Self {
        let pair = NetnsPair::create_on(tag, subnet).expect("namespaces");
        let (v4, v6) = (pair.remote_ip, pair.remote_ip6);
        let first = Pod::serve(
            pair.workload,
            pair.workload_ip,
            pair.workload_ip6,
            pair.remote_ip,
            pair.remote_ip6,
        );
        let mut node = Self {
            ns: pair.remote,
            v4,
            v6,
            pods: vec![first],
        };
        for n in 1..=more_pods {
            let subnet = subnet + n;
            let ns = NamedNetns::create(&format!("{}-p{n}", node.ns.name)).expect("a pod namespace");
            veth((&ns, "w0"), (&node.ns, &format!("r{n}")), subnet).expect("the pod's veth");
            let (pod6, node6) = redirect_testkit::netns::pair_ip6(subnet);
            let pod = Pod::serve(
                ns,
                Ipv4Addr::new(10, 200, subnet, 1),
                pod6,
                Ipv4Addr::new(10, 200, subnet, 2),
                node6,
            );
            node.pods.push(pod);
        }
        node
    }

    /// A TCP connection of the node's to pod `i`'s app, as the kubelet's probe makes it: the
    /// source the app saw.
    fn probe(&self, i: usize, ip: IpAddr) -> IpAddr {
        let to = SocketAddr::new(ip, APP_PORT);
        let stream = self
            .ns
            .open()
            .unwrap()
            .run(|| TcpStream::connect_timeout(&to, Duration::from_secs(5)))
            .unwrap_or_else(|e| panic!("the node's connection to pod {i} at {to}: {e}"));
        stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let banner = read_banner(&mut BufReader::new(stream)).expect("the app's banner");
        let peer = banner
            .split_whitespace()
            .find_map(|f| f.strip_prefix("peer="))
            .unwrap_or_else(|| panic!("no peer in {banner:?}"));
        peer.parse::<SocketAddr>().expect("the peer's address").ip()
    }

    /// The sources pod `i`'s app sees on the node's connections to its address of each family.
    fn sources(&self, i: usize) -> [IpAddr; 2] {
        let pod = &self.pods[i];
        [self.probe(i, pod.v4.into()), self.probe(i, pod.v6.into())]
    }

    /// Neither probe source is on the node's `lo`.
    fn assert_no_probe_source(&self) {
        let lo = self.lo();
        assert!(
            !lo.contains(&PROBE_V4.to_string()) && !lo.contains(&PROBE_V6.to_string()),
            "a probe source was left on the node's lo:\n{lo}"
        );
    }

    /// The addresses on the node's `lo`.
    fn lo(&self) -> String {
        let out = Command::new("ip")
            .args(["-n", &self.ns.name, "addr", "show", "dev", "lo"])
            .output()
            .expect("ip addr");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Pod {
    fn serve(ns: NamedNetns, v4: Ipv4Addr, v6: Ipv6Addr, node4: Ipv4Addr, node6: Ipv6Addr) -> Self {
        // The app's two listeners share the port, each family on its own.
        ns.sysctl("net.ipv6.bindv6only", "1").expect("bindv6only");
        // The replies to the probe sources go back through the node, as a pod's default
        // route would take them (these namespaces have none).
        ns.ip(&[
            "-4",
            "route",
            "add",
            &format!("{PROBE_V4}/32"),
            "via",
            &node4.to_string(),
        ])
        .expect("route to the IPv4 probe source");
        ns.ip(&[
            "-6",
            "route",
            "add",
            &format!("{PROBE_V6}/128"),
            "via",
            &node6.to_string(),
        ])
        .expect("route to the IPv6 probe source");
        let app = [
            TestServer::start(&ns, SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), APP_PORT), "app").expect("app"),
            TestServer::start(&ns, SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), APP_PORT), "app6").expect("app6"),
        ];
        Self { ns, v4, v6, _app: app }
    }
}

fn explain(family: &str) -> Explanation {
    let out = agent_cmd(&["explain", "--json", "--family", family, "--mode", "ambient"]);
    assert!(
        out.status.success(),
        "explain: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("explain --json")
}

/// Packet counts of the rules of nat ISTIO_PRERT in `ns` (a connection's first packet only
/// traverses nat, so connections), `iptables-save -c`'s.
fn iptables_prert(ns: &NamedNetns, tool: &str) -> Vec<u64> {
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.name, &format!("{tool}-save"), "-c", "-t", "nat"])
        .output()
        .expect("iptables-save");
    assert!(out.status.success(), "{tool}-save");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let (counters, rule) = l.split_once("] ")?;
            rule.starts_with("-A ISTIO_PRERT ")
                .then(|| counters.trim_start_matches('[').split(':').next()?.parse().ok())?
        })
        .collect()
}

/// Entries of `PROBE_SNAT` (one per address of each ambient pod), from the agent's metrics,
/// served in the node's namespace.
fn probe_entries(agent: &NodeAgent, node: &Node) -> Option<f64> {
    let (status, text) = node
        .ns
        .open()
        .unwrap()
        .run(|| agent.scrape("/metrics"))
        .expect("a scrape of the metrics");
    assert!(status.contains("200"), "{status}");
    metric(&text, "redirect_map_entries{map=\"PROBE_SNAT\"}")
}

/// The agent's counts of ISTIO_PRERT's rules of `family` for its first workload.
fn agent_prert(agent: &NodeAgent, family: &str) -> Vec<u64> {
    let out = agent_cmd(&["stats", "--name", &agent.name, "--json"]);
    assert!(out.status.success(), "stats: {}", String::from_utf8_lossy(&out.stderr));
    let stats: InstanceStats = serde_json::from_slice(&out.stdout).expect("stats --json");
    stats
        .rules
        .iter()
        .filter(|r| r.chain == "ISTIO_PRERT" && r.family == family)
        .map(|r| r.connections)
        .collect()
}

#[test]
fn the_nodes_probes_of_an_ambient_pod_arrive_from_the_probe_source_as_under_iptables() {
    redirect_tests::require_root();
    let expected = [IpAddr::V4(PROBE_V4), IpAddr::V6(PROBE_V6)];
    // One probe per family; the pod's ISTIO_PRERT accepts each from the probe source (rule 1)
    // and captures none (rule 2, the REDIRECT to ztunnel's 15006).
    let counted = vec![1, 0];

    // The oracle: istio-cni's rule in the node, the pod's from `explain`.
    let oracle = Node::new("psi", 71, 0);
    let pod = &oracle.pods[0];
    iptables_restore(&pod.ns.name, &explain("ipv4").iptables_save);
    ip6tables_restore(&pod.ns.name, &explain("ipv6").iptables_save);
    for (tool, probe, ip) in [
        ("iptables-restore", PROBE_V4.to_string(), format!("{}/32", pod.v4)),
        ("ip6tables-restore", PROBE_V6.to_string(), format!("{}/128", pod.v6)),
    ] {
        let rules = format!(
            "*nat\n:ISTIO_POSTRT - [0:0]\n-A POSTROUTING -j ISTIO_POSTRT\n-A ISTIO_POSTRT -m owner --socket-exists -p \
             tcp -d {ip} -j SNAT --to-source {probe}\nCOMMIT\n"
        );
        redirect_tests::restore_with(tool, &oracle.ns.name, &rules);
    }
    let under_iptables = oracle.sources(0);
    let iptables_counts = [
        iptables_prert(&pod.ns, "iptables"),
        iptables_prert(&pod.ns, "ip6tables"),
    ];

    // The agent, serving the node it runs in.
    let node = Node::new("psa", 71, 0);
    let agent = NodeAgent::new("psa", &[]).within(&node.ns.path);
    let _process = agent.start().expect("node agent");
    agent.enroll(&node.pods[0].ns.path, "pod", AMBIENT);
    let under_agent = node.sources(0);
    let agent_counts = [agent_prert(&agent, "ipv4"), agent_prert(&agent, "ipv6")];

    assert_eq!(under_iptables, expected, "the oracle's app saw other sources");
    assert_eq!(
        iptables_counts,
        [counted.clone(), counted.clone()],
        "the oracle's ISTIO_PRERT"
    );
    assert_eq!(under_agent, under_iptables, "the app's view of the node's connections");
    assert_eq!(agent_counts, iptables_counts, "ISTIO_PRERT's counts, agent vs iptables");

    // Released, the pod is the node's like any other host: its own addresses, and nothing
    // left on the node's lo.
    let out = agent.cli(&["unenroll", "--id", "pod"]);
    assert!(
        out.status.success(),
        "unenroll: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(node.sources(0), [IpAddr::V4(node.v4), IpAddr::V6(node.v6)]);
    node.assert_no_probe_source();
}

#[test]
fn the_probe_source_stays_on_the_node_while_an_ambient_pod_uses_it() {
    redirect_tests::require_root();
    let node = Node::new("psb", 73, 2);
    let agent = NodeAgent::new("psb", &[]).within(&node.ns.path);
    let mut process = agent.start().expect("node agent");
    let expected = [IpAddr::V4(PROBE_V4), IpAddr::V6(PROBE_V6)];
    agent.enroll(&node.pods[0].ns.path, "a", AMBIENT);
    agent.enroll(&node.pods[1].ns.path, "b", AMBIENT);
    // A sidecar pod's connections from the node are not the ambient rule's (its inbound
    // uncaptured, so that the app sees the node's source as it comes).
    agent.enroll(&node.pods[2].ns.path, "c", &["--", "-b", ""]);
    let own = |i: usize| -> [IpAddr; 2] {
        let (_, node6) = redirect_testkit::netns::pair_ip6(73 + i as u8);
        [Ipv4Addr::new(10, 200, 73 + i as u8, 2).into(), node6.into()]
    };
    assert_eq!(node.sources(0), expected, "pod a");
    assert_eq!(node.sources(1), expected, "pod b");
    assert_eq!(node.sources(2), own(2), "the sidecar pod");
    let lo = node.lo();
    assert!(lo.contains(&format!("{PROBE_V4}/32 scope host")), "{lo}");
    assert_eq!(probe_entries(&agent, &node), Some(4.0), "both families of pods a and b");

    // A restart serves them as before: the next agent finds the address where it is.
    let (status, log) = process.stop(Duration::from_secs(30));
    assert!(status.is_some_and(|s| s.success()), "the agent's stop: {log}");
    let _process = agent.start().expect("node agent, restarted");
    assert_eq!(node.sources(0), expected, "pod a, after a restart");
    assert_eq!(node.sources(1), expected, "pod b, after a restart");
    assert_eq!(probe_entries(&agent, &node), Some(4.0), "after a restart");

    let unenroll = |id: &str| {
        let out = agent.cli(&["unenroll", "--id", id]);
        assert!(
            out.status.success(),
            "unenroll {id}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    unenroll("a");
    assert_eq!(node.sources(0), own(0), "pod a, released");
    assert_eq!(node.sources(1), expected, "pod b, still ambient");
    assert_eq!(probe_entries(&agent, &node), Some(2.0), "pod b's");
    unenroll("b");
    assert_eq!(node.sources(1), own(1), "pod b, released");
    assert_eq!(probe_entries(&agent, &node), Some(0.0));
    node.assert_no_probe_source();
}

#[test]
fn a_probe_source_the_node_had_before_stays_after_the_last_pod() {
    redirect_tests::require_root();
    let node = Node::new("psc", 77, 0);
    // Somebody else's: on lo before any ambient pod (an IPv4 one only; IPv6 is the agent's).
    node.ns
        .ip(&["addr", "add", &format!("{PROBE_V4}/32"), "dev", "lo"])
        .expect("the node's own probe address");
    let agent = NodeAgent::new("psc", &[]).within(&node.ns.path);
    let _process = agent.start().expect("node agent");
    agent.enroll(&node.pods[0].ns.path, "pod", AMBIENT);
    assert_eq!(node.sources(0), [IpAddr::V4(PROBE_V4), IpAddr::V6(PROBE_V6)]);
    let out = agent.cli(&["unenroll", "--id", "pod"]);
    assert!(
        out.status.success(),
        "unenroll: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lo = node.lo();
    assert!(
        lo.contains(&format!("{PROBE_V4}/32")),
        "the node's own address went:\n{lo}"
    );
    assert!(!lo.contains(&PROBE_V6.to_string()), "the agent's stayed:\n{lo}");
}

/// Polls `ok` (bounded) for up to 10 s.
fn eventually(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !ok() {
        assert!(std::time::Instant::now() < deadline, "{what} within 10 s");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_pod_address_that_goes_takes_its_probe_source_with_it() {
    redirect_tests::require_root();
    let node = Node::new("psd", 79, 0);
    let agent = NodeAgent::new("psd", &[]).within(&node.ns.path);
    let _process = agent.start().expect("node agent");
    agent.enroll(&node.pods[0].ns.path, "pod", AMBIENT);
    let lo = node.lo();
    // IPv6 has no host scope: deprecated, the kernel picks it as no connection's source.
    let v6 = lo
        .lines()
        .skip_while(|l| !l.contains(&PROBE_V6.to_string()))
        .nth(1)
        .unwrap_or_default();
    assert!(v6.contains("preferred_lft 0sec"), "{lo}");

    // The pod's IPv4 address goes while it is enrolled: the node's entry for it, and the
    // source no other pod uses, go too.
    let pod = &node.pods[0];
    let v4 = format!("{}/24", pod.v4);
    pod.ns.ip(&["addr", "del", &v4, "dev", "w0"]).expect("addr del");
    eventually("the IPv4 probe source leaving lo", || {
        !node.lo().contains(&PROBE_V4.to_string())
    });
    assert!(node.lo().contains(&PROBE_V6.to_string()), "{}", node.lo());
    // Back, it is served again.
    pod.ns.ip(&["addr", "add", &v4, "dev", "w0"]).expect("addr add");
    eventually("the IPv4 probe source back on lo", || {
        node.lo().contains(&PROBE_V4.to_string())
    });
    // The route the address's return took went with it.
    let _ = pod.ns.ip(&[
        "-4",
        "route",
        "add",
        &format!("{PROBE_V4}/32"),
        "via",
        &node.v4.to_string(),
    ]);
    assert_eq!(node.probe(0, pod.v4.into()), IpAddr::V4(PROBE_V4));
    let out = agent.cli(&["unenroll", "--id", "pod"]);
    assert!(
        out.status.success(),
        "unenroll: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    node.assert_no_probe_source();
}
