//! The decision and the flags, against istio-cni's own test vectors: the cases of
//! `TestIPTablesRuleGeneration` (`cni/pkg/plugin/plugin_dryrun_test.go`, whose golden rule sets
//! are in `cni/pkg/plugin/testdata/`) and `plugin_test.go`'s expectations, as effective flags.

use super::*;

fn sel() -> Selection {
    Selection {
        selector: Selector::Injected,
        exclude_namespaces: vec!["kube-system".into()],
        proxy: "embedded".into(),
        args: Vec::new(),
        ambient: None,
    }
}

const STATUS: &str = r#"{"initContainers":["istio-validation"],"containers":["istio-proxy"],"volumes":["istio-envoy"],"imagePullSecrets":null,"revision":"default"}"#;

/// A pod as the injector leaves it in CNI mode, with `extra` annotations.
fn sidecar_pod(extra: &[(&str, &str)]) -> Pod {
    let mut a = BTreeMap::from([("sidecar.istio.io/status".to_owned(), STATUS.to_owned())]);
    a.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
    Pod::from_annotations(Some("default".into()), a)
}

fn enrolled(d: Result<Decision, String>) -> (String, Vec<String>) {
    match d {
        Ok(Decision::Enroll { proxy, flags, .. }) => (proxy, flags),
        other => panic!("expected an enrollment, got {other:?}"),
    }
}

fn skipped(d: Result<Decision, String>) -> String {
    match d {
        Ok(Decision::Skip(why)) => why,
        other => panic!("expected a skip, got {other:?}"),
    }
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| (*x).to_owned()).collect()
}

#[test]
fn istio_cnis_golden_cases_give_istio_cnis_flags_and_the_sidecar_keeps_its_ports() {
    let base = s(&["-i", "*", "-b", "*", "-o", "15020", "-d", "15020,15021,15090"]);
    // basic: no annotation. istio-cni always adds `-o 15020`, istio-init does not.
    assert_eq!(
        enrolled(decide(&sel(), &sidecar_pod(&[]))),
        ("none".into(), base.clone())
    );
    // include-exclude-ip
    let (_, f) = enrolled(decide(
        &sel(),
        &sidecar_pod(&[
            ("traffic.sidecar.istio.io/includeOutboundIPRanges", "127.0.0.0/8"),
            ("traffic.sidecar.istio.io/excludeOutboundIPRanges", "10.0.0.0/8"),
        ]),
    ));
    assert_eq!(
        f,
        s(&[
            "-b",
            "*",
            "-o",
            "15020",
            "-i",
            "127.0.0.0/8",
            "-x",
            "10.0.0.0/8",
            "-d",
            "15020,15021,15090"
        ])
    );
    // include-exclude-ports
    let (_, f) = enrolled(decide(
        &sel(),
        &sidecar_pod(&[
            ("traffic.sidecar.istio.io/includeInboundPorts", "1111,2222"),
            ("traffic.sidecar.istio.io/excludeInboundPorts", "3333,4444"),
            ("traffic.sidecar.istio.io/excludeOutboundPorts", "5555,6666"),
        ]),
    ));
    assert_eq!(
        f,
        s(&[
            "-i",
            "*",
            "-b",
            "1111,2222",
            "-o",
            "5555,6666",
            "-d",
            "3333,4444,15020,15021,15090"
        ])
    );
    // tproxy
    let (_, f) = enrolled(decide(
        &sel(),
        &sidecar_pod(&[("sidecar.istio.io/interceptionMode", "TPROXY")]),
    ));
    assert_eq!(f[f.len() - 4..], s(&["-m", "TPROXY", "-d", "15020,15021,15090"]));
    // dns, invalid-drop: the proxy's environment.
    let mut pod = sidecar_pod(&[]);
    let proxy = pod.proxy.as_mut().unwrap();
    proxy.env.insert("ISTIO_META_DNS_CAPTURE".into(), "true".into());
    proxy.env.insert("INVALID_DROP".into(), "true".into());
    let (_, f) = enrolled(decide(&sel(), &pod));
    assert_eq!(
        f[base.len()..],
        s(&["--redirect-dns", "--capture-all-dns", "--drop-invalid"])
    );
    // custom-uid, custom-uid-zero (root is 1337's, as a TPROXY sidecar runs as root).
    let mut pod = sidecar_pod(&[]);
    let proxy = pod.proxy.as_mut().unwrap();
    (proxy.run_as_user, proxy.run_as_group) = (Some(1_000_670_000), Some(1_000_670_001));
    let (_, f) = enrolled(decide(&sel(), &pod));
    assert_eq!(f[6..10], s(&["-u", "1000670000", "-g", "1000670001"]));
    let proxy = pod.proxy.as_mut().unwrap();
    (proxy.run_as_user, proxy.run_as_group) = (Some(0), None);
    let (_, f) = enrolled(decide(&sel(), &pod));
    assert_eq!(f[6..10], s(&["-u", "1337", "-g", "1337"]));
}

#[test]
fn inbound_port_annotations_as_plugin_test_expects_them() {
    let flag = |annotation: &str, value: &str, flag: &str| {
        let (_, f) = enrolled(decide(&sel(), &sidecar_pod(&[(annotation, value)])));
        let i = f.iter().position(|x| x == flag).unwrap();
        f[i + 1].clone()
    };
    let include = "traffic.sidecar.istio.io/includeInboundPorts";
    let exclude = "traffic.sidecar.istio.io/excludeInboundPorts";
    // An explicit empty include stays empty: nothing captured inbound.
    assert_eq!(flag(include, "", "-b"), "");
    assert_eq!(flag(exclude, "", "-d"), "15020,15021,15090");
    assert_eq!(flag(exclude, "3306", "-d"), "3306,15020,15021,15090");
    assert_eq!(flag(exclude, " 15021,3306 ", "-d"), "15021,3306,15020,15090");
}

#[test]
fn istio_cnis_skips_in_its_order() {
    let mut pod = sidecar_pod(&[]);
    pod.namespace = Some("kube-system".into());
    assert!(skipped(decide(&sel(), &pod)).contains("kube-system"));
    // istio-init installs its own rules: capturing too would be twice.
    let init = r#"{"initContainers":["istio-init"],"containers":["istio-proxy"]}"#;
    let pod = sidecar_pod(&[("sidecar.istio.io/status", init)]);
    assert!(skipped(decide(&sel(), &pod)).contains("istio-init"));
    let mut pod = sidecar_pod(&[]);
    pod.proxy
        .as_mut()
        .unwrap()
        .env
        .insert("DISABLE_ENVOY".into(), "True".into());
    assert!(skipped(decide(&sel(), &pod)).contains("DISABLE_ENVOY"));
    // A gateway: `proxy router`.
    let mut pod = sidecar_pod(&[]);
    pod.proxy.as_mut().unwrap().proxy_type = Some("router".into());
    assert!(skipped(decide(&sel(), &pod)).contains("router"));
    // The label decides over the annotation; values Go's ParseBool does not know are ignored.
    let mut pod = sidecar_pod(&[("sidecar.istio.io/inject", "true")]);
    pod.labels.insert("sidecar.istio.io/inject".into(), "false".into());
    assert!(skipped(decide(&sel(), &pod)).contains("inject"));
    enrolled(decide(&sel(), &sidecar_pod(&[("sidecar.istio.io/inject", "no")])));
    // istio-proxy without the injector's status: not injected.
    let mut pod = sidecar_pod(&[]);
    pod.annotations.remove("sidecar.istio.io/status");
    pod.proxy = Some(ProxyContainer::default());
    assert!(skipped(decide(&sel(), &pod)).contains("status"));
    // NONE: no capture (istio-cni would fail the sandbox on it).
    let pod = sidecar_pod(&[("sidecar.istio.io/interceptionMode", "NONE")]);
    assert!(skipped(decide(&sel(), &pod)).contains("NONE"));
}

#[test]
fn pods_without_a_sidecar_are_captured_only_when_they_or_the_configuration_ask() {
    let plain = Pod::from_annotations(Some("default".into()), BTreeMap::new());
    assert!(skipped(decide(&sel(), &plain)).contains("istio-proxy"));
    let asks = Pod::from_annotations(
        Some("default".into()),
        BTreeMap::from([("redirect.dev/proxy".to_owned(), "embedded".to_owned())]),
    );
    assert_eq!(enrolled(decide(&sel(), &asks)).0, "embedded");
    let all = Selection {
        selector: Selector::All,
        ..sel()
    };
    assert_eq!(enrolled(decide(&all, &plain)).0, "embedded");
    // A sidecar owns the capture ports: the embedded proxy may not take them.
    let e = decide(&sel(), &sidecar_pod(&[("redirect.dev/proxy", "embedded")])).unwrap_err();
    assert!(e.contains("redirect.dev/proxy 'embedded'"), "{e}");
    assert_eq!(
        enrolled(decide(&all, &sidecar_pod(&[("redirect.dev/proxy", "none")]))).0,
        "none"
    );
}

#[test]
fn configured_args_replace_istios_defaults_and_annotations_replace_them() {
    let conf = Selection {
        args: s(&["-b", "9080", "-i", "10.0.0.0/8"]),
        ..sel()
    };
    let (_, f) = enrolled(decide(
        &conf,
        &sidecar_pod(&[("traffic.sidecar.istio.io/includeOutboundIPRanges", "10.96.0.0/12")]),
    ));
    assert_eq!(
        f,
        s(&[
            "-o",
            "15020",
            "-b",
            "9080",
            "-i",
            "10.96.0.0/12",
            "-d",
            "15020,15021,15090"
        ])
    );
    let odd = Selection {
        args: s(&["-b"]),
        ..sel()
    };
    assert!(decide(&odd, &sidecar_pod(&[])).unwrap_err().contains("pairs"));
}

#[test]
fn a_bad_annotation_fails_naming_it_and_what_is_accepted() {
    for (annotation, value, says) in [
        ("traffic.sidecar.istio.io/includeOutboundIPRanges", "10.0.0.1", "CIDR"),
        ("traffic.sidecar.istio.io/excludeOutboundIPRanges", "*", "CIDR"),
        (
            "traffic.sidecar.istio.io/includeOutboundIPRanges",
            "10.0.0.0/33",
            "CIDR",
        ),
        ("traffic.sidecar.istio.io/includeInboundPorts", "http", "port"),
        ("traffic.sidecar.istio.io/excludeOutboundPorts", "+80", "port"),
        ("traffic.sidecar.istio.io/excludeInboundPorts", "65536", "port"),
        ("sidecar.istio.io/interceptionMode", "redirect", "REDIRECT or TPROXY"),
        ("traffic.sidecar.istio.io/excludeInterfaces", "-eth0", "interface"),
        (
            "traffic.sidecar.istio.io/excludeInterfaces",
            "a-very-long-name0",
            "interface",
        ),
    ] {
        let e = decide(&sel(), &sidecar_pod(&[(annotation, value)])).unwrap_err();
        assert!(e.contains(annotation) && e.contains(value) && e.contains(says), "{e}");
    }
    // Accepted as Istio accepts them.
    for (annotation, value) in [
        (
            "traffic.sidecar.istio.io/includeOutboundIPRanges",
            "10.0.0.1/8,fd00::/8",
        ),
        ("traffic.sidecar.istio.io/includeOutboundIPRanges", ""),
        ("traffic.sidecar.istio.io/excludeInterfaces", "eth1, net1"),
        ("traffic.sidecar.istio.io/excludeOutboundPorts", " 80 ,443"),
    ] {
        enrolled(decide(&sel(), &sidecar_pod(&[(annotation, value)])));
    }
}

#[test]
fn virtual_interfaces_take_the_newer_annotation_first() {
    let (_, f) = enrolled(decide(
        &sel(),
        &sidecar_pod(&[
            ("traffic.sidecar.istio.io/kubevirtInterfaces", "old0"),
            ("istio.io/reroute-virtual-interfaces", "new0"),
        ]),
    ));
    assert_eq!(f[f.len() - 4..f.len() - 2], s(&["-k", "new0"]));
    let (_, f) = enrolled(decide(
        &sel(),
        &sidecar_pod(&[("traffic.sidecar.istio.io/kubevirtInterfaces", "old0")]),
    ));
    assert_eq!(f[f.len() - 4..f.len() - 2], s(&["-k", "old0"]));
}

#[test]
fn the_injection_status_names_native_sidecars_and_tolerates_nulls() {
    let native = r#"{"initContainers":["istio-validation","istio-proxy"],"containers":null}"#;
    let pod = Pod::from_annotations(
        None,
        BTreeMap::from([("sidecar.istio.io/status".to_owned(), native.to_owned())]),
    );
    assert!(pod.proxy.is_some());
    assert_eq!(enrolled(decide(&sel(), &pod)).0, "none");
    let junk = Pod::from_annotations(
        None,
        BTreeMap::from([("sidecar.istio.io/status".to_owned(), "{".to_owned())]),
    );
    assert!(junk.proxy.is_none() && junk.containers.is_empty());
}

/// Ambient mode on, with istio-cni's defaults (DNS capture on, ztunnel serving).
fn ambient_sel() -> Selection {
    Selection {
        ambient: Some(AmbientSelection {
            proxy: "none".into(),
            dns_capture: true,
        }),
        ..sel()
    }
}

/// A pod as the API server returns it, with `labels`, in a namespace with `ns_labels`.
fn labelled(labels: &[(&str, &str)], ns_labels: &[(&str, &str)], annotations: &[(&str, &str)]) -> Pod {
    let map = |v: &[(&str, &str)]| v.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
    Pod {
        namespace: Some("default".into()),
        labels: map(labels),
        namespace_labels: map(ns_labels),
        annotations: map(annotations),
        containers: ["app".to_owned()].into(),
        ..Pod::default()
    }
}

const AMBIENT: (&str, &str) = ("istio.io/dataplane-mode", "ambient");

#[test]
fn ambient_pods_are_chosen_as_istio_cni_chooses_them() {
    let want = (s(&["none"])[0].clone(), s(&["--mode", "ambient", "--redirect-dns"]));
    // The label on the pod, or on its namespace.
    assert_eq!(enrolled(decide(&ambient_sel(), &labelled(&[AMBIENT], &[], &[]))), want);
    assert_eq!(enrolled(decide(&ambient_sel(), &labelled(&[], &[AMBIENT], &[]))), want);
    // `none` on the pod opts it out of its namespace's; other values are neither.
    let none = ("istio.io/dataplane-mode", "none");
    assert!(skipped(decide(&ambient_sel(), &labelled(&[none], &[AMBIENT], &[]))).contains("no istio-proxy"));
    let other = ("istio.io/dataplane-mode", "Ambient");
    assert!(matches!(
        decide(&ambient_sel(), &labelled(&[other], &[], &[])),
        Ok(Decision::Skip(_))
    ));
    // Host network: never (its rules would be the node's).
    let mut host = labelled(&[AMBIENT], &[], &[]);
    host.host_network = true;
    assert!(matches!(decide(&ambient_sel(), &host), Ok(Decision::Skip(_))));
    // A sidecar pod in an ambient namespace stays its sidecar's, with istio-iptables' flags.
    let mut sidecar = sidecar_pod(&[]);
    sidecar.namespace_labels = [("istio.io/dataplane-mode".to_owned(), "ambient".to_owned())].into();
    let (proxy, flags) = enrolled(decide(&ambient_sel(), &sidecar));
    assert_eq!(proxy, "none");
    assert!(!flags.contains(&"--mode".to_owned()), "{flags:?}");
    // Excluded namespaces come first, as in istio-cni.
    let mut system = labelled(&[AMBIENT], &[], &[]);
    system.namespace = Some("kube-system".into());
    assert!(skipped(decide(&ambient_sel(), &system)).contains("excluded"));
    // Ambient mode off: the label means nothing.
    assert!(matches!(
        decide(&sel(), &labelled(&[AMBIENT], &[], &[])),
        Ok(Decision::Skip(_))
    ));
}

#[test]
fn an_ambient_pods_annotations_adjust_its_capture_and_bad_values_fail_add() {
    let flags = |annotations: &[(&str, &str)]| decide(&ambient_sel(), &labelled(&[AMBIENT], &[], annotations));
    let (_, f) = enrolled(flags(&[
        ("ambient.istio.io/bypass-inbound-capture", "true"),
        ("ambient.istio.io/dns-capture", "false"),
        ("istio.io/reroute-virtual-interfaces", " eth1, ,eth2 "),
    ]));
    assert_eq!(
        f,
        s(&["--mode", "ambient", "--bypass-inbound-capture", "-k", "eth1,eth2"])
    );
    // The node's default, turned off, and a pod turning it back on.
    let quiet = Selection {
        ambient: Some(AmbientSelection {
            proxy: "embedded".into(),
            dns_capture: false,
        }),
        ..sel()
    };
    let (proxy, f) = enrolled(decide(&quiet, &labelled(&[AMBIENT], &[], &[])));
    assert_eq!((proxy.as_str(), f), ("embedded", s(&["--mode", "ambient"])));
    let (_, f) = enrolled(decide(
        &quiet,
        &labelled(&[AMBIENT], &[], &[("ambient.istio.io/dns-capture", "1")]),
    ));
    assert_eq!(f, s(&["--mode", "ambient", "--redirect-dns"]));
    // redirect's own annotation picks the proxy.
    let (proxy, _) = enrolled(flags(&[("redirect.dev/proxy", "embedded")]));
    assert_eq!(proxy, "embedded");
    let e = flags(&[("ambient.istio.io/bypass-inbound-capture", "yes")]).unwrap_err();
    assert!(
        e.starts_with("annotation ambient.istio.io/bypass-inbound-capture: 'yes': expected a boolean"),
        "{e}"
    );
    let e = flags(&[("istio.io/reroute-virtual-interfaces", "eth0,-bad")]).unwrap_err();
    assert!(e.contains("'-bad' is not an interface name"), "{e}");
}
