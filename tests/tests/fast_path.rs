//! `--fast-path`: bytes between the two local ends of captured connections (app and embedded
//! proxy) go through sk_msg instead of TCP/IP on loopback. The proxy, a tokio reader, must see
//! every byte in order, half-closes must pass, nothing may stall, a reader that stops must push
//! back, and the sockhash must empty as connections close. The event counters prove the bytes
//! did take the fast path (a silent fallback to TCP would pass every data check).

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use aya::maps::{HashMap, Map, MapData, SockHash};
use redirect_common::{TupleKey, maps};
use redirect_testkit::{serve::ServeProcess, server::TestServer};
use redirect_tests::{Outcome, REMOTE_PORT, Workload, agent_cmd, testkit_bin};

/// An app of the workload's own cgroup (so sock_ops sees its accepted ends).
const CGROUP_APP_PORT: u16 = 9090;
const ECHO_PORT: u16 = 7070;
const SINK_PORT: u16 = 7071;

fn event(w: &Workload, name: &str) -> u64 {
    w.stats().events.get(name).copied().unwrap_or(0)
}

fn fast_path_events(w: &Workload) -> String {
    let s = w.stats();
    format!("{:?}", s.events)
}

/// Entries of the instance's fast-path maps: (sockets, sender states).
fn fast_path_entries(w: &Workload) -> (usize, usize) {
    let dir = std::path::Path::new("/sys/fs/bpf/redirect").join(&w.name);
    let open = |name: &str| Map::from_map_data(MapData::from_pin(dir.join(name)).expect("pinned map")).unwrap();
    let sockets: SockHash<_, TupleKey> = SockHash::try_from(open(maps::FAST_PATH_SOCKETS)).unwrap();
    let senders: HashMap<_, TupleKey, u8> = HashMap::try_from(open(maps::FAST_PATH_SENDERS)).unwrap();
    (sockets.keys().count(), senders.keys().count())
}

/// Waits (bounded) for the fast-path maps to hold nothing: every socket closed was removed.
fn assert_maps_empty(w: &Workload) {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut left = fast_path_entries(w);
    while left != (0, 0) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        left = fast_path_entries(w);
    }
    assert_eq!(
        left,
        (0, 0),
        "fast-path entries (sockets, senders) left after every connection closed"
    );
}

#[test]
fn outbound_bytes_take_the_fast_path_intact() {
    let w = Workload::with_agent("fpo", &["--fast-path"]);
    let to = w.remote(REMOTE_PORT);
    let big = w.probe(&w.spec(to).bytes(1 << 20).tokio());
    assert_eq!(big.outcome, Outcome::Ok, "{big:?}");
    assert!(
        big.intact && big.received == 1 << 20,
        "1 MiB came back changed: {big:?}"
    );
    assert_eq!(big.banner_field("name"), Some("remote"));
    // Many at once, each its own pair in the sockhash.
    let many = w.probe_concurrently(&w.spec(to).bytes(64 * 1024).tokio(), 32);
    for r in &many {
        assert_eq!(r.outcome, Outcome::Ok, "{r:?}");
        assert!(r.intact, "{r:?}");
    }
    let connections = 33;
    // Both ends of every app -> 15001 connection joined at their handshake, and the first
    // message of each sender found its peer.
    assert!(
        event(&w, "fast_path_enrolled") >= 2 * connections,
        "{}",
        fast_path_events(&w)
    );
    assert!(
        event(&w, "fast_path_redirected") >= connections,
        "{}",
        fast_path_events(&w)
    );
    assert_maps_empty(&w);
}

/// A stream of large writes through the fast path: 16 MiB (the most the remote server buffers)
/// to the remote host and back, in writes of 256 KiB, then of 1 MiB, each intact through sk_msg.
/// Guards the goal that the fast path fails at no write size from 64 B to 1 MiB (issue 19): the
/// benchmark's stream of 256 KiB writes once failed with ENOMEM.
#[test]
fn writes_of_256_kib_and_1_mib_take_the_fast_path_intact() {
    const TOTAL: usize = 16 << 20;
    let w = Workload::with_agent("fpw", &["--fast-path"]);
    let to = w.remote(REMOTE_PORT);
    for size in [256 << 10, 1 << 20] {
        let redirected = event(&w, "fast_path_redirected");
        let r = w.probe(&w.spec(to).bytes(TOTAL).write_size(size).tokio());
        let kib = size >> 10;
        assert_eq!(r.outcome, Outcome::Ok, "writes of {kib} KiB: {r:?}");
        assert_eq!((r.sent, r.received), (TOTAL, TOTAL), "writes of {kib} KiB: {r:?}");
        assert!(r.intact, "writes of {kib} KiB came back changed: {r:?}");
        assert_eq!(r.banner_field("name"), Some("remote"), "{r:?}");
        // Both directions of the app's connection (app -> proxy, proxy -> app) took sk_msg.
        assert!(
            event(&w, "fast_path_redirected") >= redirected + 2,
            "writes of {kib} KiB: {}",
            fast_path_events(&w)
        );
        println!("16 MiB in writes of {kib} KiB: {} ms", r.elapsed_ms);
    }
    assert_eq!(event(&w, "fast_path_declined"), 0, "{}", fast_path_events(&w));
    assert_maps_empty(&w);
}

#[test]
fn inbound_bytes_take_the_fast_path_intact() {
    let w = Workload::with_agent("fpi", &["--fast-path"]);
    let app = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, CGROUP_APP_PORT);
    let _app = ServeProcess::start(
        &testkit_bin(),
        Some(&w.cgroup.path),
        &w.pair.workload.path,
        &[("app-cg".to_string(), app)],
    )
    .expect("app in the workload's cgroup");
    let to = w.pod(CGROUP_APP_PORT);
    let big = w.probe(&w.from_remote(to).bytes(1 << 20));
    assert_eq!(big.outcome, Outcome::Ok, "{big:?}");
    assert!(big.intact && big.received == 1 << 20, "{big:?}");
    // The app saw the proxy's passthrough source: the connection went through the proxy.
    assert!(
        big.banner_field("peer").unwrap_or("").starts_with("127.0.0.6:"),
        "{big:?}"
    );
    let many = w.probe_concurrently(&w.from_remote(to).bytes(64 * 1024), 16);
    for r in &many {
        assert_eq!(r.outcome, Outcome::Ok, "{r:?}");
        assert!(r.intact, "{r:?}");
    }
    // The app's accepted ends, by sock_ops (the agent enrolls the proxy's upstream ends itself,
    // which this counter does not see).
    assert!(event(&w, "fast_path_enrolled") >= 17, "{}", fast_path_events(&w));
    assert!(event(&w, "fast_path_redirected") >= 17, "{}", fast_path_events(&w));
    assert_maps_empty(&w);
}

/// 100,000 request/response round trips on one connection through the fast path, read on the
/// proxy's side by tokio: none may wait a second (the lost-wakeup regression of 6.6/6.12/6.18
/// stables shows as stalls of many seconds).
#[test]
fn round_trips_through_the_fast_path_never_stall() {
    let w = Workload::with_agent("fpr", &["--fast-path"]);
    let _echo = TestServer::start(&w.pair.remote, w.remote(ECHO_PORT), "echo").expect("echo server");
    let n = 100_000;
    let r = w.probe(&w.spec(w.remote(ECHO_PORT)).bytes(64).round_trips(n).tokio());
    assert_eq!(r.outcome, Outcome::Ok, "{r:?}");
    assert_eq!(r.round_trips, n, "{r:?}");
    assert!(r.intact, "a response differed from its request: {r:?}");
    println!(
        "{n} round trips in {} ms, slowest {} us",
        r.elapsed_ms, r.slowest_round_trip_us
    );
    assert!(
        r.slowest_round_trip_us < 1_000_000,
        "a round trip stalled for {} us",
        r.slowest_round_trip_us
    );
    // Both directions of the app's connection skipped TCP/IP.
    assert!(event(&w, "fast_path_redirected") >= 2, "{}", fast_path_events(&w));
    assert_eq!(event(&w, "fast_path_declined"), 0, "{}", fast_path_events(&w));
}

/// A reader that stops reading (the remote server, so the proxy stops reading the app's end)
/// must make the app's writes block, as TCP's windows would, and not queue without bound in
/// the proxy's socket.
///
/// It does not: a message redirected to a peer's ingress is charged with `__sk_rmem_schedule`
/// only (net/ipv4/tcp_bpf.c, `bpf_tcp_ingress`), which checks the global tcp_mem and the
/// socket's memory cgroup, never its receive buffer, and the sender's own buffer is released at
/// once. On 6.18.44 the writer got its whole 256 MiB cap in; on 6.1.192 (a 1 GiB VM) it got
/// 118 MiB in, then its write failed with ENOMEM when TCP memory ran out for everyone. Kept as
/// a test (run with `--ignored`) of one reason the probe keeps `--fast-path=auto` off.
#[test]
#[ignore = "kernel limitation: sk_msg ingress redirect has no per-socket bound (see docs/fast-path.md)"]
fn a_reader_that_stops_pushes_back() {
    let w = Workload::with_agent("fps", &["--fast-path"]);
    let _sink = TestServer::start(&w.pair.remote, w.remote(SINK_PORT), "sink").expect("sink server");
    let r = w.probe(&w.spec(w.remote(SINK_PORT)).fill().tokio());
    assert_eq!(r.outcome, Outcome::Ok, "{r:?}");
    println!("a stopped reader took {} KiB before writes blocked", r.sent / 1024);
    assert!(event(&w, "fast_path_redirected") >= 1, "{}", fast_path_events(&w));
    assert!(
        r.sent < 64 << 20,
        "{} MiB were taken in for a reader that reads nothing",
        r.sent >> 20
    );
}

/// How long `--half-close-then-wait` blocks in its read, and from when it counts as having
/// waited it out (connect and the banner come first).
const WAIT_MS: u64 = 1500;
const WAITED_MS: u64 = 1000;

/// A blocking app half-closes and waits for a reply that never comes (the remote sink never
/// reads, so the proxy never half-closes back): whether its read waited out its timeout.
fn blocking_read_waits(w: &Workload) -> (bool, redirect_testkit::report::ProbeResult) {
    let r = w.probe(&w.spec(w.remote(SINK_PORT)).half_close_then_wait(WAIT_MS));
    (r.outcome == Outcome::Timeout && r.elapsed_ms >= WAITED_MS, r)
}

/// `--fast-path=auto`, the default, follows the kernel's probe (`check` prints its findings),
/// and the probe finds what a workload's own connections meet with the fast path on: a stopped
/// reader that lets the app write on (as `a_reader_that_stops_pushes_back` shows), a blocking
/// read that a wakeup without data ends early. With the fast path off, the same blocking read
/// waits out its timeout, so the measurement tells the two apart.
#[test]
fn the_default_follows_the_probe_and_the_probe_what_workloads_meet() {
    let out = agent_cmd(&["check", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let probe = &report["fast_path"];
    assert!(probe["error"].is_null(), "{probe:#}");
    let found = |key: &str| probe["findings"][key].as_bool().unwrap_or_else(|| panic!("{probe:#}"));
    let (pushes_back, waits) = (found("pushes_back"), found("blocking_reads_wait"));
    assert_eq!(probe["auto_on"].as_bool(), Some(pushes_back && waits), "{probe:#}");

    {
        let on = Workload::with_agent("fpk", &["--fast-path=on"]);
        let _sink = TestServer::start(&on.pair.remote, on.remote(SINK_PORT), "sink").expect("sink server");
        // 32 MiB: past what TCP's buffers take, short of a burden on the machine.
        let cap = 32 << 20;
        let filled = on.probe(&on.spec(on.remote(SINK_PORT)).fill_up_to(cap).tokio());
        assert_eq!(filled.outcome, Outcome::Ok, "{filled:?}");
        assert!(event(&on, "fast_path_redirected") >= 1, "{}", fast_path_events(&on));
        let (waited, read) = blocking_read_waits(&on);
        assert_eq!(
            (pushes_back, waits),
            (filled.sent < cap, waited),
            "the probe: {probe:#}; a workload's stopped reader took {} KiB; its blocking read: {read:?}",
            filled.sent >> 10
        );
    }

    // The default (the harness turns the fast path off unless told): the probe's answer
    // decides, and the workload's pairs stay on TCP unless it found the kernel safe.
    let default = Workload::with_agent("fpd", &["--fast-path=auto"]);
    let _sink = TestServer::start(&default.pair.remote, default.remote(SINK_PORT), "sink").expect("sink server");
    let (waited, read) = blocking_read_waits(&default);
    assert_eq!(read.banner_field("name"), Some("sink"), "{read:?}");
    assert_eq!(
        event(&default, "fast_path_enrolled") > 0,
        pushes_back && waits,
        "{}",
        fast_path_events(&default)
    );
    if !(pushes_back && waits) {
        assert!(waited, "over TCP the blocking read waits out its timeout: {read:?}");
    }
}

/// The same 1 MiB exchange as `outbound_bytes_take_the_fast_path_intact`, with a client that
/// uses blocking calls. It passes on 6.1.192; on 6.18.44 its read fails with EAGAIN after about
/// 100 ms, long before its 10 s timeout: a socket in a sockhash waits for data in `tcp_msg_wait_data`, and a wakeup
/// that brings no message (an ACK, write space) ends a blocking read with -EAGAIN
/// (`tcp_bpf_recvmsg`, `tcp_bpf_recvmsg_parser`). Without the stream verdict it is the write
/// that fails so. Event-driven clients (tokio, epoll) retry on EAGAIN and are unaffected.
#[test]
#[ignore = "kernel behaviour: blocking reads on sockhash sockets can fail with EAGAIN (see docs/fast-path.md)"]
fn blocking_clients_on_the_fast_path() {
    let w = Workload::with_agent("fpb", &["--fast-path"]);
    let big = w.probe(&w.spec(w.remote(REMOTE_PORT)).bytes(1 << 20));
    assert_eq!(big.outcome, Outcome::Ok, "{big:?}");
    assert!(big.intact, "{big:?}");
}

/// A sender whose peer is not in the sockhash when it first writes keeps TCP for the whole
/// connection (bytes of one direction never switch paths). With `--proxy none` and a stand-in
/// proxy outside the workload's cgroup, sock_ops never enrolls the proxy's end: the app's end
/// joins, finds no peer at its first message, and every byte goes over TCP, intact.
#[test]
fn a_sender_without_a_peer_keeps_tcp() {
    let w = Workload::with_agent("fpn", &["--fast-path", "--proxy", "none"]);
    let any = |p| SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, p);
    let _proxy = TestServer::start(&w.pair.workload, any(15001), "echo-proxy").expect("stand-in proxy");
    let r = w.probe(&w.spec(w.remote(REMOTE_PORT)).bytes(4096).round_trips(100).tokio());
    assert_eq!(r.outcome, Outcome::Ok, "{r:?}");
    assert_eq!(r.banner_field("name"), Some("echo-proxy"), "{r:?}");
    assert!(r.intact && r.round_trips == 100, "{r:?}");
    assert_eq!(event(&w, "fast_path_enrolled"), 1, "{}", fast_path_events(&w));
    assert_eq!(event(&w, "fast_path_declined"), 1, "{}", fast_path_events(&w));
    assert_eq!(event(&w, "fast_path_redirected"), 0, "{}", fast_path_events(&w));
    assert_maps_empty(&w);
}
