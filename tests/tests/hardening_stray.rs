//! Stray TCP segments (no SYN, no socket of theirs left) sent from the remote host to a
//! captured workload's app port: what the agent counts and records, and what iptables counts
//! for the same segments. The kernel runs sk_lookup for every segment that finds no socket of
//! its own, and its context has no TCP flags (on 6.1 as on 6.18), so the first segment of an
//! unknown 4-tuple is judged as a SYN would be. Later ones of the same 4-tuple follow that
//! decision uncounted, as packets of a connection conntrack knows skip nat PREROUTING.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpStream},
    path::Path,
    time::{Duration, Instant},
};

use aya::maps::{HashMap, Map, MapData};
use redirect_agent::{explain::Explanation, stats::InstanceStats};
use redirect_common::{OrigDst, TupleKey, maps};
use redirect_testkit::{
    netns::{NamedNetns, NetnsPair},
    server::TestServer,
};
use redirect_tests::{APP_PORT, Workload, agent_cmd, iptables_restore};
use rustix::net::{AddressFamily, SocketType, ipproto};

const ACK: u8 = 0x10;
const RST: u8 = 0x04;
const FIN: u8 = 0x01;

fn checksum(words: &[u8]) -> u16 {
    let mut sum = 0u32;
    for c in words.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// One TCP segment with `flags`, from `src` to `dst`, through a raw socket in `from`.
fn send_segment(from: &NamedNetns, src: SocketAddrV4, dst: SocketAddrV4, flags: u8) {
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&src.port().to_be_bytes());
    tcp[2..4].copy_from_slice(&dst.port().to_be_bytes());
    tcp[4..8].copy_from_slice(&0x1234_5678u32.to_be_bytes());
    tcp[8..12].copy_from_slice(&0x0abc_def0u32.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = flags;
    tcp[14..16].copy_from_slice(&1024u16.to_be_bytes());
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src.ip().octets());
    pseudo.extend_from_slice(&dst.ip().octets());
    pseudo.extend_from_slice(&[0, 6, 0, 20]);
    pseudo.extend_from_slice(&tcp);
    let sum = checksum(&pseudo);
    tcp[16..18].copy_from_slice(&sum.to_be_bytes());
    from.open()
        .unwrap()
        .run(|| {
            let s = rustix::net::socket(AddressFamily::INET, SocketType::RAW, Some(ipproto::TCP))?;
            rustix::net::sendto(
                &s,
                &tcp,
                rustix::net::SendFlags::empty(),
                &SocketAddrV4::new(*dst.ip(), 0),
            )?;
            Ok(())
        })
        .expect("raw send");
}

fn pending(name: &str) -> usize {
    let pin = Path::new("/sys/fs/bpf/redirect").join(name).join(maps::INBOUND_PENDING);
    let map = Map::from_map_data(MapData::from_pin(pin).unwrap()).unwrap();
    let map: HashMap<MapData, TupleKey, OrigDst> = HashMap::try_from(map).unwrap();
    map.keys().filter(Result::is_ok).count()
}

fn in_redirects(stats: &InstanceStats) -> u64 {
    stats
        .rules
        .iter()
        .filter(|r| r.chain == "ISTIO_INBOUND" && r.family == "ipv4" && r.target == "ISTIO_IN_REDIRECT")
        .map(|r| r.connections)
        .sum()
}

/// iptables' ISTIO_IN_REDIRECT decisions in `ns` (nat rules count a connection's first packet).
fn iptables_in_redirects(ns: &str) -> u64 {
    let out = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "iptables",
            "-t",
            "nat",
            "-L",
            "ISTIO_INBOUND",
            "-v",
            "-x",
            "-n",
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("ISTIO_IN_REDIRECT"))
        .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// Each stray is sent twice with one 4-tuple: counted and recorded once, as a retransmitted
/// SYN is after a full accept queue dropped the first (conntrack: one NEW, counted once).
/// Before, every segment was judged anew. What still differs from iptables, which sees the
/// flags: it counts every lone ACK (`nf_conntrack_tcp_loose=1` picks each up as NEW) and no
/// lone FIN or RST (INVALID); the agent counts each 4-tuple once ([docs/istio.md]).
#[test]
fn stray_segments_are_judged_once_per_four_tuple() {
    let w = Workload::with_agent("stray", &[]);
    let pair = NetnsPair::create_on("strayipt", 1).unwrap();
    let out = agent_cmd(&["explain", "--json", "--family", "ipv4"]);
    let tables: Explanation = serde_json::from_slice(&out.stdout).unwrap();
    iptables_restore(&pair.workload.name, &tables.iptables_save);
    let dst = |ip: Ipv4Addr| SocketAddrV4::new(ip, APP_PORT);
    let src = |ip: Ipv4Addr, port| SocketAddrV4::new(ip, port);
    let mut port = 40000;
    // (segment, flags, what iptables counts for the two: with nf_conntrack_tcp_loose=1, the
    // default, a lone ACK is picked up as a NEW connection and passes nat PREROUTING, and so is
    // the second, after the first was answered with a reset; FIN and RST without a conntrack
    // entry are INVALID and never reach it).
    for (what, flags, iptables) in [
        ("ACK", ACK, 2),
        ("FIN|ACK", FIN | ACK, 0),
        ("RST", RST, 0),
        ("RST|ACK", RST | ACK, 0),
    ] {
        let (c0, p0, i0) = (
            in_redirects(&w.stats()),
            pending(&w.name),
            iptables_in_redirects(&pair.workload.name),
        );
        port += 1;
        for _ in 0..2 {
            send_segment(
                &w.pair.remote,
                src(w.pair.remote_ip, port),
                dst(w.pair.workload_ip),
                flags,
            );
            send_segment(&pair.remote, src(pair.remote_ip, port), dst(pair.workload_ip), flags);
            std::thread::sleep(Duration::from_millis(200));
        }
        let (c1, p1, i1) = (
            in_redirects(&w.stats()),
            pending(&w.name),
            iptables_in_redirects(&pair.workload.name),
        );
        eprintln!(
            "{what}: agent counted {} and recorded {} pending; iptables counted {}",
            c1 - c0,
            p1 - p0,
            i1 - i0
        );
        assert_eq!(i1 - i0, iptables, "iptables, {what}");
        // sk_lookup ran for both segments (no socket of their own): the first was judged,
        // counted and recorded as a SYN would be, the second followed it. The record is never
        // taken and ages out of the LRU.
        assert_eq!((c1 - c0, p1 - p0), (1, 1), "agent, {what}");
    }
}

/// Whether the namespace holds a TCP socket (any state, TIME_WAIT included) of this 4-tuple,
/// from its `/proc/net/tcp`.
fn socket_of(ns: &NamedNetns, local: SocketAddrV4, remote: SocketAddrV4) -> bool {
    // /proc/net/tcp prints each address as the `__be32` read as a native integer, then the port.
    let hex = |a: SocketAddrV4| format!("{:08X}:{:04X}", u32::from_ne_bytes(a.ip().octets()), a.port());
    let (local, remote) = (hex(local), hex(remote));
    let table = ns
        .open()
        .unwrap()
        .run(|| std::fs::read_to_string("/proc/thread-self/net/tcp"))
        .unwrap();
    table.lines().skip(1).any(|l| {
        let mut f = l.split_whitespace().skip(1);
        f.next() == Some(local.as_str()) && f.next() == Some(remote.as_str())
    })
}

/// One connection from the remote host to the pod's app port, closed by the remote end first
/// (so the pod's end keeps no TIME_WAIT socket); returns the remote end's address.
fn one_connection(from: &NamedNetns, to: SocketAddrV4) -> SocketAddrV4 {
    let mut s = from
        .open()
        .unwrap()
        .run(|| TcpStream::connect_timeout(&to.into(), Duration::from_secs(5)))
        .expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let SocketAddr::V4(local) = s.local_addr().unwrap() else {
        unreachable!("an IPv4 connection")
    };
    s.write_all(b"late").unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).expect("the answer, then EOF");
    assert!(answer.ends_with("late"), "answered through to the app: {answer:?}");
    local
}

/// A segment of a proxied connection that reaches the pod after the proxy's socket is gone
/// (sent before the close, delayed in another CPU's backlog: the stress routines' closes do
/// this) belongs to a connection conntrack still knows: iptables neither counts it nor
/// judges it again. The agent keeps the connection's record a while after the proxy served it
/// (`proxy::orig_dst::LINGER`), so sk_lookup sends the segment where the connection went,
/// uncounted, and the record is then removed: nothing is left behind.
#[test]
fn a_late_segment_of_a_proxied_connection_is_not_judged_again_and_leaves_no_record() {
    let w = Workload::with_agent("strayl", &[]);
    let pair = NetnsPair::create_on("straylipt", 1).unwrap();
    let out = agent_cmd(&["explain", "--json", "--family", "ipv4"]);
    let tables: Explanation = serde_json::from_slice(&out.stdout).unwrap();
    iptables_restore(&pair.workload.name, &tables.iptables_save);
    // The twin's stand-in for the proxy: REDIRECT takes the connection to its port 15006.
    let _twin_proxy =
        TestServer::start(&pair.workload, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 15006), "twin").unwrap();
    let app = |ip: Ipv4Addr| SocketAddrV4::new(ip, APP_PORT);
    let (c0, i0) = (in_redirects(&w.stats()), iptables_in_redirects(&pair.workload.name));

    let client = one_connection(&w.pair.remote, app(w.pair.workload_ip));
    let twin_client = one_connection(&pair.remote, app(pair.workload_ip));
    // The proxy's end closes once the remote end acknowledges its FIN: only then does a
    // segment find no socket of its own.
    let deadline = Instant::now() + Duration::from_secs(5);
    while socket_of(&w.pair.workload, app(w.pair.workload_ip), client) {
        assert!(Instant::now() < deadline, "the proxy's end never closed");
        std::thread::sleep(Duration::from_millis(5));
    }
    send_segment(&w.pair.remote, client, app(w.pair.workload_ip), ACK);
    send_segment(&pair.remote, twin_client, app(pair.workload_ip), ACK);
    std::thread::sleep(Duration::from_millis(200));
    let (c1, i1) = (in_redirects(&w.stats()), iptables_in_redirects(&pair.workload.name));
    assert_eq!(i1 - i0, 1, "iptables counts the connection, not its late segment");
    assert_eq!(c1 - c0, 1, "the agent counts the connection, not its late segment");

    let deadline = Instant::now() + Duration::from_secs(10);
    while pending(&w.name) != 0 {
        assert!(
            Instant::now() < deadline,
            "the connection's record outlived it by 10 s: {} left",
            pending(&w.name)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
