//! Stray TCP segments (no SYN, no socket of theirs left) sent from the remote host to a
//! captured workload's app port: what the agent counts and records, and what iptables counts
//! for the same segments. The kernel runs sk_lookup for every segment that finds no socket of
//! its own, and its context has no TCP flags (on 6.1 as on 6.18), so the first segment of an
//! unknown 4-tuple is judged as a SYN would be. Later ones of the same 4-tuple follow that
//! decision uncounted, as packets of a connection conntrack knows skip nat PREROUTING, until
//! the agent's sweep removes the records no accept took.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
};

use aya::maps::{HashMap, Map, MapData};
use redirect_agent::{explain::Explanation, stats::InstanceStats};
use redirect_common::{OrigDst, TupleKey, maps};
use redirect_testkit::netns::{NamedNetns, NetnsPair};
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
            std::thread::sleep(std::time::Duration::from_millis(200));
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
        // counted and recorded as a SYN would be, the second followed it.
        assert_eq!((c1 - c0, p1 - p0), (1, 1), "agent, {what}");
    }
    // No accept takes those records: the agent's sweep removes them, within its bound.
    let bound = redirect_agent::engine::pending::UNTAKEN_AT_MOST + std::time::Duration::from_secs(5);
    let start = std::time::Instant::now();
    while pending(&w.name) > 0 {
        assert!(
            start.elapsed() < bound,
            "{} stray records left after {} s",
            pending(&w.name),
            bound.as_secs()
        );
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
}
