//! `cargo xtask stress`: the bounded stress routines of `redirect-testkit stress` against a
//! built agent, with their figures written into docs/reliability.md by this command (never by
//! hand). For now: the proxy's resident memory over bursts of concurrent connections.

use std::{path::Path, process::Command};

use anyhow::{Context as _, bail};

const RELIABILITY_MD: &str = "docs/reliability.md";
const BEGIN: &str = "<!-- stress:memory:begin (written by cargo xtask stress) -->";
const END: &str = "<!-- stress:memory:end -->";
/// The target: after a burst, within 20 % of the idle size.
const MAX_RATIO: f64 = 1.2;

pub struct Options {
    pub bursts: usize,
    pub connections: usize,
    pub profile: &'static str,
}

/// Runs the bursts with `agent` (its test kit beside it) and writes the figures.
pub fn run(root: &Path, agent: &Path, opts: &Options) -> anyhow::Result<()> {
    let out = Command::new(agent.with_file_name("redirect-testkit"))
        .arg("stress")
        .arg("--agent")
        .arg(agent)
        .args(["--bursts", &opts.bursts.to_string()])
        .args(["--connections", &opts.connections.to_string()])
        .output()
        .context("stress: cannot start redirect-testkit stress")?;
    if !out.status.success() {
        bail!("stress: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).context("stress: the report is not JSON")?;
    let (block, worst) = render(&report, opts.profile)?;
    let path = root.join(RELIABILITY_MD);
    let doc = std::fs::read_to_string(&path).unwrap_or_else(|_| format!("# Reliability\n\n{BEGIN}\n{END}\n"));
    let (Some(b), Some(e)) = (doc.find(BEGIN), doc.find(END)) else {
        bail!("stress: {} lacks the markers {BEGIN} and {END}", path.display());
    };
    if e < b {
        bail!("stress: {END} comes before {BEGIN} in {}", path.display());
    }
    let new = format!("{}{BEGIN}\n{}\n{}", &doc[..b], block.trim_end(), &doc[e..]);
    std::fs::write(&path, new).with_context(|| format!("stress: writing {}", path.display()))?;
    println!("{block}\nwrote {}", path.display());
    if worst > MAX_RATIO {
        bail!("stress: after a burst the agent held {worst:.2} times its idle memory (at most {MAX_RATIO})");
    }
    Ok(())
}

/// The markdown block, and the worst ratio of resident memory after a burst to idle.
fn render(r: &serde_json::Value, profile: &str) -> anyhow::Result<(String, f64)> {
    let n = |v: &serde_json::Value, k: &str| v[k].as_u64().with_context(|| format!("stress: no {k} in the report"));
    let mib = |kib: u64| format!("{:.1}", kib as f64 / 1024.0);
    let idle = n(r, "idle_kib")?;
    let mut s = format!(
        "Bursts of {} concurrent proxied connections (each sends {} KiB and reads them back; all \
         are held until every one has, then all close), against `redirect-agent run` ({profile} \
         build), measured {}. Resident memory (VmRSS) of the agent, idle before the first burst: \
         {} MiB ({} MiB heap and other anonymous memory, {} MiB of mapped files). After a burst: \
         once its descriptors are back to the idle count and two readings half a second apart \
         agree (at least 2 s, at most 10 s).\n\n\
         | burst | peak (MiB) | after (MiB) | after / idle | anonymous after (MiB) | seconds |\n\
         |---:|---:|---:|---:|---:|---:|\n",
        n(r, "connections")?,
        n(r, "bytes")? / 1024,
        crate::docs::today(),
        mib(idle),
        mib(n(r, "idle_anon_kib")?),
        mib(n(r, "idle_file_kib")?),
    );
    let mut worst = 0f64;
    for (i, b) in r["bursts"].as_array().context("stress: no bursts")?.iter().enumerate() {
        let after = n(b, "after_kib")?;
        let ratio = after as f64 / idle.max(1) as f64;
        worst = worst.max(ratio);
        s.push_str(&format!(
            "| {} | {} | {} | {ratio:.2} | {} | {:.1} |\n",
            i + 1,
            mib(n(b, "peak_kib")?),
            mib(after),
            mib(n(b, "after_anon_kib")?),
            b["seconds"].as_f64().unwrap_or(0.0),
        ));
    }
    s.push_str(&format!(
        "\nWorst after / idle: {worst:.2} (the target: at most {MAX_RATIO}).\n"
    ));
    Ok((s, worst))
}
