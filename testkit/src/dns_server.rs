//! A resolver for the tests: every A query gets one address, over UDP and over TCP (RFC 1035
//! length-prefixed); anything else gets an empty answer. Enough for glibc's resolver
//! (`getent ahostsv4`) to resolve a name through the agent's DNS capture.

use std::{
    io::{self, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket},
    time::Duration,
};

/// The answer to `query`: `a` for an A question, no record otherwise. `None` for something
/// that is no query (shorter than a header and its question).
pub fn answer(query: &[u8], a: Ipv4Addr) -> Option<Vec<u8>> {
    if query.len() < 12 || u16::from_be_bytes([query[4], query[5]]) != 1 {
        return None;
    }
    // The question: labels up to the root's zero byte, then type and class.
    let mut at = 12;
    loop {
        let len = usize::from(*query.get(at)?);
        at += 1;
        if len == 0 {
            break;
        }
        at += len;
    }
    let qtype = u16::from_be_bytes([*query.get(at)?, *query.get(at + 1)?]);
    let question_end = at + 4;
    let question = query.get(12..question_end)?;
    let is_a = qtype == 1;
    let mut out = Vec::with_capacity(question_end + 16);
    out.extend_from_slice(&query[..2]);
    // QR, RD copied, RA; no error.
    out.extend_from_slice(&[0x81 | (query[2] & 0x01), 0x80]);
    out.extend_from_slice(&[0, 1, 0, u8::from(is_a), 0, 0, 0, 0]);
    out.extend_from_slice(question);
    if is_a {
        // The question's name (a pointer to offset 12), A, IN, a TTL of 60, 4 bytes.
        out.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
        out.extend_from_slice(&a.octets());
    }
    Some(out)
}

/// Serves `addr` on UDP and TCP on threads of this process, until it exits.
pub fn spawn(addr: SocketAddr, a: Ipv4Addr) -> io::Result<()> {
    let udp = UdpSocket::bind(addr)?;
    let tcp = TcpListener::bind(addr)?;
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while let Ok((n, peer)) = udp.recv_from(&mut buf) {
            if let Some(reply) = answer(&buf[..n], a) {
                let _ = udp.send_to(&reply, peer);
            }
        }
    });
    std::thread::spawn(move || {
        for mut stream in tcp.incoming().flatten() {
            std::thread::spawn(move || {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
                let mut len = [0u8; 2];
                while stream.read_exact(&mut len).is_ok() {
                    let mut query = vec![0u8; usize::from(u16::from_be_bytes(len))];
                    if stream.read_exact(&mut query).is_err() {
                        return;
                    }
                    let Some(reply) = answer(&query, a) else { return };
                    let mut framed = (reply.len() as u16).to_be_bytes().to_vec();
                    framed.extend_from_slice(&reply);
                    if stream.write_all(&framed).is_err() {
                        return;
                    }
                }
            });
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_a_query_gets_the_address_and_others_none() {
        // id 0x1234, RD, one question: "svc.test" A IN.
        let mut q = vec![0x12, 0x34, 0x01, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        q.extend_from_slice(b"\x03svc\x04test\x00");
        q.extend_from_slice(&[0, 1, 0, 1]);
        let r = answer(&q, Ipv4Addr::new(10, 200, 1, 77)).unwrap();
        assert_eq!(&r[..2], &[0x12, 0x34]);
        assert_eq!(&r[6..8], &[0, 1], "one answer");
        assert_eq!(&r[r.len() - 4..], &[10, 200, 1, 77]);
        let mut aaaa = q.clone();
        let n = aaaa.len();
        aaaa[n - 3] = 28;
        assert_eq!(&answer(&aaaa, Ipv4Addr::LOCALHOST).unwrap()[6..8], &[0, 0]);
        assert!(answer(&q[..10], Ipv4Addr::LOCALHOST).is_none());
    }
}
