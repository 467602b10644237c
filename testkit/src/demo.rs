//! `redirect-testkit demo`: the agent binary on a throw-away workload, showing where each kind
//! of connection lands and the counters that decided it.

use std::{
    net::SocketAddrV4,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Context as _;
use redirect_agent::sys;

use crate::{
    agent::AgentProcess,
    cgroup::TestCgroup,
    netns::NetnsPair,
    probe::ProbeSpec,
    report::{Outcome, ProbeResult},
    server::TestServer,
    util::unique,
};

/// The capture ports of istio-iptables' defaults (`-p 15001 -z 15006`), which the demo's agent
/// runs with.
const OUTBOUND_CAPTURE: u16 = 15001;
const INBOUND_CAPTURE: u16 = 15006;

#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {
    /// The redirect-agent binary to run (default: `redirect-agent` beside this binary).
    #[arg(long, value_name = "PATH")]
    pub agent: Option<PathBuf>,
}

fn path_of(r: &ProbeResult, outbound: u16, inbound: u16) -> String {
    if r.outcome != Outcome::Ok {
        return format!("failed: {:?} {}", r.outcome, r.error.as_deref().unwrap_or(""));
    }
    let server = r.banner_field("name").unwrap_or("?");
    let saw = r.banner_field("peer").unwrap_or("?");
    // sk_lookup rewrites nothing: the client stays connected to the app's address, and only the
    // proxy's upstream source (127.0.0.6) shows the detour.
    let via = match r.peer_port() {
        Some(p) if p == outbound || p == inbound => format!("captured -> proxy :{p} ->"),
        _ if saw.starts_with("127.0.0.6:") => format!("captured (sk_lookup) -> proxy :{inbound} ->"),
        _ => "direct ->".to_owned(),
    };
    let intact = if r.intact { "bytes intact" } else { "BYTES DIFFER" };
    format!("{via} {server} (server saw {saw}; {intact})")
}

pub fn run(args: &DemoArgs) -> anyhow::Result<()> {
    sys::require_privileges("redirect-testkit demo")?;
    // The probes are this binary's own `probe` subcommand.
    let testkit = std::env::current_exe().context("locating this binary")?;
    let agent = match &args.agent {
        Some(a) => a.clone(),
        None => testkit.with_file_name("redirect-agent"),
    };
    anyhow::ensure!(
        agent.is_file(),
        "agent binary {} not found: build it (`cargo build -p redirect-agent`) or pass --agent PATH",
        agent.display()
    );
    let pair = NetnsPair::create("demo").context("creating the demo namespaces")?;
    let cgroup = TestCgroup::create("demo").context("creating the demo cgroup")?;
    let remote = SocketAddrV4::new(pair.remote_ip, 8080);
    let pod = SocketAddrV4::new(pair.workload_ip, 9080);
    let _remote_srv = TestServer::start(&pair.remote, remote, "remote-host")?;
    let remote6 = std::net::SocketAddr::new(pair.remote_ip6.into(), 8080);
    let _remote6_srv = TestServer::start(&pair.remote, remote6, "remote-host")?;
    let _app_srv = TestServer::start(
        &pair.workload,
        SocketAddrV4::new([0, 0, 0, 0].into(), 9080),
        "workload-app",
    )?;
    let status = SocketAddrV4::new(pair.workload_ip, 15020);
    let _status_srv = TestServer::start(
        &pair.workload,
        SocketAddrV4::new([0, 0, 0, 0].into(), 15020),
        "workload-status",
    )?;
    println!(
        "workload: netns {} ({}), cgroup {}",
        pair.workload.name,
        pair.workload_ip,
        cgroup.path.display()
    );
    println!("remote host: netns {} ({})", pair.remote.name, pair.remote_ip);

    let name = unique("demo");
    let netns = pair.workload.path.to_string_lossy().into_owned();
    let cg = cgroup.path.to_string_lossy().into_owned();
    let mut agent_proc =
        // The product's defaults, the fast path's included (the harness would turn it off).
        AgentProcess::start(&agent, &name, &["--cgroup", &cg, "--netns", &netns, "--fast-path=auto"])
            .context("starting the agent")?;
    println!("agent: instance {name} attached (default istio-iptables flags, embedded proxy)\n");

    let spec = |to: std::net::SocketAddr| ProbeSpec::new(&cgroup.path, &pair.workload.path, to);
    let (remote, pod, status) = (remote.into(), pod.into(), std::net::SocketAddr::from(status));
    let local = SocketAddrV4::new([127, 0, 0, 1].into(), 9080).into();
    let probes = [
        ("app (uid 0) -> remote 10.200.1.2:8080", spec(remote)),
        (
            "app, AF_INET6 -> remote [::ffff:10.200.1.2]:8080",
            spec(remote).v4_mapped(),
        ),
        ("app, AF_INET6 -> remote [fd00:200:0:1::2]:8080", spec(remote6)),
        (
            "proxy (uid 1337) -> remote 10.200.1.2:8080",
            spec(remote).uid(1337).gid(1337),
        ),
        ("app (uid 0) -> localhost 127.0.0.1:9080", spec(local)),
        (
            "proxy (uid 1337) -> own pod 10.200.1.1:9080",
            spec(pod).uid(1337).gid(1337),
        ),
        (
            "remote host -> pod 10.200.1.1:9080",
            ProbeSpec::outside(&pair.remote.path, pod),
        ),
        (
            "remote host -> pod 10.200.1.1:15020 (-d)",
            ProbeSpec::outside(&pair.remote.path, status),
        ),
    ];
    println!("{:<48} where it landed", "connection");
    for (label, p) in &probes {
        let r = p.run(&testkit).with_context(|| format!("probe {label}"))?;
        println!("{label:<48} {}", path_of(&r, OUTBOUND_CAPTURE, INBOUND_CAPTURE));
    }

    println!("\nredirect-agent stats --name {name}:");
    let out = Command::new(&agent)
        .args(["stats", "--name", &name])
        .output()
        .with_context(|| format!("running {} stats", agent.display()))?;
    if !out.status.success() {
        anyhow::bail!(
            "redirect-agent stats failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    print!("{}", String::from_utf8_lossy(&out.stdout));

    let (status, log) = agent_proc.stop()?;
    let pins_left = Path::new(sys::PIN_ROOT).join(&name).exists();
    println!(
        "\nagent stopped ({status}); pins left behind: {}",
        if pins_left { "YES" } else { "none" }
    );
    if !status.success() {
        anyhow::bail!("the agent failed: {}", log.trim());
    }
    Ok(())
}
