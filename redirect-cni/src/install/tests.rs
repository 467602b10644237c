use std::{
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::atomic::{AtomicUsize, Ordering},
};

use serde_json::{Value, json};

use super::*;

/// A bin and a conf directory, removed however the test ends.
struct Node(PathBuf);

impl Node {
    fn new() -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("redirect-cni-install-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("bin")).unwrap();
        std::fs::create_dir_all(dir.join("net.d")).unwrap();
        Self(dir)
    }

    fn conf(&self, name: &str) -> PathBuf {
        self.0.join("net.d").join(name)
    }

    fn args(&self, extra: &[&str]) -> Vec<String> {
        let (bin, conf) = (self.0.join("bin"), self.0.join("net.d"));
        let dirs = [
            "--cni-bin-dir",
            bin.to_str().unwrap(),
            "--cni-conf-dir",
            conf.to_str().unwrap(),
        ];
        dirs.iter().chain(extra).map(|s| (*s).to_owned()).collect()
    }

    fn write(&self, name: &str, v: &Value) {
        std::fs::write(self.conf(name), v.to_string()).unwrap();
    }

    fn read(&self, name: &str) -> Value {
        serde_json::from_slice(&std::fs::read(self.conf(name)).unwrap()).unwrap()
    }

    fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.0.join("net.d"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn list(plugins: Value) -> Value {
    json!({ "cniVersion": "1.0.0", "name": "k8s", "plugins": plugins })
}

fn ours(extra: Value) -> Value {
    let mut e = json!({
        "type": "redirect-cni",
        "agentSocket": "/run/redirect/node.sock",
        "capabilities": { "io.kubernetes.cri.pod-annotations": true },
    });
    e.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    e
}

#[test]
fn the_first_file_in_byte_order_that_loads_is_chosen() {
    let node = Node::new();
    std::fs::write(node.conf("00-broken.conflist"), "{").unwrap();
    node.write("01-empty.conflist", &list(json!([])));
    node.write("02-list-in-a.conf", &list(json!([{ "type": "ptp" }])));
    node.write("03-untyped.conflist", &list(json!([{ "name": "x" }])));
    std::fs::create_dir(node.conf("04-dir.conflist")).unwrap();
    node.write("05.json", &list(json!([{ "type": "ptp" }])));
    // 'Z' sorts before 'a' in byte order, as in Go's sort.Strings.
    node.write("10-Zeta.conflist", &list(json!([{ "type": "cilium-cni" }])));
    node.write(
        "10-alpha.conf",
        &json!({ "cniVersion": "1.0.0", "name": "a", "type": "bridge" }),
    );
    let scan = conf::scan(&node.0.join("net.d")).unwrap();
    let skipped: Vec<_> = scan
        .skipped
        .iter()
        .map(|(p, _)| p.file_name().unwrap().to_owned())
        .collect();
    assert_eq!(
        skipped,
        [
            "00-broken.conflist",
            "01-empty.conflist",
            "02-list-in-a.conf",
            "03-untyped.conflist"
        ]
    );
    assert!(scan.skipped[2].1.contains("perhaps this is a .conflist"));

    let done = install(&node.args(&[])).unwrap();
    assert!(
        done.contains("chained redirect-cni into") && done.contains("10-Zeta.conflist"),
        "{done}"
    );
    assert_eq!(node.read("10-Zeta.conflist")["plugins"][1], ours(json!({})));
    assert_eq!(node.read("10-alpha.conf")["type"], "bridge");
    assert_eq!(node.read("05.json"), list(json!([{ "type": "ptp" }])));
    let bin = node.0.join("bin/redirect-cni");
    assert_eq!(bin.metadata().unwrap().permissions().mode() & 0o777, 0o755);
    assert!(install(&node.args(&[])).unwrap().contains("is current"));
}

#[test]
fn a_conf_becomes_a_two_plugin_conflist() {
    let node = Node::new();
    let flannel =
        json!({ "cniVersion": "1.0.0", "name": "cbr0", "type": "flannel", "delegate": { "isDefaultGateway": true } });
    node.write("10-flannel.conf", &flannel);
    let done = install(&node.args(&["--proxy", "none"])).unwrap();
    assert!(done.contains("converted from"), "{done}");
    assert_eq!(node.names(), ["10-flannel.conflist"]);
    let mut single = flannel.clone();
    single.as_object_mut().unwrap().remove("cniVersion");
    let want = json!({
        "name": "k8s-pod-network",
        "cniVersion": "0.3.1",
        "plugins": [single, ours(json!({ "proxy": "none" }))],
    });
    assert_eq!(node.read("10-flannel.conflist"), want);
    let meta = node.conf("10-flannel.conflist").metadata().unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o644);
    assert!(
        install(&node.args(&["--proxy", "none"]))
            .unwrap()
            .contains("up to date")
    );

    // The main plugin writes its .conf again: our earlier conversion is replaced.
    node.write("10-flannel.conf", &flannel);
    install(&node.args(&["--proxy", "none"])).unwrap();
    assert_eq!(node.names(), ["10-flannel.conflist"]);
    assert_eq!(node.read("10-flannel.conflist"), want);

    // A list beside the .conf that is not ours is never overwritten.
    node.write("05-other.conf", &json!({ "name": "o", "type": "bridge" }));
    node.write("05-other.conflist", &list(json!([{ "type": "ptp" }])));
    let before = std::fs::read(node.conf("05-other.conflist")).unwrap();
    let e = install(&node.args(&[])).unwrap_err();
    assert!(e.contains("05-other.conflist already exists"), "{e}");
    assert_eq!(std::fs::read(node.conf("05-other.conflist")).unwrap(), before);
    assert!(node.conf("05-other.conf").exists());
}

#[test]
fn changed_flags_update_the_entry_and_identical_ones_leave_the_file_alone() {
    let node = Node::new();
    node.write(
        "10-k8s.conflist",
        &list(json!([{ "type": "ptp" }, { "type": "portmap" }])),
    );
    assert!(install(&node.args(&["--proxy", "none"])).unwrap().contains("chained"));
    let ino = node.conf("10-k8s.conflist").metadata().unwrap().ino();
    let again = install(&node.args(&["--proxy", "none"])).unwrap();
    assert!(again.contains("already chains redirect-cni, up to date"), "{again}");
    assert_eq!(node.conf("10-k8s.conflist").metadata().unwrap().ino(), ino, "rewritten");

    let flags = [
        "--proxy",
        "embedded",
        "--selector",
        "injected",
        "--exclude-namespaces",
        "",
        "--iptables-args",
        "-d 15090,15021 -b *",
        "--agent-socket",
        "/run/x.sock",
    ];
    let done = install(&node.args(&flags)).unwrap();
    assert!(done.contains("updated redirect-cni's entry"), "{done}");
    let want = ours(json!({
        "agentSocket": "/run/x.sock",
        "proxy": "embedded",
        "selector": "injected",
        "excludeNamespaces": [],
        "args": ["-d", "15090,15021", "-b", "*"],
    }));
    assert_eq!(
        node.read("10-k8s.conflist"),
        list(json!([{ "type": "ptp" }, { "type": "portmap" }, want]))
    );

    // Two entries of ours, one of them stale: one is left, last.
    node.write(
        "10-k8s.conflist",
        &list(json!([{ "type": "ptp" }, ours(json!({})), { "type": "portmap" }, ours(json!({}))])),
    );
    install(&node.args(&["--exclude-namespaces", "kube-system, istio-system"])).unwrap();
    let want = ours(json!({ "excludeNamespaces": ["kube-system", "istio-system"] }));
    assert_eq!(
        node.read("10-k8s.conflist"),
        list(json!([{ "type": "ptp" }, { "type": "portmap" }, want]))
    );
    assert_eq!(node.names(), ["10-k8s.conflist"], "a temporary file was left");
}

#[test]
fn ambient_options_are_written_to_the_entry_and_need_the_api_server() {
    let node = Node::new();
    node.write("10-k8s.conflist", &list(json!([{ "type": "ptp" }])));
    let account = node.0.join("sa");
    std::fs::create_dir_all(&account).unwrap();
    std::fs::write(account.join("token"), "t").unwrap();
    let sa = account.to_str().unwrap();
    // Labels come from the API server: ambient mode without its account is refused, and its
    // options without ambient mode.
    let e = install(&node.args(&["--ambient"])).unwrap_err().to_string();
    assert!(e.contains("--service-account"), "{e}");
    let e = install(&node.args(&["--ambient-proxy", "embedded"]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("--ambient"), "{e}");
    let e = install(&node.args(&["--ambient", "--ambient-proxy", "ztunnel", "--service-account", "/x"]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("ztunnel"), "{e}");
    let flags = [
        "--ambient",
        "--ambient-proxy",
        "embedded",
        "--ambient-dns-capture",
        "false",
        "--service-account",
        sa,
        "--kube-server",
        "http://127.0.0.1:6443",
    ];
    install(&node.args(&flags)).unwrap();
    let entry = &node.read("10-k8s.conflist")["plugins"][1];
    assert_eq!(entry["ambientEnabled"], true, "{entry}");
    assert_eq!(entry["ambientProxy"], "embedded", "{entry}");
    assert_eq!(entry["ambientDnsCapture"], false, "{entry}");
    assert!(entry["kubeconfig"].is_string(), "{entry}");
}

#[test]
fn a_file_chaining_istio_cni_is_refused_and_left_alone() {
    let node = Node::new();
    node.write(
        "10-k8s.conflist",
        &list(json!([{ "type": "calico" }, { "type": "istio-cni" }])),
    );
    let before = std::fs::read(node.conf("10-k8s.conflist")).unwrap();
    let e = install(&node.args(&[])).unwrap_err();
    assert!(e.contains("10-k8s.conflist chains istio-cni"), "{e}");
    assert!(
        e.contains("remove istio-cni") && e.contains("do not install redirect-cni"),
        "{e}"
    );
    assert_eq!(std::fs::read(node.conf("10-k8s.conflist")).unwrap(), before);
}

#[test]
fn a_named_file_or_its_twin_is_chained() {
    let node = Node::new();
    node.write("10-a.conflist", &list(json!([{ "type": "ptp" }])));
    node.write("20-b.conflist", &list(json!([{ "type": "bridge" }])));
    node.write("30-c.conf", &json!({ "name": "c", "type": "macvlan" }));
    let done = install(&node.args(&["--cni-conf-name", "20-b.conf"])).unwrap();
    assert!(done.contains("20-b.conflist"), "{done}");
    assert_eq!(node.read("20-b.conflist")["plugins"][1]["type"], "redirect-cni");
    assert_eq!(node.read("10-a.conflist"), list(json!([{ "type": "ptp" }])));

    let done = install(&node.args(&["--cni-conf-name", "30-c.conflist"])).unwrap();
    assert!(done.contains("converted from"), "{done}");
    assert_eq!(node.read("30-c.conflist")["plugins"][1]["type"], "redirect-cni");
    // Once converted, the .conf name still finds it.
    let again = install(&node.args(&["--cni-conf-name", "30-c.conf"])).unwrap();
    assert!(again.contains("30-c.conflist already chains"), "{again}");

    let e = install(&node.args(&["--cni-conf-name", "40-d.conflist"])).unwrap_err();
    assert!(
        e.contains("--cni-conf-name 40-d.conflist: neither it nor its .conf/.conflist twin"),
        "{e}"
    );
    let e = install(&node.args(&["--cni-conf-name", "../x.conf"])).unwrap_err();
    assert!(e.contains("'../x.conf'"), "{e}");
    std::fs::write(node.conf("50-e.conflist"), "[]").unwrap();
    let e = install(&node.args(&["--cni-conf-name", "50-e.conflist"])).unwrap_err();
    assert!(e.contains("50-e.conflist: not a JSON object"), "{e}");
}

#[test]
fn uninstall_leaves_converted_and_native_lists_without_the_entry_and_is_idempotent() {
    let node = Node::new();
    node.write(
        "10-a.conf",
        &json!({ "cniVersion": "0.4.0", "name": "a", "type": "bridge" }),
    );
    node.write("20-b.conflist", &list(json!([{ "type": "ptp" }])));
    install(&node.args(&[])).unwrap();
    install(&node.args(&["--cni-conf-name", "20-b.conflist"])).unwrap();
    let done = uninstall(&node.args(&[])).unwrap();
    assert!(
        done.contains("10-a.conflist") && done.contains("20-b.conflist") && done.contains("bin/redirect-cni"),
        "{done}"
    );
    let converted = node.read("10-a.conflist");
    assert_eq!(converted["name"], "k8s-pod-network");
    assert_eq!(converted["plugins"], json!([{ "name": "a", "type": "bridge" }]));
    assert_eq!(node.read("20-b.conflist"), list(json!([{ "type": "ptp" }])));
    assert!(!node.0.join("bin/redirect-cni").exists());
    assert_eq!(node.names(), ["10-a.conflist", "20-b.conflist"]);
    let again = uninstall(&node.args(&[])).unwrap();
    assert!(again.starts_with("nothing to remove"), "{again}");

    // Only the named file (and its twin) when a name is given.
    install(&node.args(&[])).unwrap();
    install(&node.args(&["--cni-conf-name", "20-b.conflist"])).unwrap();
    uninstall(&node.args(&["--cni-conf-name", "20-b.conf"])).unwrap();
    assert_eq!(node.read("20-b.conflist"), list(json!([{ "type": "ptp" }])));
    assert_eq!(node.read("10-a.conflist")["plugins"][1]["type"], "redirect-cni");
}

#[test]
fn bad_input_is_one_line_that_names_the_value() {
    let node = Node::new();
    let err = |extra: &[&str]| {
        let e = install(&node.args(extra)).unwrap_err();
        assert!(!e.contains('\n'), "{e}");
        e
    };
    let e = err(&[]);
    assert!(e.starts_with("no CNI network configuration in ") && e.ends_with("install the main CNI plugin first"));
    node.write("10-k8s.conflist", &list(json!([{ "type": "ptp" }])));
    let e = err(&["--proxy", "sidecar"]);
    assert!(e.contains("'sidecar'") && e.contains("embedded, none"), "{e}");
    assert!(err(&["--bogus"]).contains("'--bogus'"));
    let e = err(&["--exclude-namespaces", "default,Kube_System"]);
    assert!(e.contains("'Kube_System' is not a namespace name"), "{e}");
    let e = err(&["--iptables-args", "-d 15090 -b"]);
    assert!(e.contains("-b has no value"), "{e}");
    let e = err(&["--iptables-args", "15090"]);
    assert!(e.contains("'15090' is not an istio-iptables flag"), "{e}");
    assert!(err(&["--agent-socket", "node.sock"]).contains("--agent-socket node.sock: expected an absolute path"));
    assert!(err(&["--uninstall-on-exit"]).contains("add --watch"));
    assert!(err(&["--cni-conf-name", "10-k8s.json"]).contains("'10-k8s.json'"));
    let dirs = |conf: &Path| {
        let bin = node.0.join("bin");
        [
            "--cni-bin-dir",
            bin.to_str().unwrap(),
            "--cni-conf-dir",
            conf.to_str().unwrap(),
        ]
        .map(String::from)
    };
    let e = install(&dirs(Path::new("/nonexistent/net.d"))).unwrap_err();
    assert!(e.starts_with("--cni-conf-dir /nonexistent/net.d: No such file"), "{e}");
    let e = install(&dirs(&node.conf("10-k8s.conflist"))).unwrap_err();
    assert!(e.contains("10-k8s.conflist: not a directory"), "{e}");
    assert!(uninstall(&["--watch".into()]).unwrap_err().contains("'--watch'"));
    assert!(install(&["--help".into()]).unwrap().contains("--iptables-args <FLAGS>"));
}

#[test]
fn a_file_rewritten_since_it_was_read_is_not_overwritten() {
    let node = Node::new();
    node.write("10-k8s.conflist", &list(json!([{ "type": "ptp" }])));
    let path = node.conf("10-k8s.conflist");
    let stale: &[u8] = br#"{"name":"k8s","plugins":[]}"#;
    assert!(!conf::write_atomic(&path, &json!({}), (&path, stale)).unwrap());
    assert_eq!(node.read("10-k8s.conflist"), list(json!([{ "type": "ptp" }])));
    assert_eq!(node.names(), ["10-k8s.conflist"], "a temporary file was left");
}

#[test]
fn a_service_account_becomes_the_plugins_kubeconfig_rewritten_as_the_token_rotates() {
    let node = Node::new();
    node.write("10-k8s.conflist", &list(json!([{ "type": "ptp" }])));
    let account = node.0.join("serviceaccount");
    std::fs::create_dir_all(&account).unwrap();
    let account_arg = account.to_str().unwrap();
    let flags = [
        "--service-account",
        account_arg,
        "--kube-server",
        "https://10.96.0.1:443",
        "--host-cni-conf-dir",
        "/etc/cni/net.d",
    ];

    // No token: install fails, naming it, and writes nothing.
    let e = install(&node.args(&flags)).unwrap_err();
    assert!(e.contains(account_arg) && e.contains("token"), "{e}");
    assert_eq!(node.names(), ["10-k8s.conflist"]);
    assert!(!node.0.join("bin/redirect-cni").exists());

    std::fs::write(account.join("token"), "first-token\n").unwrap();
    std::fs::write(account.join("ca.crt"), "-----BEGIN CERTIFICATE-----\n").unwrap();
    install(&node.args(&flags)).unwrap();
    assert_eq!(
        node.read("10-k8s.conflist")["plugins"][1]["kubeconfig"],
        "/etc/cni/net.d/ZZZ-redirect-cni-kubeconfig"
    );
    let path = node.conf(kubeconfig::FILE);
    assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
    // What the plugin's client reads.
    let config = ::kube::config::Kubeconfig::read_from(&path).unwrap();
    let cluster = config.clusters[0].cluster.as_ref().unwrap();
    assert_eq!(cluster.server.as_deref(), Some("https://10.96.0.1:443"));
    use base64::Engine as _;
    let ca = base64::engine::general_purpose::STANDARD
        .decode(cluster.certificate_authority_data.as_ref().unwrap())
        .unwrap();
    assert_eq!(ca, b"-----BEGIN CERTIFICATE-----\n");
    assert!(config.auth_infos[0].auth_info.as_ref().unwrap().token.is_some());
    // The client keeps its token secret (no Debug of it): read it as the JSON it is.
    let token = |path: &Path| {
        let v: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
        v["users"][0]["user"]["token"].as_str().unwrap().to_owned()
    };
    assert_eq!(token(&path), "first-token");

    std::fs::write(account.join("token"), "second-token").unwrap();
    let done = install(&node.args(&flags)).unwrap();
    assert!(done.contains(kubeconfig::FILE), "{done}");
    assert_eq!(token(&path), "second-token");

    // Bad input names the value; --kube-server needs --service-account.
    let mut bad = flags;
    bad[3] = "10.96.0.1";
    assert!(
        install(&node.args(&bad))
            .unwrap_err()
            .contains("--kube-server '10.96.0.1'")
    );
    let e = install(&node.args(&["--kube-server", "https://10.96.0.1"])).unwrap_err();
    assert!(e.contains("--service-account"), "{e}");

    uninstall(&node.args(&[])).unwrap();
    assert!(!path.exists());
}

#[test]
fn uninstall_if_removed_names_one_daemonset_and_needs_watch_and_an_account() {
    assert_eq!(
        daemonset("kube-system/redirect-agent").unwrap(),
        ("kube-system".to_owned(), "redirect-agent".to_owned())
    );
    for bad in [
        "redirect-agent",
        "kube-system/",
        "/redirect-agent",
        "Kube/x",
        "a/b/c",
        "ns/-x",
    ] {
        let e = daemonset(bad).unwrap_err();
        assert!(
            e.contains(&format!("'{bad}'")) || e.contains("not a namespace name"),
            "{bad}: {e}"
        );
    }
    let node = Node::new();
    node.write("10-k8s.conflist", &list(json!([{ "type": "ptp" }])));
    let account = node.0.join("serviceaccount");
    std::fs::create_dir_all(&account).unwrap();
    std::fs::write(account.join("token"), "t").unwrap();
    let e = install(&node.args(&["--uninstall-if-removed", "kube-system/redirect-agent"])).unwrap_err();
    assert!(e.contains("--service-account"), "{e}");
    let e = install(&node.args(&[
        "--uninstall-if-removed",
        "kube-system/redirect-agent",
        "--service-account",
        account.to_str().unwrap(),
        "--kube-server",
        "http://127.0.0.1:1",
    ]))
    .unwrap_err();
    assert!(e.contains("add --watch"), "{e}");
    let e = install(&node.args(&[
        "--watch",
        "--uninstall-on-exit",
        "--uninstall-if-removed",
        "kube-system/x",
    ]))
    .unwrap_err();
    assert!(e.contains("--uninstall-if-removed") && !e.contains('\n'), "{e}");
    assert_eq!(node.names(), ["10-k8s.conflist"], "nothing written");
}

#[test]
fn the_newer_install_owns_the_kubeconfig_and_the_older_leaves_it() {
    let node = Node::new();
    let dir = node.0.join("net.d");
    let read = || std::fs::read_to_string(dir.join(kubeconfig::FILE)).unwrap();
    let mut old = kubeconfig::Writer::new();
    assert!(old.write(&dir, "old token").unwrap());
    assert!(!old.write(&dir, "old token").unwrap(), "unchanged: not written again");
    // A rolling update: the successor starts later and writes its own token...
    std::thread::sleep(std::time::Duration::from_millis(20));
    let mut new = kubeconfig::Writer::new();
    assert!(new.write(&dir, "new token").unwrap());
    // ...which the predecessor, seeing the file change, leaves alone.
    assert!(!old.write(&dir, "old token").unwrap());
    assert_eq!(read(), "new token");
    // The owner follows its token's rotation; a missing file is written by anyone.
    assert!(new.write(&dir, "new token, rotated").unwrap());
    std::fs::remove_file(dir.join(kubeconfig::FILE)).unwrap();
    assert!(old.write(&dir, "old token").unwrap());
    assert_eq!(node.names(), [kubeconfig::FILE], "no temporary file left");
}
