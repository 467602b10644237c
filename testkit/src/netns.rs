//! Network namespaces: a named one (`ip netns add`), and the pair every throw-away workload
//! lives in, joined by a veth, dual-stack (10.200.0.0/16 and the ULA prefix fd00:200::/48, no
//! default route of either family, so nothing can leave the machine). Each removes itself on
//! drop, also when a test panics.

use std::{
    io,
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
};

use redirect_agent::sys;

use crate::util::{cmd, unique};

/// A named network namespace (`ip netns add`), deleted on drop.
pub struct NamedNetns {
    pub name: String,
    pub path: PathBuf,
}

impl NamedNetns {
    /// A new namespace with IPv6 enabled (whatever the host's defaults) and `lo` up, so it has
    /// 127.0.0.1 and ::1.
    pub fn create(name: &str) -> io::Result<Self> {
        cmd("ip", &["netns", "add", name])?;
        let ns = Self {
            name: name.into(),
            path: Path::new("/run/netns").join(name),
        };
        // Before any link is up or made: `all` reaches the links there are (lo), `default`
        // the ones made later.
        ns.sysctl("net.ipv6.conf.all.disable_ipv6", "0")?;
        ns.sysctl("net.ipv6.conf.default.disable_ipv6", "0")?;
        cmd("ip", &["-n", name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Sets a sysctl of this namespace (`net.ipv6.conf.all.disable_ipv6`): /proc/sys/net
    /// answers for the namespace of the thread that opens it, so the write is made from a
    /// thread inside.
    pub fn sysctl(&self, key: &str, value: &str) -> io::Result<()> {
        let path = Path::new("/proc/sys").join(key.replace('.', "/"));
        self.open()?
            .run(|| std::fs::write(&path, value))
            .map_err(|e| io::Error::new(e.kind(), format!("sysctl {key}={value} in {}: {e}", self.name)))
    }

    pub fn open(&self) -> io::Result<sys::Netns> {
        sys::Netns::open(&self.path).map_err(io::Error::other)
    }

    /// `ip -n NAME ...`
    pub fn ip(&self, args: &[&str]) -> io::Result<()> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        cmd("ip", &all)
    }
}

impl Drop for NamedNetns {
    fn drop(&mut self) {
        let _ = cmd("ip", &["netns", "del", &self.name]);
    }
}

/// A workload namespace and a "remote host" namespace, dual-stack: on one /24 of 10.200.0.0/16
/// and on the matching /64 of fd00:200::/48 (see [`NetnsPair::create_on`]). Both ends also have
/// 127.0.0.1 and ::1 on `lo`, and IPv6 link-local addresses on the veth; neither has a default
/// route.
pub struct NetnsPair {
    pub workload: NamedNetns,
    pub remote: NamedNetns,
    pub workload_ip: Ipv4Addr,
    pub remote_ip: Ipv4Addr,
    /// `fd00:200:0:SUBNET::1` on w0 (SUBNET in hex, as an IPv6 group is written).
    pub workload_ip6: Ipv6Addr,
    /// `fd00:200:0:SUBNET::2` on r0.
    pub remote_ip6: Ipv6Addr,
}

/// The pair's IPv6 addresses on `subnet`: (workload, remote), `fd00:200:0:SUBNET::1` and `::2`.
pub fn pair_ip6(subnet: u8) -> (Ipv6Addr, Ipv6Addr) {
    let on = |host| Ipv6Addr::new(0xfd00, 0x200, 0, u16::from(subnet), 0, 0, 0, host);
    (on(1), on(2))
}

impl NetnsPair {
    /// Each pair is its own world, so every pair can use the same subnet.
    pub fn create(tag: &str) -> io::Result<Self> {
        Self::create_on(tag, 1)
    }

    /// On 10.200.`subnet`.0/24 and fd00:200:0:`subnet`::/64 (`subnet` in hex there, see
    /// [`pair_ip6`]): workloads served by one node agent need distinct addresses, as pods on
    /// one node have. The IPv6 addresses are added without duplicate address detection, so
    /// they can be bound and dialed as soon as this returns; the IPv4 side is as it always was.
    pub fn create_on(tag: &str, subnet: u8) -> io::Result<Self> {
        let base = unique(tag);
        let workload = NamedNetns::create(&format!("{base}-w"))?;
        let remote = NamedNetns::create(&format!("{base}-r"))?;
        Self::wire(workload, remote, subnet)
    }

    /// The pair's veth (`w0` in `workload`, `r0` in `remote`) and both families' addresses on
    /// `subnet`, between two namespaces the caller made (and may have given other interfaces
    /// first).
    pub fn wire(workload: NamedNetns, remote: NamedNetns, subnet: u8) -> io::Result<Self> {
        let (workload_ip, remote_ip) = (Ipv4Addr::new(10, 200, subnet, 1), Ipv4Addr::new(10, 200, subnet, 2));
        let (workload_ip6, remote_ip6) = pair_ip6(subnet);
        veth((&workload, "w0"), (&remote, "r0"), subnet)?;
        Ok(Self {
            workload,
            remote,
            workload_ip,
            remote_ip,
            workload_ip6,
            remote_ip6,
        })
    }
}

/// A veth between two namespaces (`a`'s device and `b`'s), up, with both families' addresses on
/// `subnet`: 10.200.`subnet`.1 and the first of [`pair_ip6`] on `a`'s end, .2 and the second
/// on `b`'s. The IPv6 ones without duplicate address detection, usable at once.
pub fn veth((a, a_dev): (&NamedNetns, &str), (b, b_dev): (&NamedNetns, &str), subnet: u8) -> io::Result<()> {
    let (a6, b6) = pair_ip6(subnet);
    a.ip(&[
        "link", "add", a_dev, "type", "veth", "peer", "name", b_dev, "netns", &b.name,
    ])?;
    for (ns, dev, v4, v6) in [(a, a_dev, 1, a6), (b, b_dev, 2, b6)] {
        ns.ip(&["addr", "add", &format!("10.200.{subnet}.{v4}/24"), "dev", dev])?;
        ns.ip(&["link", "set", dev, "up"])?;
        // `nodad`: never tentative, so bind() and connect() can use them at once (the
        // link-local addresses the kernel adds still go through DAD; nothing here uses them).
        ns.ip(&["addr", "add", &format!("{v6}/64"), "dev", dev, "nodad"])?;
    }
    Ok(())
}
