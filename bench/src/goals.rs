//! The report's account of issue 19's goals that this run measures: each ratio round by round,
//! and whether every round meets it; and the proxy's data path, splice against copy.

use std::fmt::Write as _;

use crate::{
    orchestrate::{Config, Outcome, Plan, Samples},
    report::{METRICS, median},
};

/// A ratio of one metric between two configurations, and the bound every round must keep.
struct Goal {
    goal: u8,
    key: &'static str,
    what: &'static str,
    num: Config,
    den: Config,
    /// `≥ bound` (or `≤ bound` when `at_most`).
    bound: f64,
    at_most: bool,
}

const GOALS: &[Goal] = &[
    Goal {
        goal: 1,
        key: "stream_256k",
        what: "C/A, STREAM 256 KiB writes",
        num: Config::Connect4,
        den: Config::Direct,
        bound: 0.5,
        at_most: false,
    },
    Goal {
        goal: 1,
        key: "stream_16k",
        what: "C/B, STREAM 16 KiB writes",
        num: Config::Connect4,
        den: Config::Iptables,
        bound: 1.2,
        at_most: false,
    },
    Goal {
        goal: 1,
        key: "stream_256k",
        what: "C/B, STREAM 256 KiB writes",
        num: Config::Connect4,
        den: Config::Iptables,
        bound: 1.2,
        at_most: false,
    },
    Goal {
        goal: 1,
        key: "stream_1m",
        what: "C/B, STREAM 1 MiB writes",
        num: Config::Connect4,
        den: Config::Iptables,
        bound: 1.2,
        at_most: false,
    },
    Goal {
        goal: 2,
        key: "stream_16k",
        what: "D/A, STREAM 16 KiB writes",
        num: Config::FastPath,
        den: Config::Direct,
        bound: 0.8,
        at_most: false,
    },
    Goal {
        goal: 2,
        key: "stream_256k",
        what: "D/A, STREAM 256 KiB writes",
        num: Config::FastPath,
        den: Config::Direct,
        bound: 0.8,
        at_most: false,
    },
    Goal {
        goal: 2,
        key: "stream_1m",
        what: "D/A, STREAM 1 MiB writes",
        num: Config::FastPath,
        den: Config::Direct,
        bound: 0.8,
        at_most: false,
    },
    Goal {
        goal: 3,
        key: "crr_cps",
        what: "C/B, CRR connections/s",
        num: Config::Connect4,
        den: Config::Iptables,
        bound: 1.0,
        at_most: false,
    },
    Goal {
        goal: 3,
        key: "crr_cpu",
        what: "C/B, CRR CPU per connection",
        num: Config::Connect4,
        den: Config::Iptables,
        bound: 0.9,
        at_most: true,
    },
    // Goal 6: the bounds of goals 1 and 3 held against Istio's other backend as well.
    Goal {
        goal: 6,
        key: "stream_16k",
        what: "C/Bn, STREAM 16 KiB writes",
        num: Config::Connect4,
        den: Config::Nftables,
        bound: 1.2,
        at_most: false,
    },
    Goal {
        goal: 6,
        key: "stream_256k",
        what: "C/Bn, STREAM 256 KiB writes",
        num: Config::Connect4,
        den: Config::Nftables,
        bound: 1.2,
        at_most: false,
    },
    Goal {
        goal: 6,
        key: "stream_1m",
        what: "C/Bn, STREAM 1 MiB writes",
        num: Config::Connect4,
        den: Config::Nftables,
        bound: 1.2,
        at_most: false,
    },
    Goal {
        goal: 6,
        key: "crr_cps",
        what: "C/Bn, CRR connections/s",
        num: Config::Connect4,
        den: Config::Nftables,
        bound: 1.0,
        at_most: false,
    },
    Goal {
        goal: 6,
        key: "crr_cpu",
        what: "C/Bn, CRR CPU per connection",
        num: Config::Connect4,
        den: Config::Nftables,
        bound: 0.9,
        at_most: true,
    },
];

/// `key` of `num` over `den`, round by round; `None` unless both have a sample of every round
/// (a failed run leaves none, and the rounds could not be paired).
fn per_round(samples: &Samples, key: &str, num: Config, den: Config, rounds: usize) -> Option<Vec<f64>> {
    let of = |c| samples.get(key)?.get(&c).filter(|v| v.len() == rounds);
    let (n, d) = (of(num)?, of(den)?);
    Some(n.iter().zip(d).map(|(n, d)| n / d).collect())
}

pub(crate) fn rounds_text(r: &[f64]) -> String {
    r.iter().map(|r| format!("{r:.2}")).collect::<Vec<_>>().join(" · ")
}

/// The goals section and the data-path section, in Markdown.
pub fn markdown(out: &Outcome, plan: &Plan) -> String {
    let s_ = &out.samples;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "## Issue 19's goals, round by round\n\nEach ratio in every round of this run (round 1 · 2 · …); a goal is \
         met when every round keeps its bound. (Goal 4, lists of any length, is the rules section below; goal 6 \
         holds goals 1 and 3's bounds against Bn, Istio's nftables backend, as well.)\n"
    );
    let _ = writeln!(s, "| goal | ratio | bound | per round | met |\n|---:|---|---:|---|---|");
    let rows = |s: &mut String, goal: &dyn Fn(&Goal) -> bool| {
        for g in GOALS.iter().filter(|g| goal(g)) {
            let r = per_round(s_, g.key, g.num, g.den, plan.rounds);
            let met = match &r {
                None => "– (a run failed)".to_owned(),
                Some(r) => {
                    let ok = r.iter().all(|v| if g.at_most { *v <= g.bound } else { *v >= g.bound });
                    if ok { "yes" } else { "no" }.to_owned()
                }
            };
            let _ = writeln!(
                s,
                "| {} | {} | {} {} | {} | {met} |",
                g.goal,
                g.what,
                if g.at_most { "≤" } else { "≥" },
                g.bound,
                r.as_deref().map_or_else(|| "–".to_owned(), rounds_text),
            );
        }
    };
    rows(&mut s, &|g| g.goal <= 2);
    let d_failed = out
        .failures
        .iter()
        .filter(|f| f.starts_with(Config::FastPath.label()))
        .count();
    let _ = writeln!(
        s,
        "| 2 | D: runs that failed, at any write size | 0 | {d_failed} | {} |",
        if d_failed == 0 { "yes" } else { "no" }
    );
    // D no slower than C: on the medians of every metric both have.
    let slower: Vec<&str> = METRICS
        .iter()
        .filter(|m| {
            let med = |c| s_.get(m.key).and_then(|v| v.get(&c)).and_then(|v| median(v));
            match (med(Config::FastPath), med(Config::Connect4)) {
                (Some(d), Some(c)) => (m.higher_is_better && d < c) || (!m.higher_is_better && d > c),
                // A metric D has no sample of (every run failed) counts against it.
                (None, Some(_)) => true,
                _ => false,
            }
        })
        .map(|m| m.label)
        .collect();
    let _ = writeln!(
        s,
        "| 2 | D against C, medians: metrics where D is worse | none | {} | {} |",
        if slower.is_empty() {
            "none".to_owned()
        } else {
            slower.join("; ")
        },
        if slower.is_empty() { "yes" } else { "no" }
    );
    // The default: decided by trying the kernel, not by its version (docs/fast-path.md).
    let _ = writeln!(
        s,
        "| 2 | on by default where the kernel is safe: what `--fast-path=auto` decides here (`check`) | by a \
         probe | {} | yes |",
        out.fast_path_default
    );
    rows(&mut s, &|g| g.goal > 2);
    s.push('\n');

    inbound(&mut s, s_, plan);

    let _ = writeln!(
        s,
        "## The proxy's data path: splice or copy\n\n**C** runs with the default `--relay splice`: a \
         direction of a proxied connection starts by reading into the proxy's 64 KiB buffer and \
         writing on, and once a read fills the buffer (a stream) goes on through a pipe, \
         `splice(2)` moving the pages from socket to socket without copying them into the \
         proxy, unless its segments prove small (a splice that takes in less than half of \
         64 KiB from a socket that held it all), when it copies on. **Cc** is C with `--relay copy`: every byte read and written. Both in the same \
         rounds; per round, C over Cc:\n"
    );
    let _ = writeln!(
        s,
        "| write size | Cc copy (MB/s) | C splice (MB/s) | C/Cc per round | Cc copy (CPU s/GB) | C splice (CPU s/GB) | \
         C/Cc per round |\n|---|---:|---:|---|---:|---:|---|"
    );
    for m in METRICS.iter().filter(|m| m.key.starts_with("stream_")) {
        let cpu_key = format!("{}_cpu", m.key);
        let med = |key: &str, c| s_.get(key).and_then(|v| v.get(&c)).and_then(|v| median(v));
        let f = |v: Option<f64>, digits: usize| v.map_or_else(|| "–".to_owned(), |v| format!("{v:.digits$}"));
        let r = |key: &str| {
            per_round(s_, key, Config::Connect4, Config::Connect4Copy, plan.rounds)
                .as_deref()
                .map_or_else(|| "–".to_owned(), rounds_text)
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} |",
            m.label.trim_start_matches("STREAM ").trim_end_matches(" (MB/s)"),
            f(med(m.key, Config::Connect4Copy), 0),
            f(med(m.key, Config::Connect4), 0),
            r(m.key),
            f(med(&cpu_key, Config::Connect4Copy), 2),
            f(med(&cpu_key, Config::Connect4), 2),
            r(&cpu_key),
        );
    }
    let _ = writeln!(
        s,
        "\nCPU: the workload cgroup's (the client's) and the agent's, per GB the server received; \
         the server's own is not counted."
    );
    let _ = writeln!(
        s,
        "\nA request and its answer (CRR, RR) never fill a read, so they never take a pipe: those \
         rows of C are the copy path's.\n"
    );
    s
}

/// Goal 5's first part: CRR from the remote host to an app in the workload.
fn inbound(s: &mut String, s_: &Samples, plan: &Plan) {
    let _ = writeln!(
        s,
        "## Inbound CRR\n\nThe remote host's client connects to an app in the workload (its \
         cgroup and namespace), a new connection per request, as outbound CRR does the other way: \
         **Ai** directly; **Bi** through istio-iptables' nat PREROUTING REDIRECT to \
         `redirect-agent proxy` on 15006; **Ci** through the agent, whose sk_lookup hands the \
         connection to the embedded proxy's 15006 listener. Both proxies dial the app from \
         127.0.0.6. CPU: the workload's cgroup (the app, and Bi's proxy) and the agent's; the \
         client's is not counted.\n"
    );
    let _ = writeln!(
        s,
        "| metric | Ai direct | Bi iptables | Ci sk_lookup | Bi/Ai | Ci/Ai | Ci/Bi | Ci/Bi per round |\n\
         |---|---:|---:|---:|---:|---:|---:|---|"
    );
    for (key, label) in [
        ("in_crr_cps", "connections/s ↑"),
        ("in_crr_cpu", "CPU s per 10,000 connections ↓"),
    ] {
        let med = |c| s_.get(key).and_then(|v| v.get(&c)).and_then(|v| median(v));
        let (a, b, c) = (med(Config::InDirect), med(Config::InIptables), med(Config::InSkLookup));
        let f = |v: Option<f64>| match v {
            None => "–".to_owned(),
            Some(v) if v >= 100.0 => format!("{v:.0}"),
            Some(v) => format!("{v:.3}"),
        };
        let q = |n: Option<f64>, d: Option<f64>| match (n, d) {
            (Some(n), Some(d)) if d != 0.0 => format!("{:.2}", n / d),
            _ => "–".to_owned(),
        };
        let rounds = per_round(s_, key, Config::InSkLookup, Config::InIptables, plan.rounds)
            .as_deref()
            .map_or_else(|| "–".to_owned(), rounds_text);
        let _ = writeln!(
            s,
            "| {label} | {} | {} | {} | {} | {} | {} | {rounds} |",
            f(a),
            f(b),
            f(c),
            q(b, a),
            q(c, a),
            q(c, b)
        );
    }
    let _ = writeln!(s);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_pair_up_only_when_none_is_missing() {
        let mut samples = Samples::new();
        let m = samples.entry("crr_cps").or_default();
        m.insert(Config::Connect4, vec![110.0, 90.0]);
        m.insert(Config::Iptables, vec![100.0, 100.0]);
        m.insert(Config::Direct, vec![200.0]);
        let r = per_round(&samples, "crr_cps", Config::Connect4, Config::Iptables, 2).unwrap();
        assert_eq!(rounds_text(&r), "1.10 · 0.90");
        assert!(per_round(&samples, "crr_cps", Config::Connect4, Config::Direct, 2).is_none());
    }
}
