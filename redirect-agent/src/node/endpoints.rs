//! The node agent's two endpoints, checked before anything is attached: the control socket's
//! path, and the metrics port, which one agent holds alone (a successor is handed its
//! predecessor's listener instead of binding beside it).

use std::{
    net::SocketAddr,
    os::unix::fs::{FileTypeExt as _, PermissionsExt as _},
    path::Path,
};

use tokio::net::{TcpListener, UnixListener};

use crate::metrics;

/// The longest path a Unix socket address holds (`sun_path` less its NUL).
const MAX_SOCKET_PATH: usize = 107;

fn bad_socket(path: &Path, why: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!(
        "--socket {}: {why}: expected a path for a Unix socket (nothing there yet, or a socket) in a directory the \
         agent can write",
        path.display()
    )
}

/// Refuses a control socket path the agent could not bind later, before anything changes: a
/// directory that cannot be made or written, or something other than a socket at the path (a
/// socket is a running agent's, or one a crashed agent left).
pub(super) fn check_socket_path(path: &Path) -> anyhow::Result<()> {
    if path.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(bad_socket(path, format!("longer than {MAX_SOCKET_PATH} bytes")));
    }
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| bad_socket(path, format!("cannot make {}: {e}", dir.display())))?;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {}
        Ok(m) => {
            let what = if m.is_dir() {
                "a directory"
            } else if m.is_file() {
                "a regular file"
            } else {
                "not a socket"
            };
            return Err(bad_socket(path, format!("is {what}")));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(bad_socket(path, e)),
    }
    // Binding is what the agent does once it serves: a probe beside it shows that it can.
    let probe = dir.join(format!(".redirect-probe-{}", std::process::id()));
    let _ = std::fs::remove_file(&probe);
    let bound = std::os::unix::net::UnixListener::bind(&probe);
    let _ = std::fs::remove_file(&probe);
    bound.map_err(|e| bad_socket(path, format!("cannot bind in {}: {e}", dir.display())))?;
    Ok(())
}

/// Binds the control socket, 0600, in place of whatever a predecessor (or a crashed agent)
/// left at the path.
pub(super) fn bind_socket(path: &Path) -> anyhow::Result<UnixListener> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).map_err(|e| bad_socket(path, e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|e| bad_socket(path, e))?;
    Ok(listener)
}

/// The metrics port, as far as it can be had before a handover.
pub(super) enum Metrics {
    Off,
    Bound(TcpListener),
    /// Bound beside an agent of the release before this one, which held it with
    /// SO_REUSEPORT: right only if that agent hands over to this one.
    BesideLegacy(TcpListener),
    /// Held by another socket: right only if this instance's running agent hands its
    /// listener over.
    Busy(SocketAddr),
}

/// Binds `--metrics` alone (no SO_REUSEPORT: a second agent on the port is refused rather
/// than sharing its scrapes).
pub(super) fn bind_metrics(addr: Option<SocketAddr>) -> anyhow::Result<Metrics> {
    let Some(addr) = addr else { return Ok(Metrics::Off) };
    match metrics::bind(addr, false) {
        Ok(l) => Ok(Metrics::Bound(l)),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => match metrics::bind(addr, true) {
            Ok(l) => Ok(Metrics::BesideLegacy(l)),
            Err(_) => Ok(Metrics::Busy(addr)),
        },
        Err(e) => Err(anyhow::anyhow!("metrics address {addr} cannot be bound: {e}")),
    }
}

fn in_use(addr: SocketAddr) -> anyhow::Error {
    anyhow::anyhow!(
        "metrics address {addr} is in use by another process (not a running agent of this --name that hands over): \
         pick another --metrics port, or --metrics off"
    )
}

/// The metrics listener once it is known whether a predecessor handed over (`handed`: the
/// listener it gave, if asked), or the error that refuses this start (nothing attached yet).
pub(super) fn settle_metrics(
    m: Metrics,
    handover: bool,
    handed: Option<std::os::fd::OwnedFd>,
) -> anyhow::Result<Option<TcpListener>> {
    match m {
        Metrics::Off => Ok(None),
        Metrics::Bound(l) => Ok(Some(l)),
        Metrics::BesideLegacy(l) if handover => Ok(Some(l)),
        Metrics::BesideLegacy(l) => Err(in_use(l.local_addr()?)),
        Metrics::Busy(addr) => {
            let fd = handed.ok_or_else(|| in_use(addr))?;
            let l = std::net::TcpListener::from(fd);
            l.set_nonblocking(true)?;
            Ok(Some(TcpListener::from_std(l)?))
        }
    }
}
