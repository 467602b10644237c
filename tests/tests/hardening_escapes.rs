//! Ways out of capture that iptables does not allow (issue 16, item 2), each landing where
//! istio-iptables' ISTIO_OUTPUT sends it. The differential tests hold the same identities
//! against the real iptables and ip6tables.
//!
//! - The owner match reads the socket file's fsuid/fsgid, not the task's real ids: a set-id
//!   program with real uid 1337 is not the proxy, and one whose effective uid is 1337 is.
//! - The agent's own SO_MARK exempts only the agent's connections: an app with CAP_NET_ADMIN
//!   in its namespace can set the same mark, and istio-iptables' sidecar rules have no mark
//!   rule at all.

use redirect_testkit::server::TestServer;
use redirect_tests::{OUTBOUND_CAPTURE, REMOTE_PORT, Workload, direct, landing, proxied};

/// ISTIO_OUTPUT's rules for the default flags (1-based): 4 is `-m owner --uid-owner 1337 -j
/// RETURN`, 9 the final `-j ISTIO_REDIRECT`.
const UID_OWNER_RETURN: usize = 4;
const REDIRECT_ALL: usize = 9;

fn one_more(before: &[u64], rule: usize) -> Vec<u64> {
    let mut want = before.to_vec();
    want[rule - 1] += 1;
    want
}

#[test]
fn the_owner_match_reads_the_sockets_fsuid_not_the_real_uid() {
    let w = Workload::with_agent("owner-fs", &[]);
    let cases = [
        (
            "real uid/gid 1337, effective 1000: an app, captured",
            w.spec(w.remote(REMOTE_PORT)).uid(1000).gid(1000).real_ids(1337, 1337),
            proxied(OUTBOUND_CAPTURE, "remote"),
            REDIRECT_ALL,
        ),
        (
            "real uid/gid 1000, effective 1337: the proxy's identity, direct",
            w.spec(w.remote(REMOTE_PORT)).uid(1337).gid(1337).real_ids(1000, 1000),
            direct("remote"),
            UID_OWNER_RETURN,
        ),
    ];
    for (what, spec, want, rule) in cases {
        let before = w.counts();
        let r = w.probe(&spec);
        assert_eq!(landing(&r), want, "{what}: {r:?}");
        assert!(r.intact, "{what}: {r:?}");
        assert_eq!(w.counts(), one_more(&before, rule), "{what}: before {before:?}");
    }
}

#[test]
fn an_app_that_sets_the_agents_mark_is_still_captured() {
    let w = Workload::with_agent("owner-mark", &[]);
    let mark = redirect_common::AGENT_SOCKET_MARK;
    let before = w.counts();
    let r = w.probe(&w.spec(w.remote(REMOTE_PORT)).mark(mark));
    assert_eq!(landing(&r), proxied(OUTBOUND_CAPTURE, "remote"), "{r:?}");
    assert!(r.intact, "{r:?}");
    assert_eq!(w.counts(), one_more(&before, REDIRECT_ALL), "before {before:?}");

    // The same over IPv6 (connect6), judged by ip6tables' chain.
    let _remote6 = TestServer::start(&w.pair.remote, w.remote6(REMOTE_PORT), "remote6").expect("IPv6 server");
    let before6 = w.family_counts("ipv6", "ISTIO_OUTPUT");
    let r = w.probe(&w.spec(w.remote6(REMOTE_PORT)).mark(mark));
    assert_eq!(landing(&r), proxied(OUTBOUND_CAPTURE, "remote6"), "{r:?}");
    let after6 = w.family_counts("ipv6", "ISTIO_OUTPUT");
    assert_eq!(after6, one_more(&before6, before6.len()), "before {before6:?}");
}
