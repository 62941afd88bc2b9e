//! Per-sandbox resource figures: what the host sees of its VMM (CPU time,
//! RSS, PSS, its work dir's disk, its NIC's bytes) and what the guest
//! reports of its own memory. Host figures are cheap reads of /proc and
//! never wait on the guest; the guest's are asked of the agent with a short
//! deadline and left at zero when it does not answer.

use std::time::Duration;

use forkd_agent_protocol::v1 as pb;

use super::Sandbox;

/// How long the guest may take to report its memory.
const GUEST_READ: Duration = Duration::from_secs(2);

/// What the host sees of one sandbox.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HostSample {
    pub cpu_time_us: u64,
    pub rss_bytes: u64,
    pub pss_bytes: u64,
    pub net_rx_bytes: u64,
    pub net_tx_bytes: u64,
    pub has_nic: bool,
    pub exec_count: u64,
    pub last_activity_ms: i64,
}

/// The guest's view of its memory.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GuestMemory {
    pub total: u64,
    pub available: u64,
}

/// One full sample.
#[derive(Debug, Clone, Default)]
pub struct Sample {
    pub at_ms: i64,
    pub host: HostSample,
    pub guest: GuestMemory,
    pub disk_bytes: u64,
}

/// User + system CPU time of a process (all its threads), in µs.
pub fn cpu_time_us(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: count from the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ") " field 3 (state) is index 0: utime is field 14, stime 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some((utime + stime) * 1_000_000 / ticks)
}

/// (RSS, PSS) of a process in bytes, from smaps_rollup.
pub fn rss_pss(pid: u32) -> (u64, u64) {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")) else { return (0, 0) };
    (kib_field(&text, "Rss"), kib_field(&text, "Pss"))
}

/// A `Key:   N kB` field (as in /proc/meminfo and smaps) in bytes; 0 when absent.
pub fn kib_field(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .unwrap_or(0)
}

/// (received, sent) bytes of `iface` in /proc/net/dev text, as the
/// interface counts them.
pub fn net_dev(text: &str, iface: &str) -> Option<(u64, u64)> {
    let line = text.lines().find_map(|l| l.trim_start().strip_prefix(iface)?.strip_prefix(':'))?;
    let v: Vec<u64> = line.split_whitespace().filter_map(|x| x.parse().ok()).collect();
    Some((*v.first()?, *v.get(8)?))
}

impl Sandbox {
    /// What the host sees now (no guest round trip, no disk walk).
    pub fn host_sample(&self) -> HostSample {
        let (rss, pss) = rss_pss(self.pid);
        let tap = self.record.lock().unwrap().net.as_ref().map(|n| n.tap.clone());
        // The tap lives in the VMM's network namespace, which
        // /proc/PID/net/dev shows. What the tap receives the guest sent.
        let net = tap.as_deref().and_then(|t| {
            let text = std::fs::read_to_string(format!("/proc/{}/net/dev", self.pid)).ok()?;
            net_dev(&text, t)
        });
        HostSample {
            cpu_time_us: cpu_time_us(self.pid).unwrap_or(0),
            rss_bytes: rss,
            pss_bytes: pss,
            net_rx_bytes: net.map(|(_, tx)| tx).unwrap_or(0),
            net_tx_bytes: net.map(|(rx, _)| rx).unwrap_or(0),
            has_nic: tap.is_some(),
            exec_count: self.agent.commands(),
            last_activity_ms: self.last_active_ms(),
        }
    }

    /// The guest's memory as it reports it (zeros when it does not answer).
    pub async fn guest_memory(&self) -> GuestMemory {
        let req = pb::ReadFileRequest { path: "/proc/meminfo".into(), offset: 0, length: 64 * 1024 };
        match self.agent.read_file(req, GUEST_READ).await {
            Ok(d) => {
                let text = String::from_utf8_lossy(&d.data);
                GuestMemory { total: kib_field(&text, "MemTotal"), available: kib_field(&text, "MemAvailable") }
            }
            Err(_) => GuestMemory::default(),
        }
    }

    /// A full sample: host figures, the guest's memory and the work dir's disk.
    /// `at_ms` is when the host figures were read (first: the guest may
    /// take its time to answer).
    pub async fn sample(&self) -> Sample {
        let (at_ms, host) = (crate::core::now_unix_ms(), self.host_sample());
        let dir = self.dir.0.clone();
        let disk = tokio::task::spawn_blocking(move || crate::memory::layout::disk_usage(&dir));
        let guest = self.guest_memory().await;
        Sample { at_ms, host, guest, disk_bytes: disk.await.unwrap_or(0) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_files_parse() {
        let mem = "MemTotal:        1000 kB\nMemAvailable:     600 kB\n";
        assert_eq!(kib_field(mem, "MemTotal"), 1_024_000);
        assert_eq!(kib_field(mem, "Nope"), 0);
        let dev = "Inter-|   Receive\n face |bytes packets\n  fkt0: 1234 5 0 0 0 0 0 0 5678 6 0 0 0 0 0 0\n    lo: 1 1 0 0 0 0 0 0 1 1 0 0 0 0 0 0\n";
        assert_eq!(net_dev(dev, "fkt0"), Some((1234, 5678)));
        assert_eq!(net_dev(dev, "eth9"), None);
        let me = std::process::id();
        assert!(cpu_time_us(me).is_some());
        let (rss, pss) = rss_pss(me);
        assert!(rss > 0 && pss > 0);
    }
}
