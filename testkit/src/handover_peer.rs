//! `redirect-testkit handover-peer`: the successor's side of a node agent's handover, played
//! as far as a test asks, to see what the running agent does with a successor that stalls,
//! dies half-way, or says it serves without serving. Run under the name `redirect-agent` (a
//! hard link) when the test needs it to pass for an agent process.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    path::PathBuf,
    process::ExitCode,
    time::Duration,
};

use clap::{Args, ValueEnum};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Until {
    /// Ask, read the answer, then stall for `--stall-ms` (without saying it is ready).
    Asked,
    /// Take every workload's descriptors, then exit (a successor that dies half-way).
    Descriptors,
    /// Take the descriptors, say "serving" without attaching anything, print the answer.
    Serving,
}

#[derive(Args, Debug)]
pub struct HandoverPeerArgs {
    /// The running agent's control socket.
    #[arg(long)]
    pub socket: PathBuf,
    /// The instance lock file to hold open while asking, as a successor does.
    #[arg(long)]
    pub lock: Option<PathBuf>,
    #[arg(long, value_enum)]
    pub until: Until,
    #[arg(long, default_value_t = 0)]
    pub stall_ms: u64,
}

/// Reads one line byte by byte (nothing after it is taken from the stream).
fn line(s: &UnixStream) -> std::io::Result<String> {
    let mut l = String::new();
    BufReader::with_capacity(1, s).read_line(&mut l)?;
    Ok(l.trim_end().to_owned())
}

fn run(args: &HandoverPeerArgs) -> anyhow::Result<()> {
    let _lock = args
        .lock
        .as_ref()
        .map(|p| std::fs::OpenOptions::new().write(true).open(p))
        .transpose()?;
    let s = UnixStream::connect(&args.socket)?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    (&s).write_all(b"{\"op\":\"handover\"}\n")?;
    let answer = line(&s)?;
    println!("{answer}");
    let list: serde_json::Value = serde_json::from_str(&answer)?;
    let Some(workloads) = list["handover"].as_array() else {
        return Ok(());
    };
    if args.until == Until::Asked {
        std::thread::sleep(Duration::from_millis(args.stall_ms));
        return Ok(());
    }
    (&s).write_all(b"ready\n")?;
    let mut fds = 0;
    for _ in workloads {
        fds += redirect_agent::sys::recv_fds(&s)?.len();
    }
    println!("descriptors {fds}");
    if args.until == Until::Descriptors {
        return Ok(());
    }
    (&s).write_all(b"serving\n")?;
    println!("{}", line(&s).unwrap_or_else(|e| format!("(no answer: {e})")));
    Ok(())
}

pub fn main(args: &HandoverPeerArgs) -> ExitCode {
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("handover-peer: {e:#}");
            ExitCode::FAILURE
        }
    }
}
