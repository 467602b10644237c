//! `redirect-agent explain` against Istio's own golden files: for each of the 27 sidecar cases
//! of istio-iptables' `TestIptables` (tools/istio-iptables/pkg/capture/run_test.go), the rules
//! explain prints for the same configuration must be the rules Istio's golden file restores,
//! chain by chain and in order, up to spelling (iptables-save's canonical form against the
//! builder's hand-written one).
//!
//! The golden files are not in this repository: they are read from `$REDIRECT_ISTIO_GOLDEN`
//! (empty: none), else `../shared/reference/istio-golden` beside the workspace (cases.md there
//! says how they are made). So that the test still means something without them,
//! `tests/golden/<case>.<family>.rules` keeps explain's normalised rules as they were when they
//! last matched Istio's; with the golden folder present, `REDIRECT_BLESS=1` rewrites those
//! snapshots (only for cases that match Istio).
//!
//! No root needed: explain only prints rules. `cargo test -p redirect-tests --test golden` (with
//! the agent built at target/debug/redirect-agent, or REDIRECT_AGENT_BIN).

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use redirect_tests::{
    agent_bin,
    rules_text::{Rules, compare, normalise, parse_restores, parse_snapshot},
};

/// One case of Istio's table, as cases.md lists it: the flags on top of the base config, the
/// environment, the DNS servers (Istio's test sets them directly; we give them through a
/// resolv.conf) and whether IPv6 is on (then the golden file holds an ip6tables restore too).
struct Case {
    name: &'static str,
    flags: &'static [&'static str],
    env: &'static [(&'static str, &'static str)],
    dns4: &'static [&'static str],
    dns6: &'static [&'static str],
    v6: bool,
    /// One of the ambient in-pod cases (`cni/pkg/iptables/common_test.go`), explained with
    /// `--mode ambient`, its golden file in `ambient/`.
    ambient: bool,
}

#[rustfmt::skip]
const NONE: Case = Case { name: "", flags: &[], env: &[], dns4: &[], dns6: &[], v6: false, ambient: false };
const DNS: &str = "--redirect-dns";
const GROUPS: (&str, &str) = ("ISTIO_OUTBOUND_OWNER_GROUPS", "java,202");
const GROUPS_EXCLUDE: (&str, &str) = ("ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE", "888,ftp");

#[rustfmt::skip]
const CASES: [Case; 27] = [
    Case { name: "ipv6-empty-inbound-ports", flags: &["-b", ""], v6: true, ..NONE },
    Case { name: "ip-range", flags: &["-x", "1.1.0.0/16", "-i", "9.9.0.0/16", DNS, "-g", "1,2", "-u", "3,4"],
        dns4: &["127.0.0.53"], ..NONE },
    Case { name: "tproxy", flags: &["-m", "TPROXY", "-b", "*", "-x", "1.1.0.0/16", "-i", "9.9.0.0/16", DNS,
        "-g", "1337", "-u", "1337", "-c", "not-istio-nic"], dns4: &["127.0.0.53"], v6: true, ..NONE },
    Case { name: "ipv6-inbound-ports", flags: &["-b", "4000,5000"], v6: true, ..NONE },
    Case { name: "ipv6-virt-interfaces", flags: &["-b", "4000,5000", "-k", "eth0,eth1"], v6: true, ..NONE },
    Case { name: "ipv6-ipnets", flags: &["-b", "4000,5000", "-d", "6000,7000,", "-k", "eth0,eth1",
        "-x", "2001:db8::/32", "-i", "2001:db8::/32"], v6: true, ..NONE },
    Case { name: "ipv6-uid-gid", flags: &["-b", "4000,5000", "-d", "6000,7000", "-k", "eth0,eth1", "-g", "1,2",
        "-u", "3,4", "-x", "2001:db8::/32", "-i", "2001:db8::/32"], v6: true, ..NONE },
    Case { name: "ipv6-outbound-ports", flags: &["-b", "", "-q", "32000,31000"], v6: true, ..NONE },
    Case { name: "empty", ..NONE },
    Case { name: "kube-virt-interfaces", flags: &["-k", "eth1,eth2", "-i", "*"], ..NONE },
    Case { name: "ipnets", flags: &["-i", "10.0.0.0/8"], ..NONE },
    Case { name: "ipnets-with-kube-virt-interfaces", flags: &["-k", "eth1,eth2", "-i", "10.0.0.0/8"], ..NONE },
    Case { name: "inbound-ports-include", flags: &["-b", "32000,31000"], ..NONE },
    Case { name: "inbound-ports-wildcard", flags: &["-b", "*"], ..NONE },
    Case { name: "inbound-ports-tproxy", flags: &["-b", "32000,31000", "-m", "TPROXY"], ..NONE },
    Case { name: "inbound-ports-wildcard-tproxy", flags: &["-b", "*", "-m", "TPROXY"], ..NONE },
    Case { name: "dns-uid-gid", flags: &[DNS, "-g", "1,2", "-u", "3,4"], dns4: &["127.0.0.53"],
        dns6: &["::127.0.0.53"], v6: true, ..NONE },
    // --redirect-dns with no servers: Istio turns DNS capture off (an empty resolv.conf here).
    Case { name: "ipv6-dns-uid-gid", flags: &[DNS, "-g", "1,2", "-u", "3,4"], v6: true, ..NONE },
    Case { name: "outbound-owner-groups", env: &[GROUPS], ..NONE },
    Case { name: "outbound-owner-groups-exclude", env: &[GROUPS_EXCLUDE], ..NONE },
    Case { name: "ipv6-dns-outbound-owner-groups", flags: &[DNS], env: &[GROUPS], v6: true, ..NONE },
    Case { name: "ipv6-dns-outbound-owner-groups-exclude", flags: &[DNS], env: &[GROUPS_EXCLUDE], v6: true, ..NONE },
    Case { name: "outbound-ports-include", flags: &["-q", "32000,31000"], ..NONE },
    Case { name: "loopback-outbound-iprange", flags: &["-i", "127.1.2.3/32", DNS, "-g", "1,2", "-u", "3,4"],
        dns4: &["127.0.0.53"], ..NONE },
    Case { name: "basic-exclude-nic", flags: &["-c", "not-istio-nic"], ..NONE },
    Case { name: "drop-invalid", flags: &["--drop-invalid"], ..NONE },
    Case { name: "host-ipv4-loopback-cidr", env: &[("ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR", "127.0.0.1/8")], ..NONE },
];

/// The ambient cases whose golden files cases.md keeps, over the test's base config (its probe
/// SNAT addresses; the IPv6 one is the test's own, not istio-cni's default). `default` has
/// `RedirectDNS`; each `_ipv6` file holds an ip6tables restore after the iptables one.
#[rustfmt::skip]
const AMBIENT_DNS: [&str; 7] = [
    "--mode", "ambient",
    "--host-probe-snat", "169.254.7.127",
    "--host-probe-v6-snat", "e9ac:1e77:90ca:399f:4d6d:ece2:2f9b:3164",
    DNS,
];
#[rustfmt::skip]
const AMBIENT_INGRESS: [&str; 7] = [
    "--mode", "ambient",
    "--host-probe-snat", "169.254.7.127",
    "--host-probe-v6-snat", "e9ac:1e77:90ca:399f:4d6d:ece2:2f9b:3164",
    "--bypass-inbound-capture",
];
#[rustfmt::skip]
const AMBIENT_VIRT: [&str; 8] = [
    "--mode", "ambient",
    "--host-probe-snat", "169.254.7.127",
    "--host-probe-v6-snat", "e9ac:1e77:90ca:399f:4d6d:ece2:2f9b:3164",
    "--reroute-virtual-interfaces", "fake1s0f0,fake1s0f1",
];

#[rustfmt::skip]
const AMBIENT_CASES: [Case; 4] = [
    Case { name: "default", flags: &AMBIENT_DNS, ambient: true, ..NONE },
    Case { name: "default_ipv6", flags: &AMBIENT_DNS, v6: true, ambient: true, ..NONE },
    Case { name: "ingress", flags: &AMBIENT_INGRESS, ambient: true, ..NONE },
    Case { name: "virtual_interfaces", flags: &AMBIENT_VIRT, ambient: true, ..NONE },
];

/// Istio's `constructTestConfig`, which every case starts from. explain defaults to the
/// injection's values instead (-i '*' -b '*' -d 15090,15021,15020), so each is given.
#[rustfmt::skip]
const BASE: [(&str, &str); 10] = [
    ("-p", "15001"), ("-z", "15006"), ("-e", "15008"), ("-u", "1337"), ("-g", "1337"),
    ("-b", ""), ("-i", ""), ("-d", ""), ("-t", "1337"), ("-r", "133"),
];

/// A snapshot file: explain's normalised rules, one `table chain: rule` line each in order.
fn render_snapshot(case: &Case, family: &str, rules: &Rules) -> String {
    let mut s = format!(
        "# `redirect-agent explain --family {family}` for Istio's {} golden case `{}`, normalised\n\
         # by tests/tests/golden.rs; rewritten (only while it matches Istio's golden file) with\n\
         # REDIRECT_BLESS=1 cargo test -p redirect-tests --test golden\n",
        kind(case),
        case.name
    );
    for ((table, chain), list) in rules {
        for rule in list {
            s += &format!("{table} {chain}: {rule}\n");
        }
    }
    s
}

/// explain's arguments for a case: the base config with the case's own flags replacing the
/// base ones they name, and the resolv.conf only where the case captures DNS (its servers
/// are read from it).
fn explain_args(case: &Case, family: &str, resolv_conf: Option<&Path>) -> Vec<String> {
    let mut args: Vec<String> = ["explain", "--family", family, "--json"].map(String::from).to_vec();
    let base = if case.ambient { &[][..] } else { &BASE[..] };
    for (flag, value) in base.iter().filter(|(f, _)| !case.flags.contains(f)) {
        args.extend([flag.to_string(), value.to_string()]);
    }
    args.extend(case.flags.iter().map(|f| f.to_string()));
    if let Some(path) = resolv_conf.filter(|_| case.flags.contains(&DNS)) {
        args.extend(["--resolv-conf".into(), path.display().to_string()]);
    }
    args
}

/// explain's iptables-save text for a case and family.
fn run_explain(case: &Case, family: &str, tmp: &Path) -> Result<String, String> {
    let resolv = tmp.join(format!("{}.resolv.conf", case.name));
    let servers = case.dns4.iter().chain(case.dns6).map(|s| format!("nameserver {s}\n"));
    let servers: String = servers.collect();
    std::fs::write(&resolv, servers).map_err(|e| format!("{}: {e}", resolv.display()))?;
    let args = explain_args(case, family, Some(&resolv));
    // The agent reads istio-iptables' variables wherever a flag is absent: only the case's own
    // may reach it, not whatever the test runner's environment holds.
    let out = Command::new(agent_bin())
        .env_clear()
        .envs(std::env::var_os("PATH").map(|p| ("PATH", p)))
        .envs(case.env.iter().copied())
        .args(&args)
        .output()
        .map_err(|e| format!("spawn redirect-agent: {e}"))?;
    let env: Vec<String> = case.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let cmd = format!("{} redirect-agent {}", env.join(" "), args.join(" "));
    if !out.status.success() {
        return Err(format!("`{cmd}` failed: {}", String::from_utf8_lossy(&out.stderr)));
    }
    let json: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("`{cmd}` printed no JSON: {e}"))?;
    let text = json["iptables_save"].as_str().map(String::from);
    text.ok_or_else(|| format!("`{cmd}`: no iptables_save string"))
}

/// Where Istio's golden files are: `$REDIRECT_ISTIO_GOLDEN` (which must exist; set empty, none,
/// to check the snapshots alone), else the shared reference folder beside the workspace, if there.
fn golden_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("REDIRECT_ISTIO_GOLDEN") {
        let dir = PathBuf::from(dir);
        if dir.as_os_str().is_empty() {
            return None;
        }
        let shown = dir.display();
        assert!(
            dir.join("sidecar").is_dir(),
            "REDIRECT_ISTIO_GOLDEN={shown} has no sidecar/"
        );
        return Some(dir);
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/reference/istio-golden");
    dir.join("sidecar").is_dir().then_some(dir)
}

/// A case's golden restores, normalised: the iptables one, then the ip6tables one for v6.
fn golden_rules(dir: &Path, case: &Case) -> Result<Vec<Rules>, String> {
    let path = dir.join(kind(case)).join(format!("{}.golden", case.name));
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let restores = parse_restores(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    if restores.len() != 1 + usize::from(case.v6) {
        let (shown, n) = (path.display(), restores.len());
        return Err(format!("{shown}: {n} restores, but v6 is {}", case.v6));
    }
    restores.iter().map(normalise).collect()
}

/// One case and family: explain against Istio's restore (when the golden files are there) and
/// against the snapshot; or, blessing, the snapshot rewritten once Istio's matched.
fn check(
    case: &Case,
    family: &str,
    golden: Option<Result<&Rules, String>>,
    bless: bool,
    tmp: &Path,
) -> Result<(), String> {
    let what = format!("{} {family}", case.name);
    let explained = run_explain(case, family, tmp)
        .and_then(|text| parse_restores(&text))
        .and_then(|r| match &r[..] {
            // Every case has rules (nat OUTPUT's jump at least): no comparison is vacuous.
            [one] if !one.is_empty() => normalise(one),
            _ => Err(format!("expected one restore with rules, got {r:?}")),
        })
        .map_err(|e| format!("  {what}: {e}\n"))?;
    let golden = golden.map(|g| g.and_then(|g| compare(&what, ("istio golden", g), &explained)));
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(snapshot_path(case, family));
    let snapshot = if bless && matches!(golden, Some(Ok(_))) {
        std::fs::create_dir_all(path.parent().unwrap())
            .and_then(|()| std::fs::write(&path, render_snapshot(case, family, &explained)))
            .map_err(|e| format!("  {what}: writing {}: {e}\n", path.display()))
    } else {
        match std::fs::read_to_string(&path) {
            Ok(text) => parse_snapshot(&text)
                .and_then(|s| compare(&what, ("snapshot", &s), &explained))
                .map(drop),
            Err(e) => Err(format!(
                "  {what}: snapshot {}: {e}; write it (with Istio's golden files present) with \
                 `REDIRECT_BLESS=1 cargo test -p redirect-tests --test golden`\n",
                path.display()
            )),
        }
    };
    let failures: String = [golden.and_then(Result::err), snapshot.err()]
        .into_iter()
        .flatten()
        .collect();
    if failures.is_empty() { Ok(()) } else { Err(failures) }
}

/// The folder of a case's golden file, `sidecar` or `ambient`.
fn kind(case: &Case) -> &'static str {
    if case.ambient { "ambient" } else { "sidecar" }
}

/// A case's snapshot, under the test crate: a sidecar case's at `golden/`, an ambient one's
/// at `golden/ambient/`.
fn snapshot_path(case: &Case, family: &str) -> String {
    match case.ambient {
        true => format!("golden/ambient/{}.{family}.rules", case.name),
        false => format!("golden/{}.{family}.rules", case.name),
    }
}

#[test]
fn explain_matches_istio_golden() {
    let golden = golden_dir();
    let bless = std::env::var("REDIRECT_BLESS").is_ok_and(|v| v == "1");
    assert!(
        !bless || golden.is_some(),
        "REDIRECT_BLESS=1 needs Istio's golden files (REDIRECT_ISTIO_GOLDEN or ../shared/reference/istio-golden): \
         a snapshot is only written from output that matches them"
    );
    if golden.is_none() {
        eprintln!("note: Istio's golden files are absent: comparing explain with tests/golden/ snapshots only");
    }
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("golden-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let (mut failures, mut runs) = (Vec::new(), 0);
    for case in CASES.iter().chain(&AMBIENT_CASES) {
        let golden = golden.as_deref().map(|dir| golden_rules(dir, case));
        let families: &[&str] = if case.v6 { &["ipv4", "ipv6"] } else { &["ipv4"] };
        for (index, family) in families.iter().enumerate() {
            runs += 1;
            let restore = golden
                .as_ref()
                .map(|g| g.as_ref().map(|g| &g[index]).map_err(|e| format!("  {e}\n")));
            failures.extend(check(case, family, restore, bless, &tmp).err());
        }
    }
    let _ = std::fs::remove_dir_all(&tmp);
    // Every case ran, for IPv4 and (the 11 sidecar and 1 ambient with IPv6) IPv6: none was
    // skipped.
    assert_eq!(runs, 38 + 5, "comparisons run");
    let n = failures.len();
    assert!(
        failures.is_empty(),
        "{n} of {runs} comparisons failed:\n{}",
        failures.concat()
    );
}

#[test]
fn snapshot_round_trips() {
    let mut rules = Rules::new();
    let divert = vec!["-j MARK --set-xmark 0x539/0xffffffff".into(), "-j ACCEPT".into()];
    rules.insert(("mangle".into(), "ISTIO_DIVERT".into()), divert);
    rules.insert(
        ("nat".into(), "ISTIO_OUTPUT".into()),
        vec!["-d ::1/128 -j RETURN".into()],
    );
    let text = render_snapshot(&CASES[2], "ipv6", &rules);
    assert!(
        text.contains("\nmangle ISTIO_DIVERT: -j MARK --set-xmark 0x539/0xffffffff\n"),
        "{text}"
    );
    assert_eq!(parse_snapshot(&text).unwrap(), rules);
}

#[test]
fn explain_args_put_case_flags_over_the_base() {
    let case = CASES.iter().find(|c| c.name == "dns-uid-gid").unwrap();
    let args = explain_args(case, "ipv6", Some(Path::new("/tmp/r")));
    let expected = "explain --family ipv6 --json -p 15001 -z 15006 -e 15008 -b  -i  -d  -t 1337 -r 133 \
        --redirect-dns -g 1,2 -u 3,4 --resolv-conf /tmp/r";
    assert_eq!(args.join(" "), expected);
    let empty = CASES.iter().find(|c| c.name == "empty").unwrap();
    assert!(!explain_args(empty, "ipv4", Some(Path::new("/tmp/r"))).contains(&"--resolv-conf".into()));
}

#[test]
fn case_table_matches_golden_files() {
    assert_eq!(CASES.iter().filter(|c| c.v6).count(), 11);
    let Some(dir) = golden_dir() else {
        eprintln!("note: Istio's golden files are absent: the case table is not checked against them");
        return;
    };
    for (kind, cases) in [("sidecar", &CASES[..]), ("ambient", &AMBIENT_CASES[..])] {
        let files = std::fs::read_dir(dir.join(kind))
            .unwrap()
            .map(|e| e.unwrap().file_name());
        let mut files: Vec<String> = files
            .filter_map(|f| Some(f.to_str()?.strip_suffix(".golden")?.into()))
            .collect();
        let mut names: Vec<String> = cases.iter().map(|c| c.name.to_owned()).collect();
        files.sort();
        names.sort();
        assert_eq!(files, names, "{kind}/");
    }
    for case in CASES.iter().chain(&AMBIENT_CASES) {
        let restores = golden_rules(&dir, case).unwrap();
        assert!(
            restores.iter().all(|r| !r.is_empty()),
            "{}: a restore without rules",
            case.name
        );
    }
}
