//! ISTIO_OUTPUT for one connect(), whichever hook saw it: `connect4` (AF_INET sockets) or
//! `connect6` (AF_INET6 sockets, to a native IPv6 address or a v4-mapped IPv4 one). The hooks
//! read and write their own contexts; what iptables or ip6tables would decide, and what is
//! recorded for the proxy, is decided here once.
use core::ptr::read_volatile;

use aya_ebpf::{
    EbpfContext as _,
    bindings::{bpf_sock, bpf_sock_addr, sockaddr},
    helpers::{
        bpf_bind, bpf_get_current_ancestor_cgroup_id, bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_ns,
    },
    programs::SockAddrContext,
};
use redirect_common::{
    AMBIENT_CONN_MARK, AMBIENT_MARK_MASK, ChainId, ConnFacts, DNS_PROXY_PORT, IPPROTO_TCP, IPPROTO_UDP, OrigDst,
    PendingOrigDst, TPROXY_OUTBOUND_MARK, Target, UdpFlowKey,
    addr::{self, Addr, Family},
    events, workload_flags,
};

use crate::{
    chain,
    maps::{
        AGENT_SOCKETS, ORIG_BY_COOKIE, SYN_MARK_BY_COOKIE, UDP_FLOWS, UDP_ORIG, count_event, iface_entries, ipv6_on,
        is_local_addr, pod_addr, route, workload,
    },
    owner::{owner, task_owner},
};

/// The loopback device's index, the same in every network namespace.
const LOOPBACK_IFINDEX: u32 = 1;

/// The socket a connect or sendmsg hook judges, with its cookie and protocol: a TCP or UDP
/// one that is not the agent's own. `None` for any other (a ping socket's connect, say, which
/// no hook of ours can follow to its packets).
///
/// The agent's upstream sockets are the ones it gave storage in `AGENT_SOCKETS` (node mode
/// attaches above the agent, so the hooks see its connects too). Not a mark, which a workload
/// with CAP_NET_ADMIN in its namespace can set too (iptables exempts the proxy by owner, and
/// the sidecar rules have no mark rule).
///
/// # Safety
///
/// `sa` must be the context the kernel passed to this run of a `cgroup/connect4` or
/// `cgroup/connect6` program: its field reads are then context accesses the verifier checked
/// at load and rewrote into reads of the kernel's `bpf_sock_addr_kern`.
#[inline(always)]
pub unsafe fn judged_socket(sa: *mut bpf_sock_addr) -> Option<(*mut bpf_sock, u64, u8)> {
    // SAFETY: 4-byte read of the context's `protocol`, and the 8-byte `sk`, a full socket
    // (`PTR_TO_SOCKET`, never null for these hooks; checked anyway); see `# Safety`.
    let (protocol, sk) = unsafe { (read_volatile(&raw const (*sa).protocol), (*sa).__bindgen_anon_1.sk) };
    let proto = match protocol {
        p if p == u32::from(IPPROTO_TCP) => IPPROTO_TCP,
        p if p == u32::from(IPPROTO_UDP) => IPPROTO_UDP,
        _ => return None,
    };
    if sk.is_null() {
        return None;
    }
    // SAFETY: the helper reads `ctx->sk` (non-null, checked above) and returns its storage in
    // the map, or null; the pointer is only tested, never dereferenced.
    if !unsafe { AGENT_SOCKETS.get_ptr_mut(&SockAddrContext::new(sa)) }.is_null() {
        return None;
    }
    // SAFETY: the program's own context is the one argument (for sock_addr programs the
    // kernel's variant of the helper reads the socket from it); see `# Safety`.
    let cookie = unsafe { bpf_get_socket_cookie(sa.cast()) };
    Some((sk, cookie, proto))
}

/// A connect or sendmsg hook's judgement: the context's socket ([`judged_socket`]; a UDP one
/// only with `udp_only`), the destination and the socket's own address as `read` takes them
/// from the context and the socket, and [`decide`]'s answer.
///
/// # Safety
///
/// `ctx` must be this run's context of a connect4/6 or sendmsg4/6 hook, and `read` read only
/// context fields and the full socket it is given (the `user_addr` functions of the hook's
/// family).
#[inline(always)]
pub unsafe fn judge(
    ctx: &SockAddrContext,
    udp_only: bool,
    read: impl FnOnce(*mut bpf_sock_addr, *mut bpf_sock) -> (Addr, u16, Addr),
) -> Option<Redirect> {
    let sa = ctx.sock_addr;
    // SAFETY: `sa` is this run's own context (see `# Safety`).
    let (sk, cookie, proto) = unsafe { judged_socket(sa) }?;
    if udp_only && proto != IPPROTO_UDP {
        return None;
    }
    let (dst, dst_port, src) = read(sa, sk);
    let c = Connect {
        sk,
        cookie,
        proto,
        sending: udp_only,
        // SAFETY: the helper's one argument is the program's own context (it reads the
        // socket's namespace from it); every sock_addr hook may call it (5.7+, probed).
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        dst,
        dst_port,
        src,
    };
    // SAFETY: `c.sk` is the socket `judged_socket` returned for this run's context.
    unsafe { decide(&c) }
}

/// Binds the socket to `addr` (a `SockaddrIn`/`SockaddrIn6` of port 0) before the hook lets
/// the connect proceed: [`Redirect::bind`]. Best effort: should it fail (the address just went
/// away), the socket keeps the source the kernel picks for the loopback listener, and only
/// what getsockname shows differs.
///
/// # Safety
///
/// As [`judged_socket`]: `sa` is this connect4/connect6 run's own context, which `bpf_bind`
/// may take (those two hooks only).
#[inline(always)]
pub unsafe fn bind<T>(sa: *mut bpf_sock_addr, addr: &mut T) {
    // SAFETY: `addr` is a whole sockaddr of the family the hook's socket takes, on our stack,
    // and the length is its size, which the kernel checks before reading; see `# Safety`.
    let _ = unsafe {
        bpf_bind(
            sa,
            core::ptr::from_mut::<T>(addr).cast::<sockaddr>(),
            core::mem::size_of::<T>() as i32,
        )
    };
}

/// A connect() (or a UDP sendmsg() to an address) as its hook read it.
pub struct Connect {
    /// The socket, its cookie and protocol ([`judged_socket`]).
    pub sk: *mut bpf_sock,
    pub cookie: u64,
    pub proto: u8,
    /// A datagram's sendmsg (an unconnected UDP send), not a connect.
    pub sending: bool,
    pub netns_cookie: u64,
    /// Where the app connects, in [`redirect_common::addr`] form (IPv4 v4-mapped), as it
    /// passed it: `0.0.0.0` and `::` are resolved here, as the kernel would.
    pub dst: Addr,
    /// Host order.
    pub dst_port: u16,
    /// The socket's bound address; [`addr::UNSPECIFIED`] (or 0.0.0.0) when unbound.
    pub src: Addr,
}

/// Where the hook must send a redirected connect: the capture listener's address and port,
/// and the source to bind the socket to first (see [`source`]; [`addr::UNSPECIFIED`]: none).
pub struct Redirect {
    pub addr: Addr,
    pub port: u16,
    pub bind: Addr,
}

/// The nat OUTPUT decision for `c`: `Some` when the chain of its family says REDIRECT,
/// IN_REDIRECT or (DNS) REDIRECT to 15053, after the original destination has been recorded
/// under the socket's cookie. A UDP flow is counted on its first datagram only, as conntrack
/// sends only that one through nat; TCP's REDIRECT chains hold `-p tcp` rules only, so a UDP
/// flow jumping to them comes back and walks on (`chain::decide`).
///
/// # Safety
///
/// `c.sk` must be the socket [`judged_socket`] returned for this run's context (the owner is
/// read through it).
#[inline(always)]
pub unsafe fn decide(c: &Connect) -> Option<Redirect> {
    let workload = workload(c.netns_cookie)?;
    // A workload enrolled with its cgroup: ISTIO_OUTPUT is that cgroup's, as it is for a
    // `run` instance attached there.
    if workload.cgroup_id != 0
        // SAFETY: the helper takes only an integer (the ancestor's depth: any value is
        // accepted, and one deeper than the task's own cgroup gives 0) and reads the current
        // task.
        && unsafe { bpf_get_current_ancestor_cgroup_id(workload.cgroup_level as i32) } != workload.cgroup_id
    {
        return None;
    }
    let (dst, family) = resolve_unspecified(c);
    // ip6tables has rules for a pod only once it has an IPv6 address (Istio decides dual
    // stack from the pod's addresses); without them nat OUTPUT lets IPv6 through.
    if family == Family::V6 && !ipv6_on(c.netns_cookie) {
        return None;
    }
    let (uid, gid) = match c.proto {
        // SAFETY: `c.sk` is this run's socket, a full TCP one (`judged_socket`).
        IPPROTO_TCP => unsafe { owner(c.sk) },
        // SAFETY: reads the current task's credentials, through the kernel's BTF.
        _ => unsafe { task_owner() },
    };
    let out_lo = is_local_addr(c.netns_cookie, &dst);
    // SAFETY: `c.sk` is this run's socket (`judged_socket`), whose fields the context lets a
    // program read; a 4-byte read of `mark` (SO_MARK).
    let sk_mark = unsafe { read_volatile(&raw const (*c.sk).mark) };
    // TPROXY's `ip rule fwmark MARK lookup TABLE` (`local default dev lo`), which the agent
    // installs with the workload (whose `tproxy_mark` is 0 otherwise): a socket with that mark
    // goes over lo whatever its destination. Unbound, an IPv4 one's connect to an address not
    // of the namespace fails (ENETUNREACH) before nat OUTPUT would see it, where a datagram
    // sent unconnected leaves from its destination; an IPv6 one leaves from `::6`, lo's
    // address that source selection picks for it.
    // Worked out without branches where it can be: each one doubles what the verifier walks.
    // Ambient's `ip rule fwmark 0x111/0xfff lookup 100` is the same kind of rule.
    let ambient = workload.flags & workload_flags::AMBIENT != 0;
    let routed_home = ((workload.tproxy_mark != 0) & (sk_mark == workload.tproxy_mark))
        | (ambient & (sk_mark & AMBIENT_MARK_MASK == AMBIENT_CONN_MARK));
    let marked_to_lo = routed_home & !out_lo;
    let unbound = addr::is_unbound(&c.src);
    if marked_to_lo && family == Family::V4 && unbound && !c.sending {
        return None;
    }
    let out_lo = out_lo | marked_to_lo;
    if never_leaves(c, family, out_lo) {
        return None;
    }
    // The source nat OUTPUT sees: the bound one, or for an unbound socket the one routing
    // picks, which the redirect then binds (`source`). `-s ::6/128` must see the `::6` a
    // socket dialing `[::6]:P` gets from routing, as `-s 127.0.0.6/32` never sees 127.0.0.6
    // from an unbound socket (127/8 routes have source 127.0.0.1). Computed before the walk,
    // though only a redirect binds it: what is live across the walk's call is what the
    // verifier must tell apart there, and this one value, rather than the destination and
    // `out_lo` it comes from, keeps the number of states it walks with small.
    let bind = source(c, &dst, out_lo, family, marked_to_lo, ambient);
    // Only a workload with an interface list (`-c`) has rules that match devices: the others'
    // connects skip a second route lookup.
    let ifaces = if workload.flags & workload_flags::IFACES != 0 {
        // SAFETY: `c.sk` is this run's socket (`judged_socket`), whose fields the context lets
        // a program read; a 4-byte read of `bound_dev_if` (SO_BINDTODEVICE, 0 for none).
        let bound_dev_if = unsafe { read_volatile(&raw const (*c.sk).bound_dev_if) };
        // SAFETY: `dst` is a live local for the call, a whole Addr.
        unsafe { redirect_out_ifaces(c.netns_cookie, &raw const dst, u32::from(out_lo), bound_dev_if) }
    } else {
        0
    };
    let facts = ConnFacts {
        family: family as u8,
        proto: c.proto,
        dst_addr: dst,
        dst_port: c.dst_port,
        src_addr: if addr::words_eq(&bind, &addr::UNSPECIFIED) {
            c.src
        } else {
            bind
        },
        out_lo,
        uid,
        gid,
        in_owner_groups: workload.in_owner_groups(gid),
        ifaces,
        // The first packet leaves with the socket's mark: ambient's rules match it (ztunnel's
        // 0x539); the sidecar's nat OUTPUT has no mark rule.
        mark: sk_mark,
        established: false,
    };
    let counting = match c.proto {
        IPPROTO_TCP => true,
        _ => match udp_flow(c.cookie, &dst, c.dst_port) {
            UdpFlow::New => true,
            UdpFlow::Seen => false,
            // conntrack's reverse direction: no nat rule sees it.
            UdpFlow::Reply => return None,
        },
    };
    let decided = chain::decide(c.netns_cookie, workload, ChainId::Output, &facts, counting);
    // TPROXY mode: mangle OUTPUT (before nat's, on the same destination) marks the proxy's
    // own loopback connections, which mangle ISTIO_INBOUND tells apart when they come back in.
    if workload.flags & workload_flags::TPROXY != 0 && c.proto == IPPROTO_TCP && out_lo {
        let marked = ConnFacts { mark: sk_mark, ..facts };
        // Counted (every MARK that matches counts, as none ends the walk), then asked whether
        // one did before a RETURN.
        let _ = chain::decide(c.netns_cookie, workload, ChainId::MarkOutput, &marked, true);
        if chain::decide(c.netns_cookie, workload, ChainId::MarkOutput, &marked, false) == Some(Target::Mark) {
            let _ = SYN_MARK_BY_COOKIE.insert(c.cookie, TPROXY_OUTBOUND_MARK, 0);
        } else {
            // A connect again after one that failed: its SYN is not marked this time.
            let _ = SYN_MARK_BY_COOKIE.remove(c.cookie);
        }
    }
    let (target, port) = match decided {
        Some(t @ Target::Redirect) => (t, workload.outbound_port),
        Some(t @ Target::InRedirect) => (t, workload.inbound_port),
        Some(t @ Target::DnsRedirect) => (t, DNS_PROXY_PORT),
        _ => return None,
    };
    let orig = OrigDst::new(dst, c.dst_port, target);
    // Redirect even if the record fails (the LRU only fails under memory pressure): the proxy
    // then finds no original destination and resets the connection, which is loud, where
    // leaving it uncaptured would silently bypass the mesh.
    let recorded = match c.proto {
        IPPROTO_TCP => {
            let pending = PendingOrigDst {
                netns_cookie: c.netns_cookie,
                orig,
                _pad: 0,
            };
            ORIG_BY_COOKIE.insert(c.cookie, pending, 0)
        }
        // For the answer's source (recvmsg) and the connected socket's peer (getpeername).
        _ => UDP_ORIG.insert(c.cookie, orig, 0),
    };
    if recorded.is_err() {
        count_event(workload, events::ORIG_DST_NOT_RECORDED);
    }
    Some(Redirect {
        addr: addr::localhost(family),
        port,
        bind,
    })
}

/// The low bits of a `UDP_FLOWS` value (the rest is when the flow last saw a datagram, ns).
pub mod flow_bits {
    /// The flow began with a datagram this socket received (recvmsg4/6 noted it): what the
    /// socket sends back is its reply direction.
    pub const REPLY: u64 = 1;
    /// Both directions were seen: conntrack keeps such a flow for its stream timeout.
    pub const BOTH: u64 = 2;
    pub const ALL: u64 = REPLY | BOTH;
}

/// Whether the flow whose `UDP_FLOWS` value is `v` is still one conntrack keeps at `now`: quiet
/// for at most `nf_conntrack_udp_timeout` (30 s), or `_stream` (120 s) once it was answered.
#[inline(always)]
pub fn udp_flow_alive(v: u64, now: u64) -> bool {
    let timeout = if v & flow_bits::BOTH != 0 {
        120_000_000_000
    } else {
        30_000_000_000
    };
    now.saturating_sub(v & !flow_bits::ALL) <= timeout
}

/// How a UDP datagram relates to the flows conntrack would hold.
#[derive(Clone, Copy, PartialEq, Eq)]
enum UdpFlow {
    /// The first of a flow (or the first after it went quiet): nat sees it, and counts it.
    New,
    /// A later datagram of a flow this socket began: nat decided at its first, uncounted now.
    Seen,
    /// A reply to a peer that began the flow: nat never sees it.
    Reply,
}

/// Where this datagram stands among the socket's flows, noting it sent now.
#[inline(always)]
fn udp_flow(cookie: u64, dst: &Addr, port: u16) -> UdpFlow {
    let key = UdpFlowKey::new(cookie, *dst, port);
    // SAFETY: the helper takes no argument and reads a clock.
    let now = unsafe { bpf_ktime_get_ns() } & !flow_bits::ALL;
    // SAFETY: the reference is copied from at once (8 bytes), while the value is mapped.
    let (flow, bits) = match unsafe { UDP_FLOWS.get(key) }.copied() {
        Some(v) if udp_flow_alive(v, now) => match v & flow_bits::REPLY != 0 {
            true => (UdpFlow::Reply, v & flow_bits::ALL | flow_bits::BOTH),
            false => (UdpFlow::Seen, v & flow_bits::ALL),
        },
        _ => (UdpFlow::New, 0),
    };
    let _ = UDP_FLOWS.insert(key, now | bits, 0);
    flow
}

/// The address routing would have given an unbound socket for its original destination,
/// which under REDIRECT it keeps (the NAT rewrites only the destination): the app's
/// `getsockname()` shows it, and the proxy sees it as the connection's source. Connected to
/// the capture listener on loopback instead, the kernel would pick 127.0.0.1 (`::1`), so the
/// hooks bind it first (`bpf_bind`, port 0: the port is still the kernel's pick at connect).
///
/// - A destination that is one of the namespace's own addresses: that address (a local
///   route's source is its destination).
/// - An IPv6 destination a TPROXY workload's marked socket reaches over lo
///   (`marked_to_lo`): `::6`; an IPv4 one (a datagram's): the destination. An ambient
///   workload's lo has no `::6` (istio-cni adds none), so source selection passes over lo's
///   `::1` (too small a scope) to a global address of the pod's: as for the next case.
/// - Any other non-loopback destination: the source the namespace's main routing table gives
///   it (`ROUTE_SOURCES`: the longest matching route's preferred source, else its device's
///   address), else the pod's address of the family (`POD_ADDRS`). Other policy routing
///   (rules other than the main table and TPROXY's own) is not mirrored.
/// - Loopback destinations, and sockets the app bound itself: nothing to do
///   ([`addr::UNSPECIFIED`]; not an `Option`, whose `None` leaves the payload's registers
///   unwritten, and the verifier refuses to copy an unwritten register).
#[inline(always)]
fn source(c: &Connect, dst: &Addr, out_lo: bool, family: Family, marked_to_lo: bool, ambient: bool) -> Addr {
    let unbound = addr::is_unbound(&c.src);
    if !unbound || addr::is_loopback(dst) {
        return addr::UNSPECIFIED;
    }
    if out_lo && !(marked_to_lo && ambient && family == Family::V6) {
        return if marked_to_lo && family == Family::V6 {
            addr::passthrough_src(Family::V6)
        } else {
            *dst
        };
    }
    let route_src = route(c.netns_cookie, dst).src;
    if !addr::words_eq(&route_src, &addr::UNSPECIFIED) {
        return route_src;
    }
    pod_addr(c.netns_cookie, family).unwrap_or(addr::UNSPECIFIED)
}

/// Which entries of the workload's interface list name the device a connection to `dst`
/// leaves by (`-o IFACE`, `-c`): lo (ifindex 1 in every namespace) when `out_lo`, else the
/// device the socket is bound to (SO_BINDTODEVICE), else the main routing table's for it. A *global* BPF function, verified once on its own: inlined, its
/// lookups multiplied the states connect6 is verified in past what 6.1's verifier allows.
///
/// # Safety
///
/// `dst` is null or points at a whole, live Addr for the call (the verifier checks it as
/// memory of its BTF type's size, possibly null).
#[unsafe(no_mangle)]
#[inline(never)]
pub unsafe extern "C" fn redirect_out_ifaces(
    netns_cookie: u64,
    dst: *const Addr,
    out_lo: u32,
    bound_dev_if: u32,
) -> u32 {
    if dst.is_null() {
        return 0;
    }
    let oif = if out_lo != 0 {
        LOOPBACK_IFINDEX
    } else if bound_dev_if != 0 {
        bound_dev_if
    } else {
        // SAFETY: non-null (checked above) and, by the contract, a whole live Addr.
        route(netns_cookie, unsafe { &*dst }).oif
    };
    iface_entries(netns_cookie, oif)
}

/// Connects the kernel fails before nat OUTPUT would see a packet; they are left to fail as
/// they would (judging them would count a decision iptables never makes, and redirecting them
/// would let them reach a listener they could not):
///
/// - IPv4 from a socket bound to a loopback address, to anything but lo: the route lookup
///   fails it (EINVAL). IPv6 has no such rule: a socket bound to `::1` dialing out is captured
///   by ip6tables like any other.
/// - A v4-mapped destination from an AF_INET6 socket bound to an IPv6 address (not
///   v4-mapped): ENETUNREACH.
#[inline(always)]
fn never_leaves(c: &Connect, family: Family, out_lo: bool) -> bool {
    match family {
        Family::V4 => {
            (addr::is_loopback(&c.src) && !out_lo)
                || (!addr::is_v4(&c.src) && !addr::words_eq(&c.src, &addr::UNSPECIFIED))
        }
        Family::V6 => false,
    }
}

/// The destination the kernel will route `c` to, and the family on the wire. connect() to
/// 0.0.0.0 goes to the bound source, else 127.0.0.1; to `::`, to `::1` (or 127.0.0.1 from a
/// socket bound to a v4-mapped address): the destination the nat table would see.
#[inline(always)]
fn resolve_unspecified(c: &Connect) -> (Addr, Family) {
    let family = addr::family(&c.dst);
    match family {
        Family::V4 if c.dst[3] == 0 => {
            if addr::is_v4(&c.src) && c.src[3] != 0 {
                (c.src, Family::V4)
            } else {
                (addr::localhost(Family::V4), Family::V4)
            }
        }
        Family::V6 if addr::words_eq(&c.dst, &addr::UNSPECIFIED) => {
            if addr::is_v4(&c.src) {
                (addr::localhost(Family::V4), Family::V4)
            } else {
                (addr::LOCALHOST6, Family::V6)
            }
        }
        _ => (c.dst, family),
    }
}
