//! Who owns a socket, as iptables' owner match reads it: the fsuid and fsgid of the credentials
//! its file was opened with, `sk->sk_socket->file->f_cred` (net/netfilter/xt_owner.c). Not the
//! calling task's ids: a set-id program keeps its real uid while its files (and sockets) carry
//! the effective one, and a socket passed to another process keeps its opener's.
//!
//! The programs follow those three pointers with the field offsets of the running kernel, which
//! the agent reads from its BTF and sets in the object's `.rodata` before loading
//! ([`OWNER_OFFSETS`]): constants to the verifier, which checks each load against the kernel's
//! own types (the pointers are BTF-typed, reached through `bpf_skc_to_tcp_sock`).

/// Name of the eBPF object's `.rodata` global holding an [`OwnerOffsets`].
pub const OWNER_OFFSETS: &str = "OWNER_OFFSETS";

/// The uid and gid a socket without a file (a kernel socket) has: none. iptables' owner match
/// fails for such a socket, and its negation matches, which is what an id no rule names gives.
pub const NO_OWNER: u32 = u32::MAX;

/// Byte offsets of the fields between a socket and its owner's ids, in the running kernel.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OwnerOffsets {
    /// `struct sock`'s `sk_socket` (a `struct tcp_sock` begins with its `struct sock`).
    pub sock_sk_socket: u32,
    /// `struct socket`'s `file`.
    pub socket_file: u32,
    /// `struct file`'s `f_cred`.
    pub file_f_cred: u32,
    /// `struct cred`'s `fsuid`.
    pub cred_fsuid: u32,
    /// `struct cred`'s `fsgid`.
    pub cred_fsgid: u32,
    /// `struct task_struct`'s `cred` (the subjective credentials, which a socket file opened
    /// now would carry): UDP sockets have no BTF helper to reach their file from a sock_addr
    /// program, so their hooks read the sending task's.
    pub task_cred: u32,
}

impl OwnerOffsets {
    /// What the object holds until the agent sets the kernel's: offsets no field has, so that
    /// a load that skipped setting them fails verification instead of reading a wrong field.
    pub const UNSET: Self = Self {
        sock_sk_socket: u32::MAX,
        socket_file: u32::MAX,
        file_f_cred: u32::MAX,
        cred_fsuid: u32::MAX,
        cred_fsgid: u32::MAX,
        task_cred: u32::MAX,
    };
}

// SAFETY: repr(C), Copy, six u32s: no padding, and any bytes are a valid value.
#[cfg(feature = "user")]
unsafe impl aya::Pod for OwnerOffsets {}
