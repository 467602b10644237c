//! `struct sockaddr_in` and `struct sockaddr_in6` as the kernel lays them out (aya's bindings
//! carry only `struct sockaddr`): what getsockopt answers SO_ORIGINAL_DST with, and what
//! connect4/6 hand `bpf_bind`.
use redirect_common::addr::Addr;

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

#[repr(C)]
pub struct SockaddrIn {
    pub family: u16,
    /// Network byte order.
    pub port: u16,
    /// Network byte order.
    pub addr: u32,
    pub zero: [u8; 8],
}

#[repr(C)]
pub struct SockaddrIn6 {
    pub family: u16,
    /// Network byte order.
    pub port: u16,
    pub flowinfo: u32,
    pub addr: Addr,
    pub scope_id: u32,
}

// The sizes the kernel's own structures have.
const _: () = assert!(core::mem::size_of::<SockaddrIn>() == 16);
const _: () = assert!(core::mem::size_of::<SockaddrIn6>() == 28);

impl SockaddrIn {
    /// `addr_be:port` (port in host order).
    pub const fn new(addr_be: u32, port: u16) -> Self {
        Self {
            family: AF_INET,
            port: port.to_be(),
            addr: addr_be,
            zero: [0; 8],
        }
    }
}

impl SockaddrIn6 {
    /// `[addr]:port` (port in host order), no flow label, no scope: as conntrack answers for a
    /// global address.
    pub const fn new(addr: Addr, port: u16) -> Self {
        Self {
            family: AF_INET6,
            port: port.to_be(),
            flowinfo: 0,
            addr,
            scope_id: 0,
        }
    }
}
