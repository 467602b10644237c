//! `redirect-agent demo`: the agent on a throw-away workload, showing where each kind of
//! connection lands and the counters that decided it.

use std::{net::SocketAddrV4, path::Path};

use anyhow::Context as _;
use redirect_common::config::CaptureConfig;

use crate::{
    probe::{Outcome, ProbeResult},
    sandbox::{AgentProcess, NetnsPair, ProbeSpec, TestCgroup, TestServer, unique},
    stats, sys,
};

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

pub fn run() -> anyhow::Result<()> {
    sys::require_privileges("redirect-agent demo")?;
    let agent = std::env::current_exe().context("locating this binary")?;
    let pair = NetnsPair::create("demo").context("creating the demo namespaces")?;
    let cgroup = TestCgroup::create("demo").context("creating the demo cgroup")?;
    let remote = SocketAddrV4::new(pair.remote_ip, 8080);
    let pod = SocketAddrV4::new(pair.workload_ip, 9080);
    let _remote_srv = TestServer::start(&pair.remote, remote, "remote-host")?;
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
        AgentProcess::start(&agent, &name, &["--cgroup", &cg, "--netns", &netns]).context("starting the agent")?;
    println!("agent: instance {name} attached (default istio-iptables flags, embedded proxy)\n");

    let spec = |to| ProbeSpec::new(&cgroup.path, &pair.workload.path, to);
    let local = SocketAddrV4::new([127, 0, 0, 1].into(), 9080);
    let probes = [
        ("app (uid 0) -> remote 10.200.1.2:8080", spec(remote)),
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
    // The agent runs with istio-iptables' defaults: its capture ports are those.
    let defaults = CaptureConfig::default();
    println!("{:<46} where it landed", "connection");
    for (label, p) in &probes {
        let r = p.run(&agent).with_context(|| format!("probe {label}"))?;
        println!(
            "{label:<46} {}",
            path_of(&r, defaults.envoy_port, defaults.inbound_capture_port)
        );
    }

    println!("\nredirect-agent stats --name {name}:");
    print!("{}", stats::render_text(&stats::read(&name)?));

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
