//! `sk_skb` stream verdict on the fast path's sockhash: passes every packet to its own socket.
//!
//! It decides nothing, and is there for its side effect. Kernel commit 929e30f93125
//! (6.6.128+, 6.12.75+, 6.18.14+) lets a sockhash socket *without* a stream verdict hold
//! bytes with no epoll readiness edge, which stalls epoll-driven readers such as tokio until
//! 04af4efde58a. With a verdict attached, TCP data reaches the socket through the psock's own
//! queue, whose wakeups are intact.
use aya_ebpf::{bindings::sk_action, macros::stream_verdict, programs::SkBuffContext};

#[stream_verdict]
pub fn redirect_sk_skb(_ctx: SkBuffContext) -> u32 {
    sk_action::SK_PASS
}
