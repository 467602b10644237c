//! Long rule lists against their oracle (issue 19): `-x` and `-i` with 1,000 IPv4 CIDRs each
//! (and 300 IPv6 ones), `-i` with them and two `-k` interfaces, `-o` and `-q` with 1,000 ports
//! each, a `-b` list of 1,000 ports, and `-b '*'` with a `-d` list of 1,000. istio-iptables writes a rule per member, so each list is
//! a thousand rules of its chain where the agent once refused more than 64 per family.
//!
//! Each configuration runs through the differential machinery (`redirect_tests::differential`):
//! two identical dual-stack topologies, one with `explain`'s rules loaded into iptables and
//! ip6tables, one with the agent (`--proxy none`); the same clients dial the same destinations
//! in both, and every verdict and every rule's counter must be equal. That proves, for lists
//! of this size, what a lookup structure in place of a rule walk could get wrong:
//!
//! - the first matching rule in iptables' order decides and is the one counted, not the
//!   longest prefix: a wide CIDR early and one nested in it later (the later never counts),
//!   and a narrow one early and a wider one around it later (each counts its own hosts);
//! - a member listed twice counts once, on its first rule;
//! - one list before another: `-x` before `-i` (a host in both RETURNs), `-o` before `-q`, the
//!   tunnel port's RETURN before `-b` and `-d` members naming it;
//! - members at the start, middle and end of each list are found; hosts in no member fall
//!   through as iptables lets them;
//! - the members nobody dials (nearly all of each list) count nothing in either twin, which
//!   the per-rule comparison checks row by row.
//!
//! The matrix dials few of the members: the remote host has further addresses in 10.200.0.0/16
//! and fd00:200::/48 placed in the CIDR lists ([`Config::remote_addrs`]), and the port
//! configurations dial the base matrix's ports and a handful more ([`Config::flag_ports`] off),
//! so each runs a couple of thousand connections per twin, not a thousand ports' worth. Every
//! other member is filler that holds no test host: CIDRs in 172.16.0.0/12, 192.168.0.0/16,
//! fd00:300::/32, fd00:301::/32 and 2001:db8::/32, ports spread over 1 to 65535 outside
//! 15000 to 15100 (istio's own) and the dialed ones.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use redirect_tests::differential::{Config, differential};

/// Members of each long list (IPv4 ones for the CIDR lists).
const LONG: usize = 1000;
/// IPv6 members of each CIDR list, beside the [`LONG`] IPv4 ones: ip6tables' chains are long too.
const LONG_V6: usize = 300;

const fn v4(c: u8, d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 200, c, d))
}

const fn v6(group: u16, host: u16) -> IpAddr {
    IpAddr::V6(Ipv6Addr::new(0xfd00, 0x200, 0, group, 0, 0, 0, host))
}

/// The remote host's further addresses, which the CIDR lists place (see [`cidr_lists`]); with
/// the base matrix's destinations (the remote host 10.200.1.2, the pod 10.200.1.1, 127.0.0.2
/// and their IPv6 counterparts) they are every host the lists are about.
const REMOTE_ADDRS: &[IpAddr] = &[
    v4(1, 10),
    v4(36, 5),
    v4(30, 7),
    v4(30, 99),
    v4(1, 20),
    v4(1, 30),
    v4(50, 5),
    v4(60, 6),
    v4(60, 66),
    v4(1, 40),
    v4(1, 50),
    v4(70, 7),
    v6(0x1, 0x10),
    v6(0x21, 0x5),
    v6(0x30, 0x7),
    v6(0x30, 0x99),
    v6(0x1, 0x20),
    v6(0x1, 0x30),
    v6(0x4a, 0x5),
    v6(0x60, 0x6),
    v6(0x60, 0x66),
    v6(0x1, 0x40),
    v6(0x1, 0x50),
    v6(0x70, 0x7),
];

/// `-x` and `-i` with [`LONG`] IPv4 and [`LONG_V6`] IPv6 CIDRs each, the families interleaved
/// in each flag as a cluster's lists may be (each family's rules keep their order).
#[test]
fn cidr_lists_of_a_thousand() {
    // Each member placed is commented with the dialed hosts it is the first match of, or why
    // it counts nothing. The pod's own address reaches -x and -i only because -i names a
    // loopback CIDR: istio-iptables then leaves out the app-to-itself RETURN (in both tables).
    let x4 = list(
        LONG,
        vec![
            // 10.200.1.10, at the start.
            (0, "10.200.1.10/32"),
            // Written as a host inside it: 10.200.32.0/20, holding 10.200.36.5.
            (LONG / 4, "10.200.33.3/20"),
            // 10.200.30.7 here; 10.200.30.99 on the /24 around it, near the end.
            (LONG / 3, "10.200.30.7/32"),
            // The remote host, also in -i: RETURNs here.
            (LONG / 2, "10.200.1.2/32"),
            // The first member again: never counted.
            (2 * LONG / 3, "10.200.1.10/32"),
            // Inside the /20 above: never counted.
            (3 * LONG / 4, "10.200.36.0/24"),
            (LONG - 2, "10.200.30.0/24"),
            // 10.200.1.20, at the end; an address alone is a /32.
            (LONG - 1, "10.200.1.20"),
        ],
        filler_v4(0),
    );
    let i4 = list(
        LONG,
        vec![
            // 10.200.1.30, at the start.
            (0, "10.200.1.30/32"),
            // -x's already: never counted here.
            (1, "10.200.1.2/32"),
            // 10.200.48.0/21, holding 10.200.50.5.
            (LONG / 5, "10.200.48.0/21"),
            // 10.200.60.6 here; 10.200.60.66 on the /24 around it, later.
            (LONG / 3, "10.200.60.6/32"),
            // The pod.
            (LONG / 2, "10.200.1.1/32"),
            // 127.0.0.2 (127.0.0.1 RETURNs before -x, on `-d 127.0.0.1/32`).
            (LONG / 2 + 1, "127.0.0.0/8"),
            (2 * LONG / 3, "10.200.60.0/24"),
            // The first member again: never counted.
            (3 * LONG / 4, "10.200.1.30/32"),
            // Inside the /21 above: never counted.
            (4 * LONG / 5, "10.200.50.0/24"),
            // 10.200.1.40, at the end.
            (LONG - 1, "10.200.1.40/32"),
        ],
        filler_v4(1),
    );
    // The same layout in fd00:200::/48.
    let x6 = list(
        LONG_V6,
        vec![
            (0, "fd00:200:0:1::10/128"),
            // fd00:200:0:20::/60, holding fd00:200:0:21::5.
            (LONG_V6 / 4, "fd00:200:0:21::3/60"),
            (LONG_V6 / 3, "fd00:200:0:30::7/128"),
            (LONG_V6 / 2, "fd00:200:0:1::2/128"),
            (2 * LONG_V6 / 3, "fd00:200:0:1::10/128"),
            (3 * LONG_V6 / 4, "fd00:200:0:21::/64"),
            (LONG_V6 - 2, "fd00:200:0:30::/64"),
            (LONG_V6 - 1, "fd00:200:0:1::20"),
        ],
        filler_v6(0),
    );
    let i6 = list(
        LONG_V6,
        vec![
            (0, "fd00:200:0:1::30/128"),
            (1, "fd00:200:0:1::2/128"),
            // fd00:200:0:48::/61, holding fd00:200:0:4a::5.
            (LONG_V6 / 5, "fd00:200:0:48::/61"),
            (LONG_V6 / 3, "fd00:200:0:60::6/128"),
            (LONG_V6 / 2, "fd00:200:0:1::1/128"),
            // ::1 RETURNs before -x, on `-d ::1/128`: never counted.
            (LONG_V6 / 2 + 1, "::1/128"),
            (2 * LONG_V6 / 3, "fd00:200:0:60::/64"),
            (3 * LONG_V6 / 4, "fd00:200:0:1::30/128"),
            (4 * LONG_V6 / 5, "fd00:200:0:4a::/64"),
            (LONG_V6 - 1, "fd00:200:0:1::40/128"),
        ],
        filler_v6(1),
    );

    // The layout is what the comments say: the hosts the chains see at -x and -i (all dialed
    // ones but 127.0.0.1 and ::1) first match these members, -x's before -i's, and
    // 10.200.1.50, 10.200.70.7 and their IPv6 counterparts none.
    let (pod, remote) = (v4(1, 1), v4(1, 2));
    let (pod6, remote6) = (v6(0x1, 0x1), v6(0x1, 0x2));
    let mut hosts = vec![pod, remote, IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)), pod6, remote6];
    hosts.extend(REMOTE_ADDRS);
    // (family is IPv4, index) of each member some host first matches.
    let (mut x_hits, mut i_hits, mut in_none) = (BTreeSet::new(), BTreeSet::new(), Vec::new());
    for &h in &hosts {
        let (x, i) = if h.is_ipv4() { (&x4, &i4) } else { (&x6, &i6) };
        if let Some(n) = first(x, |c| cidr_holds(c, h)) {
            x_hits.insert((h.is_ipv4(), n));
        } else if let Some(n) = first(i, |c| cidr_holds(c, h)) {
            i_hits.insert((h.is_ipv4(), n));
        } else {
            in_none.push(h);
        }
    }
    let at = |v4s: &[usize], v6s: &[usize]| -> BTreeSet<(bool, usize)> {
        let v4s = v4s.iter().map(|&n| (true, n));
        v4s.chain(v6s.iter().map(|&n| (false, n))).collect()
    };
    let x_want = at(
        &[0, LONG / 4, LONG / 3, LONG / 2, LONG - 2, LONG - 1],
        &[0, LONG_V6 / 4, LONG_V6 / 3, LONG_V6 / 2, LONG_V6 - 2, LONG_V6 - 1],
    );
    assert_eq!(x_hits, x_want, "-x members the hosts hit");
    let i_want = at(
        &[0, LONG / 5, LONG / 3, LONG / 2, LONG / 2 + 1, 2 * LONG / 3, LONG - 1],
        &[0, LONG_V6 / 5, LONG_V6 / 3, LONG_V6 / 2, 2 * LONG_V6 / 3, LONG_V6 - 1],
    );
    assert_eq!(i_hits, i_want, "-i members the hosts hit");
    assert_eq!(
        in_none,
        [v4(1, 50), v4(70, 7), v6(0x1, 0x50), v6(0x70, 0x7)],
        "hosts in no member"
    );

    let flags = leak(vec![
        "-x".into(),
        interleave(&x4, &x6),
        "-i".into(),
        interleave(&i4, &i6),
    ]);
    differential(Config {
        name: "-x/-i with 1,000 CIDRs",
        flags,
        remote_addrs: REMOTE_ADDRS,
        ..Config::BASE
    });
}

/// `-o` and `-q` with [`LONG`] ports each, with `-i ''`: only `-q`'s ports are captured, unless
/// `-o` names them first.
#[test]
fn outbound_port_lists_of_a_thousand() {
    const DIALED: &[u16] = &[31000, 32000, 33000, 34000, 35000];
    // 8080 at the start, 31000 in the middle, 32000 at the end; 8080 again, never counted.
    let o = list(
        LONG,
        vec![(0, 8080), (LONG / 2, 31000), (3 * LONG / 4, 8080), (LONG - 1, 32000)],
        filler_ports(1, DIALED),
    );
    // 9080 at the start, 33000 in the middle, 34000 at the end.
    let q = list(
        LONG,
        vec![
            (0, 9080),
            // -o's already, and -o's rules come first: never counted here.
            (1, 31000),
            (LONG / 2, 33000),
            // The first member again: never counted.
            (2 * LONG / 3, 9080),
            (LONG - 1, 34000),
        ],
        filler_ports(27, DIALED),
    );
    // 15008, 15020, 15021 and 35000 in neither.
    check_ports(&o, &[0, LONG / 2, LONG - 1], &[8080, 31000, 32000]);
    check_ports(&q, &[0, LONG / 2, LONG - 1], &[9080, 33000, 34000]);
    let flags = leak(vec![
        "-i".into(),
        String::new(),
        "-o".into(),
        o.join(","),
        "-q".into(),
        q.join(","),
    ]);
    differential(Config {
        name: "-q/-o with 1,000 ports",
        flags,
        ports: DIALED,
        flag_ports: false,
        ..Config::BASE
    });
}

/// A `-b` list of [`LONG`] ports: only those are captured inbound.
#[test]
fn inbound_port_list_of_a_thousand() {
    inbound_port_list("-b with 1,000 ports", &[]);
}

/// The same `-b` list in TPROXY mode: mangle's ISTIO_INBOUND holds two rules per port (a
/// RELATED,ESTABLISHED jump to ISTIO_DIVERT, then one to ISTIO_TPROXY), packed as two sets.
#[test]
fn tproxy_inbound_port_list_of_a_thousand() {
    inbound_port_list("-m TPROXY, -b with 1,000 ports", &["-m", "TPROXY"]);
}

/// `-b` with [`LONG`] ports (and `mode`'s flags): 9080 (the app's) at the start, 31000 in the
/// middle and again later, 32000 at the end.
fn inbound_port_list(name: &'static str, mode: &[&str]) {
    const DIALED: &[u16] = &[31000, 32000, 33000];
    let b = list(
        LONG,
        vec![
            (0, 9080),
            // The tunnel port's RETURN comes first: never counted here.
            (1, 15008),
            (LONG / 2, 31000),
            // The middle member again: never counted.
            (3 * LONG / 4, 31000),
            (LONG - 1, 32000),
        ],
        filler_ports(1, DIALED),
    );
    // 8080, 15020, 15021, 33000 and the capture ports in none.
    check_ports(&b, &[0, LONG / 2, LONG - 1], &[9080, 31000, 32000]);
    let mut flags: Vec<String> = mode.iter().map(|f| f.to_string()).collect();
    flags.extend(["-b".into(), b.join(",")]);
    differential(Config {
        name,
        flags: leak(flags),
        ports: DIALED,
        flag_ports: false,
        ..Config::BASE
    });
}

/// `-b '*'` with a `-d` list of [`LONG`] ports, in place of the default 15090,15021,15020.
#[test]
fn inbound_exclude_list_of_a_thousand() {
    const DIALED: &[u16] = &[31000, 32000, 33000];
    // 15021 (the status port) at the start, 31000 in the middle, 32000 at the end.
    let d = list(
        LONG,
        vec![
            (0, 15021),
            // The tunnel port's RETURN comes first: never counted here.
            (1, 15008),
            (LONG / 2, 31000),
            // The first member again: never counted.
            (2 * LONG / 3, 15021),
            (LONG - 1, 32000),
        ],
        filler_ports(1, DIALED),
    );
    // 8080, 9080, 15020 (the default's, captured now), 33000 and the capture ports in none.
    check_ports(&d, &[0, LONG / 2, LONG - 1], &[15021, 31000, 32000]);
    differential(Config {
        name: "-b '*' -d with 1,000 ports",
        flags: leak(vec!["-b".into(), "*".into(), "-d".into(), d.join(",")]),
        ports: DIALED,
        flag_ports: false,
        ..Config::BASE
    });
}

/// The remote host's further addresses the VM and the pod dial in [`kube_virt_cidr_list_of_a_thousand`].
const VM_REMOTE_ADDRS: &[IpAddr] = &[
    v4(1, 10),
    v4(60, 6),
    v4(60, 66),
    v4(1, 50),
    v6(0x1, 0x10),
    v6(0x60, 0x6),
    v6(0x60, 0x66),
    v6(0x1, 0x50),
];

/// `-k` with two interfaces (the VM's link and a pattern that names no device here) and `-i`
/// with [`LONG`] IPv4 and [`LONG_V6`] IPv6 CIDRs: istio-iptables writes nat PREROUTING's jump
/// to ISTIO_REDIRECT per CIDR per interface, the two interfaces' rules alternating, which the
/// agent once refused (2,000 rules where it held 64). The VM dials the remote host's addresses
/// through the pod and the pod's own.
#[test]
fn kube_virt_cidr_list_of_a_thousand() {
    let i4 = list(
        LONG,
        vec![
            // 10.200.1.10, at the start.
            (0, "10.200.1.10/32"),
            // The remote host, in the middle.
            (LONG / 3, "10.200.1.2/32"),
            // 10.200.60.6 and 10.200.60.66.
            (LONG / 2, "10.200.60.0/24"),
            // Inside the /24 before it: never counted in ISTIO_OUTPUT. PREROUTING lists -k's
            // rules in the reverse of -i's order (each inserted at the top), so there it is
            // 10.200.60.6's, before the /24.
            (2 * LONG / 3, "10.200.60.6/32"),
            // The first member again: in PREROUTING, the one counted.
            (3 * LONG / 4, "10.200.1.10/32"),
            // The pod, at the end.
            (LONG - 1, "10.200.1.1/32"),
        ],
        filler_v4(2),
    );
    let i6 = list(
        LONG_V6,
        vec![
            (0, "fd00:200:0:1::10/128"),
            (LONG_V6 / 3, "fd00:200:0:1::2/128"),
            (LONG_V6 / 2, "fd00:200:0:60::/64"),
            (2 * LONG_V6 / 3, "fd00:200:0:60::6/128"),
            (3 * LONG_V6 / 4, "fd00:200:0:1::10/128"),
            (LONG_V6 - 1, "fd00:200:0:1::1/128"),
        ],
        filler_v6(2),
    );
    // The layout is what the comments say, in ISTIO_OUTPUT's order; 10.200.1.50 and
    // fd00:200:0:1::50 are in none, and the VM's connections to them RETURN on
    // `-i x0 -j RETURN` (forwarded to the remote host).
    let hits = |members: &[String], hosts: &[IpAddr]| -> Vec<Option<usize>> {
        hosts.iter().map(|&h| first(members, |c| cidr_holds(c, h))).collect()
    };
    let (at4, at6) = (
        [
            Some(0),
            Some(LONG / 2),
            Some(LONG / 2),
            None,
            Some(LONG / 3),
            Some(LONG - 1),
        ],
        [
            Some(0),
            Some(LONG_V6 / 2),
            Some(LONG_V6 / 2),
            None,
            Some(LONG_V6 / 3),
            Some(LONG_V6 - 1),
        ],
    );
    let hosts4 = [v4(1, 10), v4(60, 6), v4(60, 66), v4(1, 50), v4(1, 2), v4(1, 1)];
    let hosts6 = [
        v6(1, 0x10),
        v6(0x60, 6),
        v6(0x60, 0x66),
        v6(1, 0x50),
        v6(1, 2),
        v6(1, 1),
    ];
    assert_eq!(hits(&i4, &hosts4), at4);
    assert_eq!(hits(&i6, &hosts6), at6);
    differential(Config {
        name: "-k with -i of 1,000 CIDRs",
        flags: leak(vec!["-k".into(), "x0,vm+".into(), "-i".into(), interleave(&i4, &i6)]),
        remote_addrs: VM_REMOTE_ADDRS,
        vm: true,
        ..Config::BASE
    });
}

/// A list of `len` members: `placed` at their indices, every other one the next of `filler`.
fn list<T: ToString>(len: usize, placed: Vec<(usize, T)>, mut filler: impl Iterator<Item = String>) -> Vec<String> {
    let mut members: Vec<Option<String>> = vec![None; len];
    for (i, m) in placed {
        assert!(members[i].replace(m.to_string()).is_none(), "two members placed at {i}");
    }
    members
        .into_iter()
        .map(|m| m.unwrap_or_else(|| filler.next().expect("enough filler")))
        .collect()
}

/// IPv4 filler, outside 10.200.0.0/16 and loopback: /24s and bare addresses (/32s) in
/// 172.16.0.0/12 and /28s in 192.168.0.0/16, a cluster's list's mix of prefix lengths. `salt`
/// keeps two lists' fillers apart.
fn filler_v4(salt: u32) -> impl Iterator<Item = String> {
    (0u32..).map(move |n| {
        let i = 2 * n + salt;
        let (hi, lo) = (16 + (i >> 8) % 16, i & 255);
        match n % 3 {
            0 => format!("172.{hi}.{lo}.0/24"),
            1 => format!("172.{hi}.{lo}.{}", (i * 37) & 255),
            _ => format!("192.168.{lo}.{}/28", (i >> 8) % 16 * 16),
        }
    })
}

/// IPv6 filler, outside fd00:200::/48 and loopback: /64s, bare addresses (/128s) and /48s.
fn filler_v6(salt: u32) -> impl Iterator<Item = String> {
    (0u32..).map(move |n| {
        let i = 2 * n + salt;
        match n % 3 {
            0 => format!("fd00:300:{i:x}::/64"),
            1 => format!("fd00:301::{i:x}"),
            _ => format!("2001:db8:{i:x}::/48"),
        }
    })
}

/// Port filler: every 53rd port from `start`, leaving out istio's own (15000 to 15100: the
/// capture, validation, tunnel and status ports), the base matrix's app ports (8080, 9080)
/// and the configuration's `dialed` ones, so that no filler rule is ever reached by a dial.
fn filler_ports(start: u16, dialed: &'static [u16]) -> impl Iterator<Item = String> {
    (start..=u16::MAX)
        .step_by(53)
        .filter(move |p| !(15000..=15100).contains(p) && ![8080, 9080].contains(p) && !dialed.contains(p))
        .map(|p| p.to_string())
}

/// Both families' CIDRs in one flag value, an IPv6 one after every third IPv4 one and the rest
/// at the end: istio-iptables splits the list by family, each keeping its order.
fn interleave(v4: &[String], v6: &[String]) -> String {
    let mut v6 = v6.iter();
    let mut all: Vec<&str> = Vec::new();
    for (n, c) in v4.iter().enumerate() {
        all.push(c);
        if n % 3 == 2 {
            all.extend(v6.next().map(String::as_str));
        }
    }
    all.extend(v6.map(String::as_str));
    all.join(",")
}

/// `Config`'s flags are `&'static`; these are built at run time, once per test.
fn leak(flags: Vec<String>) -> &'static [&'static str] {
    let flags: Vec<&'static str> = flags.into_iter().map(|f| &*Box::leak(f.into_boxed_str())).collect();
    Box::leak(flags.into_boxed_slice())
}

/// The index of the first member `holds` says yes to.
fn first(members: &[String], holds: impl Fn(&str) -> bool) -> Option<usize> {
    members.iter().position(|m| holds(m.as_str()))
}

/// Whether `cidr` (`a.b.c.d/n`, an IPv6 one, or a bare address) holds `host`.
fn cidr_holds(cidr: &str, host: IpAddr) -> bool {
    let (addr, prefix) = cidr.split_once('/').unwrap_or((cidr, ""));
    let addr: IpAddr = addr.parse().expect("a CIDR's address");
    let prefix = |max: u32| prefix.parse::<u32>().unwrap_or(max);
    match (addr, host) {
        (IpAddr::V4(a), IpAddr::V4(h)) => {
            let mask = u32::MAX.checked_shl(32 - prefix(32)).unwrap_or(0);
            u32::from(a) & mask == u32::from(h) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(h)) => {
            let mask = u128::MAX.checked_shl(128 - prefix(128)).unwrap_or(0);
            u128::from(a) & mask == u128::from(h) & mask
        }
        _ => false,
    }
}

/// The layout of a port list is what its comments say: the `dialed` members (in order) first
/// appear at `at` (start, middle, end); and every member is a port istio-iptables takes.
fn check_ports(members: &[String], at: &[usize], dialed: &[u16]) {
    let found: Vec<Option<usize>> = dialed.iter().map(|p| first(members, |m| m == p.to_string())).collect();
    assert_eq!(found, at.iter().copied().map(Some).collect::<Vec<_>>(), "{dialed:?}");
    assert!(
        members.iter().all(|m| matches!(m.parse::<u16>(), Ok(1..))),
        "ports 1 to 65535"
    );
}
