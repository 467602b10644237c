//! `docs/benchmarks.md` and its plot: medians over the rounds, ratios to the reference.

use std::fmt::Write as _;

use crate::orchestrate::{CRR_WORKERS, Config, MESSAGE, Outcome, Plan, RR1_RATE, RR64_RATE, Samples};

pub struct Metric {
    pub key: &'static str,
    pub label: &'static str,
    /// Throughput-like (more is better) or cost-like.
    pub higher_is_better: bool,
}

pub const METRICS: &[Metric] = &[
    Metric {
        key: "crr_cps",
        label: "CRR connections/s",
        higher_is_better: true,
    },
    Metric {
        key: "crr_cpu",
        label: "CRR CPU s per 10,000 connections",
        higher_is_better: false,
    },
    Metric {
        key: "rr1_p50",
        label: "RR 1 conn p50 (µs)",
        higher_is_better: false,
    },
    Metric {
        key: "rr1_p99",
        label: "RR 1 conn p99 (µs)",
        higher_is_better: false,
    },
    Metric {
        key: "rr1_p999",
        label: "RR 1 conn p99.9 (µs)",
        higher_is_better: false,
    },
    Metric {
        key: "rr64_p50",
        label: "RR 64 conns p50 (µs)",
        higher_is_better: false,
    },
    Metric {
        key: "rr64_p99",
        label: "RR 64 conns p99 (µs)",
        higher_is_better: false,
    },
    Metric {
        key: "rr64_p999",
        label: "RR 64 conns p99.9 (µs)",
        higher_is_better: false,
    },
    Metric {
        key: "stream_64",
        label: "STREAM 64 B writes (MB/s)",
        higher_is_better: true,
    },
    Metric {
        key: "stream_1k",
        label: "STREAM 1 KiB writes (MB/s)",
        higher_is_better: true,
    },
    Metric {
        key: "stream_16k",
        label: "STREAM 16 KiB writes (MB/s)",
        higher_is_better: true,
    },
    Metric {
        key: "stream_256k",
        label: "STREAM 256 KiB writes (MB/s)",
        higher_is_better: true,
    },
    // Goal 2's largest write: the fast path must carry writes of up to 1 MiB.
    Metric {
        key: "stream_1m",
        label: "STREAM 1 MiB writes (MB/s)",
        higher_is_better: true,
    },
];

pub fn median(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    })
}

fn med(samples: &Samples, key: &str, c: Config) -> Option<f64> {
    median(samples.get(key)?.get(&c)?)
}

fn spread(samples: &Samples, key: &str, c: Config) -> String {
    let Some(v) = samples.get(key).and_then(|m| m.get(&c)).filter(|v| !v.is_empty()) else {
        return "–".into();
    };
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{}–{}", num(Some(lo)), num(Some(hi)))
}

/// Every sample, per metric and configuration, in round order.
pub fn json(out: &Outcome, plan: &Plan, m: &Machine) -> serde_json::Value {
    let samples: serde_json::Map<String, serde_json::Value> = out
        .samples
        .iter()
        .map(|(key, per)| {
            let per: serde_json::Map<String, serde_json::Value> = per
                .iter()
                .map(|(c, v)| (c.label().to_owned(), serde_json::json!(v)))
                .collect();
            ((*key).to_owned(), per.into())
        })
        .collect();
    serde_json::json!({
        "date": m.date,
        "kernel": m.kernel,
        "cpu": m.cpu,
        "cores": m.cores,
        "mode": if plan.quick { "quick" } else { "full" },
        "rounds": plan.rounds,
        "samples": samples,
        "memory": {
            "held_connections": out.memory.held,
            "rss_idle_loaded_bytes": out.memory.rss.iter().map(|(c, (i, l))| (c.label(), [*i, *l])).collect::<std::collections::BTreeMap<_, _>>(),
            "map_bytes": out.memory.map_bytes,
        },
    })
}

fn num(v: Option<f64>) -> String {
    match v {
        None => "–".into(),
        Some(v) if v >= 100.0 => format!("{v:.0}"),
        Some(v) if v >= 10.0 => format!("{v:.1}"),
        Some(v) => format!("{v:.3}"),
    }
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b != 0.0 => Some(a / b),
        _ => None,
    }
}

fn ratio_text(r: Option<f64>) -> String {
    r.map_or_else(|| "–".into(), |r| format!("{r:.2}"))
}

pub struct Machine {
    pub cpu: String,
    pub cores: usize,
    pub memory: String,
    pub kernel: String,
    pub date: String,
}

impl Machine {
    /// The first words of a section a command writes: which command, on what, how long.
    pub fn written_by(&self, command: &str, secs: f64) -> String {
        format!(
            "Written by `{command}` on {}, {}, kernel {} ({secs:.0} s).",
            self.cpu, self.memory, self.kernel
        )
    }
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / f64::from(1 << 20))
}

pub fn markdown(out: &Outcome, plan: &Plan, m: &Machine) -> String {
    let s_ = &out.samples;
    let mut s = String::new();
    let _ = writeln!(s, "# Benchmarks: the cost of interception\n");
    let _ = writeln!(
        s,
        "Written by `cargo xtask bench{}` on {} (took {} s). Do not edit: run it again.\n",
        if plan.quick { " --quick" } else { "" },
        m.date,
        out.elapsed.as_secs()
    );
    let _ = writeln!(
        s,
        "- Machine: {}, {} cores, {}; kernel {}.\n- Mode: {} ({} round{}, configurations interleaved \
         A B Bn C D C0 Cc Ai Bi Ci in each), each configuration in a fresh namespace pair and cgroup; client in the \
         workload (10.200.1.1), server on the remote host namespace (10.200.1.2) across a veth.\n\
         - CRR: a new connection per request, {} B each way, {} workers, {} s. RR: persistent \
         connections at a fixed total rate ({} req/s on 1 connection, {} req/s over 64), {} B \
         each way, {} s; latency from each request's scheduled time. STREAM: one connection, {} s \
         per write size.\n- CPU for CRR: the workload cgroup's `cpu.stat` usage (client, and \
         B's and Bn's proxy, which runs in it) plus the agent process (C, D), per 10,000 connections. The \
         remote server's CPU is not counted.\n- Values are medians over the rounds.\n",
        m.cpu,
        m.cores,
        m.memory,
        m.kernel,
        if plan.quick { "quick" } else { "full" },
        plan.rounds,
        if plan.rounds == 1 { "" } else { "s" },
        MESSAGE,
        CRR_WORKERS,
        plan.crr.as_secs_f64(),
        RR1_RATE,
        RR64_RATE,
        MESSAGE,
        plan.rr.as_secs_f64(),
        plan.stream.as_secs_f64(),
    );
    let _ = writeln!(
        s,
        "Configurations: **A** direct (no interception); **B** istio-iptables' default nat rules \
         (`redirect-agent explain` through iptables-restore) and `redirect-agent proxy` (original \
         destinations from SO_ORIGINAL_DST); **Bn** the same capture as Istio's native nftables \
         backend writes it (`--native-nftables`, Istio 1.27+: `inet istio-proxy-nat`, one nft rule \
         per iptables rule, a `counter` on each; docs/research/istio-nftables.md) and that proxy; \
         B's and Bn's runs fail unless their REDIRECT counted every connection the client \
         completed; **C** `redirect-agent run` with its defaults (but `--fast-path=off`, whatever \
         the kernel's probe finds) and its \
         embedded proxy; **C0** C's programs attached with `-i '' -b ''`, so that no rule \
         redirects the client (the cost of connect4 alone); **D** C with `--fast-path` (sk_msg \
         hands bytes between the app and the proxy's 15001 socket; the proxy's leg to the \
         server is TCP over the veth, as in B and C); **Cc** C with `--relay copy`, STREAM \
         only, and **Ai Bi Ci**, inbound CRR only (their own sections below). The load client retries a read or write \
         that a blocking socket ends with EAGAIN before its timeout, as an event-driven client \
         would: 6.18 does that to blocking sockets in a sockhash (see docs/fast-path.md).\n"
    );
    let _ = writeln!(
        s,
        "| metric | A direct | B iptables | Bn nftables | C connect4 | D sk_msg | B/A | Bn/A | C/A | D/A | C/B | C/Bn | D/C |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for metric in METRICS {
        let (a, b, bn, c, d) = (
            med(s_, metric.key, Config::Direct),
            med(s_, metric.key, Config::Iptables),
            med(s_, metric.key, Config::Nftables),
            med(s_, metric.key, Config::Connect4),
            med(s_, metric.key, Config::FastPath),
        );
        let _ = writeln!(
            s,
            "| {} {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            metric.label,
            if metric.higher_is_better { "↑" } else { "↓" },
            num(a),
            num(b),
            num(bn),
            num(c),
            num(d),
            ratio_text(ratio(b, a)),
            ratio_text(ratio(bn, a)),
            ratio_text(ratio(c, a)),
            ratio_text(ratio(d, a)),
            ratio_text(ratio(c, b)),
            ratio_text(ratio(c, bn)),
            ratio_text(ratio(d, c)),
        );
    }
    if plan.rounds > 1 {
        let _ = writeln!(
            s,
            "\nRound to round (lowest–highest of the {} rounds), to judge the medians by:\n\n\
             | metric | A direct | B iptables | Bn nftables | C connect4 | D sk_msg |\n|---|---:|---:|---:|---:|---:|",
            plan.rounds
        );
        for metric in METRICS {
            let _ = write!(s, "| {} |", metric.label);
            for c in [
                Config::Direct,
                Config::Iptables,
                Config::Nftables,
                Config::Connect4,
                Config::FastPath,
            ] {
                let _ = write!(s, " {} |", spread(s_, metric.key, c));
            }
            let _ = writeln!(s);
        }
    }
    let _ = writeln!(
        s,
        "\n↑: more is better; ↓: less is better. Ratios are value over value. Every sample is in \
         `benchmarks.json`.\n"
    );
    if !out.failures.is_empty() {
        let _ = writeln!(s, "Runs that failed (no sample; \"–\" where every round failed):\n");
        for f in &out.failures {
            let _ = writeln!(s, "- {f}");
        }
        let _ = writeln!(s);
    }

    s.push_str(&crate::goals::markdown(out, plan));

    let _ = writeln!(s, "## The connect4 program alone\n");
    let a = med(s_, "crr_cps", Config::Direct);
    let c0 = med(s_, "crr_cps", Config::Connect4Idle);
    let delta = match (a, c0) {
        (Some(a), Some(c0)) => Some(CRR_WORKERS as f64 * (1.0 / c0 - 1.0 / a) * 1e6),
        _ => None,
    };
    let _ = writeln!(s, "| measure | value |\n|---|---:|");
    let _ = writeln!(
        s,
        "| run time per connect(), no rule matching (C0; `kernel.bpf_stats_enabled`, ns) | {} |",
        num(med(s_, "connect4_ns", Config::Connect4Idle))
    );
    let _ = writeln!(
        s,
        "| run time per connect(), redirected (C; ns) | {} |",
        num(med(s_, "connect4_ns", Config::Connect4))
    );
    let _ = writeln!(s, "| CRR connections/s, A / C0 | {} / {} |", num(a), num(c0));
    let _ = writeln!(
        s,
        "| CRR time per connection, C0 − A (µs; noise can make it negative) | {} |",
        delta.map_or_else(|| "–".into(), |d| format!("{d:.2}"))
    );
    let _ = writeln!(
        s,
        "\n`bpf_stats` adds its own timing to every run, so those runs are separate from the CRR \
         rate runs; the A/C0 delta is the cost seen from the application.\n"
    );

    let _ = writeln!(s, "## Memory\n");
    let held = out.memory.held;
    let wanted = out.memory.wanted;
    match wanted {
        None => {
            let _ = writeln!(
                s,
                "| process | idle RSS | RSS with {held} proxied connections | per connection |\n|---|---:|---:|---:|"
            );
        }
        Some((want, _)) => {
            let _ = writeln!(
                s,
                "| process | idle RSS | RSS with {held} proxied connections (measured) | per connection | \
                 {want} connections (extrapolated) |\n|---|---:|---:|---:|---:|"
            );
        }
    }
    for (config, (idle, loaded)) in &out.memory.rss {
        let who = match config {
            Config::Iptables => "B: `redirect-agent proxy`",
            _ => "C: `redirect-agent run` (programs, maps, embedded proxy)",
        };
        let per = loaded.saturating_sub(*idle) as f64 / held.max(1) as f64;
        let _ = write!(
            s,
            "| {who} | {} | {} | {:.1} KiB |",
            mib(*idle),
            mib(*loaded),
            per / 1024.0
        );
        if let Some((want, _)) = wanted {
            let _ = write!(s, " {} |", mib(*idle + (per * want as f64) as u64));
        }
        let _ = writeln!(s);
    }
    if let Some((want, hard)) = wanted {
        let _ = writeln!(
            s,
            "\nThe plan asks for {want} connections; each proxied connection holds two descriptors, and \
             the hard RLIMIT_NOFILE here is {hard} and cannot be raised (no CAP_SYS_RESOURCE), so {held} \
             were held and the last column extrapolates linearly from the measured slope."
        );
    }
    let _ = writeln!(
        s,
        "\nBPF maps of one instance (`bytes_memlock` of every pinned map, default sizes): {}.\n",
        mib(out.memory.map_bytes)
    );
    let _ = writeln!(s, "![ratios to direct](benchmarks.svg)");
    s
}

/// Bar colors and legends of the series, in the order of [`svg`]'s rows.
const SERIES: [(&str, &str); 3] = [("#5b7fa6", "B/A"), ("#e08a2e", "C/A"), ("#4a9a5b", "D/A")];

/// A horizontal bar chart of B/A, C/A and D/A per metric, with 1.0 (direct) marked.
pub fn svg(samples: &Samples) -> String {
    let rows: Vec<(&str, [Option<f64>; 3])> = METRICS
        .iter()
        .map(|m| {
            let a = med(samples, m.key, Config::Direct);
            (
                m.label,
                [Config::Iptables, Config::Connect4, Config::FastPath].map(|c| ratio(med(samples, m.key, c), a)),
            )
        })
        .collect();
    let max = rows
        .iter()
        .flat_map(|(_, v)| *v)
        .flatten()
        .fold(1.0f64, f64::max)
        .ceil()
        .max(2.0);
    let (left, width, row_h, top) = (260.0, 420.0, 46.0, 40.0);
    let height = top + row_h * rows.len() as f64 + 40.0;
    let x = |v: f64| left + v / max * width;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{}" height="{height}" font-family="sans-serif" font-size="12">"#,
        left + width + 80.0
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="10" y="20" font-size="14">Relative to direct (A = 1): B iptables + proxy, C connect4 + proxy, D + sk_msg</text>"#
    );
    for (i, (label, values)) in rows.iter().enumerate() {
        let y = top + row_h * i as f64;
        let _ = writeln!(s, r#"<text x="10" y="{}">{label}</text>"#, y + 18.0);
        for (j, (v, (color, _))) in values.iter().zip(SERIES).enumerate() {
            if let Some(v) = v {
                let yy = y + 4.0 + j as f64 * 13.0;
                let _ = writeln!(
                    s,
                    r#"<rect x="{left}" y="{yy}" width="{:.1}" height="11" fill="{color}"/><text x="{:.1}" y="{:.1}" font-size="10">{v:.2}</text>"#,
                    x(*v) - left,
                    x(*v) + 4.0,
                    yy + 9.5
                );
            }
        }
    }
    let bottom = top + row_h * rows.len() as f64;
    let _ = writeln!(
        s,
        r##"<line x1="{0:.1}" y1="{top}" x2="{0:.1}" y2="{bottom}" stroke="#333" stroke-dasharray="4 3"/>"##,
        x(1.0)
    );
    for t in 0..=(max as usize) {
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" font-size="10" text-anchor="middle">{t}</text>"#,
            x(t as f64),
            bottom + 14.0
        );
    }
    for (k, (color, legend)) in SERIES.iter().enumerate() {
        let x0 = left + 60.0 * k as f64;
        let _ = writeln!(
            s,
            r#"<rect x="{x0:.1}" y="{:.1}" width="11" height="11" fill="{color}"/><text x="{:.1}" y="{:.1}">{legend}</text>"#,
            bottom + 22.0,
            x0 + 15.0,
            bottom + 32.0
        );
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_ratios() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[]), None);
        assert_eq!(ratio(Some(2.0), Some(4.0)), Some(0.5));
        assert_eq!(ratio(Some(2.0), Some(0.0)), None);
        let mut samples = Samples::new();
        samples
            .entry("crr_cps")
            .or_default()
            .insert(Config::Direct, vec![100.0]);
        samples
            .entry("crr_cps")
            .or_default()
            .insert(Config::Connect4, vec![50.0]);
        let svg = svg(&samples);
        assert!(svg.starts_with("<svg") && svg.contains(">0.50<"), "{svg}");
    }
}
