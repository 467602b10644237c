//! B's and Bn's capture: istio-iptables' rules for the run's flags (`redirect-agent explain`),
//! loaded as iptables-restore input (B) or as Istio's nftables backend writes them (Bn), and
//! how many connections their REDIRECT sent to the proxy.

use std::{
    io::Write as _,
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

use crate::{nft, orchestrate::Config};

/// Installs `config`'s rules for `flags` in the workload namespace `netns`.
pub(crate) fn install(config: Config, agent: &Path, flags: &[String], netns: &str) -> anyhow::Result<()> {
    let rules = explain(agent, flags)?;
    match config {
        Config::Nftables => nft::load(netns, &nft::from_iptables_save(&rules)?),
        _ => iptables_restore(netns, &rules),
    }
}

/// istio-iptables' rules for `flags`, as `redirect-agent explain` writes them.
fn explain(agent: &Path, flags: &[String]) -> anyhow::Result<String> {
    let out = Command::new(agent).arg("explain").args(flags).output()?;
    if !out.status.success() {
        bail!("explain: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8(out.stdout)?)
}

fn iptables_restore(netns: &str, text: &str) -> anyhow::Result<()> {
    let mut child = Command::new("ip")
        .args(["netns", "exec", netns, "iptables-restore"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child.stdin.take().context("stdin")?.write_all(text.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("iptables-restore: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// Connections B's or Bn's rules in `netns` have sent to the proxy so far (the packets
/// ISTIO_REDIRECT's REDIRECT counted: a nat rule sees a connection's first packet only);
/// `None` for the configurations without such rules.
pub(crate) fn redirected(config: Config, netns: &str) -> anyhow::Result<Option<u64>> {
    Ok(match config {
        Config::Nftables => Some(nft::first_rule_packets(netns, "istio-redirect")?),
        Config::Iptables => {
            let out = Command::new("ip")
                .args(["netns", "exec", netns, "iptables-save", "-c", "-t", "nat"])
                .output()?;
            let text = String::from_utf8_lossy(&out.stdout);
            let line = text
                .lines()
                .find(|l| l.contains("-A ISTIO_REDIRECT "))
                .context("no ISTIO_REDIRECT rule in the workload's nat table")?;
            let packets = line.strip_prefix('[').and_then(|l| l.split(':').next());
            Some(
                packets
                    .and_then(|p| p.parse().ok())
                    .with_context(|| format!("no counter: {line}"))?,
            )
        }
        _ => None,
    })
}
