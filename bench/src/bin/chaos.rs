//! forkd-chaos-bench: the long run of the chaos cycles the integration test
//! runs a bounded subset of. Fork, exec, branch and kill against a real
//! daemon with real VMs; calls cut off by their client at random moments;
//! the daemon SIGKILLed mid-operation and started again. After every cycle
//! the host must agree with the daemon; at the end nothing forkd-owned may
//! be left (VMMs, work dirs, staging, cgroups, network namespaces, ledger
//! rows). Then a restart with many live sandboxes, timed until the new
//! daemon lists them all.
//!
//! ```text
//! cargo build -p forkd-server -p forkd-bench
//! target/debug/forkd-chaos-bench                      # 1000 cycles, 100 adopted
//! target/debug/forkd-chaos-bench --cycles 50 --adopt 20
//! ```
//!
//! Exits non-zero when any invariant broke, anything leaked, or not every
//! sandbox was adopted.

use std::time::Duration;

use clap::Parser;
use comfy_table::{CellAlignment, Table, presets::UTF8_FULL_CONDENSED};
use forkd_integration::chaos::{self, ChaosConfig};

#[derive(Parser, Debug)]
#[command(
    name = "forkd-chaos-bench",
    about = "Chaos cycles with cut-off calls and daemon kills; adoption of many sandboxes"
)]
struct Args {
    /// Cycles of fork/exec/branch/kill.
    #[arg(long, default_value_t = 1000)]
    cycles: usize,
    /// Stop starting cycles after this many seconds.
    #[arg(long, default_value_t = 5400)]
    budget_secs: u64,
    /// One call in this many is cut off by its client.
    #[arg(long, default_value_t = 2)]
    cut_one_in: u64,
    /// The daemon is killed during one cycle in this many.
    #[arg(long, default_value_t = 10)]
    crash_one_in: u64,
    /// Live sandboxes for the adoption run (0: skip it).
    #[arg(long, default_value_t = 100)]
    adopt: u32,
    /// Image of the snapshot (`minimal` keeps a hundred children small).
    #[arg(long, default_value = "minimal")]
    image: String,
    /// Seed of the random choices (printed; default: the clock).
    #[arg(long)]
    seed: Option<u64>,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let mut cfg = ChaosConfig {
        cycles: a.cycles,
        budget: Duration::from_secs(a.budget_secs),
        cut_one_in: a.cut_one_in.max(1),
        crash_one_in: a.crash_one_in.max(1),
        image: a.image.clone(),
        ..Default::default()
    };
    if let Some(s) = a.seed {
        cfg.seed = s;
    }
    eprintln!("chaos: {} cycles, seed {}", cfg.cycles, cfg.seed);
    let r = chaos::run(&cfg, |line| eprintln!("{line}")).await;
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED).set_header(vec!["figure", "value"]);
    let ops: Vec<String> = r.ops.iter().map(|(k, v)| format!("{k} {v}")).collect();
    for (k, v) in [
        ("cycles", r.cycles.to_string()),
        ("operations", ops.join(", ")),
        ("calls cut off by the client", r.cut_off.to_string()),
        ("daemon SIGKILLs", r.crashes.to_string()),
        ("slowest restart to first answer", format!("{:.0} ms", r.slowest_restart.as_secs_f64() * 1000.0)),
        ("invariant violations", r.problems.len().to_string()),
        ("leaks at the end", r.leaks.len().to_string()),
        ("wall time", format!("{:.0} s", r.elapsed.as_secs_f64())),
    ] {
        t.add_row(vec![k.to_string(), v]);
    }
    if let Some(col) = t.column_mut(1) {
        col.set_cell_alignment(CellAlignment::Right);
    }
    println!("{t}");
    for p in r.problems.iter().take(20) {
        println!("problem: {p}");
    }
    for l in &r.leaks {
        println!("leak: {l}");
    }
    let mut ok = r.problems.is_empty() && r.leaks.is_empty();
    if a.adopt > 0 {
        match chaos::adopt(a.adopt, &a.image).await {
            Ok((adopted, forked)) => println!(
                "adoption: {} live sandboxes forked in {:.1} s; after SIGKILL the new daemon listed all running in {:.0} ms",
                a.adopt,
                forked.as_secs_f64(),
                adopted.as_secs_f64() * 1000.0
            ),
            Err(e) => {
                println!("adoption failed: {e}");
                ok = false;
            }
        }
    }
    if !ok {
        anyhow::bail!("chaos found problems");
    }
    Ok(())
}
