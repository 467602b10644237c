//! iptables rule text as iptables-restore reads it: restores parsed into final chains (`-I`
//! applied), and each rule normalised up to spelling, so that `explain`'s iptables-save text
//! and Istio's hand-written builder output compare rule by rule (`tests/golden.rs`).

use std::{collections::BTreeMap, net::IpAddr};

/// Rules per (table, chain), in chain order: only chains with at least one rule appear.
pub type Rules = BTreeMap<(String, String), Vec<String>>;

/// The restores in a golden file or in explain's iptables-save text, each as final chains.
/// Marker lines (`iptables-save`, the stub's record of a dump) and `-N`/`:` declarations are
/// skipped; `-I CHAIN N` inserts at position N of the chain as it is at that line. Tables come
/// in sorted order (mangle, nat, raw) within one restore, so a table not after the previous
/// one (in Istio's files: the same name again) starts the next restore, the ip6tables one.
pub fn parse_restores(text: &str) -> Result<Vec<Rules>, String> {
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
            ["-A", chain, ref rule @ ..] => {
                let list = chains.entry((t.clone(), chain.into())).or_default();
                list.push(rule.join(" "));
            }
            ["-I", chain, pos, ref rule @ ..] => {
                let list = chains.entry((t.clone(), chain.into())).or_default();
                let bad = || format!("line {n}: bad position {pos} in a chain of {} rules", list.len());
                let p = pos
                    .parse()
                    .ok()
                    .filter(|p| (1..=list.len() + 1).contains(p))
                    .ok_or_else(bad)?;
                list.insert(p - 1, rule.join(" "));
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
pub fn normalise_rule(rule: &str) -> Result<String, String> {
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
pub fn normalise_cidr(s: &str) -> Result<String, String> {
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
pub fn normalise(rules: &Rules) -> Result<Rules, String> {
    let mut out = Rules::new();
    for (key, list) in rules {
        let normal = list.iter().map(|r| normalise_rule(r)).collect::<Result<_, _>>();
        out.insert(key.clone(), normal.map_err(|e| format!("{} {}: {e}", key.0, key.1))?);
    }
    Ok(out)
}

/// `expected` against `actual`, chain by chain: the number of chains compared, or a message
/// naming `what` (case and family) and, for each chain that differs, both rule lists.
pub fn compare(what: &str, (exp_name, expected): (&str, &Rules), actual: &Rules) -> Result<usize, String> {
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

pub fn parse_snapshot(text: &str) -> Result<Rules, String> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_applies_inserts_in_sequence() {
        // As in ipnets-with-kube-virt-interfaces.golden and tproxy.golden.
        let text = "iptables-save\nip6tables-save\n* mangle\n-N ISTIO_INBOUND\n-A ISTIO_INBOUND -p tcp -j ISTIO_TPROXY\n\
            -I ISTIO_INBOUND 1 -p tcp -m mark --mark 1337 -j RETURN\n-I ISTIO_INBOUND 2 -p tcp -i lo -j RETURN\n\
            COMMIT\n* nat\n-I PREROUTING 1 -i eth1 -j RETURN\n-I PREROUTING 1 -i eth2 -j RETURN\n\
            -I PREROUTING 1 -i eth1 -d 10.0.0.0/8 -j ISTIO_REDIRECT\n\
            -I PREROUTING 1 -i eth2 -d 10.0.0.0/8 -j ISTIO_REDIRECT\nCOMMIT\niptables-save\n";
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
        // Istio's `* table` headers, then explain's iptables-save form (`*nat`, `:` declarations).
        let text = "* mangle\n-A OUTPUT -j A\nCOMMIT\n* nat\n-N X\nCOMMIT\n* raw\n-A OUTPUT -j B\nCOMMIT\n\
            * mangle\n-A OUTPUT -j C\nCOMMIT\n* nat\n-A OUTPUT -j D\nCOMMIT\n# Generated by redirect-agent\n\
            *nat\n:OUTPUT ACCEPT [0:0]\n:ISTIO_OUTPUT - [0:0]\n-A OUTPUT -j E\n-A ISTIO_OUTPUT -j F\nCOMMIT\n";
        let expected = [
            "mangle OUTPUT: -j A\nraw OUTPUT: -j B",
            "mangle OUTPUT: -j C\nnat OUTPUT: -j D",
            "nat OUTPUT: -j E\nnat ISTIO_OUTPUT: -j F",
        ];
        let expected: Vec<Rules> = expected.iter().map(|e| parse_snapshot(e).unwrap()).collect();
        assert_eq!(parse_restores(text).unwrap(), expected);
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
        #[rustfmt::skip]
        let cases = [("127.0.0.1/8", "127.0.0.0/8"), ("127.0.0.6", "127.0.0.6/32"), ("10.1.2.3/0", "0.0.0.0/0"),
            ("::6", "::6/128"), ("2001:db8::1/32", "2001:db8::/32"), ("::127.0.0.53/128", "::7f00:35/128")];
        for (input, expected) in cases {
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
}
