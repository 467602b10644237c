//! Load through a node agent while the test restarts or hands it over: fresh connections in a
//! loop, each checked end to end.

use std::{
    io::{Read as _, Write as _},
    net::{Shutdown, SocketAddrV4, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use redirect_testkit::netns::NamedNetns;

/// A loop of fresh connections, each checked end to end, counted until `stop`. Bounded in
/// count and time.
pub fn load(
    netns: &NamedNetns,
    to: SocketAddrV4,
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
) -> std::thread::JoinHandle<Vec<String>> {
    let ns = netns.open().unwrap();
    std::thread::spawn(move || {
        ns.enter_current_thread().unwrap();
        let mut failures = Vec::new();
        let payload = vec![b'x'; 4096];
        // Past the restart the test makes, however long an agent takes to start (its programs
        // verified under emulation in the 6.1 VM take minutes), and bounded all the same.
        let deadline = Instant::now() + Duration::from_secs(30) + 2 * redirect_testkit::agent::start_timeout();
        for _ in 0..20_000 {
            if stop.load(Ordering::Relaxed) || Instant::now() > deadline {
                break;
            }
            let r = (|| -> std::io::Result<()> {
                let mut s = TcpStream::connect_timeout(&to.into(), Duration::from_secs(5))?;
                s.set_read_timeout(Some(Duration::from_secs(10)))?;
                s.write_all(&payload)?;
                s.shutdown(Shutdown::Write)?;
                let mut back = Vec::new();
                s.read_to_end(&mut back)?;
                let text = String::from_utf8_lossy(&back);
                let (banner, body) = text.split_once('\n').unwrap_or(("", ""));
                if !banner.starts_with("REDIRECT-TEST") || body.as_bytes() != payload.as_slice() {
                    return Err(std::io::Error::other(format!(
                        "bad answer: {banner:?}, {} bytes",
                        body.len()
                    )));
                }
                Ok(())
            })();
            match r {
                Ok(()) => {
                    ok.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => failures.push(e.to_string()),
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        failures
    })
}

pub struct StopOnDrop(pub Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}
