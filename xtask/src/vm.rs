//! `cargo xtask vm-test`: the integration tests under another kernel, booted with virtme-ng.
//!
//! virtme-ng boots the kernel in QEMU over a snapshot of this machine's own filesystem, so the
//! test binaries and the agent built here run inside unchanged, as root, on the guest kernel.
//! KVM on these machines fails on an MSR, so the guest runs under software emulation: slow
//! (tens of seconds to boot), but the kernel is the real one.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

use crate::{
    docs::{self, CheckReport},
    sh::{apt_install, cargo, have, root, run},
};

/// What the guest needs from this machine: QEMU, busybox for virtme-ng's init, and Debian 12's
/// own kernel (6.1 LTS), the second kernel the project claims.
const VM_APT: &[(&str, &str)] = &[("qemu-system-x86_64", "qemu-system-x86"), ("busybox", "busybox-static")];
const KERNEL_PACKAGE: &str = "linux-image-amd64";
const VIRTME_NG: &str = "virtme-ng";

/// The tests `cargo xtask test` also runs under 6.1: capture, the exemptions, inbound, detach,
/// the default differential, the feature probe, the fast path, node mode, and dual stack.
pub const SMOKE: &[&str] = &[
    "captured_connection_reaches_its_destination_through_the_proxy",
    "each_exemption_lands_where_the_rule_set_says",
    "inbound_connection_reaches_the_app_through_the_proxy",
    "excluded_inbound_ports_go_direct",
    "detach_leaves_no_program_link_or_pin",
    "default_injection",
    "kernel_features_are_probed",
    "bytes_take_the_fast_path_intact",
    // Streams of 256 KiB and 1 MiB writes through sk_msg, in the VM's little memory.
    "writes_of_256_kib_and_1_mib_take_the_fast_path_intact",
    "other_socket_options_get_the_kernels_answer",
    "three_workloads_through_cni_land_per_their_own_flags_then_one_removed_and_a_restart_loses_nothing",
    "a_restart_under_load_hands_over_without_a_failed_request",
    "every_socket_family_is_captured_and_counted_in_its_own_table",
    "ipv6_connections_from_another_host_are_captured_inbound",
    // Hardening whose kernel side differs between kernels: the owner match through BTF
    // offsets, the cookie exemption, per-workload sk_lookup instances and their one-judgement
    // per 4-tuple, pinned links of a killed run, cleanup's look at the kernel's links.
    "the_owner_match_reads_the_sockets_fsuid_not_the_real_uid",
    "an_app_that_sets_the_agents_mark_is_still_captured",
    "a_workload_that_takes_anothers_address_gets_none_of_its_inbound",
    "stray_segments_are_judged_once_per_four_tuple",
    "a_killed_run_keeps_capturing_until_its_restart_takes_over",
    "cleanup_fails_while_moved_pins_keep_the_programs_attached",
    // UDP through sendmsg/recvmsg, the sending task's owner through BTF, the owner-group loop.
    "dns_to_resolv_conf_servers_is_captured_as_iptables_does",
    "capture_all_dns_is_captured_as_iptables_does",
    "owner_groups_include",
    // sk_lookup reads ingress_ifindex (5.17+) only where the kernel has it.
    "an_excluded_interface_is_left_alone",
    // TPROXY: the transparent dial and its policy routing, sk_lookup's mangle walk with the
    // SYN marks sock_ops notes, connect4/6's marked-to-lo sockets.
    "the_app_sees_the_client_and_its_replies_come_back",
    "tproxy_inbound_ports",
    // -k: before 6.6 the tc programs are cls_bpf filters on clsact, which outlive a killed
    // agent and are replaced in place by the next run.
    "a_vms_connections_through_the_pod_and_to_it_are_redirected_to_the_proxy",
    "a_device_added_later_is_captured_fail_closed_and_released_at_the_end",
    "cleanup_only_releases_a_killed_runs_vm_devices",
    // -k with TPROXY: tc's socket lookup in a sockhash and bpf_sk_assign, the divert rule.
    "in_tproxy_mode_a_vms_connection_to_the_pod_reaches_the_app_from_the_vms_address",
    "kube_virt_tproxy",
    // -k's nat PREROUTING jumps per -i CIDR per interface, walked as a CIDR set per interface
    // by the tc program.
    "kube_virt_cidr_list_of_a_thousand",
    // Ambient: connect4/6 read the socket's mark, masked; sk_lookup's ISTIO_PRERT walk;
    // sock_ops's bpf_setsockopt(SO_MARK) on ztunnel's spoofed dial, and tcp_fwmark_accept.
    "ambient",
    "inbound_reaches_the_app_from_the_clients_address_and_its_replies_come_back",
    // splice(2) from a socket into a pipe and on into a socket: ->sendpage before 6.5,
    // sendmsg(MSG_SPLICE_PAGES) after.
    "streams_go_through_a_pipe_intact_outbound_and_inbound",
];

pub struct Options {
    pub kernel: Option<PathBuf>,
    pub filters: Vec<String>,
    pub report: bool,
}

/// One guest run's results.
pub struct Outcome {
    pub kernel: String,
    pub passed: u64,
    pub failed: u64,
}

/// Where setup installs virtme-ng: a virtualenv of the project's own, so that neither the
/// interpreter's site-packages nor Debian's externally-managed Python are touched.
fn venv_dir() -> Option<PathBuf> {
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share/redirect/virtme-ng"))
}

/// `vng`, from PATH or from the project's virtualenv.
fn vng() -> Option<PathBuf> {
    if have("vng") {
        return Some("vng".into());
    }
    venv_dir().map(|d| d.join("bin/vng")).filter(|p| p.is_file())
}

fn install_virtme_ng() -> anyhow::Result<()> {
    let venv = venv_dir().context("vm-test: HOME is not set")?;
    println!("vm-test: installing {VIRTME_NG} from PyPI into {}", venv.display());
    let make_venv = || {
        let mut c = Command::new("python3");
        c.arg("-m").arg("venv").arg(&venv);
        run("vm-test: python3 -m venv", c)
    };
    if make_venv().is_err() {
        // Debian's own python3 has venv only with this package.
        apt_install("vm-test", &["python3-venv"])?;
        make_venv()?;
    }
    let mut c = Command::new(venv.join("bin/pip"));
    c.args(["install", "--quiet", VIRTME_NG]);
    run("vm-test: pip install virtme-ng", c)
}

fn boot_kernels() -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/boot")
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
                })
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found
}

/// Installs what the guest needs, saying so; nothing when all is there.
pub fn setup() -> anyhow::Result<Vec<&'static str>> {
    let mut did = Vec::new();
    let mut missing: Vec<&str> = VM_APT
        .iter()
        .filter(|(bin, _)| !have(bin))
        .map(|(_, pkg)| *pkg)
        .collect();
    if boot_kernels().is_empty() {
        missing.push(KERNEL_PACKAGE);
    }
    if !missing.is_empty() {
        apt_install("vm-test", &missing)?;
        did.push("VM packages");
    }
    if vng().is_none() {
        install_virtme_ng()?;
        did.push(VIRTME_NG);
    }
    Ok(did)
}

/// The integration test binaries, built for this machine (they run unchanged in the guest).
fn test_binaries() -> anyhow::Result<Vec<(String, PathBuf)>> {
    let mut c = cargo();
    c.args([
        "test",
        "--package",
        "redirect-tests",
        "--no-run",
        "--message-format=json",
    ])
    .stderr(Stdio::inherit());
    let out = c.output().context("vm-test: cannot start cargo test --no-run")?;
    if !out.status.success() {
        bail!("vm-test: building the test binaries failed");
    }
    let mut bins = Vec::new();
    for line in out.stdout.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        let Ok(msg) = serde_json::from_slice::<serde_json::Value>(line) else {
            continue;
        };
        let is_test = msg["target"]["kind"]
            .as_array()
            .is_some_and(|k| k.iter().any(|k| k == "test"));
        if let (true, Some(exe)) = (is_test, msg["executable"].as_str()) {
            let name = msg["target"]["name"].as_str().unwrap_or("?").to_owned();
            // The container runtime's tests run on the host only: what they add is the
            // runtime and the image, not another kernel's behaviour, and podman's state
            // directories are not writable in the guest's view of the host.
            if name == "runtime" || name.starts_with("runtime_") {
                continue;
            }
            bins.push((name, PathBuf::from(exe)));
        }
    }
    if bins.is_empty() {
        bail!("vm-test: cargo built no integration test binary");
    }
    bins.sort();
    Ok(bins)
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The script the guest runs: every test binary with the filters, then (with `report`) the
/// agent's feature and verifier report. Markers let the host tell the parts apart.
fn guest_script(agent: &Path, bins: &[(String, PathBuf)], filters: &[String], report: bool) -> String {
    let mut s = String::from("#!/bin/sh\n");
    s.push_str("export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n");
    s.push_str(&format!(
        "export REDIRECT_AGENT_BIN={}\n",
        shell_quote(&agent.to_string_lossy())
    ));
    // Software emulation: the verifier runs tens of times slower than on the host.
    s.push_str("export REDIRECT_TEST_START_SECS=180\n");
    s.push_str(&format!("cd {}\n", shell_quote(&root().to_string_lossy())));
    s.push_str("echo \"VM-KERNEL $(uname -r)\"\n");
    let filters: Vec<String> = filters.iter().map(|f| shell_quote(f)).collect();
    for (name, exe) in bins {
        s.push_str(&format!("echo 'VM-BINARY {name}'\n"));
        s.push_str(&format!(
            "{} --test-threads 2 {} 2>&1\n",
            shell_quote(&exe.to_string_lossy()),
            filters.join(" ")
        ));
    }
    if report {
        s.push_str("echo VM-REPORT-BEGIN\n");
        s.push_str(&format!(
            "{} check --verifier --json\n",
            shell_quote(&agent.to_string_lossy())
        ));
        s.push_str("echo VM-REPORT-END\n");
    }
    s.push_str("echo VM-DONE\n");
    s
}

/// What a guest console line shows: the text after the last carriage return, without
/// terminal escape sequences or control characters (the console redraws with both).
fn console_text(raw: &str) -> String {
    let shown = raw.rsplit('\r').find(|s| !s.trim().is_empty()).unwrap_or("");
    let mut out = String::with_capacity(shown.len());
    let mut chars = shown.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ params final-byte; other escapes: ESC and one character.
            if chars.next_if_eq(&'[').is_some() {
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            } else {
                chars.next();
            }
        } else if !c.is_control() || c == '\t' {
            out.push(c);
        }
    }
    out.trim_end().to_owned()
}

/// How many lines of a failed test's output (its last) the summary repeats.
const FAILURE_LINES: usize = 80;

/// The test a `---- NAME stdout ----` line (libtest's failure block) opens.
fn failure_header(line: &str) -> Option<&str> {
    line.strip_prefix("---- ")?.strip_suffix(" stdout ----")
}

/// `test NAME ... ok` / `... FAILED` / `... ignored`, as libtest prints them.
fn parse_test_line(line: &str) -> Option<(&str, &str)> {
    let rest = line.strip_prefix("test ")?;
    let (name, result) = rest.rsplit_once(" ... ")?;
    // An ignored test with a reason reads `ignored, REASON`.
    let result = result.split_whitespace().next()?.trim_end_matches(',');
    matches!(result, "ok" | "FAILED" | "ignored").then_some((name, result))
}

fn print_report(reports: &[CheckReport]) {
    println!("\nverifier report (instructions after the kernel's rewrites / processed by the verifier):");
    println!(
        "  {:<16} {:<22} {:>12} {:>10}",
        "kernel", "program", "instructions", "verified"
    );
    for r in reports {
        for p in &r.programs {
            let n = |v: Option<u32>| v.map_or_else(|| "-".to_owned(), |v| v.to_string());
            println!(
                "  {:<16} {:<22} {:>12} {:>10}",
                r.kernel,
                p.name,
                n(p.instructions),
                n(p.verified)
            );
        }
    }
}

/// Boots the kernel, runs the tests inside, prints a line per test and the totals.
pub fn vm_test(opts: &Options, agent: &Path) -> anyhow::Result<Outcome> {
    let kernel = match &opts.kernel {
        Some(k) if k.is_file() => k.clone(),
        Some(k) => bail!(
            "vm-test: kernel image '{}' does not exist (expected a vmlinuz file)",
            k.display()
        ),
        None => boot_kernels()
            .pop()
            .context("vm-test: no kernel in /boot (setup installs linux-image-amd64)")?,
    };
    let vng = vng().context("vm-test: vng not found after setup")?;
    let bins = test_binaries()?;
    let script_path = std::env::temp_dir().join(format!("redirect-vm-test-{}.sh", std::process::id()));
    {
        let mut f = std::fs::File::create(&script_path)
            .with_context(|| format!("vm-test: writing {}", script_path.display()))?;
        f.write_all(guest_script(agent, &bins, &opts.filters, opts.report).as_bytes())?;
    }
    std::fs::set_permissions(&script_path, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;

    println!(
        "vm-test: booting {} under QEMU (software emulation; about 30 s to boot)",
        kernel.display()
    );
    let started = std::time::Instant::now();
    // vng's own console redraws go to stderr: kept in a file, shown if the guest fails.
    let log_path = script_path.with_extension("log");
    let log = std::fs::File::create(&log_path).with_context(|| format!("vm-test: creating {}", log_path.display()))?;
    // vng runs its helpers (virtme-run, ...) through PATH: they sit beside it.
    let mut path = std::env::var_os("PATH").unwrap_or_default();
    if let Some(dir) = vng.parent().filter(|d| !d.as_os_str().is_empty()) {
        let mut dirs = vec![dir.to_owned()];
        dirs.extend(std::env::split_paths(&path));
        path = std::env::join_paths(dirs).context("vm-test: PATH")?;
    }
    let mut child = Command::new(&vng)
        .env("PATH", path)
        .arg("--run")
        .arg(&kernel)
        .args([
            "--disable-kvm",
            "--user",
            "root",
            "--memory",
            "2G",
            "--cpus",
            "2",
            "--exec",
        ])
        .arg(&script_path)
        .current_dir(root())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .with_context(|| format!("vm-test: cannot start {}", vng.display()))?;
    let stdout = child.stdout.take().context("vm-test: no stdout from vng")?;
    let mut guest_kernel = String::from("?");
    let mut binary = String::new();
    let mut results: BTreeMap<(String, String), String> = BTreeMap::new();
    let mut done = false;
    let mut report_json = String::new();
    let mut in_report = false;
    // libtest's `---- NAME stdout ----` blocks, kept to print again after the summary: CI
    // shows a run's tail, and a guest's failure message is otherwise far above it.
    let mut failures: Vec<(String, Vec<String>)> = Vec::new();
    let mut in_failure = false;
    for line in BufReader::new(stdout).lines() {
        let raw = line?;
        let line = console_text(&raw);
        if line.is_empty() {
            continue;
        }
        let line = line.as_str();
        println!("  | {line}");
        if let Some(k) = line.strip_prefix("VM-KERNEL ") {
            guest_kernel = k.trim().to_owned();
        } else if let Some(b) = line.strip_prefix("VM-BINARY ") {
            binary = b.trim().to_owned();
        } else if line == "VM-REPORT-BEGIN" {
            in_report = true;
        } else if line == "VM-REPORT-END" {
            in_report = false;
        } else if line == "VM-DONE" {
            done = true;
        } else if in_report {
            report_json.push_str(line);
            report_json.push('\n');
        } else if let Some(name) = failure_header(line) {
            failures.push((format!("{binary}::{name}"), Vec::new()));
            in_failure = true;
        } else if line == "failures:" || line.starts_with("test result: ") {
            in_failure = false;
        } else if in_failure {
            if let Some((_, lines)) = failures.last_mut() {
                lines.push(line.to_owned());
            }
        } else if let Some((name, result)) = parse_test_line(line) {
            results.insert((binary.clone(), name.to_owned()), result.to_owned());
        }
    }
    let status = child.wait()?;
    let _ = std::fs::remove_file(&script_path);
    let vng_log = std::fs::read_to_string(&log_path).unwrap_or_default();
    let _ = std::fs::remove_file(&log_path);
    if !done {
        let tail: Vec<String> = vng_log.lines().map(console_text).filter(|l| !l.is_empty()).collect();
        for l in tail.iter().rev().take(40).rev() {
            eprintln!("  vng: {l}");
        }
        bail!("vm-test: the guest did not finish its script (vng exited with {status})");
    }

    println!("\nvm-test: kernel {guest_kernel}");
    let (mut passed, mut failed) = (0, 0);
    for ((bin, name), result) in &results {
        println!("  {result:<7} {bin}::{name}");
        match result.as_str() {
            "ok" => passed += 1,
            "FAILED" => failed += 1,
            _ => {}
        }
    }
    for (name, lines) in &failures {
        println!("\n  ---- {name} (as the guest printed it) ----");
        // The panic message is last, after whatever the test printed.
        let skip = lines.len().saturating_sub(FAILURE_LINES);
        if skip > 0 {
            println!("  ... {skip} lines before these, printed in full above");
        }
        for l in &lines[skip..] {
            println!("  {l}");
        }
    }
    let seconds = started.elapsed().as_secs();
    println!("vm tests ({guest_kernel}, boot included {seconds} s): {passed} passed, {failed} failed");
    if opts.report {
        let mut reports = Vec::new();
        let native = Command::new(agent)
            .args(["check", "--verifier", "--json"])
            .output()
            .context("vm-test: running check on this kernel")?;
        reports.push(serde_json::from_slice::<CheckReport>(&native.stdout).context("vm-test: check output (host)")?);
        reports.push(serde_json::from_str::<CheckReport>(&report_json).context("vm-test: check output (guest)")?);
        print_report(&reports);
        if passed + failed > 0 {
            let host_release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map_or_else(|_| "?".to_owned(), |r| r.trim().to_owned());
            let report = docs::Report {
                date: docs::today(),
                host: docs::Kernel {
                    role: "host",
                    release: &host_release,
                    check: &reports[0],
                },
                guest: docs::Kernel {
                    role: "guest",
                    release: &guest_kernel,
                    check: &reports[1],
                },
                filters: &opts.filters,
                results: &results,
                seconds,
            };
            let (path, block) = docs::write_kernels_report(&root(), &report)?;
            println!("\nvm-test --report: wrote {}:\n{block}", path.display());
        }
    }
    if passed + failed == 0 {
        bail!("vm-test: no test ran in the guest (filters {:?})", opts.filters);
    }
    Ok(Outcome {
        kernel: guest_kernel,
        passed,
        failed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_libtest_lines() {
        assert_eq!(parse_test_line("test detach ... ok"), Some(("detach", "ok")));
        assert_eq!(parse_test_line("test a::b ... FAILED"), Some(("a::b", "FAILED")));
        assert_eq!(failure_header("---- a::b stdout ----"), Some("a::b"));
        assert_eq!(failure_header("---- a::b stderr ----"), None);
        assert_eq!(
            parse_test_line("test slow ... ignored, kernel limitation: no bound (see docs/fast-path.md)"),
            Some(("slow", "ignored"))
        );
        assert_eq!(parse_test_line("test result: ok. 1 passed"), None);
        assert_eq!(parse_test_line("running 3 tests"), None);
    }

    #[test]
    fn console_lines_lose_redraws_and_escapes() {
        assert_eq!(console_text("junk\r\u{1b}[2KVM-KERNEL 6.1.0\r\n"), "VM-KERNEL 6.1.0");
        assert_eq!(console_text("\u{1b}[1;32mtest a ... ok\u{1b}[0m"), "test a ... ok");
        assert_eq!(console_text("   \r"), "");
    }

    #[test]
    fn the_guest_script_runs_every_binary_with_the_filters() {
        let bins = vec![("capture".to_owned(), PathBuf::from("/t/capture-1"))];
        let s = guest_script(Path::new("/t/agent"), &bins, &["it's".to_owned()], true);
        assert!(s.contains("'/t/capture-1' --test-threads 2 'it'\\''s' 2>&1"), "{s}");
        assert!(s.contains("check --verifier --json"), "{s}");
        assert!(s.ends_with("echo VM-DONE\n"), "{s}");
    }
}
