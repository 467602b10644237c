//! redirect's kernel programs: one module per attach point, maps in `maps`, the chain walk
//! they share in `chain`, the nat OUTPUT decision connect4 and connect6 share in `output`.
#![no_std]
#![no_main]
// `atomic_xadd` for the counters: the BPF target offers no atomic read-modify-write through
// `core::sync::atomic` (it has no compare-and-swap before BPF v3), but the kernel has always
// had the plain atomic add.
#![feature(core_intrinsics)]
#![allow(internal_features, reason = "core_intrinsics: atomic_xadd, see above")]

mod chain;
mod connect4;
mod connect6;
mod getpeername4;
mod getpeername6;
mod getsockopt;
mod instance;
mod maps;
mod output;
mod owner;
mod probe_source;
mod recvmsg4;
mod recvmsg6;
mod sendmsg4;
mod sendmsg6;
mod sk_lookup;
mod sk_msg;
mod sk_skb;
mod sockaddr;
mod sockops;
mod user_addr;
mod virt;
mod virt_egress;
mod virt_ingress;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

// GPL-compatible so the kernel lets the programs call GPL-only helpers.
// Both `unsafe` attributes are sound: `LICENSE` is the only symbol of that name in the object
// and the only item in the "license" section, which the loader reads as a NUL-terminated
// string (the array ends in NUL); nothing in the program refers to it.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
