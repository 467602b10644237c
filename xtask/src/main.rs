//! Project tasks: `cargo xtask setup|build|run|test|bench|stress|vm-test`.
//!
//! `setup` installs what a fresh machine of this kind lacks and nothing else; `run` and `test`
//! call it first, so the README's two commands work from a bare clone.

use std::{
    env,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

mod docs;
mod image;
mod sh;
mod stress;
mod vm;

use sh::{apt_install, cargo, have, is_root, output, root, run};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what is missing: apt packages, rust-src for nightly, bpf-linker, and for
    /// vm-test QEMU, busybox, Debian's kernel and virtme-ng.
    Setup,
    /// Build the agent (and, through its build.rs, the eBPF object), the CNI plugin and the
    /// test kit.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Build the container image deploy/daemonset.yaml names, offline (no base image), into
    /// target/release/redirect.oci.tar (`podman load -i`, `ctr -n k8s.io images import`).
    Image {
        /// From a debug build (quicker to build; what the tests run) instead of the release one.
        #[arg(long)]
        debug: bool,
    },
    /// Set up, build, and run the demo: the agent on a throw-away workload (root).
    Run,
    /// Set up, then run every check and test: fmt, clippy, unit and integration tests, the
    /// stress routines in a bounded form, and the smoke subset under Debian 12's 6.1 kernel
    /// (root).
    Test {
        /// Only tests whose name contains this (the kernel smoke run is then skipped).
        filter: Option<String>,
    },
    /// Measure the cost of interception (direct, iptables, connect4) and write
    /// docs/benchmarks.md with its plot (root).
    Bench {
        /// The short development run (under 2 minutes).
        #[arg(long)]
        quick: bool,
        /// Also profile CRR through B and C with perf (docs/profile.md).
        #[arg(long)]
        profile: bool,
        /// Instead: one node agent with this many workloads (enrollment latency, memory,
        /// connect4's cost for a process of no workload), docs/benchmarks.md's scale section.
        #[arg(long, value_name = "WORKLOADS", num_args = 0..=1, default_missing_value = "1024")]
        scale: Option<usize>,
        /// Instead: connect4's cost for a workload's connect with CIDR and port lists of 1, 64
        /// and 1,000, docs/benchmarks.md's rules section.
        #[arg(long, conflicts_with = "scale")]
        rules: bool,
        /// Instead: outbound CRR through B and then C for this many seconds each, interval by
        /// interval (connections/s, errors, conntrack entries, slab memory),
        /// docs/benchmarks.md's sustained section.
        #[arg(long, value_name = "SECONDS", num_args = 0..=1, default_missing_value = "180", conflicts_with_all = ["scale", "rules"])]
        sustained: Option<u64>,
    },
    /// The stress routines: memory over bursts, held connections, churn in both modes, SIGKILL
    /// and SIGSTOP under load in both modes; writes docs/reliability.md and fails on any
    /// uncaptured connection, leak or memory past the target (root).
    Stress {
        /// Bursts of the memory routine.
        #[arg(long, default_value_t = 5)]
        bursts: usize,
        /// Concurrent connections per burst.
        #[arg(long, default_value_t = 3000)]
        connections: usize,
        /// Connections held open at once.
        #[arg(long, default_value_t = 10_000)]
        hold: usize,
        /// Short connections churned per mode.
        #[arg(long, default_value_t = 200_000)]
        churn: u64,
        /// Seconds each agent stays killed or stopped under load.
        #[arg(long, default_value_t = 5)]
        outage_secs: u64,
        /// Measure a debug build (quicker to build) instead of the release one.
        #[arg(long)]
        debug: bool,
    },
    /// Boot another kernel with virtme-ng and run the integration tests inside it (root).
    VmTest {
        /// Kernel image to boot (default: the newest /boot/vmlinuz-*, Debian 12's 6.1).
        #[arg(long, value_name = "PATH")]
        kernel: Option<PathBuf>,
        /// Only tests whose name contains this; repeat for several.
        #[arg(long, value_name = "PATTERN")]
        filter: Vec<String>,
        /// Also report each program's instruction counts on the host and the guest kernel (into docs/kernels.md).
        #[arg(long)]
        report: bool,
    },
}

/// Debian packages the agent and its tests use, by the binary that shows each is present.
const APT: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("bpftool", "bpftool"),
    ("iptables-restore", "iptables"),
    // The bench's Bn: Istio's nftables backend (`--native-nftables`) as a second baseline.
    ("nft", "nftables"),
    // A real container runtime for the runtime tests and `image`: podman with runc (crun
    // refuses hybrid cgroups), its pause process, and the reference CNI plugins it chains
    // redirect-cni after.
    ("podman", "podman"),
    ("runc", "runc"),
    ("catatonit", "catatonit"),
    ("/usr/lib/cni/bridge", "containernetworking-plugins"),
    // The image's shell and CA bundle.
    ("/bin/busybox", "busybox-static"),
    ("/etc/ssl/certs/ca-certificates.crt", "ca-certificates"),
    // `kubectl kustomize`, which renders deploy/ in its tests.
    ("kubectl", "kubernetes-client"),
];
const BPF_LINKER_VERSION: &str = "0.13.0";

fn setup() -> anyhow::Result<()> {
    let mut did = Vec::new();

    let missing: Vec<&str> = APT.iter().filter(|(bin, _)| !have(bin)).map(|(_, pkg)| *pkg).collect();
    if !missing.is_empty() {
        apt_install("setup", &missing)?;
        did.push("apt packages");
    }

    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"])).context(
        "setup: the nightly toolchain is missing (`rustup toolchain list` shows none); \
         the eBPF crate builds with it and this project does not install toolchains",
    )?;
    let sysroot = PathBuf::from(sysroot);
    if !sysroot.join("lib/rustlib/src/rust/library/core/Cargo.toml").is_file() {
        println!("setup: adding rust-src to the nightly toolchain");
        let mut c = Command::new("rustup");
        c.args(["component", "add", "rust-src", "--toolchain", "nightly"]);
        run("setup: rustup component add rust-src", c)?;
        did.push("rust-src");
    }

    let linker_ok = output(Command::new("bpf-linker").arg("--version")).is_some_and(|v| v.contains(BPF_LINKER_VERSION));
    if !linker_ok {
        install_bpf_linker(&sysroot)?;
        did.push("bpf-linker");
    }

    did.extend(vm::setup()?);

    if did.is_empty() {
        println!(
            "setup: nothing to do (apt packages, nightly rust-src, bpf-linker {BPF_LINKER_VERSION}, \
             and virtme-ng with a 6.1 kernel for vm-test present)"
        );
    } else {
        println!("setup: installed {}", did.join(", "));
    }
    Ok(())
}

/// bpf-linker against the LLVM library inside the nightly toolchain (no system LLVM 22 on
/// Debian 12): a prefix whose lib/ links to it, kept where the binary's rpath will find it.
fn install_bpf_linker(sysroot: &Path) -> anyhow::Result<()> {
    let lib_dir = sysroot.join("lib");
    let llvm = std::fs::read_dir(&lib_dir)
        .with_context(|| format!("setup: bpf-linker: reading {}", lib_dir.display()))?
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("libLLVM.so.") && n.contains("-rust-"))
        .with_context(|| format!("setup: bpf-linker: no libLLVM.so.*-rust-* in {}", lib_dir.display()))?;
    // libLLVM.so.22.1-rust-1.97.0-nightly -> 22
    let major = llvm
        .trim_start_matches("libLLVM.so.")
        .split('.')
        .next()
        .filter(|m| m.chars().all(|c| c.is_ascii_digit()))
        .with_context(|| format!("setup: bpf-linker: cannot read the LLVM version from {llvm}"))?
        .to_owned();
    let home = env::var_os("HOME").context("setup: bpf-linker: HOME is not set")?;
    let prefix = PathBuf::from(home).join(".local/share/redirect/llvm-prefix");
    let plib = prefix.join("lib");
    std::fs::create_dir_all(&plib).with_context(|| format!("setup: bpf-linker: creating {}", plib.display()))?;
    for link in ["libLLVM.so".to_owned(), llvm.clone()] {
        let at = plib.join(&link);
        let _ = std::fs::remove_file(&at);
        std::os::unix::fs::symlink(lib_dir.join(&llvm), &at)
            .with_context(|| format!("setup: bpf-linker: linking {}", at.display()))?;
    }
    println!("setup: building bpf-linker {BPF_LINKER_VERSION} against {llvm} (about 3 minutes)");
    let mut c = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.args([
        "install",
        "bpf-linker",
        "--version",
        BPF_LINKER_VERSION,
        "--force",
        "--no-default-features",
    ])
    .args(["--features", &format!("llvm-{major}")])
    .env("LLVM_PREFIX", &prefix);
    run("setup: cargo install bpf-linker", c)
}

fn build(release: bool) -> anyhow::Result<PathBuf> {
    let mut c = cargo();
    // The CNI plugin too: node mode's tests invoke it as a container runtime would. And the
    // test kit, beside the agent: the tests and the demo run its probes and servers inside
    // workloads.
    c.args([
        "build",
        "--package",
        "redirect-agent",
        "--package",
        "redirect-cni",
        "--package",
        "redirect-testkit",
    ]);
    if release {
        c.arg("--release");
    }
    run("build", c)?;
    Ok(root()
        .join("target")
        .join(if release { "release" } else { "debug" })
        .join("redirect-agent"))
}

fn test(filter: Option<String>) -> anyhow::Result<()> {
    if !is_root() {
        bail!("test: the integration tests load eBPF programs and create namespaces: run as root");
    }
    setup()?;
    let mut c = cargo();
    c.args(["fmt", "--all", "--check"]);
    run("test: cargo fmt --check", c)?;
    let mut c = cargo();
    c.args([
        "clippy",
        "--workspace",
        "--exclude",
        "redirect-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]);
    run("test: cargo clippy", c)?;
    // The eBPF crate only builds for the BPF target, on nightly.
    let mut c = Command::new("rustup");
    c.current_dir(root())
        .args(["run", "nightly", "cargo", "clippy", "--package", "redirect-ebpf"]);
    c.args([
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
        "--release",
        "--",
        "-D",
        "warnings",
    ]);
    run("test: cargo clippy (eBPF)", c)?;
    let agent = build(false)?;
    // The image the runtime tests run containers of, from the binaries they test.
    let archive = agent.with_file_name("redirect.oci.tar");
    image::build(agent.parent().context("test: the agent's directory")?, &archive)?;
    let mut c = cargo();
    c.args(["test", "--workspace", "--exclude", "redirect-ebpf"])
        .env("REDIRECT_IMAGE_ARCHIVE", &archive)
        .env("REDIRECT_AGENT_BIN", &agent)
        .env("REDIRECT_CNI_BIN", agent.with_file_name("redirect-cni"))
        .env("REDIRECT_TESTKIT_BIN", agent.with_file_name("redirect-testkit"));
    // Passing tests' output too: the differential tests print their verdict tables.
    c.args(["--", "--show-output"]);
    if let Some(f) = &filter {
        c.arg(f);
    }
    let filtered = filter.is_some();
    let (mut passed, mut failed) = run_counting(c)?;
    if !filtered && failed == 0 {
        // The stress routines, bounded: any uncaptured connection, leaked map entry or
        // descriptor fails the run.
        let s = stress::run(&agent, &stress::BOUNDED, "debug", None)?;
        passed += s.passed;
        failed += s.failed;
    }
    if !filtered && failed == 0 {
        // The smoke subset under the other kernel we claim (the full suite: `vm-test`).
        let opts = vm::Options {
            kernel: None,
            filters: vm::SMOKE.iter().map(|s| s.to_string()).collect(),
            report: false,
        };
        let vm = vm::vm_test(&opts, &agent)?;
        passed += vm.passed;
        failed += vm.failed;
    }
    // One closing line over every test binary (cargo's own last line is a doc-test binary's).
    println!("tests: {passed} passed, {failed} failed");
    if failed > 0 {
        bail!("test: {failed} tests failed");
    }
    Ok(())
}

fn bench(quick: bool, profile: bool, scale: Option<usize>, rules: bool, sustained: Option<u64>) -> anyhow::Result<()> {
    if !is_root() {
        bail!("bench: the benchmark creates namespaces and loads programs: run it as root");
    }
    setup()?;
    if profile && !have("perf") {
        apt_install("bench", &["linux-perf"])?;
    }
    // Release builds: the numbers are about the product, not a debug build of it.
    let agent = build(true)?;
    let mut c = cargo();
    c.args(["build", "--release", "--package", "redirect-bench"]);
    run("bench: build", c)?;
    let mut c = Command::new(root().join("target/release/redirect-bench"));
    if let Some(n) = scale {
        c.current_dir(root()).arg("scale").arg("--agent").arg(&agent);
        c.arg("--workloads").arg(n.to_string());
        return run("bench: redirect-bench scale", c);
    }
    if rules {
        c.current_dir(root()).arg("rules").arg("--agent").arg(&agent);
        return run("bench: redirect-bench rules", c);
    }
    if let Some(seconds) = sustained {
        c.current_dir(root()).arg("sustained").arg("--agent").arg(&agent);
        c.arg("--seconds").arg(seconds.to_string());
        return run("bench: redirect-bench sustained", c);
    }
    c.current_dir(root()).arg("run").arg("--agent").arg(&agent);
    if quick {
        c.arg("--quick");
    }
    if profile {
        c.arg("--profile");
    }
    run("bench: redirect-bench run", c)
}

fn image(debug: bool) -> anyhow::Result<()> {
    if !is_root() {
        bail!("image: podman builds into a store of its own under target/, as root");
    }
    setup()?;
    let agent = build(!debug)?;
    let archive = agent.with_file_name("redirect.oci.tar");
    let tag = image::build(agent.parent().context("image: the agent's directory")?, &archive)?;
    println!(
        "image: {tag} in {} (load it with `podman load -i` or `ctr -n k8s.io images import`)",
        archive.display()
    );
    Ok(())
}

fn stress(counts: &stress::Counts, debug: bool) -> anyhow::Result<()> {
    if !is_root() {
        bail!("stress: the routines create namespaces and load programs: run it as root");
    }
    setup()?;
    let agent = build(!debug)?;
    let profile = if debug { "debug" } else { "release" };
    let out = stress::run(&agent, counts, profile, Some(&root()))?;
    if out.failed > 0 {
        bail!("stress: {} routines failed", out.failed);
    }
    Ok(())
}

fn vm_test(opts: vm::Options) -> anyhow::Result<()> {
    if !is_root() {
        bail!("vm-test: booting a kernel and running the integration tests in it needs root");
    }
    setup()?;
    let agent = build(false)?;
    let out = vm::vm_test(&opts, &agent)?;
    if out.failed > 0 {
        bail!("vm-test: {} tests failed under {}", out.failed, out.kernel);
    }
    Ok(())
}

/// Runs `cargo test`, passing its output through, and adds up its `test result:` lines.
fn run_counting(mut c: Command) -> anyhow::Result<(u64, u64)> {
    use std::io::{BufRead, BufReader};
    let mut child = c
        .stdout(Stdio::piped())
        .spawn()
        .context("test: cannot start cargo test")?;
    let (mut passed, mut failed) = (0, 0);
    let stdout = child.stdout.take().context("test: no stdout")?;
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            let num = |word: &str| -> u64 {
                rest.split(';')
                    .find_map(|part| part.trim().strip_suffix(word)?.trim().rsplit(' ').next()?.parse().ok())
                    .unwrap_or(0)
            };
            passed += num("passed");
            failed += num("failed");
        }
    }
    let status = child.wait()?;
    if !status.success() && failed == 0 {
        bail!("test: cargo test exited with {status}");
    }
    Ok((passed, failed))
}

fn main() -> std::process::ExitCode {
    let result = match Cli::parse().task {
        Task::Setup => setup(),
        Task::Build { release } => build(release).map(|p| println!("built {}", p.display())),
        Task::Run => setup().and_then(|()| build(false)).and_then(|agent| {
            let mut c = Command::new(agent.with_file_name("redirect-testkit"));
            c.arg("demo").arg("--agent").arg(&agent);
            run("run: redirect-testkit demo", c)
        }),
        Task::Image { debug } => image(debug),
        Task::Test { filter } => test(filter),
        Task::Bench {
            quick,
            profile,
            scale,
            rules,
            sustained,
        } => bench(quick, profile, scale, rules, sustained),
        Task::Stress {
            bursts,
            connections,
            hold,
            churn,
            outage_secs,
            debug,
        } => stress(
            &stress::Counts {
                bursts,
                connections,
                bytes: 256 << 10,
                hold,
                hold_secs: 5,
                churn,
                churn_concurrency: 64,
                outage_secs,
            },
            debug,
        ),
        Task::VmTest { kernel, filter, report } => vm_test(vm::Options {
            kernel,
            filters: filter,
            report,
        }),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
