//! Addresses as the programs and maps hold them: one 16-byte form for both families.
//!
//! An IPv4 address is held as its v4-mapped IPv6 form (`::ffff:a.b.c.d`). That is what the
//! kernel itself shows an AF_INET6 socket connected to an IPv4 peer, so one key describes a
//! connection whichever socket family its ends use: the app's AF_INET6 socket connected to
//! `::ffff:127.0.0.1` and the proxy's AF_INET socket that accepted it from `127.0.0.1` build
//! the same key. The family of an [`Addr`] is not stored: v4-mapped *is* IPv4, as it is on the
//! wire.
//!
//! Each of the four words holds four bytes of the address in memory order, which is how the
//! kernel's `user_ip6[i]`, `local_ip6[i]`, `src_ip6[i]`... context fields load, and for IPv4
//! the last word is the `u32` the `*_ip4` fields load ("network byte order").

/// 16 bytes of an address, network byte order, IPv4 as v4-mapped.
pub type Addr = [u32; 4];

/// `00 00 ff ff`: the third word of every v4-mapped address.
const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// The IP version of a rule, a connection or an address.
#[repr(u8)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    V4 = 4,
    V6 = 6,
}

impl Family {
    pub const fn from_u8(v: u8) -> Option<Self> {
        match v {
            4 => Some(Self::V4),
            6 => Some(Self::V6),
            _ => None,
        }
    }

    /// `ipv4`/`ipv6`, as `explain --family` takes it and `stats` prints it.
    pub const fn name(self) -> &'static str {
        match self {
            Self::V4 => "ipv4",
            Self::V6 => "ipv6",
        }
    }

    /// The tool whose rules a chain of this family mirrors.
    pub const fn iptables(self) -> &'static str {
        match self {
            Self::V4 => "iptables",
            Self::V6 => "ip6tables",
        }
    }
}

/// The v4-mapped form of the IPv4 address `addr_be` (network byte order, as the `*_ip4`
/// context fields load it).
#[inline(always)]
pub const fn v4(addr_be: u32) -> Addr {
    [0, 0, V4_MAPPED_WORD, addr_be]
}

/// Whether `a` is an IPv4 address (v4-mapped).
#[inline(always)]
pub const fn is_v4(a: &Addr) -> bool {
    a[0] == 0 && a[1] == 0 && a[2] == V4_MAPPED_WORD
}

/// The family a connection to (or from) `a` uses on the wire.
#[inline(always)]
pub const fn family(a: &Addr) -> Family {
    if is_v4(a) { Family::V4 } else { Family::V6 }
}

/// `::`: no address (an unbound socket's source).
pub const UNSPECIFIED: Addr = [0; 4];

/// `::1`.
pub const LOCALHOST6: Addr = [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])];

/// `::6`: Envoy's IPv6 inbound passthrough source, the counterpart of 127.0.0.6 that
/// istio-iptables adds to `lo` when it installs the ip6tables rules.
pub const INBOUND_PASSTHROUGH_SRC6: Addr = [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 6])];

/// The loopback address a connection of `family` is redirected to: where iptables REDIRECT
/// sends locally generated connections (127.0.0.1, or `::1` for ip6tables).
#[inline(always)]
pub const fn localhost(family: Family) -> Addr {
    match family {
        Family::V4 => v4(crate::LOCALHOST_BE),
        Family::V6 => LOCALHOST6,
    }
}

/// Envoy's inbound passthrough source for `family`: 127.0.0.6 or `::6`.
#[inline(always)]
pub const fn passthrough_src(family: Family) -> Addr {
    match family {
        Family::V4 => v4(crate::INBOUND_PASSTHROUGH_SRC_BE),
        Family::V6 => INBOUND_PASSTHROUGH_SRC6,
    }
}

/// 127.0.0.0/8 or `::1`: reached over `lo` in every namespace.
#[inline(always)]
pub fn is_loopback(a: &Addr) -> bool {
    (is_v4(a) && crate::is_loopback4(a[3])) || words_eq(a, &LOCALHOST6)
}

/// Word-by-word equality, written out for the verifier (no memcmp in BPF).
#[inline(always)]
pub fn words_eq(a: &Addr, b: &Addr) -> bool {
    a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3]
}

/// A socket's bound address that binds nothing: `::` or `0.0.0.0` (v4-mapped, as an AF_INET
/// socket's unbound address reads in this form).
#[inline(always)]
pub fn is_unbound(a: &Addr) -> bool {
    words_eq(a, &UNSPECIFIED) || words_eq(a, &v4(0))
}

/// `a & mask == net`, word by word.
#[inline(always)]
pub fn masked_eq(a: &Addr, mask: &Addr, net: &Addr) -> bool {
    a[0] & mask[0] == net[0] && a[1] & mask[1] == net[1] && a[2] & mask[2] == net[2] && a[3] & mask[3] == net[3]
}

/// A prefix length (0..=128) as a network-order mask.
pub const fn prefix_mask(prefix: u8) -> Addr {
    let mut m = [0u32; 4];
    let mut i = 0;
    while i < 4 {
        let bits = prefix as i32 - 32 * i as i32;
        m[i] = if bits >= 32 {
            u32::MAX
        } else if bits <= 0 {
            0
        } else {
            (u32::MAX << (32 - bits as u32)).to_be()
        };
        i += 1;
    }
    m
}

/// The prefix length of a network-order mask (its leading ones).
pub const fn mask_prefix(mask: &Addr) -> u8 {
    let mut n = 0;
    let mut i = 0;
    while i < 4 {
        let ones = u32::from_be(mask[i]).leading_ones();
        n += ones;
        if ones < 32 {
            break;
        }
        i += 1;
    }
    n as u8
}

/// Bitwise `a & mask`.
pub const fn and(a: &Addr, mask: &Addr) -> Addr {
    [a[0] & mask[0], a[1] & mask[1], a[2] & mask[2], a[3] & mask[3]]
}

/// `ip` as the programs hold it (IPv4 v4-mapped).
#[cfg(any(feature = "user", test))]
pub const fn from_ip(ip: core::net::IpAddr) -> Addr {
    match ip {
        core::net::IpAddr::V4(v) => v4(u32::from_ne_bytes(v.octets())),
        core::net::IpAddr::V6(v) => from_v6(v),
    }
}

/// `ip`'s 16 bytes as they are (a v4-mapped `ip` stays v4-mapped, so it is IPv4).
#[cfg(any(feature = "user", test))]
pub const fn from_v6(ip: core::net::Ipv6Addr) -> Addr {
    let o = ip.octets();
    [
        u32::from_ne_bytes([o[0], o[1], o[2], o[3]]),
        u32::from_ne_bytes([o[4], o[5], o[6], o[7]]),
        u32::from_ne_bytes([o[8], o[9], o[10], o[11]]),
        u32::from_ne_bytes([o[12], o[13], o[14], o[15]]),
    ]
}

/// The address `a` holds: IPv4 for a v4-mapped one, as a connection's family on the wire.
#[cfg(any(feature = "user", test))]
pub fn to_ip(a: &Addr) -> core::net::IpAddr {
    if is_v4(a) {
        let o = a[3].to_ne_bytes();
        return core::net::IpAddr::V4(core::net::Ipv4Addr::new(o[0], o[1], o[2], o[3]));
    }
    let mut o = [0u8; 16];
    for (chunk, w) in o.chunks_exact_mut(4).zip(a) {
        chunk.copy_from_slice(&w.to_ne_bytes());
    }
    core::net::IpAddr::V6(core::net::Ipv6Addr::from(o))
}

#[cfg(test)]
mod tests {
    use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    use super::*;

    #[test]
    fn ipv4_is_v4_mapped_and_round_trips() {
        let ip = Ipv4Addr::new(10, 200, 1, 2);
        let a = from_ip(IpAddr::V4(ip));
        assert!(is_v4(&a));
        assert_eq!(a, from_v6(ip.to_ipv6_mapped()));
        assert_eq!(to_ip(&a), IpAddr::V4(ip));
        assert_eq!(a[3], u32::from(ip).to_be());
        let v6: Ipv6Addr = "fd00:200:0:1::2".parse().unwrap();
        assert!(!is_v4(&from_v6(v6)));
        assert_eq!(to_ip(&from_v6(v6)), IpAddr::V6(v6));
        assert_eq!(family(&from_v6(v6)), Family::V6);
    }

    #[test]
    fn constants_are_their_addresses() {
        assert_eq!(to_ip(&LOCALHOST6), IpAddr::V6(Ipv6Addr::LOCALHOST));
        assert_eq!(to_ip(&INBOUND_PASSTHROUGH_SRC6), "::6".parse::<IpAddr>().unwrap());
        assert_eq!(to_ip(&localhost(Family::V4)), IpAddr::V4(Ipv4Addr::LOCALHOST));
        assert_eq!(
            to_ip(&passthrough_src(Family::V4)),
            IpAddr::V4(Ipv4Addr::new(127, 0, 0, 6))
        );
        assert!(is_loopback(&LOCALHOST6));
        assert!(is_loopback(&from_ip(IpAddr::V4(Ipv4Addr::new(127, 1, 2, 3)))));
        assert!(!is_loopback(&INBOUND_PASSTHROUGH_SRC6));
        assert!(!is_loopback(&UNSPECIFIED));
    }

    #[test]
    fn masks() {
        for p in [0u8, 1, 31, 32, 33, 64, 96, 104, 127, 128] {
            assert_eq!(mask_prefix(&prefix_mask(p)), p, "{p}");
            let want = u128::MAX.checked_shl(128 - u32::from(p)).unwrap_or(0);
            assert_eq!(from_v6(Ipv6Addr::from_bits(want)), prefix_mask(p), "{p}");
        }
        let net = from_v6("fd00:200::".parse().unwrap());
        let m = prefix_mask(32);
        assert!(masked_eq(&from_v6("fd00:200:0:1::2".parse().unwrap()), &m, &net));
        assert!(!masked_eq(&from_v6("fd00:201::2".parse().unwrap()), &m, &net));
    }
}
