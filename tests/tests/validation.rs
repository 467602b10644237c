//! `--run-validation`: istio-validation's probe (uid 1337, from 127.0.0.1 to
//! 127.0.0.6:15002, inside the workload) must arrive captured, through whatever serves the
//! inbound capture port; otherwise exit 126 as istio-validation does.

use std::{process::Output, time::Duration};

use redirect_tests::{Workload, agent_cmd_within};

/// `run --skip-rule-apply --run-validation` for `w`: validates whatever captures it now.
fn validate_only(w: &Workload, extra: &[&str]) -> Output {
    let mut args = vec!["run".to_owned(), "--name".into(), format!("{}-v", w.name)];
    args.extend(w.run_args());
    args.extend(["--skip-rule-apply", "--run-validation", "--probe-timeout", "2s"].map(String::from));
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    agent_cmd_within(&args, Duration::from_secs(30)).expect("the validation ends within 30 s")
}

fn stop(w: &mut Workload) {
    if let Some(mut agent) = w.agent.take() {
        agent.stop().expect("agent stops");
    }
}

fn said(out: &Output) -> String {
    format!(
        "status {:?}, stdout {}, stderr {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn validation_fails_uncaptured_and_passes_through_either_proxy() {
    let mut w = Workload::new("vld");
    // Nothing captures: the probe reaches 127.0.0.6:15002 straight from 127.0.0.1.
    let out = validate_only(&w, &[]);
    assert_eq!(out.status.code(), Some(126), "{}", said(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    let errors: Vec<&str> = err.lines().filter(|l| l.contains("error")).collect();
    assert_eq!(errors.len(), 1, "one error line: {err}");
    assert!(errors[0].contains("not captured"), "{err}");

    // The embedded proxy serves 15006: the probe comes out of its inbound passthrough.
    w.start_agent(&[]).expect("agent starts");
    let out = validate_only(&w, &[]);
    assert!(out.status.success(), "{}", said(&out));
    stop(&mut w);

    // --proxy none, nothing on 15006 yet (Envoy starts later): the probe's own listener there
    // reads SO_ORIGINAL_DST, as istio-validation does.
    w.start_agent(&["--proxy", "none"]).expect("agent starts");
    let out = validate_only(&w, &[]);
    assert!(out.status.success(), "{}", said(&out));
    stop(&mut w);
}

/// `run --run-validation` validates once attached; capture that does not take the probe (here
/// `-o 15002` sends it around) fails it: exit 126, and the run detaches.
#[test]
fn a_run_that_fails_its_validation_exits_126_and_detaches() {
    let w = Workload::new("vldrun");
    let mut args = vec!["run".to_owned(), "--name".into(), w.name.clone()];
    args.extend(w.run_args());
    args.extend(["--run-validation", "--probe-timeout", "2s", "-o", "15002"].map(String::from));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = agent_cmd_within(&args, Duration::from_secs(60)).expect("the run ends within 60 s");
    assert_eq!(out.status.code(), Some(126), "{}", said(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("validation failed"), "{err}");
    assert!(
        !redirect_agent::engine::pins::pin_dir(&w.name).exists(),
        "the failed run left its pins"
    );
}

/// The probe port taken by an app (on every address): only the capture port's own listener
/// can tell, as istio-validation's only can, and it does.
#[test]
fn a_taken_probe_port_leaves_the_capture_listener_to_tell() {
    let mut w = Workload::new("vldbusy");
    let _app = redirect_testkit::server::TestServer::start(
        &w.pair.workload,
        std::net::SocketAddrV4::new(std::net::Ipv4Addr::UNSPECIFIED, 15002),
        "app15002",
    )
    .expect("an app on *:15002");
    w.start_agent(&["--proxy", "none"]).expect("agent starts");
    let out = validate_only(&w, &[]);
    assert!(out.status.success(), "{}", said(&out));
    stop(&mut w);
}

/// As istio-validation's client, the probe dials again every second until its timeout: capture
/// that comes a moment after the probe started (an enrollment racing it) still passes.
#[test]
fn capture_that_comes_during_the_probe_passes_it() {
    let w = Workload::new("vldlate");
    let out = std::thread::scope(|s| {
        let probe = s.spawn(|| {
            let mut args = vec!["run".to_owned(), "--name".into(), format!("{}-v", w.name)];
            args.extend(w.run_args());
            args.extend(["--skip-rule-apply", "--run-validation", "--probe-timeout", "60s"].map(String::from));
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            agent_cmd_within(&args, Duration::from_secs(90)).expect("the validation ends within 90 s")
        });
        // Uncaptured first: the probe's first dials reach the probe port straight.
        std::thread::sleep(Duration::from_secs(1));
        // --proxy none: its listeners are the sidecar's, which starts after the validation (the
        // probe holds 127.0.0.1:15006 meanwhile, as istio-validation does).
        let mut args = w.run_args();
        args.extend(["--proxy".to_owned(), "none".into()]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let agent = redirect_testkit::agent::AgentProcess::start(&redirect_tests::agent_bin(), &w.name, &args)
            .expect("agent starts");
        let out = probe.join().expect("probe thread");
        drop(agent);
        out
    });
    assert!(out.status.success(), "{}", said(&out));
}
