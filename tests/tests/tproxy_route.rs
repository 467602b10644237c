//! TPROXY mode's policy routing (`redirect_agent::tproxy_route`) in a real namespace: install
//! adds exactly istio-iptables' `fwmark MARK lookup TABLE` rules and `local default dev lo`
//! routes of both families and tcp_fwmark_accept=1; remove takes away what it added, keeps
//! what was there before, and restores the sysctl; a failure leaves nothing behind.

use std::process::Command;

use redirect_agent::tproxy_route::{self, Policy, TproxyRouting};
use redirect_testkit::{netns::NamedNetns, unique};

const MARK: u32 = 1337;
const TABLE: u32 = 133;

/// A fresh namespace (IPv6 on, `lo` up), deleted on drop also when the test fails.
fn netns(tag: &str) -> NamedNetns {
    redirect_tests::require_root();
    NamedNetns::create(&unique(tag)).expect("netns")
}

/// `ip netns exec NS ARGS...`'s output, lines trimmed.
fn exec(ns: &NamedNetns, args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.name])
        .args(args)
        .output()
        .expect("ip netns exec");
    let stderr = String::from_utf8_lossy(&out.stderr);
    // `ip route show table N` of a table that has never had a route: no routes.
    if !out.status.success() && stderr.contains("FIB table does not exist") {
        return String::new();
    }
    assert!(out.status.success(), "{args:?}: {stderr}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim_end)
        .collect::<Vec<_>>()
        .join("\n")
}

/// What the test looks at: both families' rules and the table's routes, and the sysctl.
#[derive(Debug, PartialEq, Eq)]
struct Routing {
    rules4: String,
    rules6: String,
    table4: String,
    table6: String,
    fwmark_accept: String,
}

fn routing(ns: &NamedNetns, table: u32) -> Routing {
    let t = table.to_string();
    Routing {
        rules4: exec(ns, &["ip", "rule"]),
        rules6: exec(ns, &["ip", "-6", "rule"]),
        table4: exec(ns, &["ip", "route", "show", "table", &t]),
        table6: exec(ns, &["ip", "-6", "route", "show", "table", &t]),
        fwmark_accept: exec(ns, &["cat", "/proc/sys/net/ipv4/tcp_fwmark_accept"]),
    }
}

fn rule_lines(rules: &str, mark: u32, table: u32) -> usize {
    let want = format!("from all fwmark {mark:#x} lookup {table}");
    rules.lines().filter(|l| l.ends_with(&want)).count()
}

/// Exactly one rule of each family, the local default routes, and the sysctl at 1.
fn assert_installed(r: &Routing, mark: u32, table: u32) {
    assert_eq!(rule_lines(&r.rules4, mark, table), 1, "{r:#?}");
    assert_eq!(rule_lines(&r.rules6, mark, table), 1, "{r:#?}");
    assert_eq!(r.table4, "local default dev lo scope host", "{r:#?}");
    assert!(r.table6.starts_with("local default dev lo "), "{r:#?}");
    assert_eq!(r.table6.lines().count(), 1, "{r:#?}");
    assert_eq!(r.fwmark_accept, "1");
}

/// Ambient's routing is istio-cni's: `fwmark 0x111/0xfff` at priority 32764, table 100; an
/// identical rule at another priority is not it.
#[test]
fn ambient_routing_is_istio_cnis_rule_at_its_priority() {
    let ns = netns("tpa");
    let before = routing(&ns, 100);
    let installed = TproxyRouting::install(&ns.open().unwrap(), Policy::ambient()).expect("install");
    let r = routing(&ns, 100);
    for rules in [&r.rules4, &r.rules6] {
        let ours: Vec<&str> = rules.lines().filter(|l| l.contains("fwmark")).collect();
        assert_eq!(ours, ["32764:\tfrom all fwmark 0x111/0xfff lookup 100"], "{r:#?}");
    }
    assert_eq!(r.table4, "local default dev lo scope host", "{r:#?}");
    assert_eq!(r.fwmark_accept, "1");
    installed.remove();
    assert_eq!(routing(&ns, 100), before);

    // Someone else's rule of the same selector at another priority stays theirs.
    ns.ip(&["rule", "add", "fwmark", "0x111/0xfff", "pref", "100", "lookup", "100"])
        .unwrap();
    let installed = TproxyRouting::install(&ns.open().unwrap(), Policy::ambient()).expect("install");
    let rules = routing(&ns, 100).rules4;
    assert_eq!(rules.matches("fwmark 0x111/0xfff lookup 100").count(), 2, "{rules}");
    installed.remove();
    let rules = routing(&ns, 100).rules4;
    assert!(
        rules.contains("100:\tfrom all fwmark 0x111/0xfff lookup 100"),
        "{rules}"
    );
    assert!(!rules.contains("32764:"), "{rules}");
}

#[test]
fn install_adds_both_families_and_the_sysctl_and_remove_restores_everything() {
    let ns = netns("tpr");
    let before = routing(&ns, TABLE);
    assert_eq!((before.table4.as_str(), before.table6.as_str()), ("", ""));
    assert_eq!(before.fwmark_accept, "0");

    let installed = TproxyRouting::install(&ns.open().unwrap(), Policy::tproxy(MARK, TABLE)).expect("install");
    assert!(installed.ipv6());
    assert_installed(&routing(&ns, TABLE), MARK, TABLE);
    installed.remove();
    assert_eq!(routing(&ns, TABLE), before);

    // A table above 255 (in the attribute only) and a mark above 16 bits, with the sysctl at
    // 2 before: restored to 2.
    ns.sysctl("net.ipv4.tcp_fwmark_accept", "2").unwrap();
    let before = routing(&ns, 5000);
    let installed = TproxyRouting::install(&ns.open().unwrap(), Policy::tproxy(0x10_0000, 5000)).expect("install");
    assert_installed(&routing(&ns, 5000), 0x10_0000, 5000);
    installed.remove();
    assert_eq!(routing(&ns, 5000), before);
    assert_eq!(before.fwmark_accept, "2");
}

#[test]
fn what_was_there_before_is_used_and_kept_at_remove() {
    let ns = netns("tpk");
    ns.ip(&["rule", "add", "fwmark", "1337", "lookup", "133"]).unwrap();
    ns.ip(&["route", "add", "local", "default", "dev", "lo", "table", "133"])
        .unwrap();
    ns.sysctl("net.ipv4.tcp_fwmark_accept", "1").unwrap();
    let before = routing(&ns, TABLE);

    // No duplicate rule (the kernel would add one: a rule without a priority gets a new one).
    let first = TproxyRouting::install(&ns.open().unwrap(), Policy::tproxy(MARK, TABLE)).expect("install");
    assert_installed(&routing(&ns, TABLE), MARK, TABLE);
    // A second install over the first's keeps all of it at its remove.
    let second = TproxyRouting::install(&ns.open().unwrap(), Policy::tproxy(MARK, TABLE)).expect("second install");
    let both = routing(&ns, TABLE);
    assert_installed(&both, MARK, TABLE);
    second.remove();
    assert_eq!(routing(&ns, TABLE), both);
    // The first removes only its IPv6 entries; the sysctl was 1 already and stays.
    first.remove();
    assert_eq!(routing(&ns, TABLE), before);
    assert_eq!(rule_lines(&before.rules4, MARK, TABLE), 1);
}

#[test]
fn a_namespace_with_ipv6_disabled_gets_ipv4_only() {
    let ns = netns("tp4");
    for key in ["all", "default", "lo"] {
        ns.sysctl(&format!("net.ipv6.conf.{key}.disable_ipv6"), "1").unwrap();
    }
    let before = routing(&ns, TABLE);
    let installed = TproxyRouting::install(&ns.open().unwrap(), Policy::tproxy(MARK, TABLE)).expect("install");
    assert!(!installed.ipv6());
    let r = routing(&ns, TABLE);
    assert_eq!(rule_lines(&r.rules4, MARK, TABLE), 1, "{r:#?}");
    assert_eq!(r.table4, "local default dev lo scope host");
    assert_eq!((r.rules6.as_str(), r.table6.as_str()), (before.rules6.as_str(), ""));
    assert_eq!(r.fwmark_accept, "1");
    installed.remove();
    assert_eq!(routing(&ns, TABLE), before);
}

#[test]
fn a_conflicting_route_fails_install_and_undoes_what_it_added() {
    let ns = netns("tpc");
    // IPv4 goes in first, then IPv6 meets another default route in the table.
    ns.ip(&["-6", "route", "add", "unreachable", "default", "table", "133"])
        .unwrap();
    let before = routing(&ns, TABLE);
    let e = TproxyRouting::install(&ns.open().unwrap(), Policy::tproxy(MARK, TABLE))
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("adding `ip -6 route local ::/0 dev lo table 133` in the workload's namespace /run/netns/"),
        "{e}"
    );
    assert!(
        e.contains("table 133 already has a default route other than `local` on lo"),
        "{e}"
    );
    assert_eq!(routing(&ns, TABLE), before);
}

#[test]
fn cleanup_removes_a_killed_runs_routing_and_leaves_the_sysctl() {
    let ns = netns("tpx");
    let before = routing(&ns, TABLE);
    // Dropped without remove, as a killed run leaves it.
    drop(TproxyRouting::install(&ns.open().unwrap(), Policy::tproxy(MARK, TABLE)).expect("install"));
    assert_installed(&routing(&ns, TABLE), MARK, TABLE);
    // A rule with the same mark and table and one more selector is not ours and stays.
    ns.ip(&["rule", "add", "fwmark", "1337", "iif", "lo", "lookup", "133"])
        .unwrap();
    let theirs = exec(&ns, &["ip", "rule"]);

    tproxy_route::cleanup(&ns.open().unwrap(), Policy::tproxy(MARK, TABLE)).expect("cleanup");
    let after = routing(&ns, TABLE);
    assert_eq!(after.fwmark_accept, "1", "left as it is");
    assert_eq!(
        (after.rules6, after.table4, after.table6),
        (before.rules6, before.table4, before.table6)
    );
    assert_eq!(
        after.rules4.lines().count(),
        before.rules4.lines().count() + 1,
        "{theirs}"
    );
    assert!(
        after.rules4.contains("fwmark 0x539 iif lo lookup 133"),
        "{}",
        after.rules4
    );
    // Nothing left: a second cleanup has nothing to do and succeeds.
    tproxy_route::cleanup(&ns.open().unwrap(), Policy::tproxy(MARK, TABLE)).expect("second cleanup");
}

#[test]
fn a_successor_adopts_its_predecessors_routing_and_removes_it() {
    let ns = netns("tpr-adopt");
    let before = routing(&ns, TABLE);
    let handle = ns.open().expect("open netns");
    // The predecessor (handed over, or killed) leaves its routing in place.
    drop(TproxyRouting::install(&handle, Policy::tproxy(MARK, TABLE)).expect("install"));
    assert_installed(&routing(&ns, TABLE), MARK, TABLE);
    // Its successor takes it over, adding nothing, and removes all of it at its own end, the
    // sysctl back to the kernel's default.
    let adopted = TproxyRouting::adopt(&handle, Policy::tproxy(MARK, TABLE)).expect("adopt");
    assert_installed(&routing(&ns, TABLE), MARK, TABLE);
    adopted.remove();
    assert_eq!(routing(&ns, TABLE), before);
}
