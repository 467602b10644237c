//! istio-iptables' capture flags as typed values, parsed with errors that name the flag, the
//! value and what would be accepted.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    string::String,
    vec::Vec,
};

use crate::addr::{self, Addr, Family};

/// An IPv4 or IPv6 CIDR, normalised (host bits cleared) as iptables does.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    /// Within the family: 0..=32 for IPv4, 0..=128 for IPv6.
    pub prefix: u8,
}

impl Cidr {
    pub fn family(&self) -> Family {
        match self.addr {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    /// The network and its mask in [`crate::addr`] form (IPv4 as its v4-mapped /96+n).
    pub fn words(&self) -> (Addr, Addr) {
        let prefix = match self.addr {
            IpAddr::V4(_) => 96 + self.prefix,
            IpAddr::V6(_) => self.prefix,
        };
        let mask = addr::prefix_mask(prefix);
        (addr::and(&addr::from_ip(self.addr), &mask), mask)
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let (net, mask) = self.words();
        addr::masked_eq(&addr::from_ip(ip), &mask, &net)
    }

    /// The CIDR `net`/`mask` of a rule of `family` ([`Cidr::words`] backwards).
    pub fn from_words(family: Family, net: &Addr, mask: &Addr) -> Self {
        let prefix = addr::mask_prefix(mask);
        match (family, addr::to_ip(net)) {
            (Family::V4, ip @ IpAddr::V4(_)) => Self {
                addr: ip,
                prefix: prefix.saturating_sub(96),
            },
            (_, IpAddr::V4(v4)) => Self {
                addr: IpAddr::V6(v4.to_ipv6_mapped()),
                prefix,
            },
            (_, ip) => Self { addr: ip, prefix },
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// `*` (everything), or a list (empty: nothing).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Include<T> {
    All,
    List(Vec<T>),
}

impl<T> Include<T> {
    pub fn is_empty(&self) -> bool {
        matches!(self, Include::List(v) if v.is_empty())
    }
}

/// `-m`: how inbound connections reach the proxy.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum InterceptionMode {
    /// nat `REDIRECT`: the app behind the proxy sees connections from 127.0.0.6.
    Redirect,
    /// mangle `TPROXY`: the proxy answers as the original destination and connects to the app
    /// from the client's address.
    Tproxy,
}

impl InterceptionMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Redirect => "REDIRECT",
            Self::Tproxy => "TPROXY",
        }
    }
}

mod ambient;
mod modes;
pub use ambient::*;
pub use modes::*;

/// The flags of `istio-iptables` that shape the nat chains, with the sidecar injection's
/// defaults (see [`CaptureConfig::default`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaptureConfig {
    /// `-p`
    pub envoy_port: u16,
    /// `-z`
    pub inbound_capture_port: u16,
    /// `-e`
    pub inbound_tunnel_port: u16,
    /// `-u`
    pub proxy_uids: Vec<u32>,
    /// `-g`
    pub proxy_gids: Vec<u32>,
    /// `-m`
    pub inbound_mode: InterceptionMode,
    /// `-i`: both families; each family's chain takes its own.
    pub outbound_cidrs: Include<Cidr>,
    /// `-x`: both families; each family's chain takes its own.
    pub outbound_exclude_cidrs: Vec<Cidr>,
    /// `-b`
    pub inbound_ports: Include<u16>,
    /// `-d`
    pub inbound_exclude_ports: Vec<u16>,
    /// `-q`
    pub outbound_ports: Vec<u16>,
    /// `-o`
    pub outbound_exclude_ports: Vec<u16>,
    /// `--redirect-dns`, `--capture-all-dns` and the resolvers.
    pub dns: DnsCapture,
    /// `-t`, `-r`: used with `-m TPROXY`.
    pub tproxy: Tproxy,
    /// `-c`: interfaces whose traffic is never captured, either way.
    pub exclude_interfaces: Vec<Interface>,
    /// `-k`: interfaces whose arriving connections are captured as outbound ones.
    pub kube_virt_interfaces: Vec<Interface>,
    /// `--drop-invalid`.
    pub drop_invalid: bool,
    /// `ISTIO_OUTBOUND_OWNER_GROUPS` / `ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE`.
    pub owner_groups: OwnerGroups,
    /// `ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR`: the `127.0.0.1/32` of the IPv4 rules.
    pub ipv4_loopback: Cidr,
    /// The Istio release whose rules these are.
    pub compat: Compat,
    /// Ambient mode ([`CaptureConfig::ambient`]): istio-cni's in-pod rules instead of
    /// istio-iptables'.
    pub ambient: Option<Ambient>,
}

impl CaptureConfig {
    /// The workload's interface list: `-c`'s, then `-k`'s (rules name an entry by its index).
    pub fn interface_list(&self) -> impl Iterator<Item = &Interface> {
        self.exclude_interfaces.iter().chain(self.kube_virt_interfaces.iter())
    }
}

impl Default for CaptureConfig {
    /// `istio-iptables -p 15001 -z 15006 -u 1337 -m REDIRECT -i '*' -b '*' -d 15090,15021,15020`.
    fn default() -> Self {
        Self {
            envoy_port: 15001,
            inbound_capture_port: 15006,
            inbound_tunnel_port: 15008,
            proxy_uids: std::vec![1337],
            proxy_gids: std::vec![1337],
            inbound_mode: InterceptionMode::Redirect,
            outbound_cidrs: Include::All,
            outbound_exclude_cidrs: Vec::new(),
            inbound_ports: Include::All,
            inbound_exclude_ports: std::vec![15090, 15021, 15020],
            outbound_ports: Vec::new(),
            outbound_exclude_ports: Vec::new(),
            dns: DnsCapture::default(),
            tproxy: Tproxy::default(),
            exclude_interfaces: Vec::new(),
            kube_virt_interfaces: Vec::new(),
            drop_invalid: false,
            owner_groups: OwnerGroups::All,
            ipv4_loopback: DEFAULT_IPV4_LOOPBACK,
            compat: Compat::default(),
            ambient: None,
        }
    }
}

/// A flag value that cannot be used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub flag: &'static str,
    pub value: String,
    pub expected: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid value '{}' for {}: expected {}",
            self.value, self.flag, self.expected
        )
    }
}

impl std::error::Error for ConfigError {}

pub(crate) fn err(flag: &'static str, value: &str, expected: impl Into<String>) -> ConfigError {
    ConfigError {
        flag,
        value: value.into(),
        expected: expected.into(),
    }
}

const PORT_EXPECTED: &str = "a TCP port (1 to 65535)";

/// One port, 1..=65535.
pub fn parse_port(flag: &'static str, s: &str) -> Result<u16, ConfigError> {
    match s.trim().parse::<u16>() {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(err(flag, s, PORT_EXPECTED)),
    }
}

/// Split a comma list, ignoring blanks around items; an empty string is an empty list.
pub(crate) fn items(s: &str) -> impl Iterator<Item = &str> {
    s.split(',').map(str::trim).filter(|i| !i.is_empty())
}

/// A comma list of ports, e.g. `15090,15021,15020`; empty for none.
pub fn parse_ports(flag: &'static str, s: &str) -> Result<Vec<u16>, ConfigError> {
    items(s)
        .map(|i| match i.parse::<u16>() {
            Ok(p) if p != 0 => Ok(p),
            _ => Err(err(flag, i, "a comma list of TCP ports (1 to 65535)")),
        })
        .collect()
}

/// `*` or a comma list of ports.
pub fn parse_port_include(flag: &'static str, s: &str) -> Result<Include<u16>, ConfigError> {
    if s.trim() == "*" {
        Ok(Include::All)
    } else {
        star_alone(flag, s, "ports")?;
        parse_ports(flag, s).map(Include::List)
    }
}

/// istio-iptables takes `*` only as the whole value; in a list it is not a port or a CIDR.
fn star_alone(flag: &'static str, s: &str, what: &str) -> Result<(), ConfigError> {
    if items(s).any(|i| i == "*") {
        return Err(err(
            flag,
            s,
            format!("'*' alone, or a comma list of {what} without '*'"),
        ));
    }
    Ok(())
}

/// A comma list of numeric ids (uid or gid), at least one.
pub fn parse_ids(flag: &'static str, s: &str) -> Result<Vec<u32>, ConfigError> {
    let ids = items(s)
        .map(|i| {
            i.parse::<u32>()
                .map_err(|_| err(flag, i, "a comma list of numeric ids (0 to 4294967294)"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if ids.is_empty() {
        return Err(err(flag, s, "at least one numeric id"));
    }
    if let Some(bad) = ids.iter().find(|&&i| i == u32::MAX) {
        return Err(err(
            flag,
            &std::format!("{bad}"),
            "an id from 0 to 4294967294 (-1 is not an owner)",
        ));
    }
    Ok(ids)
}

/// One IPv4 or IPv6 CIDR (`10.0.0.0/8`, `fd00::/8`) or address (a /32 or /128).
pub fn parse_cidr(flag: &'static str, s: &str) -> Result<Cidr, ConfigError> {
    let expected = "an IPv4 or IPv6 CIDR such as 10.0.0.0/8 or fd00::/8, or an address";
    let (ip, prefix) = match s.split_once('/') {
        Some((ip, p)) => (ip, Some(p.parse::<u8>().map_err(|_| err(flag, s, expected))?)),
        None => (s, None),
    };
    let ip: IpAddr = ip.parse().map_err(|_| err(flag, s, expected))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let prefix = prefix.unwrap_or(max);
    if prefix > max {
        return Err(err(flag, s, expected));
    }
    let addr = match ip {
        IpAddr::V4(v4) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(u32::from(v4) & mask))
        }
        IpAddr::V6(v6) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask))
        }
    };
    Ok(Cidr { addr, prefix })
}

/// A comma list of CIDRs; empty for none.
pub fn parse_cidrs(flag: &'static str, s: &str) -> Result<Vec<Cidr>, ConfigError> {
    items(s).map(|i| parse_cidr(flag, i)).collect()
}

/// `*` or a comma list of CIDRs.
pub fn parse_cidr_include(flag: &'static str, s: &str) -> Result<Include<Cidr>, ConfigError> {
    if s.trim() == "*" {
        Ok(Include::All)
    } else {
        star_alone(flag, s, "CIDRs")?;
        parse_cidrs(flag, s).map(Include::List)
    }
}

/// `-m`: `REDIRECT` or `TPROXY`, as istio-iptables spells them.
pub fn parse_mode(flag: &'static str, s: &str) -> Result<InterceptionMode, ConfigError> {
    match s.trim() {
        "REDIRECT" => Ok(InterceptionMode::Redirect),
        "TPROXY" => Ok(InterceptionMode::Tproxy),
        _ => Err(err(flag, s, "REDIRECT or TPROXY")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_normalise_and_reject() {
        let c = parse_cidr("-i", "10.1.2.3/8").unwrap();
        assert_eq!(c.to_string(), "10.0.0.0/8");
        assert_eq!(parse_cidr("-i", "10.1.2.3").unwrap().to_string(), "10.1.2.3/32");
        assert_eq!(parse_cidr("-i", "0.0.0.0/0").unwrap().words().1, addr::prefix_mask(96));
        assert_eq!(parse_cidr("-x", "2001:db8::1/32").unwrap().to_string(), "2001:db8::/32");
        assert_eq!(parse_cidr("-x", "fd00::1").unwrap().to_string(), "fd00::1/128");
        assert_eq!(parse_cidr("-x", "::/0").unwrap().words(), ([0; 4], [0; 4]));
        let c = parse_cidr("-i", "2001:db8::/32").unwrap();
        assert!(c.contains("2001:db8:1::5".parse().unwrap()));
        assert!(!c.contains("10.0.0.1".parse().unwrap()));
        let v4 = parse_cidr("-i", "10.0.0.0/8").unwrap();
        assert!(v4.contains("10.1.2.3".parse().unwrap()));
        assert!(v4.contains("::ffff:10.1.2.3".parse().unwrap()));
        for c in [
            v4,
            parse_cidr("-i", "2001:db8::/32").unwrap(),
            parse_cidr("-i", "::ffff:0:0/96").unwrap(),
        ] {
            let (net, mask) = c.words();
            assert_eq!(Cidr::from_words(c.family(), &net, &mask), c);
        }
        for bad in ["10.0.0.0/33", "10.0.0/8", "fd00::/129", "x", "10.0.0.0/", "fd00::/"] {
            let e = parse_cidr("-i", bad).unwrap_err();
            assert!(e.to_string().contains(bad), "{e}");
        }
    }

    #[test]
    fn ports_and_ids() {
        assert_eq!(parse_ports("-d", "15090, 15021,15020").unwrap(), [15090, 15021, 15020]);
        assert_eq!(parse_ports("-d", "").unwrap(), Vec::<u16>::new());
        assert!(parse_ports("-d", "1,0").unwrap_err().to_string().contains("'0'"));
        assert!(parse_ports("-d", "65536").is_err());
        assert_eq!(parse_port_include("-b", "*").unwrap(), Include::All);
        assert!(parse_port_include("-b", "").unwrap().is_empty());
        assert_eq!(parse_ids("-u", "1337,0").unwrap(), [1337, 0]);
        assert!(parse_ids("-u", "").is_err());
        assert!(parse_ids("-u", "root").unwrap_err().to_string().contains("'root'"));
        assert!(parse_ids("-u", "4294967295").is_err());
        assert_eq!(parse_mode("-m", "TPROXY").unwrap(), InterceptionMode::Tproxy);
        assert!(
            parse_mode("-m", "tproxy")
                .unwrap_err()
                .to_string()
                .contains("REDIRECT or TPROXY")
        );
    }
}
