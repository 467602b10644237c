//! The policy routing that delivers marked packets locally, in a workload's network namespace:
//! istio-iptables' TPROXY mode and Istio's ambient mode need the same, differing only in the
//! rule's selector and priority ([`Policy`]).
//!
//! - TPROXY mode ([`Policy::tproxy`]): with `-m TPROXY`, istio-iptables runs, besides its
//!   mangle rules, `ip -f inet rule add fwmark MARK lookup TABLE` and
//!   `ip -f inet route add local default dev lo table TABLE`, and the same for inet6
//!   (`local ::/0`). The app's replies to a connection the proxy made transparently (from the
//!   original client's address) come back to the proxy instead of leaving the pod.
//! - Ambient mode ([`Policy::ambient`]): istio-cni runs
//!   `ip rule add fwmark 0x111/0xfff pref 32764 lookup 100` and
//!   `ip route add local 0.0.0.0/0 dev lo table 100` (and IPv6's where the namespace has it).
//!   The app's replies on a connection ztunnel made into the pod from the client's address
//!   carry mark 0x111 and are delivered back to ztunnel in the same way.
//!
//! A packet carrying the mark is delivered locally whatever its destination. [`TproxyRouting`]
//! installs the rules and routes and takes away again what it installed; [`cleanup`] removes
//! them after a run that was killed.
//!
//! Both are netlink requests from a socket made inside the namespace, and the sysctl they need
//! (see [`TproxyRouting`]) is written from a thread inside it: the agent's own threads never
//! change namespace.

use std::{
    io,
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
};

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REQUEST, NLMSG_ALIGNTO, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    route::{RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType},
    rule::{RuleAction, RuleAttribute, RuleFlags, RuleMessage},
};
use netlink_sys::{Socket, protocols::NETLINK_ROUTE};
use redirect_common::config::{AMBIENT_CONN_MARK, AMBIENT_MARK_MASK};

use crate::sys::Netns;

mod divert;
mod messages;
pub use divert::{divert_device, remove_all as remove_divert_rules};
use messages::*;

/// `lo` is the first device of every network namespace.
const LOOPBACK_IFINDEX: u32 = 1;
/// A netlink message header's size: a shorter tail of a datagram holds no message.
const NLMSG_HDR: usize = 16;
/// Receive buffer: the kernel sizes a dump's datagrams to the reader's buffer, up to 32 KiB.
const RECV_BUFFER: usize = 64 * 1024;
/// Where the node's `/proc/sys/net` is, first match: the DaemonSet's read-write mount of it (a
/// container's `/proc/sys` is read-only), or this process's. Either answers for the namespace
/// of the thread that opens a file in it, through any mount.
const PROC_SYS_NET: [&str; 2] = ["/host/proc/sys/net", "/proc/sys/net"];

/// `net.ipv4.tcp_fwmark_accept` in [`PROC_SYS_NET`].
fn fwmark_accept() -> std::path::PathBuf {
    let dir = PROC_SYS_NET
        .iter()
        .map(std::path::Path::new)
        .find(|d| d.is_dir())
        .unwrap_or(std::path::Path::new("/proc/sys/net"));
    dir.join("ipv4/tcp_fwmark_accept")
}

/// istio-cni's `RouteTableInbound`: the table of ambient's local default route.
pub const AMBIENT_ROUTE_TABLE: u32 = 100;
/// The `pref 32764` of istio-cni's `addInpodMarkIPRule`: the same fixed place as istio-cni's
/// rule, before `main` (32766), whatever rules the namespace already has.
pub const AMBIENT_RULE_PRIORITY: u32 = 32764;

/// The policy rule's selector and where it sends what it selects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    pub mark: u32,
    /// fwmark's mask: u32::MAX (all bits) for istio-iptables' `fwmark MARK`.
    pub mask: u32,
    pub table: u32,
    /// The rule's priority; None: the kernel picks one.
    pub priority: Option<u32>,
}

impl Policy {
    /// istio-iptables' TPROXY mode (`-t MARK -r TABLE`).
    pub fn tproxy(mark: u32, table: u32) -> Self {
        Self {
            mark,
            mask: u32::MAX,
            table,
            priority: None,
        }
    }

    /// istio-cni's ambient in-pod routing: fwmark 0x111/0xfff pref 32764 lookup 100.
    pub fn ambient() -> Self {
        Self {
            mark: AMBIENT_CONN_MARK,
            mask: AMBIENT_MARK_MASK,
            table: AMBIENT_ROUTE_TABLE,
            priority: Some(AMBIENT_RULE_PRIORITY),
        }
    }

    /// The routing a capture needs in the workload's namespace: TPROXY mode's (`-t`, `-r`),
    /// ambient mode's, or none.
    pub fn of(capture: &redirect_common::config::CaptureConfig) -> Option<Self> {
        use redirect_common::config::InboundPath;
        match capture.inbound_path() {
            InboundPath::Ambient => Some(Self::ambient()),
            InboundPath::Tproxy(t) => Some(Self::tproxy(t.mark, t.route_table)),
            InboundPath::Passthrough => None,
        }
    }

    /// The mark as `ip rule` takes it: `0x539`, or `0x111/0xfff` with a mask.
    fn fwmark(&self) -> String {
        match self.mask {
            u32::MAX => format!("{:#x}", self.mark),
            mask => format!("{:#x}/{mask:#x}", self.mark),
        }
    }
}

/// The rule as `ip rule` shows it: `fwmark 0x111/0xfff pref 32764 lookup 100`.
impl std::fmt::Display for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "fwmark {}", self.fwmark())?;
        if let Some(priority) = self.priority {
            write!(f, " pref {priority}")?;
        }
        write!(f, " lookup {}", self.table)
    }
}

/// Sequence numbers of this process's requests, so that an answer is matched to its request.
static SEQ: AtomicU32 = AtomicU32::new(1);

/// Why the routing could not be set up or removed; one line naming what failed and where.
#[derive(Debug, thiserror::Error)]
pub enum TproxyRouteError {
    #[error("policy routing with mark {} and table {}: {why}", policy.fwmark(), policy.table)]
    Invalid { policy: Policy, why: String },
    /// A netlink request: `what` names it (``adding `ip rule fwmark 0x539 lookup 133` ``).
    #[error("{what} in the workload's namespace {}: {source}", netns.display())]
    Netlink {
        what: String,
        netns: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("setting net.ipv4.tcp_fwmark_accept to 1 in the workload's namespace {}: {source}", netns.display())]
    Sysctl {
        netns: PathBuf,
        #[source]
        source: io::Error,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn af(self) -> AddressFamily {
        match self {
            Self::V4 => AddressFamily::Inet,
            Self::V6 => AddressFamily::Inet6,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::V4 => "IPv4",
            Self::V6 => "IPv6",
        }
    }
}

/// One of the four entries, named in messages as the `ip` command that adds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Item {
    Rule(Family),
    Route(Family),
}

impl Item {
    fn command(self, policy: &Policy) -> String {
        let table = policy.table;
        match self {
            Self::Rule(Family::V4) => format!("ip rule {policy}"),
            Self::Rule(Family::V6) => format!("ip -6 rule {policy}"),
            Self::Route(Family::V4) => format!("ip route local default dev lo table {table}"),
            Self::Route(Family::V6) => format!("ip -6 route local ::/0 dev lo table {table}"),
        }
    }
}

/// An entry [`TproxyRouting::install`] added (and so [`TproxyRouting::remove`] deletes).
#[derive(Clone, Copy, Debug)]
struct Added {
    item: Item,
    /// A rule's priority, the policy's or the one the kernel chose: deleting by it takes exactly
    /// this rule, not another `fwmark MARK` rule that also names the table (one with `iif`, say).
    priority: Option<u32>,
}

/// The policy routing in one namespace, as installed by [`TproxyRouting::install`]: TPROXY
/// mode's ([`Policy::tproxy`]) or ambient mode's ([`Policy::ambient`]).
///
/// Besides the rules and routes, `net.ipv4.tcp_fwmark_accept` is set to 1 there. In
/// istio-iptables' TPROXY mode, `OUTPUT -m connmark --mark 1337 -j CONNMARK --restore-mark`
/// marks the app's replies on the proxy's transparent connection, so that they route through
/// table 133 back to the proxy; istio-cni's ambient rules restore connmark 0x111/0xfff the same
/// way onto the replies on a connection ztunnel made into the pod from the client's address,
/// which table 100 delivers back to ztunnel. Here there is no conntrack to remember the mark;
/// but with tcp_fwmark_accept=1 the socket the app accepts takes the mark of the SYN that made
/// it (the proxy's upstream socket carries mark 1337; ztunnel's, 0x111), so every reply
/// carries it, the SYN-ACK included (sent with the request socket's `ir_mark`, which is the
/// SYN's mark too).
///
/// Dropping it leaves everything in place (a handover keeps the routing for the successor);
/// [`TproxyRouting::remove`] takes away what `install` added.
#[derive(Debug)]
#[must_use = "dropping it leaves the routing in place; remove() takes it away"]
pub struct TproxyRouting {
    netns: Netns,
    policy: Policy,
    /// In the order added; entries that were there before are not in it and stay at remove.
    added: Vec<Added>,
    /// Whether IPv6's rule and route are in place (added or there before).
    ipv6: bool,
    /// tcp_fwmark_accept before install, when install changed it (it was not 1).
    fwmark_accept_before: Option<String>,
    /// Entries already there are a predecessor's, taken over ([`TproxyRouting::adopt`]).
    adopt: bool,
}

impl TproxyRouting {
    /// Installs the policy's rule (`fwmark MARK[/MASK] [pref PRIORITY] lookup TABLE`) and
    /// `local default dev lo table TABLE` for IPv4, the same for IPv6 where the namespace has
    /// IPv6, and tcp_fwmark_accept=1.
    ///
    /// IPv6 is left out, without an error, when the kernel has no IPv6 (the answer is
    /// EAFNOSUPPORT or EOPNOTSUPP) or `lo` has it disabled (`disable_ipv6`, EACCES): no IPv6
    /// packet can then be delivered through `lo`. An identical rule, or a local default route
    /// on `lo` in the table, that is already there counts as someone else's: it is used and
    /// left in place at [`TproxyRouting::remove`]. Another default route in the table is an
    /// error. On any failure, what this call added is taken away again before it returns.
    pub fn install(netns: &Netns, policy: Policy) -> Result<Self, TproxyRouteError> {
        Self::install_as(netns, policy, false)
    }

    /// [`TproxyRouting::install`] for a workload this agent takes over (a handover, or a
    /// killed predecessor's pins): identical entries already there are the predecessor's, so
    /// they are this value's to remove; and tcp_fwmark_accept found at 1 was the predecessor's
    /// doing, so removal sets it back to the kernel's default, 0 (the value before it is gone).
    pub fn adopt(netns: &Netns, policy: Policy) -> Result<Self, TproxyRouteError> {
        Self::install_as(netns, policy, true)
    }

    fn install_as(netns: &Netns, policy: Policy, adopt: bool) -> Result<Self, TproxyRouteError> {
        validate(&policy)?;
        let held = netns
            .try_clone()
            .map_err(|e| netlink_error(netns, "holding the namespace open".into(), e))?;
        let socket = open_socket(netns)?;
        let mut this = Self {
            netns: held,
            policy,
            added: Vec::new(),
            ipv6: false,
            fwmark_accept_before: None,
            adopt,
        };
        if let Err(e) = this.install_with(&socket) {
            this.delete_added(&socket);
            return Err(e);
        }
        Ok(this)
    }

    /// Whether IPv6's rule and route are in place (`false`: the namespace has no IPv6).
    pub fn ipv6(&self) -> bool {
        self.ipv6
    }

    /// Deletes what [`TproxyRouting::install`] added and restores tcp_fwmark_accept. Best
    /// effort: a failure is logged and the rest still done; an entry someone else deleted
    /// meanwhile is fine.
    pub fn remove(self) {
        if let Some(before) = &self.fwmark_accept_before
            && let Err(e) = write_fwmark_accept(&self.netns, before)
        {
            tracing::warn!(
                netns = %self.netns.path().display(),
                "restoring net.ipv4.tcp_fwmark_accept to {before}: {e}"
            );
        }
        match open_socket(&self.netns) {
            Ok(socket) => self.delete_added(&socket),
            Err(e) if !self.added.is_empty() => tracing::warn!("{e}; the policy routing stays in place"),
            Err(_) => {}
        }
    }

    fn install_with(&mut self, socket: &Socket) -> Result<(), TproxyRouteError> {
        self.add_family(socket, Family::V4)?;
        self.ipv6 = self.add_family(socket, Family::V6)?;
        // Last, as it is what makes replies carry the mark: only once the mark routes somewhere.
        self.fwmark_accept_before = enable_fwmark_accept(&self.netns).map_err(|source| TproxyRouteError::Sysctl {
            netns: self.netns.path().to_owned(),
            source,
        })?;
        if self.adopt && self.fwmark_accept_before.is_none() {
            self.fwmark_accept_before = Some("0".into());
        }
        Ok(())
    }

    /// The route, then the rule: the rule sends marked packets to the table only once the
    /// table has its route. `Ok(false)`: IPv6 is absent from the namespace, nothing was added.
    fn add_family(&mut self, socket: &Socket, family: Family) -> Result<bool, TproxyRouteError> {
        let policy = self.policy;
        let (rule, route) = (Item::Rule(family), Item::Route(family));
        let no_ipv6 = |e: &io::Error| family == Family::V6 && is_no_ipv6(e);
        let existing = match find_rules(socket, family, &policy) {
            Ok(existing) => existing,
            Err(e) if no_ipv6(&e) => return Ok(self.without_ipv6(&e)),
            Err(e) => return Err(self.listing(family, e)),
        };
        match add_route(socket, family, policy.table) {
            Ok(true) => self.added.push(Added {
                item: route,
                priority: None,
            }),
            Ok(false) if self.adopt => self.added.push(Added {
                item: route,
                priority: None,
            }),
            Ok(false) => tracing::info!("`{}` was already there: kept at removal", route.command(&policy)),
            Err(e) if no_ipv6(&e) => return Ok(self.without_ipv6(&e)),
            Err(e) => return Err(self.failed("adding", route, e)),
        }
        if let Some(&priority) = existing.first() {
            if self.adopt {
                self.added.push(Added {
                    item: rule,
                    priority: Some(priority),
                });
            } else {
                tracing::info!("`{}` was already there: kept at removal", rule.command(&policy));
            }
            return Ok(true);
        }
        request(
            socket,
            RouteNetlinkMessage::NewRule(rule_message(family, &policy)),
            NLM_F_CREATE | NLM_F_EXCL,
        )
        .map_err(|e| self.failed("adding", rule, e))?;
        // None was there before, so the one there is now is ours. Recorded before a failure
        // to list it, so that undoing deletes it (by its selectors, and the policy's priority
        // if it has one, then).
        let at = self.added.len();
        self.added.push(Added {
            item: rule,
            priority: policy.priority,
        });
        self.added[at].priority = find_rules(socket, family, &policy)
            .map_err(|e| self.listing(family, e))?
            .first()
            .copied();
        Ok(true)
    }

    /// Notes that IPv6 is left out; `false` for [`TproxyRouting::add_family`] to return.
    fn without_ipv6(&self, why: &io::Error) -> bool {
        tracing::info!(
            netns = %self.netns.path().display(),
            "no IPv6 in the namespace ({why}): policy routing for IPv4 only"
        );
        false
    }

    fn listing(&self, family: Family, source: io::Error) -> TproxyRouteError {
        netlink_error(&self.netns, format!("listing the {} rules", family.name()), source)
    }

    /// Deletes the added entries, last first; logs what could not be deleted.
    fn delete_added(&self, socket: &Socket) {
        for a in self.added.iter().rev() {
            let policy = Policy {
                priority: a.priority.or(self.policy.priority),
                ..self.policy
            };
            match delete(socket, a.item, &policy) {
                Err(e) if !is_gone(&e) => tracing::warn!("{}", self.failed("removing", a.item, e)),
                _ => {}
            }
        }
    }

    fn failed(&self, doing: &str, item: Item, source: io::Error) -> TproxyRouteError {
        netlink_error(&self.netns, format!("{doing} `{}`", item.command(&self.policy)), source)
    }
}

/// Removes the policy's rule and `local default dev lo table TABLE` of both families where they
/// are, for `--cleanup-only` after a run that was killed: it cannot tell them from
/// identical ones someone else had installed before, and removes those too.
///
/// tcp_fwmark_accept is left as it is: the value before the killed run is not known (a pod's
/// own sysctls may have set 1), and with the rule gone, 1 only copies a SYN's mark onto the
/// socket that accepts it, which no routing acts on. All four deletions are tried; the first
/// failure is returned (the others are logged).
pub fn cleanup(netns: &Netns, policy: Policy) -> Result<(), TproxyRouteError> {
    validate(&policy)?;
    let socket = open_socket(netns)?;
    let mut errors = Vec::new();
    for family in [Family::V4, Family::V6] {
        let (rule, route) = (Item::Rule(family), Item::Route(family));
        let absent = |e: &io::Error| is_gone(e) || (family == Family::V6 && is_no_ipv6(e));
        let removing = |item: Item, e| netlink_error(netns, format!("removing `{}`", item.command(&policy)), e);
        match find_rules(&socket, family, &policy) {
            // Every identical one: a rule is removed by its priority, so another rule with
            // the same mark and table but more selectors stays.
            Ok(priorities) => errors.extend(
                priorities
                    .into_iter()
                    .filter_map(|p| {
                        let at = Policy {
                            priority: Some(p),
                            ..policy
                        };
                        delete(&socket, rule, &at).err()
                    })
                    .filter(|e| !absent(e))
                    .map(|e| removing(rule, e)),
            ),
            Err(e) if absent(&e) => {}
            Err(e) => errors.push(netlink_error(netns, format!("listing the {} rules", family.name()), e)),
        }
        match delete(&socket, route, &policy) {
            Err(e) if !absent(&e) => errors.push(removing(route, e)),
            _ => {}
        }
    }
    if let Err(e) = divert::remove_all(netns, policy.table) {
        errors.push(e);
    }
    let mut errors = errors.into_iter();
    let first = errors.next();
    for e in errors {
        tracing::warn!("{e}");
    }
    first.map_or(Ok(()), Err)
}

/// Refuses a mark, mask or table that would take over the namespace's routing, or a mark the
/// rule would not compare as given.
fn validate(policy: &Policy) -> Result<(), TproxyRouteError> {
    let Policy { mark, mask, table, .. } = *policy;
    let why = match (mark, mask, table) {
        // The kernel compares all bits only of a nonzero mark: `fwmark 0` has mask 0 and
        // matches every packet, which would deliver all traffic locally; with a mask, it
        // matches every packet without the mask's bits, unmarked ones included.
        (0, u32::MAX, _) => "mark 0 matches every packet; expected a nonzero mark".into(),
        (0, _, _) => "mark 0 matches every packet without the mask's bits; expected a nonzero mark".into(),
        (_, 0, _) => "mask 0 matches every packet; expected a nonzero mask".into(),
        // The kernel takes such a rule (as of 6.18) but compares only the masked bits: it
        // would act as `fwmark (MARK & MASK)/MASK` yet be listed, and so looked for, as given.
        _ if mark & !mask != 0 => format!(
            "mark {mark:#x} has bits {:#x} outside mask {mask:#x}, which the rule would ignore",
            mark & !mask
        ),
        (_, _, 0) => "table 0 is no table (RT_TABLE_UNSPEC); expected 1-252 or above 255".into(),
        (_, _, 253..=255) => {
            "tables 253-255 are the kernel's default, main and local tables; expected 1-252 or above 255".into()
        }
        _ => return Ok(()),
    };
    Err(TproxyRouteError::Invalid { policy: *policy, why })
}

fn netlink_error(netns: &Netns, what: String, source: io::Error) -> TproxyRouteError {
    TproxyRouteError::Netlink {
        what,
        netns: netns.path().to_owned(),
        source,
    }
}

/// A route netlink socket made inside the namespace (it stays there whichever thread uses it).
fn open_socket(netns: &Netns) -> Result<Socket, TproxyRouteError> {
    netns
        .run(|| {
            let mut socket = Socket::new(NETLINK_ROUTE)?;
            socket.bind_auto()?;
            Ok(socket)
        })
        .map_err(|e| netlink_error(netns, "opening a route netlink socket".into(), e))
}

/// The answer of a namespace without IPv6: rules of a family the kernel has none of
/// (EAFNOSUPPORT), routes of one (EOPNOTSUPP: no handler), or a device with IPv6 disabled
/// (EACCES, "IPv6 is disabled on nexthop device").
fn is_no_ipv6(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EAFNOSUPPORT | libc::EOPNOTSUPP | libc::EACCES)
    )
}

/// An entry that is not there: ENOENT for a rule, ESRCH for a route.
fn is_gone(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ESRCH))
}

/// Sets tcp_fwmark_accept to 1 inside the namespace; its value before when that was not 1.
fn enable_fwmark_accept(netns: &Netns) -> io::Result<Option<String>> {
    let path = fwmark_accept();
    netns.run(|| {
        let before = std::fs::read_to_string(&path)?.trim().to_owned();
        if before == "1" {
            return Ok(None);
        }
        std::fs::write(&path, "1")?;
        Ok(Some(before))
    })
}

fn write_fwmark_accept(netns: &Netns, value: &str) -> io::Result<()> {
    let path = fwmark_accept();
    netns.run(|| std::fs::write(&path, value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_that_would_take_over_routing_or_mismatch_are_refused() {
        assert!(validate(&Policy::tproxy(1337, 133)).is_ok());
        assert!(validate(&Policy::tproxy(1, 256)).is_ok());
        assert!(validate(&Policy::ambient()).is_ok());
        for (mark, table) in [(0, 133), (1337, 0), (1337, 253), (1337, 254), (1337, 255)] {
            let e = validate(&Policy::tproxy(mark, table)).unwrap_err().to_string();
            assert!(
                e.starts_with(&format!("policy routing with mark {mark:#x} and table {table}: ")),
                "{e}"
            );
        }
        let masked = |mark, mask| Policy {
            mark,
            mask,
            ..Policy::ambient()
        };
        let e = validate(&masked(0x111, 0)).unwrap_err().to_string();
        assert_eq!(
            e,
            "policy routing with mark 0x111/0x0 and table 100: mask 0 matches every packet; expected a nonzero mask"
        );
        let e = validate(&masked(0x1111, 0xfff)).unwrap_err().to_string();
        assert!(
            e.starts_with("policy routing with mark 0x1111/0xfff and table 100: "),
            "{e}"
        );
        assert!(e.contains("bits 0x1000 outside mask 0xfff"), "{e}");
        assert!(validate(&masked(0, 0xfff)).is_err());
    }

    #[test]
    fn commands_print_the_mask_and_priority_when_set() {
        let ambient = Policy::ambient();
        assert_eq!(ambient.to_string(), "fwmark 0x111/0xfff pref 32764 lookup 100");
        assert_eq!(
            Item::Rule(Family::V4).command(&ambient),
            "ip rule fwmark 0x111/0xfff pref 32764 lookup 100"
        );
        assert_eq!(
            Item::Route(Family::V6).command(&ambient),
            "ip -6 route local ::/0 dev lo table 100"
        );
        let tproxy = Policy::tproxy(1337, 133);
        assert_eq!(
            Item::Rule(Family::V6).command(&tproxy),
            "ip -6 rule fwmark 0x539 lookup 133"
        );
    }
}
