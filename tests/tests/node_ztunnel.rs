//! Node mode serving ztunnel over ZDS (`node --ztunnel-socket`), against a fake ztunnel
//! ([`redirect_tests::ztunnel`]): an ambient pod enrolled with `--proxy none` is handed to it
//! with its network namespace, in which the fake listens as ztunnel does and receives the
//! pod's captured outbound; unenroll deletes it; a restart and a handover give the ztunnel
//! that reconnects a snapshot holding it; a NACK fails the enroll and takes the workload back
//! out; bad sockets and pods without a uid are refused.

use std::{
    fs::File,
    io::BufReader,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use redirect_api::{ApiError, ClientError, Enroll, ErrorKind, PodRef, Request, Response};
use redirect_testkit::{
    netns::NetnsPair,
    server::{TestServer, read_banner},
    unique,
};
use redirect_tests::{
    agent_cmd_within,
    node::{NodeAgent, metric},
    ztunnel::{Event, FakeZtunnel, fd_ns_id, listen_in, ns_id},
};

/// How long the fake waits for any one thing the agent does.
const WAIT: Duration = Duration::from_secs(10);
/// How long it waits to be sure that nothing comes.
const QUIET: Duration = Duration::from_millis(500);
const UID: &str = "6f0c4a8e-1d2b-4c3a-9e8f-0a1b2c3d4e5f";
const AMBIENT: &[&str] = &["--mode", "ambient"];

/// A directory for the ZDS socket, removed with what is in it on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(unique(tag));
        std::fs::create_dir_all(&dir).expect("a directory for the ZDS socket");
        Self(dir)
    }

    fn socket(&self) -> PathBuf {
        self.0.join("ztunnel.sock")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A node agent of its own that serves ZDS on `socket`.
fn zds_agent(tag: &str, socket: &Path) -> NodeAgent {
    NodeAgent::new(tag, &["--ztunnel-socket", &socket.to_string_lossy()])
}

fn pod(name: &str, uid: Option<&str>) -> PodRef {
    PodRef {
        uid: uid.map(str::to_owned),
        service_account: Some("web-sa".into()),
        ..PodRef::new("default", name)
    }
}

fn enroll(id: &str, netns: &Path, args: &[&str], proxy: &str, pod: Option<PodRef>) -> Request {
    Request::Enroll(Enroll {
        id: id.into(),
        netns: netns.to_owned(),
        cgroup: None,
        proxy: proxy.into(),
        args: args.iter().map(|a| a.to_string()).collect(),
        fast_path: false,
        pod,
    })
}

fn call(agent: &NodeAgent, request: &Request) -> Result<Response, ClientError> {
    redirect_api::call(&agent.socket, request, Duration::from_secs(30))
}

/// `request` sent to the agent while the fake answers what it is sent meanwhile with
/// `answer`, one request after another: the API's answer, and what the fake received (an error
/// ends it).
fn call_while(
    agent: &NodeAgent,
    request: &Request,
    zt: &FakeZtunnel,
    mut answer: impl FnMut(&FakeZtunnel, &Event) -> bool,
) -> (Result<Response, ClientError>, Vec<std::io::Result<Event>>) {
    std::thread::scope(|s| {
        let api = s.spawn(|| call(agent, request));
        let mut got = Vec::new();
        loop {
            let event = zt.expect(WAIT);
            let more = match &event {
                Ok(e) => answer(zt, e),
                Err(_) => false,
            };
            got.push(event);
            if !more {
                break;
            }
        }
        (api.join().expect("the API call"), got)
    })
}

/// An `AddWorkload` for the pod [`pod`] made, whose namespace is the one at `netns`.
fn assert_added(event: &Event, name: &str, netns: &Path) {
    let Event::Add { uid, info, netns: fd } = event else {
        panic!("expected AddWorkload, got {event:?}");
    };
    assert_eq!(uid, UID);
    assert_eq!(
        (
            info.name.as_str(),
            info.namespace.as_str(),
            info.service_account.as_str()
        ),
        (name, "default", "web-sa")
    );
    let want = ns_id(&File::open(netns).unwrap()).unwrap();
    assert_eq!(fd_ns_id(fd).unwrap(), want, "the descriptor is the pod's namespace");
}

/// A TCP connection from inside `pair`'s workload namespace to `to`.
fn dial_from_pod(pair: &NetnsPair, to: SocketAddrV4) -> std::io::Result<TcpStream> {
    pair.workload
        .open()?
        .run(move || TcpStream::connect_timeout(&to.into(), Duration::from_secs(5)))
}

fn accept_within(listener: &std::net::TcpListener, within: Duration) -> Option<(TcpStream, SocketAddr)> {
    let deadline = Instant::now() + within;
    loop {
        match listener.accept() {
            Ok(accepted) => return Some(accepted),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(_) => return None,
        }
    }
}

#[test]
fn an_ambient_pod_goes_to_ztunnel_with_its_namespace_its_outbound_reaches_ztunnel_and_unenroll_deletes_it() {
    let dir = TempDir::new("zt-add");
    let pair = NetnsPair::create_on("zt-add", 61).expect("namespaces");
    let agent = zds_agent("zt-add", &dir.socket());
    let _node = agent.start().expect("node agent starts");
    let zt = FakeZtunnel::connect(&dir.socket(), WAIT).unwrap();
    assert!(zt.snapshot(WAIT).unwrap().is_empty(), "nothing enrolled yet");

    let request = enroll(
        "web-0",
        &pair.workload.path,
        AMBIENT,
        "none",
        Some(pod("web-0", Some(UID))),
    );
    let (answer, mut got) = call_while(&agent, &request, &zt, |zt, _| {
        zt.ack().unwrap();
        false
    });
    let Ok(Response::Enrolled(info)) = answer else {
        panic!("enroll: {answer:?}");
    };
    assert_eq!(info.id, "web-0");
    let added = got.remove(0).unwrap();
    assert_added(&added, "web-0", &pair.workload.path);
    let Event::Add { netns, .. } = added else {
        unreachable!()
    };

    // As ztunnel: its outbound listener in the namespace it was handed, marked as its own.
    let listener = listen_in(&netns, SocketAddr::from((Ipv4Addr::UNSPECIFIED, 15001))).unwrap();
    // Nothing listens at the remote end: only the capture can make this connect.
    let remote = SocketAddrV4::new(pair.remote_ip, 8080);
    let _app = dial_from_pod(&pair, remote).expect("the pod's outbound connection is captured");
    let (accepted, peer) = accept_within(&listener, WAIT).expect("ztunnel's listener accepts it");
    assert_eq!(peer.ip(), pair.workload_ip, "from the pod's own address");
    assert_eq!(
        redirect_testkit::sock::original_dst(&accepted).unwrap(),
        SocketAddr::from(remote),
        "SO_ORIGINAL_DST names where the pod dialed"
    );

    let request = Request::Unenroll {
        id: Some("web-0".into()),
        netns: None,
    };
    let (answer, got) = call_while(&agent, &request, &zt, |zt, _| {
        zt.ack().unwrap();
        false
    });
    assert!(
        matches!(&answer, Ok(Response::Unenrolled { id }) if id == "web-0"),
        "{answer:?}"
    );
    assert!(matches!(&got[..], [Ok(Event::Del { uid })] if uid == UID), "{got:?}");
    assert!(agent.ids().is_empty());
    // Captured no more: the connection goes to the remote host, where nothing listens.
    let direct = dial_from_pod(&pair, remote);
    assert_eq!(
        direct.map_err(|e| e.kind()).err(),
        Some(std::io::ErrorKind::ConnectionRefused)
    );
    assert!(accept_within(&listener, QUIET).is_none());
}

#[test]
fn a_restarted_agent_gives_the_reconnecting_ztunnel_a_snapshot_with_the_adopted_pod() {
    let dir = TempDir::new("zt-restart");
    let pair = NetnsPair::create_on("zt-restart", 62).expect("namespaces");
    let agent = zds_agent("zt-restart", &dir.socket());
    let mut first = agent.start().expect("node agent starts");
    let zt = FakeZtunnel::connect(&dir.socket(), WAIT).unwrap();
    assert!(zt.snapshot(WAIT).unwrap().is_empty());
    let request = enroll(
        "web-1",
        &pair.workload.path,
        AMBIENT,
        "none",
        Some(pod("web-1", Some(UID))),
    );
    let (answer, got) = call_while(&agent, &request, &zt, |zt, _| {
        zt.ack().unwrap();
        false
    });
    assert!(matches!(answer, Ok(Response::Enrolled(_))), "{answer:?}");
    assert_added(got[0].as_ref().unwrap(), "web-1", &pair.workload.path);

    let (status, log) = first.stop(WAIT);
    assert!(status.is_some_and(|s| s.success()), "{log}");
    assert!(zt.closed_within(WAIT).unwrap(), "the stopped agent's connection closes");
    assert!(!dir.socket().exists(), "the stopped agent removed its socket");

    // The pins are adopted, and the pod is in the first snapshot of the new agent.
    let _second = agent.start().expect("a new agent adopts the pins");
    let zt = FakeZtunnel::connect(&dir.socket(), WAIT).unwrap();
    let snapshot = zt.snapshot(WAIT).unwrap();
    assert_eq!(snapshot.len(), 1, "{snapshot:?}");
    assert_added(&snapshot[0], "web-1", &pair.workload.path);
    assert_eq!(agent.ids(), ["web-1"]);
}

#[test]
fn a_successor_binds_once_its_predecessor_lets_go_before_it_drains_and_ztunnel_finds_the_pod_there() {
    let dir = TempDir::new("zt-handover");
    let pair = NetnsPair::create_on("zt-handover", 63).expect("namespaces");
    // A sidecar pod of the embedded proxy, whose open connection the predecessor drains.
    let sidecar = NetnsPair::create_on("zt-handover-sc", 65).expect("namespaces");
    let remote = SocketAddrV4::new(sidecar.remote_ip, 8080);
    let _remote_server = TestServer::start(&sidecar.remote, remote, "remote").expect("remote server");
    let agent = NodeAgent::new(
        "zt-handover",
        &[
            "--ztunnel-socket",
            &dir.socket().to_string_lossy(),
            "--drain-timeout-ms",
            "60000",
        ],
    );
    let mut first = agent.start().expect("node agent starts");
    let zt = FakeZtunnel::connect(&dir.socket(), WAIT).unwrap();
    assert!(zt.snapshot(WAIT).unwrap().is_empty());
    let request = enroll(
        "web-2",
        &pair.workload.path,
        AMBIENT,
        "none",
        Some(pod("web-2", Some(UID))),
    );
    let (answer, _) = call_while(&agent, &request, &zt, |zt, _| {
        zt.ack().unwrap();
        false
    });
    assert!(matches!(answer, Ok(Response::Enrolled(_))), "{answer:?}");
    agent.enroll(&sidecar.workload.path, "sidecar", &[]);
    let held = dial_from_pod(&sidecar, remote).expect("through the embedded proxy");
    held.set_read_timeout(Some(WAIT)).unwrap();
    let banner = read_banner(&mut BufReader::new(&held)).expect("the remote server answers");
    assert!(banner.contains("name=remote"), "{banner}");

    // The predecessor listens on the socket while the successor starts; it lets go once it
    // has handed over, before it drains, and the successor binds then.
    let second = agent.start().expect("a new agent takes over");
    assert!(zt.closed_within(WAIT).unwrap(), "the predecessor's connection closes");
    let zt = FakeZtunnel::connect(&dir.socket(), WAIT).unwrap();
    let snapshot = zt.snapshot(WAIT).unwrap();
    assert_eq!(snapshot.len(), 1, "{snapshot:?}\n{}", second.log());
    assert_added(&snapshot[0], "web-2", &pair.workload.path);
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", first.pid())).unwrap_or_default();
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next());
    assert!(
        state.is_some_and(|s| s != 'Z'),
        "the predecessor still drains the held connection: {stat}"
    );
    drop(held);
    let (status, log) = first.wait(Duration::from_secs(30));
    assert!(status.is_some_and(|s| s.success()), "{log}");
    assert_eq!(agent.ids(), ["sidecar", "web-2"]);
}

#[test]
fn a_nack_fails_the_enroll_and_takes_the_workload_out_and_only_ambient_pods_with_a_uid_go_to_ztunnel() {
    let dir = TempDir::new("zt-nack");
    let pair = NetnsPair::create_on("zt-nack", 64).expect("namespaces");
    let agent = zds_agent("zt-nack", &dir.socket());
    let _node = agent.start().expect("node agent starts");
    let zt = FakeZtunnel::connect(&dir.socket(), WAIT).unwrap();
    assert!(zt.snapshot(WAIT).unwrap().is_empty());
    let workloads = || {
        let (_, text) = agent.scrape("/metrics").unwrap();
        metric(&text, "redirect_map_entries{map=\"WORKLOADS\"}")
    };

    let refusal = "cannot start the in-pod proxy: test";
    let request = enroll(
        "web-3",
        &pair.workload.path,
        AMBIENT,
        "none",
        Some(pod("web-3", Some(UID))),
    );
    // The NACK, then the DelWorkload of the workload taken back out.
    let (answer, got) = call_while(&agent, &request, &zt, |zt, e| match e {
        Event::Add { .. } => {
            zt.nack(refusal).unwrap();
            true
        }
        _ => {
            zt.ack().unwrap();
            false
        }
    });
    let Err(ClientError::Refused(ApiError { kind, message })) = answer else {
        panic!("enroll: {answer:?}");
    };
    assert_eq!(kind, ErrorKind::Unavailable, "{message}");
    for part in [refusal, "default/web-3", UID] {
        assert!(message.contains(part), "expected '{part}' in: {message}");
    }
    assert_eq!(message.lines().count(), 1, "{message}");
    assert_added(got[0].as_ref().unwrap(), "web-3", &pair.workload.path);
    assert!(matches!(&got[1..], [Ok(Event::Del { uid })] if uid == UID), "{got:?}");
    assert!(agent.ids().is_empty());
    assert_eq!(workloads(), Some(0.0), "nothing of it left in the programs' map");

    // No uid: nothing to key it by in ZDS.
    let request = enroll("web-4", &pair.workload.path, AMBIENT, "none", Some(pod("web-4", None)));
    let answer = call(&agent, &request);
    let Err(ClientError::Refused(ApiError { kind, message })) = answer else {
        panic!("enroll without a uid: {answer:?}");
    };
    assert_eq!(kind, ErrorKind::Invalid, "{message}");
    assert!(message.contains("uid") && message.contains("web-4"), "{message}");
    assert_eq!(message.lines().count(), 1, "{message}");
    let quiet = zt.recv(QUIET).map_err(|e| e.kind());
    assert_eq!(
        quiet.err(),
        Some(std::io::ErrorKind::TimedOut),
        "nothing sent to ztunnel"
    );
    assert!(agent.ids().is_empty());
    assert_eq!(workloads(), Some(0.0));

    // A sidecar's pod, with a uid all the same, is no business of ztunnel's.
    let request = enroll("web-5", &pair.workload.path, &[], "none", Some(pod("web-5", Some(UID))));
    let answer = call(&agent, &request);
    assert!(matches!(answer, Ok(Response::Enrolled(_))), "{answer:?}");
    let quiet = zt.recv(QUIET).map_err(|e| e.kind());
    assert_eq!(
        quiet.err(),
        Some(std::io::ErrorKind::TimedOut),
        "nothing sent to ztunnel"
    );
    assert_eq!(agent.ids(), ["web-5"]);
}

#[test]
fn bad_ztunnel_sockets_are_refused_before_anything_changes() {
    redirect_tests::require_root();
    let dir = TempDir::new("zt-bad");
    let file = dir.0.join("a-file");
    std::fs::write(&file, "").unwrap();
    // Something else serves ZDS there (istio-cni's node agent, say).
    let taken = dir.0.join("taken.sock");
    let listener = rustix::net::socket(
        rustix::net::AddressFamily::UNIX,
        rustix::net::SocketType::SEQPACKET,
        None,
    )
    .unwrap();
    rustix::net::bind(&listener, &rustix::net::SocketAddrUnix::new(&taken).unwrap()).unwrap();
    rustix::net::listen(&listener, 1).unwrap();
    let dir_path = dir.0.to_string_lossy().into_owned();
    let cases = [
        ("relative/ztunnel.sock".to_owned(), "a relative path"),
        (dir_path.clone(), "is a directory"),
        (format!("{dir_path}/missing/ztunnel.sock"), "does not exist"),
        (file.to_string_lossy().into_owned(), "is a regular file"),
        (taken.to_string_lossy().into_owned(), "something listens on it"),
    ];
    for (value, why) in cases {
        let name = unique("zt-bad");
        let socket = format!("/run/redirect/{name}.sock");
        let args = [
            "node",
            "--name",
            &name,
            "--socket",
            &socket,
            "--metrics",
            "off",
            "--fast-path=off",
            "--ztunnel-socket",
            &value,
        ];
        let out = agent_cmd_within(&args, Duration::from_secs(60)).expect("a refusal ends by itself");
        let err = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        assert_eq!(out.status.code(), Some(1), "{value}: {err}");
        assert_eq!(err.lines().count(), 1, "{value}: {err}");
        for part in [value.as_str(), why, "expected an absolute path"] {
            assert!(err.contains(part), "{value}: expected '{part}' in: {err}");
        }
        assert!(
            redirect_agent::engine::pins::State::read(&name).is_none(),
            "{value}: a state was written"
        );
        assert!(
            !redirect_agent::engine::pins::pin_dir(&name).exists(),
            "{value}: pins were made"
        );
        assert!(!Path::new(&socket).exists(), "{value}: the control socket was bound");
        let lock = format!("/run/redirect/{name}.lock");
        assert!(!Path::new(&lock).exists(), "{value}: the instance's lock file was left");
    }
    assert!(taken.exists(), "the other server's socket is left alone");
}

#[test]
fn an_ambient_pod_nothing_would_serve_is_not_enrolled() {
    let dir = TempDir::new("zt-none");
    let pair = NetnsPair::create_on("zt-none", 66).expect("namespaces");
    let request = enroll(
        "web-6",
        &pair.workload.path,
        AMBIENT,
        "none",
        Some(pod("web-6", Some(UID))),
    );
    let refused = |agent: &NodeAgent, kind: ErrorKind, part: &str| {
        let answer = call(agent, &request);
        let Err(ClientError::Refused(ApiError { kind: got, message })) = answer else {
            panic!("enroll: {answer:?}");
        };
        assert_eq!(got, kind, "{message}");
        assert!(message.contains(part), "expected '{part}' in: {message}");
        assert_eq!(message.lines().count(), 1, "{message}");
        assert!(agent.ids().is_empty());
    };
    // Serving ZDS, but no ztunnel has connected: as istio-cni, the pod's ADD fails (and is
    // retried) rather than its pod starting with nothing on its ports.
    let agent = zds_agent("zt-none", &dir.socket());
    let _node = agent.start().expect("node agent starts");
    refused(&agent, ErrorKind::Unavailable, "no ztunnel is connected");
    // Once one has, the same request is served.
    let zt = FakeZtunnel::connect(&dir.socket(), WAIT).unwrap();
    assert!(zt.snapshot(WAIT).unwrap().is_empty());
    let (answer, _) = call_while(&agent, &request, &zt, |zt, _| {
        zt.ack().unwrap();
        false
    });
    assert!(matches!(answer, Ok(Response::Enrolled(_))), "{answer:?}");

    // Not serving ZDS at all: nothing would ever serve an ambient pod's ports with no proxy.
    let plain = NodeAgent::new("zt-plain", &[]);
    let _node = plain.start().expect("node agent starts");
    refused(&plain, ErrorKind::Invalid, "serves no ztunnel");
}
