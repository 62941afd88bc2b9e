//! Volumes attached to snapshots: a read-write volume persists across
//! sandboxes used one after the other and is never attached twice; a
//! read-only one is shared.

mod common;

use common::wait_ready;
use forkd_integration::{Daemon, Options, cli_bin};
use serde_json::{Value, json};

async fn fork(d: &Daemon, tag: &str, n: u32) -> reqwest::Response {
    d.post("/v1/sandboxes", json!({ "snapshot_tag": tag, "n": n })).send().await.unwrap()
}

async fn sh(d: &Daemon, id: &str, script: &str) -> Value {
    let r = d.post(&format!("/v1/sandboxes/{id}/exec"), json!({ "args": ["sh", "-c", script] })).send().await.unwrap();
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

fn volume_create(path: &std::path::Path, extra: &[&str]) {
    let out = std::process::Command::new(cli_bin())
        .arg("volume-create")
        .arg(path)
        .args(["--size-mib", "16"])
        .args(extra)
        .output()
        .unwrap();
    assert!(out.status.success(), "volume-create: {}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_write_volumes_persist_and_read_only_ones_are_shared() {
    let tmp = tempfile::Builder::new().prefix("forkd-vol-").tempdir_in("/tmp").unwrap();
    let rw = tmp.path().join("rw.ext4");
    volume_create(&rw, &[]);
    let content = tmp.path().join("content");
    std::fs::create_dir(&content).unwrap();
    std::fs::write(content.join("hello.txt"), "shared hello\n").unwrap();
    let ro = tmp.path().join("ro.ext4");
    volume_create(&ro, &["--from-dir", content.to_str().unwrap()]);
    // An existing file is never overwritten.
    let again = std::process::Command::new(cli_bin()).arg("volume-create").arg(&ro).output().unwrap();
    assert!(!again.status.success());

    let d = Daemon::start(Options::default());
    // Bad specs change nothing.
    for bad in [
        format!("{}/missing.ext4:/data", tmp.path().display()),
        format!("{}:/data", tmp.path().display()),
        format!("{}:relative", rw.display()),
    ] {
        let r = d
            .post("/v1/snapshots", json!({ "tag": "bad", "image": "minimal", "volumes": [bad] }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{bad}");
        let body = r.text().await.unwrap();
        assert!(body.contains("volumes"), "the error names the field: {body}");
    }
    assert_eq!(d.get("/v1/snapshots/bad/info").send().await.unwrap().status(), 404);

    let r = d
        .post(
            "/v1/snapshots",
            json!({ "tag": "rwvol", "image": "minimal", "volumes": [format!("{}:/data", rw.display())] }),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = d
        .post(
            "/v1/snapshots",
            json!({ "tag": "rovol", "image": "minimal", "volumes": [format!("{}:/shared:ro", ro.display())] }),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    wait_ready(&d, "rwvol").await;
    wait_ready(&d, "rovol").await;

    // First sandbox writes; while it lives, nobody else may attach the volume.
    let r = fork(&d, "rwvol", 1).await;
    assert_eq!(r.status(), 200);
    let first = r.json::<Value>().await.unwrap()[0]["id"].as_str().unwrap().to_string();
    assert_eq!(sh(&d, &first, "echo persisted > /data/note && cat /data/note").await["stdout"], "persisted\n");
    let r = fork(&d, "rwvol", 1).await;
    assert_eq!(r.status(), 409, "a second concurrent read-write attach");
    assert!(r.text().await.unwrap().contains(&first));
    assert_eq!(fork(&d, "rwvol", 2).await.status(), 409);
    d.delete(&format!("/v1/sandboxes/{first}")).send().await.unwrap();

    // The next sandbox sees what the first one wrote.
    let r = fork(&d, "rwvol", 1).await;
    assert_eq!(r.status(), 200);
    let second = r.json::<Value>().await.unwrap()[0]["id"].as_str().unwrap().to_string();
    assert_eq!(sh(&d, &second, "cat /data/note").await["stdout"], "persisted\n");
    d.delete(&format!("/v1/sandboxes/{second}")).send().await.unwrap();

    // Three children share the read-only volume and cannot write it.
    let r = fork(&d, "rovol", 3).await;
    assert_eq!(r.status(), 200);
    let kids: Vec<String> = r
        .json::<Value>()
        .await
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["id"].as_str().unwrap().to_string())
        .collect();
    for k in &kids {
        assert_eq!(sh(&d, k, "cat /shared/hello.txt").await["stdout"], "shared hello\n");
        assert_ne!(sh(&d, k, "echo x > /shared/w").await["exit_code"], 0, "read-only volume was writable in {k}");
    }
    let info: Value = d.get("/v1/snapshots/rovol/info").send().await.unwrap().json().await.unwrap();
    assert_eq!(info["volumes"], json!([format!("{}:/shared:ro", ro.display())]));
    d.post("/v1/sandboxes/delete", json!({ "all": true })).send().await.unwrap();
}
