//! Node mode: no workload can take another's inbound connections by holding its address.
//! sk_lookup judges a connection by the namespace it arrived in (one program instance per
//! workload, linked to that namespace only), never by which workload holds the destination.

use std::{
    net::IpAddr,
    path::Path,
    time::{Duration, Instant},
};

use aya::maps::{HashMap, Map, MapData};
use redirect_common::{LocalAddrKey, maps};
use redirect_tests::{APP_PORT, Landing, Workload, landing, node::NodeAgent, node::metric};

/// Where a connection from the workload's remote host to its own app port landed: sk_lookup
/// rewrites nothing, so the app telling 127.0.0.6 as its peer shows it crossed a proxy.
#[derive(Debug, PartialEq, Eq)]
enum Inbound {
    Proxied,
    Direct,
    Failed(redirect_tests::Outcome),
}

fn inbound(w: &Workload) -> Inbound {
    let r = w.probe(&w.from_remote(w.pod(APP_PORT)));
    match landing(&r) {
        Landing::Failed(o) => Inbound::Failed(o),
        _ if r.banner_field("peer").is_some_and(|p| p.starts_with("127.0.0.6:")) => Inbound::Proxied,
        _ => Inbound::Direct,
    }
}

/// What the agent counted for workload `id`: (ISTIO_IN_REDIRECT decisions of its iptables
/// ISTIO_INBOUND, connections its embedded proxy took), from one scrape.
fn counted(agent: &NodeAgent, id: &str) -> (u64, u64) {
    let text = agent.scrape("/metrics").expect("scrape").1;
    let prefix = format!(
        "redirect_rule_connections_total{{workload=\"{id}\",family=\"ipv4\",table=\"nat\",chain=\"ISTIO_INBOUND\","
    );
    let redirects = text
        .lines()
        .filter(|l| l.starts_with(&prefix) && l.contains("target=\"ISTIO_IN_REDIRECT\""))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum();
    let proxied = metric(&text, &format!("redirect_proxy_connections_total{{workload=\"{id}\"}}"))
        .unwrap_or_else(|| panic!("no proxy counter of {id} in:\n{text}"));
    (redirects, proxied as u64)
}

fn netns_cookie(agent: &NodeAgent, id: &str) -> u64 {
    let state = agent.state().expect("state");
    state
        .workloads
        .iter()
        .find(|w| w.id == id)
        .unwrap_or_else(|| panic!("{id} not in the state"))
        .netns_cookie
}

/// Waits (bounded) until the agent's `LOCAL_ADDRS` does or does not hold `ip` for the
/// namespace `cookie`: the agent has seen the address change.
fn wait_for_local_addr(agent: &NodeAgent, cookie: u64, ip: IpAddr, present: bool) {
    let pin = Path::new("/sys/fs/bpf/redirect")
        .join(&agent.name)
        .join(maps::LOCAL_ADDRS);
    let map = Map::from_map_data(MapData::from_pin(&pin).expect("pinned LOCAL_ADDRS")).unwrap();
    let map: HashMap<MapData, LocalAddrKey, u8> = HashMap::try_from(map).unwrap();
    let key = LocalAddrKey::from_ip(cookie, ip);
    let deadline = Instant::now() + Duration::from_secs(10);
    while map.get(&key, 0).is_ok() != present {
        assert!(
            Instant::now() < deadline,
            "LOCAL_ADDRS never {} {ip} of netns {cookie}",
            if present { "got" } else { "lost" }
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_workload_that_takes_anothers_address_gets_none_of_its_inbound_and_giving_it_back_changes_nothing() {
    let agent = NodeAgent::new("hijack", &[]);
    let p = agent.start().expect("node agent starts");
    let victim = Workload::new_on("hjv", 71);
    let taker = Workload::new_on("hjt", 72);
    agent.enroll(&victim.pair.workload.path, "victim", &[]);
    agent.enroll(&taker.pair.workload.path, "taker", &[]);
    assert_eq!(inbound(&victim), Inbound::Proxied);
    let taker_cookie = netns_cookie(&agent, "taker");
    let victim_ip = IpAddr::V4(victim.pair.workload_ip);

    // The taker adds the victim's address to its own interface.
    taker
        .pair
        .workload
        .ip(&["addr", "add", &format!("{victim_ip}/32"), "dev", "w0"])
        .unwrap();
    wait_for_local_addr(&agent, taker_cookie, victim_ip, true);
    let before = (counted(&agent, "victim"), counted(&agent, "taker"));
    // The victim's connections from other hosts still go through the victim's own proxy,
    // counted on the victim's chain; the taker sees none of them.
    assert_eq!(inbound(&victim), Inbound::Proxied);
    let after = (counted(&agent, "victim"), counted(&agent, "taker"));
    assert_eq!(after.0, (before.0.0 + 1, before.0.1 + 1), "victim's counters");
    assert_eq!(after.1, before.1, "taker's counters");

    // The taker gives it back: the victim's capture was never the taker's to remove.
    taker
        .pair
        .workload
        .ip(&["addr", "del", &format!("{victim_ip}/32"), "dev", "w0"])
        .unwrap();
    wait_for_local_addr(&agent, taker_cookie, victim_ip, false);
    assert_eq!(inbound(&victim), Inbound::Proxied);
    let last = counted(&agent, "victim");
    assert_eq!(last, (after.0.0 + 1, after.0.1 + 1), "victim's counters");
    assert_eq!(counted(&agent, "taker"), before.1, "taker's counters");
    // The taker's own capture was never in question.
    assert_eq!(inbound(&taker), Inbound::Proxied);

    let log = p.log();
    assert_eq!(
        log.matches("is held by another enrolled namespace too").count(),
        1,
        "one warning for the one shared address:\n{log}"
    );
}

/// Two pods with one address is a misconfiguration, not the agent's to refuse: refusing would
/// let any workload keep others from being enrolled by taking their addresses first. Each is
/// served on its own.
#[test]
fn two_workloads_enrolled_with_one_address_each_keep_their_own_inbound() {
    let agent = NodeAgent::new("twin", &[]);
    let p = agent.start().expect("node agent starts");
    let first = Workload::new_on("twa", 73);
    let second = Workload::new_on("twb", 73);
    agent.enroll(&first.pair.workload.path, "first", &[]);
    agent.enroll(&second.pair.workload.path, "second", &[]);
    for (w, id, other) in [(&first, "first", "second"), (&second, "second", "first")] {
        let before = (counted(&agent, id), counted(&agent, other));
        assert_eq!(inbound(w), Inbound::Proxied, "{id}");
        let (mine, theirs) = (counted(&agent, id), counted(&agent, other));
        assert_eq!(mine, (before.0.0 + 1, before.0.1 + 1), "{id}'s counters");
        assert_eq!(theirs, before.1, "{other}'s counters");
    }
    assert!(
        p.log().contains("is held by another enrolled namespace too"),
        "{}",
        p.log()
    );
}
