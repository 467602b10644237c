//! Bn's rules: what Istio's native nftables backend (`--native-nftables`, Istio 1.27+) installs
//! for the same flags as B, written from the very iptables-save text B loads (`explain`), one
//! nft rule per iptables rule, in Istio's table and chain names and with a `counter` on every
//! rule as its current releases write them (docs/research/istio-nftables.md §2–§3).
//!
//! It covers what the bench's flags produce: nat rules of REDIRECT mode. A mangle or raw table
//! (TPROXY, DNS capture) or a match it does not know is refused, naming the line, rather than
//! translated loosely.

use std::{
    io::Write as _,
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

/// Istio's nat table for a pod (`inet`: one table for both families).
const TABLE: &str = "inet istio-proxy-nat";

/// `PREROUTING` -> `prerouting`, `ISTIO_IN_REDIRECT` -> `istio-in-redirect`.
fn chain_name(iptables: &str) -> String {
    iptables.to_ascii_lowercase().replace('_', "-")
}

/// The nft transaction (`nft -f` input) for the nat table of `iptables_save`.
pub fn from_iptables_save(iptables_save: &str) -> anyhow::Result<String> {
    let mut table = None;
    let mut chains: Vec<String> = Vec::new();
    let mut rules = Vec::new();
    for line in iptables_save.lines().map(str::trim) {
        if let Some(t) = line.strip_prefix('*') {
            table = Some(t.to_owned());
            continue;
        }
        let Some(rule) = line.strip_prefix("-A ") else {
            continue;
        };
        if table.as_deref() != Some("nat") {
            bail!(
                "nft: only nat rules (REDIRECT mode, no DNS capture) are translated, not {:?}: {line}",
                table.as_deref().unwrap_or("?")
            );
        }
        let (chain, args) = rule.split_once(' ').context("a rule without matches")?;
        let (text, target) = rule_text(args).with_context(|| format!("nft: {line}"))?;
        let chain = chain_name(chain);
        for c in std::iter::once(&chain).chain(target.as_ref()) {
            if !chains.contains(c) {
                chains.push(c.clone());
            }
        }
        rules.push(format!("add rule {TABLE} {chain} {text}"));
    }
    let mut out = format!("add table {TABLE}\nflush table {TABLE}\n");
    for c in &chains {
        match c.as_str() {
            "prerouting" | "output" => {
                out.push_str(&format!(
                    "add chain {TABLE} {c} {{ type nat hook {c} priority -100 ; }}\n"
                ));
            }
            "input" | "postrouting" => bail!("nft: a rule in nat {c} (istio-iptables writes none)"),
            _ => out.push_str(&format!("add chain {TABLE} {c}\n")),
        }
    }
    for r in rules {
        out.push_str(&r);
        out.push('\n');
    }
    Ok(out)
}

/// One rule's matches and verdict in nft's words, in the order Istio's builder writes them
/// (interface, protocol, addresses, ports, owner), and the chain it jumps to, if any.
fn rule_text(args: &str) -> anyhow::Result<(String, Option<String>)> {
    let (mut iface, mut proto, mut addrs, mut ports, mut owner) =
        (Vec::new(), None, Vec::new(), Vec::new(), Vec::new());
    let mut verdict = None;
    let mut jump = None;
    let mut tokens = args.split_whitespace();
    let mut not = false;
    while let Some(t) = tokens.next() {
        let mut value = || tokens.next().with_context(|| format!("{t} without a value"));
        let op = if std::mem::take(&mut not) { "!= " } else { "" };
        match t {
            "!" => not = true,
            "-m" => {
                let m = value()?;
                if !matches!(m, "tcp" | "udp" | "owner") {
                    bail!("the match module {m}");
                }
            }
            "-p" => proto = Some(value()?.to_owned()),
            "-o" => iface.push(format!("oifname {op}\"{}\"", value()?)),
            "-i" => iface.push(format!("iifname {op}\"{}\"", value()?)),
            "-s" => addrs.push(format!("ip saddr {op}{}", value()?)),
            "-d" => addrs.push(format!("ip daddr {op}{}", value()?)),
            "--dport" => {
                let p = proto.as_deref().context("--dport without -p")?;
                ports.push(format!("{p} dport {op}{}", value()?));
            }
            "--uid-owner" => owner.push(format!("skuid {op}{}", value()?)),
            "--gid-owner" => owner.push(format!("skgid {op}{}", value()?)),
            "-j" => {
                let target = value()?;
                verdict = Some(match target {
                    "RETURN" => "return".to_owned(),
                    "REDIRECT" => {
                        let (opt, port) = (value()?, value()?);
                        if opt != "--to-ports" {
                            bail!("REDIRECT with {opt}");
                        }
                        format!("redirect to :{port}")
                    }
                    "ACCEPT" | "DROP" | "TPROXY" | "MARK" | "CONNMARK" | "CT" => bail!("the target {target}"),
                    chain => {
                        let c = chain_name(chain);
                        jump = Some(c.clone());
                        format!("jump {c}")
                    }
                });
            }
            other => bail!("the option {other}"),
        }
    }
    let verdict = verdict.context("a rule without -j")?;
    let mut words = iface;
    words.extend(proto.map(|p| format!("meta l4proto {p}")));
    words.extend(addrs);
    words.extend(ports);
    words.extend(owner);
    words.push("counter".to_owned());
    words.push(verdict);
    Ok((words.join(" "), jump))
}

/// Loads `rules` into `netns` in one transaction (`nft -f -`, as Istio's knftables does).
pub fn load(netns: &str, rules: &str) -> anyhow::Result<()> {
    let mut child = Command::new("ip")
        .args(["netns", "exec", netns, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("nft: is Debian's nftables installed (cargo xtask setup)?")?;
    child.stdin.take().context("stdin")?.write_all(rules.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("nft -f: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Packets the counter of `chain`'s first rule counted in `netns`: for `istio-redirect`, the
/// connections Bn's rules sent to the proxy (a nat rule sees a connection's first packet only).
pub fn first_rule_packets(netns: &str, chain: &str) -> anyhow::Result<u64> {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            netns,
            "nft",
            "list",
            "chain",
            "inet",
            "istio-proxy-nat",
            chain,
        ])
        .output()?;
    if !out.status.success() {
        bail!(
            "nft list chain {chain}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .skip_while(|w| *w != "packets")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("no counter in nft's chain {chain}: {text}"))
}

#[cfg(test)]
mod tests {
    use redirect_common::addr::Family;

    use super::*;

    fn explain(flags: &[&str]) -> String {
        let args: Vec<String> = flags.iter().map(|s| s.to_string()).collect();
        let (cfg, _) = redirect_agent::parse_args(&args).unwrap();
        redirect_agent::explain::Explanation::new(&cfg, Family::V4)
            .unwrap()
            .iptables_save
    }

    /// Each chain's rules in order: the transaction adds them in iptables-save's order, which
    /// interleaves chains differently from Istio's builder; a chain's own order is what counts.
    fn by_chain(text: &str) -> std::collections::BTreeMap<String, Vec<String>> {
        let mut m = std::collections::BTreeMap::<String, Vec<String>>::new();
        for l in text
            .lines()
            .filter_map(|l| l.strip_prefix("add rule inet istio-proxy-nat "))
        {
            let (chain, rule) = l.split_once(' ').unwrap();
            m.entry(chain.to_owned()).or_default().push(rule.to_owned());
        }
        m
    }

    /// The default injection flags give the rules of docs/research/istio-nftables.md §5 (Istio's
    /// `inbound-ports-wildcard` golden with `-d` and `-i '*'`), up to how a match is spelled.
    #[test]
    fn the_default_flags_give_istios_nft_rules() {
        let nft = from_iptables_save(&explain(&["-i", "*", "-b", "*", "-d", "15090,15021,15020"])).unwrap();
        let want = "\
istio-inbound meta l4proto tcp tcp dport 15008 counter return
istio-redirect meta l4proto tcp counter redirect to :15001
istio-in-redirect meta l4proto tcp counter redirect to :15006
prerouting meta l4proto tcp counter jump istio-inbound
istio-inbound meta l4proto tcp tcp dport 15090 counter return
istio-inbound meta l4proto tcp tcp dport 15021 counter return
istio-inbound meta l4proto tcp tcp dport 15020 counter return
istio-inbound meta l4proto tcp counter jump istio-in-redirect
output counter jump istio-output
istio-output oifname \"lo\" ip saddr 127.0.0.6/32 counter return
istio-output oifname \"lo\" meta l4proto tcp ip daddr != 127.0.0.1/32 tcp dport != 15008 skuid 1337 counter jump istio-in-redirect
istio-output oifname \"lo\" skuid != 1337 counter return
istio-output skuid 1337 counter return
istio-output oifname \"lo\" meta l4proto tcp ip daddr != 127.0.0.1/32 tcp dport != 15008 skgid 1337 counter jump istio-in-redirect
istio-output oifname \"lo\" skgid != 1337 counter return
istio-output skgid 1337 counter return
istio-output ip daddr 127.0.0.1/32 counter return
istio-output counter jump istio-redirect
";
        let want: String = want
            .lines()
            .map(|l| format!("add rule inet istio-proxy-nat {l}\n"))
            .collect();
        assert_eq!(by_chain(&nft), by_chain(&want), "{nft}");
        assert!(nft.starts_with("add table inet istio-proxy-nat\nflush table inet istio-proxy-nat\n"));
        assert!(nft.contains("add chain inet istio-proxy-nat output { type nat hook output priority -100 ; }"));
        assert!(nft.contains("add chain inet istio-proxy-nat prerouting { type nat hook prerouting priority -100 ; }"));
    }

    /// The rules bench's lists: -x and -o before -i, one rule per entry, as Istio writes them.
    #[test]
    fn lists_are_one_rule_per_entry() {
        let nft = from_iptables_save(&explain(&[
            "-x",
            "10.1.0.0/16,10.2.0.0/16",
            "-o",
            "9000",
            "-i",
            "10.3.0.0/24,10.4.0.5/32",
            "-b",
            "",
        ]))
        .unwrap();
        let out = &by_chain(&nft)["istio-output"];
        assert_eq!(
            &out[..2],
            [
                "meta l4proto tcp tcp dport 9000 counter return",
                "meta l4proto udp udp dport 9000 counter return"
            ]
        );
        assert_eq!(
            &out[out.len() - 4..],
            [
                "ip daddr 10.1.0.0/16 counter return",
                "ip daddr 10.2.0.0/16 counter return",
                "ip daddr 10.3.0.0/24 counter jump istio-redirect",
                "ip daddr 10.4.0.5/32 counter jump istio-redirect",
            ]
        );
        assert!(!nft.contains("prerouting"), "-b '' writes no inbound chain: {nft}");
    }

    #[test]
    fn what_it_cannot_translate_is_refused_by_line() {
        let e = from_iptables_save(&explain(&["-m", "TPROXY", "-b", "*"])).unwrap_err();
        assert!(format!("{e:#}").contains("mangle"), "{e:#}");
        let e = from_iptables_save("*nat\n-A OUTPUT -m conntrack --ctstate INVALID -j RETURN\n").unwrap_err();
        assert!(format!("{e:#}").contains("conntrack"), "{e:#}");
    }
}
