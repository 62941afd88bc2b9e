//! Real microVMs: bake a warmed python snapshot, fork children, and check
//! inside the guests that every child works and is its own machine.
//!
//! Needs the guest assets (scripts/build-guest.sh) and QEMU. These tests
//! fail — they never skip — when no accelerator can run the guest.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use forkd_api::v1 as api;
use forkd_integration::{Daemon, Options, guest_dir, vmms_under};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

fn sha256_file(p: &std::path::Path) -> String {
    let mut h = Sha256::new();
    let mut f = std::fs::File::open(p).unwrap();
    std::io::copy(&mut f, &mut h).unwrap();
    hex::encode(h.finalize())
}

/// Polls GetSnapshot until the snapshot leaves `writing`; returns the
/// statuses seen.
async fn wait_ready(d: &Daemon, tag: &str) -> Vec<String> {
    let mut seen = vec![];
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let info: Value = d.get(&format!("/v1/snapshots/{tag}/info")).send().await.unwrap().json().await.unwrap();
        let status = info["status"].as_str().unwrap().to_string();
        if seen.last() != Some(&status) {
            seen.push(status.clone());
        }
        match status.as_str() {
            "writing" => {}
            "ready" => return seen,
            other => panic!("snapshot {tag} ended {other}: {}", info["status_reason"]),
        }
        assert!(Instant::now() < deadline, "snapshot {tag} still writing after 600 s");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn exec(d: &Daemon, id: &str, args: &[&str]) -> Value {
    let r =
        d.post(&format!("/v1/sandboxes/{id}/exec"), json!({ "args": args, "timeout_secs": 60 })).send().await.unwrap();
    assert_eq!(r.status(), 200, "exec {args:?} in {id}");
    r.json().await.unwrap()
}

async fn eval(d: &Daemon, id: &str, code: &str) -> Value {
    let r = d.post(&format!("/v1/sandboxes/{id}/eval"), json!({ "code": code })).send().await.unwrap();
    assert_eq!(r.status(), 200, "eval {code:?} in {id}");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["exit_code"], 0, "eval {code:?} failed: {}", v["error"]);
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_snapshot_children_are_real_and_distinct() {
    let image = guest_dir().join("images/python.ext4");
    assert!(image.is_file(), "{} missing: run scripts/build-guest.sh", image.display());
    let image_digest = sha256_file(&image);
    let d = Daemon::start(Options::default());

    // Bake: returns at once with "writing"; forking from it now is refused.
    let r = d.post("/v1/snapshots", json!({ "tag": "py", "image": "python" })).send().await.unwrap();
    assert_eq!(r.status(), 202, "accepted: the snapshot is being written");
    let created: Value = r.json().await.unwrap();
    assert_eq!(created["status"], "writing");
    let r = d.post("/v1/sandboxes", json!({ "snapshot_tag": "py", "n": 1 })).send().await.unwrap();
    assert_eq!(r.status(), 409, "spawning from a writing snapshot");
    let seen = wait_ready(&d, "py").await;
    assert_eq!(seen.last().unwrap(), "ready");
    let info: Value = d.get("/v1/snapshots/py/info").send().await.unwrap().json().await.unwrap();
    assert!(info["memory_digest"].as_str().unwrap().starts_with("sha256:"));
    assert_eq!(info["runtime"], "python");
    assert!(info["logical_size_bytes"].is_u64(), "sizes are JSON numbers: {info}");

    // Bad input changes nothing.
    let r = d.post("/v1/sandboxes", json!({ "snapshot_tag": "nope", "n": 1 })).send().await.unwrap();
    assert_eq!(r.status(), 404);
    for n in [0, 1001] {
        let r = d.post("/v1/sandboxes", json!({ "snapshot_tag": "py", "n": n })).send().await.unwrap();
        assert_eq!(r.status(), 400, "n = {n}");
    }

    // Fork 10 over gRPC.
    let mut sb = d.sandboxes().await;
    let t = Instant::now();
    let kids = sb
        .create_sandboxes(api::CreateSandboxesRequest { snapshot_tag: "py".into(), n: Some(10), ..Default::default() })
        .await
        .expect("fork 10")
        .into_inner()
        .sandboxes;
    eprintln!("forked 10 in {:?}", t.elapsed());
    assert_eq!(kids.len(), 10);
    let ids: Vec<String> = kids.iter().map(|k| k.id.clone()).collect();
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), 10);
    for k in &kids {
        assert_eq!(k.status, "running");
        assert!(k.pid > 0);
    }
    let listed: Value = d.get("/v1/sandboxes").send().await.unwrap().json().await.unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 10);

    // Each child answers.
    for id in &ids {
        let r = d.post(&format!("/v1/sandboxes/{id}/ping"), json!({})).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let p: Value = r.json().await.unwrap();
        assert_eq!(p["ok"], true);
    }

    // Exec: stdout, stderr, exit code.
    let x = exec(&d, &ids[0], &["sh", "-c", "echo out; echo err >&2; exit 7"]).await;
    assert_eq!(x["stdout"], "out\n");
    assert_eq!(x["stderr"], "err\n");
    assert_eq!(x["exit_code"], 7);

    // Eval in the warm interpreter: numpy is already imported.
    let t = Instant::now();
    let v = eval(&d, &ids[0], "numpy.zeros(5).sum()").await;
    assert_eq!(v["result"], "0.0");
    eprintln!("warm numpy eval took {:?}", t.elapsed());
    let v = eval(&d, &ids[0], "np is numpy").await;
    assert_eq!(v["result"], "True");
    // A statement defines a name for later calls; an exception is reported.
    eval(&d, &ids[0], "x = 41").await;
    assert_eq!(eval(&d, &ids[0], "x + 1").await["result"], "42");
    let r: Value = d
        .post(&format!("/v1/sandboxes/{}/eval", ids[0]), json!({ "code": "1/0" }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_ne!(r["exit_code"], 0);
    assert!(r["error"].as_str().unwrap().contains("ZeroDivisionError"), "{r}");

    // Writes stay in the child that made them.
    let w = exec(&d, &ids[0], &["sh", "-c", "echo private > /root/only-here && cat /root/only-here"]).await;
    assert_eq!(w["stdout"], "private\n");
    for id in &ids[1..] {
        let x = exec(&d, id, &["test", "-e", "/root/only-here"]).await;
        assert_eq!(x["exit_code"], 1, "sibling {id} sees the file");
    }

    // Identity: distinct entropy, UUIDs, Python random streams; right clock.
    let mut urandom = HashSet::new();
    let mut uuids = HashSet::new();
    let mut randoms = HashSet::new();
    let mut hostnames = HashSet::new();
    for id in &ids {
        let x = exec(&d, id, &["sh", "-c", "head -c 16 /dev/urandom | od -An -tx1"]).await;
        assert_eq!(x["exit_code"], 0);
        urandom.insert(x["stdout"].as_str().unwrap().to_string());
        uuids.insert(eval(&d, id, "import uuid\nstr(uuid.uuid4())").await["result"].as_str().unwrap().to_string());
        randoms.insert(eval(&d, id, "import random\nrandom.random()").await["result"].as_str().unwrap().to_string());
        let host = exec(&d, id, &["hostname"]).await;
        hostnames.insert(host["stdout"].as_str().unwrap().trim().to_string());
        let guest_now: f64 =
            eval(&d, id, "import time\ntime.time()").await["result"].as_str().unwrap().parse().unwrap();
        let host_now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
        assert!((guest_now - host_now).abs() < 2.0, "child {id} clock off by {} s", guest_now - host_now);
    }
    assert_eq!(urandom.len(), 10, "urandom samples: {urandom:?}");
    assert_eq!(uuids.len(), 10, "uuids: {uuids:?}");
    assert_eq!(randoms.len(), 10, "random.random(): {randoms:?}");
    assert_eq!(hostnames, ids.iter().cloned().collect::<HashSet<_>>(), "hostname is the sandbox id");

    // Streaming exec delivers output before the command ends.
    let t = Instant::now();
    let mut stream = sb
        .exec_stream(api::ExecRequest {
            id: ids[1].clone(),
            args: vec!["sh".into(), "-c".into(), "echo first; sleep 2; echo second".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    let first_at = t.elapsed();
    assert_eq!(first.event, Some(api::exec_event::Event::Stdout(b"first\n".to_vec())));
    let mut rest = vec![];
    while let Some(ev) = stream.message().await.unwrap() {
        rest.push(ev);
    }
    let total = t.elapsed();
    assert!(first_at + Duration::from_millis(1500) < total, "first chunk at {first_at:?}, end at {total:?}");
    match rest.last().and_then(|e| e.event.clone()) {
        Some(api::exec_event::Event::Exit(x)) => assert_eq!(x.exit_code, 0),
        other => panic!("stream must end with the exit status, got {other:?}"),
    }

    // A timeout is reported and the process is gone from the guest.
    let r: Value = d
        .post(
            &format!("/v1/sandboxes/{}/exec", ids[2]),
            json!({ "args": ["sh", "-c", "echo $$ > /tmp/victim; exec sleep 300"], "timeout_secs": 2 }),
        )
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["timed_out"], true, "{r}");
    let alive = exec(&d, &ids[2], &["sh", "-c", "kill -0 $(cat /tmp/victim)"]).await;
    assert_ne!(alive["exit_code"], 0, "the timed-out process still runs in the guest");

    // The CLI streams and exits with the command's code.
    let out = d.cli().args(["exec", &ids[3], "--", "sh", "-c", "echo via-cli; exit 3"]).output().unwrap();
    assert_eq!(out.status.code(), Some(3), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "via-cli\n");

    // Kill all: nothing of theirs remains.
    let r = d.post("/v1/sandboxes/delete", json!({ "all": true })).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let deleted: Value = r.json().await.unwrap();
    assert_eq!(deleted["deleted"].as_array().unwrap().len(), 10);
    let r = d.post(&format!("/v1/sandboxes/{}/exec", ids[0]), json!({ "args": ["true"] })).send().await.unwrap();
    assert_eq!(r.status(), 404, "exec on a killed sandbox");
    assert!(vmms_under(&d.data_dir).is_empty(), "VMM processes remain");
    let left: Vec<_> = std::fs::read_dir(d.data_dir.join("sandboxes")).unwrap().collect();
    assert!(left.is_empty(), "work dirs remain: {left:?}");
    let sockets = walk_sockets(&d.data_dir);
    assert!(sockets.is_empty(), "sockets remain: {sockets:?}");

    // The image file was never written.
    assert_eq!(sha256_file(&image), image_digest);
}

fn walk_sockets(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    use std::os::unix::fs::FileTypeExt;
    let mut out = vec![];
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() {
                out.extend(walk_sockets(&e.path()));
            } else if ft.is_socket() {
                out.push(e.path());
            }
        }
    }
    out
}
