//! `redirect-agent check`: the kernel's features as the probes find them and, with
//! `--verifier`, each program as the verifier accepts it.

use crate::{engine, features};

#[derive(serde::Serialize)]
struct CheckReport {
    kernel: String,
    features: Vec<features::Finding>,
    programs: Vec<engine::ProgramReport>,
}

/// Prints the report (text or JSON); fails with one line naming the first missing feature.
pub fn check(verifier: bool, json: bool) -> anyhow::Result<()> {
    crate::sys::require_privileges("redirect-agent check")?;
    let report = CheckReport {
        kernel: features::kernel_string(),
        features: features::survey(features::probe),
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
