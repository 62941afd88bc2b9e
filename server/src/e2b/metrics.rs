//! `get_metrics` for E2B sandboxes: one sample taken when asked, read from
//! the guest itself — CPU use over a quarter of a second (/proc/stat),
//! memory (/proc/meminfo) and the root file system (statfs, through
//! coreutils' `stat -f`). forkd keeps no history, so the start/end window
//! the SDK may pass does not matter.

use std::time::Duration;

use forkd_agent_protocol::v1 as pb;
use serde_json::{Value, json};
use tonic::Status;

use crate::agent::ExecEvent;
use crate::core::Error;
use crate::core::sandboxes::Sandbox;

const READ: Duration = Duration::from_secs(10);
const CPU_WINDOW: Duration = Duration::from_millis(250);

async fn read(sb: &Sandbox, path: &str) -> Result<String, Status> {
    let req = pb::ReadFileRequest { path: path.into(), offset: 0, length: 64 * 1024 };
    let d = sb.agent.read_file(req, READ).await.map_err(Error::from)?;
    Ok(String::from_utf8_lossy(&d.data).into_owned())
}

/// (busy, total) jiffies of all CPUs, from /proc/stat's first line.
pub fn cpu_times(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<u64> = line.split_whitespace().filter_map(|x| x.parse().ok()).collect();
    if v.len() < 4 {
        return None;
    }
    let total: u64 = v.iter().take(8).sum();
    // idle + iowait are not busy.
    let idle = v[3] + v.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

/// A /proc/meminfo field in bytes.
pub use crate::core::sandboxes::metrics::kib_field as meminfo;

/// (total, used) bytes of the guest's root file system.
async fn disk(sb: &Sandbox) -> (u64, u64) {
    let req = pb::ExecRequest {
        args: ["stat", "-f", "-c", "%b %f %S", "/"].map(String::from).to_vec(),
        timeout_ms: 5000,
        ..Default::default()
    };
    let Ok(mut stream) = sb.agent.exec(req).await else { return (0, 0) };
    let mut out = Vec::new();
    while let Ok(Some(ev)) = stream.next().await {
        if let ExecEvent::Stdout(d) = ev {
            out.extend_from_slice(&d);
        }
    }
    let v: Vec<u64> = String::from_utf8_lossy(&out).split_whitespace().filter_map(|x| x.parse().ok()).collect();
    match v.as_slice() {
        [blocks, free, size] => (blocks * size, blocks.saturating_sub(*free) * size),
        _ => (0, 0),
    }
}

/// One sample in E2B's shape.
pub async fn sample(sb: &Sandbox, cpus: u32) -> Result<Value, Status> {
    let a = cpu_times(&read(sb, "/proc/stat").await?);
    tokio::time::sleep(CPU_WINDOW).await;
    let b = cpu_times(&read(sb, "/proc/stat").await?);
    let pct = match (a, b) {
        (Some((busy1, total1)), Some((busy2, total2))) if total2 > total1 => {
            (busy2.saturating_sub(busy1)) as f64 * 100.0 / (total2 - total1) as f64
        }
        _ => 0.0,
    };
    let mem = read(sb, "/proc/meminfo").await?;
    let total = meminfo(&mem, "MemTotal");
    let used = total.saturating_sub(meminfo(&mem, "MemAvailable"));
    let cache = meminfo(&mem, "Cached");
    let (disk_total, disk_used) = disk(sb).await;
    let now = time::OffsetDateTime::now_utc();
    Ok(json!({
        "timestamp": now.format(&time::format_description::well_known::Rfc3339).unwrap_or_default(),
        "timestampUnix": now.unix_timestamp(),
        "cpuCount": cpus,
        "cpuUsedPct": (pct * 100.0).round() / 100.0,
        "memUsed": used,
        "memTotal": total,
        "memCache": cache,
        "diskUsed": disk_used,
        "diskTotal": disk_total,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_files_parse() {
        let stat = "cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 1 2 3 4\n";
        assert_eq!(cpu_times(stat), Some((150, 1000)));
        let mem = "MemTotal:        1000 kB\nMemFree:          100 kB\nMemAvailable:     600 kB\nCached:   20 kB\n";
        assert_eq!(meminfo(mem, "MemTotal"), 1_024_000);
        assert_eq!(meminfo(mem, "MemAvailable"), 614_400);
        assert_eq!(meminfo(mem, "Nope"), 0);
    }
}
