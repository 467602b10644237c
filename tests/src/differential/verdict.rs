//! Who dials (a [`Client`], in a [`Phase`]) and where its connection landed (its [`verdict`]),
//! named the same way in both twins.

use std::net::{IpAddr, SocketAddr, SocketAddrV6};

use redirect_testkit::report::{Outcome, ProbeResult};

/// How a phase's clients dial: IPv4 from AF_INET sockets, the same destinations from AF_INET6
/// sockets as `::ffff:a.b.c.d` (the IPv4 chains judge them), or native IPv6 (ip6tables').
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Phase {
    V4,
    V4Mapped,
    V6,
}

impl Phase {
    pub(super) fn name(self) -> &'static str {
        match self {
            Self::V4 => "IPv4",
            Self::V4Mapped => "v4-mapped",
            Self::V6 => "IPv6",
        }
    }
}

/// Who connects: from inside the workload (identity and source) or from the remote host.
#[derive(Clone, Debug)]
pub(super) struct Client {
    pub(super) inbound: bool,
    /// Inbound from the side host ([`super::Config::side`]) rather than the remote one.
    pub(super) from_side: bool,
    pub(super) uid: u32,
    pub(super) gid: u32,
    pub(super) bind: Option<IpAddr>,
    /// IPv4 destinations (and source) dialed v4-mapped from an AF_INET6 socket.
    pub(super) v4_mapped: bool,
    /// Real (uid, gid) of a set-id client, whose `uid`/`gid` are the effective ones.
    pub(super) real: Option<(u32, u32)>,
    /// SO_MARK the client sets on its socket.
    pub(super) mark: Option<u32>,
    /// IP_TRANSPARENT: `bind` is an address of no host.
    pub(super) transparent: bool,
}

impl Client {
    pub(super) fn label(&self) -> String {
        let mapped = if self.v4_mapped { " (v4-mapped)" } else { "" };
        let bind = self.bind.map_or_else(String::new, |b| format!(" bind={b}"));
        if self.inbound {
            let who = if self.from_side { "side" } else { "remote" };
            return format!("{who} host{bind}{mapped}");
        }
        let real = self.real.map_or_else(String::new, |(u, g)| format!(" real={u}/{g}"));
        let mark = self.mark.map_or_else(String::new, |m| format!(" mark={m:#x}"));
        let mark = if self.transparent {
            format!("{mark} transparent")
        } else {
            mark
        };
        format!("uid={} gid={}{real}{mark}{bind}{mapped}", self.uid, self.gid)
    }

    /// The destination as the client dials it (v4-mapped if it dials so).
    pub(super) fn dialed(&self, to: SocketAddr) -> SocketAddr {
        match to {
            SocketAddr::V4(v4) if self.v4_mapped => SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0).into(),
            other => other,
        }
    }
}

/// The capture listener a banner name is: (its port, what the verdict calls it).
fn capture_listener(name: &str, capture: (u16, u16)) -> Option<(u16, &'static str)> {
    match name {
        "cap-out" => Some((capture.0, "outbound")),
        "cap-out6" => Some((capture.0, "outbound6")),
        "cap-in" => Some((capture.1, "inbound")),
        "cap-in6" => Some((capture.1, "inbound6")),
        _ => None,
    }
}

/// What the app sees of its own connection, which NAT leaves as the app made it: getpeername
/// exactly (under REDIRECT, the destination it dialed, never the capture port), and
/// getsockname's address (under REDIRECT, the source routing chose for that destination; the
/// port is ephemeral, so left out). Part of the verdict of every connection that completed,
/// captured or not.
fn app_view(r: &ProbeResult) -> String {
    let peer = r.peer.as_deref().unwrap_or("?");
    let local = r.local_addr().map_or_else(|| "?".to_owned(), |a| a.ip().to_string());
    format!("peer={peer} local={local}")
}

/// What the server's accepted socket says of itself, from its banner: `from=` its peer's
/// address (the port is ephemeral), and on a capture listener (`capture`: what the verdict
/// calls it) `at=` its local address: under REDIRECT the address NAT chose, 127.0.0.1 or `::1`
/// in OUTPUT, the arriving interface's own in PREROUTING. Of an inbound capture, `at=` is the
/// address alone: sk_lookup keeps the port dialed where REDIRECT makes it the capture port, and
/// `orig` names it in both.
fn accepted(r: &ProbeResult, capture: Option<&str>) -> String {
    let from = r.banner_addr("peer").map_or_else(|| "?".into(), |p| p.ip().to_string());
    let Some(what) = capture else {
        return format!("from={from}");
    };
    let at = match r.banner_addr("local") {
        Some(l) if what.starts_with("inbound") => l.ip().to_string(),
        Some(l) => l.to_string(),
        None => "?".into(),
    };
    format!("at={at} from={from}")
}

/// Where a connection landed, named the same way in both twins. A capture listener (the
/// stand-in for Envoy) also says what the original destination query answered on the accepted
/// socket (`SO_ORIGINAL_DST` on the 0.0.0.0 one, `IP6T_SO_ORIGINAL_DST` on the [::] one):
/// conntrack's answer in the iptables twin, the agent's getsockopt program's in the other. (On
/// a direct landing conntrack answers too, for any tracked connection, and the agent leaves the
/// kernel's ENOENT: only captured connections are compared. For the same reason a connection
/// made straight to a capture port, which nobody redirected, reads as `orig=none` in both:
/// ENOENT from the agent, and conntrack's identity answer, the socket's own address.) A
/// connection that completed also carries what the server's socket says ([`accepted`]) and
/// what the app's own socket says ([`app_view`]).
pub(super) fn verdict(r: &ProbeResult, capture: (u16, u16)) -> String {
    let local = r.banner_field("local");
    let name = r.banner_field("name");
    let listener = name.and_then(|n| capture_listener(n, capture));
    // The port the accepting listener listens on (sk_lookup leaves a captured connection's
    // local port as it was dialed).
    let on_capture_port = local
        .and_then(|l| l.parse::<SocketAddr>().ok())
        .is_some_and(|l| Some(l.port()) == listener.map(|(p, _)| p));
    let orig = match r.banner_field("orig") {
        None | Some("-") => "none",
        Some(o) if on_capture_port && Some(o) == local => "none",
        Some(o) => o,
    };
    match r.outcome {
        Outcome::Ok => {
            let landed = match (listener, name) {
                (Some((_, what)), _) => format!("capture:{what} orig={orig} {}", accepted(r, Some(what))),
                (None, Some(server)) => format!("original:{server} {}", accepted(r, None)),
                (None, None) => "no banner".into(),
            };
            format!("{landed} {}", app_view(r))
        }
        Outcome::Refused => "refused".into(),
        other => {
            let err = r.error.as_deref().unwrap_or("");
            format!("{other:?}: {err}").to_lowercase()
        }
    }
}
