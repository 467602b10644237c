//! `redirect-agent explain` against Istio's own golden files: for each of the 27 sidecar cases
//! of istio-iptables' `TestIptables` (tools/istio-iptables/pkg/capture/run_test.go), the rules
//! explain prints for the same configuration must be the rules Istio's golden file restores,
//! chain by chain and in order, up to spelling (iptables-save's canonical form against the
//! builder's hand-written one).
//!
//! The golden files are not in this repository: they are read from `$REDIRECT_ISTIO_GOLDEN`, else
//! `../shared/reference/istio-golden` beside the workspace (cases.md there says how they are
//! made). So that the test still means something without them, `tests/golden/<case>.<family>.rules`
//! keeps explain's normalised rules as they were when they last matched Istio's; with the golden
//! folder present, `REDIRECT_BLESS=1` rewrites those snapshots (only for cases that match Istio).
//!
//! No root needed: explain only prints rules. `cargo test -p redirect-tests --test golden` (with
//! the agent built at target/debug/redirect-agent, or REDIRECT_AGENT_BIN).

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
    process::Command,
};

use redirect_tests::agent_bin;

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
}

#[rustfmt::skip]
const NONE: Case = Case { name: "", flags: &[], env: &[], dns4: &[], dns6: &[], v6: false };
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

/// Istio's `constructTestConfig`, which every case starts from. explain defaults to the
/// injection's values instead (-i '*' -b '*' -d 15090,15021,15020), so each is given.
#[rustfmt::skip]
const BASE: [(&str, &str); 10] = [
    ("-p", "15001"), ("-z", "15006"), ("-e", "15008"), ("-u", "1337"), ("-g", "1337"),
    ("-b", ""), ("-i", ""), ("-d", ""), ("-t", "1337"), ("-r", "133"),
];

/// Rules per (table, chain), in chain order: only chains with at least one rule appear.
type Rules = BTreeMap<(String, String), Vec<String>>;

/// The restores in a golden file or in explain's iptables-save text, each as final chains.
/// Marker lines (`iptables-save`, the stub's record of a dump) and `-N`/`:` declarations are
/// skipped; `-I CHAIN N` inserts at position N of the chain as it is at that line. Tables come
/// in sorted order (mangle, nat, raw) within one restore, so a table not after the previous
/// one (in Istio's files: the same name again) starts the next restore, the ip6tables one.
fn parse_restores(text: &str) -> Result<Vec<Rules>, String> {
    let mut restores: Vec<Rules> = Vec::new();
    let (mut table, mut last): (Option<String>, Option<String>) = (None, None);
    for (n, line) in text.lines().enumerate().map(|(n, l)| (n + 1, l.trim())) {
        if line.is_empty() || line.starts_with('#') || line == "iptables-save" || line == "ip6tables-save" {
            continue;
        }
        if let Some(name) = line.strip_prefix('*') {
            if let Some(open) = &table {
                return Err(format!("line {n}: `{line}` inside *{open} (no COMMIT)"));
            }
            let name = name.trim().to_owned();
            if last.as_ref().is_none_or(|l| name <= *l) {
                restores.push(Rules::new());
            }
            (table, last) = (Some(name.clone()), Some(name));
            continue;
        }
        let Some(t) = &table else {
            return Err(format!("line {n}: `{line}` outside a table"));
        };
        let chains = restores.last_mut().expect("a table opened a restore");
        let toks: Vec<&str> = line.split_whitespace().collect();
        match toks[..] {
            ["COMMIT"] => table = None,
            [decl, ..] if decl.starts_with(':') || decl == "-N" => {}
            ["-A", chain, ref rule @ ..] => chains
                .entry((t.clone(), chain.into()))
                .or_default()
                .push(rule.join(" ")),
            ["-I", chain, pos, ref rule @ ..] => {
                let list = chains.entry((t.clone(), chain.into())).or_default();
                match pos.parse::<usize>() {
                    Ok(p) if (1..=list.len() + 1).contains(&p) => list.insert(p - 1, rule.join(" ")),
                    _ => {
                        return Err(format!(
                            "line {n}: bad position {pos} in a chain of {} rules",
                            list.len()
                        ));
                    }
                }
            }
            _ => return Err(format!("line {n}: unsupported line `{line}`")),
        }
    }
    match table {
        Some(t) => Err(format!("*{t} has no COMMIT")),
        None => Ok(restores),
    }
}

/// Option groups, in the order a normalised rule prints them.
const CORE: u8 = 0;
const MATCH: u8 = 1;
const JUMP: u8 = 2;
const TARGET: u8 = 3;

/// One option of a rule: `[!] flag args`, keyed by what it belongs to (a match module's
/// `--mark` is not connmark's; a `--dport` of `-p tcp` is not multiport's).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Opt {
    group: u8,
    module: String,
    /// The core options in iptables-save's order (-s -d -i -o -p, then the protocol's).
    rank: usize,
    flag: String,
    neg: bool,
    args: Vec<String>,
}

/// A rule (the tokens after `-A CHAIN`) in one spelling: its options sorted within their
/// groups, values in canonical form, defaults dropped. Two spellings of the same rule
/// (iptables-save's and istio-iptables' builder's) normalise to the same text.
fn normalise_rule(rule: &str) -> Result<String, String> {
    let toks: Vec<&str> = rule.split_whitespace().collect();
    let (mut group, mut module) = (CORE, String::new());
    let mut opts = Vec::new();
    let mut i = 0;
    while i < toks.len() {
        let neg = toks[i] == "!";
        i += usize::from(neg);
        let flag = *toks.get(i).ok_or_else(|| format!("`!` at the end of `{rule}`"))?;
        if !flag.starts_with('-') {
            return Err(format!("`{flag}` is not an option in `{rule}`"));
        }
        i += 1;
        let start = i;
        while i < toks.len() && toks[i] != "!" && !toks[i].starts_with('-') {
            i += 1;
        }
        let args: Vec<String> = toks[start..i].iter().map(|s| s.to_string()).collect();
        let mut push = |group, module: &str, flag: &str, args| {
            let rank = ["-s", "-d", "-i", "-o", "-p"].iter().position(|f| *f == flag);
            let rank = if group == CORE { rank.unwrap_or(5) } else { 0 };
            opts.push(Opt {
                group,
                module: module.into(),
                rank,
                flag: flag.into(),
                neg,
                args,
            });
        };
        match (flag, &args[..]) {
            // `-m tcp`/`-m udp` are what iptables-save writes for `-p tcp --dport`: their
            // options are the protocol's, as those right after `-p` are.
            ("-m", [m]) if m == "tcp" || m == "udp" => (group, module) = (CORE, String::new()),
            ("-m", [m]) => (group, module) = (MATCH, m.clone()),
            ("-j", [t]) => {
                (group, module) = (TARGET, t.clone());
                push(JUMP, "", flag, args);
            }
            ("-p", [_]) => {
                (group, module) = (CORE, String::new());
                push(CORE, "", flag, args);
            }
            ("-s" | "-d", [cidr]) => push(CORE, "", flag, vec![normalise_cidr(cidr)?]),
            ("-i" | "-o", [_]) => push(CORE, "", flag, args),
            ("-m" | "-j" | "-s" | "-d" | "-i" | "-o" | "-p", _) => {
                return Err(format!("`{flag}` takes one value in `{rule}`"));
            }
            _ => {
                if let Some((flag, args)) = normalise_value(flag, args)? {
                    push(group, &module, &flag, args);
                }
            }
        }
    }
    opts.sort();
    let mut out: Vec<String> = Vec::new();
    let mut shown_module = None;
    for o in &opts {
        if o.group == MATCH && shown_module != Some(&o.module) {
            out.extend(["-m".into(), o.module.clone()]);
            shown_module = Some(&o.module);
        }
        if o.neg {
            out.push("!".into());
        }
        out.push(o.flag.clone());
        out.extend(o.args.iter().cloned());
    }
    Ok(out.join(" "))
}

/// A match or target option's value in canonical form; `None` for a default iptables-save
/// prints and Istio's builder leaves out.
fn normalise_value(flag: &str, args: Vec<String>) -> Result<Option<(String, Vec<String>)>, String> {
    let one = || match &args[..] {
        [v] => Ok(v.as_str()),
        _ => Err(format!("`{flag}` takes one value, not {args:?}")),
    };
    Ok(Some(match flag {
        "--to-port" => ("--to-ports".into(), args),
        // A mark without a mask matches (or sets) all 32 bits: iptables-save prints the mask
        // or not depending on the module, Istio never does, so it is always spelled out.
        "--mark" | "--set-xmark" | "--tproxy-mark" => {
            let (v, m) = mark(one()?)?;
            (flag.into(), vec![format!("{v:#x}/{m:#x}")])
        }
        // MARK's --set-mark V/M is --set-xmark V/(M|V): iptables-save prints the latter.
        "--set-mark" => {
            let (v, m) = mark(one()?)?;
            ("--set-xmark".into(), vec![format!("{v:#x}/{:#x}", m | v)])
        }
        "--nfmask" | "--ctmask" if number(one()?)? == u32::MAX => return Ok(None),
        "--on-ip" if one()?.parse::<IpAddr>().is_ok_and(|ip| ip.is_unspecified()) => return Ok(None),
        _ => (flag.into(), args),
    }))
}

/// `V[/M]`, the mask all ones when absent.
fn mark(s: &str) -> Result<(u32, u32), String> {
    match s.split_once('/') {
        Some((v, m)) => Ok((number(v)?, number(m)?)),
        None => Ok((number(s)?, u32::MAX)),
    }
}

/// A decimal or `0x` hexadecimal number, as iptables reads marks and masks.
fn number(s: &str) -> Result<u32, String> {
    let parsed = match s.strip_prefix("0x") {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    };
    parsed.map_err(|_| format!("`{s}` is not a number"))
}

/// An address or CIDR as the kernel keeps it: the network, with its prefix (`/32` or `/128`
/// for a bare address), so that `127.0.0.1/8` is `127.0.0.0/8`.
fn normalise_cidr(s: &str) -> Result<String, String> {
    let bad = || format!("`{s}` is not an address or CIDR");
    let (addr, prefix) = s.split_once('/').map_or((s, None), |(a, p)| (a, Some(p)));
    let ip: IpAddr = addr.parse().map_err(|_| bad())?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let prefix: u32 = prefix.map_or(Ok(max), str::parse).map_err(|_| bad())?;
    if prefix > max {
        return Err(bad());
    }
    let net = match ip {
        IpAddr::V4(a) => IpAddr::from((u32::from(a) & u32::MAX.checked_shl(32 - prefix).unwrap_or(0)).to_be_bytes()),
        IpAddr::V6(a) => IpAddr::from((u128::from(a) & u128::MAX.checked_shl(128 - prefix).unwrap_or(0)).to_be_bytes()),
    };
    Ok(format!("{net}/{prefix}"))
}

/// Every rule of every chain normalised.
fn normalise(rules: &Rules) -> Result<Rules, String> {
    let mut out = Rules::new();
    for (key, list) in rules {
        let normal = list.iter().map(|r| normalise_rule(r)).collect::<Result<_, _>>();
        out.insert(key.clone(), normal.map_err(|e| format!("{} {}: {e}", key.0, key.1))?);
    }
    Ok(out)
}

/// `expected` against `actual`, chain by chain: the number of chains compared, or a message
/// naming `what` (case and family) and, for each chain that differs, both rule lists.
fn compare(what: &str, (exp_name, expected): (&str, &Rules), actual: &Rules) -> Result<usize, String> {
    let show = |list: Option<&Vec<String>>| match list {
        None => "      (no rules)\n".to_owned(),
        Some(l) => l
            .iter()
            .enumerate()
            .map(|(i, r)| format!("      {:>2}. {r}\n", i + 1))
            .collect(),
    };
    let mut keys: Vec<_> = expected.keys().chain(actual.keys()).collect();
    keys.sort();
    keys.dedup();
    let mut diffs = String::new();
    for key in &keys {
        let (e, a) = (expected.get(*key), actual.get(*key));
        if e != a {
            diffs += &format!("  {what}: {} {} differs\n    {exp_name}:\n{}", key.0, key.1, show(e));
            diffs += &format!("    explain:\n{}", show(a));
        }
    }
    if diffs.is_empty() { Ok(keys.len()) } else { Err(diffs) }
}

/// A snapshot file: explain's normalised rules, one `table chain: rule` line each in order.
fn render_snapshot(case: &Case, family: &str, rules: &Rules) -> String {
    let mut s = format!(
        "# `redirect-agent explain --family {family}` for Istio's sidecar golden case `{}`, normalised\n\
         # by tests/tests/golden.rs; rewritten (only while it matches Istio's golden file) with\n\
         # REDIRECT_BLESS=1 cargo test -p redirect-tests --test golden\n",
        case.name
    );
    for ((table, chain), list) in rules {
        for rule in list {
            s += &format!("{table} {chain}: {rule}\n");
        }
    }
    s
}

fn parse_snapshot(text: &str) -> Result<Rules, String> {
    let mut rules = Rules::new();
    for line in text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let bad = || format!("snapshot line `{line}` is not `table chain: rule`");
        let (key, rule) = line.split_once(": ").ok_or_else(bad)?;
        let (table, chain) = key.split_once(' ').ok_or_else(bad)?;
        rules.entry((table.into(), chain.into())).or_default().push(rule.into());
    }
    Ok(rules)
}

/// explain's arguments for a case: the base config with the case's own flags replacing the
/// base ones they name, and the resolv.conf only where the case captures DNS (its servers
/// are read from it).
fn explain_args(case: &Case, family: &str, resolv_conf: Option<&Path>) -> Vec<String> {
    let mut args: Vec<String> = ["explain", "--family", family, "--json"].map(String::from).to_vec();
    for (flag, value) in BASE.iter().filter(|(f, _)| !case.flags.contains(f)) {
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

/// Where Istio's golden files are: `$REDIRECT_ISTIO_GOLDEN` (which must exist), else the
/// shared reference folder beside the workspace, if it is there.
fn golden_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("REDIRECT_ISTIO_GOLDEN") {
        let dir = PathBuf::from(dir);
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
    let path = dir.join("sidecar").join(format!("{}.golden", case.name));
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let restores = parse_restores(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    if restores.len() != 1 + usize::from(case.v6) {
        let (shown, n) = (path.display(), restores.len());
        return Err(format!("{shown}: {n} restores, but v6 is {}", case.v6));
    }
    restores.iter().map(normalise).collect()
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
    let snapshots = Path::new(env!("CARGO_MANIFEST_DIR")).join("golden");
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("golden-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let (mut failures, mut runs) = (Vec::new(), 0);
    for case in &CASES {
        let golden = golden.as_deref().map(|dir| golden_rules(dir, case));
        let families: &[&str] = if case.v6 { &["ipv4", "ipv6"] } else { &["ipv4"] };
        for (index, family) in families.iter().enumerate() {
            runs += 1;
            let what = format!("{} {family}", case.name);
            let explained = run_explain(case, family, &tmp)
                .and_then(|text| parse_restores(&text))
                .and_then(|r| match &r[..] {
                    [one] if !one.is_empty() => normalise(one),
                    _ => Err(format!("expected one restore with rules, got {} restores", r.len())),
                });
            let explained = match explained {
                Ok(e) => e,
                Err(e) => {
                    failures.push(format!("  {what}: {e}\n"));
                    continue;
                }
            };
            let golden_ok = match &golden {
                None => false,
                Some(g) => {
                    let g = g.as_ref().map_err(|e| format!("  {what}: {e}\n"));
                    match g.and_then(|g| compare(&what, ("istio golden", &g[index]), &explained)) {
                        Ok(chains) => chains > 0,
                        Err(e) => {
                            failures.push(e);
                            false
                        }
                    }
                }
            };
            let path = snapshots.join(format!("{}.{family}.rules", case.name));
            if bless && golden_ok {
                std::fs::create_dir_all(&snapshots).unwrap();
                std::fs::write(&path, render_snapshot(case, family, &explained)).unwrap();
                continue;
            }
            let compared = match std::fs::read_to_string(&path) {
                Ok(text) => parse_snapshot(&text).and_then(|s| compare(&what, ("snapshot", &s), &explained)),
                Err(e) => Err(format!(
                    "  {what}: snapshot {}: {e}; write it (with Istio's golden files present) with \
                     `REDIRECT_BLESS=1 cargo test -p redirect-tests --test golden`\n",
                    path.display()
                )),
            };
            match compared {
                Ok(0) => failures.push(format!("  {what}: the snapshot has no rules\n")),
                Ok(_) => {}
                Err(e) => failures.push(e),
            }
        }
    }
    let _ = std::fs::remove_dir_all(&tmp);
    // Every case ran, for IPv4 and (in the 11 with IPv6) IPv6: none was skipped.
    assert_eq!(runs, 38, "comparisons run");
    assert!(
        failures.is_empty(),
        "{} failures in {runs} comparisons:\n{}",
        failures.len(),
        failures.concat()
    );
}

#[test]
fn parse_applies_inserts_in_sequence() {
    // As in ipnets-with-kube-virt-interfaces.golden and tproxy.golden.
    let text = "iptables-save\nip6tables-save\n* mangle\n-N ISTIO_INBOUND\n-A ISTIO_INBOUND -p tcp -j ISTIO_TPROXY\n\
        -I ISTIO_INBOUND 1 -p tcp -m mark --mark 1337 -j RETURN\n-I ISTIO_INBOUND 2 -p tcp -i lo -j RETURN\n\
        COMMIT\n* nat\n-I PREROUTING 1 -i eth1 -j RETURN\n-I PREROUTING 1 -i eth2 -j RETURN\n\
        -I PREROUTING 1 -i eth1 -d 10.0.0.0/8 -j ISTIO_REDIRECT\n-I PREROUTING 1 -i eth2 -d 10.0.0.0/8 -j ISTIO_REDIRECT\n\
        COMMIT\niptables-save\n";
    let expected = "mangle ISTIO_INBOUND: -p tcp -m mark --mark 1337 -j RETURN
        mangle ISTIO_INBOUND: -p tcp -i lo -j RETURN
        mangle ISTIO_INBOUND: -p tcp -j ISTIO_TPROXY
        nat PREROUTING: -i eth2 -d 10.0.0.0/8 -j ISTIO_REDIRECT
        nat PREROUTING: -i eth1 -d 10.0.0.0/8 -j ISTIO_REDIRECT
        nat PREROUTING: -i eth2 -j RETURN
        nat PREROUTING: -i eth1 -j RETURN";
    assert_eq!(parse_restores(text).unwrap(), vec![parse_snapshot(expected).unwrap()]);
    let past_end = parse_restores("* nat\n-I OUTPUT 2 -j RETURN\nCOMMIT\n");
    assert!(past_end.unwrap_err().contains("bad position 2"));
    assert!(parse_restores("* nat\n-A OUTPUT -j RETURN\n").is_err(), "no COMMIT");
}

#[test]
fn parse_splits_v4_and_v6_restores() {
    let text = "* mangle\n-A OUTPUT -j A\nCOMMIT\n* nat\n-N X\nCOMMIT\n* raw\n-A OUTPUT -j B\nCOMMIT\n\
        * mangle\n-A OUTPUT -j C\nCOMMIT\n* nat\n-A OUTPUT -j D\nCOMMIT\n* nat\n-A OUTPUT -j E\nCOMMIT\n";
    let expected = [
        "mangle OUTPUT: -j A\nraw OUTPUT: -j B",
        "mangle OUTPUT: -j C\nnat OUTPUT: -j D",
        "nat OUTPUT: -j E",
    ];
    let expected: Vec<Rules> = expected.iter().map(|e| parse_snapshot(e).unwrap()).collect();
    assert_eq!(parse_restores(text).unwrap(), expected);
}

#[test]
fn parse_reads_iptables_save_form() {
    let text = "# Generated by redirect-agent\n*nat\n:PREROUTING ACCEPT [0:0]\n:ISTIO_OUTPUT - [0:0]\n\
        -A OUTPUT -p tcp -j ISTIO_OUTPUT\n-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN\nCOMMIT\n*raw\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n";
    let expected = parse_snapshot("nat OUTPUT: -p tcp -j ISTIO_OUTPUT\nnat ISTIO_OUTPUT: -d 127.0.0.1/32 -j RETURN");
    assert_eq!(parse_restores(text).unwrap(), vec![expected.unwrap()]);
}

/// Pairs of lines: iptables-save's spelling (what explain prints), then the golden files'
/// (tproxy.golden, dns-uid-gid.golden, outbound-owner-groups.golden...) of the same rule.
const SAME_RULES: &str = "\
-s 127.0.0.6/32 -i lo -p tcp -j RETURN
-p tcp -s 127.0.0.6/32 -i lo -j RETURN
! -d 127.0.0.1/32 -p tcp -j TPROXY --on-port 15006 --on-ip 0.0.0.0 --tproxy-mark 0x539/0xffffffff
! -d 127.0.0.1/32 -p tcp -j TPROXY --tproxy-mark 1337/0xffffffff --on-port 15006
! -d ::1/128 -p tcp -j TPROXY --on-port 15006 --on-ip :: --tproxy-mark 0x539/0xffffffff
! -d ::1/128 -p tcp -j TPROXY --tproxy-mark 1337/0xffffffff --on-port 15006
-j MARK --set-xmark 0x539/0xffffffff
-j MARK --set-mark 1337
-p tcp -m mark --mark 0x539 -j CONNMARK --save-mark --nfmask 0xffffffff --ctmask 0xffffffff
-p tcp -m mark --mark 1337 -j CONNMARK --save-mark
-p tcp -m connmark --mark 0x539 -j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff
-p tcp -m connmark --mark 1337 -j CONNMARK --restore-mark
-i lo -p tcp -m mark ! --mark 0x53a -j RETURN
-p tcp -i lo -m mark ! --mark 1338 -j RETURN
! -d 127.0.0.1/32 -o lo -p tcp -m multiport ! --dports 53,15008 -m owner --uid-owner 3 -j ISTIO_IN_REDIRECT
-o lo ! -d 127.0.0.1/32 -p tcp -m multiport ! --dports 53,15008 -m owner --uid-owner 3 -j ISTIO_IN_REDIRECT
-o lo -p tcp -m tcp ! --dport 53 -m owner ! --gid-owner 1 -j RETURN
-o lo -p tcp ! --dport 53 -m owner ! --gid-owner 1 -j RETURN
-d 127.0.0.53/32 -p udp -m udp --dport 53 -j REDIRECT --to-ports 15053
-p udp --dport 53 -d 127.0.0.53/32 -j REDIRECT --to-port 15053
-s ::7f00:35/128 -p udp -m udp --sport 53 -j CT --zone 1
-p udp --sport 53 -s ::127.0.0.53/128 -j CT --zone 1
-m owner ! --gid-owner java -m owner ! --gid-owner 202 -j RETURN
-m owner ! --gid-owner java -m owner ! --gid-owner 202 -j RETURN
! -d 127.0.0.0/8 -o lo -p tcp -m tcp ! --dport 15008 -j ISTIO_IN_REDIRECT
-o lo ! -d 127.0.0.1/8 -p tcp ! --dport 15008 -j ISTIO_IN_REDIRECT";

#[test]
fn normalises_save_and_golden_spellings_alike() {
    let lines: Vec<&str> = SAME_RULES.lines().collect();
    assert_eq!(lines.len(), 26);
    for pair in lines.chunks(2) {
        let (save, golden) = (normalise_rule(pair[0]).unwrap(), normalise_rule(pair[1]).unwrap());
        assert_eq!(save, golden, "{}  vs  {}", pair[0], pair[1]);
    }
    let rule = "-p tcp -m tcp --dport 53 -m owner --uid-owner 3 -j RETURN";
    assert_eq!(
        normalise_rule(rule).unwrap(),
        "-p tcp --dport 53 -m owner --uid-owner 3 -j RETURN"
    );
}

/// Rules that must stay apart, `a | b`: normalising drops spelling, not meaning.
const DIFFERENT_RULES: &str = "\
-m mark --mark 1337 -j RETURN | -m connmark --mark 1337 -j RETURN
-m mark --mark 1337 -j RETURN | -m mark --mark 1338 -j RETURN
-m mark --mark 1337 -j RETURN | -m mark ! --mark 1337 -j RETURN
-m mark --mark 1337 -j RETURN | -m mark --mark 1337/0xfff -j RETURN
-p tcp ! --dport 53 -j RETURN | -p tcp --dport 53 -j RETURN
-p tcp --dport 53 -j RETURN | -p udp --dport 53 -j RETURN
-p tcp --dport 53 -j RETURN | -p tcp -m multiport --dports 53 -j RETURN
-p tcp -m multiport --dports 53,15008 -j R | -p tcp -m multiport --dports 15008,53 -j R
-m owner --uid-owner 3 -j RETURN | -m owner --gid-owner 3 -j RETURN
-d 127.0.0.1/32 -j RETURN | -d 127.0.0.1/8 -j RETURN
-d 127.0.0.1/32 -j RETURN | -s 127.0.0.1/32 -j RETURN
-o lo -j RETURN | -i lo -j RETURN
-j REDIRECT --to-ports 15001 | -j REDIRECT --to-ports 15006
-j TPROXY --on-port 15006 --on-ip 127.0.0.1 | -j TPROXY --on-port 15006
-j CONNMARK --save-mark --nfmask 0xfff | -j CONNMARK --save-mark
-j ISTIO_REDIRECT | -g ISTIO_REDIRECT";

#[test]
fn normalisation_keeps_meaningful_differences() {
    for (a, b) in DIFFERENT_RULES.lines().map(|l| l.split_once(" | ").unwrap()) {
        assert_ne!(normalise_rule(a).unwrap(), normalise_rule(b).unwrap(), "{a}  vs  {b}");
    }
    assert!(normalise_rule("-p tcp 53").is_err());
    assert!(normalise_rule("-m mark --mark x -j RETURN").is_err());
}

#[test]
fn normalises_cidrs() {
    for (input, expected) in [
        ("127.0.0.1/8", "127.0.0.0/8"),
        ("127.0.0.6", "127.0.0.6/32"),
        ("10.1.2.3/0", "0.0.0.0/0"),
        ("::6", "::6/128"),
        ("2001:db8::1/32", "2001:db8::/32"),
        ("::127.0.0.53/128", "::7f00:35/128"),
    ] {
        assert_eq!(normalise_cidr(input).unwrap(), expected, "{input}");
    }
    for bad in ["127.0.0.1/33", "::1/129", "lo", "1.2.3.4/x"] {
        assert!(normalise_cidr(bad).is_err(), "{bad}");
    }
}

#[test]
fn compare_names_the_chain_and_both_lists() {
    let golden = parse_snapshot("nat OUTPUT: -j ISTIO_OUTPUT\nraw OUTPUT: -j A").unwrap();
    assert_eq!(compare("empty ipv4", ("istio golden", &golden), &golden), Ok(2));
    let explained = parse_snapshot("nat OUTPUT: -j ISTIO_OUTPUT\nnat OUTPUT: -j RETURN\nraw OUTPUT: -j A").unwrap();
    let err = compare("empty ipv4", ("istio golden", &golden), &explained).unwrap_err();
    assert!(err.contains("empty ipv4: nat OUTPUT differs"), "{err}");
    assert!(err.contains("2. -j RETURN") && !err.contains("raw"), "{err}");
    let err = compare("x ipv6", ("snapshot", &golden), &Rules::new()).unwrap_err();
    assert!(
        err.contains("raw OUTPUT differs") && err.contains("(no rules)"),
        "{err}"
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
    let files = std::fs::read_dir(dir.join("sidecar"))
        .unwrap()
        .map(|e| e.unwrap().file_name());
    let mut files: Vec<String> = files
        .filter_map(|f| Some(f.to_str()?.strip_suffix(".golden")?.into()))
        .collect();
    let mut names: Vec<String> = CASES.iter().map(|c| c.name.to_owned()).collect();
    files.sort();
    names.sort();
    assert_eq!(files, names);
    for case in &CASES {
        let restores = golden_rules(&dir, case).unwrap();
        assert!(
            restores.iter().all(|r| !r.is_empty()),
            "{}: a restore without rules",
            case.name
        );
    }
}
