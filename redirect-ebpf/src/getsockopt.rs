//! `cgroup/getsockopt`: `getsockopt(SOL_IP, SO_ORIGINAL_DST)` on a socket accepted on a
//! capture port answers the original destination of an IPv4 connection, and
//! `getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST)` that of an IPv6 one, as conntrack does behind
//! iptables/ip6tables REDIRECT, so that Envoy or any proxy written for REDIRECT works
//! unmodified (`--proxy none`). As with conntrack, each level answers only its own family: an
//! AF_INET6 socket of a v4-mapped connection answers at SOL_IP, not SOL_IPV6.
//!
//! The hook runs after the kernel has handled every getsockopt of every socket in the cgroup,
//! so everything but that one option must leave the kernel's answer exactly as it was.
use core::ptr::{read_volatile, write_volatile};

use aya_ebpf::{
    EbpfContext as _, bindings::bpf_sock, helpers::bpf_get_netns_cookie, macros::cgroup_sockopt,
    programs::SockoptContext,
};
use redirect_common::{IPPROTO_TCP, TupleKey, addr, events, port};

use crate::{
    maps::{count_event, orig_dst, workload},
    sockaddr::{SockaddrIn, SockaddrIn6},
};

const SOL_IP: i32 = 0;
const SOL_IPV6: i32 = 41;
/// `SO_ORIGINAL_DST` from linux/netfilter_ipv4.h, and `IP6T_SO_ORIGINAL_DST` from
/// linux/netfilter_ipv6/ip6_tables.h: the same number at each family's level.
const SO_ORIGINAL_DST: i32 = 80;
/// The program sees at most a page of the value (the kernel's rule for large optval).
const PAGE_SIZE: i32 = 4096;
const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;

// `bpf_sock.dst_port` is read as a `u32` (see `answer`): its offset keeps that read aligned.
const _: () = assert!(core::mem::offset_of!(bpf_sock, dst_port) % 4 == 0);

#[cgroup_sockopt(getsockopt)]
pub fn redirect_getsockopt(ctx: SockoptContext) -> i32 {
    // SAFETY: `ctx` is this invocation's context: the macro builds it from the program's only
    // argument, the `bpf_sockopt` the kernel passes, which is what `answer` requires.
    unsafe { answer(&ctx) };
    // 1 keeps the (possibly rewritten) answer; 0 would fail the call with EPERM.
    1
}

/// Answers `getsockopt(SOL_IP, SO_ORIGINAL_DST)` and `(SOL_IPV6, IP6T_SO_ORIGINAL_DST)` from
/// the maps; trims oversized values of any other option to what the kernel documents.
///
/// # Safety
///
/// `ctx.sockopt` must be the context the kernel passed to this run of a `cgroup/getsockopt`
/// program. Its field accesses are then context accesses: the verifier checked each one's
/// offset, size and direction against what getsockopt may touch when the program was loaded
/// (refusing the program otherwise) and rewrote it into an access of the kernel's
/// `bpf_sockopt_kern`.
#[inline(always)]
unsafe fn answer(ctx: &SockoptContext) {
    let so = ctx.sockopt;
    // SAFETY: 4-byte reads of the context's `level`, `optname` and `optlen` (see `# Safety`).
    let (level, optname, optlen) = unsafe {
        (
            read_volatile(&raw const (*so).level),
            read_volatile(&raw const (*so).optname),
            read_volatile(&raw const (*so).optlen),
        )
    };
    if (level != SOL_IP && level != SOL_IPV6) || optname != SO_ORIGINAL_DST {
        // A value longer than a page reached us truncated to that page; leaving optlen as is
        // would either fail the call (EFAULT, before 6.4) or rely on the kernel ignoring us.
        // optlen 0 is the documented "use the kernel's value untouched".
        if optlen > PAGE_SIZE {
            // SAFETY: a 4-byte write of the context's `optlen`, which getsockopt may write.
            unsafe { write_volatile(&raw mut (*so).optlen, 0) };
        }
        return;
    }
    // SAFETY: an 8-byte read of the context's `sk`, the socket getsockopt was called on,
    // which the verifier types as a full socket (`PTR_TO_SOCKET`, never null for this hook;
    // the check below guards the derefs anyway).
    let sk = unsafe { (*so).__bindgen_anon_1.sk };
    if sk.is_null() {
        return;
    }
    // SAFETY: `sk` is a non-null full socket: 4-byte reads of `bpf_sock` fields the verifier
    // lets any program that holds one read.
    let (family, protocol) = unsafe {
        (
            read_volatile(&raw const (*sk).family),
            read_volatile(&raw const (*sk).protocol),
        )
    };
    if (family != AF_INET && family != AF_INET6) || protocol != u32::from(IPPROTO_TCP) {
        return;
    }
    // SAFETY: the helper's one argument is the program's own context (it reads the socket's
    // namespace from it); getsockopt may call it (5.15+, which the agent probes for).
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let Some(workload) = workload(netns_cookie) else {
        return;
    };
    // The map holds the connection as its connecting end saw it: this accepted socket's peer
    // (`dst_*`) is the source, its own address (`src_*`) the destination. `dst_port` is
    // network order in the low half of a 4-byte load on every kernel (the field became 16 bits
    // wide in 5.19), `src_port` host order: `redirect_common::port`.
    #[allow(
        clippy::cast_ptr_alignment,
        reason = "dst_port's offset in bpf_sock is 4-aligned (the `const _` assertion in this module)"
    )]
    // SAFETY: `sk` is the non-null full socket above; 4-byte reads of its `dst_port` and
    // `src_port`. `dst_port` is read as 4 bytes through a cast: the field is a `__be16`
    // followed by 16 bits of padding in the bindings (both inside `bpf_sock`), and the
    // verifier accepts the 4-byte load at its offset on every kernel, as before 5.19.
    let (peer_port, local_port) = unsafe {
        (
            read_volatile((&raw const (*sk).dst_port).cast::<u32>()),
            read_volatile(&raw const (*sk).src_port),
        )
    };
    // All addresses are read and the family picks: loads in two branches get merged into one
    // through a computed pointer, which the verifier refuses.
    // SAFETY: 4-byte reads of the full socket's `dst_ip4`, `src_ip4` and the `dst_ip6` and
    // `src_ip6` words, which programs may read one word at a time for either family.
    let (peer4, local4, peer6, local6) = unsafe {
        (
            read_volatile(&raw const (*sk).dst_ip4),
            read_volatile(&raw const (*sk).src_ip4),
            [
                read_volatile(&raw const (*sk).dst_ip6[0]),
                read_volatile(&raw const (*sk).dst_ip6[1]),
                read_volatile(&raw const (*sk).dst_ip6[2]),
                read_volatile(&raw const (*sk).dst_ip6[3]),
            ],
            [
                read_volatile(&raw const (*sk).src_ip6[0]),
                read_volatile(&raw const (*sk).src_ip6[1]),
                read_volatile(&raw const (*sk).src_ip6[2]),
                read_volatile(&raw const (*sk).src_ip6[3]),
            ],
        )
    };
    let (peer_ip, local_ip) = if family == AF_INET {
        (addr::v4(peer4), addr::v4(local4))
    } else {
        (peer6, local6)
    };
    // Conntrack answers each level for its own family only (the other level's lookup finds no
    // entry: ENOENT), so does this.
    if addr::is_v4(&local_ip) != (level == SOL_IP) {
        return;
    }
    let key = TupleKey::new(
        netns_cookie,
        peer_ip,
        port::be_low(peer_port),
        local_ip,
        port::host(local_port),
    );
    // Unknown to us: the kernel's own answer stands (ENOENT from conntrack, or its entry).
    let Some(orig) = orig_dst(&key) else {
        return;
    };
    // SAFETY: `so` is the program's own context (see `# Safety`).
    let written = unsafe {
        if level == SOL_IP {
            write_answer(so, SockaddrIn::new(orig.addr[3], orig.port))
        } else {
            write_answer(so, SockaddrIn6::new(orig.addr, orig.port))
        }
    };
    if !written {
        return;
    }
    count_event(workload, events::ORIG_DST_ANSWERED);
}

/// Puts `value` in the caller's buffer and makes the call succeed with it. `false`: the
/// caller's buffer is too short, and the kernel's EINVAL stands.
///
/// # Safety
///
/// `so` must be the context the kernel passed to this run of a `cgroup/getsockopt` program.
#[inline(always)]
unsafe fn write_answer<T>(so: *mut aya_ebpf::bindings::bpf_sockopt, value: T) -> bool {
    let len = core::mem::size_of::<T>();
    // SAFETY: 8-byte reads of the context's `optval` and `optval_end`, the bounds of the
    // kernel's copy of the caller's buffer.
    let (start, end) = unsafe {
        (
            (*so).__bindgen_anon_2.optval as usize,
            (*so).__bindgen_anon_3.optval_end as usize,
        )
    };
    if start + len > end {
        return false;
    }
    let at = start as *mut T;
    // SAFETY: `at..at + len` lies within `optval..optval_end` (checked just above; the
    // verifier treats the buffer as packet data and refuses any store it cannot prove inside
    // it), the kernel's own buffer for the value, which it copies to the caller after we
    // return. Rust's `write_volatile` also wants `at` 4-aligned: a buffer over 32 bytes is
    // kzalloc'd (8-aligned); a smaller one (the usual `sizeof(struct sockaddr_in)`) is the
    // 32-byte `u8` array of `struct bpf_sockopt_buf` on the kernel stack, whose C type
    // promises no alignment. What the kernel checks are the stores this compiles to (2-
    // and 4-byte ones), which it accepts at any alignment on architectures without strict
    // alignment (x86-64, arm64), whose JITs emit plain stores. Then 4-byte writes of the
    // context's `optlen` and `retval`, which getsockopt may write.
    unsafe {
        write_volatile(at, value);
        // Separate stores: adjacent context fields merged into one 8-byte store are refused
        // by the verifier.
        write_volatile(&raw mut (*so).optlen, len as i32);
        write_volatile(&raw mut (*so).retval, 0);
    }
    true
}
