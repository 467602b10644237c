//! Attach, detach and bad input: nothing left behind, one clear line for every mistake.

use std::{
    io::{self, BufRead as _, BufReader, Read as _, Write as _},
    net::{Ipv4Addr, Shutdown, TcpStream},
    os::unix::{fs::MetadataExt as _, process::CommandExt as _},
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use aya::maps::{HashMap, Map, MapData};
use redirect_agent::engine::pins::{State, pin_dir, state_path};
use redirect_common::{LocalAddrKey, maps, programs};
use redirect_tests::{APP_PORT, INBOUND_CAPTURE, Landing, Outcome, Workload, agent_bin, agent_cmd, landing};

fn bpftool_json(args: &[&str]) -> serde_json::Value {
    let out = Command::new("bpftool")
        .arg("-j")
        .args(args)
        .output()
        .expect("bpftool (installed by xtask setup)");
    assert!(
        out.status.success(),
        "bpftool {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // `cgroup show` prints nothing at all for a cgroup without programs.
    if out.stdout.iter().all(u8::is_ascii_whitespace) {
        return serde_json::Value::Array(Vec::new());
    }
    serde_json::from_slice(&out.stdout).expect("bpftool json")
}

fn attached_prog_ids(cgroup: &Path) -> Vec<u64> {
    let v = bpftool_json(&["cgroup", "show", &cgroup.to_string_lossy()]);
    v.as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_u64().unwrap())
        .collect()
}

#[test]
fn detach_leaves_no_program_link_or_pin() {
    let mut w = Workload::with_agent("detach", &[]);
    let state: State = serde_json::from_slice(&std::fs::read(state_path(&w.name)).unwrap()).expect("state file");
    let mut ids: Vec<u64> = state.programs.values().map(|id| u64::from(*id)).collect();
    ids.sort();
    let mut attached = attached_prog_ids(&w.cgroup.path);
    attached.sort();
    assert_eq!(attached, ids, "bpftool sees the state's programs on the cgroup");
    // sk_lookup is the workload's own instance, linked to its namespace, not to the cgroup.
    let netns_ino = std::fs::metadata(&w.pair.workload.path).unwrap().ino();
    let links = bpftool_json(&["link", "show"]);
    let lookup_id = links
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["type"] == "netns" && l["netns_ino"].as_u64() == Some(netns_ino))
        .and_then(|l| l["prog_id"].as_u64())
        .unwrap_or_else(|| panic!("no netns link on inode {netns_ino}: {links}"));
    let lookup = bpftool_json(&["prog", "show", "id", &lookup_id.to_string()]);
    // The kernel keeps 15 bytes of a program's name; bpftool shows the whole one from BTF.
    let name = lookup["name"].as_str().unwrap_or_default();
    assert!(programs::SK_LOOKUP.starts_with(name) && name.len() >= 15, "{lookup}");
    ids.push(lookup_id);
    assert!(pin_dir(&w.name).join(maps::RULE_COUNTERS).exists());

    let (status, log) = w.agent.as_mut().unwrap().stop().unwrap();
    assert!(status.success(), "agent exit {status}: {log}");

    assert!(attached_prog_ids(&w.cgroup.path).is_empty(), "programs still attached");
    assert!(
        !pin_dir(&w.name).exists(),
        "pins left in {}",
        pin_dir(&w.name).display()
    );
    assert!(!state_path(&w.name).exists(), "state file left");
    for id in &ids {
        let out = Command::new("bpftool")
            .args(["prog", "show", "id", &id.to_string()])
            .output()
            .unwrap();
        assert!(!out.status.success(), "program {id} still loaded");
    }
    let links = bpftool_json(&["link", "show"]);
    for l in links.as_array().unwrap() {
        let prog = l["prog_id"].as_u64().unwrap_or(0);
        assert!(!ids.contains(&prog), "link {l} still holds program {prog}");
    }
}

/// Runs the agent expecting failure: non-zero exit, one line on stderr naming `needle`.
fn rejected(args: &[&str], needle: &str) -> String {
    let out = redirect_tests::agent_cmd_within(args, Duration::from_secs(30))
        .unwrap_or_else(|| panic!("{args:?} was not refused: still running after 30 s"));
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{args:?} succeeded: {err}");
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "{args:?}: expected one line, got:\n{err}"
    );
    assert!(err.contains(needle), "{args:?}: '{needle}' not in: {err}");
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    err
}

#[test]
fn bad_input_gets_one_clear_line_and_changes_nothing() {
    let w = Workload::new("badflags");
    let base = w.run_args();
    let run = |extra: &[&str]| -> Vec<String> {
        let mut a = vec!["run".to_owned(), "--name".into(), w.name.clone()];
        a.extend(base.iter().cloned());
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let cases: &[(&[&str], &str)] = &[
        (&["-p", "0"], "'0'"),
        (&["--envoy-port", "70000"], "'70000'"),
        (&["-z", "http"], "'http'"),
        (&["-i", "10.0.0.0/33"], "'10.0.0.0/33'"),
        (&["-x", "fd00::/129"], "'fd00::/129'"),
        (&["-u", "root"], "'root'"),
        (&["-g", "1337,x"], "-g/--proxy-gid"),
        (&["--probe-timeout", "3"], "'3'"),
        (&["--dry-run=maybe"], "'maybe'"),
        (&["--network-namespace", "/tmp"], "--network-namespace /tmp"),
        (
            &["-m", "TPROXY", "-r", "254"],
            "-r/--istio-inbound-tproxy-route-table 254",
        ),
        (&["-m", "tproxy"], "'tproxy'"),
        (&["-k", "eth9,ta+p"], "'ta+p'"),
        (&["-d", "15090,abc"], "'abc'"),
        (&["-b", "80,-1"], "'-1'"),
        (&["-q", "99999"], "'99999'"),
        (&["--proxy", "sideways"], "'sideways'"),
        (&["--max-tracked-connections", "5"], "5"),
        // Past a million the maps would take gigabytes of kernel memory (~580 bytes each).
        (&["--max-tracked-connections", "16777216"], "'16777216'"),
        (&["--frobnicate"], "--frobnicate"),
        (&["-p", "15006"], "both 15006"),
        (&["-i", "*,10.0.0.0/8"], "'*' alone"),
        (&["-b", "*,80"], "'*' alone"),
    ];
    for (extra, needle) in cases {
        let args = run(extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        println!("{}", rejected(&args, needle).trim_end());
    }
    let cg = w.cgroup.path.to_string_lossy().into_owned();
    let ns = w.pair.workload.path.to_string_lossy().into_owned();
    let path_cases: &[(&[&str], &str)] = &[
        (
            &["run", "--cgroup", "/tmp", "--netns", &ns, "--name", &w.name],
            "'/tmp' is not a cgroup v2 directory",
        ),
        (
            &["run", "--cgroup", "/nonexistent/cg", "--netns", &ns, "--name", &w.name],
            "/nonexistent/cg",
        ),
        (
            &["run", "--cgroup", &cg, "--netns", "/tmp", "--name", &w.name],
            "'/tmp' is not a network namespace",
        ),
        (
            &["run", "--cgroup", &cg, "--netns", &ns, "--name", "bad/name"],
            "'bad/name'",
        ),
        // The host's own namespace is captured only when asked for by name.
        (&["run", "--cgroup", &cg, "--name", &w.name], "--netns PATH"),
        (
            &[
                "run",
                "--cgroup",
                &cg,
                "--netns",
                "/proc/self/ns/net",
                "--name",
                &w.name,
            ],
            "--host-netns",
        ),
        (&["stats", "--name", &w.name], &w.name),
        (&["explain", "-x", "10.0.0.1/40"], "'10.0.0.1/40'"),
        (&["explain", "-o", "1,2,x"], "'x'"),
    ];
    for (args, needle) in path_cases {
        println!("{}", rejected(args, needle).trim_end());
    }
    // Nothing was attached or pinned by any of them.
    assert!(attached_prog_ids(&w.cgroup.path).is_empty());
    assert!(!pin_dir(&w.name).exists());
}

/// istio-iptables' flags that say how to run it, not which rules to write, are taken as it
/// takes them: a dry run (flag or DRY_RUN) prints both families' tables and attaches nothing,
/// `--skip-rule-apply` installs nothing, `--cleanup-only` removes leftovers and exits, the
/// plumbing flags change nothing, a repeated flag keeps its last value, and an empty -u/-g
/// falls back to ENVOY_USER's uid (else 1337) as istio-iptables' do.
#[test]
fn istio_iptables_run_flags_are_taken_as_it_takes_them() {
    let w = Workload::new("runflags");
    let base = w.run_args();
    let agent = |cmd: &str, extra: &[&str], env: &[(&str, &str)]| {
        let mut c = Command::new(agent_bin());
        c.arg(cmd);
        if cmd == "run" {
            c.args(["--name", w.name.as_str()]).args(&base);
        }
        let out = c.args(extra).envs(env.iter().copied()).output().expect("agent");
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        assert!(out.status.success(), "{cmd} {extra:?} {env:?}: {}", text(&out.stderr));
        (text(&out.stdout), text(&out.stderr))
    };
    let (tables, _) = agent("run", &["-n", "-b", "80", "-b", "8080"], &[]);
    assert!(
        tables.contains("(iptables)") && tables.contains("(ip6tables)"),
        "{tables}"
    );
    assert!(tables.contains("--dport 8080 -j ISTIO_IN_REDIRECT"), "{tables}");
    assert!(!tables.contains("--dport 80 "), "the last -b wins: {tables}");
    let (tables, _) = agent("run", &[], &[("DRY_RUN", "true")]);
    assert!(tables.contains("(ip6tables)"), "{tables}");
    let plumbing = [
        "--dual-stack",
        "--cni-mode",
        "--reconcile",
        "--force-apply",
        "--native-nftables",
        "--force-iptables-binary=legacy",
        "--iptables-probe-port=15102",
        "--probe-timeout=2s",
    ];
    let (_, log) = agent("run", &[&["--dry-run"][..], &plumbing].concat(), &[]);
    assert!(log.contains("no effect here"), "{log}");
    agent("run", &["--skip-rule-apply"], &[]);
    agent("run", &["--cleanup-only"], &[]);
    assert!(attached_prog_ids(&w.cgroup.path).is_empty());
    assert!(!pin_dir(&w.name).exists());

    let (default, _) = agent("explain", &[], &[]);
    let (empty, _) = agent("explain", &["-u", "", "-g", ""], &[("ENVOY_USER", "no-such-user")]);
    assert_eq!(
        empty, default,
        "an empty -u is ENVOY_USER's uid, else 1337; an empty -g is -u's"
    );
    let (nobody, _) = agent("explain", &["-u", ""], &[("ENVOY_USER", "nobody")]);
    assert!(
        nobody.contains("--uid-owner 65534") && nobody.contains("--gid-owner 65534"),
        "{nobody}"
    );
}

#[test]
fn missing_privilege_is_named() {
    let w = Workload::new("nopriv");
    let mut args = vec!["run".to_owned(), "--name".into(), w.name.clone()];
    args.extend(w.run_args());
    let out = Command::new(agent_bin())
        .args(&args)
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("needs root") && err.contains("uid 65534"), "{err}");
}

#[test]
fn a_second_instance_of_the_same_name_is_refused() {
    let w = Workload::with_agent("twice", &[]);
    let mut args = vec!["run".to_owned(), "--name".into(), w.name.clone()];
    args.extend(w.run_args());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    rejected(&args, "already running");
    // The first one is untouched and still serving.
    assert!(pin_dir(&w.name).join(maps::WORKLOADS).exists());
}

fn local_addrs(name: &str) -> Vec<std::net::IpAddr> {
    let map = Map::from_map_data(MapData::from_pin(pin_dir(name).join(maps::LOCAL_ADDRS)).unwrap()).unwrap();
    let map: HashMap<MapData, LocalAddrKey, u8> = HashMap::try_from(map).unwrap();
    map.keys()
        .map(|k| redirect_common::addr::to_ip(&k.unwrap().addr))
        .collect()
}

/// `-o lo` follows the namespace's addresses as they change (netlink), bounded in time.
#[test]
fn local_addresses_follow_the_namespace() {
    let w = Workload::with_agent("addrs", &[]);
    assert!(local_addrs(&w.name).contains(&w.pair.workload_ip.into()));
    let extra = Ipv4Addr::new(10, 200, 1, 5);
    w.pair
        .workload
        .ip(&["addr", "add", "10.200.1.5/32", "dev", "w0"])
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !local_addrs(&w.name).contains(&extra.into()) {
        assert!(Instant::now() < deadline, "agent did not pick up {extra}");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The proxy dialing the new own address now goes to inbound capture, as with -o lo.
    let r = w.probe(&w.spec(std::net::SocketAddrV4::new(extra, APP_PORT)).uid(1337));
    assert_eq!(
        landing(&r),
        Landing::Proxied {
            capture_port: INBOUND_CAPTURE,
            server: "app".into()
        },
        "{r:?}"
    );

    w.pair
        .workload
        .ip(&["addr", "del", "10.200.1.5/32", "dev", "w0"])
        .unwrap();
    while local_addrs(&w.name).contains(&extra.into()) {
        assert!(Instant::now() < deadline, "agent did not drop {extra}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// SIGKILLs the run agent of `w` and reaps it.
fn kill_agent(w: &mut Workload) {
    let pid = w.agent.as_ref().unwrap().pid().unwrap();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let _ = w.agent.as_mut().unwrap().stop();
}

/// Starts `w`'s agent again under the same name (with `flags`) and checks that it captures.
fn restart_and_capture(w: &mut Workload, flags: &[&str]) {
    w.start_agent(flags).expect("restart with the same name");
    let r = w.probe(&w.spec(w.remote(redirect_tests::REMOTE_PORT)));
    assert_eq!(
        landing(&r),
        Landing::Proxied {
            capture_port: redirect_tests::OUTBOUND_CAPTURE,
            server: "remote".into()
        },
        "{r:?}"
    );
}

/// Fail-closed: a killed run's pinned links keep capturing, so while no agent runs the
/// workload's connections are refused, outbound and inbound, and none reaches its destination
/// around the proxy. The next run of the same name takes the links over (no gap) and serves.
#[test]
fn a_killed_run_keeps_capturing_until_its_restart_takes_over() {
    let mut w = Workload::with_agent("sigkill", &[]);
    kill_agent(&mut w);
    assert!(
        !attached_prog_ids(&w.cgroup.path).is_empty(),
        "capture ended with the killed agent"
    );
    for i in 0..10 {
        let r = w.probe(&w.spec(w.remote(redirect_tests::REMOTE_PORT)));
        assert!(
            matches!(landing(&r), Landing::Failed(Outcome::Refused | Outcome::Reset)),
            "outbound {i} while no agent runs: {r:?}"
        );
        let r = w.probe(&w.from_remote(w.pod(redirect_tests::APP_PORT)));
        assert!(
            matches!(landing(&r), Landing::Failed(Outcome::Refused | Outcome::Reset)),
            "inbound {i} while no agent runs: {r:?}"
        );
    }
    assert!(
        w.remote_server.accepted().is_empty(),
        "reached the remote host directly"
    );
    assert!(w.app_server.accepted().is_empty(), "reached the app directly");

    restart_and_capture(&mut w, &[]);
    // The rules never went away: the 10 refused connections were decided (and counted) by
    // ISTIO_REDIRECT as under iptables with Envoy down, and the counters were taken over.
    assert_eq!(w.counts()[8], 11, "counters kept across the restart");
    let (status, log) = w.agent.as_mut().unwrap().stop().unwrap();
    assert!(status.success(), "{log}");
    assert!(log.contains("taking over"), "{log}");
    assert!(!pin_dir(&w.name).exists());
    assert!(attached_prog_ids(&w.cgroup.path).is_empty());
}

/// A killed run taken over by a run with other lists: the new chain's set entries hold only
/// its own members. The killed one's (the remote host in `-i`) would otherwise sit in the same
/// entry and capture what the new flags leave alone, and show in `stats` as a rule that is not
/// there.
#[test]
fn a_run_taking_over_with_other_lists_keeps_none_of_the_old_members() {
    let mut w = Workload::new("relist");
    let remote = format!("{}/32", w.pair.remote_ip);
    let first = format!("10.98.0.0/16,{remote}");
    w.start_agent(&["-i", &first]).expect("first run");
    let r = w.probe(&w.spec(w.remote(redirect_tests::REMOTE_PORT)));
    assert!(matches!(landing(&r), Landing::Proxied { .. }), "{r:?}");
    kill_agent(&mut w);
    w.start_agent(&["-i", "10.98.0.0/16,10.97.0.0/16"]).expect("second run");
    let r = w.probe(&w.spec(w.remote(redirect_tests::REMOTE_PORT)));
    assert!(
        matches!(landing(&r), Landing::Direct { .. }),
        "iptables with the second run's flags leaves the remote host alone: {r:?}"
    );
    let out = Command::new(agent_bin())
        .args(["stats", "--name", &w.name])
        .output()
        .unwrap();
    let stats = String::from_utf8_lossy(&out.stdout);
    assert!(!stats.contains(&w.pair.remote_ip.to_string()), "{stats}");
    assert!(stats.contains("10.97.0.0/16"), "{stats}");
    let (status, log) = w.agent.as_mut().unwrap().stop().unwrap();
    assert!(status.success(), "{log}");
    assert!(log.contains("taking over"), "{log}");
}

/// `--fail-open` asks for the other choice: links die with the process, so a killed agent
/// leaves nothing attached and the workload's connections go direct; its stale pins are removed
/// by the next run of the same name, which then captures as usual.
#[test]
fn with_fail_open_a_killed_run_lets_connections_through() {
    let mut w = Workload::with_agent("sigkill-open", &["--fail-open"]);
    kill_agent(&mut w);
    assert!(
        attached_prog_ids(&w.cgroup.path).is_empty(),
        "programs outlived the killed agent"
    );
    assert!(pin_dir(&w.name).exists(), "a killed agent cannot remove its pins");
    let r = w.probe(&w.spec(w.remote(redirect_tests::REMOTE_PORT)));
    assert_eq!(
        landing(&r),
        Landing::Direct {
            server: "remote".into()
        },
        "{r:?}"
    );

    restart_and_capture(&mut w, &["--fail-open"]);
    assert_eq!(w.counts()[8], 1, "counters start afresh");
    let (status, log) = w.agent.as_mut().unwrap().stop().unwrap();
    assert!(status.success(), "{log}");
    assert!(!pin_dir(&w.name).exists());
}

/// SIGTERM at any point of startup leaves nothing behind. The delays sweep the phases
/// (before the handler exists, loading, attaching, running); whichever is hit, the result must
/// be the same, so this cannot pass by luck of timing.
#[test]
fn sigterm_during_startup_leaves_nothing_behind() {
    let w = Workload::new("earlyterm");
    for delay_ms in [0u64, 2, 10, 30, 80, 200] {
        let name = format!("{}-{delay_ms}", w.name);
        let mut args = vec!["run".to_owned(), "--name".into(), name.clone()];
        args.extend(w.run_args());
        let mut child = Command::new(agent_bin())
            .args(&args)
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < deadline, "agent ignored SIGTERM after {delay_ms} ms");
            std::thread::sleep(Duration::from_millis(10));
        };
        println!("SIGTERM after {delay_ms} ms: {status}");
        assert!(
            attached_prog_ids(&w.cgroup.path).is_empty(),
            "{delay_ms} ms: programs left attached"
        );
        assert!(!pin_dir(&name).exists(), "{delay_ms} ms: pins left");
        assert!(!state_path(&name).exists(), "{delay_ms} ms: state file left");
        assert!(
            !Path::new("/run/redirect").join(format!("{name}.lock")).exists(),
            "{delay_ms} ms: lock left"
        );
    }
}

/// `check` probes every feature the programs use; on this kernel all are there, and the probe
/// does say "no" for a helper a program type cannot call (so "yes" means something).
#[test]
fn kernel_features_are_probed() {
    redirect_tests::require_root();
    let out = agent_cmd(&["check", "--verifier", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let features = report["features"].as_array().unwrap();
    assert_eq!(features.len(), redirect_agent::features::FEATURES.len());
    assert!(features.iter().all(|f| f["present"] == true), "{report:#}");
    // The fast path's probe ran to an answer (what it found is this kernel's; the fast-path
    // tests hold it to what workloads meet).
    let fast_path = &report["fast_path"];
    assert!(
        fast_path["error"].is_null() && fast_path["findings"].is_object(),
        "{fast_path:#}"
    );
    println!("fast path probe: {fast_path}");
    let programs = report["programs"].as_array().unwrap();
    assert_eq!(programs.len(), 15, "{report:#}");
    assert!(
        programs.iter().all(|p| p["instructions"].as_u64().unwrap() > 0),
        "{report:#}"
    );

    use aya::{programs::ProgramType, sys::BpfHelper};
    use redirect_agent::features::{Feature, Probe, probe};
    let impossible = Feature {
        name: "bpf_sk_assign in sock_ops",
        since: "never",
        why: "nothing",
        probe: Probe::Helper(ProgramType::SockOps, BpfHelper::BPF_FUNC_sk_assign),
    };
    assert_eq!(probe(&impossible), Ok(false));
}

/// A proxied connection from the remote host to the app, with the app's banner read: the
/// connection is through the proxy end to end.
fn held_inbound(w: &Workload) -> TcpStream {
    let stream = w.dial_from_remote(APP_PORT, Duration::from_secs(5)).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut banner = String::new();
    BufReader::new(&stream).read_line(&mut banner).unwrap();
    assert!(
        banner.contains("name=app") && banner.contains("peer=127.0.0.6"),
        "{banner}"
    );
    stream
}

/// On SIGTERM the agent detaches at once (new connections go direct, as with the rules
/// removed) and lets the proxied connections it holds finish, then exits.
#[test]
fn sigterm_detaches_then_drains_open_connections() {
    let mut w = Workload::with_agent("drain", &["--drain-timeout-ms", "60000"]);
    let mut held = held_inbound(&w);
    w.agent.as_ref().unwrap().terminate();

    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = w.probe(&w.from_remote(w.pod(APP_PORT)));
        let direct = r
            .banner_field("peer")
            .is_some_and(|p| p.starts_with(&format!("{}:", w.pair.remote_ip)));
        if direct {
            break;
        }
        assert!(Instant::now() < deadline, "still captured after SIGTERM: {r:?}");
        std::thread::sleep(Duration::from_millis(20));
    }

    // The held connection still crosses the proxy, both ways, to a clean end.
    let body = vec![7u8; 64 << 10];
    held.write_all(&body).unwrap();
    held.shutdown(Shutdown::Write).unwrap();
    let mut back = Vec::new();
    held.read_to_end(&mut back).unwrap();
    assert!(back == body, "{} bytes back of {}", back.len(), body.len());
    drop(held);

    // Its end is the last one the agent waited for: it exits long before the 60 s drain time.
    let (status, log) = w.agent.as_mut().unwrap().wait(Duration::from_secs(10)).unwrap();
    assert!(status.success(), "{status}: {log}");
    assert!(!pin_dir(&w.name).exists());
}

/// What is still open when the drain time is up is reset, never closed as if complete.
#[test]
fn connections_open_past_the_drain_time_are_reset() {
    let mut w = Workload::with_agent("drain-cut", &["--drain-timeout-ms", "200"]);
    let mut held = held_inbound(&w);
    w.agent.as_ref().unwrap().terminate();
    let got = held.read(&mut [0u8; 64]);
    assert_eq!(
        got.as_ref().map_err(io::Error::kind).err(),
        Some(io::ErrorKind::ConnectionReset),
        "{got:?}"
    );
    let (status, log) = w.agent.as_mut().unwrap().wait(Duration::from_secs(10)).unwrap();
    assert!(status.success(), "{status}: {log}");
}
