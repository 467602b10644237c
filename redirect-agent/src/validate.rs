//! `--run-validation`: istio-validation's proof that capture is in place, made from inside the
//! workload (`redirect-agent validate-in`, hidden, a child in the workload's cgroup and
//! namespace as the proxy's identity, as the istio-validation container runs).
//!
//! istio-validation (`tools/istio-iptables/pkg/validation`) listens on the capture ports and,
//! as uid 1337, connects from 127.0.0.1 to 127.0.0.6:15002 (`--iptables-probe-port`): the
//! loopback ISTIO_IN_REDIRECT rule must send it to the inbound capture port, where
//! SO_ORIGINAL_DST must say 15002. Here the capture port may already be served (the embedded
//! proxy, or a sidecar started first): then the connection must come out of that proxy's
//! inbound passthrough, from 127.0.0.6, to the probe port, which the child listens on too. A
//! connection that reaches the probe port from 127.0.0.1 went around capture.

use std::{
    io,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener},
    os::fd::OwnedFd,
    path::PathBuf,
    process::{Command, ExitCode, Stdio},
    time::{Duration, Instant},
};

use rustix::net::{AddressFamily, SocketFlags, SocketType};

use crate::sys;

/// istio-validation's exit status when capture is not in place (`ValidationErrorCode`).
pub const FAILED_STATUS: u8 = 126;

/// The destination of the probe (istio-iptables' inbound passthrough source).
const PROBE_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);

#[derive(clap::Args, Debug, Clone)]
pub struct ValidateInArgs {
    /// cgroup v2 directory to join (the workload's).
    #[arg(long)]
    pub cgroup: PathBuf,
    /// The workload's network namespace.
    #[arg(long)]
    pub netns: PathBuf,
    /// The identity to probe as (the proxy's, istio-iptables -u).
    #[arg(long)]
    pub uid: u32,
    #[arg(long)]
    pub gid: u32,
    #[arg(long)]
    pub probe_port: u16,
    /// The inbound capture port (-z).
    #[arg(long)]
    pub capture_port: u16,
    #[arg(long)]
    pub timeout_ms: u64,
}

/// The validation failed: capture is not in place (or could not be proven).
#[derive(Debug, thiserror::Error)]
#[error("validation failed: {0}")]
pub struct ValidationFailed(pub String);

/// Runs the child and waits for its word. `Ok` when capture is proven.
pub fn validate(args: &ValidateInArgs) -> anyhow::Result<()> {
    let mut child = Command::new("/proc/self/exe")
        .arg("validate-in")
        .args(["--cgroup", &args.cgroup.to_string_lossy()])
        .args(["--netns", &args.netns.to_string_lossy()])
        .args(["--uid", &args.uid.to_string(), "--gid", &args.gid.to_string()])
        .args(["--probe-port", &args.probe_port.to_string()])
        .args(["--capture-port", &args.capture_port.to_string()])
        .args(["--timeout-ms", &args.timeout_ms.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| anyhow::anyhow!("starting the validation probe: {e}"))?;
    // The child bounds its own wait by the timeout; this bounds the child.
    let deadline = Instant::now() + Duration::from_millis(args.timeout_ms) + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(ValidationFailed("the probe did not finish".into()).into());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = child.wait_with_output()?;
    let said = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    match status.code() {
        Some(0) => {
            tracing::info!(result = %said, "validation passed");
            Ok(())
        }
        Some(c) if c == i32::from(FAILED_STATUS) => Err(ValidationFailed(said).into()),
        _ => Err(anyhow::anyhow!(
            "the validation probe could not run: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
    }
}

/// The child: single-threaded (cgroup, namespace and identity are per task). Prints one line;
/// exits 0 when capture is proven, [`FAILED_STATUS`] when not, 1 when it could not probe.
pub fn main(args: &ValidateInArgs) -> ExitCode {
    let entered = sys::join(Some(&args.cgroup), Some(&args.netns)).and_then(|()| sys::become_user(args.uid, args.gid));
    if let Err(e) = entered {
        eprintln!("entering the workload as {}:{}: {e}", args.uid, args.gid);
        return ExitCode::FAILURE;
    }
    match probe(args) {
        Ok(Ok(how)) => {
            println!("{how}");
            ExitCode::SUCCESS
        }
        Ok(Err(why)) => {
            println!("{why}");
            ExitCode::from(FAILED_STATUS)
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// `Ok(Ok(how))` when a probe arrived captured, `Ok(Err(why))` when none did before the
/// deadline. As istio-validation's client, it dials again every second until then: capture put
/// in place a moment later (an enrollment racing the probe) still passes.
fn probe(args: &ValidateInArgs) -> io::Result<Result<String, String>> {
    let at = |ip, port| SocketAddr::V4(SocketAddrV4::new(ip, port));
    let probe_at = at(PROBE_IP, args.probe_port);
    // The probe port may be taken (an app listening on *:PORT): then only the capture port's
    // own listener can tell, as istio-validation's only can.
    let passthrough = TcpListener::bind(probe_at).ok();
    // Taken when a proxy serves it already; then the probe must come out of that proxy.
    let capture = TcpListener::bind(at(Ipv4Addr::LOCALHOST, args.capture_port)).ok();
    if passthrough.is_none() && capture.is_none() {
        return Err(io::Error::other(format!(
            "{probe_at} and 127.0.0.1:{} are both taken: nothing could tell where the probe lands",
            args.capture_port
        )));
    }
    for l in passthrough.iter().chain(capture.iter()) {
        l.set_nonblocking(true)?;
    }
    let deadline = Instant::now() + Duration::from_millis(args.timeout_ms);
    let mut last = format!("no connection from 127.0.0.1 to {probe_at} arrived");
    loop {
        let probe = dial(probe_at)?;
        let next_dial = (Instant::now() + Duration::from_secs(1)).min(deadline);
        while Instant::now() < next_dial {
            if let Some(l) = &capture
                && let Ok((conn, _)) = l.accept()
            {
                let local = conn.local_addr()?;
                match sys::original_dst(&conn, local) {
                    Ok(orig) if orig == probe_at => {
                        return Ok(Ok(format!(
                            "captured: reached {local} with original destination {orig}"
                        )));
                    }
                    Ok(orig) => last = format!("reached {local} with original destination {orig}, not {probe_at}"),
                    Err(e) => last = format!("reached {local}, but SO_ORIGINAL_DST: {e}"),
                }
            }
            if let Some(l) = &passthrough
                && let Ok((_conn, peer)) = l.accept()
            {
                if peer.ip() == PROBE_IP {
                    return Ok(Ok(format!(
                        "captured: came out of the proxy on :{} from {peer}",
                        args.capture_port
                    )));
                }
                last = format!("{probe_at} was reached straight from {peer}: not captured");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        if Instant::now() >= deadline {
            if let Ok(Err(e)) = rustix::net::sockopt::socket_error(&probe) {
                last.push_str(&format!(" (the last probe's connect: {e})"));
            }
            return Ok(Err(format!("{last} within {} ms", args.timeout_ms)));
        }
    }
}

/// A non-blocking connect from 127.0.0.1, as istio-validation's probe is bound.
fn dial(to: SocketAddr) -> io::Result<OwnedFd> {
    let s = rustix::net::socket_with(AddressFamily::INET, SocketType::STREAM, SocketFlags::NONBLOCK, None)?;
    rustix::net::bind(&s, &SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0)))?;
    match rustix::net::connect(&s, &to) {
        Ok(()) | Err(rustix::io::Errno::INPROGRESS) => Ok(s),
        Err(e) => Err(io::Error::new(e.kind(), format!("connecting to {to}: {e}"))),
    }
}
