//! The istio-iptables settings beyond the nat chains' ports and CIDRs: DNS capture, TPROXY,
//! interfaces, owner groups, the IPv4 loopback CIDR and the Istio release the rules follow.

use std::{
    format,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    string::{String, ToString},
    vec::Vec,
};

use super::{Cidr, ConfigError, err, items, parse_cidr};

pub use crate::{DNS_PROXY_PORT, TPROXY_OUTBOUND_MARK};

/// `ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR`'s default.
pub const DEFAULT_IPV4_LOOPBACK: Cidr = Cidr {
    addr: IpAddr::V4(Ipv4Addr::LOCALHOST),
    prefix: 32,
};

/// `--redirect-dns`, `--capture-all-dns`, and the resolvers port-53 capture is limited to
/// (from the workload's resolv.conf) when it is not capture-all.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DnsCapture {
    pub redirect: bool,
    pub capture_all: bool,
    pub servers_v4: Vec<Ipv4Addr>,
    pub servers_v6: Vec<Ipv6Addr>,
    /// The resolv.conf's resolvers, whichever the capture: where the embedded DNS proxy sends
    /// the UDP queries it answers (istio-agent forwards names it does not own to them too).
    pub upstreams: Vec<IpAddr>,
}

impl DnsCapture {
    /// Whether any DNS rule is written: istio-iptables turns DNS capture off (with a warning)
    /// when it is asked for, not capture-all, and no resolver is known.
    pub fn enabled(&self) -> bool {
        self.redirect && (self.capture_all || !self.servers_v4.is_empty() || !self.servers_v6.is_empty())
    }

    /// The resolvers of resolv.conf text (`nameserver ADDR` lines, as Go's
    /// `dns.ClientConfigFromFile` reads them), split by family. An address with a zone
    /// (`fe80::1%eth0`) or that is no address at all is skipped, as Istio does.
    pub fn servers_from_resolv_conf(text: &str) -> (Vec<Ipv4Addr>, Vec<Ipv6Addr>) {
        let mut v4 = Vec::new();
        let mut v6 = Vec::new();
        for line in text.lines() {
            let mut words = line.split_whitespace();
            if words.next() != Some("nameserver") {
                continue;
            }
            match words.next().map(str::parse::<IpAddr>) {
                Some(Ok(IpAddr::V4(a))) => v4.push(a),
                Some(Ok(IpAddr::V6(a))) => v6.push(a),
                _ => {}
            }
        }
        (v4, v6)
    }
}

/// How a captured inbound connection reaches the app from the proxy, and the policy routing
/// that brings the app's replies back: `-m` read together with `--mode`, once, for the proxy
/// and the routing alike.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum InboundPath {
    /// `-m REDIRECT`: dialed from 127.0.0.6 (`::6`), over lo; no routing.
    Passthrough,
    /// `-m TPROXY`: dialed from the client's address with `-t`'s mark, whose replies
    /// `fwmark MARK lookup TABLE` (`-r`) keeps in the namespace.
    Tproxy(Tproxy),
    /// Ambient: dialed from the client's address as ztunnel does, with istio-cni's routing of
    /// its mark.
    Ambient,
}

impl super::CaptureConfig {
    /// This capture's [`InboundPath`]: ambient's whatever `-m` says.
    pub fn inbound_path(&self) -> InboundPath {
        match (&self.ambient, self.inbound_mode) {
            (Some(_), _) => InboundPath::Ambient,
            (None, super::InterceptionMode::Tproxy) => InboundPath::Tproxy(self.tproxy),
            (None, super::InterceptionMode::Redirect) => InboundPath::Passthrough,
        }
    }
}

/// `-t`/`--istio-inbound-tproxy-mark` and `-r`/`--istio-inbound-tproxy-route-table`.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Tproxy {
    pub mark: u32,
    pub route_table: u32,
}

impl Default for Tproxy {
    fn default() -> Self {
        Self {
            mark: 1337,
            route_table: 133,
        }
    }
}

/// A mark or a routing table number: decimal or `0x` hex, as iptables and `ip rule` take
/// them. 0 is refused: a zero mark matches every unmarked packet, and table 0 is no table.
pub fn parse_u32_nonzero(flag: &'static str, s: &str) -> Result<u32, ConfigError> {
    let t = s.trim();
    let v = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => t.parse::<u32>(),
    };
    match v {
        Ok(v) if v != 0 => Ok(v),
        _ => Err(err(flag, s, "a number from 1 to 4294967295 (decimal or 0x hex)")),
    }
}

/// A network interface name as iptables' `-i`/`-o` take it: 1 to 15 bytes, no '/' or blank,
/// a trailing '+' for every interface with that prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interface(String);

impl Interface {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `name` (a real interface's) is this one, or matches its '+' prefix.
    pub fn matches(&self, name: &str) -> bool {
        match self.0.strip_suffix('+') {
            Some(prefix) => name.starts_with(prefix),
            None => name == self.0,
        }
    }

    /// Whether some interface's name matches both: rules on two entries that do not overlap
    /// never match the same packet.
    pub fn overlaps(&self, other: &Interface) -> bool {
        match (self.0.strip_suffix('+'), other.0.strip_suffix('+')) {
            (Some(p), Some(q)) => p.starts_with(q) || q.starts_with(p),
            (Some(_), None) => self.matches(&other.0),
            (None, _) => other.matches(&self.0),
        }
    }
}

/// The most entries an interface list (`-c`, `-k`) holds: each is a bit of a 32-bit mask in
/// the programs.
pub const MAX_INTERFACES: usize = 32;

/// A comma list of interface names, at most [`MAX_INTERFACES`]; empty for none.
pub fn parse_interfaces(flag: &'static str, s: &str) -> Result<Vec<Interface>, ConfigError> {
    if items(s).count() > MAX_INTERFACES {
        return Err(err(flag, s, std::format!("at most {MAX_INTERFACES} interface names")));
    }
    items(s)
        .map(|i| {
            let plus = i.find('+');
            let ok = !i.is_empty()
                && i.len() <= 15
                && i != "."
                && i != ".."
                && plus.is_none_or(|p| p == i.len() - 1)
                && !i
                    .chars()
                    .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control());
            if ok {
                Ok(Interface(i.to_string()))
            } else {
                Err(err(
                    flag,
                    i,
                    "a comma list of interface names (1 to 15 characters, no '/', ':' or blanks; a trailing '+' \
                     for a prefix)",
                ))
            }
        })
        .collect()
}

/// A group of `ISTIO_OUTBOUND_OWNER_GROUPS(_EXCLUDE)`: a gid, or a name that iptables resolves
/// when the rule is added (here: the agent, from its /etc/group).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnerGroup {
    /// As given: what the rule text shows.
    pub name: String,
    /// The gid: given, or resolved; `None` for a name not resolved (yet).
    pub gid: Option<u32>,
}

/// Which groups' connections are captured outbound (istio-iptables' `InterceptFilter`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OwnerGroups {
    /// `*`: every group (no rule).
    All,
    /// Only these: `-m owner ! --gid-owner G1 -m owner ! --gid-owner G2 ... -j RETURN`.
    Only(Vec<OwnerGroup>),
    /// All but these: one `-m owner --gid-owner G -j RETURN` each.
    Except(Vec<OwnerGroup>),
}

impl OwnerGroups {
    /// The groups named, for resolving.
    pub fn groups_mut(&mut self) -> &mut [OwnerGroup] {
        match self {
            Self::All => &mut [],
            Self::Only(g) | Self::Except(g) => g,
        }
    }

    pub fn groups(&self) -> &[OwnerGroup] {
        match self {
            Self::All => &[],
            Self::Only(g) | Self::Except(g) => g,
        }
    }
}

fn owner_group_list(flag: &'static str, s: &str) -> Result<Vec<OwnerGroup>, ConfigError> {
    items(s)
        .map(|i| {
            if i == "*" {
                return Err(err(flag, s, "'*' alone, or a comma list of group names or gids"));
            }
            let ok = i.len() <= 32 && !i.chars().any(|c| c == ':' || c.is_whitespace() || c.is_control());
            if !ok {
                return Err(err(
                    flag,
                    i,
                    "a group name (at most 32 characters, no ':' or blanks) or gid",
                ));
            }
            Ok(OwnerGroup {
                name: i.to_string(),
                gid: i.parse::<u32>().ok().filter(|&g| g != u32::MAX),
            })
        })
        .collect()
}

/// `ISTIO_OUTBOUND_OWNER_GROUPS` (`include`; unset: `*`) and
/// `ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE` (`exclude`), as istio-iptables' `ParseInterceptFilter`:
/// with `include` `*`, every group but `exclude`'s; otherwise only `include`'s, and `exclude`
/// is ignored (Istio says to set one of the two). An include list of no group at all (set but
/// empty, or `,`) leaves every connection alone, as Istio's rule then does.
pub fn parse_owner_groups(include: &str, exclude: &str) -> Result<OwnerGroups, ConfigError> {
    const INCLUDE: &str = "ISTIO_OUTBOUND_OWNER_GROUPS";
    const EXCLUDE: &str = "ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE";
    if include.trim() == "*" {
        let except = owner_group_list(EXCLUDE, exclude)?;
        return Ok(match except.is_empty() {
            true => OwnerGroups::All,
            false => OwnerGroups::Except(except),
        });
    }
    let only = owner_group_list(INCLUDE, include)?;
    if only.len() > crate::MAX_OWNER_GROUPS {
        return Err(err(
            INCLUDE,
            include,
            format!("at most {} groups (istio-iptables' limit)", crate::MAX_OWNER_GROUPS),
        ));
    }
    Ok(OwnerGroups::Only(only))
}

/// `ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR`: an IPv4 CIDR inside 127.0.0.0/8.
pub fn parse_ipv4_loopback(flag: &'static str, s: &str) -> Result<Cidr, ConfigError> {
    let c = parse_cidr(flag, s.trim())?;
    match c.addr {
        IpAddr::V4(a) if a.is_loopback() && c.prefix >= 8 => Ok(c),
        _ => Err(err(flag, s, "an IPv4 CIDR inside 127.0.0.0/8, such as 127.0.0.1/32")),
    }
}

/// The Istio release whose istio-iptables rules to reproduce, in the spirit of Istio's
/// `compatibilityVersion`: rules that changed between releases follow it. `None`: the current
/// rules (those of Istio's golden files at 1.27 and later).
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct Compat {
    pub version: Option<(u16, u16)>,
}

impl Compat {
    /// Oldest and newest releases that installed `-A ISTIO_INBOUND -p tcp --dport 22 -j RETURN`
    /// with `-b '*'` (removed in 1.13 by istio/istio#36312).
    pub const SSH_RETURN: ((u16, u16), (u16, u16)) = ((1, 0), (1, 12));

    /// Whether `-b '*'` also leaves SSH (port 22) alone.
    pub fn inbound_ssh_return(&self) -> bool {
        self.version
            .is_some_and(|v| v >= Self::SSH_RETURN.0 && v <= Self::SSH_RETURN.1)
    }

    pub fn label(&self) -> String {
        match self.version {
            Some((a, b)) => format!("{a}.{b}"),
            None => "current".into(),
        }
    }
}

/// `--compatibility-version`: `MAJOR.MINOR` (a patch part is accepted and ignored), from 1.0.
pub fn parse_compat(flag: &'static str, s: &str) -> Result<Compat, ConfigError> {
    let t = s.trim();
    if t.is_empty() {
        return Ok(Compat::default());
    }
    let mut parts = t.split('.');
    let major = parts.next().and_then(|p| p.parse::<u16>().ok());
    let minor = parts.next().and_then(|p| p.parse::<u16>().ok());
    let patch_ok = parts.next().is_none_or(|p| p.parse::<u16>().is_ok()) && parts.next().is_none();
    match (major, minor) {
        (Some(1), Some(minor)) if patch_ok => Ok(Compat {
            version: Some((1, minor)),
        }),
        _ => Err(err(flag, s, "an Istio release such as 1.21 (MAJOR.MINOR, from 1.0)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_servers_split_by_family() {
        let (v4, v6) = DnsCapture::servers_from_resolv_conf(
            "# c\nsearch a.svc\nnameserver 10.96.0.10\nnameserver  fd00::a\nnameserver fe80::1%eth0\nnameserver x\noptions ndots:5\n",
        );
        assert_eq!(v4, [Ipv4Addr::new(10, 96, 0, 10)]);
        assert_eq!(v6, ["fd00::a".parse::<Ipv6Addr>().unwrap()]);
        let off = DnsCapture {
            redirect: true,
            ..DnsCapture::default()
        };
        assert!(!off.enabled(), "no resolver and not capture-all: DNS capture is off");
    }

    #[test]
    fn marks_interfaces_groups_and_versions() {
        assert_eq!(parse_u32_nonzero("-t", "0x539").unwrap(), 1337);
        assert!(parse_u32_nonzero("-t", "0").unwrap_err().to_string().contains("'0'"));
        assert_eq!(parse_interfaces("-c", "eth0, veth+").unwrap().len(), 2);
        assert!(parse_interfaces("-k", "a/b").unwrap_err().to_string().contains("'a/b'"));
        assert!(parse_interfaces("-k", "abcdefghijklmnop").is_err());
        assert!(parse_interfaces("-k", "et+h").is_err());
        assert!(Interface("veth+".into()).matches("veth12"));
        let overlap = |a: &str, b: &str| Interface(a.into()).overlaps(&Interface(b.into()));
        for (a, b, both) in [
            ("eth0", "eth0", true),
            ("eth0", "eth1", false),
            ("eth+", "eth1", true),
            ("eth+", "veth1", false),
            ("eth+", "eth1+", true),
            ("eth+", "veth+", false),
            ("+", "lo", true),
        ] {
            assert_eq!((overlap(a, b), overlap(b, a)), (both, both), "{a} {b}");
        }
        assert_eq!(parse_owner_groups("*", "").unwrap(), OwnerGroups::All);
        let g = parse_owner_groups("java,202", "").unwrap();
        assert!(matches!(&g, OwnerGroups::Only(v) if v[0].gid.is_none() && v[1].gid == Some(202)));
        assert!(matches!(parse_owner_groups("*", "888,ftp").unwrap(), OwnerGroups::Except(v) if v.len() == 2));
        assert!(matches!(parse_owner_groups("java", "888").unwrap(), OwnerGroups::Only(v) if v.len() == 1));
        assert!(matches!(parse_owner_groups(",", "").unwrap(), OwnerGroups::Only(v) if v.is_empty()));
        assert!(matches!(parse_owner_groups("", "888").unwrap(), OwnerGroups::Only(v) if v.is_empty()));
        let many = (0..65).map(|i| i.to_string()).collect::<Vec<_>>().join(",");
        assert!(
            parse_owner_groups(&many, "")
                .unwrap_err()
                .to_string()
                .contains("at most 64")
        );
        assert!(parse_owner_groups("a,*", "").is_err());
        assert_eq!(
            parse_ipv4_loopback("x", "127.0.0.1/8").unwrap().to_string(),
            "127.0.0.0/8"
        );
        assert!(parse_ipv4_loopback("x", "10.0.0.1/32").is_err());
        assert!(parse_compat("v", "1.12").unwrap().inbound_ssh_return());
        assert!(!parse_compat("v", "1.13.3").unwrap().inbound_ssh_return());
        assert!(!parse_compat("v", "").unwrap().inbound_ssh_return());
        assert!(parse_compat("v", "2.0").is_err());
    }
}
