//! The wire format against hand-written bytes, and the server against a fake ztunnel: a
//! blocking SOCK_SEQPACKET client in the test. No root, no namespaces: any descriptor stands
//! for a pod's namespace.

use std::{
    os::fd::{AsFd, OwnedFd},
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use prost::Message as _;
use rustix::net::{AddressFamily, SendFlags, SocketAddrUnix, SocketFlags, SocketType};

use super::{
    ZdsError, ZdsPod, ZdsServer,
    proto::{
        Ack, Version, WindowsNamespace, WorkloadInfo, WorkloadRequest, WorkloadResponse, ZdsHello, workload_request,
        workload_response,
    },
};

/// How long the fake ztunnel waits for a datagram before it fails the test.
const FAKE_WAIT: Duration = Duration::from_secs(5);

/// A directory under the system's temporary one, removed with everything in it on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "zds-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// ztunnel's side, blocking.
struct FakeZtunnel(OwnedFd);

impl FakeZtunnel {
    fn connect(path: &Path) -> Self {
        let s =
            rustix::net::socket_with(AddressFamily::UNIX, SocketType::SEQPACKET, SocketFlags::CLOEXEC, None).unwrap();
        rustix::net::connect(&s, &SocketAddrUnix::new(path).unwrap()).unwrap();
        rustix::net::sockopt::set_socket_timeout(&s, rustix::net::sockopt::Timeout::Recv, Some(FAKE_WAIT)).unwrap();
        Self(s)
    }

    fn send(&self, bytes: &[u8]) {
        assert_eq!(
            rustix::net::send(&self.0, bytes, SendFlags::NOSIGNAL).unwrap(),
            bytes.len()
        );
    }

    fn hello(&self, version: i32) {
        self.send(&ZdsHello { version }.encode_to_vec());
    }

    /// The next request and the descriptors that came with it; panics if the server closed.
    fn recv(&self) -> (WorkloadRequest, Vec<OwnedFd>) {
        let mut buf = [0u8; super::MAX_MESSAGE];
        let (n, fds) = crate::sys::recv_with_fds(&self.0, &mut buf).expect("a request from the server");
        assert!(n > 0, "the server closed the connection");
        (WorkloadRequest::decode(&buf[..n]).expect("a WorkloadRequest"), fds)
    }

    fn ack(&self, error: &str) {
        let ack = WorkloadResponse {
            payload: Some(workload_response::Payload::Ack(Ack { error: error.into() })),
        };
        self.send(&ack.encode_to_vec());
    }

    /// Receives the empty snapshot's SnapshotSent and acks it.
    fn take_empty_snapshot(&self) {
        let (req, fds) = self.recv();
        assert_eq!(req, WorkloadRequest::snapshot_sent());
        assert!(fds.is_empty());
        self.ack("");
    }

    /// Whether the server closed the connection within the wait: end of file, or ECONNRESET
    /// when it closed with this side's last datagram still unread.
    fn closed(&self) -> bool {
        matches!(
            rustix::net::recv(&self.0, &mut [0u8; 64], rustix::net::RecvFlags::empty()),
            Ok((0, _)) | Err(rustix::io::Errno::CONNRESET)
        )
    }
}

/// Runs `f` on the fake ztunnel on a blocking thread, beside the server's future.
async fn with_ztunnel<R: Send + 'static>(
    zt: FakeZtunnel,
    f: impl FnOnce(&FakeZtunnel) -> R + Send + 'static,
) -> (FakeZtunnel, R) {
    tokio::task::spawn_blocking(move || {
        let r = f(&zt);
        (zt, r)
    })
    .await
    .unwrap()
}

/// A file's identity: what a received descriptor must share with the one given.
fn file_id(fd: impl AsFd) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::File::from(fd.as_fd().try_clone_to_owned().unwrap())
        .metadata()
        .unwrap();
    (m.dev(), m.ino())
}

fn netns() -> OwnedFd {
    std::fs::File::open("/proc/self/ns/net").unwrap().into()
}

fn pod(uid: &str, netns: OwnedFd) -> ZdsPod {
    ZdsPod {
        uid: uid.into(),
        name: format!("name-of-{uid}"),
        namespace: "ns".into(),
        service_account: "sa".into(),
        netns,
    }
}

fn info(uid: &str) -> WorkloadInfo {
    WorkloadInfo {
        name: format!("name-of-{uid}"),
        namespace: "ns".into(),
        service_account: "sa".into(),
        windows_namespace: None,
    }
}

async fn wait_for(what: &str, f: impl Fn() -> bool) {
    let until = Instant::now() + FAKE_WAIT;
    while !f() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[test]
fn messages_match_the_wire_format_written_by_hand() {
    // Field key = tag << 3 | wire type (0 varint, 2 length-delimited).
    assert_eq!(
        ZdsHello {
            version: Version::V1 as i32
        }
        .encode_to_vec(),
        [0x08, 0x01]
    );

    let add = WorkloadRequest::add(
        "u1",
        WorkloadInfo {
            name: "p".into(),
            namespace: "ns".into(),
            service_account: "sa".into(),
            windows_namespace: None,
        },
    );
    #[rustfmt::skip]
    let want = [
        0x0a, 17,                           // WorkloadRequest.add (1), 17 bytes
            0x0a, 2, b'u', b'1',            //   AddWorkload.uid (1)
            0x12, 11,                       //   AddWorkload.workload_info (2), 11 bytes
                0x0a, 1, b'p',              //     WorkloadInfo.name (1)
                0x12, 2, b'n', b's',        //     WorkloadInfo.namespace (2)
                0x1a, 2, b's', b'a',        //     WorkloadInfo.service_account (3)
    ];
    assert_eq!(add.encode_to_vec(), want);

    // DelWorkload's uid is field 2.
    assert_eq!(
        WorkloadRequest::del("u1").encode_to_vec(),
        [0x12, 4, 0x12, 2, b'u', b'1']
    );
    assert_eq!(WorkloadRequest::snapshot_sent().encode_to_vec(), [0x1a, 0]);
    let keep = WorkloadRequest {
        payload: Some(workload_request::Payload::Keep(super::proto::KeepWorkload {
            uid: "u1".into(),
        })),
    };
    assert_eq!(keep.encode_to_vec(), [0x2a, 4, 0x0a, 2, b'u', b'1']);

    // Tag 4 is reserved; the Windows namespace is 5.
    let windows = WorkloadInfo {
        windows_namespace: Some(WindowsNamespace {
            id: 7,
            guid: "g".into(),
        }),
        ..WorkloadInfo::default()
    };
    assert_eq!(windows.encode_to_vec(), [0x2a, 5, 0x08, 7, 0x12, 1, b'g']);
}

#[test]
fn responses_decode_from_hand_written_bytes() {
    let ack = |error: &str| WorkloadResponse {
        payload: Some(workload_response::Payload::Ack(Ack { error: error.into() })),
    };
    assert_eq!(WorkloadResponse::decode(&[0x0a, 0][..]).unwrap(), ack(""));
    assert_eq!(
        WorkloadResponse::decode(&[0x0a, 3, 0x0a, 1, b'x'][..]).unwrap(),
        ack("x")
    );
    assert_eq!(ZdsHello::decode(&[0x08, 0x01][..]).unwrap().version, Version::V1 as i32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_then_add_and_remove_reach_ztunnel_with_the_namespace() {
    let dir = TempDir::new();
    // The parent is made on bind.
    let path = dir.path().join("run/ztunnel.sock");
    let server = ZdsServer::bind(&path).await.unwrap();

    let first = netns();
    let first_id = file_id(&first);
    // Nobody connected: kept, nothing sent.
    server.add(pod("uid-1", first)).await.unwrap();
    assert_eq!(server.connections(), 0);

    let (zt, ()) = with_ztunnel(FakeZtunnel::connect(&path), move |zt| {
        zt.hello(Version::V1 as i32);
        let (req, fds) = zt.recv();
        assert_eq!(req, WorkloadRequest::add("uid-1", info("uid-1")));
        assert_eq!(fds.len(), 1, "AddWorkload carries exactly one descriptor");
        assert_eq!(file_id(&fds[0]), first_id);
        zt.ack("");
        let (req, fds) = zt.recv();
        assert_eq!(req, WorkloadRequest::snapshot_sent());
        assert!(fds.is_empty());
        zt.ack("");
    })
    .await;
    wait_for("the connection to count", || server.connections() == 1).await;

    // Added later: sent to the connection, with its descriptor (a pipe end stands in).
    let (_read, write) = rustix::pipe::pipe().unwrap();
    let second_id = file_id(&write);
    let (added, (zt, got)) = tokio::join!(
        server.add(pod("uid-2", write)),
        with_ztunnel(zt, |zt| {
            let (req, fds) = zt.recv();
            zt.ack("");
            (req, fds.iter().map(file_id).collect::<Vec<_>>())
        })
    );
    added.unwrap();
    assert_eq!(got.0, WorkloadRequest::add("uid-2", info("uid-2")));
    assert_eq!(got.1, [second_id]);

    let (removed, (_zt, got)) = tokio::join!(
        server.remove("uid-2"),
        with_ztunnel(zt, |zt| {
            let (req, fds) = zt.recv();
            zt.ack("");
            (req, fds.len())
        })
    );
    removed.unwrap();
    assert_eq!(got, (WorkloadRequest::del("uid-2"), 0));
    assert_eq!(server.connections(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_bound_with_the_server_are_in_the_first_snapshot_and_a_bad_one_binds_nothing() {
    let dir = TempDir::new();
    let path = dir.path().join("ztunnel.sock");
    let bad = ZdsServer::bind_with_pods(&path, FAKE_WAIT, vec![pod("", netns())]).await;
    assert!(matches!(bad, Err(ZdsError::InvalidPod { .. })), "{:?}", bad.err());
    assert!(!path.exists(), "nothing bound for a pod ztunnel could not take");

    let ns = netns();
    let id = file_id(&ns);
    let server = ZdsServer::bind_with_pods(&path, FAKE_WAIT, vec![pod("uid-kept", ns)])
        .await
        .unwrap();
    let (_zt, ()) = with_ztunnel(FakeZtunnel::connect(&path), move |zt| {
        zt.hello(Version::V1 as i32);
        let (req, fds) = zt.recv();
        assert_eq!(req, WorkloadRequest::add("uid-kept", info("uid-kept")));
        assert_eq!(fds.iter().map(file_id).collect::<Vec<_>>(), [id]);
        zt.ack("");
        zt.take_empty_snapshot();
    })
    .await;
    wait_for("the connection to count", || server.connections() == 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nack_is_an_error_with_ztunnels_text_and_the_connection_stays() {
    let dir = TempDir::new();
    let path = dir.path().join("ztunnel.sock");
    let server = ZdsServer::bind(&path).await.unwrap();
    let (zt, ()) = with_ztunnel(FakeZtunnel::connect(&path), |zt| {
        zt.hello(Version::V1 as i32);
        zt.take_empty_snapshot();
    })
    .await;

    let (added, (zt, ())) = tokio::join!(
        server.add(pod("uid-nack", netns())),
        with_ztunnel(zt, |zt| {
            let _ = zt.recv();
            zt.ack("failed to start the in-pod proxy: boom");
        })
    );
    let err = added.unwrap_err();
    assert!(err.is_nack(), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains("uid-nack") && text.contains("failed to start the in-pod proxy: boom"),
        "{text}"
    );

    // The same connection serves the next request.
    let (removed, _zt) = tokio::join!(
        server.remove("uid-nack"),
        with_ztunnel(zt, |zt| {
            assert_eq!(zt.recv().0, WorkloadRequest::del("uid-nack"));
            zt.ack("");
        })
    );
    removed.unwrap();
    assert_eq!(server.connections(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ztunnel_that_never_acks_times_the_add_out_and_is_closed() {
    let dir = TempDir::new();
    let path = dir.path().join("ztunnel.sock");
    let timeout = Duration::from_millis(200);
    let server = ZdsServer::bind_with_timeout(&path, timeout).await.unwrap();
    let (zt, ()) = with_ztunnel(FakeZtunnel::connect(&path), |zt| {
        zt.hello(Version::V1 as i32);
        zt.take_empty_snapshot();
    })
    .await;

    let start = Instant::now();
    let (added, (zt, ())) = tokio::join!(
        server.add(pod("uid-slow", netns())),
        with_ztunnel(zt, |zt| {
            // Received, never acked.
            let _ = zt.recv();
        })
    );
    let err = added.unwrap_err();
    assert!(matches!(err, ZdsError::Timeout { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains("uid-slow") && text.contains("200 ms"), "{text}");
    assert!(start.elapsed() < Duration::from_secs(2), "{:?}", start.elapsed());

    // A late ack would be taken for the next request's: the connection is closed instead.
    let (_, closed) = with_ztunnel(zt, FakeZtunnel::closed).await;
    assert!(closed);
    wait_for("the connection to go", || server.connections() == 0).await;
    assert_eq!(
        super::seconds(super::DEFAULT_TIMEOUT),
        "5 s",
        "the default timeout as errors name it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_hello_or_garbage_closes_only_that_connection() {
    let dir = TempDir::new();
    let path = dir.path().join("ztunnel.sock");
    let server = ZdsServer::bind(&path).await.unwrap();
    let (good, ()) = with_ztunnel(FakeZtunnel::connect(&path), |zt| {
        zt.hello(Version::V1 as i32);
        zt.take_empty_snapshot();
    })
    .await;

    let bad_hellos: [&[u8]; 3] = [
        &[0x08, 0x02],       // version 2
        &[0x08, 0x00],       // NOT_USED
        &[0xff, 0xff, 0xff], // no protobuf at all
    ];
    for bytes in bad_hellos {
        let bad = FakeZtunnel::connect(&path);
        let (_, closed) = with_ztunnel(bad, move |zt| {
            zt.send(bytes);
            zt.closed()
        })
        .await;
        assert!(closed, "hello {bytes:02x?} was taken");
    }
    // Garbage after a good hello, unasked.
    let (_, closed) = with_ztunnel(FakeZtunnel::connect(&path), |zt| {
        zt.hello(Version::V1 as i32);
        zt.take_empty_snapshot();
        zt.send(&[0xff, 0xff]);
        zt.closed()
    })
    .await;
    assert!(closed);
    // And as an answer: the request fails, and that connection goes.
    let (noisy, ()) = with_ztunnel(FakeZtunnel::connect(&path), |zt| {
        zt.hello(Version::V1 as i32);
        zt.take_empty_snapshot();
    })
    .await;
    wait_for("two connections", || server.connections() == 2).await;
    let (added, (_, closed)) = tokio::join!(
        server.add(pod("uid-g", netns())),
        with_ztunnel(noisy, |zt| {
            let _ = zt.recv();
            zt.send(&[0xff, 0xff]);
            zt.closed()
        })
    );
    let err = added.unwrap_err();
    assert!(matches!(err, ZdsError::Protocol { .. }), "{err:?}");
    assert!(err.to_string().contains("uid-g"), "{err}");
    assert!(closed);

    // The first connection is untouched.
    wait_for("one connection", || server.connections() == 1).await;
    let (removed, _zt) = tokio::join!(
        server.remove("uid-g"),
        with_ztunnel(good, |zt| {
            assert_eq!(zt.recv().0, WorkloadRequest::del("uid-g"));
            zt.ack("");
        })
    );
    removed.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removal_goes_to_every_connection_and_adds_to_the_newest() {
    let dir = TempDir::new();
    let path = dir.path().join("ztunnel.sock");
    let server = ZdsServer::bind(&path).await.unwrap();
    let mut zts = Vec::new();
    for _ in 0..2 {
        let (zt, ()) = with_ztunnel(FakeZtunnel::connect(&path), |zt| {
            zt.hello(Version::V1 as i32);
            zt.take_empty_snapshot();
        })
        .await;
        wait_for("the connection to count", || server.connections() == zts.len() + 1).await;
        zts.push(zt);
    }
    let newest = zts.pop().unwrap();
    let oldest = zts.pop().unwrap();
    let (added, (newest, ())) = tokio::join!(
        server.add(pod("uid-n", netns())),
        with_ztunnel(newest, |zt| {
            assert_eq!(zt.recv().0, WorkloadRequest::add("uid-n", info("uid-n")));
            zt.ack("");
        })
    );
    added.unwrap();
    let (removed, _oldest, _newest) = tokio::join!(
        server.remove("uid-n"),
        with_ztunnel(oldest, |zt| {
            // The add went to the newest only: the first thing the oldest sees is the removal.
            assert_eq!(zt.recv().0, WorkloadRequest::del("uid-n"));
            zt.ack("");
        }),
        with_ztunnel(newest, |zt| {
            assert_eq!(zt.recv().0, WorkloadRequest::del("uid-n"));
            zt.ack("");
        })
    );
    removed.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_server_on_a_listened_path_is_refused() {
    let dir = TempDir::new();
    let path = dir.path().join("ztunnel.sock");
    let _first = ZdsServer::bind(&path).await.unwrap();
    let err = ZdsServer::bind(&path).await.err().expect("a second server refused");
    assert!(matches!(err, ZdsError::InUse(_)), "{err:?}");
    assert!(err.to_string().contains(&path.display().to_string()), "{err}");

    // A file that is no socket is not removed either.
    let other = dir.path().join("not-a-socket");
    std::fs::write(&other, "data").unwrap();
    let err = ZdsServer::bind(&other).await.err().expect("a regular file refused");
    assert!(matches!(err, ZdsError::NotSocket(_)), "{err:?}");
    assert!(other.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_socket_is_replaced_and_a_drop_stops_everything() {
    let dir = TempDir::new();
    let path = dir.path().join("ztunnel.sock");
    // A killed agent's socket file: nothing listens on it.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let server = ZdsServer::bind(&path).await.unwrap();
    let (zt, ()) = with_ztunnel(FakeZtunnel::connect(&path), |zt| {
        zt.hello(Version::V1 as i32);
        zt.take_empty_snapshot();
    })
    .await;

    drop(server);
    assert!(!path.exists(), "the socket file is removed on drop");
    let (_, closed) = with_ztunnel(zt, FakeZtunnel::closed).await;
    assert!(closed, "connections are closed on drop");
}

#[tokio::test]
async fn a_pod_that_does_not_fit_ztunnels_buffer_is_refused() {
    let dir = TempDir::new();
    let server = ZdsServer::bind(&dir.path().join("ztunnel.sock")).await.unwrap();
    let mut big = pod("uid-big", netns());
    big.name = "n".repeat(super::MAX_MESSAGE);
    let err = server.add(big).await.unwrap_err();
    assert!(matches!(err, ZdsError::InvalidPod { .. }), "{err:?}");
    assert!(err.to_string().contains("uid-big"), "{err}");
    let err = server.add(pod("", netns())).await.unwrap_err();
    assert!(matches!(err, ZdsError::InvalidPod { .. }), "{err:?}");
}
