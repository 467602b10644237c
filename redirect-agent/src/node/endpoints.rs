//! The node agent's endpoints, checked before anything is attached: the control socket's
//! path, the metrics port, which one agent holds alone (a successor is handed its
//! predecessor's listener instead of binding beside it), and ztunnel's ZDS socket, which a
//! predecessor lets go of once it has handed over.

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
        Ok(m) => return Err(bad_socket(path, format!("is {}", not_a_socket(&m)))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(bad_socket(path, e)),
    }
    probe_bind(dir).map_err(|e| bad_socket(path, e))
}

/// What a file that should have been a socket is.
fn not_a_socket(m: &std::fs::Metadata) -> &'static str {
    if m.is_dir() {
        "a directory"
    } else if m.is_file() {
        "a regular file"
    } else {
        "not a socket"
    }
}

/// Binding is what the agent does once it serves: a probe beside the socket shows that it can.
fn probe_bind(dir: &Path) -> Result<(), String> {
    let probe = dir.join(format!(".redirect-probe-{}", std::process::id()));
    let _ = std::fs::remove_file(&probe);
    let bound = std::os::unix::net::UnixListener::bind(&probe);
    let _ = std::fs::remove_file(&probe);
    bound
        .map(drop)
        .map_err(|e| format!("cannot bind in {}: {e}", dir.display()))
}

/// ztunnel's ZDS socket (`--ztunnel-socket`), as far as it can be told before a handover.
pub(super) enum ZdsSocket {
    /// Nothing there, or a socket file nothing listens on (a stopped or killed agent's), which
    /// the server replaces.
    Free,
    /// Something listens on it: right only if this instance's running agent hands over, which
    /// lets go of it once it has.
    Listened,
}

fn bad_zds(path: &Path, why: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!(
        "--ztunnel-socket {}: {why}: expected an absolute path in an existing directory, with nothing there or a \
         socket nothing listens on (Istio's ztunnel connects to {})",
        path.display(),
        crate::zds::DEFAULT_SOCKET
    )
}

/// Refuses a ZDS socket path the server could not bind later, before anything changes: a
/// relative path (the agent's working directory is nobody's convention), a directory that
/// does not exist, something other than a socket at the path. A socket something listens on
/// is told apart ([`ZdsSocket::Listened`]): only a handover makes it right.
pub(super) fn check_ztunnel_socket(path: &Path, control: &Path) -> anyhow::Result<ZdsSocket> {
    if !path.is_absolute() {
        return Err(bad_zds(path, "a relative path"));
    }
    if path.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(bad_zds(path, format!("longer than {MAX_SOCKET_PATH} bytes")));
    }
    if path == control {
        return Err(bad_zds(path, "the control socket (--socket) is there"));
    }
    let Some(dir) = path.parent().filter(|_| path.file_name().is_some()) else {
        return Err(bad_zds(path, "no file name"));
    };
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(bad_zds(path, format!("{} is not a directory", dir.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(bad_zds(path, format!("its directory {} does not exist", dir.display())));
        }
        Err(e) => return Err(bad_zds(path, format!("{}: {e}", dir.display()))),
    }
    let found = match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => listened(path)?,
        Ok(m) => return Err(bad_zds(path, format!("is {}", not_a_socket(&m)))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => ZdsSocket::Free,
        Err(e) => return Err(bad_zds(path, e)),
    };
    probe_bind(dir).map_err(|e| bad_zds(path, e))?;
    Ok(found)
}

/// Whether something listens on the socket file at `path`, as the server's bind will ask: a
/// connect that is refused means nobody does.
pub(super) fn listened(path: &Path) -> anyhow::Result<ZdsSocket> {
    use rustix::{
        io::Errno,
        net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType},
    };
    let addr = SocketAddrUnix::new(path).map_err(|e| bad_zds(path, e))?;
    let probe = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
        None,
    )
    .map_err(|e| bad_zds(path, format!("a socket to probe it: {e}")))?;
    match rustix::net::connect(&probe, &addr) {
        Err(Errno::CONNREFUSED | Errno::NOENT) => Ok(ZdsSocket::Free),
        // A full backlog is a listener too; so is a stream listener, which refuses the type.
        Ok(()) | Err(Errno::AGAIN | Errno::PROTOTYPE) => Ok(ZdsSocket::Listened),
        Err(e) => Err(bad_zds(path, format!("probing it: {e}"))),
    }
}

/// The refusal of a ZDS socket something listens on, when no agent of this instance handed
/// over (which would have let go of it).
pub(super) fn zds_in_use(path: &Path) -> anyhow::Error {
    bad_zds(
        path,
        "something listens on it (istio-cni's node agent, or an agent of another --name) and no agent of this \
         --name handed over",
    )
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
