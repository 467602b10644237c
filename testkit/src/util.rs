//! Small helpers every other module uses: unique names and running a command.

use std::{
    io,
    process::{Command, Stdio},
    sync::atomic::{AtomicUsize, Ordering},
};

static SEQ: AtomicUsize = AtomicUsize::new(0);

/// A name no other test or demo on this machine is using right now.
pub fn unique(tag: &str) -> String {
    format!(
        "rd-{tag}-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs a command, failing with its stderr.
pub fn cmd(program: &str, args: &[&str]) -> io::Result<()> {
    let out = Command::new(program).args(args).stdin(Stdio::null()).output()?;
    if out.status.success() {
        return Ok(());
    }
    Err(io::Error::other(format!(
        "{program} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    )))
}
