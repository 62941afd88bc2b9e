//! Sandbox networking for `network: "nat"`: a network namespace per
//! sandbox, a tap in it for the VM's NIC, a veth pair to the host, and an
//! nftables ruleset in the namespace that denies all egress except the
//! allow-list. Everything is created before the guest runs and removed with
//! the sandbox; names are derived from the sandbox id so the reconciler can
//! find leftovers (`forkd-*` namespaces, `fkh*` links).
//!
//! Egress is the tenant's allow-list intersected with the operator's
//! deny-list: deny rules (`--egress-deny`, plus [`BUILTIN_DENY`], the
//! daemon's bind address and the host's own addresses) come first in the
//! forward chain, so a deny always wins over an allow that overlaps it; an
//! allow entry wholly inside a denied range is refused at request time.
//!
//! Forwarding: the namespace forwards (its own `ip_forward`), and so must
//! the host, between the sandbox's veth and the link towards an allowed
//! peer. IPv4 forwarding is decided by the *ingress* interface, so
//! per-interface forwarding would have to be enabled on the veth (easy)
//! and on every host link that replies come back on (whichever routes the
//! allow-list, per destination, changing with the routing table) — that
//! cannot be set up safely per sandbox, so the host-wide `ip_forward` is
//! kept. Containment does not depend on it: everything a guest sends
//! crosses its namespace's forward chain, which is default-deny.
//!
//! Addressing uses the benchmarking range 198.18.0.0/15 (never routed on the
//! Internet, not a private LAN range): per sandbox slot `i`, the guest link
//! is 198.18.0.0/16 + 4i (.1 tap, .2 guest) and the host link is
//! 198.19.128.0/17 + 4i (.1 host, .2 namespace).

use std::net::Ipv4Addr;
use std::process::Command;

use forkd_api::names::SandboxId;

/// Slots available (limited by the /17 of host links).
pub const MAX_SLOTS: u32 = 8192;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("invalid allow: {0}")]
    Allow(String),
    #[error("invalid deny entry: {0}")]
    Deny(String),
    #[error("{cmd}: {msg}")]
    Command { cmd: String, msg: String },
}

/// One allow-list entry: `CIDR[:port]` (port = TCP and UDP).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowRule {
    pub addr: Ipv4Addr,
    pub prefix: u8,
    pub port: Option<u16>,
}

impl AllowRule {
    pub fn parse(s: &str) -> Result<Self, NetError> {
        let bad = |why: &str| NetError::Allow(format!("{s:?}: {why} (use A.B.C.D[/N][:PORT])"));
        let (net, port) = match s.rsplit_once(':') {
            Some((n, p)) => (n, Some(p.parse::<u16>().map_err(|_| bad("bad port"))?)),
            None => (s, None),
        };
        if port == Some(0) {
            return Err(bad("port 0"));
        }
        let (addr, prefix) = match net.split_once('/') {
            Some((a, p)) => (a, p.parse::<u8>().map_err(|_| bad("bad prefix"))?),
            None => (net, 32),
        };
        if prefix > 32 {
            return Err(bad("prefix above 32"));
        }
        let addr: Ipv4Addr = addr.parse().map_err(|_| bad("not an IPv4 address"))?;
        let mask = if prefix == 0 { 0 } else { u32::MAX << (32 - prefix) };
        Ok(AllowRule { addr: Ipv4Addr::from(u32::from(addr) & mask), prefix, port })
    }

    fn nft(&self, iif: &str) -> String {
        let daddr = format!("{}/{}", self.addr, self.prefix);
        match self.port {
            None => format!("iifname \"{iif}\" ip daddr {daddr} accept"),
            Some(p) => format!("iifname \"{iif}\" ip daddr {daddr} meta l4proto {{ tcp, udp }} th dport {p} accept"),
        }
    }
}

impl AllowRule {
    fn mask(&self) -> u32 {
        if self.prefix == 0 { 0 } else { u32::MAX << (32 - self.prefix) }
    }

    /// Whether every address and port `other` matches is matched by `self`.
    pub fn covers(&self, other: &AllowRule) -> bool {
        self.prefix <= other.prefix
            && u32::from(other.addr) & self.mask() == u32::from(self.addr)
            && (self.port.is_none() || self.port == other.port)
    }

    fn nft_deny(&self, iif: &str) -> String {
        let daddr = format!("{}/{}", self.addr, self.prefix);
        match self.port {
            None => format!("iifname \"{iif}\" ip daddr {daddr} counter drop"),
            Some(p) => {
                format!("iifname \"{iif}\" ip daddr {daddr} meta l4proto {{ tcp, udp }} th dport {p} counter drop")
            }
        }
    }
}

impl std::fmt::Display for AllowRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)?;
        if let Some(p) = self.port {
            write!(f, ":{p}")?;
        }
        Ok(())
    }
}

/// Egress every "nat" sandbox is denied whatever the operator adds:
/// loopback, link-local (cloud metadata services live at 169.254.169.254),
/// "this network", and the links of all sandboxes (guest links, host links).
pub const BUILTIN_DENY: &[&str] = &["0.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "198.18.0.0/16", "198.19.128.0/17"];

/// The operator's deny-list: `list` (CIDR[:PORT] each), the built-in
/// entries and the daemon's own bind address. The host's addresses are
/// added at each use ([`effective_deny`]): they change.
pub fn parse_deny(list: &[String], bind: std::net::SocketAddr) -> Result<Vec<AllowRule>, NetError> {
    let mut out = vec![];
    for s in list.iter().map(|s| s.trim()).filter(|s| !s.is_empty()) {
        out.push(AllowRule::parse(s).map_err(|e| match e {
            NetError::Allow(m) => NetError::Deny(m),
            other => other,
        })?);
    }
    for s in BUILTIN_DENY {
        out.push(AllowRule::parse(s).expect("built-in deny entries parse"));
    }
    if let std::net::IpAddr::V4(a) = bind.ip()
        && !a.is_unspecified()
    {
        out.push(AllowRule { addr: a, prefix: 32, port: None });
    }
    Ok(out)
}

/// The IPv4 addresses of the host's interfaces now.
pub fn host_addresses() -> Vec<Ipv4Addr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else { return vec![] };
    let mut out: Vec<Ipv4Addr> = addrs.filter_map(|i| i.address?.as_sockaddr_in().map(|a| a.ip())).collect();
    out.sort();
    out.dedup();
    out
}

/// The deny-list in force: the operator's entries plus each host address,
/// without entries another one already covers.
pub fn effective_deny(operator: &[AllowRule], host: &[Ipv4Addr]) -> Vec<AllowRule> {
    let mut all: Vec<AllowRule> = operator.to_vec();
    all.extend(host.iter().map(|a| AllowRule { addr: *a, prefix: 32, port: None }));
    let mut out: Vec<AllowRule> = vec![];
    for (i, r) in all.iter().enumerate() {
        let covered = all.iter().enumerate().any(|(j, o)| j != i && o.covers(r) && (!r.covers(o) || j < i));
        if !covered {
            out.push(r.clone());
        }
    }
    out
}

/// INVALID_ARGUMENT (naming `allow`) for an allow entry that lies wholly
/// inside a denied range: it could never match anything. Entries that only
/// overlap a denied range are kept; the deny rules win in the ruleset.
pub fn check_allow(allow: &[AllowRule], deny: &[AllowRule]) -> Result<(), NetError> {
    for a in allow {
        if let Some(d) = deny.iter().find(|d| d.covers(a)) {
            return Err(NetError::Allow(format!(
                "{a} lies inside {d}, which the operator denies to every sandbox (--egress-deny, the host's own \
                 addresses, loopback, link-local and sandbox links)"
            )));
        }
    }
    Ok(())
}

pub fn parse_allow(list: &[String]) -> Result<Vec<AllowRule>, NetError> {
    if list.len() > 256 {
        return Err(NetError::Allow(format!("{} entries, at most 256", list.len())));
    }
    list.iter().map(|s| AllowRule::parse(s)).collect()
}

/// What a sandbox's network looks like once set up.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SandboxNet {
    pub slot: u32,
    pub netns: String,
    pub tap: String,
    pub host_link: String,
    pub guest_cidr: String,
    pub gateway: String,
}

pub fn netns_name(id: &SandboxId) -> String {
    format!("forkd-{}", &id.as_str()[3..])
}

pub fn host_link_name(id: &SandboxId) -> String {
    // Interface names are at most 15 bytes.
    let short: String = id.as_str()[3..].chars().take(12).collect();
    format!("fkh{short}")
}

fn addr(base: [u8; 4], slot: u32, host: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::from(base)) + slot * 4 + host)
}

fn run(args: &[&str]) -> Result<(), NetError> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| NetError::Command { cmd: args.join(" "), msg: e.to_string() })?;
    if !out.status.success() {
        return Err(NetError::Command {
            cmd: args.join(" "),
            msg: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

fn run_input(args: &[&str], input: &str) -> Result<(), NetError> {
    use std::io::Write;
    let mut child = Command::new(args[0])
        .args(&args[1..])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| NetError::Command { cmd: args.join(" "), msg: e.to_string() })?;
    child.stdin.take().expect("piped").write_all(input.as_bytes()).ok();
    let out = child.wait_with_output().map_err(|e| NetError::Command { cmd: args.join(" "), msg: e.to_string() })?;
    if !out.status.success() {
        return Err(NetError::Command {
            cmd: args.join(" "),
            msg: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// The nftables ruleset of a sandbox namespace: forward is default-deny;
/// the deny-list comes first (a deny wins over any allow; each counts what
/// it dropped), then replies and
/// the allow-list; traffic leaving for the host is masqueraded so the host
/// needs no route to guest links.
pub fn ruleset(allow: &[AllowRule], deny: &[AllowRule], tap: &str, uplink: &str) -> String {
    let mut rules: Vec<String> = deny.iter().map(|r| format!("    {}", r.nft_deny(tap))).collect();
    rules.push("    ct state established,related accept".into());
    rules.extend(allow.iter().map(|r| format!("    {}", r.nft(tap))));
    format!(
        "table inet forkd {{\n  chain forward {{\n    type filter hook forward priority 0; policy drop;\n{}\n  }}\n  chain input {{\n    type filter hook input priority 0; policy drop;\n    ct state established,related accept\n    iifname \"lo\" accept\n  }}\n}}\ntable ip forkd_nat {{\n  chain postrouting {{\n    type nat hook postrouting priority 100;\n    oifname \"{uplink}\" masquerade\n  }}\n}}\n",
        rules.join("\n")
    )
}

/// Creates the namespace, links and rules for sandbox `id` in `slot`.
/// On failure everything created so far is removed.
pub fn setup(id: &SandboxId, slot: u32, allow: &[AllowRule], deny: &[AllowRule]) -> Result<SandboxNet, NetError> {
    let net = SandboxNet {
        slot,
        netns: netns_name(id),
        tap: "tap0".into(),
        host_link: host_link_name(id),
        guest_cidr: format!("{}/30", addr([198, 18, 0, 0], slot, 2)),
        gateway: addr([198, 18, 0, 0], slot, 1).to_string(),
    };
    let result = (|| {
        let ns = net.netns.as_str();
        let inner = "uplink";
        run(&["ip", "netns", "add", ns])?;
        run(&["ip", "link", "add", &net.host_link, "type", "veth", "peer", "name", inner, "netns", ns])?;
        run(&["ip", "addr", "add", &format!("{}/30", addr([198, 19, 128, 0], slot, 1)), "dev", &net.host_link])?;
        run(&["ip", "link", "set", &net.host_link, "up"])?;
        let e = |args: &[&str]| {
            let mut v = vec!["ip", "netns", "exec", ns];
            v.extend_from_slice(args);
            run(&v)
        };
        e(&["ip", "link", "set", "lo", "up"])?;
        e(&["ip", "addr", "add", &format!("{}/30", addr([198, 19, 128, 0], slot, 2)), "dev", inner])?;
        e(&["ip", "link", "set", inner, "up"])?;
        e(&["ip", "route", "add", "default", "via", &addr([198, 19, 128, 0], slot, 1).to_string()])?;
        e(&["ip", "tuntap", "add", &net.tap, "mode", "tap"])?;
        e(&["ip", "addr", "add", &format!("{}/30", net.gateway), "dev", &net.tap])?;
        e(&["ip", "link", "set", &net.tap, "up"])?;
        e(&["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])?;
        apply_rules(&net, allow, deny)?;
        // The host routes between sandbox namespaces and other links.
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")
            .map_err(|e| NetError::Command { cmd: "enable ip_forward".into(), msg: e.to_string() })?;
        Ok(())
    })();
    match result {
        Ok(()) => Ok(net),
        Err(e) => {
            teardown(&net.netns, &net.host_link);
            Err(e)
        }
    }
}

/// Replaces the egress rules of `net`'s namespace, in one transaction:
/// the old rules stay in force until the new ones are in.
pub fn apply_rules(net: &SandboxNet, allow: &[AllowRule], deny: &[AllowRule]) -> Result<(), NetError> {
    let rules = format!("flush ruleset\n{}", ruleset(allow, deny, &net.tap, "uplink"));
    run_input(&["ip", "netns", "exec", &net.netns, "nft", "-f", "-"], &rules)
}

/// Removes a sandbox's namespace (its tap and rules go with it) and the
/// host end of its veth. Idempotent.
pub fn teardown(netns: &str, host_link: &str) {
    let _ = run(&["ip", "link", "del", host_link]);
    let _ = run(&["ip", "netns", "del", netns]);
}

/// Opens the namespace so a VMM can be started inside it.
pub fn netns_path(netns: &str) -> std::path::PathBuf {
    std::path::PathBuf::from("/var/run/netns").join(netns)
}

/// forkd-named namespaces on the host.
pub fn list_forkd_netns() -> Vec<String> {
    std::fs::read_dir("/var/run/netns")
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("forkd-"))
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_rules() {
        let r = AllowRule::parse("198.19.0.2").unwrap();
        assert_eq!((r.prefix, r.port), (32, None));
        let r = AllowRule::parse("10.1.2.3/8:443").unwrap();
        assert_eq!(r.addr, Ipv4Addr::new(10, 0, 0, 0));
        assert_eq!(r.port, Some(443));
        for bad in ["", "1.2.3", "1.2.3.4/33", "1.2.3.4:0", "1.2.3.4:99999", "x/8", "1.2.3.4/8:http", "::1"] {
            assert!(AllowRule::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ruleset_denies_by_default() {
        let rs = ruleset(&[AllowRule::parse("198.19.0.2:8080").unwrap()], &[], "tap0", "uplink");
        assert!(rs.contains("policy drop"));
        assert!(rs.contains("ip daddr 198.19.0.2/32 meta l4proto { tcp, udp } th dport 8080 accept"));
        assert!(rs.contains("masquerade"));
    }

    fn rules(list: &[&str]) -> Vec<AllowRule> {
        list.iter().map(|s| AllowRule::parse(s).unwrap()).collect()
    }

    fn deny_for_test() -> Vec<AllowRule> {
        let op = parse_deny(&["10.0.0.0/8".into(), "192.0.2.7:22".into()], "127.0.0.1:8889".parse().unwrap()).unwrap();
        effective_deny(&op, &[Ipv4Addr::new(192, 0, 2, 1), Ipv4Addr::new(127, 0, 0, 1), Ipv4Addr::new(198, 19, 128, 1)])
    }

    #[test]
    fn deny_rules_come_before_every_accept() {
        let allow = rules(&["0.0.0.0/0:443", "198.19.0.2"]);
        let rs = ruleset(&allow, &deny_for_test(), "tap0", "uplink");
        let forward: Vec<&str> =
            rs.lines().skip_while(|l| !l.contains("chain forward")).take_while(|l| l.trim() != "}").collect();
        let first_accept = forward.iter().position(|l| l.ends_with("accept")).unwrap();
        let last_drop = forward.iter().rposition(|l| l.ends_with(" drop")).unwrap();
        assert!(last_drop < first_accept, "{rs}");
        for d in [
            "iifname \"tap0\" ip daddr 169.254.0.0/16 counter drop",
            "iifname \"tap0\" ip daddr 127.0.0.0/8 counter drop",
            "iifname \"tap0\" ip daddr 10.0.0.0/8 counter drop",
            "iifname \"tap0\" ip daddr 192.0.2.1/32 counter drop",
            "iifname \"tap0\" ip daddr 198.18.0.0/16 counter drop",
            "iifname \"tap0\" ip daddr 198.19.128.0/17 counter drop",
            "iifname \"tap0\" ip daddr 192.0.2.7/32 meta l4proto { tcp, udp } th dport 22 counter drop",
        ] {
            assert!(forward.iter().any(|l| l.trim() == d), "missing {d:?} in\n{rs}");
        }
        assert!(rs.contains("ip daddr 0.0.0.0/0 meta l4proto { tcp, udp } th dport 443 accept"));
    }

    #[test]
    fn covered_deny_entries_are_dropped() {
        let d = deny_for_test();
        let shown: Vec<String> = d.iter().map(|r| r.to_string()).collect();
        // 127.0.0.1 (host and bind) is inside 127.0.0.0/8, the host's veth
        // address inside the sandbox links.
        assert!(!shown.contains(&"127.0.0.1/32".to_string()), "{shown:?}");
        assert!(!shown.contains(&"198.19.128.1/32".to_string()), "{shown:?}");
        assert!(shown.contains(&"192.0.2.1/32".to_string()), "{shown:?}");
        // Duplicates keep one copy.
        let twice = effective_deny(&rules(&["10.0.0.0/8", "10.0.0.0/8"]), &[]);
        assert_eq!(twice.len(), 1);
    }

    #[test]
    fn allow_inside_a_deny_is_refused_overlap_is_not() {
        let d = deny_for_test();
        for inside in [
            "169.254.169.254",
            "169.254.169.254/32:80",
            "127.0.0.1:8889",
            "10.1.0.0/16",
            "192.0.2.1:80",
            "192.0.2.7:22",
        ] {
            let e = check_allow(&rules(&[inside]), &d).unwrap_err().to_string();
            assert!(e.starts_with("invalid allow:"), "{e}");
            assert!(e.contains("lies inside"), "{e}");
        }
        // Overlapping only: accepted, the deny rules still drop the overlap.
        for partial in ["0.0.0.0/0", "169.0.0.0/8", "192.0.2.0/24", "192.0.2.7", "192.0.2.7:80", "198.19.0.2"] {
            assert!(check_allow(&rules(&[partial]), &d).is_ok(), "{partial}");
        }
    }

    #[test]
    fn the_host_has_addresses() {
        assert!(host_addresses().contains(&Ipv4Addr::LOCALHOST));
    }

    #[test]
    fn deny_entries_parse_and_bind_is_added() {
        let d = parse_deny(&["203.0.113.0/24".into()], "192.0.2.9:8889".parse().unwrap()).unwrap();
        assert!(d.iter().any(|r| r.to_string() == "203.0.113.0/24"));
        assert!(d.iter().any(|r| r.to_string() == "192.0.2.9/32"));
        let any = parse_deny(&[], "0.0.0.0:8889".parse().unwrap()).unwrap();
        assert_eq!(any.len(), BUILTIN_DENY.len(), "an unspecified bind adds nothing (host addresses cover it)");
        assert!(parse_deny(&["nope".into()], "127.0.0.1:1".parse().unwrap()).is_err());
    }

    #[test]
    fn slots_do_not_overlap() {
        assert_eq!(addr([198, 18, 0, 0], 0, 2), Ipv4Addr::new(198, 18, 0, 2));
        assert_eq!(addr([198, 18, 0, 0], 1, 1), Ipv4Addr::new(198, 18, 0, 5));
        assert_eq!(addr([198, 19, 128, 0], MAX_SLOTS - 1, 2), Ipv4Addr::new(198, 19, 255, 254));
    }
}
