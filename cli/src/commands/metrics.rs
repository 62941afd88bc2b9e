//! Sandboxes' resource use: `metrics` (one sample of one sandbox) and
//! `top` (a live table of many).

use std::io::IsTerminal;
use std::time::Duration;

use forkd_api::v1::{GetSandboxMetricsRequest, SandboxMetrics};
use futures::stream::{self, StreamExt};
use serde_json::{Value, json};

use crate::args::{IdArg, TopArgs};
use crate::client::Conn;
use crate::output::{emit, emit_json, human_bytes, key_values, now_unix};

/// Samples taken at once by `top`.
const CONCURRENT_SAMPLES: usize = 8;

fn metrics_json(m: &SandboxMetrics) -> Value {
    json!({
        "id": m.id,
        "sampled_unix_ms": m.sampled_unix_ms,
        "cpu_time_us": m.cpu_time_us,
        "cpu_percent": m.cpu_percent,
        "vcpus": m.vcpus,
        "vmm_rss_bytes": m.vmm_rss_bytes,
        "vmm_pss_bytes": m.vmm_pss_bytes,
        "guest_memory_total_bytes": m.guest_memory_total_bytes,
        "guest_memory_available_bytes": m.guest_memory_available_bytes,
        "guest_memory_used_bytes": m.guest_memory_used_bytes,
        "disk_bytes": m.disk_bytes,
        "net_rx_bytes": m.net_rx_bytes,
        "net_tx_bytes": m.net_tx_bytes,
        "has_nic": m.has_nic,
        "exec_count": m.exec_count,
        "last_activity_unix_ms": m.last_activity_unix_ms,
    })
}

fn cpu_time(us: u64) -> String {
    format!("{:.2}s", us as f64 / 1e6)
}

fn idle(last_ms: i64) -> String {
    if last_ms <= 0 {
        return "-".into();
    }
    let secs = (now_unix() - last_ms / 1000).max(0);
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m", s / 60),
        s => format!("{}h", s / 3600),
    }
}

fn guest_memory(m: &SandboxMetrics) -> String {
    if m.guest_memory_total_bytes == 0 {
        return "-".into();
    }
    format!("{} / {}", human_bytes(m.guest_memory_used_bytes), human_bytes(m.guest_memory_total_bytes))
}

fn network(m: &SandboxMetrics) -> String {
    if !m.has_nic {
        return "-".into();
    }
    format!("{} / {}", human_bytes(m.net_rx_bytes), human_bytes(m.net_tx_bytes))
}

pub async fn metrics(conn: &Conn, args: IdArg, as_json: bool) -> anyhow::Result<u8> {
    let m =
        conn.call(conn.sandboxes().get_sandbox_metrics(GetSandboxMetricsRequest { id: args.id.to_string() })).await?;
    if as_json {
        emit_json(&metrics_json(&m))?;
        return Ok(0);
    }
    emit(&key_values(&[
        ("id", m.id.clone()),
        ("cpu", format!("{:.1}% of a core ({} vCPU)", m.cpu_percent, m.vcpus)),
        ("cpu time", cpu_time(m.cpu_time_us)),
        ("vmm rss", human_bytes(m.vmm_rss_bytes)),
        ("vmm pss", human_bytes(m.vmm_pss_bytes)),
        ("guest memory", guest_memory(&m)),
        ("disk", human_bytes(m.disk_bytes)),
        ("network rx/tx", network(&m)),
        ("commands", m.exec_count.to_string()),
        ("idle", idle(m.last_activity_unix_ms)),
    ]))?;
    Ok(0)
}

/// Samples the named sandboxes, or all; those that end meanwhile are left out.
async fn sample(conn: &Conn, ids: &[String]) -> anyhow::Result<Vec<SandboxMetrics>> {
    let ids: Vec<String> = if ids.is_empty() {
        super::sandboxes::list_all(conn, "")
            .await?
            .into_iter()
            .filter(|s| s.status == "running")
            .map(|s| s.id)
            .collect()
    } else {
        ids.to_vec()
    };
    let mut out: Vec<SandboxMetrics> = stream::iter(ids)
        .map(|id| async move {
            let mut c = conn.sandboxes();
            c.get_sandbox_metrics(GetSandboxMetricsRequest { id }).await.ok().map(|r| r.into_inner())
        })
        .buffer_unordered(CONCURRENT_SAMPLES)
        .filter_map(|m| async move { m })
        .collect()
        .await;
    out.sort_by(|a, b| b.cpu_percent.total_cmp(&a.cpu_percent).then_with(|| a.id.cmp(&b.id)));
    Ok(out)
}

fn render(rows: &[SandboxMetrics]) -> String {
    crate::output::table(
        &["ID", "CPU%", "CPU TIME", "VMM RSS", "VMM PSS", "GUEST MEM", "DISK", "NET RX/TX", "CMDS", "IDLE"],
        rows.iter().map(|m| {
            vec![
                m.id.clone(),
                format!("{:.1}", m.cpu_percent),
                cpu_time(m.cpu_time_us),
                human_bytes(m.vmm_rss_bytes),
                human_bytes(m.vmm_pss_bytes),
                guest_memory(m),
                human_bytes(m.disk_bytes),
                network(m),
                m.exec_count.to_string(),
                idle(m.last_activity_unix_ms),
            ]
        }),
    )
}

pub async fn top(conn: &Conn, args: TopArgs, as_json: bool) -> anyhow::Result<u8> {
    let ids: Vec<String> = args.ids.iter().map(|i| i.to_string()).collect();
    let live = !args.once && std::io::stdout().is_terminal() && !as_json;
    loop {
        let rows = sample(conn, &ids).await?;
        if as_json {
            // One compact array per line, so a reader can follow refreshes.
            emit(&format!("{}\n", Value::Array(rows.iter().map(metrics_json).collect())))?;
        } else {
            let mut text = String::new();
            if live {
                // Home and clear, then the table.
                text.push_str("\x1b[H\x1b[2J");
                text.push_str(&format!(
                    "forkd top — {} sandboxes, every {} s (Ctrl-C quits)\n\n",
                    rows.len(),
                    args.interval
                ));
            }
            text.push_str(&render(&rows));
            emit(&text)?;
        }
        if args.once {
            return Ok(0);
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(args.interval)) => {}
            _ = tokio::signal::ctrl_c() => return Ok(0),
        }
    }
}
