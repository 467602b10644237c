//! `redirect-agent check`: the kernel's features as the probes find them, what the fast
//! path's probe found (and so whether `--fast-path=auto` turns it on) and, with
//! `--verifier`, each program as the verifier accepts it.

use crate::{
    engine::{self, fast_path_probe},
    features,
};

#[derive(serde::Serialize)]
struct CheckReport {
    kernel: String,
    features: Vec<features::Finding>,
    fast_path: FastPathReport,
    programs: Vec<engine::ProgramReport>,
}

/// [`fast_path_probe::probe`]'s answer, and what `--fast-path=auto` makes of it.
#[derive(serde::Serialize)]
struct FastPathReport {
    findings: Option<fast_path_probe::Findings>,
    /// Why the probe could not tell (auto then leaves the fast path off).
    error: Option<String>,
    /// Whether `--fast-path=auto` turns it on on this kernel.
    auto_on: bool,
    /// [`fast_path_probe::verdict`]: the text line.
    #[serde(skip)]
    line: String,
}

impl FastPathReport {
    fn probe() -> Self {
        let probed = fast_path_probe::probe().map_err(|e| e.to_string());
        Self {
            auto_on: probed.as_ref().is_ok_and(fast_path_probe::Findings::safe),
            line: fast_path_probe::verdict(&probed),
            findings: probed.as_ref().ok().cloned(),
            error: probed.err(),
        }
    }
}

/// Prints the report (text or JSON); fails with one line naming the first missing feature.
pub fn check(verifier: bool, json: bool) -> anyhow::Result<()> {
    crate::sys::require_privileges("redirect-agent check")?;
    let report = CheckReport {
        kernel: features::kernel_string(),
        features: features::survey(features::probe),
        fast_path: FastPathReport::probe(),
        programs: if verifier {
            engine::verifier_report()?
        } else {
            Vec::new()
        },
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("kernel {}", report.kernel);
        for f in &report.features {
            let state = match f.present {
                Some(true) => "yes".to_owned(),
                Some(false) => "MISSING".to_owned(),
                None => format!("probe failed: {}", f.error.as_deref().unwrap_or("?")),
            };
            println!("  {:<54} Linux {:<5} {state}", f.name, f.since);
        }
        println!("  fast path by default (--fast-path=auto): {}", report.fast_path.line);
        for p in &report.programs {
            let n = |v: Option<u32>| v.map_or_else(|| "?".to_owned(), |v| v.to_string());
            println!(
                "  program {:<22} {:>5} instructions, {:>6} processed by the verifier",
                p.name,
                n(p.instructions),
                n(p.verified)
            );
        }
    }
    if let Some(m) = features::first_missing(&report.kernel, |f| {
        let found = report.features.iter().find(|x| x.name == f.name);
        found.and_then(|x| x.present).ok_or_else(|| "not probed".to_owned())
    }) {
        anyhow::bail!(m);
    }
    Ok(())
}
