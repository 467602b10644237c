//! Running commands and installing packages: what every task needs.

use std::{
    env,
    ffi::OsStr,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

pub(crate) fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask sits in the workspace")
        .to_owned()
}

pub(crate) fn cargo() -> Command {
    let mut c = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(root());
    c
}

/// Runs a command; on failure, one line naming the step.
pub(crate) fn run(step: &str, mut c: Command) -> anyhow::Result<()> {
    let status = c
        .status()
        .with_context(|| format!("{step}: cannot start {:?}", c.get_program()))?;
    if !status.success() {
        bail!(
            "{step} failed: {:?} {} exited with {status}",
            c.get_program(),
            join(c.get_args())
        );
    }
    Ok(())
}

pub(crate) fn join<'a>(args: impl Iterator<Item = &'a OsStr>) -> String {
    args.map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

pub(crate) fn output(c: &mut Command) -> Option<String> {
    let out = c.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// A command on PATH, or a file by absolute path.
pub(crate) fn have(binary: &str) -> bool {
    if binary.starts_with('/') {
        return Path::new(binary).is_file();
    }
    env::var_os("PATH")
        .map(|p| env::split_paths(&p).any(|d| d.join(binary).is_file()))
        .unwrap_or(false)
}

pub(crate) fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// `apt-get install` of Debian packages (after an update), as root.
pub(crate) fn apt_install(step: &str, packages: &[&str]) -> anyhow::Result<()> {
    if !is_root() {
        bail!(
            "{step}: apt packages {} are missing and installing them needs root",
            packages.join(" ")
        );
    }
    println!("{step}: installing {}", packages.join(" "));
    let mut update = Command::new("apt-get");
    update.args(["update", "-qq"]);
    run(&format!("{step}: apt-get update"), update)?;
    let mut install = Command::new("apt-get");
    install
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(packages)
        .env("DEBIAN_FRONTEND", "noninteractive");
    run(&format!("{step}: apt-get install"), install)
}
