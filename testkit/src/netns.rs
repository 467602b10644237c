//! Network namespaces: a named one (`ip netns add`), and the pair every throw-away workload
//! lives in, joined by a veth (10.200.0.0/16, no default route, so nothing can leave the
//! machine). Each removes itself on drop, also when a test panics.

use std::{
    io,
    net::Ipv4Addr,
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
    pub fn create(name: &str) -> io::Result<Self> {
        cmd("ip", &["netns", "add", name])?;
        let ns = Self {
            name: name.into(),
            path: Path::new("/run/netns").join(name),
        };
        cmd("ip", &["-n", name, "link", "set", "lo", "up"])?;
        Ok(ns)
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

/// A workload namespace and a "remote host" namespace on one /24 of 10.200.0.0/16.
pub struct NetnsPair {
    pub workload: NamedNetns,
    pub remote: NamedNetns,
    pub workload_ip: Ipv4Addr,
    pub remote_ip: Ipv4Addr,
}

impl NetnsPair {
    /// Each pair is its own world, so every pair can use the same subnet.
    pub fn create(tag: &str) -> io::Result<Self> {
        Self::create_on(tag, 1)
    }

    /// On 10.200.`subnet`.0/24: workloads served by one node agent need distinct addresses,
    /// as pods on one node have.
    pub fn create_on(tag: &str, subnet: u8) -> io::Result<Self> {
        let base = unique(tag);
        let workload = NamedNetns::create(&format!("{base}-w"))?;
        let remote = NamedNetns::create(&format!("{base}-r"))?;
        let (workload_ip, remote_ip) = (Ipv4Addr::new(10, 200, subnet, 1), Ipv4Addr::new(10, 200, subnet, 2));
        workload.ip(&[
            "link",
            "add",
            "w0",
            "type",
            "veth",
            "peer",
            "name",
            "r0",
            "netns",
            &remote.name,
        ])?;
        workload.ip(&["addr", "add", &format!("{workload_ip}/24"), "dev", "w0"])?;
        remote.ip(&["addr", "add", &format!("{remote_ip}/24"), "dev", "r0"])?;
        workload.ip(&["link", "set", "w0", "up"])?;
        remote.ip(&["link", "set", "r0", "up"])?;
        Ok(Self {
            workload,
            remote,
            workload_ip,
            remote_ip,
        })
    }
}
