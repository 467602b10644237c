//! A socket's owner as iptables' owner match reads it (`redirect_common::owner`): the fsuid
//! and fsgid of the credentials its file was opened with.
use core::ptr::read_volatile;

use aya_ebpf::{
    bindings::bpf_sock,
    helpers::{bpf_get_current_task_btf, bpf_skc_to_tcp_sock},
};
use redirect_common::owner::{NO_OWNER, OwnerOffsets};

/// The running kernel's field offsets, set by the agent at load (`EbpfLoader::override_global`).
/// `.rodata` is frozen before the programs load, so the verifier reads these as constants and
/// checks each load below against the kernel's BTF at the offset it resolves to.
#[unsafe(no_mangle)]
static OWNER_OFFSETS: OwnerOffsets = OwnerOffsets::UNSET;

/// `(fsuid, fsgid)` of the file `sk` was opened as, or [`NO_OWNER`] for both when it has none.
/// The ids are the kernel's (the initial user namespace's), as `bpf_get_current_uid_gid` gives.
///
/// # Safety
///
/// `sk` must be the full TCP socket of this run's `bpf_sock_addr` context (`ctx->sk`).
#[inline(always)]
pub unsafe fn owner(sk: *mut bpf_sock) -> (u32, u32) {
    // SAFETY: a read of our own `.rodata` global (a frozen map value to the verifier).
    let off = unsafe { read_volatile(&raw const OWNER_OFFSETS) };
    // SAFETY: the helper takes any socket pointer and returns the same socket as a BTF-typed
    // `struct tcp_sock` pointer, or null when it is not a TCP one.
    let tp = unsafe { bpf_skc_to_tcp_sock(sk.cast()) }.cast::<u8>().cast_const();
    if tp.is_null() {
        return (NO_OWNER, NO_OWNER);
    }
    // SAFETY: `tp` is BTF-typed (the helper's result) and `sock_sk_socket` the offset of
    // `struct sock`'s `sk_socket` (at the start of a `tcp_sock`), from `.rodata`.
    let socket: *const u8 = unsafe { field(tp, off.sock_sk_socket) };
    if socket.is_null() {
        return (NO_OWNER, NO_OWNER);
    }
    // SAFETY: `socket` is BTF-typed (read through `field`); `socket_file` is `file`'s offset.
    let file: *const u8 = unsafe { field(socket, off.socket_file) };
    if file.is_null() {
        return (NO_OWNER, NO_OWNER);
    }
    // SAFETY: `file` is BTF-typed (read through `field`); `file_f_cred` is `f_cred`'s offset.
    let cred: *const u8 = unsafe { field(file, off.file_f_cred) };
    if cred.is_null() {
        return (NO_OWNER, NO_OWNER);
    }
    // SAFETY: `cred` is BTF-typed (read through `field`); the offsets are `fsuid`'s and
    // `fsgid`'s, each a `kuid_t`/`kgid_t`: a struct of one u32.
    unsafe { (field(cred, off.cred_fsuid), field(cred, off.cred_fsgid)) }
}

/// `(fsuid, fsgid)` of the running task's credentials: what a socket file it opened now would
/// carry. For UDP sockets, which no BTF helper takes from a sock_addr program to their file: it
/// differs from iptables' answer only for a socket another task opened (passed over a Unix
/// socket, or inherited across a credential change).
///
/// # Safety
///
/// Only reads through BTF-typed pointers the verifier tracks (see [`field`]).
#[inline(always)]
pub unsafe fn task_owner() -> (u32, u32) {
    // SAFETY: a read of our own `.rodata` global (a frozen map value to the verifier).
    let off = unsafe { read_volatile(&raw const OWNER_OFFSETS) };
    // SAFETY: the helper takes nothing and returns the current task as a BTF-typed pointer.
    let task = unsafe { bpf_get_current_task_btf() }.cast::<u8>().cast_const();
    if task.is_null() {
        return (NO_OWNER, NO_OWNER);
    }
    // SAFETY: `task` is BTF-typed (the helper's result); `task_cred` is `cred`'s offset.
    let cred: *const u8 = unsafe { field(task, off.task_cred) };
    if cred.is_null() {
        return (NO_OWNER, NO_OWNER);
    }
    // SAFETY: `cred` is BTF-typed (read through `field`); the offsets are `fsuid`'s and
    // `fsgid`'s.
    unsafe { (field(cred, off.cred_fsuid), field(cred, off.cred_fsgid)) }
}

/// The `T` at byte `offset` of the kernel object `base` points to.
///
/// # Safety
///
/// `base` must be a BTF-typed pointer the verifier tracks (from `bpf_skc_to_tcp_sock`, or read
/// through one), and `offset` a constant to the verifier (from `.rodata`) that the kernel's BTF
/// gives a field of `T`'s size there. The verifier then resolves the load to that field
/// (refusing the program otherwise) and makes it one that cannot fault: a null or stale
/// pointer reads 0. The result of a pointer field is typed as the field's pointee.
#[inline(always)]
#[allow(
    clippy::cast_ptr_alignment,
    reason = "the offset is the kernel's own field of this type (BTF), so aligned for it"
)]
unsafe fn field<T>(base: *const u8, offset: u32) -> T {
    // SAFETY: see `# Safety`.
    unsafe { read_volatile(base.add(offset as usize).cast::<T>()) }
}
