//! `sk_lookup` on the workload's network namespace: ISTIO_INBOUND, evaluated where the kernel
//! picks the socket for a new connection from another host.
//!
//! Why sk_lookup and not tc + `bpf_sk_assign` or a DNAT: it runs once per connection (on the
//! SYN's listener lookup), not per packet; it rewrites nothing, so the accepted socket's local
//! address *is* the original destination and no conntrack or NAT state exists to lose; and
//! it is attached to the namespace, which is exactly the scope of nat PREROUTING. A tc program
//! would see every packet and need its own connection tracking to pick the socket only once.
//!
//! Which workload a connection is for is the namespace the program runs in, and sk_lookup has
//! no helper that names it (`bpf_get_netns_cookie` is not offered to sk_lookup on any kernel up
//! to 6.18, nor `bpf_get_attach_cookie`). So the agent loads one instance of this program per
//! workload, with that workload's netns cookie as a read-only constant ([`NETNS_COOKIE`]), and
//! links it to that namespace only: a SYN is judged by the chain of the namespace it arrived
//! in, whatever addresses other namespaces hold.
use core::ptr::read_volatile;

use aya_ebpf::{
    Global,
    bindings::{bpf_sk_lookup, sk_action},
    macros::sk_lookup,
    programs::SkLookupContext,
};
use redirect_common::{
    ConnFacts, FamilyKey, IPPROTO_TCP, OrigDst, Target, TupleKey,
    addr::{self, Addr, Family},
    events, port, workload_flags,
};

use crate::{
    chain,
    instance::NETNS_COOKIE,
    maps::{
        INBOUND_LISTENERS, INBOUND_PENDING, SYN_MARKS, count_event, iface_entries, ipv6_on, is_local_addr, workload,
    },
};

/// 1 when this kernel has the context's `ingress_ifindex` (Linux 5.17+;
/// `redirect_common::globals::SK_LOOKUP_INGRESS_IFINDEX`), set by the agent at load. A
/// constant, so the verifier of an older kernel never walks the read it could not allow.
#[unsafe(no_mangle)]
static INGRESS_IFINDEX: Global<u8> = Global::new(0);

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
/// The loopback device's index, the same in every network namespace.
const LOOPBACK_IFINDEX: u32 = 1;

// `bpf_sk_lookup.remote_port` is read as a `u32` (see `decide`): its offset keeps that read
// aligned.
const _: () = assert!(core::mem::offset_of!(bpf_sk_lookup, remote_port) % 4 == 0);

#[sk_lookup]
pub fn redirect_sk_lookup(ctx: SkLookupContext) -> u32 {
    // SAFETY: `ctx` is this invocation's context: the macro builds it from the program's only
    // argument, the `bpf_sk_lookup` the kernel passes, which is what `decide` requires.
    unsafe { decide(&ctx) }
}

/// ISTIO_INBOUND (iptables' for IPv4, ip6tables' for IPv6) for one SYN from another host:
/// hands the connection to the workload's capture listener when the chain says IN_REDIRECT,
/// and records its original destination.
///
/// # Safety
///
/// `ctx.lookup` must be the context the kernel passed to this run of an `sk_lookup` program.
/// Its field reads are then context accesses: the verifier checked each one's offset and size
/// against what sk_lookup may read when the program was loaded (refusing the program
/// otherwise) and rewrote it into a read of the kernel's `bpf_sk_lookup_kern`.
#[inline(always)]
unsafe fn decide(ctx: &SkLookupContext) -> u32 {
    let l = ctx.lookup;
    // SAFETY: 4-byte reads of the context's `family` and `protocol` (see `# Safety`).
    let (family, protocol) = unsafe {
        (
            read_volatile(&raw const (*l).family),
            read_volatile(&raw const (*l).protocol),
        )
    };
    if (family != AF_INET && family != AF_INET6) || protocol != u32::from(IPPROTO_TCP) {
        return sk_action::SK_PASS;
    }
    let family = if family == AF_INET { Family::V4 } else { Family::V6 };
    // SAFETY: 4-byte reads of the context's addresses (see `# Safety`).
    let (local_ip, remote_ip) = unsafe { addresses(l, family) };
    // Whatever the destination: nat PREROUTING's ISTIO_INBOUND sees every TCP connection that
    // enters the namespace, and the kernel only looks for a listener here for a destination
    // it delivers locally.
    let netns_cookie = NETNS_COOKIE.load();
    let Some(workload) = workload(netns_cookie) else {
        return sk_action::SK_PASS;
    };
    if workload.flags & workload_flags::INBOUND == 0 {
        return sk_action::SK_PASS;
    }
    // ip6tables has no rules for a pod without an IPv6 address of its own.
    if family == Family::V6 && !ipv6_on(netns_cookie) {
        return sk_action::SK_PASS;
    }
    // A connection made inside the namespace (its source is one of the namespace's own
    // addresses) never passes nat PREROUTING: ISTIO_OUTPUT has decided it already. The kernel
    // drops packets from other hosts that carry a local source address (martians), so the
    // source tells the two apart. (`ingress_ifindex == lo` would say it directly, but needs
    // 5.17; the agent supports 5.15.) In TPROXY mode ISTIO_INBOUND is mangle's, which sees
    // them too, as `-i lo`.
    let from_self = addr::words_eq(&remote_ip, &local_ip) || is_local_addr(netns_cookie, &remote_ip);
    let tproxy = workload.flags & workload_flags::TPROXY != 0;
    if from_self && !tproxy {
        return sk_action::SK_PASS;
    }
    // SAFETY: a 4-byte read of the context's `local_port` (host order).
    let local_port = port::host(unsafe { read_volatile(&raw const (*l).local_port) });
    #[allow(
        clippy::cast_ptr_alignment,
        reason = "remote_port's offset in bpf_sk_lookup is 4-aligned (the `const _` assertion in this module)"
    )]
    // SAFETY: a 4-byte read at the context's `remote_port`, through a cast: the field is a
    // `__be16` followed by 16 bits of padding in the bindings (both inside `bpf_sk_lookup`),
    // and the verifier accepts the 4-byte load at its offset on every kernel (the field was
    // narrowed to 16 bits in 5.19); the port is network order in the low half
    // (`redirect_common::port::be_low`).
    let remote_port = unsafe { read_volatile((&raw const (*l).remote_port).cast::<u32>()) };
    let key = TupleKey::new(netns_cookie, remote_ip, port::be_low(remote_port), local_ip, local_port);
    let ifindex = if INGRESS_IFINDEX.load() != 0 {
        // SAFETY: a 4-byte read of the context's `ingress_ifindex`, which this kernel has
        // (the agent sets INGRESS_IFINDEX only on 5.17+).
        unsafe { read_volatile(&raw const (*l).ingress_ifindex) }
    } else {
        0
    };
    // `PREROUTING -i IFACE` (`-c`, `-k`) sees the device the SYN arrived on.
    let ifaces = if ifindex != 0 && (workload.flags & workload_flags::IFACES != 0 || workload.virt_ifaces != 0) {
        iface_entries(netns_cookie, ifindex)
    } else {
        0
    };
    // From a `-k` device: nat PREROUTING's `-k` rules, first in the chain, decide every TCP
    // connection from there (REDIRECT or RETURN), and tc ingress on the device judged and
    // counted it already (a redirected one arrives here addressed to the outbound capture
    // port, for whatever listens there). In TPROXY mode one that mangle's ISTIO_TPROXY took
    // came with TPROXY's mark (delivered locally, whatever its destination), and tc left its
    // original destination with TPROXY's target: handed to the inbound listener here, as
    // TPROXY hands it over. (The kernel looked for a socket of its 4-tuple first.)
    if ifaces & workload.virt_ifaces != 0 {
        // SAFETY: the reference's one byte is copied at once, while the value is mapped.
        let target = unsafe { INBOUND_PENDING.get(key) }.map(|o| o.target);
        if tproxy && target == Some(Target::Tproxy as u8) {
            return match assign(ctx, netns_cookie, family) {
                Ok(()) => sk_action::SK_PASS,
                // TPROXY drops a SYN nobody listens for.
                Err(_) => {
                    count_event(workload, events::INBOUND_NO_LISTENER);
                    sk_action::SK_DROP
                }
            };
        }
        return sk_action::SK_PASS;
    }
    // A connection judged already (its SYN was handed over, and it has no socket yet): a
    // retransmitted SYN after the first was dropped (a full accept queue), or another segment
    // of the same 4-tuple. nat PREROUTING sees only a connection's first packet (conntrack
    // NEW); later ones follow its decision uncounted. So does this: same listener, no count.
    // SAFETY: the reference is only tested for presence, never read.
    if unsafe { INBOUND_PENDING.get(key) }.is_some() {
        return match assign(ctx, netns_cookie, family) {
            Ok(()) => sk_action::SK_PASS,
            Err(_) => sk_action::SK_DROP,
        };
    }
    // TPROXY's `-m mark`: a SYN from another host carries none (a packet's mark does not cross
    // namespaces); one sent in the namespace, what sock_ops noted at its connect (ambient's
    // note says "made here"). Such a SYN arrived on lo, even from a transparent socket's
    // foreign source, which only the arrival device or the note tells.
    let ambient = workload.flags & workload_flags::AMBIENT != 0;
    let (mark, in_lo) = if tproxy || ambient {
        let mark = match SYN_MARKS.get_ptr(key) {
            Some(p) => {
                // SAFETY: a non-null lookup result, a whole u32 in SYN_MARKS, copied at once
                // while the value is mapped (until the program returns).
                let m = unsafe { *p };
                let _ = SYN_MARKS.remove(key);
                m
            }
            None => 0,
        };
        (mark, from_self || ifindex == LOOPBACK_IFINDEX || mark != 0)
    } else {
        (0, false)
    };
    // Ambient: a SYN made in the namespace that the source did not tell (ztunnel dialing the
    // app from the client's address, a transparent socket's) was decided by ISTIO_OUTPUT at
    // its connect; nat PREROUTING never sees such a connection (conntrack has it already).
    if ambient && in_lo {
        return sk_action::SK_PASS;
    }
    let facts = ConnFacts {
        family: family as u8,
        proto: IPPROTO_TCP,
        dst_addr: local_ip,
        dst_port: local_port,
        src_addr: remote_ip,
        // `-i lo` (TPROXY's mangle ISTIO_INBOUND; nat's has no such rule).
        out_lo: in_lo,
        // PREROUTING has no owner: ISTIO_INBOUND has no owner rules.
        uid: u32::MAX,
        gid: u32::MAX,
        in_owner_groups: false,
        ifaces,
        mark,
        // A SYN with no socket yet: conntrack's NEW (a repeat of a judged one is above).
        established: false,
    };

    if !matches!(
        chain::inbound(netns_cookie, workload, &facts),
        Some(Target::InRedirect | Target::Tproxy)
    ) {
        return sk_action::SK_PASS;
    }
    // The listener's local address is irrelevant here: the accepted socket keeps the original
    // destination as its local address, which is what the proxy forwards to.
    match assign(ctx, netns_cookie, family) {
        Ok(()) => {
            // What conntrack would keep for a REDIRECT: SO_ORIGINAL_DST on the accepted socket
            // (and the embedded proxy) read it under the 4-tuple, as the remote end connected.
            let orig = OrigDst::new(local_ip, local_port, Target::InRedirect);
            if INBOUND_PENDING.insert(key, orig, 0).is_err() {
                count_event(workload, events::ORIG_DST_NOT_RECORDED);
            }
            sk_action::SK_PASS
        }
        // Nobody listens on the capture port: refuse (RST), as a REDIRECT to a closed port
        // would. Passing instead would hand the connection to the app behind the proxy's back.
        Err(_) => {
            count_event(workload, events::INBOUND_NO_LISTENER);
            sk_action::SK_DROP
        }
    }
}

/// Hands the connection to the workload's capture listener of its family; an IPv4 one may
/// also go to an AF_INET6 listener (a dual-stack `[::]` one) when there is no AF_INET one:
/// the kernel refuses it with EAFNOSUPPORT if that listener is IPv6-only.
#[inline(always)]
fn assign(ctx: &SkLookupContext, netns_cookie: u64, family: Family) -> Result<(), i32> {
    let own = INBOUND_LISTENERS.redirect_sk_lookup(ctx, FamilyKey::new(netns_cookie, family), 0);
    if own.is_ok() || family == Family::V6 {
        return own;
    }
    INBOUND_LISTENERS.redirect_sk_lookup(ctx, FamilyKey::new(netns_cookie, Family::V6), 0)
}

/// The SYN's destination (local) and source (remote) addresses in key form.
///
/// Every field is read, whatever the family, and the family picks among the values: read in
/// two branches, the compiler merges the loads into one through a computed context pointer,
/// which the verifier refuses ("dereference of modified ctx ptr").
///
/// # Safety
///
/// `l` must be the context the kernel passed to this run of an `sk_lookup` program.
#[inline(always)]
unsafe fn addresses(l: *mut bpf_sk_lookup, family: Family) -> (Addr, Addr) {
    // SAFETY: 4-byte reads of the context's `local_ip4`, `remote_ip4` and the `local_ip6` and
    // `remote_ip6` words, which sk_lookup may read (one word at a time) for either family.
    let (local4, remote4, local6, remote6) = unsafe {
        (
            read_volatile(&raw const (*l).local_ip4),
            read_volatile(&raw const (*l).remote_ip4),
            [
                read_volatile(&raw const (*l).local_ip6[0]),
                read_volatile(&raw const (*l).local_ip6[1]),
                read_volatile(&raw const (*l).local_ip6[2]),
                read_volatile(&raw const (*l).local_ip6[3]),
            ],
            [
                read_volatile(&raw const (*l).remote_ip6[0]),
                read_volatile(&raw const (*l).remote_ip6[1]),
                read_volatile(&raw const (*l).remote_ip6[2]),
                read_volatile(&raw const (*l).remote_ip6[3]),
            ],
        )
    };
    match family {
        Family::V4 => (addr::v4(local4), addr::v4(remote4)),
        Family::V6 => (local6, remote6),
    }
}
