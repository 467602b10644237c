//! Both twins' runs compared: the verdict table, the counters phase by phase, and the checks
//! that the comparison meant something.

use std::{collections::BTreeSet, fmt::Write as _};

use super::{
    Config, READABLE,
    matrix::{Matrix, Run},
    shown_flags,
    twin::{Row, Twin},
};

/// A chain's counts as a report line shows them: every row, or for a chain of more than
/// [`READABLE`] rows only those that counted, by index (`#i: n`), so that a difference can be
/// found.
fn shown_rows(rows: &[Row]) -> String {
    if rows.len() <= READABLE {
        return format!("{rows:?}");
    }
    let counted: Vec<String> = rows
        .iter()
        .enumerate()
        .filter(|(_, r)| r.n != 0)
        .map(|(i, r)| format!("#{i}: {r:?}"))
        .collect();
    format!("{} rows, counted [{}]", rows.len(), counted.join(", "))
}

/// Fails the test, with the whole table and both twins' counters, if any verdict or any
/// counter differs between the oracle's run (`want`) and the agent's (`got`).
pub(super) fn judge(
    cfg: &Config,
    matrix: &Matrix,
    capture: (u16, u16),
    (oracle, want): (&Twin, Run),
    (agent, got): (&Twin, Run),
) {
    let mut table = String::new();
    let _ = writeln!(
        table,
        "differential '{}' (flags {:?}, env {:?}):",
        cfg.name,
        shown_flags(cfg.flags),
        cfg.env
    );
    let all_verdicts = want.iter().chain(&got).flat_map(|(v, _)| v);
    let width = all_verdicts.map(|v| v.chars().count()).max().unwrap_or(0);
    let mut mismatches = Vec::new();
    for ((phase, scenarios), ((want, _), (got, _))) in matrix.phases.iter().zip(want.iter().zip(&got)) {
        let _ = writeln!(table, "  {}:", phase.name());
        let _ = writeln!(
            table,
            "  {:<48} {:<28} {:<width$} agent",
            "client", "destination", "iptables"
        );
        let mut i = 0;
        for (client, targets) in scenarios {
            for &t in targets {
                let mark = if want[i] == got[i] { " " } else { "✗" };
                let row = format!(
                    "{mark} {:<48} {:<28} {:<width$} {}",
                    client.label(),
                    client.dialed(t).to_string(),
                    want[i],
                    got[i]
                );
                if want[i] != got[i] {
                    mismatches.push(format!("{}: {row}", phase.name()));
                }
                let _ = writeln!(table, "{row}");
                i += 1;
            }
        }
    }
    let _ = writeln!(table, "  {} scenarios, {} mismatches", matrix.len(), mismatches.len());
    println!("{table}");

    // Every rule counted the same decisions as its iptables twin, phase by phase (the counters
    // are cumulative: each phase moves its own family's chains and leaves the other's alone).
    let mut counter_diffs = Vec::new();
    for ((phase, _), ((_, want), (_, got))) in matrix.phases.iter().zip(want.iter().zip(&got)) {
        for (key, w) in want {
            let g = &got[key];
            let mark = if w == g { " " } else { "✗" };
            let line = format!(
                "{mark} after {:<9} {} {:<13} iptables {}, agent {}",
                phase.name(),
                key.0,
                key.1,
                shown_rows(w),
                shown_rows(g)
            );
            println!("  {line}");
            if w != g {
                counter_diffs.push(line);
            }
        }
    }
    let tcp = (agent.tcp_events(), oracle.tcp_events());
    println!("  TCP in the agent's workload: {}", tcp.0);
    println!("  TCP in iptables' workload: {}", tcp.1);
    // The message names only what differs (the whole table is printed above it), so that a
    // run's tail, all CI shows, holds the difference.
    if !mismatches.is_empty() || !counter_diffs.is_empty() {
        panic!(
            "{} of {} scenarios differ for '{}':\n{}\n{} counter rows differ:\n{}\n\
             agent counters:\n{}\niptables counters:\n{}\n\
             TCP in the agent's workload: {}\nTCP in iptables' workload: {}",
            mismatches.len(),
            matrix.len(),
            cfg.name,
            mismatches.join("\n"),
            counter_diffs.len(),
            counter_diffs.join("\n"),
            agent.counters(),
            oracle.counters(),
            tcp.0,
            tcp.1
        );
    }
    // Sanity: every phase exercised both kinds of landing, so equality means something.
    for ((phase, _), (want, _)) in matrix.phases.iter().zip(&want) {
        let kinds: BTreeSet<&str> = want.iter().map(|v| v.split(':').next().unwrap()).collect();
        assert!(
            kinds.contains("original") && kinds.contains("capture"),
            "{}: the matrix did not both capture and go direct: {kinds:?}",
            phase.name()
        );
    }
    // The VM's routes worked: every connection the side host made in the oracle completed
    // (captured, or delivered or forwarded to a server), so that equal verdicts there are
    // landings, not two timeouts.
    if cfg.vm {
        for ((phase, scenarios), (want, _)) in matrix.phases.iter().zip(&want) {
            let dials = scenarios.iter().flat_map(|(c, t)| t.iter().map(move |&t| (c, t)));
            for ((client, t), v) in dials.zip(want) {
                assert!(
                    !client.from_side || v.starts_with("capture:") || v.starts_with("original:"),
                    "{}: the side host's connection to {t} did not complete in the oracle: {v}",
                    phase.name()
                );
            }
        }
    }
    // Conntrack answered the original destination of every connection it redirected in the
    // oracle (only one dialed straight at a capture port reads `none`), so the equal answers
    // above are the agent's getsockopt program answering, not two failures.
    let mut captured = 0;
    for ((_, scenarios), (want, _)) in matrix.phases.iter().zip(&want) {
        let targets = scenarios.iter().flat_map(|(_, t)| t);
        for (t, v) in targets.zip(want) {
            if !v.starts_with("capture:") {
                continue;
            }
            captured += 1;
            if t.port() != capture.0 && t.port() != capture.1 {
                assert!(
                    !v.contains("orig=none"),
                    "conntrack left the original destination of {t} unanswered: {v}"
                );
            }
        }
    }
    println!("  {captured} captured connections, original destinations and the app's addresses equal in both");
}
