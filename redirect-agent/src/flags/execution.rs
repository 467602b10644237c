//! istio-iptables' flags that say how to run it rather than which rules to write: a dry run,
//! validation, cleanup, and the knobs of its iptables plumbing. Each is accepted with its
//! environment variable; what each means here is decided once, in [`Execution`].

use std::{path::PathBuf, time::Duration};

use clap::Args;

use redirect_common::config::{self, ConfigError};

use super::env::{Env, pick};

/// The flags as clap sees them (all optional strings, so that an absent flag falls back to its
/// variable as in istio-iptables).
#[derive(Args, Debug, Clone, Default)]
pub struct ExecutionFlags {
    /// Print what would be installed (`explain`'s tables, both families) and load nothing.
    #[arg(short = 'n', long = "dry-run", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    pub dry_run: Option<String>,
    /// Install nothing (istio-cni installed the capture); with --run-validation, only validate.
    #[arg(long = "skip-rule-apply", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    pub skip_rule_apply: Option<String>,
    /// Once capture is in place, prove it as istio-validation does (a connection from the
    /// proxy's identity to 127.0.0.6:--iptables-probe-port must reach the inbound capture
    /// port); exit 126 when it does not.
    #[arg(long = "run-validation", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    pub run_validation: Option<String>,
    /// The port --run-validation dials.
    #[arg(long = "iptables-probe-port", value_name = "PORT")]
    pub probe_port: Option<String>,
    /// How long --run-validation waits for its probe (a Go duration: 5s, 500ms, 1m).
    #[arg(long = "probe-timeout", value_name = "DURATION")]
    pub probe_timeout: Option<String>,
    /// Remove what a killed run of this --name left (as `redirect-agent cleanup`) and exit.
    #[arg(long = "cleanup-only", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    pub cleanup_only: Option<String>,
    /// The network namespace to capture (the same as `run --netns`).
    #[arg(long = "network-namespace", value_name = "PATH")]
    pub network_namespace: Option<PathBuf>,
    /// Accepted; every workload is dual-stack here (see docs/istio.md).
    #[arg(long = "dual-stack", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    pub dual_stack: Option<String>,
    /// Accepted, no effect: no xtables lock is taken.
    #[arg(long = "cni-mode", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    pub cni_mode: Option<String>,
    /// Accepted, no effect: a workload's programs are always replaced whole.
    #[arg(long = "reconcile", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    pub reconcile: Option<String>,
    /// Accepted, no effect: a workload's programs are always replaced whole.
    #[arg(long = "force-apply", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    pub force_apply: Option<String>,
    /// Accepted, no effect: neither iptables nor nftables is used.
    #[arg(long = "native-nftables", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    pub native_nftables: Option<String>,
    /// Accepted, no effect: no iptables binary is run.
    #[arg(long = "force-iptables-binary", value_name = "BINARY")]
    pub force_iptables_binary: Option<String>,
}

/// What a run is asked to do besides capturing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Execution {
    pub dry_run: bool,
    pub skip_rule_apply: bool,
    pub run_validation: bool,
    pub probe_port: u16,
    pub probe_timeout: Duration,
    pub cleanup_only: bool,
    pub network_namespace: Option<PathBuf>,
    /// The flags given that change nothing here, for one log line.
    pub without_effect: Vec<&'static str>,
}

impl Default for Execution {
    fn default() -> Self {
        Self {
            dry_run: false,
            skip_rule_apply: false,
            run_validation: false,
            probe_port: 15002,
            probe_timeout: Duration::from_secs(5),
            cleanup_only: false,
            network_namespace: None,
            without_effect: Vec::new(),
        }
    }
}

impl ExecutionFlags {
    /// The flags, then istio-iptables' variables for those absent.
    pub fn to_execution(&self, env: Env) -> Result<Execution, ConfigError> {
        let boolean = |cli, flag, envs| super::env::boolean(cli, flag, envs, env);
        let (v, f) = pick(
            &self.probe_port,
            "--iptables-probe-port",
            &["IPTABLES_PROBE_PORT"],
            env,
            "15002",
        );
        let probe_port = config::parse_port(f, &v)?;
        let (v, f) = pick(&self.probe_timeout, "--probe-timeout", &["PROBE_TIMEOUT"], env, "5s");
        let probe_timeout = parse_go_duration(f, &v)?;
        let network_namespace = self
            .network_namespace
            .clone()
            .or_else(|| env("NETWORK_NAMESPACE").filter(|v| !v.is_empty()).map(PathBuf::from));
        let mut without_effect = Vec::new();
        for (cli, flag, envs) in [
            (
                &self.dual_stack,
                "--dual-stack",
                &["DUAL_STACK", "ISTIO_DUAL_STACK"][..],
            ),
            (&self.cni_mode, "--cni-mode", &["CNI_MODE"]),
            (&self.reconcile, "--reconcile", &["RECONCILE"]),
            (&self.force_apply, "--force-apply", &["FORCE_APPLY"]),
            (&self.native_nftables, "--native-nftables", &["NATIVE_NFTABLES"]),
        ] {
            if boolean(cli, flag, envs)? {
                without_effect.push(flag);
            }
        }
        let binary = pick(
            &self.force_iptables_binary,
            "--force-iptables-binary",
            &["FORCE_IPTABLES_BINARY"],
            env,
            "",
        );
        if !binary.0.is_empty() {
            without_effect.push("--force-iptables-binary");
        }
        Ok(Execution {
            dry_run: boolean(&self.dry_run, "-n/--dry-run", &["DRY_RUN"])?,
            skip_rule_apply: boolean(&self.skip_rule_apply, "--skip-rule-apply", &["SKIP_RULE_APPLY"])?,
            run_validation: boolean(&self.run_validation, "--run-validation", &["RUN_VALIDATION"])?,
            probe_port,
            probe_timeout,
            cleanup_only: boolean(&self.cleanup_only, "--cleanup-only", &["CLEANUP_ONLY"])?,
            network_namespace,
            without_effect,
        })
    }
}

impl Execution {
    /// Says which of the flags given change nothing here, once.
    pub fn log_without_effect(&self) {
        if !self.without_effect.is_empty() {
            tracing::info!(
                flags = ?self.without_effect,
                "accepted; no effect here (no iptables is run, every workload is dual-stack, programs are replaced whole)"
            );
        }
    }

    /// The flags an enrollment cannot take: they ask for another command, which is named.
    pub fn enrollment_refusal(&self) -> Option<String> {
        let (flag, instead) = if self.dry_run {
            (
                "-n/--dry-run",
                "`redirect-agent explain` with the same flags prints what would be installed",
            )
        } else if self.skip_rule_apply {
            (
                "--skip-rule-apply",
                "an enrollment is the applying; leave the workload out instead",
            )
        } else if self.cleanup_only {
            ("--cleanup-only", "`redirect-agent unenroll` removes a workload")
        } else if self.run_validation {
            (
                "--run-validation",
                "`redirect-agent run --run-validation` validates one workload",
            )
        } else {
            return None;
        };
        Some(format!("{flag} asks for another command than an enrollment: {instead}"))
    }
}

/// Go's `time.ParseDuration` (ns, us, µs, ms, s, m, h; one or more `<number><unit>` terms, an
/// optional `+`; a bare 0 is 0), without the negative durations a timeout cannot be.
pub fn parse_go_duration(flag: &'static str, s: &str) -> Result<Duration, ConfigError> {
    let bad = || ConfigError {
        flag,
        value: s.to_owned(),
        expected: "a duration such as 5s, 500ms, 1m30s or 0".into(),
    };
    let t = s.trim();
    if t.starts_with('-') {
        return Err(ConfigError {
            flag,
            value: s.to_owned(),
            expected: "a duration that is not negative, such as 5s".into(),
        });
    }
    let t = t.strip_prefix('+').unwrap_or(t);
    if t == "0" {
        return Ok(Duration::ZERO);
    }
    let mut rest = t;
    let mut total = 0f64;
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let n = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).ok_or_else(bad)?;
        let number: f64 = rest[..n].parse().map_err(|_| bad())?;
        rest = &rest[n..];
        let u = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..u] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad()),
        };
        rest = &rest[u..];
        total += number * scale;
    }
    Duration::try_from_secs_f64(total).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations() {
        assert_eq!(parse_go_duration("f", "5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_go_duration("f", "1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_go_duration("f", "250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_go_duration("f", "0").unwrap(), Duration::ZERO);
        assert_eq!(parse_go_duration("f", "+5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_go_duration("f", "30h").unwrap(), Duration::from_secs(30 * 3600));
        assert!(
            parse_go_duration("f", "-1s")
                .unwrap_err()
                .to_string()
                .contains("not negative")
        );
        for bad in ["", "5", "s", "5x", "1e3s", "--1s"] {
            let e = parse_go_duration("--probe-timeout", bad).unwrap_err().to_string();
            assert!(e.contains("--probe-timeout") && e.contains(&format!("'{bad}'")), "{e}");
        }
    }

    #[test]
    fn variables_fill_in_and_no_effect_flags_are_named() {
        let env = |k: &str| match k {
            "DRY_RUN" => Some("true".to_owned()),
            "ISTIO_DUAL_STACK" => Some("true".to_owned()),
            "PROBE_TIMEOUT" => Some("2s".to_owned()),
            _ => None,
        };
        let e = ExecutionFlags {
            reconcile: Some("true".into()),
            ..ExecutionFlags::default()
        }
        .to_execution(&env)
        .unwrap();
        assert!(e.dry_run);
        assert_eq!(e.probe_timeout, Duration::from_secs(2));
        assert_eq!(e.without_effect, ["--dual-stack", "--reconcile"]);
        assert!(e.enrollment_refusal().unwrap().contains("explain"));
        let bad = ExecutionFlags {
            cni_mode: Some("yes".into()),
            ..ExecutionFlags::default()
        }
        .to_execution(&|_| None)
        .unwrap_err();
        assert!(bad.to_string().contains("--cni-mode"), "{bad}");
    }
}
