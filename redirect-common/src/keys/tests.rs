//! The keys the programs build from their contexts are the keys the agent builds from socket
//! addresses, byte for byte. Each test feeds [`TupleKey::new`] exactly as one program does,
//! from context fields laid out the way the kernel presents them on a little-endian machine
//! (the BPF target, `bpfel`, and the hosts these tests run on), and compares the bytes with
//! [`TupleKey::from_addrs`].
use core::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use super::*;
use crate::addr;

const NETNS: u64 = 0x0102_0304_0506_0708;

/// A connection as its connecting end sees it: app -> capture listener, with ports whose
/// two bytes differ and one above 32767, so a swapped or sign-extended port shows.
fn conn() -> (SocketAddr, SocketAddr) {
    (
        SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(10, 200, 1, 1), 0xabcd)),
        SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 1), 15001)),
    )
}

fn conn6() -> (SocketAddr, SocketAddr) {
    (
        SocketAddr::V6(SocketAddrV6::new("fd00:200:0:1::1".parse().unwrap(), 0xabcd, 0, 0)),
        SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::LOCALHOST, 15001, 0, 0)),
    )
}

/// The same addresses as an AF_INET6 socket shows them: v4-mapped.
fn mapped(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V4(v) => SocketAddr::V6(SocketAddrV6::new(v.ip().to_ipv6_mapped(), v.port(), 0, 0)),
        v6 => v6,
    }
}

/// Every `*_ip4` field: the address's octets in order in memory, loaded as a `u32`.
fn ip4_field(a: SocketAddr) -> u32 {
    let IpAddr::V4(ip) = a.ip() else {
        panic!("{a} is not IPv4")
    };
    u32::from_le_bytes(ip.octets())
}

/// Every `*_ip6[4]` field: four loads of four octets each.
fn ip6_fields(a: SocketAddr) -> [u32; 4] {
    let IpAddr::V6(ip) = a.ip() else {
        panic!("{a} is not IPv6")
    };
    let o = ip.octets();
    core::array::from_fn(|i| u32::from_le_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]]))
}

/// What a program builds from a socket of either family: `*_ip4` through [`addr::v4`], or
/// the four `*_ip6` words.
fn ip_field(a: SocketAddr) -> Addr {
    match a {
        SocketAddr::V4(_) => addr::v4(ip4_field(a)),
        SocketAddr::V6(_) => ip6_fields(a),
    }
}

/// Local ports: `skc_num`, host order.
fn local_port_field(a: SocketAddr) -> u32 {
    u32::from(a.port())
}

/// `bpf_sk_lookup.remote_port`, `bpf_sock.dst_port`: the `__be16` in the first two bytes of
/// the 4-byte field, zeros after.
fn be16_first_field(a: SocketAddr) -> u32 {
    let [hi, lo] = a.port().to_be_bytes();
    u32::from_le_bytes([hi, lo, 0, 0])
}

/// `bpf_sock_ops.remote_port`, `sk_msg_md.remote_port`: `skc_dport` loaded into a register,
/// then shifted left by 16.
fn be16_shifted_field(a: SocketAddr) -> u32 {
    u32::from(u16::from_le_bytes(a.port().to_be_bytes())) << 16
}

fn bytes(k: TupleKey) -> [u8; 48] {
    // SAFETY: TupleKey is repr(C), 48 bytes with no implicit padding (see `layout`), so all
    // 48 bytes are initialized integers and any [u8; 48] is a valid result.
    unsafe { core::mem::transmute::<TupleKey, [u8; 48]>(k) }
}

/// sock_ops (`tuple` in sockops.rs): `local_port` host order, `remote_port` network order
/// in the high half; addresses from `*_ip4` on AF_INET sockets, `*_ip6` on AF_INET6 ones.
fn sock_ops_key(local: SocketAddr, remote: SocketAddr) -> TupleKey {
    TupleKey::new(
        NETNS,
        ip_field(local),
        port::host(local_port_field(local)),
        ip_field(remote),
        port::be_high(be16_shifted_field(remote)),
    )
}

#[test]
fn from_addrs_layout() {
    let (app, listener) = conn();
    let key = TupleKey::from_addrs(NETNS, app, listener);
    let mut want = [0u8; 48];
    want[..8].copy_from_slice(&NETNS.to_ne_bytes());
    want[8..24].copy_from_slice(&Ipv4Addr::new(10, 200, 1, 1).to_ipv6_mapped().octets());
    want[24..40].copy_from_slice(&Ipv4Addr::LOCALHOST.to_ipv6_mapped().octets());
    want[40..42].copy_from_slice(&0xabcd_u16.to_ne_bytes());
    want[42..44].copy_from_slice(&15001_u16.to_ne_bytes());
    assert_eq!(bytes(key), want);
}

/// An AF_INET6 socket's v4-mapped view of a connection is the AF_INET view: the app's
/// AF_INET6 socket and the proxy's AF_INET one meet under one key.
#[test]
fn v4_mapped_sockets_share_the_ipv4_key() {
    let (app, listener) = conn();
    let v4 = bytes(TupleKey::from_addrs(NETNS, app, listener));
    assert_eq!(bytes(TupleKey::from_addrs(NETNS, mapped(app), mapped(listener))), v4);
    assert_eq!(bytes(sock_ops_key(mapped(app), mapped(listener))), v4);
    assert_eq!(bytes(sock_ops_key(app, listener)), v4);
}

/// sock_ops on the connecting end at ACTIVE_ESTABLISHED, and on the accepted end at
/// PASSIVE_ESTABLISHED (which looks up its peer's view, `reversed`), for both families.
#[test]
fn sock_ops() {
    for (app, listener) in [conn(), conn6()] {
        let want = bytes(TupleKey::from_addrs(NETNS, app, listener));
        assert_eq!(bytes(sock_ops_key(app, listener)), want);
        assert_eq!(bytes(sock_ops_key(listener, app).reversed()), want);
    }
}

/// sk_msg (`forward` in sk_msg.rs), the sender's own view: the same layout as sock_ops.
#[test]
fn sk_msg() {
    for (app, listener) in [conn(), conn6()] {
        let me = sock_ops_key(app, listener);
        assert_eq!(bytes(me), bytes(TupleKey::from_addrs(NETNS, app, listener)));
        // Its peer's key, which sk_msg redirects to, is the other end's own view.
        assert_eq!(bytes(me.reversed()), bytes(TupleKey::from_addrs(NETNS, listener, app)));
    }
}

/// sk_lookup (`decide` in sk_lookup.rs), on the SYN from a client of another host: the
/// remote end connects. `remote_port` network order in the low half, `local_port` host order.
#[test]
fn sk_lookup() {
    let v4 = (
        SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(10, 200, 1, 2), 0xabcd)),
        SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(10, 200, 1, 1), 9080)),
    );
    let v6 = (
        SocketAddr::V6(SocketAddrV6::new("fd00:200:0:1::2".parse().unwrap(), 0xabcd, 0, 0)),
        SocketAddr::V6(SocketAddrV6::new("fd00:200:0:1::1".parse().unwrap(), 9080, 0, 0)),
    );
    for (client, pod) in [v4, v6] {
        let key = TupleKey::new(
            NETNS,
            ip_field(client),
            port::be_low(be16_first_field(client)),
            ip_field(pod),
            port::host(local_port_field(pod)),
        );
        assert_eq!(bytes(key), bytes(TupleKey::from_addrs(NETNS, client, pod)));
    }
}

/// getsockopt (`answer` in getsockopt.rs), on the accepted socket's `bpf_sock`: its peer
/// (`dst_*`) connected. `dst_port` network order in the low half, `src_port` host order.
#[test]
fn getsockopt() {
    for (app, listener) in [conn(), conn6()] {
        let (src, dst) = (listener, app); // bpf_sock's own src_* / dst_* (local / peer)
        let key = TupleKey::new(
            NETNS,
            ip_field(dst),
            port::be_low(be16_first_field(dst)),
            ip_field(src),
            port::host(local_port_field(src)),
        );
        assert_eq!(bytes(key), bytes(TupleKey::from_addrs(NETNS, app, listener)));
    }
}

#[test]
fn user_port_round_trips() {
    let (app, _) = conn();
    // connect4/6 read `user_port` with be_low and write it with to_be_low.
    assert_eq!(port::to_be_low(app.port()), be16_first_field(app));
    assert_eq!(port::be_low(port::to_be_low(app.port())), app.port());
}

#[test]
fn local_addr_key() {
    let ip = Ipv4Addr::new(10, 200, 1, 1);
    let from_ctx = LocalAddrKey::new(NETNS, addr::v4(u32::from_le_bytes(ip.octets())));
    assert_eq!(from_ctx, LocalAddrKey::from_ip(NETNS, IpAddr::V4(ip)));
    assert_eq!(from_ctx, LocalAddrKey::from_ip(NETNS, IpAddr::V6(ip.to_ipv6_mapped())));
    let ip6: Ipv6Addr = "fd00:200:0:1::1".parse().unwrap();
    let a = SocketAddr::V6(SocketAddrV6::new(ip6, 0, 0, 0));
    assert_eq!(
        LocalAddrKey::new(NETNS, ip6_fields(a)),
        LocalAddrKey::from_ip(NETNS, IpAddr::V6(ip6))
    );
}
