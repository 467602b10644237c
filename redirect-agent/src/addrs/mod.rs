//! The workload's addresses, kept in the programs' maps from rtnetlink.
//!
//! iptables' `-o lo` is a routing fact: a destination that is one of the namespace's own
//! addresses leaves through loopback. connect4/6 see no route, so the agent mirrors the
//! namespace's addresses of both families into `LOCAL_ADDRS` (127/8 and `::1` are checked in
//! the programs; sk_lookup reads it to tell connections made inside the namespace), and the
//! pod's own address of each family into `POD_ADDRS`: an IPv6 one turns the ip6tables chains on, as
//! istio-iptables installs them only for a pod with an IPv6 address; and its main routing
//! table into `ROUTE_SOURCES` (each route's prefix -> the source it gives), from which connect4/6
//! bind an unbound captured socket to the source routing would have picked and read the device
//! `-o IFACE` sees. For a workload with an interface list (`-c`), the devices its entries name
//! go into `IFACES`. It follows address, route and device changes; on any notification it
//! re-reads the whole set and applies the difference, which cannot drift the way applying
//! single events can after an overrun.

mod netlink;
mod probe_snat;

use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    net::IpAddr,
};

use aya::maps::{HashMap, LpmTrie, MapData, lpm_trie::Key};
pub use netlink::{Link, NetnsAddr};
use netlink_sys::Socket;
pub use probe_snat::{NodeProbes, ProbeSnatMap, remove_pinned as remove_pinned_probe_sources};
use redirect_common::{
    FamilyKey, IfaceKey, LocalAddrKey, RouteDst, RouteInfo,
    addr::{self, Addr, Family},
    chain::INBOUND_PASSTHROUGH_SRC6,
    config::Interface,
};
use tokio::io::unix::AsyncFd;

use crate::sys::Netns;

/// Receive buffer for change notifications.
const RECV_BUFFER: usize = 64 * 1024;

/// The namespace's addresses of both families now, read once (node mode checks them before
/// enrolling).
pub fn read(netns: &Netns) -> io::Result<BTreeSet<IpAddr>> {
    let query = netns.run(netlink::query_socket)?;
    Ok(netlink::ips(&netlink::dump(&query)?))
}

/// The namespace's devices now, read once.
pub fn links(netns: &Netns) -> io::Result<Vec<Link>> {
    netlink::dump_links(&netns.run(netlink::query_socket)?)
}

/// Whether connections from other hosts can be addressed to `ip` (nat PREROUTING would see
/// them), so that another workload holding it too is worth a word: every address but loopback
/// and `::6`, which is on every dual-stack pod's `lo`. Link-local ones too: ip6tables'
/// ISTIO_INBOUND takes them like any other.
fn reachable_from_other_hosts(a: &NetnsAddr) -> bool {
    !a.ip.is_loopback() && a.ip != IpAddr::V6(INBOUND_PASSTHROUGH_SRC6)
}

/// The pod's own address of each family: the first global one, not on `lo`, in the kernel's
/// order (the primary address of the first device that has one: a pod's `eth0`).
fn pod_addrs(addrs: &[NetnsAddr]) -> BTreeMap<Family, IpAddr> {
    let mut out = BTreeMap::new();
    let candidates = addrs
        .iter()
        .filter(|a| a.global && a.ifindex != netlink::LOOPBACK_IFINDEX && reachable_from_other_hosts(a));
    for a in candidates {
        let family = if a.ip.is_ipv4() { Family::V4 } else { Family::V6 };
        out.entry(family).or_insert(a.ip);
    }
    out
}

/// The programs' maps of addresses.
pub struct AddrMaps {
    pub local: HashMap<MapData, LocalAddrKey, u8>,
    pub pods: HashMap<MapData, FamilyKey, Addr>,
    pub routes: LpmTrie<MapData, RouteDst, RouteInfo>,
    pub ifaces: HashMap<MapData, IfaceKey, u32>,
    pub probe_snat: ProbeSnatMap,
}

/// What a route gives a connection: a source (none for a link-local prefix, whose source
/// cannot be bound without its scope, or a device without an address) and its device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct RouteGives {
    src: Option<IpAddr>,
    oif: u32,
}

/// A route's prefix and what it gives (what `ROUTE_SOURCES` holds for a namespace).
type RouteSources = BTreeMap<(IpAddr, u8), RouteGives>;

/// What each main-table route gives: its preferred source (`src`, which the kernel sets on the
/// routes of connected subnets), else an address of its device of the family (global ones
/// first); and its device. Of several routes to one prefix, the one of lowest metric decides.
fn route_sources(routes: &[netlink::MainRoute], addrs: &[NetnsAddr]) -> RouteSources {
    let mut best: BTreeMap<(IpAddr, u8), (u32, RouteGives)> = BTreeMap::new();
    for r in routes {
        let link_local = match r.prefix {
            IpAddr::V4(v4) => v4.is_link_local(),
            IpAddr::V6(v6) => v6.is_unicast_link_local(),
        };
        let of_device = || {
            let mut on_dev = addrs
                .iter()
                .filter(|a| Some(a.ifindex) == r.oif && a.ip.is_ipv4() == r.prefix.is_ipv4());
            on_dev
                .clone()
                .find(|a| a.global)
                .or_else(|| on_dev.next())
                .map(|a| a.ip)
        };
        let gives = RouteGives {
            src: r.prefsrc.or_else(of_device).filter(|_| !link_local),
            oif: r.oif.unwrap_or(0),
        };
        let entry = best.entry((r.prefix, r.len)).or_insert((r.priority, gives));
        if r.priority < entry.0 {
            *entry = (r.priority, gives);
        }
    }
    best.into_iter().map(|(k, (_, gives))| (k, gives)).collect()
}

/// Which entries of an interface list name each device: bit `i` for entry `i`, as `IFACES`
/// holds them; devices no entry names are left out.
fn iface_entries(links: &[Link], list: &[Interface]) -> BTreeMap<u32, u32> {
    links
        .iter()
        .filter_map(|l| {
            let bits = list
                .iter()
                .take(32)
                .enumerate()
                .filter(|(_, i)| i.matches(&l.name))
                .fold(0u32, |b, (n, _)| b | 1 << n);
            (bits != 0).then_some((l.ifindex, bits))
        })
        .collect()
}

/// A device a workload's `-k` entries name, as it is now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VirtDevice {
    pub link: Link,
    /// Its first address of each family, in the kernel's order: where iptables' REDIRECT in
    /// PREROUTING sends what arrives on it (`nf_nat_redirect_ipv4/6` take the head of the
    /// device's list: IPv4's primary address, IPv6's first by scope, global first).
    pub v4: Option<IpAddr>,
    pub v6: Option<IpAddr>,
}

/// Told, at install and after every change, which `-k` devices the namespace has now.
pub trait VirtDevices: Send {
    fn devices(&mut self, devices: &[VirtDevice]) -> io::Result<()>;
}

/// The `-k` devices among `links`: those with a bit of `mask` in `entries`.
fn virt_devices(links: &[Link], entries: &BTreeMap<u32, u32>, mask: u32, addrs: &[NetnsAddr]) -> Vec<VirtDevice> {
    links
        .iter()
        .filter(|l| entries.get(&l.ifindex).is_some_and(|bits| bits & mask != 0))
        .map(|l| {
            let first = |v4: bool| {
                addrs
                    .iter()
                    .find(|a| a.ifindex == l.ifindex && a.ip.is_ipv4() == v4)
                    .map(|a| a.ip)
            };
            VirtDevice {
                link: l.clone(),
                v4: first(true),
                v6: first(false),
            }
        })
        .collect()
}

fn route_key(netns_cookie: u64, (prefix, len): (IpAddr, u8)) -> Key<RouteDst> {
    let family = if prefix.is_ipv4() { Family::V4 } else { Family::V6 };
    Key::new(
        RouteDst::prefix_len(family, len),
        RouteDst::new(netns_cookie, addr::from_ip(prefix)),
    )
}

impl AddrMaps {
    /// Removes every address entry of the workload `netns_cookie`, whoever wrote them: what
    /// unenrolling a workload (or dropping one whose namespace is gone) must leave.
    pub fn remove_all(&mut self, netns_cookie: u64) {
        remove_keys(&mut self.local, |k| k.netns_cookie == netns_cookie);
        remove_keys(&mut self.ifaces, |k| k.netns_cookie == netns_cookie);
        for family in [Family::V4, Family::V6] {
            let _ = self.pods.remove(&FamilyKey::new(netns_cookie, family));
        }
        let routes: Vec<Key<RouteDst>> = self
            .routes
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.data().netns_cookie() == netns_cookie)
            .collect();
        for k in routes {
            let _ = self.routes.remove(&k);
        }
        probe_snat::remove(&mut self.probe_snat, netns_cookie);
    }
}

/// Removes the keys of `map` that `which` picks (read first: removing while iterating a hash
/// map's keys can skip some).
pub(crate) fn remove_keys<K: aya::Pod, V: aya::Pod>(map: &mut HashMap<MapData, K, V>, which: impl Fn(&K) -> bool) {
    let keys: Vec<K> = map.keys().filter_map(Result::ok).filter(|k| which(k)).collect();
    for k in keys {
        let _ = map.remove(&k);
    }
}

/// The namespace's addresses as seen by the programs.
pub struct LocalAddrs {
    maps: AddrMaps,
    netns_cookie: u64,
    /// The workload's id, for the log.
    id: String,
    current: Vec<NetnsAddr>,
    current_routes: RouteSources,
    /// The workload's interface list (`-c`, then `-k`), and what `IFACES` holds for it.
    interfaces: Vec<Interface>,
    current_ifaces: BTreeMap<u32, u32>,
    /// The list's `-k` entries (their bits), and who attaches to the devices they name.
    virt: Option<(u32, Box<dyn VirtDevices>)>,
    /// A blocking socket in the workload's namespace, for dumps and for adding `::6`.
    query: Socket,
    /// What the mode puts on lo besides the maps.
    mode: ModeAddrs,
}

/// What a workload's mode makes of its addresses besides the maps.
pub enum ModeAddrs {
    /// `::6` goes on lo: istio-iptables adds it for the sidecar's IPv6 passthrough.
    Sidecar,
    /// istio-cni's ambient rules add no `::6` (ztunnel dials the app from the client's
    /// address); a node agent has the node's connections to the pod leave from its probe
    /// source.
    Ambient(Option<NodeProbes>),
}

impl LocalAddrs {
    /// Reads the current set and installs it; connect4/6 are not attached yet, so the first
    /// connection already sees it.
    pub fn install(
        netns: &Netns,
        maps: AddrMaps,
        netns_cookie: u64,
        id: &str,
        interfaces: Vec<Interface>,
        virt: Option<(u32, Box<dyn VirtDevices>)>,
        mode: ModeAddrs,
    ) -> io::Result<Self> {
        let query = netns.run(netlink::query_socket)?;
        let mut me = Self {
            maps,
            netns_cookie,
            id: id.to_owned(),
            current: Vec::new(),
            current_routes: RouteSources::new(),
            interfaces,
            current_ifaces: BTreeMap::new(),
            virt,
            query,
            mode,
        };
        // What a killed predecessor (or an earlier enrollment of the namespace) wrote is not
        // this list's: every device is judged afresh.
        remove_keys(&mut me.maps.ifaces, |k| k.netns_cookie == netns_cookie);
        me.refresh()?;
        Ok(me)
    }

    /// Every address of the namespace, both families.
    pub fn addresses(&self) -> BTreeSet<IpAddr> {
        netlink::ips(&self.current)
    }

    fn refresh(&mut self) -> io::Result<()> {
        let mut now = netlink::dump(&self.query)?;
        let pods = pod_addrs(&now);
        // The ip6tables rules come with `::6` on lo, which the proxy connects to the app from.
        if matches!(self.mode, ModeAddrs::Sidecar)
            && pods.contains_key(&Family::V6)
            && !now.iter().any(|a| a.ip == IpAddr::V6(INBOUND_PASSTHROUGH_SRC6))
        {
            netlink::add_to_lo(&self.query, INBOUND_PASSTHROUGH_SRC6)
                .map_err(|e| io::Error::new(e.kind(), format!("adding ::6/128 to lo: {e}")))?;
            tracing::info!("::6/128 added to lo (the IPv6 inbound passthrough source)");
            now = netlink::dump(&self.query)?;
        }
        let (before, after) = (netlink::ips(&self.current), netlink::ips(&now));
        let owned = |addrs: &[NetnsAddr]| -> BTreeSet<IpAddr> {
            addrs
                .iter()
                .filter(|a| reachable_from_other_hosts(a))
                .map(|a| a.ip)
                .collect()
        };
        let (owned_before, owned_after) = (owned(&self.current), owned(&now));
        for ip in after.difference(&before) {
            self.maps
                .local
                .insert(LocalAddrKey::from_ip(self.netns_cookie, *ip), 1, 0)
                .map_err(io::Error::other)?;
            tracing::info!(%ip, "local address added");
        }
        let gained: Vec<IpAddr> = owned_after.difference(&owned_before).copied().collect();
        self.warn_of_shared(&gained);
        for ip in before.difference(&after) {
            let _ = self.maps.local.remove(&LocalAddrKey::from_ip(self.netns_cookie, *ip));
            tracing::info!(%ip, "local address removed");
        }
        let pods_before = pod_addrs(&self.current);
        let mut probe_changes = Vec::new();
        for family in [Family::V4, Family::V6] {
            let key = FamilyKey::new(self.netns_cookie, family);
            let (old, new) = (pods_before.get(&family).copied(), pods.get(&family).copied());
            if old != new {
                probe_changes.push((old, new));
            }
            match (pods_before.get(&family), pods.get(&family)) {
                (old, Some(ip)) if old != Some(ip) => {
                    self.maps
                        .pods
                        .insert(key, addr::from_ip(*ip), 0)
                        .map_err(io::Error::other)?;
                    tracing::info!(%ip, family = family.name(), "pod address");
                }
                (Some(_), None) => {
                    let _ = self.maps.pods.remove(&key);
                    tracing::info!(family = family.name(), "no pod address of this family any more");
                }
                _ => {}
            }
        }
        self.refresh_routes(&now)?;
        self.refresh_ifaces(&now)?;
        // Last, so that a failure in the node's namespace leaves the pod's own maps current;
        // before `current` moves on, so that the next change tries it again.
        if let ModeAddrs::Ambient(Some(probes)) = &self.mode {
            for (old, new) in probe_changes {
                probes.pod_addr(&mut self.maps.probe_snat, old, new)?;
            }
        }
        self.current = now;
        Ok(())
    }

    /// `IFACES` for the devices the interface list names now (renamed, added or removed ones
    /// included).
    fn refresh_ifaces(&mut self, addrs: &[NetnsAddr]) -> io::Result<()> {
        if self.interfaces.is_empty() {
            return Ok(());
        }
        let links = netlink::dump_links(&self.query)?;
        let now = iface_entries(&links, &self.interfaces);
        for (&ifindex, &bits) in &now {
            if self.current_ifaces.get(&ifindex) != Some(&bits) {
                self.maps
                    .ifaces
                    .insert(IfaceKey::new(self.netns_cookie, ifindex), bits, 0)
                    .map_err(io::Error::other)?;
                tracing::info!(ifindex, entries = bits, "device named by the interface list");
            }
        }
        for ifindex in self.current_ifaces.keys().filter(|i| !now.contains_key(i)) {
            let _ = self.maps.ifaces.remove(&IfaceKey::new(self.netns_cookie, *ifindex));
        }
        let virt = self
            .virt
            .as_mut()
            .map(|(mask, hook)| (hook, virt_devices(&links, &now, *mask, addrs)));
        self.current_ifaces = now;
        match virt {
            Some((hook, devices)) => hook.devices(&devices),
            None => Ok(()),
        }
    }

    /// Says, once per address gained, which other namespaces hold it too. Nothing depends on
    /// it: each namespace's sk_lookup instance judges the connections that arrive there by its
    /// own workload's chain, so a workload that takes another's address captures nothing of
    /// the other's. Two pods with one address is still a misconfiguration (or a pod trying to
    /// take another's traffic), worth a word.
    fn warn_of_shared(&self, gained: &[IpAddr]) {
        if gained.is_empty() {
            return;
        }
        let keys: Vec<LocalAddrKey> = self.maps.local.keys().filter_map(Result::ok).collect();
        for ip in gained {
            let a = addr::from_ip(*ip);
            let others: Vec<u64> = keys
                .iter()
                .filter(|k| k.addr == a && k.netns_cookie != self.netns_cookie)
                .map(|k| k.netns_cookie)
                .collect();
            if !others.is_empty() {
                tracing::warn!(
                    id = %self.id,
                    %ip,
                    other_netns_cookies = ?others,
                    "address {ip} is held by another enrolled namespace too; each keeps its own inbound capture"
                );
            }
        }
    }

    fn refresh_routes(&mut self, addrs: &[NetnsAddr]) -> io::Result<()> {
        let now = route_sources(&netlink::dump_routes(&self.query)?, addrs);
        for (route, gives) in &now {
            if self.current_routes.get(route) != Some(gives) {
                let key = route_key(self.netns_cookie, *route);
                let src = gives.src.map_or(addr::UNSPECIFIED, addr::from_ip);
                self.maps
                    .routes
                    .insert(&key, RouteInfo::new(src, gives.oif), 0)
                    .map_err(io::Error::other)?;
                tracing::debug!(prefix = %route.0, len = route.1, src = ?gives.src, oif = gives.oif, "route");
            }
        }
        for route in self.current_routes.keys().filter(|r| !now.contains_key(r)) {
            let _ = self.maps.routes.remove(&route_key(self.netns_cookie, *route));
        }
        self.current_routes = now;
        Ok(())
    }

    /// Follows address changes until the task is dropped.
    pub async fn watch(mut self, netns: Netns) -> io::Result<()> {
        let socket = netns.run(netlink::event_socket)?;
        // SAFETY: `netlink_sys::Socket` owns its descriptor (it closes it on drop, and nothing
        // else does) and `as_raw_fd` always returns that one; the AsyncFd owns the socket until
        // it drops, and this code never swaps it through `get_mut`. (netlink-sys's own
        // TokioSocket makes the same registration through tokio's deprecated `AsyncFd::new`.)
        let events = unsafe { AsyncFd::register(socket)? };
        // Changes between install() and subscribing would be missed otherwise.
        self.refresh()?;
        let mut buf = Vec::with_capacity(RECV_BUFFER);
        loop {
            let mut guard = events.readable().await?;
            // Drain everything queued; the content does not matter, the re-read does.
            loop {
                buf.clear();
                match events.get_ref().recv(&mut buf, 0) {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    // ENOBUFS: events were dropped; the full re-read below covers them.
                    Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {}
                    Err(e) => return Err(e),
                }
            }
            guard.clear_ready();
            if let Err(e) = self.refresh() {
                tracing::warn!("re-reading local addresses: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_route_gives_its_preferred_source_else_its_devices_address() {
        let addrs = [
            a("10.200.233.1", 2, true),
            a("fd00:200:0:233::1", 2, true),
            a("fe80::2", 4, false),
            a("10.200.41.1", 4, true),
            a("fd00:200:0:41::1", 4, true),
        ];
        let route = |p: &str, len, oif, prefsrc: Option<&str>, priority| netlink::MainRoute {
            prefix: p.parse().unwrap(),
            len,
            oif: Some(oif),
            prefsrc: prefsrc.map(|s| s.parse().unwrap()),
            priority,
        };
        let routes = [
            route("10.200.41.0", 24, 4, Some("10.200.41.1"), 0),
            route("fd00:200:0:41::", 64, 4, None, 256),
            route("fd00:200:0:41::", 64, 2, None, 1024),
            route("fe80::", 64, 4, None, 256),
            route("10.96.0.0", 12, 4, None, 0),
        ];
        let got = route_sources(&routes, &addrs);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let src = |k: (&str, u8)| got[&(ip(k.0), k.1)].src;
        assert_eq!(src(("10.200.41.0", 24)), Some(ip("10.200.41.1")));
        assert_eq!(
            src(("fd00:200:0:41::", 64)),
            Some(ip("fd00:200:0:41::1")),
            "lowest metric"
        );
        assert_eq!(got[&(ip("fd00:200:0:41::"), 64)].oif, 4, "lowest metric's device");
        assert_eq!(src(("10.96.0.0", 12)), Some(ip("10.200.41.1")), "the device's address");
        assert_eq!(src(("fe80::", 64)), None, "no link-local source, but the device");
        assert_eq!(got[&(ip("fe80::"), 64)].oif, 4);
    }

    #[test]
    fn interface_entries_name_devices_by_name_and_prefix() {
        let list = redirect_common::config::parse_interfaces("-c", "eth1,veth+,eth1").unwrap();
        let link = |ifindex, name: &str| Link {
            ifindex,
            name: name.to_owned(),
            ether: true,
        };
        let links = [link(1, "lo"), link(2, "eth0"), link(3, "eth1"), link(4, "veth9")];
        let got = iface_entries(&links, &list);
        assert_eq!(got.get(&3), Some(&0b101), "both entries that name eth1");
        assert_eq!(got.get(&4), Some(&0b010));
        assert!(!got.contains_key(&2) && !got.contains_key(&1));
    }

    #[test]
    fn a_virt_device_redirects_to_its_first_address_of_each_family() {
        let link = |ifindex, name: &str, ether| Link {
            ifindex,
            name: name.to_owned(),
            ether,
        };
        let links = [link(2, "eth0", true), link(5, "k6t-eth0", true), link(6, "tun0", false)];
        let list = redirect_common::config::parse_interfaces("-k", "k6t-eth0,tun0").unwrap();
        let entries = iface_entries(&links, &list);
        // In the kernel's order: the IPv4 primary; IPv6's global one ahead of link-local.
        let addrs = [
            a("10.0.2.1", 5, true),
            a("10.0.3.1", 5, true),
            a("fd10::1", 5, true),
            a("fe80::1", 5, false),
            a("10.200.1.1", 2, true),
        ];
        let got = virt_devices(&links, &entries, 0b11, &addrs);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].v4, Some("10.0.2.1".parse().unwrap()));
        assert_eq!(got[0].v6, Some("fd10::1".parse().unwrap()));
        assert!(got[1].v4.is_none() && got[1].v6.is_none() && !got[1].link.ether);
        // A `-c` entry's device is no `-k` device.
        assert!(
            virt_devices(&links, &entries, 0b10, &addrs)
                .iter()
                .all(|d| d.link.ifindex == 6)
        );
    }

    fn a(ip: &str, ifindex: u32, global: bool) -> NetnsAddr {
        NetnsAddr {
            ip: ip.parse().unwrap(),
            ifindex,
            global,
        }
    }

    #[test]
    fn the_pod_address_of_a_family_is_its_first_global_one_off_lo() {
        let addrs = [
            a("127.0.0.1", 1, false),
            a("::1", 1, false),
            a("::6", 1, true),
            a("fe80::1", 2, false),
            a("10.200.1.1", 2, true),
            a("fd00:200:0:1::1", 2, true),
            a("10.200.2.1", 3, true),
        ];
        let pods = pod_addrs(&addrs);
        assert_eq!(pods[&Family::V4], "10.200.1.1".parse::<IpAddr>().unwrap());
        assert_eq!(pods[&Family::V6], "fd00:200:0:1::1".parse::<IpAddr>().unwrap());
        // An IPv4-only pod: no IPv6 one, however many link-local and lo addresses it has.
        let v4_only = [a("::1", 1, false), a("fe80::1", 2, false), a("10.200.1.1", 2, true)];
        assert!(!pod_addrs(&v4_only).contains_key(&Family::V6));
        let owned: Vec<_> = addrs
            .iter()
            .filter(|x| reachable_from_other_hosts(x))
            .map(|x| x.ip)
            .collect();
        // Link-local included (nat PREROUTING sees them too); loopback and ::6 not.
        assert_eq!(
            owned,
            ["fe80::1", "10.200.1.1", "fd00:200:0:1::1", "10.200.2.1"].map(|s| s.parse::<IpAddr>().unwrap())
        );
    }
}
