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
//! node's `lo` (IPv4 with scope host, so that the kernel never picks it for another
//! connection), from the first entry that uses it to the last; the pod's replies to it are
//! delivered locally. One that was there before (somebody else's) is used and left there.

use std::{io, net::IpAddr};

use aya::maps::{HashMap, MapData};
use netlink_packet_route::address::AddressScope;
use netlink_sys::Socket;
use redirect_common::{ProbeSnat, ProbeSnatKey, addr, config::Ambient};

use super::netlink;

/// The map's type as the agent opens it.
pub type ProbeSnatMap = HashMap<MapData, ProbeSnatKey, ProbeSnat>;

/// What an ambient pod served by a node agent gives the node's connections to it.
pub struct NodeProbes {
    map: ProbeSnatMap,
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
    pub fn new(map: ProbeSnatMap, node_netns_cookie: u64, pod_netns_cookie: u64, sources: Ambient) -> io::Result<Self> {
        Ok(Self {
            map,
            node_netns_cookie,
            pod_netns_cookie,
            sources,
            node: netlink::query_socket()?,
        })
    }

    /// The pod's address of one family was `old` and is `new`: the node's connections to
    /// `new` are bound to the family's probe source from now on, and those to `old` no more.
    pub fn pod_addr(&mut self, old: Option<IpAddr>, new: Option<IpAddr>) -> io::Result<()> {
        // Whether the agent put the old entry's source on lo, which the new one takes over.
        let mut owned = false;
        if let Some(old) = old {
            let key = ProbeSnatKey::from_ip(self.node_netns_cookie, old);
            owned = self.map.get(&key, 0).is_ok_and(|v| v.owned != 0);
            let _ = self.map.remove(&key);
        }
        let Some(new) = new else {
            return Ok(());
        };
        let source = match new {
            IpAddr::V4(_) => IpAddr::V4(self.sources.probe_snat_v4),
            IpAddr::V6(_) => IpAddr::V6(self.sources.probe_snat_v6),
        };
        // The address first: an entry whose source cannot be bound would leave the node's
        // connections with their own source, captured as any other.
        let added = netlink::lo_address(&self.node, source, AddressScope::Host, true).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("adding the probe source {source} to the node's lo: {e}"),
            )
        })?;
        // Found there: the agent's own if an entry says so (a predecessor's for this pod, or
        // another pod's), else somebody else's, which stays when the last pod goes.
        let key = ProbeSnatKey::from_ip(self.node_netns_cookie, new);
        let source_addr = addr::from_ip(source);
        owned |=
            added
                || self.map.iter().filter_map(Result::ok).any(|(k, v)| {
                    k.node_netns_cookie == self.node_netns_cookie && v.source == source_addr && v.owned != 0
                });
        self.map
            .insert(key, ProbeSnat::from_ip(source, self.pod_netns_cookie, owned), 0)
            .map_err(io::Error::other)?;
        tracing::info!(pod = %new, %source, "the node's connections to the pod leave from its probe source");
        Ok(())
    }
}

/// Removes the entries the workload of namespace `pod_netns_cookie` has, whoever wrote them,
/// and from the node's `lo` each source no entry uses any more. The node is the calling
/// thread's namespace; sources of another node's entries are left where they are.
pub fn remove(map: &mut ProbeSnatMap, pod_netns_cookie: u64) {
    let entries: Vec<(ProbeSnatKey, ProbeSnat)> = map.iter().filter_map(Result::ok).collect();
    let (gone, kept): (Vec<_>, Vec<_>) = entries
        .into_iter()
        .partition(|(_, v)| v.pod_netns_cookie == pod_netns_cookie);
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
    let mut unused: Vec<addr::Addr> = gone
        .iter()
        .filter(|(k, v)| k.node_netns_cookie == here && v.owned != 0)
        .map(|(_, v)| v.source)
        .collect();
    unused.sort_unstable();
    unused.dedup();
    unused.retain(|s| !kept.iter().any(|(k, v)| k.node_netns_cookie == here && v.source == *s));
    if unused.is_empty() {
        return;
    }
    let node = match netlink::query_socket() {
        Ok(socket) => socket,
        Err(e) => {
            tracing::warn!("the node's probe sources stay on its lo: {e}");
            return;
        }
    };
    for source in unused {
        let ip = addr::to_ip(&source);
        match netlink::lo_address(&node, ip, AddressScope::Host, false) {
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
