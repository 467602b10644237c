//! [`ProbeSpec`]: one probe's settings, built in tests and run as a `redirect-testkit probe`
//! child process.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use crate::report::ProbeResult;

/// What one probe does, from inside the workload (or, without a cgroup, from any namespace).
#[derive(Clone, Debug)]
pub struct ProbeSpec {
    pub cgroup: Option<PathBuf>,
    pub netns: PathBuf,
    pub uid: u32,
    pub gid: u32,
    /// Real (uid, gid) kept while `uid`/`gid` are the effective and filesystem ones.
    pub real: Option<(u32, u32)>,
    pub mark: Option<u32>,
    /// IP_TRANSPARENT (IPV6_TRANSPARENT) before `bind`: a foreign source address.
    pub transparent: bool,
    /// SO_BINDTODEVICE.
    pub device: Option<String>,
    pub bind: Option<IpAddr>,
    pub connect: SocketAddr,
    /// IPv4 destinations dialed v4-mapped from an AF_INET6 socket (`probe --v4-mapped`).
    pub v4_mapped: bool,
    pub bytes: usize,
    /// `Some(n)`: `bytes` sent in writes of at most `n` bytes (`probe --write-size`).
    pub write_size: Option<usize>,
    pub udp: bool,
    /// `Some(connected)`: one datagram and its answer (`--udp-exchange`).
    pub udp_exchange: Option<bool>,
    pub round_trips: u64,
    pub fill: bool,
    /// `probe --fill-cap` (its default when `None`).
    pub fill_cap: Option<usize>,
    /// `probe --half-close-then-wait`.
    pub half_close_then_wait: bool,
    /// `probe --timeout-ms` (its default when `None`).
    pub timeout_ms: Option<u64>,
    pub tokio: bool,
    pub sockopts: bool,
}

impl ProbeSpec {
    /// `connect`: a `SocketAddrV4`, `SocketAddrV6` or `SocketAddr`.
    pub fn new(cgroup: &Path, netns: &Path, connect: impl Into<SocketAddr>) -> Self {
        Self {
            cgroup: Some(cgroup.into()),
            netns: netns.into(),
            uid: 0,
            gid: 0,
            real: None,
            mark: None,
            transparent: false,
            device: None,
            bind: None,
            connect: connect.into(),
            v4_mapped: false,
            bytes: 1024,
            write_size: None,
            udp: false,
            udp_exchange: None,
            round_trips: 0,
            fill: false,
            fill_cap: None,
            half_close_then_wait: false,
            timeout_ms: None,
            tokio: false,
            sockopts: false,
        }
    }

    /// A probe from a namespace that is not a captured workload (the remote host).
    pub fn outside(netns: &Path, connect: impl Into<SocketAddr>) -> Self {
        Self {
            cgroup: None,
            ..Self::new(Path::new("/"), netns, connect)
        }
    }

    pub fn uid(mut self, uid: u32) -> Self {
        self.uid = uid;
        self
    }

    pub fn gid(mut self, gid: u32) -> Self {
        self.gid = gid;
        self
    }

    /// Keep real ids `(uid, gid)` while [`ProbeSpec::uid`]/[`ProbeSpec::gid`] are the effective
    /// and filesystem ones.
    pub fn real_ids(mut self, uid: u32, gid: u32) -> Self {
        self.real = Some((uid, gid));
        self
    }

    /// SO_BINDTODEVICE `device` on the socket before it connects.
    pub fn device(mut self, device: &str) -> Self {
        self.device = Some(device.to_owned());
        self
    }

    /// SO_MARK `mark` on the socket before it connects.
    pub fn mark(mut self, mark: u32) -> Self {
        self.mark = Some(mark);
        self
    }

    /// IP_TRANSPARENT on the socket, so that [`ProbeSpec::bind`] may take an address of no
    /// interface (a proxy dialing as its client does; CAP_NET_ADMIN).
    pub fn transparent(mut self) -> Self {
        self.transparent = true;
        self
    }

    /// Source address (an `Ipv4Addr`, `Ipv6Addr` or `IpAddr`), bound before connecting.
    pub fn bind(mut self, ip: impl Into<IpAddr>) -> Self {
        self.bind = Some(ip.into());
        self
    }

    /// IPv4 destinations dialed from an AF_INET6 socket as `::ffff:a.b.c.d` (IPv6 ones as they
    /// are); an IPv4 [`ProbeSpec::bind`] address is then bound v4-mapped too.
    pub fn v4_mapped(mut self) -> Self {
        self.v4_mapped = true;
        self
    }

    /// A UDP connect() instead of a TCP exchange.
    pub fn udp(mut self) -> Self {
        self.udp = true;
        self
    }

    /// One UDP datagram and its answer: sent with `sendto`, or on a socket `connected` first.
    pub fn udp_exchange(mut self, connected: bool) -> Self {
        self.udp_exchange = Some(connected);
        self
    }

    pub fn bytes(mut self, n: usize) -> Self {
        self.bytes = n;
        self
    }

    /// `bytes` as consecutive writes of at most `n` bytes each instead of one write, as a
    /// streaming app writes: the fast path must carry a stream at any write size (the
    /// benchmark's stream of 256 KiB writes once failed there with ENOMEM). Not 0.
    pub fn write_size(mut self, n: usize) -> Self {
        self.write_size = Some(n);
        self
    }

    /// `n` request/response round trips of `bytes` each instead of one exchange.
    pub fn round_trips(mut self, n: u64) -> Self {
        self.round_trips = n;
        self
    }

    /// With a tokio client (non-blocking, epoll readiness) instead of blocking calls.
    pub fn tokio(mut self) -> Self {
        self.tokio = true;
        self
    }

    /// Socket options instead of an exchange (`probe --sockopts`).
    pub fn sockopts(mut self) -> Self {
        self.sockopts = true;
        self
    }

    /// Write until the connection stops taking bytes instead of one exchange.
    pub fn fill(mut self) -> Self {
        self.fill = true;
        self
    }

    /// [`ProbeSpec::fill`] up to `cap` bytes at most (the probe's own cap is 256 MiB).
    pub fn fill_up_to(mut self, cap: usize) -> Self {
        self.fill = true;
        self.fill_cap = Some(cap);
        self
    }

    /// After the banner, half-close and block in a read nothing answers, until `timeout_ms`:
    /// a blocking client waiting for its reply (`probe --half-close-then-wait`).
    pub fn half_close_then_wait(mut self, timeout_ms: u64) -> Self {
        self.half_close_then_wait = true;
        self.timeout_ms = Some(timeout_ms);
        self
    }

    /// Runs `testkit probe` (the `redirect-testkit` binary) as a child process (it moves
    /// itself into the cgroup and namespace and drops to uid/gid before connecting) and parses
    /// its one-line JSON report.
    pub fn run(&self, testkit: &Path) -> io::Result<ProbeResult> {
        let mut all = self.run_batch(testkit, &[self.connect])?;
        all.pop().ok_or_else(|| io::Error::other("probe reported nothing"))
    }

    /// The same probe to each of `targets` (`SocketAddrV4`s, `SocketAddrV6`s or `SocketAddr`s),
    /// one after another, from one child process.
    pub fn run_batch<A: Into<SocketAddr> + Copy>(&self, testkit: &Path, targets: &[A]) -> io::Result<Vec<ProbeResult>> {
        let mut c = Command::new(testkit);
        c.arg("probe");
        if let Some(cg) = &self.cgroup {
            c.args(["--cgroup", &cg.to_string_lossy()]);
        }
        c.args(["--netns", &self.netns.to_string_lossy()])
            .args(["--uid", &self.uid.to_string(), "--gid", &self.gid.to_string()])
            .args(["--bytes", &self.bytes.to_string()]);
        for &t in targets {
            c.args(["--connect", &t.into().to_string()]);
        }
        if let Some(b) = self.bind {
            c.args(["--bind", &b.to_string()]);
        }
        if let Some((uid, gid)) = self.real {
            c.args(["--real-uid", &uid.to_string(), "--real-gid", &gid.to_string()]);
        }
        if let Some(m) = self.mark {
            c.args(["--mark", &m.to_string()]);
        }
        if let Some(d) = &self.device {
            c.args(["--device", d]);
        }
        if self.transparent {
            c.arg("--transparent");
        }
        if self.v4_mapped {
            c.arg("--v4-mapped");
        }
        if self.udp {
            c.arg("--udp");
        }
        if let Some(connected) = self.udp_exchange {
            c.arg("--udp-exchange");
            if connected {
                c.arg("--udp-connected");
            }
        }
        if let Some(n) = self.write_size {
            c.args(["--write-size", &n.to_string()]);
        }
        if self.round_trips > 0 {
            c.args(["--round-trips", &self.round_trips.to_string()]);
        }
        if self.fill {
            c.arg("--fill");
        }
        if let Some(cap) = self.fill_cap {
            c.args(["--fill-cap", &cap.to_string()]);
        }
        if self.half_close_then_wait {
            c.arg("--half-close-then-wait");
        }
        if let Some(ms) = self.timeout_ms {
            c.args(["--timeout-ms", &ms.to_string()]);
        }
        if self.tokio {
            c.arg("--tokio");
        }
        if self.sockopts {
            c.arg("--sockopts");
        }
        let out = c.stdin(Stdio::null()).output()?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "probe {self:?} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let results = out
            .stdout
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).map_err(io::Error::other))
            .collect::<io::Result<Vec<ProbeResult>>>()?;
        if results.len() != targets.len() {
            return Err(io::Error::other(format!(
                "probe reported {} results for {} targets",
                results.len(),
                targets.len()
            )));
        }
        Ok(results)
    }
}
