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
//!
//! The twins, the scenario matrix and the comparison are `redirect_tests::differential`; here
//! are the configurations, and the checks of `explain`'s own output.

use std::{
    net::{IpAddr, Ipv4Addr},
    process::Command,
};

use redirect_testkit::netns::NetnsPair;
use redirect_tests::{
    agent_cmd,
    differential::{Config, Ids, differential},
    require_root,
};

/// A test per configuration: its name, its flags, then any other [`Config`] field it sets
/// (its environment, the clients, destinations and ports it adds).
macro_rules! configs {
    ($($test:ident: $name:literal => [$($flag:literal),*] $(, $field:ident: $value:expr)*;)*) => {$(
        #[test]
        fn $test() {
            differential(Config { name: $name, flags: &[$($flag),*], $($field: $value,)* ..Config::BASE });
        }
    )*};
}

/// Clients of the owner-group configurations: gid 4242 and gid 0 (listed), and 4243 (not),
/// beside the base matrix's (0, 0), whose gid 0 is listed too. uid 1000, not the proxy's, so
/// that the uid rules before the group rule leave them to it; and uid 0 in 4242.
const GROUP_IDS: &[Ids] = &[(1000, 4242), (0, 4242), (1000, 0), (1000, 4243)];
/// Set-gid clients of the same: the owner match reads the effective gid (the socket's fsgid),
/// not the real one.
const GROUP_SET_IDS: &[(Ids, Ids)] = &[((1000, 4243), (1000, 4242)), ((1000, 4242), (1000, 4243))];
/// Destinations inside 127.0.0.0/30 (127.0.0.3) and just outside it (127.0.0.4).
const AROUND_SLASH_30: &[IpAddr] = &[
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3)),
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, 4)),
];

/// Ambient's probe SNAT addresses in these tests (`--host-probe-snat`, `--host-probe-v6-snat`):
/// further addresses of the remote host, which dials the pod from them too.
const AMBIENT_PROBES: &[IpAddr] = &[
    IpAddr::V4(Ipv4Addr::new(10, 200, 7, 127)),
    IpAddr::V6(std::net::Ipv6Addr::new(0xfd00, 0x200, 7, 0, 0, 0, 0, 0x127)),
];
/// Where ztunnel's dials into the pod come from in these tests: addresses of no host.
const ZTUNNEL_CLIENTS: &[IpAddr] = &[
    IpAddr::V4(Ipv4Addr::new(10, 200, 9, 9)),
    IpAddr::V6(std::net::Ipv6Addr::new(0xfd00, 0x200, 9, 0, 0, 0, 0, 9)),
];
/// Marks of ambient's clients: ztunnel's (0x539 in the low 12 bits, whatever the rest), one
/// bit off it, and the inbound-proxied connection mark.
const AMBIENT_MARKS: &[u32] = &[0x539, 0x7_0539, 0x538, 0x111];

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
    // A second interface to a side host: without -c it is captured like the first (both
    // ways); with -c naming it, neither way, each counted on nat PREROUTING's and OUTPUT's own
    // RETURN; with a `+` prefix naming it, the same.
    side_link: "a second interface" => [], side: true;
    exclude_interface: "-c" => ["-c", "x0"], side: true;
    exclude_interface_prefix: "-c prefix" => ["-c", "eth9,x+"], side: true;
    // The side host as a VM behind the pod, routed through it: with -k naming its interface,
    // every TCP connection it makes (through the pod to the remote host, to the pod's own
    // addresses on either interface) is captured as an outbound one, accepted on the side
    // link's address at 15001 with the destination it dialed as the original one, and counted
    // on nat PREROUTING's `-i x0 -j ISTIO_REDIRECT`.
    kube_virt: "-k" => ["-k", "x0"], vm: true;
    // With -i, only the VM's connections to those CIDRs (the remote host's addresses) are
    // captured, on `-d CIDR -i x0 -j ISTIO_REDIRECT`; the rest (to the pod's addresses) RETURN
    // on `-i x0 -j RETURN` and reach the pod's own servers, never inbound-captured.
    kube_virt_include_cidrs: "-k, -i CIDRs" => ["-k", "x0", "-i", "10.200.1.2/32,fd00:200:0:1::2/128"], vm: true;
    // The other way round: the VM's connections to the pod's primary address are captured,
    // those to the remote host RETURN and are forwarded through the pod to its servers (which
    // see the VM's own address).
    kube_virt_forwarded: "-k, -i pod addresses" => ["-k", "x0", "-i", "10.200.1.1/32,fd00:200:0:1::1/128"], vm: true;
    // TPROXY mode: mangle PREROUTING runs before nat's, so its ISTIO_INBOUND TPROXYs the VM's
    // connections (forwarded ones too) to the inbound capture listener, counted there, before
    // nat's `-i x0 -j ISTIO_REDIRECT` rewrites their destination to the side link's address and
    // 15001, counted too: they are accepted on the inbound listener at that address, with the
    // destination dialed as SO_ORIGINAL_DST. Its excluded ports (15020, 15021, 15090) RETURN
    // from mangle and reach the outbound listener as in REDIRECT mode.
    kube_virt_tproxy: "-k, -m TPROXY" => ["-k", "x0", "-m", "TPROXY"], vm: true;
    // With only the pod's primary addresses in -i and -b naming two ports: to those ports,
    // TPROXY alone (nat RETURNs) accepts the connection at the address dialed, the remote
    // host's included (not the namespace's: the listener is transparent), or with the REDIRECT
    // too for the pod's own address; other ports go nat's way.
    kube_virt_tproxy_forwarded: "-k, -m TPROXY, -i pod, -b list" =>
        ["-k", "x0", "-m", "TPROXY", "-i", "10.200.1.1/32,fd00:200:0:1::1/128", "-b", "8080,9080"], vm: true;
    // Only gids 4242 and 0 captured: gid 4243's (and 1000's, the set-uid clients') outbound
    // connections RETURN on the group rule, where without the list they would be captured.
    owner_groups_include: "ISTIO_OUTBOUND_OWNER_GROUPS" => [],
        env: &[("ISTIO_OUTBOUND_OWNER_GROUPS", "4242,0")], ids: GROUP_IDS, set_ids: GROUP_SET_IDS;
    // Every gid but 4242 captured.
    owner_groups_exclude: "ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE" => [],
        env: &[("ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE", "4242")], ids: GROUP_IDS, set_ids: GROUP_SET_IDS;
    // uid 1337 (and gid 1337) to 127.0.0.2 over lo: ISTIO_IN_REDIRECT under `! -d
    // 127.0.0.1/32`, RETURN under `! -d 127.0.0.0/8`. (The app's own uids to 127.0.0.2 RETURN
    // either way, on `-o lo ! --uid-owner 1337`: the next configuration makes them count.)
    loopback_cidr: "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR /8" => [],
        env: &[("ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR", "127.0.0.1/8")];
    // With a loopback CIDR in -i, the app-to-itself RETURN is not written: the app's uids to
    // 127.0.0.2 reach `-d 127.0.0.0/8 -j RETURN` (direct) where `-d 127.0.0.1/32` would let
    // them on to the -i rule (captured).
    loopback_cidr_with_include_loopback: "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR /8, -i with loopback" => [
        "-i", "10.200.9.0/24,127.0.0.0/8"
    ], env: &[("ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR", "127.0.0.1/8")];
    // A prefix between the two (with -i naming loopback, so that the app's uids count too):
    // 127.0.0.1 to .3 in it, .4 not.
    loopback_cidr_slash_30: "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR /30, -i with loopback" => ["-i", "10.200.9.0/24,127.0.0.0/8"],
        env: &[("ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR", "127.0.0.1/30")], dsts: AROUND_SLASH_30;
    // The remote host to the pod's port 22: RETURN (to the app) under 1.12's rules, where the
    // current ones capture it.
    compatibility_1_12: "--compatibility-version 1.12" => ["--compatibility-version", "1.12"], ports: &[22];
    // The same from istio-iptables' environment variable.
    compatibility_env: "COMPATIBILITY_VERSION" => [], env: &[("COMPATIBILITY_VERSION", "1.12")], ports: &[22];
    // TPROXY: mangle's ISTIO_INBOUND judges connections from other hosts and, by their mark,
    // those the namespace makes to itself (the proxy's own to its pod's 15008 is TPROXY'd
    // where nat leaves it alone); each verdict and each rule's SYN count equal.
    tproxy: "-m TPROXY" => ["-m", "TPROXY"];
    // Ambient: istio-cni's in-pod rules for ztunnel, keyed on the socket's mark, not its
    // owner; the probes' SNAT source accepted in and out; ztunnel's dial into the pod as the
    // client, whose replies istio-cni's routing brings back; with DNS capture, TCP to port 53
    // (anywhere but 127.0.0.1) to 15053; in ingress mode nothing inbound.
    ambient: "--mode ambient" => [
        "--mode", "ambient", "--host-probe-snat", "10.200.7.127", "--host-probe-v6-snat", "fd00:200:7::127"
    ], marks: AMBIENT_MARKS, remote_addrs: AMBIENT_PROBES, inbound_from: AMBIENT_PROBES,
        spoofed_from: ZTUNNEL_CLIENTS;
    ambient_dns: "--mode ambient --redirect-dns" => [
        "--mode", "ambient", "--redirect-dns", "--host-probe-snat", "10.200.7.127",
        "--host-probe-v6-snat", "fd00:200:7::127"
    ], marks: AMBIENT_MARKS, remote_addrs: AMBIENT_PROBES, inbound_from: AMBIENT_PROBES, ports: &[53, 15053];
    ambient_ingress: "--mode ambient --bypass-inbound-capture" => [
        "--mode", "ambient", "--bypass-inbound-capture", "--host-probe-snat", "10.200.7.127",
        "--host-probe-v6-snat", "fd00:200:7::127"
    ], marks: AMBIENT_MARKS, remote_addrs: AMBIENT_PROBES, inbound_from: AMBIENT_PROBES;
    // Ambient with -k: every TCP connection of the VM behind the pod is outbound, ztunnel's
    // 15001 (ISTIO_PRERT's `-i x0 -p tcp -j REDIRECT --to-ports 15001`, before the probes' and
    // the inbound rules), to the remote host and to the pod's own addresses alike.
    ambient_kube_virt: "--mode ambient -k" => [
        "--mode", "ambient", "-k", "x0", "--host-probe-snat", "10.200.7.127", "--host-probe-v6-snat", "fd00:200:7::127"
    ], vm: true, marks: AMBIENT_MARKS, remote_addrs: AMBIENT_PROBES, inbound_from: AMBIENT_PROBES;
    tproxy_inbound_ports: "-m TPROXY, -b list" => ["-m", "TPROXY", "-b", "9080,15021"];
    tproxy_excludes: "-m TPROXY, -d" => ["-m", "TPROXY", "-d", "9080,15020"];
    tproxy_mark_and_table: "-m TPROXY, -t/-r" => ["-m", "TPROXY", "-t", "0x600", "-r", "2100"];
    // mangle PREROUTING's `-i x0 -j RETURN` keeps the side host's connections from TPROXY.
    tproxy_exclude_interface: "-m TPROXY, -c" => ["-m", "TPROXY", "-c", "x0"], side: true;
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
        &["--mode", "ambient", "--redirect-dns"],
        &["--mode", "ambient", "-k", "vm0,vm1", "--bypass-inbound-capture"],
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
            .args(["netns", "exec", &pair.workload.name, save])
            .output()
            .unwrap();
        let saved = String::from_utf8_lossy(&saved.stdout);
        // iptables-save orders tables and chains its own way; within a chain, order is rule
        // order. (Tables nothing was restored into are empty.)
        let rules_by_chain = |t: &str| {
            let mut m = std::collections::BTreeMap::<(String, String), Vec<String>>::new();
            let mut table = String::new();
            for l in t.lines() {
                if let Some(name) = l.strip_prefix('*') {
                    table = name.to_owned();
                } else if l.starts_with("-A ") {
                    let chain = l.split_whitespace().nth(1).unwrap().to_owned();
                    m.entry((table.clone(), chain)).or_default().push(l.to_owned());
                }
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
