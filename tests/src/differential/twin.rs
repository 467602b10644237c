//! A twin topology: the namespace pair, cgroup and servers, with either istio-iptables' rules
//! loaded or the agent attached; and what each twin's counters say.

use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    process::Command,
};

use redirect_agent::{explain::Explanation, stats::InstanceStats};
use redirect_testkit::{
    agent::AgentProcess,
    cgroup::TestCgroup,
    netns::{NamedNetns, NetnsPair, pair_ip6, veth},
    serve::ServeProcess,
    unique,
};

use super::{Config, SIDE_LINK, SIDE_SUBNET, TABLES, chains, label};
use crate::{agent_bin, agent_cmd, agent_cmd_with_env, ip6tables_restore, iptables_restore, testkit_bin};

/// A twin topology. Fields drop in order: agent, servers, cgroup, namespaces.
pub(super) struct Twin {
    agent: Option<AgentProcess>,
    /// TPROXY mode: ISTIO_INBOUND (and ISTIO_TPROXY) are mangle's.
    tproxy: bool,
    /// `-k` given: nat PREROUTING holds its rules.
    virt: bool,
    /// `--mode ambient`: the inbound chain is ISTIO_PRERT.
    ambient: bool,
    _servers: Vec<ServeProcess>,
    pub(super) cgroup: TestCgroup,
    pub(super) pair: NetnsPair,
    /// The side host ([`Config::side`]), behind the workload's [`SIDE_LINK`].
    pub(super) side: Option<NamedNetns>,
    name: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    Iptables,
    Agent,
}

/// Per-rule counts of each (family, chain), in rule order.
pub(super) type Counts = BTreeMap<(&'static str, &'static str), Vec<Row>>;

/// One rule's count. The rows of nat's built-in chains carry the rule's text (`-A PREROUTING
/// -i x0 -j RETURN`: iptables-save's, which is `explain`'s, and in the agent's `stats` its
/// match and target), so that each is compared with its own rule.
#[derive(Clone, PartialEq, Eq)]
pub(super) struct Row {
    rule: Option<String>,
    pub(super) n: u64,
}

impl fmt::Debug for Row {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.rule {
            Some(rule) => write!(f, "{rule:?}: {}", self.n),
            None => write!(f, "{}", self.n),
        }
    }
}

/// Whether a rule of nat's built-in chains is one the agent counts: `-c`'s RETURNs and `-k`'s
/// `-i IFACE [-d CIDR] -j ISTIO_REDIRECT` (not the jumps to ISTIO_OUTPUT and ISTIO_INBOUND).
fn counted_builtin(rule: &str) -> bool {
    rule.ends_with(" -j RETURN")
        || (rule.starts_with("-A PREROUTING ") && rule.contains(" -i ") && rule.ends_with(" -j ISTIO_REDIRECT"))
}

/// The nat tables istio-iptables writes for these flags: iptables' and ip6tables'.
pub(super) struct Tables {
    pub(super) ipv4: Explanation,
    pub(super) ipv6: Explanation,
}

/// `explain` of a configuration's flags, in its environment.
pub(super) fn explain(cfg: &Config, family: &str) -> Explanation {
    let mut args = vec!["explain", "--json", "--family", family];
    args.extend_from_slice(cfg.flags);
    let out = agent_cmd_with_env(&args, cfg.env);
    assert!(
        out.status.success(),
        "explain --family {family} {:?} (env {:?}): {}",
        super::shown_flags(cfg.flags),
        cfg.env,
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
        "pod" | "remote" | "side" => format!("{base}{six}-{port}"),
        _ => format!("{base}{six}"),
    };
    (name, SocketAddr::new(ip, port))
}

impl Twin {
    pub(super) fn new(kind: Kind, cfg: &Config, tables: &Tables, listen_ports: &[u16], capture: (u16, u16)) -> Self {
        let tag = match kind {
            Kind::Iptables => "dfi",
            Kind::Agent => "dfa",
        };
        let pair = NetnsPair::create(tag).expect("namespaces");
        let cgroup = TestCgroup::create(tag).expect("cgroup");
        let mut twin = Self {
            agent: None,
            tproxy: cfg.tproxy().is_some(),
            virt: super::flag(cfg.flags, "-k").is_some(),
            ambient: cfg.ambient(),
            _servers: Vec::new(),
            cgroup,
            pair,
            side: None,
            name: unique(tag),
        };
        if cfg.side_host() {
            let side = wire_side(&twin.pair.workload, &format!("{}-x", twin.name));
            if cfg.vm {
                route_vm(&twin.pair, &side, cfg.remote_addrs);
            }
            twin.side = Some(side);
        }
        // The servers' [::] listeners are V6ONLY, as Envoy's are, so that they and the 0.0.0.0
        // ones share their ports (each family's connections on its own listener, each asked
        // its original destination at its own level). The probes set V6ONLY themselves.
        //
        // No tail loss probes: both twins must send the same segments, and a TLP fires after a
        // few milliseconds without an ACK, which a loaded machine makes a matter of timing. The
        // one that counts is a server's FIN sent again after the client had acknowledged it:
        // the client's TIME_WAIT answers, the server's socket is gone by then, so that ACK
        // finds no socket and sk_lookup judges it (it cannot see flags; docs/istio.md), where
        // the oracle's SYN-only copies count nothing. (An RTO-driven resend needs 200 ms
        // without an ACK.) A stray's own judgement is `hardening_stray.rs`'s subject.
        for ns in [&twin.pair.workload, &twin.pair.remote] {
            ns.sysctl("net.ipv6.bindv6only", "1").expect("bindv6only");
            ns.sysctl("net.ipv4.tcp_early_retrans", "0").expect("tcp_early_retrans");
        }
        // The remote host routes ::6 back to the pod (a host route, not a default one), and
        // so does the side host ([`wire_side`]): a connection from ::6 that leaves direct then
        // completes where IPv4's from 127.0.0.6 is refused at once (EINVAL), instead of waiting
        // out its SYN retries. Both twins alike. An attempt that times out would also leave
        // conntrack an entry in SYN_SENT for two minutes, and a later client bound to ::6 that
        // drew the same port would match it: no new connection, so no nat rule counted, where
        // the agent judges and counts every connect.
        let via = twin.pair.workload_ip6.to_string();
        twin.pair
            .remote
            .ip(&["-6", "route", "add", "::6/128", "via", &via, "dev", "r0"])
            .expect("route to ::6");
        // The remote host's further addresses ([`Config::remote_addrs`]), each behind a host
        // route of the workload's: a wider route would change where other destinations go.
        for &addr in cfg.remote_addrs {
            let (family, host, via) = match addr {
                IpAddr::V4(_) => ("-4", format!("{addr}/32"), twin.pair.remote_ip.to_string()),
                IpAddr::V6(_) => ("-6", format!("{addr}/128"), twin.pair.remote_ip6.to_string()),
            };
            // IPv6 ones without duplicate address detection, as the pair's own (usable at once),
            // and deprecated, so that the remote host's own connections keep its primary address
            // as their source: a /128 would win the kernel's longest-match choice. They are still
            // bound, dialed and answered from.
            let mut add = vec![family, "addr", "add", host.as_str(), "dev", "r0"];
            if addr.is_ipv6() {
                add.extend(["nodad", "preferred_lft", "0"]);
            }
            twin.pair
                .remote
                .ip(&add)
                .unwrap_or_else(|e| panic!("{host} on the remote host: {e}"));
            twin.pair
                .workload
                .ip(&[family, "route", "add", &host, "via", &via, "dev", "w0"])
                .unwrap_or_else(|e| panic!("route to {host}: {e}"));
        }
        // Where ztunnel's spoofed clients are (`Config::spoofed_from`): behind the remote host,
        // as a client's address is behind a pod's default route. The app's replies find a
        // route, which only ambient's mark then overrides (iptables' rerouting after mangle
        // OUTPUT needs a first route to start from).
        for &addr in cfg.spoofed_from {
            let (family, host, via) = match addr {
                IpAddr::V4(_) => ("-4", format!("{addr}/32"), twin.pair.remote_ip.to_string()),
                IpAddr::V6(_) => ("-6", format!("{addr}/128"), twin.pair.remote_ip6.to_string()),
            };
            twin.pair
                .workload
                .ip(&[family, "route", "add", &host, "via", &via, "dev", "w0"])
                .unwrap_or_else(|e| panic!("route to {host}: {e}"));
        }
        match kind {
            Kind::Iptables => {
                let ns = &twin.pair.workload.name;
                iptables_restore(ns, &syn_counted(&tables.ipv4.iptables_save));
                ip6tables_restore(ns, &syn_counted(&tables.ipv6.iptables_save));
                // What istio-iptables installs with TPROXY's rules (the agent, itself).
                if let Some(t) = cfg.tproxy() {
                    for family in ["-4", "-6"] {
                        let w = &twin.pair.workload;
                        w.ip(&[family, "rule", "add", "fwmark", &t.mark, "lookup", &t.table])
                            .expect("ip rule");
                        w.ip(&[
                            family, "route", "add", "local", "default", "dev", "lo", "table", &t.table,
                        ])
                        .expect("ip route");
                    }
                }
                // What istio-cni installs with ambient's rules (the agent, itself): the app's
                // replies on a connection ztunnel made as its client carry the connection's
                // mark 0x111, which this rule delivers back locally.
                if cfg.ambient() {
                    for (family, all) in [("-4", "0.0.0.0/0"), ("-6", "::/0")] {
                        let w = &twin.pair.workload;
                        w.ip(&[
                            family,
                            "rule",
                            "add",
                            "fwmark",
                            "0x111/0xfff",
                            "pref",
                            "32764",
                            "lookup",
                            "100",
                        ])
                        .expect("ip rule");
                        w.ip(&[family, "route", "add", "local", all, "dev", "lo", "table", "100"])
                            .expect("ip route");
                    }
                }
                // istio-iptables adds the IPv6 passthrough source with its ip6tables rules (the
                // agent does it itself); istio-cni's ambient rules come with none.
                if !cfg.ambient() {
                    twin.pair
                        .workload
                        .ip(&["-6", "addr", "add", "::6/128", "dev", "lo"])
                        .expect("::6 on lo");
                }
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
                let agent = AgentProcess::start_with_env(&agent_bin(), &twin.name, &args, cfg.env);
                twin.agent = Some(agent.expect("agent starts"));
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
        for &ip in cfg.remote_addrs {
            remote.extend(listen_ports.iter().map(|&p| listener("remote", ip, p)));
        }
        let testkit = testkit_bin();
        // Envoy's TPROXY-mode inbound listener is transparent: iptables' TPROXY hands
        // connections to no other.
        let transparent: &[&str] = if twin.tproxy { &["cap-in", "cap-in6"] } else { &[] };
        twin._servers = vec![
            ServeProcess::start_transparent(
                &testkit,
                Some(&twin.cgroup.path),
                &twin.pair.workload.path,
                &workload,
                &[],
                None,
                transparent,
            )
            .expect("workload servers"),
            ServeProcess::start(&testkit, None, &twin.pair.remote.path, &remote).expect("remote servers"),
        ];
        if let Some(side) = &twin.side {
            let (ip, ip6) = side_addrs().1;
            let listeners: Vec<_> = [IpAddr::from(ip), ip6.into()]
                .into_iter()
                .flat_map(|ip| listen_ports.iter().map(move |&p| listener("side", ip, p)))
                .collect();
            twin._servers
                .push(ServeProcess::start(&testkit, None, &side.path, &listeners).expect("side servers"));
        }
        twin
    }

    /// Per-rule counts of both families' chains ([`chains`]): the agent's counters; or the
    /// packet counters of the nat rules (only a connection's first packet traverses nat, so
    /// those count connections too; of the built-in chains only the rules the agent counts,
    /// [`counted_builtin`]), and of mangle's those of each rule's SYN-only copy
    /// ([`syn_counted`]), which mangle's own counters, counting every packet, are not.
    pub(super) fn counts(&self) -> Counts {
        let mut counts = Counts::new();
        match &self.agent {
            Some(_) => {
                let out = agent_cmd(&["stats", "--name", &self.name, "--json"]);
                assert!(out.status.success(), "stats: {}", String::from_utf8_lossy(&out.stderr));
                let stats: InstanceStats = serde_json::from_slice(&out.stdout).expect("stats --json");
                for (family, _) in TABLES {
                    for (table, chain) in chains(self.tproxy, self.virt, self.ambient) {
                        let builtin = table == "nat" && !chain.starts_with("ISTIO_");
                        let rows = stats
                            .rules
                            .iter()
                            .filter(|r| r.chain == chain && r.family == family && r.table == table)
                            .map(|r| Row {
                                rule: builtin.then(|| match r.match_.as_str() {
                                    "" => format!("-A {chain} -j {}", r.target),
                                    m => format!("-A {chain} {m} -j {}", r.target),
                                }),
                                n: r.connections,
                            })
                            .collect();
                        counts.insert((family, label(table, chain)), rows);
                    }
                }
            }
            None => {
                for (family, tool) in TABLES {
                    for (table, chain) in chains(self.tproxy, self.virt, self.ambient) {
                        let rows = match table {
                            "mangle" => self.syn_counts(tool, chain),
                            _ if !chain.starts_with("ISTIO_") => self.builtin_counts(tool, chain),
                            _ => self.nat_counts(tool, chain),
                        };
                        counts.insert((family, label(table, chain)), rows);
                    }
                }
            }
        }
        counts
    }

    /// The packet counts of nat `chain`'s rules, an ISTIO chain's.
    fn nat_counts(&self, tool: &str, chain: &str) -> Vec<Row> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.pair.workload.name])
            .args([tool, "-t", "nat", "-L", chain, "-v", "-n", "-x", "--line-numbers"])
            .output()
            .expect("iptables -L");
        assert!(out.status.success(), "{tool} -L {chain}");
        // Two header lines, then "num pkts bytes target ...".
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .skip(2)
            .filter_map(|l| l.split_whitespace().nth(1)?.parse().ok())
            .map(|n| Row { rule: None, n })
            .collect()
    }

    /// The packet counts of the rules of nat's built-in `chain` the agent counts
    /// ([`counted_builtin`]), each with its text.
    fn builtin_counts(&self, tool: &str, chain: &str) -> Vec<Row> {
        let append = format!("-A {chain} ");
        self.saved(tool, "nat")
            .into_iter()
            .filter(|(rule, _)| rule.starts_with(&append) && counted_builtin(rule))
            .map(|(rule, n)| Row { rule: Some(rule), n })
            .collect()
    }

    /// The SYNs that reached and matched each rule of mangle `chain`: its target-less copies'
    /// packet counts.
    fn syn_counts(&self, tool: &str, chain: &str) -> Vec<Row> {
        let append = format!("-A {chain} ");
        self.saved(tool, "mangle")
            .into_iter()
            .filter(|(rule, _)| rule.starts_with(&append) && !rule.contains(" -j "))
            .map(|(_, n)| Row { rule: None, n })
            .collect()
    }

    /// Every rule of `table` with its packet count, read with `iptables-save -c`
    /// (`[packets:bytes] -A CHAIN ...`).
    fn saved(&self, tool: &str, table: &str) -> Vec<(String, u64)> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.pair.workload.name])
            .args([&format!("{tool}-save"), "-c", "-t", table])
            .output()
            .expect("iptables-save");
        assert!(out.status.success(), "{tool}-save -t {table}");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                let (counters, rule) = l.split_once("] ")?;
                let packets = counters.trim_start_matches('[').split(':').next()?.parse().ok()?;
                Some((rule.to_owned(), packets))
            })
            .collect()
    }

    /// The workload namespace's nonzero TCP counters (`nstat`): its retransmissions, resets and
    /// listen drops, which say whether a counter difference came with a segment the other twin
    /// did not send (a SYN sent again, a FIN retransmitted under load).
    pub(super) fn tcp_events(&self) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.pair.workload.name, "nstat", "-as"])
            .output();
        match out {
            Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter(|l| l.starts_with("Tcp"))
                .map(|l| l.split_whitespace().take(2).collect::<Vec<_>>().join(" "))
                .collect::<Vec<_>>()
                .join(", "),
            Ok(o) => format!("nstat failed: {}", String::from_utf8_lossy(&o.stderr).trim()),
            Err(e) => format!("nstat: {e}"),
        }
    }

    pub(super) fn counters(&self) -> String {
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

/// istio-iptables' tables with, before each rule of mangle's ISTIO_INBOUND and ISTIO_TPROXY, a
/// copy of its matches restricted to SYNs and with no target: it counts the connections that
/// reach the rule and match it, and decides nothing (a rule without a target only counts).
/// The agent counts connections; mangle's own counters count every packet.
fn syn_counted(save: &str) -> String {
    let mut out = String::new();
    let mut mangle = false;
    for line in save.lines() {
        if line.starts_with('*') {
            mangle = line == "*mangle";
        }
        // PREROUTING's own: only `-c`'s RETURNs; OUTPUT's: only the `-o lo` marks (and their
        // RETURN), the agent's rows there.
        let judged = line.starts_with("-A ISTIO_INBOUND ")
            || line.starts_with("-A ISTIO_TPROXY ")
            || (line.starts_with("-A PREROUTING -i ") && line.ends_with(" -j RETURN"))
            || (line.starts_with("-A OUTPUT ")
                && line.contains(" -o lo ")
                && (line.contains(" -j MARK ") || line.ends_with(" -j RETURN")));
        if mangle && judged {
            let matches = line.split(" -j ").next().unwrap_or(line);
            out.push_str(matches);
            if !matches.contains(" -p tcp") {
                out.push_str(" -p tcp");
            }
            out.push_str(" -m tcp --syn\n");
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// The workload's and the side host's addresses on the side link, both families.
fn side_addrs() -> ((Ipv4Addr, Ipv6Addr), (Ipv4Addr, Ipv6Addr)) {
    let (w6, s6) = pair_ip6(SIDE_SUBNET);
    (
        (Ipv4Addr::new(10, 200, SIDE_SUBNET, 1), w6),
        (Ipv4Addr::new(10, 200, SIDE_SUBNET, 2), s6),
    )
}

/// The side host as a VM behind the pod ([`Config::vm`]): the workload forwards both families,
/// the side host reaches the remote host's subnet through the workload's [`SIDE_LINK`]
/// addresses (and each of `remote_addrs` by a host route the same way), and the remote host
/// the side subnet back through the workload's primary ones. Routes of the test's own
/// namespaces only (no default route), gone with them.
fn route_vm(pair: &NetnsPair, side: &NamedNetns, remote_addrs: &[IpAddr]) {
    let w = &pair.workload;
    w.sysctl("net.ipv4.ip_forward", "1").expect("ip_forward");
    w.sysctl("net.ipv6.conf.all.forwarding", "1").expect("ipv6 forwarding");
    let ((side_w, side_w6), _) = side_addrs();
    let (remote_net, remote_net6) = (
        format!("{}/24", Ipv4Addr::from(u32::from(pair.workload_ip) & !0xff)),
        format!(
            "{}/64",
            Ipv6Addr::from(u128::from(pair.workload_ip6) & !u128::from(u64::MAX))
        ),
    );
    let (side_net, side_net6) = (
        format!("{}/24", Ipv4Addr::from(u32::from(side_w) & !0xff)),
        format!("{}/64", Ipv6Addr::from(u128::from(side_w6) & !u128::from(u64::MAX))),
    );
    let hosts: Vec<(&str, String, String)> = remote_addrs
        .iter()
        .map(|a| match a {
            IpAddr::V4(_) => ("-4", format!("{a}/32"), side_w.to_string()),
            IpAddr::V6(_) => ("-6", format!("{a}/128"), side_w6.to_string()),
        })
        .collect();
    let routes = [
        (side, "x1", "-4", &remote_net, side_w.to_string()),
        (side, "x1", "-6", &remote_net6, side_w6.to_string()),
        (&pair.remote, "r0", "-4", &side_net, pair.workload_ip.to_string()),
        (&pair.remote, "r0", "-6", &side_net6, pair.workload_ip6.to_string()),
    ]
    .into_iter()
    .chain(
        hosts
            .iter()
            .map(|(family, to, via)| (side, "x1", *family, to, via.clone())),
    );
    for (ns, dev, family, to, via) in routes {
        ns.ip(&[family, "route", "add", to, "via", &via, "dev", dev])
            .unwrap_or_else(|e| panic!("route to {to} via {via} in {}: {e}", ns.name));
    }
}

/// A side host namespace named `name`, behind a veth [`SIDE_LINK`] of the workload.
fn wire_side(workload: &NamedNetns, name: &str) -> NamedNetns {
    let side = NamedNetns::create(name).expect("side netns");
    side.sysctl("net.ipv6.bindv6only", "1").expect("bindv6only");
    // As the twins' own namespaces (see `Twin::new`).
    side.sysctl("net.ipv4.tcp_early_retrans", "0")
        .expect("tcp_early_retrans");
    veth((workload, SIDE_LINK), (&side, "x1"), SIDE_SUBNET).expect("side veth");
    // ::6 back to the pod, as the remote host has it (see `Twin::new`).
    let via = side_addrs().0.1.to_string();
    side.ip(&["-6", "route", "add", "::6/128", "via", &via, "dev", "x1"])
        .expect("side host's route to ::6");
    side
}
