//! Reinit: turns a restored copy of a template into an individual sandbox —
//! its own clock, entropy, hostname, id and (optionally) network address.

use crate::server::{Agent, error, io_error};
use crate::{log, sys};
use forkd_agent_protocol::v1::{AgentError, NetworkConfig, ReinitDone, ReinitRequest, agent_error::Kind};
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const RUN_DIR: &str = "/run/forkd";

// <linux/random.h>
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

pub fn reinit(agent: &Arc<Agent>, req: ReinitRequest) -> Result<ReinitDone, AgentError> {
    let mut done = ReinitDone::default();
    let mut step = Steps(Instant::now(), &mut done.step_micros);
    if req.unix_nanos > 0 {
        done.clock_step_nanos = set_clock(req.unix_nanos).map_err(|e| io_error("clock_settime", &e))?;
        step.mark("clock");
    }
    if !req.entropy.is_empty() {
        add_entropy(&req.entropy).map_err(|e| io_error("seeding the kernel RNG", &e))?;
        step.mark("entropy");
    }
    if !req.hostname.is_empty() {
        set_hostname(&req.hostname)?;
        step.mark("hostname");
    }
    if !req.sandbox_id.is_empty()
        && let Ok(mut id) = agent.sandbox_id.lock()
    {
        *id = req.sandbox_id.clone();
    }
    // Only after the kernel pool was reseeded: these bytes come from it.
    let mut seed = [0u8; 32];
    if sys::getrandom(&mut seed).is_ok() {
        done.runtime_reseeded = agent.runtime.reseed(&seed);
        step.mark("reseed");
    }
    if let Some(net) = req.network.as_ref().filter(|n| !n.address_cidr.is_empty()) {
        configure_network(net)?;
        step.mark("network");
    }
    crate::limits::apply_pids_max(req.pids_max, agent.runtime.pid())
        .map_err(|e| io_error("setting up the guest pids limit", &e))?;
    step.mark("pids");
    Ok(done)
}

/// Times consecutive steps into a name → microseconds map.
struct Steps<'a>(Instant, &'a mut std::collections::HashMap<String, u32>);

impl Steps<'_> {
    fn mark(&mut self, name: &str) {
        let now = Instant::now();
        let us = now.duration_since(self.0).as_micros().min(u32::MAX as u128) as u32;
        self.1.insert(name.to_string(), us);
        self.0 = now;
    }
}

/// Writes the sandbox id where guest programs can read it. Done after the
/// reply to Reinit: a file write through cold code paths is slow under
/// emulation and nothing in the restore waits on it.
pub fn record_identity(agent: &Arc<Agent>, sandbox_id: &str) {
    if !sandbox_id.is_empty() {
        let _ = write_atomic(&format!("{}/sandbox-id", agent.run_dir), sandbox_id.as_bytes());
    }
}

/// Sets CLOCK_REALTIME; returns how far it moved.
fn set_clock(unix_nanos: i64) -> io::Result<i64> {
    let before = sys::timespec_nanos(&sys::clock(libc::CLOCK_REALTIME));
    let ts = libc::timespec { tv_sec: unix_nanos / 1_000_000_000, tv_nsec: unix_nanos % 1_000_000_000 };
    sys::check(unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) })?;
    Ok((unix_nanos as i128 - before).clamp(i64::MIN as i128, i64::MAX as i128) as i64)
}

/// Mixes host entropy into the pool, crediting it, then forces the CRNG to
/// reseed so the very next read differs from every sibling's.
fn add_entropy(bytes: &[u8]) -> io::Result<()> {
    let f = sys::open("/dev/urandom", libc::O_WRONLY, 0)?;
    let bytes = &bytes[..bytes.len().min(4096)];
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info = Vec::with_capacity(8 + bytes.len() + 3);
    info.extend_from_slice(&((bytes.len() * 8) as i32).to_ne_bytes());
    info.extend_from_slice(&(bytes.len() as i32).to_ne_bytes());
    info.extend_from_slice(bytes);
    info.resize(8 + bytes.len().div_ceil(4) * 4, 0);
    sys::check(unsafe { libc::ioctl(f.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) })?;
    sys::check(unsafe { libc::ioctl(f.as_raw_fd(), RNDRESEEDCRNG) })?;
    Ok(())
}

pub fn set_hostname(name: &str) -> Result<(), AgentError> {
    if name.len() > 64 || name.contains('\0') {
        return Err(error(Kind::Invalid, format!("bad hostname {name:?}")));
    }
    sys::check(unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) })
        .map_err(|e| io_error("sethostname", &e))?;
    // /etc/hostname is left alone: rewriting it would copy /etc up into the
    // overlay on every restore, and the kernel's name is what tools report.
    Ok(())
}

/// Writes a file through a temporary name and a rename.
pub fn write_atomic(path: &str, data: &[u8]) -> io::Result<()> {
    if let Some(parent) = std::path::Path::new(path).parent() {
        std::fs::create_dir_all(parent)?;
    }
    let tmp = format!("{path}.forkd-tmp");
    std::fs::write(&tmp, data)?;
    std::fs::rename(&tmp, path)
}

// ---- network (ioctl based, IPv4) ----

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    data: [u8; 24],
}

impl IfReq {
    fn new(ifname: &str) -> io::Result<IfReq> {
        if ifname.is_empty() || ifname.len() >= libc::IFNAMSIZ {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "bad interface name"));
        }
        let mut r = IfReq { name: [0; libc::IFNAMSIZ], data: [0; 24] };
        r.name[..ifname.len()].copy_from_slice(ifname.as_bytes());
        Ok(r)
    }

    fn set_addr(&mut self, a: Ipv4Addr) {
        self.data = [0; 24];
        self.data[..16].copy_from_slice(&sockaddr_in(a));
    }
}

fn sockaddr_in(a: Ipv4Addr) -> [u8; 16] {
    let mut s = [0u8; 16];
    s[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
    s[4..8].copy_from_slice(&a.octets());
    s
}

fn inet_socket() -> io::Result<OwnedFd> {
    let fd = sys::check(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sets IFF_UP on an interface.
pub fn link_up(ifname: &str) -> io::Result<()> {
    let s = inet_socket()?;
    let mut r = IfReq::new(ifname)?;
    sys::check(unsafe { libc::ioctl(s.as_raw_fd(), libc::SIOCGIFFLAGS, &mut r) })?;
    let flags = i16::from_ne_bytes([r.data[0], r.data[1]]) | libc::IFF_UP as i16;
    r.data[..2].copy_from_slice(&flags.to_ne_bytes());
    sys::check(unsafe { libc::ioctl(s.as_raw_fd(), libc::SIOCSIFFLAGS, &r) })?;
    Ok(())
}

/// Parses "a.b.c.d/len".
pub fn parse_cidr(s: &str) -> Option<(Ipv4Addr, Ipv4Addr)> {
    let (addr, len) = s.split_once('/').unwrap_or((s, "32"));
    let addr: Ipv4Addr = addr.trim().parse().ok()?;
    let len: u32 = len.trim().parse().ok().filter(|l| *l <= 32)?;
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    Some((addr, Ipv4Addr::from(mask)))
}

fn configure_network(net: &NetworkConfig) -> Result<(), AgentError> {
    let ifname = if net.interface.is_empty() { "eth0" } else { net.interface.as_str() };
    let (addr, mask) = parse_cidr(&net.address_cidr)
        .ok_or_else(|| error(Kind::Invalid, format!("bad address {:?}", net.address_cidr)))?;
    let deadline = Instant::now() + Duration::from_secs(2);
    while !std::path::Path::new(&format!("/sys/class/net/{ifname}")).exists() {
        if Instant::now() >= deadline {
            return Err(error(Kind::NotFound, format!("no network interface {ifname}")));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let net_err = |what: &str, e: io::Error| io_error(&format!("{what} on {ifname}"), &e);
    let s = inet_socket().map_err(|e| net_err("socket", e))?;
    let mut r = IfReq::new(ifname).map_err(|e| net_err("interface", e))?;
    r.set_addr(addr);
    sys::check(unsafe { libc::ioctl(s.as_raw_fd(), libc::SIOCSIFADDR, &r) }).map_err(|e| net_err("address", e))?;
    r.set_addr(mask);
    sys::check(unsafe { libc::ioctl(s.as_raw_fd(), libc::SIOCSIFNETMASK, &r) }).map_err(|e| net_err("netmask", e))?;
    link_up(ifname).map_err(|e| net_err("link up", e))?;
    if !net.gateway.is_empty() {
        let gw: Ipv4Addr =
            net.gateway.parse().map_err(|_| error(Kind::Invalid, format!("bad gateway {:?}", net.gateway)))?;
        let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
        let any = sockaddr_in(Ipv4Addr::UNSPECIFIED);
        let gwa = sockaddr_in(gw);
        unsafe {
            std::ptr::copy_nonoverlapping(any.as_ptr(), (&mut rt.rt_dst as *mut libc::sockaddr).cast(), 16);
            std::ptr::copy_nonoverlapping(any.as_ptr(), (&mut rt.rt_genmask as *mut libc::sockaddr).cast(), 16);
            std::ptr::copy_nonoverlapping(gwa.as_ptr(), (&mut rt.rt_gateway as *mut libc::sockaddr).cast(), 16);
        }
        rt.rt_flags = (libc::RTF_UP | libc::RTF_GATEWAY) as libc::c_ushort;
        let r = unsafe { libc::ioctl(s.as_raw_fd(), libc::SIOCADDRT, &rt) };
        if let Err(e) = sys::check(r) {
            // A restored template may already have the route.
            if e.raw_os_error() != Some(libc::EEXIST) {
                return Err(net_err("default route", e));
            }
        }
    }
    if !net.nameservers.is_empty() {
        let conf: String = net.nameservers.iter().map(|n| format!("nameserver {n}\n")).collect();
        write_atomic("/etc/resolv.conf", conf.as_bytes()).map_err(|e| io_error("/etc/resolv.conf", &e))?;
    }
    log::info(&format!("network {ifname} {}", net.address_cidr));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr() {
        assert_eq!(parse_cidr("10.0.0.2/24"), Some(("10.0.0.2".parse().unwrap(), "255.255.255.0".parse().unwrap())));
        assert_eq!(parse_cidr("10.0.0.2"), Some(("10.0.0.2".parse().unwrap(), Ipv4Addr::BROADCAST)));
        assert_eq!(parse_cidr("10.0.0.2/0").unwrap().1, Ipv4Addr::UNSPECIFIED);
        assert_eq!(parse_cidr("10.0.0.2/33"), None);
        assert_eq!(parse_cidr("nope/8"), None);
    }
}
