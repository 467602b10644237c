//! A socket's real remote address from the kernel's socket table (`/proc/net/tcp`, `tcp6`),
//! found by the socket's inode.
//!
//! getpeername is what the app sees, and under capture it names the original destination (as
//! it does behind iptables REDIRECT); the table shows where the kernel actually connected the
//! socket (the capture port), which is how a test tells "proxied" from "direct".

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::AsRawFd,
};

/// The remote address of the TCP socket `fd`, as the calling thread's namespace lists it.
pub fn remote_of(fd: &impl AsRawFd) -> io::Result<Option<SocketAddr>> {
    let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))?;
    let link = link.to_string_lossy();
    let Some(inode) = link.strip_prefix("socket:[").and_then(|s| s.strip_suffix(']')) else {
        return Ok(None);
    };
    for table in ["/proc/thread-self/net/tcp", "/proc/thread-self/net/tcp6"] {
        if let Some(found) = find(&std::fs::read_to_string(table)?, inode) {
            return Ok(Some(found));
        }
    }
    Ok(None)
}

/// The `rem_address` of the line whose `inode` column is `inode`.
fn find(table: &str, inode: &str) -> Option<SocketAddr> {
    table.lines().skip(1).find_map(|line| {
        let cols: Vec<&str> = line.split_whitespace().collect();
        (cols.get(9) == Some(&inode)).then(|| parse(cols.get(2)?)).flatten()
    })
}

/// `0100007F:3A99` or `00000000000000000000000001000000:3A99`: the address as the kernel
/// stores it, printed as 32-bit words in host order, then the port in host order.
fn parse(field: &str) -> Option<SocketAddr> {
    let (ip, port) = field.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word =
        |i: usize| -> Option<[u8; 4]> { Some(u32::from_str_radix(ip.get(8 * i..8 * i + 8)?, 16).ok()?.to_ne_bytes()) };
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
        32 => {
            let mut o = [0u8; 16];
            for i in 0..4 {
                o[4 * i..4 * i + 4].copy_from_slice(&word(i)?);
            }
            IpAddr::V6(Ipv6Addr::from(o))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(all(test, target_endian = "little"))]
mod tests {
    use super::*;

    #[test]
    fn parses_both_tables() {
        assert_eq!(parse("0100007F:3A99"), Some("127.0.0.1:15001".parse().unwrap()));
        assert_eq!(
            parse("00000000000000000000000001000000:3A99"),
            Some("[::1]:15001".parse().unwrap())
        );
        assert_eq!(
            parse("0000000000000000FFFF00000100007F:3A99"),
            Some("[::ffff:127.0.0.1]:15001".parse().unwrap())
        );
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0101C80A:9A2C 0100007F:3A99 01 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 20 4 30 10 -1\n";
        assert_eq!(find(table, "4242"), Some("127.0.0.1:15001".parse().unwrap()));
        assert_eq!(find(table, "4243"), None);
    }
}
