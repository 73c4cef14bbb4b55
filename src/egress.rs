//! Egress policy: which destinations a data source may reach, and the
//! built-in deny list that every resolved address is judged against.
//!
//! Every check returns a decision with a reason. The reason text goes
//! unchanged into the 403 message and the audit record; its `label` (from a
//! small fixed set) goes into `sealgate_egress_denied_total`.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use crate::upstream::UpstreamHost;

/// The allow entry that admitted a destination: where it was written, as
/// the reason an allowed request carries into its audit record. Built once
/// at load, so a request borrows it rather than formatting it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    reason: String,
}

impl Rule {
    /// `source` is `file:line`; `entry` the entry as written.
    pub fn new(source: &str, entry: &str) -> Rule {
        Rule {
            reason: format!("allowed by {source} `{entry}`"),
        }
    }

    pub fn reason(&self) -> &str {
        &self.reason
    }
}

/// Kinds of address no data source may reach unless `allow_private`
/// names them (SPEC section 3): the bounded `reason` label of
/// `sealgate_egress_denied_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blocked {
    Loopback,
    Private,
    Cgnat,
    LinkLocal,
    UniqueLocal,
    Multicast,
    Unspecified,
    Broadcast,
    Documentation,
    Benchmarking,
    /// IANA's special-purpose rows that fit none of the above: protocol
    /// assignments, translation and discard prefixes, deprecated blocks.
    SpecialPurpose,
    Reserved,
}

impl Blocked {
    pub fn label(self) -> &'static str {
        match self {
            Blocked::Loopback => "loopback",
            Blocked::Private => "private",
            Blocked::Cgnat => "cgnat",
            Blocked::LinkLocal => "link_local",
            Blocked::UniqueLocal => "unique_local",
            Blocked::Multicast => "multicast",
            Blocked::Unspecified => "unspecified",
            Blocked::Broadcast => "broadcast",
            Blocked::Documentation => "documentation",
            Blocked::Benchmarking => "benchmarking",
            Blocked::SpecialPurpose => "special_purpose",
            Blocked::Reserved => "reserved",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Blocked::Loopback => "a loopback address",
            Blocked::Private => "a private address",
            Blocked::Cgnat => "a carrier-grade NAT address",
            Blocked::LinkLocal => "a link-local address (cloud metadata lives here)",
            Blocked::UniqueLocal => "a unique local IPv6 address",
            Blocked::Multicast => "a multicast address",
            Blocked::Unspecified => "an unspecified address",
            Blocked::Broadcast => "the broadcast address",
            Blocked::Documentation => "a documentation address",
            Blocked::Benchmarking => "a benchmarking address",
            Blocked::SpecialPurpose => "a special-purpose address that is not globally reachable",
            Blocked::Reserved => "a reserved address",
        }
    }
}

/// One row of IANA's IPv4 or IPv6 Special-Purpose Address Registry (or,
/// for multicast, the multicast registries): `blocked` is `None` for the
/// rows marked globally reachable, which carve exceptions out of larger
/// blocks that are not.
struct SpecialRange {
    range: &'static str,
    name: &'static str,
    blocked: Option<Blocked>,
}

const fn row(range: &'static str, name: &'static str, blocked: Option<Blocked>) -> SpecialRange {
    SpecialRange {
        range,
        name,
        blocked,
    }
}

/// The IPv4 Special-Purpose Address Registry's rows, as published.
const SPECIAL_V4: [SpecialRange; 26] = {
    use Blocked::*;
    [
        row("0.0.0.0/8", "\"This network\"", Some(Unspecified)),
        row(
            "0.0.0.0/32",
            "\"This host on this network\"",
            Some(Unspecified),
        ),
        row("10.0.0.0/8", "Private-Use", Some(Private)),
        row("100.64.0.0/10", "Shared Address Space", Some(Cgnat)),
        row("127.0.0.0/8", "Loopback", Some(Loopback)),
        row("169.254.0.0/16", "Link Local", Some(LinkLocal)),
        row("172.16.0.0/12", "Private-Use", Some(Private)),
        row(
            "192.0.0.0/24",
            "IETF Protocol Assignments",
            Some(SpecialPurpose),
        ),
        row(
            "192.0.0.0/29",
            "IPv4 Service Continuity Prefix",
            Some(SpecialPurpose),
        ),
        row("192.0.0.8/32", "IPv4 dummy address", Some(SpecialPurpose)),
        row("192.0.0.9/32", "Port Control Protocol Anycast", None),
        row(
            "192.0.0.10/32",
            "Traversal Using Relays around NAT Anycast",
            None,
        ),
        row(
            "192.0.0.170/32",
            "NAT64/DNS64 Discovery",
            Some(SpecialPurpose),
        ),
        row(
            "192.0.0.171/32",
            "NAT64/DNS64 Discovery",
            Some(SpecialPurpose),
        ),
        row(
            "192.0.2.0/24",
            "Documentation (TEST-NET-1)",
            Some(Documentation),
        ),
        row("192.31.196.0/24", "AS112-v4", None),
        row("192.52.193.0/24", "AMT", None),
        row(
            "192.88.99.0/24",
            "Deprecated (6to4 Relay Anycast)",
            Some(SpecialPurpose),
        ),
        row("192.168.0.0/16", "Private-Use", Some(Private)),
        row("192.175.48.0/24", "Direct Delegation AS112 Service", None),
        row("198.18.0.0/15", "Benchmarking", Some(Benchmarking)),
        row(
            "198.51.100.0/24",
            "Documentation (TEST-NET-2)",
            Some(Documentation),
        ),
        row(
            "203.0.113.0/24",
            "Documentation (TEST-NET-3)",
            Some(Documentation),
        ),
        row("224.0.0.0/4", "Multicast", Some(Multicast)),
        row("240.0.0.0/4", "Reserved", Some(Reserved)),
        row("255.255.255.255/32", "Limited Broadcast", Some(Broadcast)),
    ]
};

/// The IPv6 Special-Purpose Address Registry's rows. Forms that carry an
/// IPv4 address a packet is really sent to (IPv4-mapped, IPv4-compatible,
/// the well-known NAT64 prefix, 6to4) are judged by that address instead
/// (`embedded_v4`); Teredo lies inside 2001::/23 and is refused with it.
const SPECIAL_V6: [SpecialRange; 25] = {
    use Blocked::*;
    [
        row("::1/128", "Loopback Address", Some(Loopback)),
        row("::/128", "Unspecified Address", Some(Unspecified)),
        row(
            "::ffff:0:0:0/96",
            "IPv4-translated Address",
            Some(SpecialPurpose),
        ),
        row(
            "64:ff9b:1::/48",
            "IPv4-IPv6 Translat. (local use)",
            Some(SpecialPurpose),
        ),
        row(
            "100::/64",
            "Discard-Only Address Block",
            Some(SpecialPurpose),
        ),
        row("100:0:0:1::/64", "Dummy IPv6 Prefix", Some(SpecialPurpose)),
        row(
            "2001::/23",
            "IETF Protocol Assignments",
            Some(SpecialPurpose),
        ),
        row("2001::/32", "TEREDO", Some(SpecialPurpose)),
        row("2001:1::1/128", "Port Control Protocol Anycast", None),
        row(
            "2001:1::2/128",
            "Traversal Using Relays around NAT Anycast",
            None,
        ),
        row(
            "2001:1::3/128",
            "DNS-SD Service Registration Protocol Anycast",
            None,
        ),
        row("2001:2::/48", "Benchmarking", Some(Benchmarking)),
        row("2001:3::/32", "AMT", None),
        row("2001:4:112::/48", "AS112-v6", None),
        row(
            "2001:10::/28",
            "Deprecated (previously ORCHID)",
            Some(SpecialPurpose),
        ),
        row("2001:20::/28", "ORCHIDv2", None),
        row(
            "2001:30::/28",
            "Drone Remote ID Protocol Entity Tags (DETs) Prefix",
            None,
        ),
        row("2001:db8::/32", "Documentation", Some(Documentation)),
        row("2620:4f:8000::/48", "Direct Delegation AS112 Service", None),
        row("3fff::/20", "Documentation", Some(Documentation)),
        row(
            "5f00::/16",
            "Segment Routing (SRv6) SIDs",
            Some(SpecialPurpose),
        ),
        row("fc00::/7", "Unique-Local", Some(UniqueLocal)),
        row("fe80::/10", "Link-Local Unicast", Some(LinkLocal)),
        row("fec0::/10", "Site-Local (deprecated)", Some(Private)),
        row("ff00::/8", "Multicast", Some(Multicast)),
    ]
};

/// The rows parsed once into (network, mask) pairs, most specific first,
/// so the first row that holds an address is the one that decides: a
/// few integer operations per row on every request's addresses.
struct SpecialNets {
    v4: Vec<(u32, u32, &'static SpecialRange)>,
    v6: Vec<(u128, u128, &'static SpecialRange)>,
}

static SPECIAL_NETS: std::sync::LazyLock<SpecialNets> = std::sync::LazyLock::new(|| {
    let mut nets: Vec<(ipnet::IpNet, &'static SpecialRange)> = SPECIAL_V4
        .iter()
        .chain(SPECIAL_V6.iter())
        .filter_map(|r| Some((r.range.parse().ok()?, r)))
        .collect();
    nets.sort_by_key(|(net, _)| std::cmp::Reverse(net.prefix_len()));
    let mut special = SpecialNets {
        v4: Vec::new(),
        v6: Vec::new(),
    };
    for (net, row) in nets {
        match net {
            ipnet::IpNet::V4(n) => {
                special
                    .v4
                    .push((u32::from(n.network()), u32::from(n.netmask()), row))
            }
            ipnet::IpNet::V6(n) => {
                special
                    .v6
                    .push((u128::from(n.network()), u128::from(n.netmask()), row))
            }
        }
    }
    special
});

fn special_range(ip: IpAddr) -> Option<&'static SpecialRange> {
    match ip {
        IpAddr::V4(v4) => {
            let bits = u32::from(v4);
            SPECIAL_NETS
                .v4
                .iter()
                .find(|(net, mask, _)| bits & mask == *net)
                .map(|(_, _, row)| *row)
        }
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            SPECIAL_NETS
                .v6
                .iter()
                .find(|(net, mask, _)| bits & mask == *net)
                .map(|(_, _, row)| *row)
        }
    }
}

/// Judges an address by the built-in deny list: the registry rows that are
/// not globally reachable. IPv6 forms that carry an IPv4 address are
/// judged by the address they carry.
pub fn classify(ip: IpAddr) -> Option<Blocked> {
    blocked_by(ip).map(|(kind, _)| kind)
}

/// The kind and the registry row (range and name) that block `ip`.
fn blocked_by(ip: IpAddr) -> Option<(Blocked, &'static SpecialRange)> {
    if let Some(row) = special_range(ip) {
        return row.blocked.map(|kind| (kind, row));
    }
    let IpAddr::V6(v6) = ip else {
        return None;
    };
    let (first, second) = embedded_v4(v6)?;
    blocked_by(IpAddr::V4(first)).or_else(|| second.and_then(|s| blocked_by(IpAddr::V4(s))))
}

/// The IPv4 addresses an IPv6 address carries: IPv4-mapped, IPv4-compatible,
/// the well-known NAT64 prefix, 6to4, and Teredo (both the server and the
/// de-obfuscated client address, hence a possible second).
fn embedded_v4(ip: Ipv6Addr) -> Option<(Ipv4Addr, Option<Ipv4Addr>)> {
    let s = ip.segments();
    let v4 = |hi: u16, lo: u16| Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo));
    let low32 = v4(s[6], s[7]);
    match s {
        [0, 0, 0, 0, 0, 0xffff, _, _] => Some((low32, None)),
        [0, 0, 0, 0, 0, 0, _, _] if !ip.is_unspecified() && !ip.is_loopback() => {
            Some((low32, None))
        }
        [0x64, 0xff9b, 0, 0, 0, 0, _, _] => Some((low32, None)),
        [0x2002, hi, lo, _, _, _, _, _] => Some((v4(hi, lo), None)),
        [0x2001, 0, server_hi, server_lo, _, _, client_hi, client_lo] => Some((
            v4(server_hi, server_lo),
            Some(Ipv4Addr::from(
                u32::from(v4(client_hi, client_lo)) ^ 0xffff_ffff,
            )),
        )),
        _ => None,
    }
}

/// Why a destination may not be reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    /// Bounded: `no_allow_entry`, `mixed_answers`, or a `Blocked` label.
    pub label: &'static str,
    pub reason: String,
}

/// Which ports an entry admits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ports {
    Any,
    One(u16),
}

impl Ports {
    fn admits(self, port: u16) -> bool {
        match self {
            Ports::Any => true,
            Ports::One(p) => p == port,
        }
    }
}

/// What an entry names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Host(String),
    /// `*.suffix`: one or more labels below `suffix`, never `suffix` itself.
    Wildcard(String),
    Net(ipnet::IpNet),
}

type Admits = Vec<(Ports, Arc<Rule>)>;

/// A set of entries, indexed so a decision costs a few hash lookups
/// however many entries there are.
#[derive(Default)]
pub struct Matcher {
    hosts: HashMap<String, Admits>,
    wildcards: HashMap<String, Admits>,
    /// By prefix length, longest first: the masked network → entries.
    nets: Vec<(u8, bool, HashMap<IpAddr, Admits>)>,
}

impl Matcher {
    pub fn add(&mut self, target: Target, ports: Ports, rule: Arc<Rule>) {
        let entry = (ports, rule);
        match target {
            Target::Host(h) => self.hosts.entry(h).or_default().push(entry),
            Target::Wildcard(s) => self.wildcards.entry(s).or_default().push(entry),
            Target::Net(net) => {
                let key = (net.prefix_len(), net.addr().is_ipv6());
                if !self.nets.iter().any(|(len, v6, _)| (*len, *v6) == key) {
                    self.nets.push((key.0, key.1, HashMap::new()));
                    self.nets.sort_by_key(|(len, _, _)| std::cmp::Reverse(*len));
                }
                if let Some((_, _, by_network)) =
                    self.nets.iter_mut().find(|(len, v6, _)| (*len, *v6) == key)
                {
                    by_network.entry(net.network()).or_default().push(entry);
                }
            }
        }
    }

    fn first(admits: Option<&Admits>, port: u16) -> Option<&Arc<Rule>> {
        admits?.iter().find(|(p, _)| p.admits(port)).map(|(_, r)| r)
    }

    pub fn match_name(&self, name: &str, port: u16) -> Option<&Arc<Rule>> {
        if let Some(rule) = Self::first(self.hosts.get(name), port) {
            return Some(rule);
        }
        // Each proper suffix of the name: a.b.example.org → b.example.org → example.org → org
        let mut rest = name;
        while let Some(dot) = rest.find('.') {
            rest = &rest[dot + 1..];
            if let Some(rule) = Self::first(self.wildcards.get(rest), port) {
                return Some(rule);
            }
        }
        None
    }

    /// Callers pass `ip.to_canonical()`, so `::ffff:a.b.c.d` meets the IPv4
    /// entries as `a.b.c.d`.
    pub fn match_ip(&self, ip: IpAddr, port: u16) -> Option<&Arc<Rule>> {
        let v6 = ip.is_ipv6();
        self.nets
            .iter()
            .filter(|(_, is6, _)| *is6 == v6)
            .find_map(|(len, _, by_network)| {
                let network = ipnet::IpNet::new(ip, *len).ok()?.network();
                Self::first(by_network.get(&network), port)
            })
    }
}

/// The merged `[egress]` sections of every policy file.
#[derive(Default)]
pub struct EgressPolicy {
    pub allow: Matcher,
    pub allow_private: Matcher,
}

impl EgressPolicy {
    /// May this host:port be reached at all? Judged once per data source
    /// at load. A CIDR entry admits IP-literal hosts; names need a host or
    /// wildcard entry.
    pub fn destination(&self, host: &UpstreamHost, port: u16) -> Result<Arc<Rule>, Denial> {
        let rule = match host {
            UpstreamHost::Name(name) => self.allow.match_name(name, port),
            UpstreamHost::Ip(ip) => self.allow.match_ip(ip.to_canonical(), port),
        };
        rule.cloned().ok_or_else(|| Denial {
            label: "no_allow_entry",
            reason: format!(
                "{} matches no [egress] allow entry",
                display_destination(host, port)
            ),
        })
    }

    /// Judges every address a destination resolved to. If any is blocked,
    /// none is used: a name that mixes public and private answers is a
    /// rebinding attempt.
    pub fn addresses(&self, host: &UpstreamHost, addrs: &[SocketAddr]) -> Result<(), Denial> {
        let mut blocked = None;
        let mut clean = 0;
        for addr in addrs {
            let ip = addr.ip().to_canonical();
            match blocked_by(ip) {
                Some(why) if !self.private_admitted(host, ip, addr.port()) => {
                    blocked.get_or_insert((ip, why));
                }
                _ => clean += 1,
            }
        }
        match blocked {
            None => Ok(()),
            Some((ip, _)) if clean > 0 => Err(Denial {
                label: "mixed_answers",
                reason: format!(
                    "{} resolved to both public and blocked addresses (including {ip}); refusing all of them",
                    display_destination(host, addrs[0].port())
                ),
            }),
            Some((ip, (kind, row))) => Err(Denial {
                label: kind.label(),
                reason: format!(
                    "{ip} is {} ({} {}, IANA special-purpose registry) and no allow_private entry admits it",
                    kind.describe(),
                    row.range,
                    row.name
                ),
            }),
        }
    }

    /// Whether `allow_private` admits this destination: an address in one
    /// of its networks, or a name it lists (which may then resolve to
    /// private addresses).
    fn private_admitted(&self, host: &UpstreamHost, ip: IpAddr, port: u16) -> bool {
        self.allow_private.match_ip(ip, port).is_some()
            || matches!(host, UpstreamHost::Name(n) if self.allow_private.match_name(n, port).is_some())
    }

    /// For config checks before anything is resolved: does `allow_private`
    /// cover this destination as written?
    pub fn private_destination(&self, host: &UpstreamHost, port: u16) -> bool {
        match host {
            UpstreamHost::Name(n) => self.allow_private.match_name(n, port).is_some(),
            UpstreamHost::Ip(ip) => self
                .allow_private
                .match_ip(ip.to_canonical(), port)
                .is_some(),
        }
    }
}

fn display_destination(host: &UpstreamHost, port: u16) -> String {
    match host {
        UpstreamHost::Name(n) => format!("{n}:{port}"),
        UpstreamHost::Ip(IpAddr::V6(ip)) => format!("[{ip}]:{port}"),
        UpstreamHost::Ip(ip) => format!("{ip}:{port}"),
    }
}

/// Parses an allow entry: `host`, `*.suffix`, an IP, or a CIDR, each with
/// an optional `:port` (IPv6 in brackets when a port follows).
pub fn parse_entry(entry: &str) -> Result<(Target, Ports), String> {
    let entry = entry.trim();
    let (host, port) = split_port(entry)?;
    let ports = match port {
        None => Ports::Any,
        Some(p) => match p.parse::<u16>() {
            Ok(p) if p > 0 => Ports::One(p),
            _ => return Err(format!("`{p}` is not a port (1-65535)")),
        },
    };
    if host.is_empty() {
        return Err("the entry names no host".into());
    }
    if host.contains('/') {
        let net: ipnet::IpNet = host
            .parse()
            .map_err(|_| format!("`{host}` is not a CIDR network"))?;
        if net.network() != net.addr() {
            return Err(format!(
                "`{host}` has host bits set; did you mean {}?",
                net.trunc()
            ));
        }
        return Ok((Target::Net(canonical_net(net)), ports));
    }
    if let Some(suffix) = host.strip_prefix("*.") {
        return match normalize_host(suffix)? {
            Target::Host(s) => Ok((Target::Wildcard(s), ports)),
            _ => Err(format!(
                "`{host}`: a wildcard stands for DNS labels, not IP addresses"
            )),
        };
    }
    if host.contains('*') {
        return Err(format!("`{host}`: only a leading `*.` wildcard is allowed"));
    }
    Ok((normalize_host(host)?, ports))
}

fn canonical_net(net: ipnet::IpNet) -> ipnet::IpNet {
    match net {
        ipnet::IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.addr().to_ipv4_mapped() {
            Some(v4) => ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96)
                .map(ipnet::IpNet::V4)
                .unwrap_or(net),
            None => net,
        },
        _ => net,
    }
}

fn split_port(entry: &str) -> Result<(&str, Option<&str>), String> {
    if let Some(rest) = entry.strip_prefix('[') {
        let (inside, after) = rest
            .split_once(']')
            .ok_or_else(|| format!("`{entry}`: missing `]`"))?;
        return match after {
            "" => Ok((inside, None)),
            _ => after
                .strip_prefix(':')
                .map(|p| (inside, Some(p)))
                .ok_or_else(|| format!("`{entry}`: expected `:port` after `]`")),
        };
    }
    match entry.matches(':').count() {
        0 => Ok((entry, None)),
        1 => Ok(entry
            .split_once(':')
            .map_or((entry, None), |(h, p)| (h, Some(p)))),
        // Bare IPv6 (or IPv6 CIDR): no port possible without brackets.
        _ => Ok((entry, None)),
    }
}

/// Host spellings normalised as a URL parser reads them: case, trailing
/// dot, IDN to punycode, IPv4 in decimal, octal or hex forms.
fn normalize_host(host: &str) -> Result<Target, String> {
    let trimmed = host.trim_end_matches('.');
    if let Ok(ip) = trimmed.parse::<Ipv6Addr>() {
        return Ok(Target::Net(canonical_net(ipnet::IpNet::from(IpAddr::V6(
            ip,
        )))));
    }
    match url::Host::parse(trimmed).map_err(|e| format!("`{host}` is not a valid host: {e}"))? {
        url::Host::Domain(d) => Ok(Target::Host(d.to_ascii_lowercase())),
        url::Host::Ipv4(ip) => Ok(Target::Net(ipnet::IpNet::from(IpAddr::V4(ip)))),
        url::Host::Ipv6(ip) => Ok(Target::Net(canonical_net(ipnet::IpNet::from(IpAddr::V6(
            ip,
        ))))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn classifier_covers_every_range_and_its_edges() {
        let table: &[(&str, Option<Blocked>)] = &[
            ("0.0.0.0", Some(Blocked::Unspecified)),
            ("0.255.255.255", Some(Blocked::Unspecified)),
            ("1.0.0.0", None),
            ("9.255.255.255", None),
            ("10.0.0.0", Some(Blocked::Private)),
            ("10.255.255.255", Some(Blocked::Private)),
            ("11.0.0.0", None),
            ("100.63.255.255", None),
            ("100.64.0.0", Some(Blocked::Cgnat)),
            ("100.127.255.255", Some(Blocked::Cgnat)),
            ("100.128.0.0", None),
            ("126.255.255.255", None),
            ("127.0.0.1", Some(Blocked::Loopback)),
            ("127.255.255.255", Some(Blocked::Loopback)),
            ("128.0.0.0", None),
            ("169.253.255.255", None),
            ("169.254.169.254", Some(Blocked::LinkLocal)),
            ("169.255.0.0", None),
            ("172.15.255.255", None),
            ("172.16.0.0", Some(Blocked::Private)),
            ("172.31.255.255", Some(Blocked::Private)),
            ("172.32.0.0", None),
            ("192.0.2.1", Some(Blocked::Documentation)),
            ("192.0.3.1", None),
            ("192.167.255.255", None),
            ("192.168.0.0", Some(Blocked::Private)),
            ("192.168.255.255", Some(Blocked::Private)),
            ("192.169.0.0", None),
            ("198.51.100.7", Some(Blocked::Documentation)),
            ("203.0.113.9", Some(Blocked::Documentation)),
            ("223.255.255.255", None),
            ("224.0.0.1", Some(Blocked::Multicast)),
            ("239.255.255.255", Some(Blocked::Multicast)),
            ("240.0.0.1", Some(Blocked::Reserved)),
            ("255.255.255.254", Some(Blocked::Reserved)),
            ("255.255.255.255", Some(Blocked::Broadcast)),
            ("8.8.8.8", None),
            ("::", Some(Blocked::Unspecified)),
            ("::1", Some(Blocked::Loopback)),
            ("::2", Some(Blocked::Unspecified)),
            ("fe80::1", Some(Blocked::LinkLocal)),
            ("febf:ffff::1", Some(Blocked::LinkLocal)),
            ("fec0::1", Some(Blocked::Private)),
            ("fbff:ffff::1", None),
            ("fc00::1", Some(Blocked::UniqueLocal)),
            ("fdff:ffff::1", Some(Blocked::UniqueLocal)),
            ("fe00::1", None),
            ("ff02::1", Some(Blocked::Multicast)),
            ("2001:db8::1", Some(Blocked::Documentation)),
            ("2001:db9::1", None),
            ("2606:4700::1111", None),
            // Embedded IPv4, judged by what they carry.
            ("::ffff:127.0.0.1", Some(Blocked::Loopback)),
            ("::ffff:169.254.169.254", Some(Blocked::LinkLocal)),
            ("::ffff:8.8.8.8", None),
            ("::127.0.0.1", Some(Blocked::Loopback)),
            ("::10.1.2.3", Some(Blocked::Private)),
            ("::8.8.8.8", None),
            ("64:ff9b::10.0.0.1", Some(Blocked::Private)),
            ("64:ff9b::8.8.8.8", None),
            ("2002:a9fe:a9fe::1", Some(Blocked::LinkLocal)),
            ("2002:0808:0808::1", None),
        ];
        for (addr, want) in table {
            assert_eq!(classify(ip(addr)), *want, "{addr}");
        }
    }

    /// Every row of IANA's IPv4 and IPv6 Special-Purpose Address Registries
    /// (and multicast), written out here from the registries rather than
    /// from the table the code uses: an address at each end of the block,
    /// and for rows marked globally reachable, that they stay reachable.
    #[test]
    fn every_special_purpose_registry_row_is_judged_as_published() {
        use Blocked::*;
        let rows: &[(&str, &str, Option<Blocked>)] = &[
            ("0.0.0.0", "0.255.255.255", Some(Unspecified)),
            ("10.0.0.0", "10.255.255.255", Some(Private)),
            ("100.64.0.0", "100.127.255.255", Some(Cgnat)),
            ("127.0.0.0", "127.255.255.255", Some(Loopback)),
            ("169.254.0.0", "169.254.255.255", Some(LinkLocal)),
            ("172.16.0.0", "172.31.255.255", Some(Private)),
            ("192.0.0.0", "192.0.0.255", Some(SpecialPurpose)),
            ("192.0.0.1", "192.0.0.7", Some(SpecialPurpose)),
            ("192.0.0.8", "192.0.0.8", Some(SpecialPurpose)),
            ("192.0.0.9", "192.0.0.9", None),
            ("192.0.0.10", "192.0.0.10", None),
            ("192.0.0.170", "192.0.0.171", Some(SpecialPurpose)),
            ("192.0.2.0", "192.0.2.255", Some(Documentation)),
            ("192.31.196.0", "192.31.196.255", None),
            ("192.52.193.0", "192.52.193.255", None),
            ("192.88.99.0", "192.88.99.255", Some(SpecialPurpose)),
            ("192.168.0.0", "192.168.255.255", Some(Private)),
            ("192.175.48.0", "192.175.48.255", None),
            ("198.18.0.0", "198.19.255.255", Some(Benchmarking)),
            ("198.51.100.0", "198.51.100.255", Some(Documentation)),
            ("203.0.113.0", "203.0.113.255", Some(Documentation)),
            ("224.0.0.0", "239.255.255.255", Some(Multicast)),
            ("240.0.0.0", "255.255.255.254", Some(Reserved)),
            ("255.255.255.255", "255.255.255.255", Some(Broadcast)),
            ("::1", "::1", Some(Loopback)),
            ("::", "::", Some(Unspecified)),
            ("::ffff:0:0:0", "::ffff:0:ffff:ffff", Some(SpecialPurpose)),
            (
                "64:ff9b:1::",
                "64:ff9b:1:ffff:ffff:ffff:ffff:ffff",
                Some(SpecialPurpose),
            ),
            ("100::", "100::ffff:ffff:ffff:ffff", Some(SpecialPurpose)),
            (
                "100:0:0:1::",
                "100:0:0:1:ffff:ffff:ffff:ffff",
                Some(SpecialPurpose),
            ),
            (
                "2001::",
                "2001:1ff:ffff:ffff:ffff:ffff:ffff:ffff",
                Some(SpecialPurpose),
            ),
            (
                "2001:0:4136:e378:8000:63bf:f7f7:f7f7",
                "2001::ffff",
                Some(SpecialPurpose),
            ),
            ("2001:1::1", "2001:1::1", None),
            ("2001:1::2", "2001:1::2", None),
            ("2001:1::3", "2001:1::3", None),
            (
                "2001:2::",
                "2001:2:0:ffff:ffff:ffff:ffff:ffff",
                Some(Benchmarking),
            ),
            ("2001:3::", "2001:3:ffff:ffff:ffff:ffff:ffff:ffff", None),
            ("2001:4:112::", "2001:4:112:ffff:ffff:ffff:ffff:ffff", None),
            (
                "2001:10::",
                "2001:1f:ffff:ffff:ffff:ffff:ffff:ffff",
                Some(SpecialPurpose),
            ),
            ("2001:20::", "2001:2f:ffff:ffff:ffff:ffff:ffff:ffff", None),
            ("2001:30::", "2001:3f:ffff:ffff:ffff:ffff:ffff:ffff", None),
            (
                "2001:db8::",
                "2001:db8:ffff:ffff:ffff:ffff:ffff:ffff",
                Some(Documentation),
            ),
            (
                "2620:4f:8000::",
                "2620:4f:8000:ffff:ffff:ffff:ffff:ffff",
                None,
            ),
            (
                "3fff::",
                "3fff:fff:ffff:ffff:ffff:ffff:ffff:ffff",
                Some(Documentation),
            ),
            (
                "5f00::",
                "5f00:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
                Some(SpecialPurpose),
            ),
            (
                "fc00::",
                "fdff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
                Some(UniqueLocal),
            ),
            (
                "fe80::",
                "febf:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
                Some(LinkLocal),
            ),
            (
                "ff00::",
                "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
                Some(Multicast),
            ),
        ];
        for (first, last, want) in rows {
            assert_eq!(classify(ip(first)), *want, "{first}");
            assert_eq!(classify(ip(last)), *want, "{last}");
        }
        // Just outside some blocks.
        for outside in [
            "192.0.1.255",
            "198.17.255.255",
            "198.20.0.0",
            "2001:200::",
            "3fff:1000::",
            "5eff::1",
        ] {
            assert_eq!(classify(ip(outside)), None, "{outside}");
        }
        assert_eq!(
            SPECIAL_NETS.v4.len() + SPECIAL_NETS.v6.len(),
            SPECIAL_V4.len() + SPECIAL_V6.len(),
            "every row parses"
        );
    }

    #[test]
    fn a_denial_names_the_registry_row() {
        let p = policy(&["198.18.0.0/15"], &[]);
        let host = UpstreamHost::Ip(ip("198.18.0.7"));
        let denial = p
            .addresses(&host, &["198.18.0.7:443".parse().unwrap()])
            .unwrap_err();
        assert_eq!(denial.label, "benchmarking");
        assert!(
            denial.reason.contains("198.18.0.0/15 Benchmarking"),
            "{}",
            denial.reason
        );
    }

    fn policy(allow: &[&str], private: &[&str]) -> EgressPolicy {
        let mut p = EgressPolicy::default();
        for (i, e) in allow.iter().enumerate() {
            let (t, ports) = parse_entry(e).unwrap();
            p.allow
                .add(t, ports, Arc::new(Rule::new(&format!("t.toml:{i}"), e)));
        }
        for e in private {
            let (t, ports) = parse_entry(e).unwrap();
            p.allow_private
                .add(t, ports, Arc::new(Rule::new("t.toml", e)));
        }
        p
    }

    fn name(s: &str) -> UpstreamHost {
        UpstreamHost::Name(s.into())
    }

    #[test]
    fn hosts_wildcards_cidrs_and_ports() {
        let p = policy(
            &[
                "api.example.com:443",
                "*.example.org",
                "34.120.0.0/16:5432",
                "[2600:1f18::/32]:443",
                "10.1.2.3",
            ],
            &[],
        );
        assert!(p.destination(&name("api.example.com"), 443).is_ok());
        assert!(p.destination(&name("api.example.com"), 80).is_err());
        assert!(p.destination(&name("x.api.example.com"), 443).is_err());
        assert!(p.destination(&name("a.example.org"), 8443).is_ok());
        assert!(p.destination(&name("a.b.example.org"), 1).is_ok());
        assert!(
            p.destination(&name("example.org"), 443).is_err(),
            "never the bare suffix"
        );
        assert!(p.destination(&name("badexample.org"), 443).is_err());
        assert!(p
            .destination(&UpstreamHost::Ip(ip("34.120.9.9")), 5432)
            .is_ok());
        assert!(p
            .destination(&UpstreamHost::Ip(ip("34.121.0.1")), 5432)
            .is_err());
        assert!(p
            .destination(&UpstreamHost::Ip(ip("34.120.9.9")), 5433)
            .is_err());
        assert!(p
            .destination(&UpstreamHost::Ip(ip("2600:1f18:1::1")), 443)
            .is_ok());
        assert!(
            p.destination(&UpstreamHost::Ip(ip("::ffff:10.1.2.3")), 80)
                .is_ok(),
            "mapped form"
        );
        let denied = p.destination(&name("evil.test"), 443).unwrap_err();
        assert_eq!(denied.label, "no_allow_entry");
        let rule = p.destination(&name("a.example.org"), 443).unwrap();
        assert_eq!(rule.reason(), "allowed by t.toml:1 `*.example.org`");
    }

    #[test]
    fn entries_are_normalised_like_url_hosts() {
        for (entry, want) in [
            ("API.Example.COM.", Target::Host("api.example.com".into())),
            (
                "bücher.example",
                Target::Host("xn--bcher-kva.example".into()),
            ),
            ("2130706433", Target::Net("127.0.0.1/32".parse().unwrap())),
            ("0x7f.1", Target::Net("127.0.0.1/32".parse().unwrap())),
            ("0177.0.0.1", Target::Net("127.0.0.1/32".parse().unwrap())),
            (
                "[::ffff:127.0.0.1]",
                Target::Net("127.0.0.1/32".parse().unwrap()),
            ),
            ("*.Example.ORG", Target::Wildcard("example.org".into())),
        ] {
            assert_eq!(parse_entry(entry).unwrap().0, want, "{entry}");
        }
        for bad in [
            "",
            ":443",
            "a:b:c:443x",
            "10.0.0.1/8",
            "*.10.0.0.1",
            "a*.example.com",
            "host:0",
            "host:70000",
            "[::1",
        ] {
            assert!(parse_entry(bad).is_err(), "{bad}");
        }
    }

    fn at(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn every_resolved_address_is_judged_and_mixed_answers_refused() {
        let p = policy(&["*.example.com"], &["127.0.0.1/32:18080", "db.internal"]);
        let host = name("api.example.com");
        assert!(p.addresses(&host, &[at("93.184.216.34:443")]).is_ok());
        let d = p.addresses(&host, &[at("169.254.169.254:80")]).unwrap_err();
        assert_eq!(d.label, "link_local");
        let d = p
            .addresses(&host, &[at("93.184.216.34:443"), at("10.0.0.5:443")])
            .unwrap_err();
        assert_eq!(d.label, "mixed_answers");
        assert!(
            p.addresses(&host, &[at("127.0.0.1:18080")]).is_ok(),
            "allow_private CIDR and port"
        );
        assert_eq!(
            p.addresses(&host, &[at("127.0.0.1:18081")])
                .unwrap_err()
                .label,
            "loopback"
        );
        assert!(
            p.addresses(&name("db.internal"), &[at("10.9.9.9:5432")])
                .is_ok(),
            "allow_private name"
        );
        assert_eq!(
            p.addresses(&host, &[at("[::ffff:127.0.0.1]:18081")])
                .unwrap_err()
                .label,
            "loopback"
        );
    }

    /// Every spelling a URL parser accepts for an IPv4 address names the
    /// same address: decimal, octal and hex parts, one to four of them,
    /// a trailing dot, letter case.
    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn spelled(n: u64, radix: u8, upper: bool) -> String {
            match radix {
                0 => n.to_string(),
                1 => format!("0{n:o}"),
                _ if upper => format!("0X{n:X}"),
                _ => format!("0x{n:x}"),
            }
        }

        proptest! {
            #[test]
            fn every_spelling_of_an_address_names_it(
                ip in any::<u32>(),
                parts in 1..5usize,
                radixes in prop::collection::vec((0..3u8, any::<bool>()), 4),
                dot in any::<bool>(),
            ) {
                let bytes = ip.to_be_bytes();
                // The last part carries the remaining bytes as one number.
                let mut numbers: Vec<u64> = bytes[..parts - 1].iter().map(|&b| u64::from(b)).collect();
                numbers.push(bytes[parts - 1..].iter().fold(0u64, |n, &b| n << 8 | u64::from(b)));
                let mut host = numbers
                    .iter()
                    .zip(&radixes)
                    .map(|(&n, &(radix, upper))| spelled(n, radix, upper))
                    .collect::<Vec<_>>()
                    .join(".");
                if dot {
                    host.push('.');
                }
                let want = ipnet::IpNet::from(IpAddr::V4(std::net::Ipv4Addr::from(ip)));
                prop_assert_eq!(normalize_host(&host), Ok(Target::Net(want)), "{}", host);
            }

            /// Whatever a URL's host is, it is judged without panic.
            #[test]
            fn any_host_is_judged_without_panic(host in "\\PC{0,40}", bracketed in "\\[[0-9a-fA-F:.%]{0,40}\\]") {
                let _ = normalize_host(&host);
                let _ = normalize_host(&bracketed);
            }

            /// An IPv4 address the deny list blocks is blocked in every
            /// IPv6 form that carries it: IPv4-mapped, IPv4-compatible,
            /// NAT64, 6to4, and as a Teredo server or (obfuscated) client.
            #[test]
            fn a_blocked_ipv4_address_is_blocked_in_every_ipv6_form(
                row in any::<prop::sample::Index>(),
                host in any::<u32>(),
                filler in any::<u32>(),
            ) {
                let blocked: Vec<(u32, u32)> = SPECIAL_NETS
                    .v4
                    .iter()
                    .filter(|(_, _, row)| row.blocked.is_some())
                    .map(|(net, mask, _)| (*net, *mask))
                    .collect();
                let (net, mask) = blocked[row.index(blocked.len())];
                let ip = net | (host & !mask);
                let v4 = std::net::Ipv4Addr::from(ip);
                prop_assume!(classify(IpAddr::V4(v4)).is_some());
                let (hi, lo) = ((ip >> 16) as u16, ip as u16);
                let (f_hi, f_lo) = ((filler >> 16) as u16, filler as u16);
                let forms = [
                    v4.to_ipv6_mapped(),
                    Ipv6Addr::new(0, 0, 0, 0, 0, 0, hi, lo),
                    Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, hi, lo),
                    Ipv6Addr::new(0x2002, hi, lo, f_hi, f_lo, 0, 0, 1),
                    Ipv6Addr::new(0x2001, 0, hi, lo, f_hi, f_lo, 0xffff, 0xffff),
                    Ipv6Addr::new(0x2001, 0, 0x0808, 0x0808, f_hi, f_lo, !hi, !lo),
                ];
                for form in forms {
                    prop_assert!(classify(IpAddr::V6(form)).is_some(), "{} carries {}", form, v4);
                }
            }
        }
    }
}
