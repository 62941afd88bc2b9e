//! `forkd run` against a real daemon and real VMs: the built-in python
//! image run once (the snapshot is baked, the command's output and exit
//! code come through, the child is gone afterwards), run again (the cached
//! `run-*` snapshot is reused, `--timings` shows the phases), the same
//! command done by hand as `forkd fork` + `forkd exec` + `forkd kill` for
//! comparison (both wall times are printed, nothing is asserted on them),
//! and a run stopped by SIGINT, which still kills its child.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::cli_output;
use forkd_integration::{Daemon, Options};
use serde_json::Value;

const SCRIPT: &str = "import sys; print(2+2); sys.exit(3)";

/// Runs the CLI and returns (exit code, stdout, stderr, wall time).
fn timed(d: &Daemon, args: &[&str]) -> (i32, String, String, Duration) {
    let at = Instant::now();
    let (code, out, err) = cli_output(d, args);
    (code, out, err, at.elapsed())
}

/// Tags of the daemon's `run-*` snapshots.
fn run_snapshots(d: &Daemon) -> Vec<Value> {
    let (code, out, err) = cli_output(d, &["snapshots", "--json"]);
    assert_eq!(code, 0, "{err}");
    let all: Value = serde_json::from_str(&out).unwrap();
    all.as_array().unwrap().iter().filter(|s| s["tag"].as_str().unwrap().starts_with("run-")).cloned().collect()
}

/// Ids of the daemon's live sandboxes.
fn sandboxes(d: &Daemon) -> Vec<String> {
    let (code, out, err) = cli_output(d, &["ls", "--json"]);
    assert_eq!(code, 0, "{err}");
    let all: Value = serde_json::from_str(&out).unwrap();
    all.as_array().unwrap().iter().map(|s| s["id"].as_str().unwrap().to_string()).collect()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[test]
fn run_bakes_once_reuses_and_cleans_up() {
    let d = Daemon::start(Options::default());
    let (code, out, err) = cli_output(&d, &["image", "ls"]);
    assert_eq!(code, 0, "the daemon has no image store: {err}");
    assert!(out.lines().any(|l| l.starts_with("python ")), "{out}");

    // First run: finds the built-in image, bakes its snapshot.
    let (code, out, err, first) = timed(&d, &["run", "--image", "python", "--", "python3", "-c", SCRIPT]);
    assert_eq!((code, out.as_str()), (3, "4\n"), "stderr: {err}");
    let snaps = run_snapshots(&d);
    assert_eq!(snaps.len(), 1, "{snaps:?}");
    assert_eq!(snaps[0]["status"], "ready");
    let tag = snaps[0]["tag"].as_str().unwrap().to_string();
    assert!(sandboxes(&d).is_empty(), "the child was killed");

    // Second run: the same snapshot, with the phases.
    let (code, out, err, second) = timed(&d, &["run", "--image", "python", "--timings", "--", "python3", "-c", SCRIPT]);
    assert_eq!((code, out.as_str()), (3, "4\n"), "stderr: {err}");
    println!("second run --timings:\n{err}");
    for phase in ["image", "build", "bake", "fork", "exec", "kill", "total"] {
        assert!(err.lines().any(|l| l.starts_with(&format!("{phase} "))), "no {phase} row: {err}");
    }
    let bake = err.lines().find(|l| l.starts_with("bake ")).unwrap();
    assert!(bake.ends_with(&format!("{tag} reused")), "{err}");
    let snaps = run_snapshots(&d);
    assert_eq!(snaps.len(), 1, "still one run snapshot: {snaps:?}");
    assert_eq!(snaps[0]["tag"], tag.as_str());
    assert!(sandboxes(&d).is_empty(), "the child was killed");

    // The same by hand, from the same snapshot.
    let at = Instant::now();
    let (code, out, err) = cli_output(&d, &["fork", "--tag", &tag, "--quiet"]);
    assert_eq!(code, 0, "{err}");
    let id = out.trim().to_string();
    let (code, out, err) = cli_output(&d, &["exec", &id, "--", "python3", "-c", SCRIPT]);
    assert_eq!((code, out.as_str()), (3, "4\n"), "stderr: {err}");
    let (code, _, err) = cli_output(&d, &["kill", &id]);
    assert_eq!(code, 0, "{err}");
    let by_hand = at.elapsed();
    println!(
        "wall time: first run {:.0} ms (bakes), second run {:.0} ms, fork + exec + kill {:.0} ms",
        ms(first),
        ms(second),
        ms(by_hand)
    );

    // SIGINT during the command: passed on, and the child still goes.
    let mut child = d
        .cli()
        .args(["run", "--image", "python", "--", "sleep", "120"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let running = loop {
        let ids = sandboxes(&d);
        if let Some(id) = ids.first() {
            let (_, out, _) = cli_output(&d, &["ps", id, "--json"]);
            let procs: Value = serde_json::from_str(&out).unwrap_or(Value::Null);
            let started = procs
                .as_array()
                .is_some_and(|ps| ps.iter().any(|p| p["running"] == true && p["args"].to_string().contains("sleep")));
            if started {
                break id.clone();
            }
        }
        assert!(Instant::now() < deadline, "the command never started");
        assert!(child.try_wait().unwrap().is_none(), "forkd run ended early");
        std::thread::sleep(Duration::from_millis(100));
    };
    // SAFETY: signals a child process of ours.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let signalled = Instant::now();
    let deadline = signalled + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "forkd run did not end after SIGINT");
        std::thread::sleep(Duration::from_millis(50));
    };
    let err = child.wait_with_output().map(|o| String::from_utf8_lossy(&o.stderr).into_owned()).unwrap_or_default();
    println!("SIGINT to exit: {:.0} ms", ms(signalled.elapsed()));
    assert_eq!(status.code(), Some(130), "stderr: {err}");
    assert!(!sandboxes(&d).contains(&running), "{running} was killed");
}
