//! The block of docs/kernels.md that `cargo xtask vm-test --report` writes: what the verifier
//! made of each program on the host and the guest kernel, and which integration tests ran in the
//! guest with what result. Numbers a command measures are written by that command; this is the
//! only place they come from, and the text says when a filtered run covered only part of the
//! suite.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};

/// One program in `redirect-agent check --verifier --json`.
#[derive(Debug, serde::Deserialize)]
pub struct ProgramReport {
    pub name: String,
    pub instructions: Option<u32>,
    pub verified: Option<u32>,
}

/// `redirect-agent check --verifier --json`: the parts the report uses.
#[derive(Debug, serde::Deserialize)]
pub struct CheckReport {
    pub kernel: String,
    pub programs: Vec<ProgramReport>,
}

/// The page, relative to the workspace root.
pub const KERNELS_MD: &str = "docs/kernels.md";
pub const BEGIN: &str = "<!-- vm-test --report: begin -->";
pub const END: &str = "<!-- vm-test --report: end -->";

/// One kernel the programs were verified on.
pub struct Kernel<'a> {
    /// `host` or `guest`.
    pub role: &'a str,
    /// `uname -r`.
    pub release: &'a str,
    /// What `redirect-agent check` read (the upstream version, on distribution kernels).
    pub check: &'a CheckReport,
}

/// What one `vm-test --report` run measured.
pub struct Report<'a> {
    /// UTC, YYYY-MM-DD.
    pub date: String,
    pub host: Kernel<'a>,
    pub guest: Kernel<'a>,
    /// `--filter` patterns; empty: the whole suite ran.
    pub filters: &'a [String],
    /// (test binary, test name) -> `ok` / `FAILED` / `ignored`, as libtest printed them.
    pub results: &'a BTreeMap<(String, String), String>,
    /// Wall time of the guest run, boot included.
    pub seconds: u64,
}

/// 54148 -> "54,148".
fn thousands(n: u32) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Days since 1970-01-01 -> (year, month, day), proleptic Gregorian (Howard Hinnant's
/// `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Seconds since the epoch -> "YYYY-MM-DD" (UTC).
pub fn utc_date(secs: u64) -> String {
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    format!("{y:04}-{m:02}-{d:02}")
}

pub fn today() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    utc_date(secs)
}

/// The generated text, without the markers.
pub fn render(r: &Report) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "Written by `cargo xtask vm-test --report` on {} (UTC). Do not edit between the markers: \
         run it again.\n\n",
        r.date
    ));
    s.push_str(
        "Each program as the verifier accepted it: instructions after the kernel's rewrites / \
         instructions the verifier processed (`redirect-agent check --verifier`).\n\n",
    );
    // Columns: every program either kernel reported, in the host's order.
    let mut programs: Vec<&str> = Vec::new();
    for k in [&r.host, &r.guest] {
        for p in &k.check.programs {
            if !programs.contains(&p.name.as_str()) {
                programs.push(&p.name);
            }
        }
    }
    s.push_str("| kernel | `uname -r` | `check` reads |");
    for p in &programs {
        s.push_str(&format!(" {} |", p.strip_prefix("redirect_").unwrap_or(p)));
    }
    s.push_str("\n|---|---|---|");
    s.push_str(&"---:|".repeat(programs.len()));
    s.push('\n');
    for k in [&r.host, &r.guest] {
        s.push_str(&format!("| {} | {} | {} |", k.role, k.release, k.check.kernel));
        for name in &programs {
            let n = |v: Option<u32>| v.map_or_else(|| "?".to_owned(), thousands);
            let cell = k.check.programs.iter().find(|p| p.name == *name).map_or_else(
                || "–".to_owned(),
                |p| format!("{} / {}", n(p.instructions), n(p.verified)),
            );
            s.push_str(&format!(" {cell} |"));
        }
        s.push('\n');
    }

    let count = |what: &str| r.results.values().filter(|v| v.as_str() == what).count();
    let (passed, failed, ignored) = (count("ok"), count("FAILED"), count("ignored"));
    s.push_str(&format!(
        "\nIntegration tests in the guest ({}, booted with virtme-ng; {} s, boot included): ",
        r.guest.release, r.seconds
    ));
    if r.filters.is_empty() {
        s.push_str(&format!(
            "the whole suite ran: {passed} passed, {failed} failed, {ignored} ignored.\n"
        ));
    } else {
        let filters: Vec<String> = r.filters.iter().map(|f| format!("`{f}`")).collect();
        s.push_str(&format!(
            "a filtered run (`--filter` {}), not the whole suite: {passed} passed, {failed} failed, \
             {ignored} ignored, of only these tests:\n\n",
            filters.join(", ")
        ));
    }
    // A filtered run names every test it ran; a full run names the ones that failed.
    let listed: Vec<_> = r
        .results
        .iter()
        .filter(|(_, res)| !r.filters.is_empty() || res.as_str() == "FAILED")
        .collect();
    if r.filters.is_empty() && !listed.is_empty() {
        s.push_str("\nFailed:\n\n");
    }
    for ((bin, name), res) in listed {
        s.push_str(&format!("- `{bin}::{name}`: {res}\n"));
    }
    s
}

/// `doc` with the text between its one BEGIN and one END marker replaced by `block`.
pub fn replace_block(doc: &str, block: &str) -> anyhow::Result<String> {
    let (Some(b), Some(e)) = (doc.find(BEGIN), doc.find(END)) else {
        bail!("the markers {BEGIN} and {END} are missing");
    };
    if doc.matches(BEGIN).count() != 1 || doc.matches(END).count() != 1 {
        bail!("the markers {BEGIN} and {END} must appear once each");
    }
    if e < b {
        bail!("{END} comes before {BEGIN}");
    }
    let block = block.trim_end_matches('\n');
    Ok(format!("{}{BEGIN}\n{block}\n{}", &doc[..b], &doc[e..]))
}

/// Writes the block into `root`/docs/kernels.md; returns the path and the block written.
pub fn write_kernels_report(root: &Path, r: &Report) -> anyhow::Result<(PathBuf, String)> {
    let path = root.join(KERNELS_MD);
    let doc =
        std::fs::read_to_string(&path).with_context(|| format!("vm-test --report: reading {}", path.display()))?;
    let block = render(r);
    let new = replace_block(&doc, &block).with_context(|| format!("vm-test --report: {}", path.display()))?;
    let tmp = path.with_extension("md.tmp");
    std::fs::write(&tmp, new).with_context(|| format!("vm-test --report: writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("vm-test --report: writing {}", path.display()))?;
    Ok((path, block))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(kernel: &str, verified: u32) -> CheckReport {
        CheckReport {
            kernel: kernel.to_owned(),
            programs: vec![
                ProgramReport {
                    name: "redirect_connect4".into(),
                    instructions: Some(276),
                    verified: Some(verified),
                },
                ProgramReport {
                    name: "redirect_sk_skb".into(),
                    instructions: Some(2),
                    verified: None,
                },
            ],
        }
    }

    fn results(list: &[(&str, &str, &str)]) -> BTreeMap<(String, String), String> {
        list.iter()
            .map(|(b, n, r)| ((b.to_string(), n.to_string()), r.to_string()))
            .collect()
    }

    fn report<'a>(
        host: &'a CheckReport,
        guest: &'a CheckReport,
        filters: &'a [String],
        results: &'a BTreeMap<(String, String), String>,
    ) -> Report<'a> {
        Report {
            date: "2026-01-02".into(),
            host: Kernel {
                role: "host",
                release: "6.18.44-x",
                check: host,
            },
            guest: Kernel {
                role: "guest",
                release: "6.1.0-57-amd64",
                check: guest,
            },
            filters,
            results,
            seconds: 95,
        }
    }

    #[test]
    fn the_block_between_the_markers_is_replaced_and_nothing_else() {
        let doc = format!("# Kernels\n\nbefore\n{BEGIN}\nold table\nold count\n{END}\nafter\n");
        let new = replace_block(&doc, "new table\n").unwrap();
        assert_eq!(new, format!("# Kernels\n\nbefore\n{BEGIN}\nnew table\n{END}\nafter\n"));
        // Running it again gives the same page.
        assert_eq!(replace_block(&new, "new table\n").unwrap(), new);
    }

    #[test]
    fn missing_repeated_or_reversed_markers_are_refused() {
        assert!(replace_block("no markers", "x").is_err());
        assert!(replace_block(&format!("{END}\n{BEGIN}\n"), "x").is_err());
        assert!(replace_block(&format!("{BEGIN}\n{END}\n{BEGIN}\n{END}\n"), "x").is_err());
        assert!(replace_block(&format!("{BEGIN}\n"), "x").is_err());
    }

    #[test]
    fn a_filtered_run_says_so_and_names_its_tests() {
        let (h, g) = (check("6.18.44", 54_148), check("6.1.158", 81_015));
        let filters = vec!["kernel_features_are_probed".to_owned()];
        let res = results(&[("lifecycle", "kernel_features_are_probed", "ok")]);
        let s = render(&report(&h, &g, &filters, &res));
        assert!(s.contains("on 2026-01-02 (UTC)"), "{s}");
        assert!(
            s.contains("| host | 6.18.44-x | 6.18.44 | 276 / 54,148 | 2 / ? |"),
            "{s}"
        );
        assert!(
            s.contains("| guest | 6.1.0-57-amd64 | 6.1.158 | 276 / 81,015 | 2 / ? |"),
            "{s}"
        );
        assert!(s.contains("a filtered run (`--filter` `kernel_features_are_probed`), not the whole suite: 1 passed, 0 failed, 0 ignored"), "{s}");
        assert!(s.contains("- `lifecycle::kernel_features_are_probed`: ok"), "{s}");
        assert!(!s.contains("the whole suite ran"), "{s}");
    }

    #[test]
    fn a_full_run_counts_everything_and_names_only_failures() {
        let (h, g) = (check("6.18.44", 1), check("6.1.158", 2));
        let res = results(&[
            ("capture", "a", "ok"),
            ("capture", "b", "FAILED"),
            ("fast_path", "c", "ignored"),
        ]);
        let s = render(&report(&h, &g, &[], &res));
        assert!(s.contains("the whole suite ran: 1 passed, 1 failed, 1 ignored."), "{s}");
        assert!(s.contains("- `capture::b`: FAILED"), "{s}");
        assert!(!s.contains("capture::a"), "{s}");
    }

    #[test]
    fn numbers_and_dates_are_spelled_as_the_page_shows_them() {
        assert_eq!(thousands(2), "2");
        assert_eq!(thousands(467), "467");
        assert_eq!(thousands(54_148), "54,148");
        assert_eq!(thousands(1_000_000), "1,000,000");
        assert_eq!(utc_date(0), "1970-01-01");
        assert_eq!(utc_date(951_782_400), "2000-02-29");
        assert_eq!(utc_date(1_767_225_599), "2025-12-31");
    }
}
