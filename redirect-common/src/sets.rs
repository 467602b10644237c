//! Keys and values of the maps that hold a workload's rule lists of any length: its per-rule
//! counters, and the members of its set entries (a run of rules that differ only in their
//! `-d` CIDR, or only in their `--dport` and protocol, packed into one entry of the walk:
//! `chain::pack`).
//!
//! Every key starts with the workload's netns cookie, as the other per-workload maps' do, so
//! that removing a workload removes its entries whoever wrote them.

use crate::addr::{Addr, Family};

/// One rule's counter: `RULE_COUNTERS`' key. `slot` is the rule's index in `chain::compile`'s
/// list (iptables' rules, then ip6tables'): what `explain` and `stats` print as `slot`.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct CounterKey {
    pub netns_cookie: u64,
    pub slot: u32,
    pub _pad: u32,
}

impl CounterKey {
    #[inline(always)]
    pub const fn new(netns_cookie: u64, slot: u32) -> Self {
        Self {
            netns_cookie,
            slot,
            _pad: 0,
        }
    }
}

/// A member of a CIDR set entry: the data of a `CIDR_SETS` key (an LPM trie: the namespace's
/// and the entry's bits always match in full, then the CIDR's prefix).
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct CidrSetKey {
    /// The netns cookie, as two words (no padding after the trie key's `u32` prefix length).
    pub netns: [u32; 2],
    /// The set entry's index in the workload's `rules` (a family's table is a fixed half).
    pub entry: u32,
    /// [`crate::addr`] form: IPv4 v4-mapped.
    pub addr: Addr,
}

impl CidrSetKey {
    /// The key length that looks a whole address up.
    pub const FULL: u32 = 64 + 32 + 128;

    #[inline(always)]
    pub const fn new(netns_cookie: u64, entry: u32, addr: Addr) -> Self {
        Self {
            netns: [netns_cookie as u32, (netns_cookie >> 32) as u32],
            entry,
            addr,
        }
    }

    /// The key length of a member whose mask is `mask` ([`crate::addr`] form: an IPv4 /n is
    /// the v4-mapped /96+n).
    pub const fn prefix_len(mask: &Addr) -> u32 {
        64 + 32 + crate::addr::mask_prefix(mask) as u32
    }

    pub const fn netns_cookie(&self) -> u64 {
        self.netns[0] as u64 | (self.netns[1] as u64) << 32
    }

    /// The family of the member's address.
    pub const fn family(&self) -> Family {
        crate::addr::family(&self.addr)
    }
}

/// A member of a port set entry: `PORT_SETS`' key. The protocol is the member's own (`-o`'s
/// list alternates `-p tcp` and `-p udp` rules of each port).
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct PortSetKey {
    pub netns_cookie: u64,
    /// As [`CidrSetKey::entry`].
    pub entry: u16,
    /// Host order.
    pub port: u16,
    /// An IPPROTO number.
    pub proto: u8,
    /// Padding as scalars, not a byte array, which the compiler zeroes with a call to
    /// `memset`: one more frame in the verifier's count of the call chain's stack.
    pub _pad: u8,
    pub _pad2: u16,
}

impl PortSetKey {
    #[inline(always)]
    pub const fn new(netns_cookie: u64, entry: u16, proto: u8, port: u16) -> Self {
        Self {
            netns_cookie,
            entry,
            port,
            proto,
            _pad: 0,
            _pad2: 0,
        }
    }
}

/// What a set member says when a connection's address (or port) is in it: which rule of the
/// run decides, and which rule the member is.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct SetMember {
    /// The slot of the first rule of the run that matches every address this member
    /// matches: the member itself, or an earlier one whose CIDR contains it (iptables takes
    /// the first rule that matches, not the longest prefix). Counted, and deciding.
    pub decides: u32,
    /// The member's own slot: what `stats` lists it under.
    pub own: u32,
}

impl SetMember {
    #[inline(always)]
    pub const fn new(decides: u32, own: u32) -> Self {
        Self { decides, own }
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), Copy; u64, u32, explicit u32 `_pad`; 16 bytes, no gaps.
    unsafe impl aya::Pod for super::CounterKey {}
    // SAFETY: repr(C), Copy; [u32; 2], u32, [u32; 4]; 28 bytes, no gaps.
    unsafe impl aya::Pod for super::CidrSetKey {}
    // SAFETY: repr(C), Copy; u64, u16, u16, u8, explicit u8 and u16; 16 bytes, no gaps.
    unsafe impl aya::Pod for super::PortSetKey {}
    // SAFETY: repr(C), Copy; two u32; 8 bytes, no gaps.
    unsafe impl aya::Pod for super::SetMember {}
}

#[cfg(test)]
mod layout {
    use core::mem::size_of;

    use super::*;

    #[test]
    fn sizes_have_no_implicit_padding() {
        assert_eq!(size_of::<CounterKey>(), 16);
        assert_eq!(size_of::<CidrSetKey>(), 28);
        assert_eq!(size_of::<PortSetKey>(), 16);
        assert_eq!(size_of::<SetMember>(), 8);
    }
}
