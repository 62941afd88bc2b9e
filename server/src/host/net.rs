//! Sandbox networking for `network: "nat"`: a network namespace per
//! sandbox, a tap in it for the VM's NIC, a veth pair to the host, and an
//! nftables ruleset in the namespace that denies all egress except the
//! allow-list. Everything is created before the guest runs and removed with
//! the sandbox; names are derived from the sandbox id so the reconciler can
//! find leftovers (`forkd-*` namespaces, `fkh*` links).
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

/// The nftables ruleset of a sandbox namespace: forward is default-deny
/// except replies and the allow-list; traffic leaving for the host is
/// masqueraded so the host needs no route to guest links.
pub fn ruleset(allow: &[AllowRule], tap: &str, uplink: &str) -> String {
    let rules: Vec<String> = allow.iter().map(|r| format!("    {}", r.nft(tap))).collect();
    format!(
        "table inet forkd {{\n  chain forward {{\n    type filter hook forward priority 0; policy drop;\n    ct state established,related accept\n{}\n  }}\n  chain input {{\n    type filter hook input priority 0; policy drop;\n    ct state established,related accept\n    iifname \"lo\" accept\n  }}\n}}\ntable ip forkd_nat {{\n  chain postrouting {{\n    type nat hook postrouting priority 100;\n    oifname \"{uplink}\" masquerade\n  }}\n}}\n",
        rules.join("\n")
    )
}

/// Creates the namespace, links and rules for sandbox `id` in `slot`.
/// On failure everything created so far is removed.
pub fn setup(id: &SandboxId, slot: u32, allow: &[AllowRule]) -> Result<SandboxNet, NetError> {
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
        run_input(&["ip", "netns", "exec", ns, "nft", "-f", "-"], &ruleset(allow, &net.tap, inner))?;
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
        let rs = ruleset(&[AllowRule::parse("198.19.0.2:8080").unwrap()], "tap0", "uplink");
        assert!(rs.contains("policy drop"));
        assert!(rs.contains("ip daddr 198.19.0.2/32 meta l4proto { tcp, udp } th dport 8080 accept"));
        assert!(rs.contains("masquerade"));
    }

    #[test]
    fn slots_do_not_overlap() {
        assert_eq!(addr([198, 18, 0, 0], 0, 2), Ipv4Addr::new(198, 18, 0, 2));
        assert_eq!(addr([198, 18, 0, 0], 1, 1), Ipv4Addr::new(198, 18, 0, 5));
        assert_eq!(addr([198, 19, 128, 0], MAX_SLOTS - 1, 2), Ipv4Addr::new(198, 19, 255, 254));
    }
}
