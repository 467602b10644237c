//! The wire protocol between the load generator and its server, and the server.
//!
//! A request is a 9-byte header (`kind`, request length, response length, big-endian) and the
//! request bytes. `Keep`: the server answers and waits for the next request (RR). `Close`: it
//! answers and closes first, so the TIME_WAIT state lands on the server's side and the client
//! does not run out of ephemeral ports (CRR). `Sink`: it reads until EOF and answers with the
//! byte count (STREAM).

use std::{
    io::{self, Read, Write},
    net::{Shutdown, SocketAddrV4, TcpListener, TcpStream},
};

#[repr(u8)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    Keep = 0,
    Close = 1,
    Sink = 2,
}

pub const HEADER: usize = 9;

pub fn header(kind: Kind, request: u32, response: u32) -> [u8; HEADER] {
    let mut h = [0u8; HEADER];
    h[0] = kind as u8;
    h[1..5].copy_from_slice(&request.to_be_bytes());
    h[5..9].copy_from_slice(&response.to_be_bytes());
    h
}

fn parse(h: &[u8; HEADER]) -> io::Result<(Kind, u32, u32)> {
    let kind = match h[0] {
        0 => Kind::Keep,
        1 => Kind::Close,
        2 => Kind::Sink,
        k => return Err(io::Error::new(io::ErrorKind::InvalidData, format!("unknown kind {k}"))),
    };
    let n = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    Ok((kind, n(&h[1..5]), n(&h[5..9])))
}

/// Largest request or response the server accepts (bounds its buffers).
const MAX_MESSAGE: u32 = 16 << 20;

/// Serves one connection until the client is done.
fn serve_one(mut s: TcpStream) -> io::Result<()> {
    s.set_nodelay(true)?;
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let mut h = [0u8; HEADER];
        match s.read_exact(&mut h) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        let (kind, req, resp) = parse(&h)?;
        if kind == Kind::Sink {
            let mut total: u64 = 0;
            loop {
                let n = s.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                total += n as u64;
            }
            s.write_all(&total.to_be_bytes())?;
            return Ok(());
        }
        if req > MAX_MESSAGE || resp > MAX_MESSAGE {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "message too large"));
        }
        let mut left = req as usize;
        while left > 0 {
            let n = s.read(&mut buf[..left.min(256 << 10)])?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            left -= n;
        }
        let mut left = resp as usize;
        while left > 0 {
            let n = left.min(buf.len());
            s.write_all(&buf[..n])?;
            left -= n;
        }
        if kind == Kind::Close {
            return s.shutdown(Shutdown::Both);
        }
    }
}

/// Accepts forever, a thread per connection.
pub fn serve(listen: SocketAddrV4) -> io::Result<()> {
    let listener = TcpListener::bind(listen)?;
    println!("ready");
    io::stdout().flush()?;
    for s in listener.incoming() {
        let Ok(s) = s else { continue };
        std::thread::spawn(move || {
            let _ = serve_one(s);
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip() {
        let h = header(Kind::Close, 1024, 70_000);
        assert_eq!(parse(&h).unwrap(), (Kind::Close, 1024, 70_000));
        assert!(parse(&[9, 0, 0, 0, 0, 0, 0, 0, 0]).is_err());
    }
}
