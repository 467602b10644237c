//! A stand-in Kubernetes API server for redirect-cni's GETs (a pod and, in ambient mode, its
//! namespace, at ADD; its DaemonSet, when install-cni stops) and its merge patch of an ambient
//! pod's status, with a bearer token: each answered from the objects the test gives it by path
//! (404 with a `Status` otherwise, 401 for another token). Plain HTTP, in a network
//! namespace of the test's; it stops on drop.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4, TcpListener},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use redirect_testkit::netns::NamedNetns;
use serde_json::{Value, json};

/// Objects by their API path (`/api/v1/namespaces/NS/pods/NAME`).
type Objects = Arc<Mutex<BTreeMap<String, Value>>>;

pub struct ApiServer {
    pub addr: SocketAddrV4,
    objects: Objects,
    /// Every request line, in order.
    requests: Arc<Mutex<Vec<String>>>,
    /// Set: every request is refused with 401 (the service account was deleted).
    revoked: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ApiServer {
    /// Listens on 127.0.0.1 (an ephemeral port) inside `netns`.
    pub fn start(netns: &NamedNetns, token: &str) -> Self {
        let listener = netns
            .open()
            .unwrap()
            .run(|| TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0)))
            .expect("the API server's listener");
        listener.set_nonblocking(true).unwrap();
        let addr = match listener.local_addr().unwrap() {
            std::net::SocketAddr::V4(a) => a,
            other => panic!("{other}"),
        };
        let objects: Objects = Arc::default();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let revoked = Arc::new(AtomicBool::new(false));
        let (objects2, requests2, stop2, revoked2) = (objects.clone(), requests.clone(), stop.clone(), revoked.clone());
        let bearer = format!("bearer {}", token.to_ascii_lowercase());
        let thread = std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let _ = stream.set_nonblocking(false);
                        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                        let bearer = if revoked2.load(Ordering::Relaxed) {
                            ""
                        } else {
                            bearer.as_str()
                        };
                        let _ = answer(stream, bearer, &objects2, &requests2);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Self {
            addr,
            objects,
            requests,
            revoked,
            stop,
            thread: Some(thread),
        }
    }

    /// Serves `pod` (its metadata's namespace and name) from now on.
    pub fn add(&self, pod: Value) {
        let ns = pod["metadata"]["namespace"].as_str().unwrap();
        let name = pod["metadata"]["name"].as_str().unwrap();
        self.put(&format!("/api/v1/namespaces/{ns}/pods/{name}"), pod.clone());
    }

    /// Serves `object` at `path` from now on.
    pub fn put(&self, path: &str, object: Value) {
        self.objects.lock().unwrap().insert(path.to_owned(), object);
    }

    /// `path` is 404 from now on.
    pub fn delete(&self, path: &str) {
        self.objects.lock().unwrap().remove(path);
    }

    /// From now on every request gets 401, as after its service account was deleted.
    pub fn revoke(&self) {
        self.revoked.store(true, Ordering::Relaxed);
    }

    /// The object at `path` as it is now (patches applied).
    pub fn get(&self, path: &str) -> Option<Value> {
        self.objects.lock().unwrap().get(path).cloned()
    }

    pub fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

/// A pod object as the API returns it: `containers` by name, the annotations given.
pub fn pod(namespace: &str, name: &str, containers: &[&str], annotations: Value) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "namespace": namespace, "name": name, "annotations": annotations },
        "spec": { "containers": containers.iter().map(|c| json!({ "name": c })).collect::<Vec<_>>() }
    })
}

fn answer(
    stream: std::net::TcpStream,
    bearer: &str,
    objects: &Objects,
    requests: &Mutex<Vec<String>>,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut authorized = false;
    let mut length = 0;
    let mut merge_patch = false;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header == "\r\n" {
            break;
        }
        let header = header.to_ascii_lowercase();
        let header = header.trim();
        authorized |= !bearer.is_empty() && header == format!("authorization: {bearer}");
        if let Some(n) = header.strip_prefix("content-length:") {
            length = n.trim().parse().unwrap_or(0);
        }
        merge_patch |= header == "content-type: application/merge-patch+json";
    }
    let mut body = vec![0; length.min(1 << 20)];
    reader.read_exact(&mut body)?;
    requests.lock().unwrap().push(line.trim().to_owned());
    let mut words = line.split_whitespace();
    let method = words.next().unwrap_or_default();
    let path = words.next().unwrap_or_default();
    let path = path.split('?').next().unwrap_or_default();
    let status = |code: u16, reason: &str| json!({ "kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "code": code });
    // A merge patch of a pod's status subresource changes the pod (its metadata, here).
    let patched = match (method, path.strip_suffix("/status")) {
        ("PATCH", Some(object)) if authorized && merge_patch => {
            let patch: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            let mut objects = objects.lock().unwrap();
            objects.get_mut(object).map(|o| {
                merge(o, &patch);
                o.clone()
            })
        }
        ("PATCH", _) => None,
        _ => objects.lock().unwrap().get(path).cloned(),
    };
    let (code, body) = match (authorized, patched) {
        (false, _) => (401, status(401, "Unauthorized")),
        (true, Some(object)) => (200, object),
        (true, None) => (404, status(404, "NotFound")),
    };
    let body = body.to_string();
    let mut stream = stream;
    write!(
        stream,
        "HTTP/1.1 {code} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    stream.flush()
}

/// RFC 7386's JSON merge patch: objects merge key by key, `null` removes, the rest replaces.
fn merge(target: &mut Value, patch: &Value) {
    let Value::Object(fields) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let object = target.as_object_mut().unwrap();
    for (key, value) in fields {
        if value.is_null() {
            object.remove(key);
        } else {
            merge(object.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
