//! Node mode's stand-in for istio-cni's node rules for the kubelet's probes of ambient pods
//! (`CreateHostRulesForHealthChecks`):
//!
//! ```text
//! -t nat -A POSTROUTING -j ISTIO_POSTRT
//! -t nat -A ISTIO_POSTRT -m owner --socket-exists -p tcp -m set --match-set istio-inpod-probes-v4 dst -j SNAT --to-source 169.254.7.127
//! ```
//!
//! (and ip6tables' to `fd16:9254:7127:1337:ffff:ffff:ffff:ffff`), where the ipsets hold the
//! ambient pods' addresses. The pod's ISTIO_PRERT accepts what comes from that source, so the
//! probes reach the app uncaptured, not through ztunnel's policy.
//!
//! Without NAT: each address of an ambient pod is an entry of `PROBE_SNAT` under the node's
//! namespace, and connect4/6 (at the node's cgroup root, as node mode attaches them) bind an
//! unbound TCP socket of the node's namespace that connects to it to the pod's probe source.
//! A socket can only be bound to an address of its namespace, so that source goes on the
//! node's `lo` (IPv4 with scope host, IPv6 deprecated, so that the kernel never picks it as
//! another connection's source), from the first entry that uses it to the last; the pod's replies to it are
//! delivered locally. One that was there before (somebody else's) is used and left there.

use std::{io, net::IpAddr, sync::Mutex};

use aya::maps::{HashMap, MapData};
use netlink_packet_route::address::AddressScope;
use netlink_sys::Socket;
use redirect_common::{ProbeSnat, ProbeSnatKey, addr, config::Ambient};

use super::netlink;

/// The map's type as the agent opens it.
pub type ProbeSnatMap = HashMap<MapData, ProbeSnatKey, ProbeSnat>;

/// Held around every change of `PROBE_SNAT` and of the node's `lo` made for it: the pods'
/// address watchers (tokio tasks) and the engine's removals each read the map, then act on
/// what they read (whether an entry still uses a source, whether the agent added it).
static CHANGING: Mutex<()> = Mutex::new(());

/// What an ambient pod served by a node agent gives the node's connections to it.
pub struct NodeProbes {
    /// The node's namespace (the agent's own), whose sockets are the probers'.
    node_netns_cookie: u64,
    /// The pod's.
    pod_netns_cookie: u64,
    /// The pod's `--host-probe-snat` and `--host-probe-v6-snat`.
    sources: Ambient,
    /// A route netlink socket in the node's namespace, for its `lo`.
    node: Socket,
}

impl NodeProbes {
    /// Called on the agent's own thread, in the node's namespace, whose `lo` it manages.
    pub fn new(node_netns_cookie: u64, pod_netns_cookie: u64, sources: Ambient) -> io::Result<Self> {
        Ok(Self {
            node_netns_cookie,
            pod_netns_cookie,
            sources,
            node: netlink::query_socket()?,
        })
    }

    /// The pod's address of one family was `old` and is `new`: the node's connections to
    /// `new` are bound to the family's probe source from now on, and those to `old` no more
    /// (a source no entry uses any more leaves `lo`, if the agent put it there).
    pub fn pod_addr(&self, map: &mut ProbeSnatMap, old: Option<IpAddr>, new: Option<IpAddr>) -> io::Result<()> {
        let _changing = CHANGING.lock().unwrap_or_else(|e| e.into_inner());
        let mut freed = Vec::new();
        if let Some(old) = old {
            let key = ProbeSnatKey::from_ip(self.node_netns_cookie, old);
            // Only this pod's: another holding the address now keeps its entry.
            if let Ok(v) = map.get(&key, 0)
                && v.pod_netns_cookie == self.pod_netns_cookie
            {
                let _ = map.remove(&key);
                freed.push((key, v));
            }
        }
        let added = match new {
            Some(new) => self.add(map, new, &freed),
            None => Ok(()),
        };
        release_unused(map, self.node_netns_cookie, &self.node, &freed);
        added
    }

    fn add(&self, map: &mut ProbeSnatMap, new: IpAddr, freed: &[(ProbeSnatKey, ProbeSnat)]) -> io::Result<()> {
        let source = match new {
            IpAddr::V4(_) => IpAddr::V4(self.sources.probe_snat_v4),
            IpAddr::V6(_) => IpAddr::V6(self.sources.probe_snat_v6),
        };
        // The address first: an entry whose source cannot be bound would leave the node's
        // connections with their own source, captured as any other.
        let added = netlink::lo_address(&self.node, source, AddressScope::Host, true, true).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("adding the probe source {source} to the node's lo: {e}"),
            )
        })?;
        // Found there: the agent's own if an entry says so (a predecessor's for this pod,
        // another pod's, or the one this replaces), else somebody else's, which stays when
        // the last pod goes.
        let source_addr = addr::from_ip(source);
        let ours = |(k, v): &(ProbeSnatKey, ProbeSnat)| {
            k.node_netns_cookie == self.node_netns_cookie && v.source == source_addr && v.owned != 0
        };
        let owned = added || freed.iter().any(ours) || map.iter().filter_map(Result::ok).any(|e| ours(&e));
        map.insert(
            ProbeSnatKey::from_ip(self.node_netns_cookie, new),
            ProbeSnat::from_ip(source, self.pod_netns_cookie, owned),
            0,
        )
        .map_err(io::Error::other)?;
        tracing::info!(pod = %new, %source, "the node's connections to the pod leave from its probe source");
        Ok(())
    }
}

/// Removes the entries the workload of namespace `pod_netns_cookie` has, whoever wrote them,
/// and from the node's `lo` each source the agent put there that no entry uses any more. The
/// node is the calling thread's namespace; sources of another node's entries are left where
/// they are.
pub fn remove(map: &mut ProbeSnatMap, pod_netns_cookie: u64) {
    let _changing = CHANGING.lock().unwrap_or_else(|e| e.into_inner());
    let gone: Vec<(ProbeSnatKey, ProbeSnat)> = map
        .iter()
        .filter_map(Result::ok)
        .filter(|(_, v)| v.pod_netns_cookie == pod_netns_cookie)
        .collect();
    if gone.is_empty() {
        return;
    }
    for (key, _) in &gone {
        let _ = map.remove(key);
    }
    let here = match crate::sys::current_netns_cookie() {
        Ok(cookie) => cookie,
        Err(e) => {
            tracing::warn!("the node's probe sources stay on its lo: its namespace is unknown: {e}");
            return;
        }
    };
    match netlink::query_socket() {
        Ok(node) => release_unused(map, here, &node, &gone),
        Err(e) => tracing::warn!("the node's probe sources stay on its lo: {e}"),
    }
}

/// Takes off the node's `lo` (namespace `node_netns_cookie`, whose socket `node` is) each
/// source of the `freed` entries that the agent put there and no entry left uses. Under
/// [`CHANGING`].
fn release_unused(map: &ProbeSnatMap, node_netns_cookie: u64, node: &Socket, freed: &[(ProbeSnatKey, ProbeSnat)]) {
    let mut unused: Vec<addr::Addr> = freed
        .iter()
        .filter(|(k, v)| k.node_netns_cookie == node_netns_cookie && v.owned != 0)
        .map(|(_, v)| v.source)
        .collect();
    unused.sort_unstable();
    unused.dedup();
    if unused.is_empty() {
        return;
    }
    let kept: Vec<(ProbeSnatKey, ProbeSnat)> = map.iter().filter_map(Result::ok).collect();
    unused.retain(|s| {
        !kept
            .iter()
            .any(|(k, v)| k.node_netns_cookie == node_netns_cookie && v.source == *s)
    });
    for source in unused {
        let ip = addr::to_ip(&source);
        match netlink::lo_address(node, ip, AddressScope::Host, false, false) {
            Ok(_) => tracing::info!(%ip, "probe source removed from the node's lo (no ambient pod uses it)"),
            Err(e) => tracing::warn!(%ip, "removing the probe source from the node's lo: {e}"),
        }
    }
}

/// `cleanup` of an instance whose `PROBE_SNAT` is pinned at `pin`: every entry goes, and the
/// sources they put on the calling thread's namespace's `lo` with them.
pub fn remove_pinned(pin: &std::path::Path) {
    let Ok(data) = MapData::from_pin(pin) else {
        return;
    };
    let Ok(mut map) = ProbeSnatMap::try_from(aya::maps::Map::HashMap(data)) else {
        return;
    };
    let mut pods: Vec<u64> = map
        .iter()
        .filter_map(Result::ok)
        .map(|(_, v)| v.pod_netns_cookie)
        .collect();
    pods.sort_unstable();
    pods.dedup();
    for pod in pods {
        remove(&mut map, pod);
    }
}
