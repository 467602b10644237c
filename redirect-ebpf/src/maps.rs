//! Maps, named for what they hold. Declared as BTF maps so that `bpftool map dump` shows their
//! keys and values as the structs of redirect-common, field by field. Sizes here are
//! defaults; the agent resizes the connection maps at load (`--max-tracked-connections`).
use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    btf_maps::{Array, HashMap, LpmTrie, LruHashMap, SkStorage, SockHash, lpm_trie::Key},
    macros::btf_map,
};
use redirect_common::{
    CidrSetKey, CounterKey, FamilyKey, IfaceKey, LocalAddrKey, MAX_RULE_COUNTERS, MAX_SET_MEMBERS, MAX_WORKLOADS,
    OrigDst, PendingOrigDst, PortSetKey, ProbeSnat, ProbeSnatKey, RouteDst, RouteInfo, SetMember, TupleKey, UdpFlowKey,
    VirtFlow, VirtFlowKey, VirtIface, Workload,
    addr::{self, Addr, Family},
    events,
};

const WORKLOAD_SLOTS: usize = MAX_WORKLOADS as usize;
const EVENT_SLOTS: usize = WORKLOAD_SLOTS * events::PER_WORKLOAD as usize;
/// The per-namespace maps below hold this many entries per workload (a namespace's addresses,
/// routes, named devices), room for what a pod has several times over.
const PER_WORKLOAD: usize = 16;
/// Hash maps that hold an entry per enrolled workload (or per address or device of one):
/// allocated as entries are added, so that room for `MAX_WORKLOADS` costs nothing until used.
const ON_DEMAND: usize = BPF_F_NO_PREALLOC as usize;

/// netns cookie -> that workload's chains. Written by the agent only.
#[btf_map]
pub static WORKLOADS: HashMap<u64, Workload, WORKLOAD_SLOTS, ON_DEMAND> = HashMap::new();

/// Addresses of each workload's network namespace (what `-o lo` reaches besides 127/8).
#[btf_map]
pub static LOCAL_ADDRS: HashMap<LocalAddrKey, u8, { PER_WORKLOAD * WORKLOAD_SLOTS }, ON_DEMAND> = HashMap::new();

/// A workload's own address per family (`redirect_common::maps::POD_ADDRS`): an IPv6 one
/// turns its ip6tables chains on.
#[btf_map]
pub static POD_ADDRS: HashMap<FamilyKey, Addr, { 2 * WORKLOAD_SLOTS }, ON_DEMAND> = HashMap::new();

/// The node's connections to ambient pods, and the source each is bound to
/// (`redirect_common::maps::PROBE_SNAT`): an entry per address of each ambient pod, written by
/// a node agent only.
#[btf_map]
pub static PROBE_SNAT: HashMap<ProbeSnatKey, ProbeSnat, { 2 * WORKLOAD_SLOTS }, ON_DEMAND> = HashMap::new();

/// One counter per rule per workload, by its slot (`redirect_common::CounterKey`): allocated
/// as workloads enroll (the agent writes each workload's zeros before its chain), so a
/// workload's rule lists may be of any length. One value for all CPUs, added to atomically: a
/// rule counts connections, not packets, so the adds are rare next to what a connect costs.
#[btf_map]
pub static RULE_COUNTERS: HashMap<CounterKey, u64, { MAX_RULE_COUNTERS as usize }, ON_DEMAND> = HashMap::new();

/// The CIDRs of the workloads' CIDR set entries (`redirect_common::maps::CIDR_SETS`).
/// Written by the agent only.
#[btf_map]
pub static CIDR_SETS: LpmTrie<CidrSetKey, SetMember, { MAX_SET_MEMBERS as usize }> = LpmTrie::new();

/// The (protocol, port) pairs of the workloads' port set entries
/// (`redirect_common::maps::PORT_SETS`). Written by the agent only.
#[btf_map]
pub static PORT_SETS: HashMap<PortSetKey, SetMember, { MAX_SET_MEMBERS as usize }, ON_DEMAND> = HashMap::new();

/// One slot per event per workload: `Workload::event_base() + event`, added to atomically.
#[btf_map]
pub static EVENT_COUNTERS: Array<u64, EVENT_SLOTS> = Array::new();

/// Each workload's main routing table: destination prefix -> the source it gives and its
/// device (`redirect_common::maps::ROUTE_SOURCES`).
#[btf_map]
pub static ROUTE_SOURCES: LpmTrie<RouteDst, RouteInfo, { PER_WORKLOAD * WORKLOAD_SLOTS }> = LpmTrie::new();

/// The devices of each workload's namespace that its interface list (`-c`, `-k`) names ->
/// which entries name them (`redirect_common::maps::IFACES`).
#[btf_map]
pub static IFACES: HashMap<IfaceKey, u32, { PER_WORKLOAD * WORKLOAD_SLOTS }, ON_DEMAND> = HashMap::new();

/// The `-k` devices of each workload's namespace, with the addresses their REDIRECT sends
/// connections to (`redirect_common::maps::VIRT_IFACES`). Written by the agent only.
#[btf_map]
pub static VIRT_IFACES: HashMap<IfaceKey, VirtIface, { PER_WORKLOAD * WORKLOAD_SLOTS }, ON_DEMAND> = HashMap::new();

/// The TCP connections that arrived on a `-k` device, by their tuple as the VM dialed it: nat
/// PREROUTING's decision for each (`redirect_common::maps::VIRT_FLOWS`). LRU, sized with the
/// other connection maps.
#[btf_map]
pub static VIRT_FLOWS: LruHashMap<TupleKey, VirtFlow, 65536> = LruHashMap::new();

/// The redirected ones, by the VM's end, which is what their replies show
/// (`redirect_common::maps::VIRT_REPLIES`): conntrack's NAT entries, without conntrack.
#[btf_map]
pub static VIRT_REPLIES: LruHashMap<VirtFlowKey, VirtFlow, 65536> = LruHashMap::new();

/// Socket cookie -> original destination, from connect() until the handshake completes.
#[btf_map]
pub static ORIG_BY_COOKIE: LruHashMap<u64, PendingOrigDst, 65536> = LruHashMap::new();

/// Connection 4-tuple (+ netns) -> original destination, while the connection lives. The
/// proxy finds it from its accepted socket's addresses.
#[btf_map]
pub static ORIG_BY_TUPLE: LruHashMap<TupleKey, OrigDst, 65536> = LruHashMap::new();

/// Socket cookie -> where the UDP socket's latest captured DNS datagram (or its connect) was
/// going: recvmsg4/6 and getpeername4/6 give the DNS proxy's answers that address, as NAT's
/// reverse translation would. Keyed by socket, not flow: the answer names the proxy, not the
/// resolver, so of two resolvers one socket queried at once the later is named.
#[btf_map]
pub static UDP_ORIG: LruHashMap<u64, OrigDst, 65536> = LruHashMap::new();

/// UDP flows ISTIO_OUTPUT judged -> when each last sent (ns): conntrack's flows, so that only a
/// flow's first datagram counts.
#[btf_map]
pub static UDP_FLOWS: LruHashMap<UdpFlowKey, u64, 65536> = LruHashMap::new();

/// (netns cookie, family) -> the socket listening on that workload's inbound capture port
/// for connections of that family. Filled by sock_ops when a process of the workload listens
/// on it, or by the agent for its own proxy; the kernel removes a socket when it closes.
#[btf_map]
pub static INBOUND_LISTENERS: SockHash<FamilyKey, { 2 * WORKLOAD_SLOTS }> = SockHash::new();

/// Connection 4-tuple (+ netns) -> original destination of an inbound connection sk_lookup
/// handed to the capture listener: from its SYN until sock_ops moves it to `ORIG_BY_TUPLE`
/// (listeners inside the workload's cgroup) or the embedded proxy reads it. Records nothing
/// takes (segments that were no SYN, handshakes never completed) are removed by the agent's
/// sweep (`redirect-agent/src/engine/pending.rs`, which writes `OrigDst::swept`). An LRU of its
/// own, so that a flood of such records never pushes established connections out of
/// `ORIG_BY_TUPLE`.
#[btf_map]
pub static INBOUND_PENDING: LruHashMap<TupleKey, OrigDst, 65536> = LruHashMap::new();

/// Socket-local storage, 1 on each upstream socket the agent made: the connect hooks leave
/// these alone (`output::judged_socket`). Storage lives and dies with its socket, so there is
/// nothing to forget or evict (a map keyed by cookie would keep the spares of an agent that
/// died, and an LRU would evict live ones). Written by the agent only, through the socket's
/// descriptor: a workload cannot mark a socket of its own here, as it could set a mark.
#[btf_map]
pub static AGENT_SOCKETS: SkStorage<u8> = SkStorage::new();

/// Each end of a captured local pair, under its own 4-tuple (+ netns): where sk_msg finds a
/// sender's peer. The kernel removes a socket when it closes.
#[btf_map]
pub static FAST_PATH_SOCKETS: SockHash<TupleKey, 65536> = SockHash::new();

/// Socket cookie -> the mark mangle OUTPUT gives a TPROXY-mode workload's loopback
/// connection (`Target::Mark`: the proxy's own, 1338), from connect4/6 to sock_ops'
/// TCP_CONNECT_CB, which moves it to `SYN_MARKS` once the 4-tuple is known. Microseconds
/// apart; an entry of a connect that failed in between ages out of the LRU.
#[btf_map]
pub static SYN_MARK_BY_COOKIE: LruHashMap<u64, u32, 4096> = LruHashMap::new();

/// Connecting side's 4-tuple (+ netns) -> the mark a TPROXY-mode workload's loopback SYN
/// carries: what mangle PREROUTING's `-m mark` sees when sk_lookup judges that SYN, which has
/// no access to the packet's mark. Only nonzero marks are kept; sk_lookup removes the entry.
#[btf_map]
pub static SYN_MARKS: LruHashMap<TupleKey, u32, 8192> = LruHashMap::new();

/// Sender 4-tuple (+ netns) -> `redirect_common::fast_path` state: which path its bytes take.
#[btf_map]
pub static FAST_PATH_SENDERS: LruHashMap<TupleKey, u8, 65536> = LruHashMap::new();

/// The chains of the workload whose namespace has cookie `netns_cookie`, if the agent enrolled
/// one. The reference is good for the rest of this program run, which is as long as any
/// program can hold it.
#[inline(always)]
pub fn workload(netns_cookie: u64) -> Option<&'static Workload> {
    let w = WORKLOADS.get_ptr(netns_cookie)?;
    // SAFETY: a non-null lookup result points at a whole, 8-aligned Workload value in
    // WORKLOADS (the kernel allocates `value_size` bytes, 8-aligned, per entry), which stays
    // mapped until the program returns: the map outlives every program that uses it. The
    // programs only read it. The agent writes it, by replacing whole entries, and a
    // replacement can reuse this slot while a program reads it (aya's `get` caveat: a
    // preallocated hash map recycles freed slots at once): every byte pattern is a valid
    // Workload (integers only; `n_rules` is bounded by MAX_RULES wherever it is used), so the
    // worst case is a decision taken on a mix of the old and new chain, for a connection that
    // races the agent's update of its workload.
    Some(unsafe { &*w })
}

/// Whether `a` is reached over `lo` from the workload's namespace: 127/8, `::1`, or one of the
/// namespace's own addresses. What "`-o lo`" means to connect4/6, what tells sk_lookup a
/// connection started inside the namespace, and what makes a pair local for the fast path.
#[inline(always)]
pub fn is_local_addr(netns_cookie: u64, a: &Addr) -> bool {
    addr::is_loopback(a) || LOCAL_ADDRS.get_ptr(LocalAddrKey::new(netns_cookie, *a)).is_some()
}

/// The workload's own address of `family`, if it has one.
#[inline(always)]
pub fn pod_addr(netns_cookie: u64, family: Family) -> Option<Addr> {
    // SAFETY: the reference is copied from at once (16 bytes) while the value is mapped (until
    // the program returns), and never kept. Only the agent writes POD_ADDRS, replacing whole
    // entries; a slot recycled while we copy gives other integers, still a valid Addr.
    unsafe { POD_ADDRS.get(FamilyKey::new(netns_cookie, family)) }.copied()
}

/// The source the node's connections to `dst` take, if `dst` is an ambient pod's address
/// and `netns_cookie` the namespace of the node the agent serves it from.
#[inline(always)]
pub fn probe_snat(netns_cookie: u64, dst: &Addr) -> Option<Addr> {
    // SAFETY: the reference is copied from at once (16 bytes) while the value is mapped (until
    // the program returns), and never kept. Only the agent writes PROBE_SNAT, replacing whole
    // entries; a slot recycled while we copy gives other integers, still a valid Addr.
    unsafe { PROBE_SNAT.get(ProbeSnatKey::new(netns_cookie, *dst)) }.map(|v| v.source)
}

/// What the workload's routes say of a connection to `dst`: no source and no device when no
/// route covers it (a plain value, not an `Option`: fewer states for the verifier to tell
/// apart in the callers).
#[inline(always)]
pub fn route(netns_cookie: u64, dst: &Addr) -> RouteInfo {
    // `get` hands out a reference into the trie's node, copied at once (20 bytes, any bytes a
    // valid RouteInfo) while the program holds the RCU read lock that keeps it alive.
    ROUTE_SOURCES
        .get(&Key::new(RouteDst::FULL, RouteDst::new(netns_cookie, *dst)))
        .copied()
        .unwrap_or(RouteInfo::new(addr::UNSPECIFIED, 0))
}

/// Which entries of the workload's interface list name device `ifindex` of its namespace
/// ([`redirect_common::ConnFacts::ifaces`]).
#[inline(always)]
pub fn iface_entries(netns_cookie: u64, ifindex: u32) -> u32 {
    // SAFETY: the reference is copied from at once (8 bytes) while the value is mapped, and
    // never kept; only the agent writes IFACES, whole values.
    unsafe { IFACES.get(IfaceKey::new(netns_cookie, ifindex)) }
        .copied()
        .unwrap_or(0)
}

/// The `-k` device `ifindex` of the workload's namespace, if it is one. A reference, as
/// [`workload`]'s, so that the tc programs' frames hold no copies (BPF's stack is 512 bytes
/// for a whole call chain).
#[inline(always)]
pub fn virt_iface(netns_cookie: u64, ifindex: u32) -> Option<&'static VirtIface> {
    let p = VIRT_IFACES.get_ptr(IfaceKey::new(netns_cookie, ifindex))?;
    // SAFETY: a non-null lookup result points at a whole, 4-aligned VirtIface in VIRT_IFACES,
    // mapped until the program returns; the programs only read it. The agent replaces whole
    // entries, and a replacement may reuse the slot while a program reads it: every byte
    // pattern is a valid VirtIface (integers only).
    Some(unsafe { &*p })
}

/// What nat PREROUTING decided for the connection from a `-k` device `key` names. A
/// reference into the map (see [`virt_iface`]).
#[inline(always)]
pub fn virt_flow(key: &TupleKey) -> Option<&'static VirtFlow> {
    let p = VIRT_FLOWS.get_ptr(key)?;
    // SAFETY: a non-null lookup result points at a whole, 4-aligned VirtFlow, mapped until the
    // program returns (an LRU entry evicted meanwhile is recycled, not unmapped); integers
    // only, so whatever another CPU writes there meanwhile is still a valid VirtFlow, and the
    // callers copy what they keep.
    Some(unsafe { &*p })
}

/// The redirected connection whose VM end is `key` (a reference, as [`virt_flow`]'s).
#[inline(always)]
pub fn virt_reply(key: &VirtFlowKey) -> Option<&'static VirtFlow> {
    let p = VIRT_REPLIES.get_ptr(key)?;
    // SAFETY: as in `virt_flow`.
    Some(unsafe { &*p })
}

/// Whether the workload's ip6tables chains are on: it has an IPv6 address of its own.
#[inline(always)]
pub fn ipv6_on(netns_cookie: u64) -> bool {
    POD_ADDRS.get_ptr(FamilyKey::new(netns_cookie, Family::V6)).is_some()
}

/// The original destination of a captured connection, from the 4-tuple as its connecting end
/// sees it: what `getsockopt(SO_ORIGINAL_DST)` answers, and what the embedded proxy's
/// `OrigDstTable` reads the same way from user space.
#[inline(always)]
pub fn orig_dst(key: &TupleKey) -> Option<OrigDst> {
    // SAFETY: (this lookup and the next) the reference is copied from at once (8 bytes), while
    // the value is mapped (until the program returns), and never kept. The programs write an
    // entry at its connection's handshake and remove it at its close (an INBOUND_PENDING one
    // also when sock_ops moves it or the agent's proxy takes it), so the entry a proxy asks
    // about is stable; if an LRU eviction recycles the slot while we copy (aya's `get`
    // caveat), we copy other integers: still a valid OrigDst (`target` is a u8 decoded with
    // `Target::from_u8`).
    if let Some(v) = unsafe { ORIG_BY_TUPLE.get(key) } {
        return Some(*v);
    }
    // SAFETY: as above.
    unsafe { INBOUND_PENDING.get(key) }.copied()
}

/// The original destination of a connection connect4/6 redirected, from the 4-tuple as its
/// connecting end sees it: only `ORIG_BY_TUPLE`, which sock_ops fills at the connecting end's
/// handshake (inbound ones, kept under the remote client's view, never match a local
/// socket's own view).
#[inline(always)]
pub fn captured_orig_dst(key: &TupleKey) -> Option<OrigDst> {
    // SAFETY: as in `orig_dst`: copied at once while mapped, never kept; any bytes are a
    // valid OrigDst.
    unsafe { ORIG_BY_TUPLE.get(key) }.copied()
}

/// Counts one decision of the workload's rule in `slot`.
#[inline(always)]
pub fn count(netns_cookie: u64, slot: u32) {
    if let Some(c) = RULE_COUNTERS.get_ptr_mut(CounterKey::new(netns_cookie, slot)) {
        // SAFETY: a non-null lookup result: the entry's 8-aligned u64, mapped until the
        // program returns (an entry the agent removes meanwhile is freed after an RCU grace
        // period). As `bump`.
        let _ =
            unsafe { core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(c, 1) };
    }
}

/// The slot of the rule that decides when `dst` is in CIDR set entry `entry` of the workload:
/// its longest matching member's answer. `None`: in no member.
#[inline(always)]
pub fn cidr_member(netns_cookie: u64, entry: u32, dst: &Addr) -> Option<u32> {
    // `get` hands out a reference into the trie's node, copied from at once while the program
    // holds the RCU read lock that keeps it alive.
    CIDR_SETS
        .get(&Key::new(CidrSetKey::FULL, CidrSetKey::new(netns_cookie, entry, *dst)))
        .map(|m| m.decides)
}

/// The same for port set entry `entry`: the member for the pair, if one is.
#[inline(always)]
pub fn port_member(netns_cookie: u64, entry: u32, proto: u8, port: u16) -> Option<u32> {
    // SAFETY: the reference is copied from at once (4 bytes) while the value is mapped, and
    // never kept; only the agent writes PORT_SETS, whole values.
    unsafe { PORT_SETS.get(PortSetKey::new(netns_cookie, entry as u16, proto, port)) }.map(|m| m.decides)
}

/// Counts one `event` (an [`events`] slot) of `workload`.
#[inline(always)]
pub fn count_event(workload: &Workload, event: u32) {
    bump(&EVENT_COUNTERS, workload.event_base() + event);
}

#[inline(always)]
fn bump<const N: usize>(array: &Array<u64, N>, slot: u32) {
    if let Some(c) = array.get_ptr_mut(slot) {
        // SAFETY: a non-null lookup result: the slot's 8-aligned u64, mapped as long as the
        // map (an array's values never move or go). The programs only add to it atomically;
        // the agent reads it, and zeroes it before the slot's workload is enrolled. The old
        // value is dropped, so this is BPF's plain atomic add (XADD), which every kernel's
        // verifier takes.
        let _ =
            unsafe { core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(c, 1) };
    }
}

/// The resolver a UDP socket's datagram from `from`:`port` answers for, when that is the DNS
/// proxy (127.0.0.1:15053, `::1`:15053, or v4-mapped 127.0.0.1 on an AF_INET6 socket) and the
/// socket's latest captured query of the same family went to a resolver: what NAT's reverse
/// translation would make the answer's source.
#[inline(always)]
pub fn dns_answer_source(cookie: u64, from: &Addr, port: u16) -> Option<OrigDst> {
    if port != redirect_common::DNS_PROXY_PORT {
        return None;
    }
    let family = addr::family(from);
    if !addr::words_eq(from, &addr::localhost(family)) {
        return None;
    }
    // SAFETY: the reference is copied from at once (20 bytes), while the value is mapped.
    let orig = unsafe { UDP_ORIG.get(cookie) }.copied()?;
    (addr::family(&orig.addr) == family).then_some(orig)
}

/// A datagram of an enrolled workload's socket came from `from`:`port`: as conntrack, the
/// flow is alive again now; if the socket had none with that peer (or it had gone quiet), the
/// peer began this one, and what the socket sends back is its reply direction, which nat OUTPUT
/// never sees (`output::udp_flow`); a flow the socket began has now been answered. Only for
/// enrolled namespaces: node mode runs this for every socket of the node.
#[inline(always)]
pub fn note_udp_peer(netns_cookie: u64, cookie: u64, from: &Addr, port: u16) {
    use crate::output::{flow_bits, udp_flow_alive};
    if workload(netns_cookie).is_none() {
        return;
    }
    let key = redirect_common::UdpFlowKey::new(cookie, *from, port);
    // SAFETY: the helper takes no argument and reads a clock.
    let now = unsafe { aya_ebpf::helpers::bpf_ktime_get_ns() } & !flow_bits::ALL;
    // SAFETY: the reference is copied from at once (8 bytes), while the value is mapped.
    let bits = match unsafe { UDP_FLOWS.get(key) }.copied() {
        Some(v) if udp_flow_alive(v, now) && v & flow_bits::REPLY == 0 => v & flow_bits::ALL | flow_bits::BOTH,
        Some(v) if udp_flow_alive(v, now) => v & flow_bits::ALL,
        _ => flow_bits::REPLY,
    };
    let _ = UDP_FLOWS.insert(key, now | bits, 0);
}
