//! The getsockopt program answers one option, SO_ORIGINAL_DST on captured connections (see
//! `differential`); every other getsockopt of the workload must get exactly the kernel's
//! answer, including values longer than the page the program is shown.

use redirect_tests::{Outcome, REMOTE_PORT, Workload};

fn sockopts(w: &Workload) -> redirect_testkit::report::SockoptReport {
    let r = w.probe(&w.spec(w.remote(REMOTE_PORT)).sockopts());
    assert_eq!(r.outcome, Outcome::Ok, "{r:?}");
    r.sockopts.clone().unwrap_or_else(|| panic!("no sockopt report: {r:?}"))
}

#[test]
fn other_socket_options_get_the_kernels_answer() {
    let without = sockopts(&Workload::new("gsn"));
    let w = Workload::with_agent("gsa", &[]);
    let with = sockopts(&w);
    println!("without the agent: {without:?}\nwith the agent:    {with:?}");
    // SO_PEERGROUPS of 2,000 groups is 8,000 bytes: past the page the program sees, so it
    // must hand the kernel's value through whole (optlen 0), not truncate or fail it.
    assert_eq!(with.peer_groups_len, 8000, "{with:?}");
    assert!(with.peer_groups_intact, "SO_PEERGROUPS came back changed: {with:?}");
    // TCP_INFO on a captured connection: the kernel's struct, established.
    assert_eq!(with.tcp_state, 1, "tcpi_state is not ESTABLISHED: {with:?}");
    // The connecting socket was redirected, but nothing was redirected *to* it: the kernel's
    // own SO_ORIGINAL_DST error stands (ENOENT with conntrack loaded, ENOPROTOOPT without).
    assert!(
        matches!(with.orig_dst_errno, Some(libc::ENOENT | libc::ENOPROTOOPT)),
        "{with:?}"
    );
    assert_eq!(with, without, "the agent changed a getsockopt answer");
    assert_eq!(
        w.stats().events.get("orig_dst_answered").copied(),
        Some(0),
        "the program answered SO_ORIGINAL_DST for a socket it should not know"
    );
}
