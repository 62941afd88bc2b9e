//! Branching running sandboxes, diff chains, compaction, deletion rules and
//! the files API — against a real daemon and real VMs.

mod common;

use std::time::Instant;

use common::{branch, eval, fork, wait_ready};
use forkd_api::v1 as api;
use forkd_integration::{Daemon, Options};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

async fn sh(d: &Daemon, id: &str, script: &str) -> Value {
    let r = d.post(&format!("/v1/sandboxes/{id}/exec"), json!({ "args": ["sh", "-c", script] })).send().await.unwrap();
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

async fn info(d: &Daemon, tag: &str) -> Value {
    d.get(&format!("/v1/snapshots/{tag}/info")).send().await.unwrap().json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn branch_chains_compaction_and_deletion() {
    let d = Daemon::start(Options::default());
    let r = d.post("/v1/snapshots", json!({ "tag": "base", "image": "python" })).send().await.unwrap();
    assert_eq!(r.status(), 202);
    wait_ready(&d, "base").await;

    // A child writes a file and sets a name in its interpreter, then branches.
    let child = fork(&d, "base", 1).await.remove(0);
    assert_eq!(sh(&d, &child, "echo from-child > /root/state.txt").await["exit_code"], 0);
    eval(&d, &child, "marker = 41").await;
    let b1 = branch(&d, &child, "b1", "diff").await;
    assert_eq!(b1["status"], "ready");
    assert_eq!(b1["kind"], "diff");
    assert_eq!(b1["parent_tag"], "base");
    assert_eq!(b1["branched_from"], child);
    assert!(b1["pause_ms"].as_f64().unwrap() > 0.0);
    assert!(b1["dirty_bytes"].as_u64().unwrap() > 0);
    assert_eq!(b1["ancestors"], json!(["base"]));
    assert_eq!(b1["chain_depth"], 1);
    eprintln!("branch b1: pause {} ms, dirty {} bytes", b1["pause_ms"], b1["dirty_bytes"]);

    // The source keeps running and stays usable.
    assert_eq!(sh(&d, &child, "echo alive").await["stdout"], "alive\n");
    assert_eq!(eval(&d, &child, "marker").await, "41");

    // Three grandchildren see the file and the name.
    let grand = fork(&d, "b1", 3).await;
    for g in &grand {
        assert_eq!(sh(&d, g, "cat /root/state.txt").await["stdout"], "from-child\n", "grandchild {g}");
        assert_eq!(eval(&d, g, "marker").await, "41");
    }
    // Each grandchild is its own machine.
    let ids: std::collections::HashSet<String> = futures::future::join_all(grand.iter().map(|g| async {
        sh(&d, g, "cat /run/forkd/sandbox-id 2>/dev/null || hostname").await["stdout"].as_str().unwrap().to_string()
    }))
    .await
    .into_iter()
    .collect();
    assert_eq!(ids.len(), 3);

    // Depth 2: a grandchild changes state and is branched again.
    eval(&d, &grand[0], "marker = 42").await;
    sh(&d, &grand[0], "echo depth2 > /root/deeper.txt").await;
    let b2 = branch(&d, &grand[0], "b2", "diff").await;
    assert_eq!(b2["parent_tag"], "b1");
    assert_eq!(b2["ancestors"], json!(["base", "b1"]));
    assert_eq!(b2["chain_depth"], 2);
    let b1_info = info(&d, "b1").await;
    assert_eq!(b1_info["dependents"], json!(["b2"]));

    // Spawning from b2 and from its compacted copy gives the same state.
    let r = d.post("/v1/snapshots/b2/compact", json!({ "to": "b2-flat" })).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let flat: Value = r.json().await.unwrap();
    assert_eq!(flat["parent_tag"], "");
    assert_eq!(flat["kind"], "full");
    assert_eq!(flat["chain_depth"], 0);
    for tag in ["b2", "b2-flat"] {
        let k = fork(&d, tag, 1).await.remove(0);
        assert_eq!(eval(&d, &k, "marker").await, "42", "{tag}");
        assert_eq!(sh(&d, &k, "cat /root/state.txt /root/deeper.txt").await["stdout"], "from-child\ndepth2\n", "{tag}");
        d.delete(&format!("/v1/sandboxes/{k}")).send().await.unwrap();
    }

    // A full branch is flat and parentless.
    let full = branch(&d, &child, "b1-full", "full").await;
    assert_eq!(full["kind"], "full");
    assert_eq!(full["parent_tag"], "");

    // Deleting a parent with dependents is refused, naming them.
    let r = d.delete("/v1/snapshots/b1").send().await.unwrap();
    assert_eq!(r.status(), 409);
    let body = r.text().await.unwrap();
    assert!(body.contains("b2"), "{body}");
    // Both flags together are a contradiction.
    let r = d.delete("/v1/snapshots/b1?cascade=true&force=true").send().await.unwrap();
    assert_eq!(r.status(), 400);
    // Live sandboxes using a snapshot block its deletion unless forced.
    let r = d.delete("/v1/snapshots/b1?cascade=true").send().await.unwrap();
    assert_eq!(r.status(), 409);
    let body = r.text().await.unwrap();
    assert!(body.contains(&grand[1]), "the refusal names the live sandboxes: {body}");
    let r = d.post("/v1/sandboxes/delete", json!({ "snapshot_tag": "b1" })).send().await.unwrap();
    assert_eq!(r.json::<Value>().await.unwrap()["deleted"].as_array().unwrap().len(), 3);

    // cascade removes exactly the subtree (b2 under b2), leaving b1, b2-flat, base.
    let r = d.delete("/v1/snapshots/b2?cascade=true").send().await.unwrap();
    assert_eq!(r.status(), 200);
    let del: Value = r.json().await.unwrap();
    assert_eq!(del["deleted"], json!(["b2"]));
    let tags: Vec<String> = {
        let v: Value = d.get("/v1/snapshots").send().await.unwrap().json().await.unwrap();
        v.as_array().unwrap().iter().map(|s| s["tag"].as_str().unwrap().to_string()).collect()
    };
    assert!(
        tags.contains(&"b1".to_string()) && tags.contains(&"b2-flat".to_string()) && !tags.contains(&"b2".to_string()),
        "{tags:?}"
    );

    // Rebuild a subtree under b1 and cascade-delete from b1.
    let g = fork(&d, "b1", 1).await.remove(0);
    branch(&d, &g, "c2", "diff").await;
    d.delete(&format!("/v1/sandboxes/{g}")).send().await.unwrap();
    let r = d.delete("/v1/snapshots/b1?cascade=true").send().await.unwrap();
    let del: Value = r.json().await.unwrap();
    let mut deleted: Vec<String> =
        del["deleted"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect();
    deleted.sort();
    assert_eq!(deleted, vec!["b1".to_string(), "c2".to_string()]);
    assert!(!d.data_dir.join("snapshots/b1").exists());
    assert!(!d.data_dir.join("snapshots/c2").exists());
    assert!(d.data_dir.join("snapshots/b2-flat").exists());

    // force orphans dependents: they become failed and cannot spawn.
    let p = fork(&d, "base", 1).await.remove(0);
    branch(&d, &p, "p1", "diff").await;
    d.delete(&format!("/v1/sandboxes/{p}")).send().await.unwrap();
    let q = fork(&d, "p1", 1).await.remove(0);
    branch(&d, &q, "p2", "diff").await;
    d.delete(&format!("/v1/sandboxes/{q}")).send().await.unwrap();
    let r = d.delete("/v1/snapshots/p1?force=true").send().await.unwrap();
    assert_eq!(r.status(), 200);
    let del: Value = r.json().await.unwrap();
    assert_eq!(del["orphaned"], json!(["p2"]));
    let p2 = info(&d, "p2").await;
    assert_eq!(p2["status"], "failed");
    let r = d.post("/v1/sandboxes", json!({ "snapshot_tag": "p2", "n": 1 })).send().await.unwrap();
    assert_eq!(r.status(), 409, "a failed snapshot must not spawn");

    // A branch that fails after the pause (the staging area is full) leaves
    // the source running and nothing partial in the store.
    let staging = d.data_dir.join("staging");
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(&staging)
        .status()
        .unwrap()
        .success();
    assert!(mounted, "mounting a tiny tmpfs over the staging dir (needs root)");
    let r = d
        .post(&format!("/v1/sandboxes/{child}/branch"), json!({ "tag": "doomed", "mode": "diff" }))
        .send()
        .await
        .unwrap();
    let status = r.status();
    let body = r.text().await.unwrap();
    eprintln!("branch onto a full disk: {status} {body}");
    let left: Vec<_> = std::fs::read_dir(&staging).unwrap().collect();
    std::process::Command::new("umount").arg(&staging).status().unwrap();
    assert!(status.is_server_error() || status == 409, "branch onto a full disk must fail: {status} {body}");
    assert!(left.is_empty(), "staging left behind: {left:?}");
    assert_eq!(d.get("/v1/snapshots/doomed/info").send().await.unwrap().status(), 404);
    assert!(!d.data_dir.join("snapshots/doomed").exists());
    assert_eq!(sh(&d, &child, "echo still-here").await["stdout"], "still-here\n");

    // The same tag twice → 409.
    let r = d.post(&format!("/v1/sandboxes/{child}/branch"), json!({ "tag": "b1-full" })).send().await.unwrap();
    assert_eq!(r.status(), 409);

    // DeriveSnapshot: spawn, run, diff-branch, kill the transient sandbox.
    let before: Value = d.get("/v1/sandboxes").send().await.unwrap().json().await.unwrap();
    let r = d
        .post(
            "/v1/snapshots/base/derive",
            json!({ "tag": "derived", "exec": ["sh", "-c", "echo baked > /root/derived.txt"] }),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let after: Value = d.get("/v1/sandboxes").send().await.unwrap().json().await.unwrap();
    assert_eq!(before.as_array().unwrap().len(), after.as_array().unwrap().len(), "the transient sandbox is gone");
    let k = fork(&d, "derived", 1).await.remove(0);
    assert_eq!(sh(&d, &k, "cat /root/derived.txt").await["stdout"], "baked\n");
    let r =
        d.post("/v1/snapshots/base/derive", json!({ "tag": "derived-bad", "exec": ["false"] })).send().await.unwrap();
    assert_eq!(r.status(), 409);
    let after2: Value = d.get("/v1/sandboxes").send().await.unwrap().json().await.unwrap();
    assert_eq!(after2.as_array().unwrap().len(), after.as_array().unwrap().len() + 1);

    d.post("/v1/sandboxes/delete", json!({ "all": true })).send().await.unwrap();
    assert!(forkd_integration::vmms_under(&d.data_dir).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_round_trip_50_mib() {
    let d = Daemon::start(Options::default());
    d.post("/v1/snapshots", json!({ "tag": "files", "image": "python" })).send().await.unwrap();
    wait_ready(&d, "files").await;
    let id = fork(&d, "files", 1).await.remove(0);

    let mut data = vec![0u8; 50 << 20];
    let mut x: u64 = 0x9e3779b97f4a7c15;
    for b in data.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    let want = hex::encode(Sha256::digest(&data));

    // gRPC: stream in, stream out.
    let mut sb = d.sandboxes().await;
    let chunks: Vec<api::WriteFileRequest> = data
        .chunks(1 << 20)
        .enumerate()
        .map(|(i, c)| api::WriteFileRequest {
            id: if i == 0 { id.clone() } else { String::new() },
            path: if i == 0 { "/root/big.bin".into() } else { String::new() },
            data: c.to_vec(),
            mode: 0,
        })
        .collect();
    let t = Instant::now();
    let info = sb.write_file(tokio_stream::iter(chunks)).await.expect("write").into_inner();
    eprintln!("wrote 50 MiB in {:?}", t.elapsed());
    assert_eq!(info.size, data.len() as u64);
    assert_eq!(info.digest, format!("sha256:{want}"));
    let sum = sh(&d, &id, "sha256sum /root/big.bin").await;
    assert!(sum["stdout"].as_str().unwrap().starts_with(&want), "{sum}");
    let mut stream =
        sb.read_file(api::ReadFileRequest { id: id.clone(), path: "/root/big.bin".into() }).await.unwrap().into_inner();
    let mut got = Vec::new();
    while let Some(c) = stream.message().await.unwrap() {
        got.extend(c.data);
    }
    assert_eq!(hex::encode(Sha256::digest(&got)), want);

    // REST: raw upload and download.
    let r = d
        .http()
        .put(format!("{}/v1/sandboxes/{id}/files/content?path=/root/rest.bin", d.http_url()))
        .header("content-type", "application/octet-stream")
        .body(data.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let r = d
        .http()
        .get(format!("{}/v1/sandboxes/{id}/files/content?path=/root/rest.bin", d.http_url()))
        .header("accept", "application/octet-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body = r.bytes().await.unwrap();
    assert_eq!(hex::encode(Sha256::digest(&body)), want);

    // list, stat, remove; errors.
    let l: Value = d.get(&format!("/v1/sandboxes/{id}/files?path=/root")).send().await.unwrap().json().await.unwrap();
    let names: Vec<&str> = l.as_array().unwrap().iter().map(|e| e["name"].as_str().unwrap()).collect();
    assert!(names.contains(&"big.bin") && names.contains(&"rest.bin"), "{names:?}");
    let st: Value =
        d.get(&format!("/v1/sandboxes/{id}/files/stat?path=/root/big.bin")).send().await.unwrap().json().await.unwrap();
    assert_eq!(st["size"], data.len() as u64);
    let r = d.delete(&format!("/v1/sandboxes/{id}/files?path=/root/big.bin")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = d.get(&format!("/v1/sandboxes/{id}/files/stat?path=/root/big.bin")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let r = d.get(&format!("/v1/sandboxes/{id}/files/stat?path=relative")).send().await.unwrap();
    assert_eq!(r.status(), 400);

    d.post("/v1/sandboxes/delete", json!({ "all": true })).send().await.unwrap();
}
