//! `cgroup/sendmsg4`: ISTIO_OUTPUT for datagrams an AF_INET UDP socket sends to an address it
//! names (`sendto`), where iptables' nat OUTPUT sees a UDP flow's first packet. A connected
//! socket's flow was judged at connect (`connect4`); the kernel runs this hook only for the
//! others. With DNS capture, a query to a resolver goes to the DNS proxy on 127.0.0.1:15053.
use core::ptr::{read_volatile, write_volatile};

use aya_ebpf::{EbpfContext as _, helpers::bpf_get_netns_cookie, macros::cgroup_sock_addr, programs::SockAddrContext};
use redirect_common::{IPPROTO_UDP, addr, port};

use crate::output::{self, Connect};

/// Returning 1 lets the datagram go; 0 would fail sendmsg with EPERM. As at connect, a mesh
/// decision never becomes an error the workload sees.
#[cgroup_sock_addr(sendmsg4)]
pub fn redirect_sendmsg4(ctx: SockAddrContext) -> i32 {
    // SAFETY: `ctx` is this invocation's context: the macro builds it from the program's only
    // argument, the `bpf_sock_addr` the kernel passes, which is what `decide` requires.
    unsafe { decide(&ctx) };
    1
}

/// # Safety
///
/// `ctx.sock_addr` must be the context the kernel passed to this run of a `cgroup/sendmsg4`
/// program: its field accesses are then context accesses the verifier checked at load (offset,
/// size, direction) and rewrote into accesses of the kernel's `bpf_sock_addr_kern`, whose
/// `user_ip4`/`user_port` are the datagram's destination.
#[inline(always)]
unsafe fn decide(ctx: &SockAddrContext) {
    let sa = ctx.sock_addr;
    // SAFETY: `sa` is this sendmsg4 run's own context (see `# Safety`); `judged_socket`
    // reads the same fields on every sock_addr hook.
    let Some((sk, cookie, proto)) = (unsafe { output::judged_socket(sa) }) else {
        return;
    };
    if proto != IPPROTO_UDP {
        return;
    }
    // SAFETY: context reads (see `# Safety`) of the 4-byte `user_port` and `user_ip4`; and of
    // the full socket `sk`'s `src_ip4`.
    let (user_port, user_ip4, src_ip4) = unsafe {
        (
            read_volatile(&raw const (*sa).user_port),
            read_volatile(&raw const (*sa).user_ip4),
            read_volatile(&raw const (*sk).src_ip4),
        )
    };
    let c = Connect {
        sk,
        cookie,
        proto,
        // SAFETY: the helper's one argument is the program's own context (it reads the
        // socket's namespace from it).
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        dst: addr::v4(user_ip4),
        dst_port: port::be_low(user_port),
        src: addr::v4(src_ip4),
    };
    // SAFETY: `c.sk` is the socket `judged_socket` returned for this run's context.
    let Some(to) = (unsafe { output::decide(&c) }) else {
        return;
    };
    // The datagram keeps the source routing gives it (sendmsg cannot bind): the DNS proxy
    // answers whatever address asked.
    // SAFETY: 4-byte writes of the context's `user_ip4` and `user_port`, which a sendmsg4
    // program may write (see `# Safety`); the kernel sends to what they hold.
    unsafe {
        write_volatile(&raw mut (*sa).user_ip4, to.addr[3]);
        write_volatile(&raw mut (*sa).user_port, port::to_be_low(to.port));
    }
}
