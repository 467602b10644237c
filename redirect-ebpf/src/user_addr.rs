//! The address a sock_addr hook is about (`user_ip4`/`user_ip6` and `user_port` of its
//! context: connect's and sendmsg's destination, recvmsg's source, getpeername's peer) and the
//! socket's own bound address, read and written in [`redirect_common::addr`] form with host-order
//! ports. One 4-byte access per field or word: the verifier refuses wider ones on the context.
use core::ptr::{read_volatile, write_volatile};

use aya_ebpf::bindings::{bpf_sock, bpf_sock_addr};
use redirect_common::{
    addr::{self, Addr},
    port,
};

/// The context's IPv4 address and port.
///
/// # Safety
///
/// `sa` must be the context the kernel passed to this run of an AF_INET sock_addr hook
/// (connect4, sendmsg4, recvmsg4, getpeername4): its field reads are then context accesses the
/// verifier checked at load and rewrote into reads of the kernel's `bpf_sock_addr_kern`.
#[inline(always)]
pub unsafe fn read4(sa: *mut bpf_sock_addr) -> (Addr, u16) {
    // SAFETY: 4-byte context reads of `user_ip4` and `user_port` (see `# Safety`).
    let (ip, p) = unsafe {
        (
            read_volatile(&raw const (*sa).user_ip4),
            read_volatile(&raw const (*sa).user_port),
        )
    };
    (addr::v4(ip), port::be_low(p))
}

/// The context's IPv6 address (IPv4 v4-mapped, as an AF_INET6 socket names it) and port.
///
/// # Safety
///
/// As [`read4`], for an AF_INET6 hook (connect6, sendmsg6, recvmsg6, getpeername6).
#[inline(always)]
pub unsafe fn read6(sa: *mut bpf_sock_addr) -> (Addr, u16) {
    // SAFETY: 4-byte context reads of each `user_ip6` word and `user_port` (see `# Safety`).
    unsafe {
        (
            [
                read_volatile(&raw const (*sa).user_ip6[0]),
                read_volatile(&raw const (*sa).user_ip6[1]),
                read_volatile(&raw const (*sa).user_ip6[2]),
                read_volatile(&raw const (*sa).user_ip6[3]),
            ],
            port::be_low(read_volatile(&raw const (*sa).user_port)),
        )
    }
}

/// Makes `a`:`port` the context's address (an IPv4 one: its last word).
///
/// # Safety
///
/// As [`read4`], for a hook that may write the address (all four named there do).
#[inline(always)]
pub unsafe fn write4(sa: *mut bpf_sock_addr, a: &Addr, port: u16) {
    // Separate volatile stores: merged into one 8-byte store, the verifier refuses them.
    // SAFETY: 4-byte context writes of `user_ip4` and `user_port` (see `# Safety`).
    unsafe {
        write_volatile(&raw mut (*sa).user_ip4, a[3]);
        write_volatile(&raw mut (*sa).user_port, port::to_be_low(port));
    }
}

/// Makes `a`:`port` the context's address.
///
/// # Safety
///
/// As [`read6`], for a hook that may write the address.
#[inline(always)]
pub unsafe fn write6(sa: *mut bpf_sock_addr, a: &Addr, port: u16) {
    // SAFETY: 4-byte context writes of each `user_ip6` word and `user_port` (see `# Safety`).
    unsafe {
        write_volatile(&raw mut (*sa).user_ip6[0], a[0]);
        write_volatile(&raw mut (*sa).user_ip6[1], a[1]);
        write_volatile(&raw mut (*sa).user_ip6[2], a[2]);
        write_volatile(&raw mut (*sa).user_ip6[3], a[3]);
        write_volatile(&raw mut (*sa).user_port, port::to_be_low(port));
    }
}

/// The AF_INET socket's bound address (0.0.0.0 when unbound).
///
/// # Safety
///
/// `sk` must be a non-null full socket of this run's context (`ctx->sk`), whose `src_ip4` the
/// verifier lets programs read.
#[inline(always)]
pub unsafe fn src4(sk: *mut bpf_sock) -> Addr {
    // SAFETY: a 4-byte read of the full socket's `src_ip4` (see `# Safety`).
    addr::v4(unsafe { read_volatile(&raw const (*sk).src_ip4) })
}

/// The AF_INET6 socket's bound address (`::` when unbound, v4-mapped when bound to IPv4).
///
/// # Safety
///
/// As [`src4`], for an AF_INET6 socket (`src_ip6`, `sk_v6_rcv_saddr`).
#[inline(always)]
pub unsafe fn src6(sk: *mut bpf_sock) -> Addr {
    // SAFETY: 4-byte reads of the full socket's `src_ip6` words (see `# Safety`).
    unsafe {
        [
            read_volatile(&raw const (*sk).src_ip6[0]),
            read_volatile(&raw const (*sk).src_ip6[1]),
            read_volatile(&raw const (*sk).src_ip6[2]),
            read_volatile(&raw const (*sk).src_ip6[3]),
        ]
    }
}
