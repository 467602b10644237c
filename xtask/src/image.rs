//! `cargo xtask image`: the container image deploy/daemonset.yaml names, built here and offline.
//!
//! No base image is pulled: the image is `FROM scratch` plus a root filesystem assembled from
//! this machine's Debian 12: the agent and the CNI plugin, the shared objects `ldd` says they
//! load (glibc's, the same files the binaries were linked and tested against), Debian's CA
//! bundle, and Debian's static busybox for `kubectl exec` debugging. podman builds it into a throw-away store and
//! writes an OCI archive, which `podman load` or `ctr images import` take.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::sh::{cargo, output, root, run};

/// Debian's `ca-certificates` bundle.
const CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// The one image the DaemonSet's containers run, as it names it.
pub(crate) fn tag() -> anyhow::Result<String> {
    let path = root().join("deploy/daemonset.yaml");
    let yaml = std::fs::read_to_string(&path).with_context(|| format!("image: reading {}", path.display()))?;
    let images: BTreeSet<&str> = yaml
        .lines()
        .filter_map(|l| l.trim().strip_prefix("image:"))
        .map(str::trim)
        .collect();
    match images.len() {
        1 => Ok(images.into_iter().next().unwrap_or_default().to_owned()),
        n => bail!(
            "image: {} names {n} images ({}); its containers must run one",
            path.display(),
            images.into_iter().collect::<Vec<_>>().join(", ")
        ),
    }
}

/// Builds the image from the agent in `bin_dir` (target/debug or target/release) and a static
/// build of the CNI plugin of the same profile into the OCI archive `archive`; returns the tag.
pub(crate) fn build(bin_dir: &Path, archive: &Path) -> anyhow::Result<String> {
    let tag = tag()?;
    let work = archive.with_extension("build");
    let _ = std::fs::remove_dir_all(&work);
    let rootfs = work.join("context/rootfs");
    let release = bin_dir.file_name().is_some_and(|p| p == "release");
    let binaries = [bin_dir.join("redirect-agent"), static_plugin(release)?];
    for bin in &binaries {
        if !bin.is_file() {
            bail!("image: {} is missing: build it first", bin.display());
        }
        copy_into(&rootfs, bin, Path::new("/usr/local/bin"))?;
        // A debug build's debug information is nine tenths of it, and no use in a container.
        let mut c = Command::new("strip");
        c.arg("--strip-debug")
            .arg(rootfs.join("usr/local/bin").join(bin.file_name().unwrap_or_default()));
        run("image: strip", c)?;
    }
    for lib in shared_objects(&binaries[..1])? {
        copy_into(&rootfs, &lib, lib.parent().unwrap_or(Path::new("/")))?;
    }
    // busybox-static's: the dynamic `busybox` package installs the same path, and its
    // libraries are not in the image.
    require_static(Path::new("/bin/busybox"), "install busybox-static")?;
    copy_into(&rootfs, Path::new("/bin/busybox"), Path::new("/bin"))?;
    // Debian's CA bundle: the API client loads the system's roots whenever a kubeconfig has no
    // CA of its own (and fails with none), and `kubectl exec` users may want them.
    copy_into(&rootfs, Path::new(CA_BUNDLE), Path::new("/etc/ssl/certs"))?;
    for applet in ["sh", "ls", "cat", "ps", "ip"] {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet))?;
    }
    // The agent's temporary files, and /run, where the DaemonSet mounts the control socket
    // and the runtimes' network namespaces (`/var/run/netns/…` as containerd names them and
    // `/run/netns/…` as podman does are one directory, as on the node).
    for dir in ["tmp", "run/netns", "var", "sys/fs/bpf"] {
        std::fs::create_dir_all(rootfs.join(dir))?;
    }
    std::os::unix::fs::symlink("../run", rootfs.join("var/run"))?;
    std::fs::copy(root().join("deploy/Containerfile"), work.join("context/Containerfile"))?;

    // A store of the build's own, so the machine's podman images are left alone. podman
    // refuses a run root longer than 50 bytes (its sockets live there), and the checkout's path
    // can be anything, so the run root goes in /tmp.
    let runroot = RunRoot(PathBuf::from(format!("/tmp/redirect-image.{}", std::process::id())));
    let store = |c: &mut Command| {
        c.arg("--root")
            .arg(work.join("store"))
            .arg("--runroot")
            .arg(&runroot.0)
            .args(["--storage-driver", "vfs"]);
    };
    let mut c = Command::new("podman");
    store(&mut c);
    c.args(["build", "--quiet", "--network", "none", "--tag", &tag])
        .arg(work.join("context"));
    run("image: podman build", c)?;
    let _ = std::fs::remove_file(archive);
    let mut c = Command::new("podman");
    store(&mut c);
    c.args(["save", "--quiet", "--format", "oci-archive", "--output"])
        .arg(archive)
        .arg(&tag);
    run("image: podman save", c)?;
    let mut c = Command::new("podman");
    store(&mut c);
    c.args(["system", "reset", "--force"]);
    run("image: podman system reset", c)?;
    std::fs::remove_dir_all(&work)?;
    Ok(tag)
}

/// podman's run root for one build, removed however the build ends.
struct RunRoot(PathBuf);

impl Drop for RunRoot {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The CNI plugin linked statically (glibc's `crt-static`), built for the host's target with
/// the flag for that target only, so build scripts and the workspace's other builds are left
/// alone. install-cni copies it onto the node, whose glibc may be older than the one it was
/// built with (a dynamic build from Debian 12 needs 2.34 or later and would fail every pod's
/// ADD there); inside the image only the agent loads shared objects.
fn static_plugin(release: bool) -> anyhow::Result<PathBuf> {
    let host = output(Command::new("rustc").arg("-vV"))
        .and_then(|v| v.lines().find_map(|l| l.strip_prefix("host: ").map(str::to_owned)))
        .context("image: rustc -vV names no host target")?;
    let mut c = cargo();
    // RUSTFLAGS, which overrides the per-target flags, is extended rather than left to drop
    // the one that matters; with `--target` it reaches the target's code only, not build
    // scripts.
    let mut flags = std::env::var("RUSTFLAGS").unwrap_or_default();
    flags.push_str(" -C target-feature=+crt-static");
    c.args(["build", "--package", "redirect-cni", "--target", &host])
        .env("RUSTFLAGS", flags.trim())
        .env_remove("CARGO_ENCODED_RUSTFLAGS");
    if release {
        c.arg("--release");
    }
    run("image: static build of redirect-cni", c)?;
    let plugin = root()
        .join("target")
        .join(&host)
        .join(if release { "release" } else { "debug" })
        .join("redirect-cni");
    require_static(&plugin, "its build did not take -C target-feature=+crt-static")?;
    Ok(plugin)
}

/// Fails unless `ldd` calls `file` static: "statically linked" for a static PIE (stdout), "not
/// a dynamic executable" for a plain static one (stderr); `hint` says what to do.
fn require_static(file: &Path, hint: &str) -> anyhow::Result<()> {
    let ldd = Command::new("ldd").arg(file).output().context("image: ldd")?;
    let linked = String::from_utf8_lossy(&ldd.stdout);
    let plain = String::from_utf8_lossy(&ldd.stderr).contains("not a dynamic executable");
    if !linked.contains("statically linked") && !plain {
        bail!(
            "image: {} is not statically linked ({}): {hint}",
            file.display(),
            linked.trim().lines().next().unwrap_or_default()
        );
    }
    Ok(())
}

/// Copies `file` to `dir` inside `rootfs`, keeping its mode.
fn copy_into(rootfs: &Path, file: &Path, dir: &Path) -> anyhow::Result<()> {
    let into = rootfs.join(dir.strip_prefix("/").unwrap_or(dir));
    std::fs::create_dir_all(&into)?;
    let name = file.file_name().context("image: a file without a name")?;
    std::fs::copy(file, into.join(name)).with_context(|| format!("image: copying {}", file.display()))?;
    Ok(())
}

/// Every shared object (and the ELF interpreter) the binaries load, by absolute path.
fn shared_objects(binaries: &[PathBuf]) -> anyhow::Result<BTreeSet<PathBuf>> {
    let mut all = BTreeSet::new();
    for bin in binaries {
        let listing = output(Command::new("ldd").arg(bin)).with_context(|| format!("image: ldd {}", bin.display()))?;
        for line in listing.lines() {
            // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)`, `/lib64/ld-linux-x86-64.so.2 (0x…)`;
            // the vDSO has no file.
            let path = line.split_once("=>").map_or(line, |(_, p)| p).trim();
            let path = path.split(" (").next().unwrap_or_default();
            if path.starts_with('/') {
                all.insert(PathBuf::from(path));
            } else if line.contains("not found") {
                bail!("image: {}: {}", bin.display(), line.trim());
            }
        }
    }
    Ok(all)
}
