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
//! server answers with a banner naming itself. Some configurations add a side host behind a
//! second interface of the workload ([`Config::side`]), or that host as a VM routed through the
//! pod ([`Config::vm`], for `-k`). The same scenarios run in both twins, in three phases: IPv4
//! from AF_INET sockets, the same over AF_INET6 sockets dialing v4-mapped addresses (judged by
//! the IPv4 chains), and native IPv6 (judged by ip6tables' chains). Each one's verdict (which
//! capture port, which original destination, what the accepting socket and the app's own say
//! their addresses are, or which failure) must be equal, and after each phase so must the
//! per-rule counters of both families' chains.
//!
//! The configurations themselves are tests/tests/differential.rs; this module is the machinery:
//! the twins (`twin`), who dials what (`matrix`), how a connection's landing is named
//! (`verdict`), and the comparison of both runs (`report`).

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use crate::require_root;

mod matrix;
mod report;
mod twin;
mod verdict;

use matrix::Matrix;
use twin::{Kind, Tables, Twin, explain};

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
/// nat PREROUTING's and OUTPUT's own rules (`-c`'s RETURNs and `-k`'s `-i IFACE [-d CIDR] -j
/// ISTIO_REDIRECT`, each row compared with its rule's text; the jumps to ISTIO_OUTPUT and
/// ISTIO_INBOUND are not counted by the agent, so not compared) and the ISTIO chains, each with
/// its table. In TPROXY mode ISTIO_INBOUND is mangle's, with ISTIO_TPROXY, and with `-k`
/// (`virt`) nat PREROUTING is compared too: `-k`'s rules are nat's in either mode.
/// Ambient's (`ambient`) inbound chain is nat ISTIO_PRERT.
fn chains(tproxy: bool, virt: bool, ambient: bool) -> Vec<(&'static str, &'static str)> {
    if ambient {
        return vec![
            ("nat", "PREROUTING"),
            ("nat", "OUTPUT"),
            ("nat", "ISTIO_OUTPUT"),
            ("nat", "ISTIO_PRERT"),
        ];
    }
    // PREROUTING's `-c` RETURN too: in TPROXY mode mangle's decides (nat's only counts).
    let inbound = if tproxy { "mangle" } else { "nat" };
    let mut c = vec![
        (inbound, "PREROUTING"),
        ("nat", "OUTPUT"),
        ("nat", "ISTIO_OUTPUT"),
        (inbound, "ISTIO_INBOUND"),
    ];
    if tproxy {
        // And mangle OUTPUT's `-o lo` marks, which connect4/6 walk.
        c.push(("mangle", "ISTIO_TPROXY"));
        c.push(("mangle", "OUTPUT"));
        if virt {
            c.push(("nat", "PREROUTING"));
        }
    }
    c
}

/// How the report names a chain: mangle's with its table, as nat and mangle both have OUTPUT.
fn label(table: &str, chain: &'static str) -> &'static str {
    match (table, chain) {
        ("mangle", "OUTPUT") => "mangle OUTPUT",
        ("mangle", "PREROUTING") => "mangle PREROUTING",
        ("mangle", "ISTIO_INBOUND") => "mangle ISTIO_INBOUND",
        _ => chain,
    }
}
/// The side host's subnet ([`Config::side`]): 10.200.2.0/24 and fd00:200:0:2::/64.
const SIDE_SUBNET: u8 = 2;
/// The workload's interface to the side host, which `-c` configurations name.
pub const SIDE_LINK: &str = "x0";

/// A client's (uid, gid).
pub type Ids = (u32, u32);

/// Which flags a configuration passes, and the ports and ids they name; the environment it
/// sets, and what it adds to the base matrix for a setting that only those would show.
pub struct Config {
    pub name: &'static str,
    pub flags: &'static [&'static str],
    /// Environment variables set for both `explain`s and for the agent twin's `run`
    /// (istio-iptables' `ISTIO_*`); the iptables twin's rules come from `explain`, so follow.
    pub env: &'static [(&'static str, &'static str)],
    /// More (uid, gid) clients, beside the base ones and those `-u`/`-g` name: each dials
    /// every destination unbound and bound to the passthrough source, and makes
    /// istio-validation's probe.
    pub ids: &'static [Ids],
    /// More set-id clients, `((uid, gid), (real uid, real gid))`: the first pair is the
    /// effective one (the socket's fsuid/fsgid, which the owner match reads).
    pub set_ids: &'static [(Ids, Ids)],
    /// More destinations, each in its family's phases (an IPv4 one in the v4-mapped phase
    /// too), on every port.
    pub dsts: &'static [IpAddr],
    /// More ports every server listens on and every client dials, beside `BASE_PORTS` and
    /// those the flags name.
    pub ports: &'static [u16],
    /// Whether the ports the flags name (`-q`, `-o`, `-b`, `-d`, `-e`) are listened on and
    /// dialed too. A configuration whose lists are too long to dial every member (hundreds of
    /// ports) clears it and names the few it dials in `ports`.
    pub flag_ports: bool,
    /// More addresses of the remote host (on its veth, each reached from the workload by a
    /// host route through the remote's primary address, so anywhere in 10.200.0.0/16 or
    /// fd00:200::/48), with the remote's servers on every port: each dialed like `dsts`. For
    /// CIDR lists with members around several hosts.
    pub remote_addrs: &'static [IpAddr],
    /// A second interface ([`SIDE_LINK`]) to a side host on its own subnet, with servers on
    /// every port: the workload dials it, and it dials the workload's address there.
    pub side: bool,
    /// More clients that set these marks on their sockets (`SO_MARK`): ambient's rules tell
    /// ztunnel by its mark.
    pub marks: &'static [u32],
    /// Sources (of `remote_addrs`) the remote host also dials the pod from, on every inbound
    /// port: ambient's probe SNAT address.
    pub inbound_from: &'static [IpAddr],
    /// Addresses of no host that a client in the pod dials the pod's address from, on every
    /// inbound port, from a transparent socket with ztunnel's mark: ztunnel handing an inbound
    /// connection to the app as its client. The app's replies reach it only as ambient's
    /// routing sends them back.
    pub spoofed_from: &'static [IpAddr],
    /// The side host as a VM behind the pod (`-k`'s KubeVirt interface): [`Config::side`],
    /// routed through the workload (which forwards) to the remote host's subnet and back, no
    /// default route anywhere. The side host then also dials the remote host's addresses
    /// (forwarded through the pod) and the pod's own address on the primary interface
    /// (delivered locally, arriving on [`SIDE_LINK`]), on every port.
    pub vm: bool,
}

/// TPROXY mode's mark and table, when the configuration's flags ask for it.
pub(crate) struct TproxyOf {
    mark: String,
    table: String,
}

impl Config {
    /// `-m TPROXY`'s `-t` and `-r` (istio-iptables' defaults when not given).
    fn tproxy(&self) -> Option<TproxyOf> {
        (flag(self.flags, "-m") == Some("TPROXY")).then(|| TproxyOf {
            mark: flag(self.flags, "-t").unwrap_or("1337").to_owned(),
            table: flag(self.flags, "-r").unwrap_or("133").to_owned(),
        })
    }

    /// No flags, no environment, nothing beyond the base matrix: the start of a
    /// configuration's `..` (its `name` and `flags` are always its own).
    pub const BASE: Self = Self {
        name: "",
        flags: &[],
        env: &[],
        ids: &[],
        set_ids: &[],
        dsts: &[],
        ports: &[],
        flag_ports: true,
        remote_addrs: &[],
        marks: &[],
        inbound_from: &[],
        spoofed_from: &[],
        side: false,
        vm: false,
    };

    /// `--mode ambient`: istio-cni's in-pod rules.
    fn ambient(&self) -> bool {
        self.flags.windows(2).any(|w| w == ["--mode", "ambient"])
    }

    /// Whether the twins have the side host: asked for, or as the VM.
    fn side_host(&self) -> bool {
        self.side || self.vm
    }
}

/// The flag's value in `flags`, if given (short form, as the configurations spell them).
fn flag<'a>(flags: &[&'a str], short: &str) -> Option<&'a str> {
    flags.windows(2).find(|w| w[0] == short).map(|w| w[1])
}

/// Past this many items a flag's list, or a chain's rows, are too many to read in full in a
/// message (a chain of istio-iptables' fixed rules and short lists has fewer).
const READABLE: usize = 64;

/// The flags as messages name them: a list of more than [`READABLE`] items (CIDRs, ports) as
/// its first few and its length.
fn shown_flags(flags: &[&str]) -> Vec<String> {
    flags
        .iter()
        .map(|f| {
            let items: Vec<&str> = f.split(',').collect();
            match items.len() {
                n if n > READABLE => format!("{},... ({n} items)", items[..3].join(",")),
                _ => (*f).to_owned(),
            }
        })
        .collect()
}

/// The comma list a flag was given (ports or ids), empty when absent.
fn list_of<T: std::str::FromStr>(flags: &[&str], short: &str) -> Vec<T> {
    flag(flags, short)
        .unwrap_or("")
        .split(',')
        .filter_map(|p| p.trim().parse().ok())
        .collect()
}

/// Runs the configuration in both twins and fails the test on any difference.
pub fn differential(cfg: Config) {
    require_root();
    let tables = Tables {
        ipv4: explain(&cfg, "ipv4"),
        ipv6: explain(&cfg, "ipv6"),
    };
    // Ambient's are fixed, as these defaults.
    let capture = (
        flag(cfg.flags, "-p").map_or(15001, |p| p.parse().unwrap()),
        flag(cfg.flags, "-z").map_or(15006, |p| p.parse().unwrap()),
    );
    let mut ports: BTreeSet<u16> = BASE_PORTS.into_iter().collect();
    if cfg.flag_ports {
        for f in ["-q", "-o", "-b", "-d", "-e"] {
            ports.extend(list_of::<u16>(cfg.flags, f));
        }
    }
    ports.extend(cfg.ports);
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

    report::judge(&cfg, &matrix, capture, (&oracle, want), (&agent, got));
}
