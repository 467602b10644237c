//! istio-cni's node rule for the kubelet's probes of ambient pods (nat POSTROUTING, `-m owner
//! --socket-exists -p tcp -m set --match-set istio-inpod-probes-v4 dst -j SNAT --to-source
//! 169.254.7.127`), for connect4/6: a TCP connect of the node's to an ambient pod's address
//! leaves from the pod's probe address, which the pod's ISTIO_PRERT accepts uncaptured. The
//! socket is bound to it before the SYN (the source goes on the node's `lo`), and the
//! destination is left as it is. Only an unbound socket: a bound one keeps its source (SNAT
//! would rewrite it; docs/ambient.md).
//!
//! The entries of `PROBE_SNAT` are keyed by the node's namespace, which no workload is (node
//! mode refuses the host's namespace), so one lookup by the connect's own namespace and
//! destination decides, before and apart from ISTIO_OUTPUT's walk.
use core::ptr::read_volatile;

use aya_ebpf::{bindings::bpf_sock_addr, helpers::bpf_get_netns_cookie};
use redirect_common::{IPPROTO_TCP, addr};

use crate::{
    maps::probe_snat,
    output,
    sockaddr::{SockaddrIn, SockaddrIn6},
    user_addr,
};

/// connect4's: [`bind_probe_source`] for an AF_INET socket. A *global* BPF function, verified
/// once on its own with a frame of its own: inlined into connect6, the key and sockaddr took
/// that program's frame past what 6.1 allows under its call to `redirect_walk_chain` (512 bytes
/// for a call chain). It takes the context alone, so that nothing of the caller's lives on the
/// caller's stack for it. One per family: a global function is verified apart from the hook
/// that calls it, so it may touch only the context fields of that hook's family.
///
/// # Safety
///
/// `sa` is the context of a connect4 run (a global function's context argument, which the
/// verifier checks by its BTF type).
#[unsafe(no_mangle)]
#[inline(never)]
pub unsafe extern "C" fn redirect_probe_bind4(sa: *mut bpf_sock_addr) -> u32 {
    // SAFETY: see `# Safety`.
    unsafe { bind_probe_source::<false>(sa) }
}

/// connect6's: [`bind_probe_source`] for an AF_INET6 socket (a v4-mapped destination's source
/// is bound v4-mapped). As [`redirect_probe_bind4`].
///
/// # Safety
///
/// `sa` is the context of a connect6 run.
#[unsafe(no_mangle)]
#[inline(never)]
pub unsafe extern "C" fn redirect_probe_bind6(sa: *mut bpf_sock_addr) -> u32 {
    // SAFETY: see `# Safety`.
    unsafe { bind_probe_source::<true>(sa) }
}

/// Binds the connect's socket to `PROBE_SNAT`'s source for its destination, seen from its
/// namespace, if there is one: 1 if it did (the connect then goes on as it was asked).
///
/// # Safety
///
/// `sa` is the context of a connect6 run if `V6`, else of a connect4 run: its field reads are
/// context accesses the verifier checks, and `bpf_bind` may take it.
#[inline(always)]
unsafe fn bind_probe_source<const V6: bool>(sa: *mut bpf_sock_addr) -> u32 {
    // SAFETY: a 4-byte context read of `protocol`, and the 8-byte `sk`, a full socket (never
    // null for these hooks; checked anyway); see `# Safety`.
    let (protocol, sk) = unsafe { (read_volatile(&raw const (*sa).protocol), (*sa).__bindgen_anon_1.sk) };
    if protocol != u32::from(IPPROTO_TCP) || sk.is_null() {
        return 0;
    }
    // SAFETY: reads of this run's context and its full socket, of the hook's family.
    let (dst, src) = unsafe {
        match V6 {
            true => (user_addr::read6(sa).0, user_addr::src6(sk)),
            false => (user_addr::read4(sa).0, user_addr::src4(sk)),
        }
    };
    if !addr::is_unbound(&src) {
        return 0;
    }
    // SAFETY: the helper's one argument is the program's own context (it reads the socket's
    // namespace from it); every sock_addr hook may call it (5.7+, probed).
    let netns_cookie = unsafe { bpf_get_netns_cookie(sa.cast()) };
    let Some(source) = probe_snat(netns_cookie, &dst) else {
        return 0;
    };
    match V6 {
        // SAFETY: `sa` is a connect hook's context (see `# Safety`).
        true => unsafe { output::bind(sa, &mut SockaddrIn6::new(source, 0)) },
        // SAFETY: as above.
        false => unsafe { output::bind(sa, &mut SockaddrIn::new(source[3], 0)) },
    }
    1
}
