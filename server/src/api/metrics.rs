//! Per-sandbox metrics over gRPC: one sample, or a sample every N seconds.

use std::time::Duration;

use forkd_api::v1 as api;
use tonic::{Request, Response, Status};

use super::Services;
use super::access::principal;
use crate::core::Error;
use crate::core::sandboxes::Sandbox;
use crate::core::sandboxes::metrics::{Sample, cpu_time_us};

/// The window a single sample measures CPU use over.
const CPU_WINDOW: Duration = Duration::from_millis(250);
const DEFAULT_INTERVAL_SECS: u32 = 5;
const MAX_INTERVAL_SECS: u32 = 3600;

pub type MetricsStream = std::pin::Pin<Box<dyn futures::Stream<Item = Result<api::SandboxMetrics, Status>> + Send>>;

/// Percent of one core used between two CPU times `wall_ms` apart.
fn cpu_percent(before_us: u64, after_us: u64, wall_ms: i64) -> f64 {
    if wall_ms <= 0 {
        return 0.0;
    }
    let pct = after_us.saturating_sub(before_us) as f64 / (wall_ms as f64 * 1000.0) * 100.0;
    (pct * 100.0).round() / 100.0
}

fn to_proto(sb: &Sandbox, vcpus: u32, s: &Sample, cpu_pct: f64) -> api::SandboxMetrics {
    api::SandboxMetrics {
        id: sb.id.to_string(),
        sampled_unix_ms: s.at_ms,
        cpu_time_us: s.host.cpu_time_us,
        cpu_percent: cpu_pct,
        vcpus,
        vmm_rss_bytes: s.host.rss_bytes,
        vmm_pss_bytes: s.host.pss_bytes,
        guest_memory_total_bytes: s.guest.total,
        guest_memory_available_bytes: s.guest.available,
        guest_memory_used_bytes: s.guest.total.saturating_sub(s.guest.available),
        disk_bytes: s.disk_bytes,
        net_rx_bytes: s.host.net_rx_bytes,
        net_tx_bytes: s.host.net_tx_bytes,
        has_nic: s.host.has_nic,
        exec_count: s.host.exec_count,
        last_activity_unix_ms: s.host.last_activity_ms,
    }
}

impl Services {
    fn vcpus_of(&self, sb: &Sandbox) -> u32 {
        let tag = sb.snapshot().snapshot_tag;
        self.rt.store.get_snapshot(tag.as_str()).ok().flatten().map(|s| s.vcpus).unwrap_or(0)
    }

    pub(crate) async fn sandbox_metrics(
        &self,
        r: Request<api::GetSandboxMetricsRequest>,
    ) -> Result<Response<api::SandboxMetrics>, Status> {
        let p = principal(&r);
        let id = self.own_sandbox(&p, &r.get_ref().id).await?;
        let sb = self.rt.sandbox(&id).await?;
        let (t0, cpu0) = (crate::core::now_unix_ms(), cpu_time_us(sb.pid).unwrap_or(0));
        tokio::time::sleep(CPU_WINDOW).await;
        let s = sb.sample().await;
        let pct = cpu_percent(cpu0, s.host.cpu_time_us, s.at_ms - t0);
        Ok(Response::new(to_proto(&sb, self.vcpus_of(&sb), &s, pct)))
    }

    pub(crate) async fn watch_sandbox_metrics(
        &self,
        r: Request<api::WatchSandboxMetricsRequest>,
    ) -> Result<MetricsStream, Status> {
        let p = principal(&r);
        let r = r.into_inner();
        let id = self.own_sandbox(&p, &r.id).await?;
        let interval = match r.interval_secs {
            0 => DEFAULT_INTERVAL_SECS,
            n if n <= MAX_INTERVAL_SECS => n,
            n => return Err(Error::invalid("interval_secs", format!("{n} is not 1-{MAX_INTERVAL_SECS}")).into()),
        };
        let sb = self.rt.sandbox(&id).await?;
        let vcpus = self.vcpus_of(&sb);
        let rt = self.rt.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(interval as u64));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut prev: Option<(i64, u64)> = None;
            loop {
                tick.tick().await;
                // The sandbox ended: so does the stream.
                if rt.sandbox(&id).await.is_err() || sb.ensure_running().is_err() {
                    return;
                }
                let s = sb.sample().await;
                let pct = prev.map(|(at, cpu)| cpu_percent(cpu, s.host.cpu_time_us, s.at_ms - at)).unwrap_or(0.0);
                prev = Some((s.at_ms, s.host.cpu_time_us));
                if tx.send(Ok(to_proto(&sb, vcpus, &s, pct))).await.is_err() {
                    return;
                }
            }
        });
        Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_percent_is_of_one_core() {
        assert_eq!(cpu_percent(0, 500_000, 1000), 50.0);
        assert_eq!(cpu_percent(0, 2_000_000, 1000), 200.0);
        assert_eq!(cpu_percent(10, 5, 1000), 0.0);
        assert_eq!(cpu_percent(0, 5, 0), 0.0);
    }
}
