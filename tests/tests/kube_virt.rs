//! `-k` (`--kube-virt-interfaces`): a VM behind a device of the pod's namespace. Its TCP
//! connections through the pod (forwarded) and to the pod itself are redirected to the outbound
//! capture port as istio-iptables' `nat PREROUTING -i K -j ISTIO_REDIRECT` sends them, and the
//! embedded proxy takes them on from the pod; what the `-i` list leaves out goes direct, on
//! `-i K -j RETURN`. Each is counted on its rule. (tests/tests/differential.rs holds the same
//! against iptables itself, addresses and SO_ORIGINAL_DST included.)
//!
//! The VM is a namespace behind the workload's `x0` (10.200.`VM_SUBNET`.0/24 and its ULA /64),
//! routed to the remote host's subnet through the pod, which forwards; the remote host routes
//! back through the pod. No default route anywhere.

use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use redirect_testkit::{
    netns::{NamedNetns, NetnsPair, pair_ip6, veth},
    probe::ProbeSpec,
    report::Outcome,
    server::TestServer,
    unique,
};
use redirect_tests::{APP_PORT, Landing, REMOTE_PORT, TUNNEL_PORT, Workload, landing, node::NodeAgent};

const POD_SUBNET: u8 = 46;
const VM_SUBNET: u8 = 47;

/// A workload wired to a remote host and, behind `x0`, a VM.
struct PodWithVm {
    w: Workload,
    vm: NamedNetns,
    _remote6: TestServer,
    _app6: TestServer,
}

impl PodWithVm {
    /// `wire_vm`: the VM's link is made before the agent starts (else later, by the test).
    fn new(tag: &str, flags: &[&str], wire_vm: bool) -> Self {
        Self::with(tag, Some(flags), wire_vm)
    }

    /// `flags`: a `run` of them, or (`None`) no agent: a node agent enrolls it.
    fn with(tag: &str, flags: Option<&[&str]>, wire_vm: bool) -> Self {
        redirect_tests::require_root();
        let base = unique(tag);
        let workload = NamedNetns::create(&format!("{base}-w")).expect("netns");
        let remote = NamedNetns::create(&format!("{base}-r")).expect("netns");
        let vm = NamedNetns::create(&format!("{base}-v")).expect("netns");
        let pair = NetnsPair::wire(workload, remote, POD_SUBNET).expect("the pod's veth");
        // The remote host answers the VM through the pod.
        let (pod4, pod6) = (pair.workload_ip.to_string(), pair.workload_ip6.to_string());
        for args in [
            vec!["route", "add", &net4(VM_SUBNET), "via", &pod4],
            vec!["-6", "route", "add", &net6(VM_SUBNET), "via", &pod6],
        ] {
            pair.remote.ip(&args).expect("remote's route to the VM");
        }
        for (key, value) in [("net.ipv4.ip_forward", "1"), ("net.ipv6.conf.all.forwarding", "1")] {
            pair.workload.sysctl(key, value).expect("the pod forwards");
        }
        let remote6 = TestServer::start(
            &pair.remote,
            SocketAddr::new(pair.remote_ip6.into(), REMOTE_PORT),
            "remote6",
        )
        .expect("IPv6 remote server");
        let app6 = TestServer::start(
            &pair.workload,
            SocketAddr::new(pair.workload_ip6.into(), APP_PORT),
            "app6",
        )
        .expect("IPv6 app");
        let mut w = Workload::on_pair(tag, pair);
        let t = |w| Self {
            w,
            vm,
            _remote6: remote6,
            _app6: app6,
        };
        if !wire_vm && let Some(flags) = flags {
            w.start_agent(flags).expect("agent starts");
        }
        let mut t = t(w);
        t.wire_vm();
        if wire_vm && let Some(flags) = flags {
            t.w.start_agent(flags).expect("agent starts");
        }
        t
    }

    /// The VM's link (`x0` in the pod, `v0` in the VM) and its routes to the remote host.
    fn wire_vm(&mut self) {
        veth((&self.w.pair.workload, "x0"), (&self.vm, "v0"), VM_SUBNET).expect("the VM's veth");
        let x0 = (format!("10.200.{VM_SUBNET}.1"), pair_ip6(VM_SUBNET).0.to_string());
        for args in [
            vec!["route", "add", &net4(POD_SUBNET), "via", &x0.0],
            vec!["-6", "route", "add", &net6(POD_SUBNET), "via", &x0.1],
        ] {
            self.vm.ip(&args).expect("the VM's route through the pod");
        }
    }

    /// A connection from the VM to `to`.
    fn dial_from_vm(&self, to: impl Into<SocketAddr>) -> redirect_testkit::report::ProbeResult {
        self.w.probe(&ProbeSpec::outside(&self.vm.path, to.into()))
    }

    fn vm_ip(&self, v6: bool) -> IpAddr {
        match v6 {
            false => "10.200.47.2".parse().unwrap(),
            true => pair_ip6(VM_SUBNET).1.into(),
        }
    }

    fn prerouting(&self, family: &str) -> Vec<u64> {
        self.w.family_counts(family, "PREROUTING")
    }
}

/// 10.200.`subnet`.0/24.
fn net4(subnet: u8) -> String {
    format!("10.200.{subnet}.0/24")
}

/// The ULA /64 of `subnet` ([`pair_ip6`]'s).
fn net6(subnet: u8) -> String {
    let s = pair_ip6(subnet).0.segments();
    format!("{}/64", std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
}

/// Who the server that answered saw the connection come from.
fn seen_from(r: &redirect_testkit::report::ProbeResult) -> IpAddr {
    let peer: SocketAddr = r
        .banner_field("peer")
        .unwrap_or_else(|| panic!("no banner: {r:?}"))
        .parse()
        .unwrap();
    peer.ip()
}

fn answered_by(r: &redirect_testkit::report::ProbeResult) -> String {
    match landing(r) {
        Landing::Direct { server } | Landing::Proxied { server, .. } => server,
        Landing::Failed(o) => panic!("failed ({o:?}): {r:?}"),
    }
}

#[test]
fn a_vms_connections_through_the_pod_and_to_it_are_redirected_to_the_proxy() {
    let t = PodWithVm::new("kv", &["-k", "x0"], true);
    let w = &t.w;
    // Forwarded: the remote host is dialed by the proxy, from the pod.
    let r = t.dial_from_vm(w.remote(REMOTE_PORT));
    assert_eq!(answered_by(&r), "remote", "{r:?}");
    assert_eq!(
        seen_from(&r),
        IpAddr::from(w.pair.workload_ip),
        "the pod's proxy dialed it: {r:?}"
    );
    let r = t.dial_from_vm(w.remote6(REMOTE_PORT));
    assert_eq!(answered_by(&r), "remote6", "{r:?}");
    assert_eq!(seen_from(&r), IpAddr::from(w.pair.workload_ip6), "{r:?}");
    // To the pod itself (delivered, but arriving on x0): redirected too, under `-i '*'`.
    let r = t.dial_from_vm(w.pod(APP_PORT));
    assert_eq!(answered_by(&r), "app", "{r:?}");
    assert_ne!(seen_from(&r), t.vm_ip(false), "through the proxy: {r:?}");
    // Each on `-i x0 -j ISTIO_REDIRECT`, none on the RETURN below it.
    assert_eq!(t.prerouting("ipv4"), [2, 0]);
    assert_eq!(t.prerouting("ipv6"), [1, 0]);
    let rules: Vec<String> = w
        .stats()
        .rules
        .iter()
        .filter(|r| r.family == "ipv4" && r.chain == "PREROUTING")
        .map(|r| format!("{} {}", r.match_, r.target))
        .collect();
    assert_eq!(rules, ["-i x0 ISTIO_REDIRECT", "-i x0 RETURN"], "stats names them");
    // The VM's own view: it talked to the remote host, on the port it dialed.
    let r = t.dial_from_vm(w.remote(REMOTE_PORT));
    assert_eq!(
        r.peer,
        Some(w.remote(REMOTE_PORT).to_string()),
        "the VM's socket sees the address it dialed: {r:?}"
    );
}

#[test]
fn an_include_list_redirects_only_its_cidrs_and_returns_the_rest() {
    let remote = "10.200.46.2/32";
    let t = PodWithVm::new("kvi", &["-k", "x0", "-i", remote], true);
    let w = &t.w;
    let r = t.dial_from_vm(w.remote(REMOTE_PORT));
    assert_eq!(seen_from(&r), IpAddr::from(w.pair.workload_ip), "in -i: proxied: {r:?}");
    // The pod's own address is not in the list: RETURN, straight to the app.
    let r = t.dial_from_vm(w.pod(APP_PORT));
    assert_eq!(answered_by(&r), "app", "{r:?}");
    assert_eq!(seen_from(&r), t.vm_ip(false), "direct: {r:?}");
    // ip6tables has no -i CIDR of its family: every IPv6 connection from x0 RETURNs.
    let r = t.dial_from_vm(w.remote6(REMOTE_PORT));
    assert_eq!(seen_from(&r), t.vm_ip(true), "direct: {r:?}");
    assert_eq!(
        t.prerouting("ipv4"),
        [1, 1],
        "-d {remote} -i x0 -j ISTIO_REDIRECT, then RETURN"
    );
    assert_eq!(t.prerouting("ipv6"), [1], "only the RETURN");
}

/// TPROXY mode: mangle's ISTIO_INBOUND (before nat's `-k` rules) takes a VM's connection to the
/// inbound capture listener, as iptables' TPROXY does: tc ingress marks it, the per-device rule
/// delivers it locally, sk_lookup hands it over. The embedded proxy dials the app from the VM's
/// own address, as it dials every client TPROXY brought. With `-i` naming only the pod, one
/// through the pod to the remote host is TPROXYed alone (nat RETURNs it): the proxy's
/// transparent dial (the TPROXY mark routes it into lo) finds nobody, a reset; and with TPROXY's
/// table emptied, the rule after the lookup refuses it. Never around the proxy. The rules go
/// with the run.
#[test]
fn in_tproxy_mode_a_vms_connection_to_the_pod_reaches_the_app_from_the_vms_address() {
    let mut t = PodWithVm::new("kvt", &["-k", "x0", "-m", "TPROXY", "-i", "10.200.46.1/32"], true);
    let rules = |ns: &NamedNetns, v6: bool| {
        let mut cmd = std::process::Command::new("ip");
        cmd.args(["netns", "exec", &ns.name, "ip"]);
        if v6 {
            cmd.arg("-6");
        }
        let out = cmd.arg("rule").output().expect("ip rule");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    for v6 in [false, true] {
        let r = rules(&t.w.pair.workload, v6);
        for rule in [
            "32700:\tfrom all fwmark 0x52440000 iif x0 lookup 133",
            "32701:\tfrom all fwmark 0x52440000 iif x0 prohibit",
        ] {
            assert!(r.contains(rule), "{rule} (v6: {v6}): {r}");
        }
    }
    let w = &t.w;
    // In -i: REDIRECTed by nat too, accepted at x0's address; IPv6 (no -i CIDR): TPROXY alone.
    let r = t.dial_from_vm(w.pod(APP_PORT));
    assert_eq!(answered_by(&r), "app", "{r:?}");
    assert_eq!(seen_from(&r), t.vm_ip(false), "the app sees the VM: {r:?}");
    let r = t.dial_from_vm(w.pod6(APP_PORT));
    assert_eq!(answered_by(&r), "app6", "{r:?}");
    assert_eq!(seen_from(&r), t.vm_ip(true), "the app sees the VM: {r:?}");
    let not_around = |r: &redirect_testkit::report::ProbeResult| {
        assert!(
            r.outcome != Outcome::Ok && r.banner_field("name").is_none(),
            "the remote host is not reached around the proxy: {r:?}"
        );
    };
    not_around(&t.dial_from_vm(w.remote(REMOTE_PORT)));
    w.pair
        .workload
        .ip(&["route", "del", "local", "default", "dev", "lo", "table", "133"])
        .expect("TPROXY's route deleted");
    not_around(&t.dial_from_vm(w.remote(REMOTE_PORT)));
    // Counted where iptables counts them: mangle's TPROXY, and nat's `-k` rules.
    assert_eq!(t.w.family_counts("ipv4", "ISTIO_TPROXY"), [3]);
    assert_eq!(
        t.prerouting("ipv4"),
        [1, 2],
        "-d 10.200.46.1/32 -i x0 -j ISTIO_REDIRECT, RETURN"
    );

    let mut agent = t.w.agent.take().expect("agent");
    agent.signal(libc::SIGTERM);
    let (status, log) = agent.wait(Duration::from_secs(30)).expect("the agent ends");
    assert!(status.success(), "{status}: {log}");
    for v6 in [false, true] {
        let r = rules(&t.w.pair.workload, v6);
        assert!(!r.contains("0x52440000"), "the divert rules are gone (v6: {v6}): {r}");
    }
}

/// The VM's device usually appears after the pod started: the agent attaches to it then. A
/// killed agent leaves the VM captured (its connections refused, never direct); the next run
/// takes the attachments over; a run's end removes them.
#[test]
fn a_device_added_later_is_captured_fail_closed_and_released_at_the_end() {
    let mut t = PodWithVm::new("kvl", &["-k", "x0"], false);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = t.dial_from_vm(t.w.remote(REMOTE_PORT));
        if r.outcome == Outcome::Ok && seen_from(&r) == IpAddr::from(t.w.pair.workload_ip) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "x0 not captured 10 s after it appeared: {r:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    let mut killed = t.w.agent.take().expect("agent");
    killed.signal(libc::SIGKILL);
    let _ = killed.wait(Duration::from_secs(10));
    let r = t.dial_from_vm(t.w.remote(REMOTE_PORT));
    assert_ne!(
        r.outcome,
        Outcome::Ok,
        "nothing serves the capture port, and nothing goes around it: {r:?}"
    );

    t.w.start_agent(&["-k", "x0"]).expect("a new run takes over");
    let r = t.dial_from_vm(t.w.remote(REMOTE_PORT));
    assert_eq!(seen_from(&r), IpAddr::from(t.w.pair.workload_ip), "served again: {r:?}");

    let mut agent = t.w.agent.take().expect("agent");
    agent.signal(libc::SIGTERM);
    agent.wait(Duration::from_secs(30)).expect("the run ends");
    let r = t.dial_from_vm(t.w.remote(REMOTE_PORT));
    assert_eq!(
        seen_from(&r),
        t.vm_ip(false),
        "after the run, straight through the pod: {r:?}"
    );
}

/// istio-iptables' `--cleanup-only` after a killed run: the VM's connections go straight
/// through the pod again (before 6.6 it deletes the cls_bpf filters from the devices `-k`
/// names, which no pin holds; on 6.6+ the tcx links go with their pins).
#[test]
fn cleanup_only_releases_a_killed_runs_vm_devices() {
    let mut t = PodWithVm::new("kvc", &["-k", "x0"], true);
    let r = t.dial_from_vm(t.w.remote(REMOTE_PORT));
    assert_eq!(seen_from(&r), IpAddr::from(t.w.pair.workload_ip), "captured: {r:?}");
    let mut killed = t.w.agent.take().expect("agent");
    killed.signal(libc::SIGKILL);
    let _ = killed.wait(Duration::from_secs(10));

    let mut args = vec![
        "run".to_owned(),
        "--cleanup-only".into(),
        "--name".into(),
        t.w.name.clone(),
    ];
    args.extend(t.w.run_args());
    args.extend(["-k".into(), "x0".into()]);
    let out = redirect_tests::agent_cmd(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r = t.dial_from_vm(t.w.remote(REMOTE_PORT));
    assert_eq!(seen_from(&r), t.vm_ip(false), "straight through the pod: {r:?}");
}

/// Node mode: a new agent process takes the VM's devices over from the running one (its tc
/// programs replace the old ones in place), and a connection the VM opened before goes on
/// through the old proxy's drain; unenrolled, the VM goes straight through the pod.
#[test]
fn a_handover_keeps_the_vm_captured_and_its_open_connection_alive() {
    let agent = NodeAgent::new("node-kv", &["--drain-timeout-ms", "60000"]);
    let mut first = agent.start().expect("node agent starts");
    let t = PodWithVm::with("kvn", None, true);
    let _echo = TestServer::start(&t.w.pair.remote, t.w.remote(8081), "echo-remote").expect("echo server");
    agent.enroll(&t.w.pair.workload.path, "vm-pod", &["--", "-k", "x0"]);
    let r = t.dial_from_vm(t.w.remote(REMOTE_PORT));
    assert_eq!(seen_from(&r), IpAddr::from(t.w.pair.workload_ip), "captured: {r:?}");

    // Open from the VM, through the first agent's proxy, before the handover.
    let stream =
        t.vm.open()
            .unwrap()
            .run(|| std::net::TcpStream::connect_timeout(&t.w.remote(8081).into(), Duration::from_secs(5)))
            .expect("the VM's long-lived connection");
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
    let mut banner = String::new();
    std::io::BufRead::read_line(&mut reader, &mut banner).unwrap();
    assert!(banner.contains("name=echo-remote"), "{banner}");
    let mut round_trip = |n: u32| {
        use std::io::{Read as _, Write as _};
        let msg = format!("{n:08}");
        (&stream).write_all(msg.as_bytes()).unwrap();
        let mut back = [0u8; 8];
        reader.read_exact(&mut back).unwrap();
        assert_eq!(&back, msg.as_bytes());
    };
    round_trip(1);

    let second = agent.start().expect("the new agent takes over");
    assert!(second.log().contains("a running agent handed over"), "{}", second.log());
    round_trip(2);
    let r = t.dial_from_vm(t.w.remote(REMOTE_PORT));
    assert_eq!(
        seen_from(&r),
        IpAddr::from(t.w.pair.workload_ip),
        "captured by the new agent: {r:?}"
    );
    round_trip(3);
    // Closed by the VM (both descriptors): the old proxy's last connection ends.
    drop((reader, stream));
    let (status, log) = first.wait(Duration::from_secs(30));
    assert!(status.is_some_and(|s| s.success()), "first agent: {status:?}\n{log}");

    let out = agent.cli(&["unenroll", "--id", "vm-pod"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r = t.dial_from_vm(t.w.remote(REMOTE_PORT));
    assert_eq!(
        seen_from(&r),
        t.vm_ip(false),
        "unenrolled: straight through the pod: {r:?}"
    );
    drop(second);
}

/// A connection from the VM, from port `sport`, to `to`; connect gives up after 2 s.
fn vm_socket_from_port(t: &PodWithVm, sport: u16, to: SocketAddr) -> std::io::Result<std::net::TcpStream> {
    let vm_ip = t.vm_ip(to.is_ipv6());
    t.vm.open()?.run(move || {
        use rustix::net::{AddressFamily, SocketType, bind, connect, socket, sockopt};
        let family = if to.is_ipv6() {
            AddressFamily::INET6
        } else {
            AddressFamily::INET
        };
        let fd = socket(family, SocketType::STREAM, None)?;
        sockopt::set_socket_reuseaddr(&fd, true)?;
        // A blocking connect gives up after the send timeout.
        sockopt::set_socket_timeout(&fd, sockopt::Timeout::Send, Some(Duration::from_secs(2)))?;
        bind(&fd, &SocketAddr::new(vm_ip, sport))?;
        connect(&fd, &to)?;
        let s = std::net::TcpStream::from(fd);
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        Ok(s)
    })
}

/// The first line a server sent.
fn first_line(s: &std::net::TcpStream) -> String {
    let mut line = String::new();
    let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(s), &mut line);
    line
}

/// Linux gives one source port to connections to different destinations. conntrack keeps each
/// by its whole tuple: a connection the `-i` list leaves alone does not disturb a redirected
/// one from the same VM port; a second redirected one would share the first's reply tuple, so
/// its SYN is dropped (a NAT clash) and the first goes on.
#[test]
fn a_vm_port_used_for_two_destinations_keeps_each_connection_its_own() {
    let t = PodWithVm::new("kvp", &["-k", "x0", "-i", "10.200.46.2/32"], true);
    let a = vm_socket_from_port(&t, 40000, t.w.remote(REMOTE_PORT).into()).expect("A connects");
    assert!(first_line(&a).contains("name=remote"), "A reached the remote host");
    let b = vm_socket_from_port(&t, 40000, t.w.pod(APP_PORT).into()).expect("B connects");
    assert!(first_line(&b).contains("name=app"), "B reached the app");
    let clash = vm_socket_from_port(&t, 40000, t.w.remote(TUNNEL_PORT).into());
    assert!(
        clash.is_err(),
        "a second redirected connection from port 40000 is dropped"
    );
    // A still works: an echo, then its close.
    use std::io::{Read as _, Write as _};
    (&a).write_all(b"hello-from-A").unwrap();
    a.shutdown(std::net::Shutdown::Write).unwrap();
    let mut got = String::new();
    (&a).read_to_string(&mut got).unwrap();
    assert_eq!(got, "hello-from-A", "connection A goes on");
    // Each SYN of the clash (the first and those retransmitted before its socket closed) was
    // dropped, and each counted on ISTIO_REDIRECT: conntrack never confirmed it, so each was
    // NEW again for nat. Counters and events come from one snapshot, taken once they agree or
    // after 5 s: a SYN the VM sent just before the close can still wait in the pod's backlog
    // when connect gives up, and is counted, with its event, a moment later.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let stats = t.w.stats();
        let clashes = stats.workloads[0].events.get("virt_port_clash").copied().unwrap_or(0);
        let prerouting: Vec<u64> = stats
            .rules
            .iter()
            .filter(|r| r.chain == "PREROUTING" && r.family == "ipv4")
            .map(|r| r.connections)
            .collect();
        let settled = clashes >= 1 && prerouting == [1 + clashes, 1];
        if settled || Instant::now() > deadline {
            assert!(clashes >= 1, "{:?}", stats.workloads[0].events);
            assert_eq!(
                prerouting,
                [1 + clashes, 1],
                "A and the dropped SYNs on ISTIO_REDIRECT, B on RETURN"
            );
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
