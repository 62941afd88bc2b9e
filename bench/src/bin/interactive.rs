//! forkd-interactive-bench: what typing into a sandbox costs, next to the
//! plain exec round trip measured in the same run, and how long an attach
//! takes to replay a process's buffered output.
//!
//! Starts a real `forkd-server` (real QEMU VMs) on loopback, bakes the
//! `minimal` image, forks one child and measures over gRPC:
//!
//! 1. **exec `true`**: the unary Exec round trip (the baseline);
//! 2. **keystroke echo**: one byte sent on an `ExecInteractive` stream to a
//!    shell on a PTY until the terminal's echo of it comes back (target:
//!    at most the exec round trip + 2 ms);
//! 3. **attach replay**: a process writes 1 MiB (the ring buffer's size)
//!    and waits; `AttachProcess` from offset 0 until the last byte arrives.
//!
//! ```text
//! cargo build --release -p forkd-server -p forkd-bench
//! target/release/forkd-interactive-bench [--reps 100] [--json]
//! ```

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use forkd_api::v1 as api;
use forkd_integration::{Daemon, Options};
use serde::Serialize;
use serde_json::json;
use tokio_stream::StreamExt;

/// The keystroke echo may take this much longer than an exec round trip.
const ECHO_TARGET_EXTRA_MS: f64 = 2.0;
const REPLAY_BYTES: u64 = 1 << 20;

#[derive(Parser, Debug)]
#[command(name = "forkd-interactive-bench", about = "Keystroke echo and attach replay against the exec round trip")]
struct Args {
    /// Round trips per latency row.
    #[arg(long, default_value_t = 100)]
    reps: usize,
    /// Replays of 1 MiB.
    #[arg(long, default_value_t = 5)]
    replays: usize,
    /// Print the rows as JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Row {
    what: &'static str,
    n: usize,
    median_ms: f64,
    p90_ms: f64,
    target: String,
}

fn row(what: &'static str, mut v: Vec<Duration>, target: String) -> Row {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    Row { what, n: v.len(), median_ms: ms(v[v.len() / 2]), p90_ms: ms(v[(v.len() * 9 / 10).min(v.len() - 1)]), target }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.reps == 0 || args.replays == 0 {
        bail!("--reps and --replays must be at least 1");
    }
    let d = Daemon::start(Options::default());
    let r = d.post("/v1/snapshots", json!({ "tag": "bench", "image": "minimal" })).send().await?;
    if !r.status().is_success() {
        bail!("bake: {}", r.text().await?);
    }
    forkd_integration::support::wait_ready(&d, "bench").await;
    let id = forkd_integration::support::fork(&d, "bench", 1).await.remove(0);
    let mut sb = d.sandboxes().await;

    // 1. exec true.
    let mut exec = Vec::new();
    for _ in 0..args.reps {
        let t = Instant::now();
        let req = api::ExecRequest { id: id.clone(), args: vec!["true".into()], ..Default::default() };
        sb.exec(req).await.context("exec true")?;
        exec.push(t.elapsed());
    }

    // 2. keystroke echo on a PTY.
    let (tx, rx) = tokio::sync::mpsc::channel::<api::ExecInput>(16);
    let start = api::ExecRequest {
        id: id.clone(),
        args: vec!["cat".into()],
        pty: Some(api::PtySize { rows: 24, cols: 80 }),
        ..Default::default()
    };
    tx.send(api::ExecInput { input: Some(api::exec_input::Input::Start(start)) }).await?;
    let mut events = sb.exec_interactive(tokio_stream::wrappers::ReceiverStream::new(rx)).await?.into_inner();
    let mut echo = Vec::new();
    for i in 0..args.reps + 5 {
        let key = b'a' + (i % 26) as u8;
        let t = Instant::now();
        tx.send(api::ExecInput { input: Some(api::exec_input::Input::Stdin(vec![key])) }).await?;
        loop {
            let ev = tokio::time::timeout(Duration::from_secs(10), events.next())
                .await
                .context("no echo within 10 s")?
                .context("stream ended")??;
            if let Some(api::exec_event::Event::Pty(b)) = ev.event
                && b.contains(&key)
            {
                break;
            }
        }
        // The first few warm the path up.
        if i >= 5 {
            echo.push(t.elapsed());
        }
    }
    tx.send(api::ExecInput { input: Some(api::exec_input::Input::Signal("KILL".into())) }).await?;

    // 3. attach replay of 1 MiB.
    let script = format!("head -c {REPLAY_BYTES} /dev/zero | tr '\\0' x; sleep 3600");
    let p = sb
        .start_process(api::StartProcessRequest {
            id: id.clone(),
            args: vec!["sh".into(), "-c".into(), script],
            tag: "replay".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let l = sb.list_processes(api::ListProcessesRequest { id: id.clone() }).await?.into_inner();
        if l.processes.iter().any(|q| q.pid == p.pid && q.output_bytes >= REPLAY_BYTES) {
            break;
        }
        if Instant::now() > deadline {
            bail!("the process did not write 1 MiB in time");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut replay = Vec::new();
    for _ in 0..args.replays {
        let t = Instant::now();
        let req = api::AttachProcessRequest { id: id.clone(), process: "replay".into(), from_offset: 0 };
        let mut s = sb.attach_process(req).await?.into_inner();
        let mut got = 0u64;
        while got < REPLAY_BYTES {
            match s.next().await {
                Some(Ok(api::ExecEvent { event: Some(api::exec_event::Event::Stdout(b)) })) => got += b.len() as u64,
                Some(Ok(_)) => {}
                Some(Err(e)) => bail!("attach: {e}"),
                None => bail!("attach ended after {got} bytes"),
            }
        }
        replay.push(t.elapsed());
    }

    let exec_row = row("exec `true` round trip", exec, "baseline".into());
    let target = format!("≤ {:.2} ms (exec + {ECHO_TARGET_EXTRA_MS} ms)", exec_row.median_ms + ECHO_TARGET_EXTRA_MS);
    let echo_row = row("keystroke echo (PTY, ExecInteractive)", echo, target);
    let replay_row = row("attach replay of 1 MiB", replay, "—".into());
    let met = echo_row.median_ms <= exec_row.median_ms + ECHO_TARGET_EXTRA_MS;
    let rows = [exec_row, echo_row, replay_row];
    if args.json {
        println!("{}", serde_json::to_string_pretty(&json!({ "rows": rows, "echo_target_met": met }))?);
    } else {
        let mut t = Table::new();
        t.load_preset(UTF8_FULL_CONDENSED).set_header(["what", "n", "median ms", "p90 ms", "target"]);
        for r in &rows {
            t.add_row([
                r.what.to_string(),
                r.n.to_string(),
                format!("{:.2}", r.median_ms),
                format!("{:.2}", r.p90_ms),
                r.target.clone(),
            ]);
        }
        println!("{t}");
        println!("keystroke echo target {}", if met { "met" } else { "NOT met" });
    }
    Ok(())
}
