//! `cgroup/getsockopt`: `getsockopt(SOL_IP, SO_ORIGINAL_DST)` on a socket accepted on a
//! capture port answers the original destination, as conntrack does behind iptables REDIRECT,
//! so that Envoy or any proxy written for REDIRECT works unmodified (`--proxy none`).
//!
//! The hook runs after the kernel has handled every getsockopt of every socket in the cgroup,
//! so everything but that one option must leave the kernel's answer exactly as it was.
use core::ptr::{read_volatile, write_volatile};

use aya_ebpf::{EbpfContext as _, helpers::bpf_get_netns_cookie, macros::cgroup_sockopt, programs::SockoptContext};
use redirect_common::{IPPROTO_TCP, TupleKey, events, port};

use crate::maps::{count_event, orig_dst, workload};

const SOL_IP: i32 = 0;
/// `SO_ORIGINAL_DST` from linux/netfilter_ipv4.h.
const SO_ORIGINAL_DST: i32 = 80;
/// The program sees at most a page of the value (the kernel's rule for large optval).
const PAGE_SIZE: i32 = 4096;
const AF_INET: u32 = 2;

/// `struct sockaddr_in`, as the kernel's own answer lays it out.
#[repr(C)]
struct SockaddrIn {
    family: u16,
    /// Network byte order.
    port: u16,
    /// Network byte order.
    addr: u32,
    zero: [u8; 8],
}

const SOCKADDR_IN_LEN: usize = core::mem::size_of::<SockaddrIn>();

#[cgroup_sockopt(getsockopt)]
pub fn redirect_getsockopt(ctx: SockoptContext) -> i32 {
    // SAFETY: the kernel hands getsockopt a valid bpf_sockopt.
    unsafe { answer(&ctx) };
    // 1 keeps the (possibly rewritten) answer; 0 would fail the call with EPERM.
    1
}

#[inline(always)]
unsafe fn answer(ctx: &SockoptContext) {
    let so = ctx.sockopt;
    let (level, optname, optlen) = unsafe {
        (
            read_volatile(&(*so).level),
            read_volatile(&(*so).optname),
            read_volatile(&(*so).optlen),
        )
    };
    if level != SOL_IP || optname != SO_ORIGINAL_DST {
        // A value longer than a page reached us truncated to that page; leaving optlen as is
        // would either fail the call (EFAULT, before 6.4) or rely on the kernel ignoring us.
        // optlen 0 is the documented "use the kernel's value untouched".
        if optlen > PAGE_SIZE {
            unsafe { write_volatile(&mut (*so).optlen, 0) };
        }
        return;
    }
    let sk = unsafe { (*so).__bindgen_anon_1.sk };
    if sk.is_null() {
        return;
    }
    let (family, protocol) = unsafe { (read_volatile(&(*sk).family), read_volatile(&(*sk).protocol)) };
    if family != AF_INET || protocol != u32::from(IPPROTO_TCP) {
        return;
    }
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let Some(workload) = workload(netns_cookie) else {
        return;
    };
    // The map holds the connection as its connecting end saw it: this accepted socket's peer
    // (`dst_*`) is the source, its own address (`src_*`) the destination. `dst_port` is
    // network order in the low half of a 4-byte load on every kernel (the field became 16 bits
    // wide in 5.19), `src_port` host order: `redirect_common::port`.
    let (peer_ip, local_ip, peer_port, local_port) = unsafe {
        (
            read_volatile(&(*sk).dst_ip4),
            read_volatile(&(*sk).src_ip4),
            read_volatile((&raw const (*sk).dst_port).cast::<u32>()),
            read_volatile(&(*sk).src_port),
        )
    };
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
    let start = unsafe { (*so).__bindgen_anon_2.optval } as usize;
    let end = unsafe { (*so).__bindgen_anon_3.optval_end } as usize;
    // A caller's buffer shorter than a sockaddr_in keeps the kernel's EINVAL.
    if start + SOCKADDR_IN_LEN > end {
        return;
    }
    let sa = start as *mut SockaddrIn;
    unsafe {
        write_volatile(
            sa,
            SockaddrIn {
                family: AF_INET as u16,
                port: orig.port.to_be(),
                addr: orig.addr,
                zero: [0; 8],
            },
        );
        // Separate stores: adjacent context fields merged into one 8-byte store are refused
        // by the verifier.
        write_volatile(&mut (*so).optlen, SOCKADDR_IN_LEN as i32);
        write_volatile(&mut (*so).retval, 0);
    }
    count_event(workload, events::ORIG_DST_ANSWERED);
}
