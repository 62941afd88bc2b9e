//! Volumes on snapshots, sandboxes and workspaces: a read-write volume
//! persists across sandboxes used one after the other and is never attached
//! twice; a read-only one is shared; volumes of a sandbox's or workspace's
//! own are plugged into the snapshot's spare slots and survive suspend,
//! a daemon crash and resume.

mod common;

use common::{post_ok, wait_ready};
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
    volume_create_sized(path, 16, extra)
}

fn volume_create_sized(path: &std::path::Path, mib: u32, extra: &[&str]) {
    let out = std::process::Command::new(cli_bin())
        .arg("volume-create")
        .arg(path)
        .args(["--size-mib", &mib.to_string()])
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

    // Inside the volume root but not a volume: a symlink out of it, a
    // block device.
    std::os::unix::fs::symlink("/etc/shadow", tmp.path().join("sneaky.ext4")).unwrap();
    let blk = std::ffi::CString::new(tmp.path().join("disk").display().to_string()).unwrap();
    assert_eq!(unsafe { libc::mknod(blk.as_ptr(), libc::S_IFBLK | 0o600, libc::makedev(7, 0)) }, 0);
    let d = Daemon::start(Options {
        extra_args: vec!["--volume-root".into(), tmp.path().display().to_string()],
        ..Default::default()
    });
    // Bad specs change nothing.
    for bad in [
        format!("{}/missing.ext4:/data", tmp.path().display()),
        format!("{}:/data", tmp.path().display()),
        format!("{}:relative", rw.display()),
        "/etc/shadow:/data".to_string(),
        format!("{}/sneaky.ext4:/data", tmp.path().display()),
        format!("{}/disk:/data", tmp.path().display()),
        format!("{}/../{}/rw.ext4:/data", tmp.path().display(), tmp.path().file_name().unwrap().to_string_lossy()),
        format!("{}:/data", d.data_dir.join("forkd.db").display()),
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
    // Images come from the image store only, never from a host path.
    for bad in ["/etc/shadow", "../images/minimal", rw.to_str().unwrap()] {
        let r = d.post("/v1/snapshots", json!({ "tag": "bad", "image": bad })).send().await.unwrap();
        assert_eq!(r.status(), 400, "{bad}");
        assert!(r.text().await.unwrap().contains("image"), "the error names the field");
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
    assert_eq!(r.status(), 202);
    let r = d
        .post(
            "/v1/snapshots",
            json!({ "tag": "rovol", "image": "minimal", "volumes": [format!("{}:/shared:ro", ro.display())] }),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    wait_ready(&d, "rwvol").await;
    wait_ready(&d, "rovol").await;

    // First sandbox writes; while it lives, nobody else may attach the volume.
    let r = fork(&d, "rwvol", 1).await;
    let status = r.status();
    let body = r.json::<Value>().await.unwrap();
    assert_eq!(status, 201, "{body}");
    let first = body[0]["id"].as_str().unwrap().to_string();
    assert_eq!(sh(&d, &first, "echo persisted > /data/note && cat /data/note").await["stdout"], "persisted\n");
    let r = fork(&d, "rwvol", 1).await;
    assert_eq!(r.status(), 409, "a second concurrent read-write attach");
    assert!(r.text().await.unwrap().contains(&first));
    assert_eq!(fork(&d, "rwvol", 2).await.status(), 409);
    d.delete(&format!("/v1/sandboxes/{first}")).send().await.unwrap();

    // The next sandbox sees what the first one wrote.
    let r = fork(&d, "rwvol", 1).await;
    assert_eq!(r.status(), 201);
    let second = r.json::<Value>().await.unwrap()[0]["id"].as_str().unwrap().to_string();
    assert_eq!(sh(&d, &second, "cat /data/note").await["stdout"], "persisted\n");
    d.delete(&format!("/v1/sandboxes/{second}")).send().await.unwrap();

    // Three children share the read-only volume and cannot write it.
    let r = fork(&d, "rovol", 3).await;
    assert_eq!(r.status(), 201);
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

async fn fork_with(d: &Daemon, tag: &str, n: u32, volumes: &[String]) -> reqwest::Response {
    d.post("/v1/sandboxes", json!({ "snapshot_tag": tag, "n": n, "volumes": volumes })).send().await.unwrap()
}

async fn ids_of(r: reqwest::Response) -> Vec<String> {
    assert_eq!(r.status(), 201);
    let v: Value = r.json().await.unwrap();
    v.as_array().unwrap().iter().map(|k| k["id"].as_str().unwrap().to_string()).collect()
}

/// Kilobytes of the filesystem mounted at `dir`, as the guest sees it.
async fn fs_kib(d: &Daemon, id: &str, dir: &str) -> u64 {
    let out = sh(d, id, &format!("df -k {dir} | tail -n 1")).await;
    let line = out["stdout"].as_str().unwrap().to_string();
    line.split_whitespace().nth(1).and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("df: {out}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandboxes_and_workspaces_get_volumes_of_their_own() {
    let tmp = tempfile::Builder::new().prefix("forkd-ownvol-").tempdir_in("/tmp").unwrap();
    // Sizes differ from each other and from the slot placeholder, so a
    // child that kept the placeholder's size could not mount them.
    let rw = tmp.path().join("work.ext4");
    volume_create_sized(&rw, 48, &[]);
    let content = tmp.path().join("content");
    std::fs::create_dir(&content).unwrap();
    std::fs::write(content.join("hello.txt"), "own hello\n").unwrap();
    let ro = tmp.path().join("ref.ext4");
    volume_create_sized(&ro, 24, &["--from-dir", content.to_str().unwrap()]);
    let rw_spec = format!("{}:/work", rw.display());
    let ro_spec = format!("{}:/ref:ro", ro.display());

    let data = tempfile::Builder::new().prefix("forkd-ownvol-data-").tempdir_in("/tmp").unwrap();
    let opts = Options {
        data_dir: Some(data.path().to_path_buf()),
        extra_args: vec!["--volume-root".into(), tmp.path().display().to_string()],
        ..Default::default()
    };
    let mut d = Daemon::start(opts.clone());
    post_ok(&d, "/v1/snapshots", json!({ "tag": "plain", "image": "minimal" })).await;
    wait_ready(&d, "plain").await;
    let info: Value = d.get("/v1/snapshots/plain/info").send().await.unwrap().json().await.unwrap();
    assert_eq!(info["volume_slots"], 4, "{info}");

    // Bad requests change nothing.
    let five: Vec<String> = (0..5)
        .map(|i| {
            let f = tmp.path().join(format!("v{i}.ext4"));
            std::fs::write(&f, b"").unwrap();
            format!("{}:/m{i}:ro", f.display())
        })
        .collect();
    let r = fork_with(&d, "plain", 1, &five).await;
    assert_eq!(r.status(), 409, "more volumes than spare slots");
    assert!(r.text().await.unwrap().contains("4 spare volume slot"));
    let r = fork_with(&d, "plain", 1, &[format!("{}/missing.ext4:/m", tmp.path().display())]).await;
    assert_eq!(r.status(), 400);
    assert_eq!(fork_with(&d, "plain", 2, std::slice::from_ref(&rw_spec)).await.status(), 409, "rw with n=2");
    let listed: Value = d.get("/v1/sandboxes").send().await.unwrap().json().await.unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 0, "{listed}");

    // A sandbox with a read-write volume of its own, at the volume's real size.
    let first = ids_of(fork_with(&d, "plain", 1, std::slice::from_ref(&rw_spec)).await).await.remove(0);
    let kib = fs_kib(&d, &first, "/work").await;
    assert!((40_000..=49_152).contains(&kib), "/work is {kib} KiB, the volume is 48 MiB");
    assert_eq!(sh(&d, &first, "echo one > /work/note && cat /work/note").await["stdout"], "one\n");
    let sb: Value = d.get(&format!("/v1/sandboxes/{first}")).send().await.unwrap().json().await.unwrap();
    assert_eq!(sb["volumes"], json!([rw_spec.clone()]));
    let r = fork_with(&d, "plain", 1, std::slice::from_ref(&rw_spec)).await;
    assert_eq!(r.status(), 409, "a second concurrent read-write attach");
    assert!(r.text().await.unwrap().contains(&first));
    d.delete(&format!("/v1/sandboxes/{first}")).send().await.unwrap();

    // Three children share a read-only volume of their own.
    let kids = ids_of(fork_with(&d, "plain", 3, std::slice::from_ref(&ro_spec)).await).await;
    for k in &kids {
        assert_eq!(sh(&d, k, "cat /ref/hello.txt").await["stdout"], "own hello\n");
        assert_ne!(sh(&d, k, "echo x > /ref/w").await["exit_code"], 0, "read-only volume writable in {k}");
    }
    // A branch of one of them keeps the volume mounted in its children.
    let b =
        post_ok(&d, &format!("/v1/sandboxes/{}/branch", kids[0]), json!({ "tag": "with-ref", "mode": "diff" })).await;
    assert_eq!(b["volumes"], json!([ro_spec.clone()]), "{b}");
    wait_ready(&d, "with-ref").await;
    let grandchild = ids_of(fork(&d, "with-ref", 1).await).await.remove(0);
    assert_eq!(sh(&d, &grandchild, "cat /ref/hello.txt").await["stdout"], "own hello\n");
    d.post("/v1/sandboxes/delete", json!({ "all": true })).send().await.unwrap();

    // A workspace: its volume survives suspend, a daemon crash and resume,
    // and stays reserved for it while it is suspended.
    let ws =
        post_ok(&d, "/v1/workspaces", json!({ "name": "vw", "snapshot_tag": "plain", "volumes": [rw_spec] })).await;
    assert_eq!(ws["volumes"], json!([rw_spec.clone()]));
    let live = ws["live_sandbox_id"].as_str().unwrap().to_string();
    assert_eq!(sh(&d, &live, "cat /work/note && echo two >> /work/note").await["stdout"], "one\n");
    post_ok(&d, "/v1/workspaces/vw/suspend", json!({})).await;
    let r = fork_with(&d, "plain", 1, std::slice::from_ref(&rw_spec)).await;
    assert_eq!(r.status(), 409, "the suspended workspace keeps its read-write volume");
    let err: Value = r.json().await.unwrap();
    assert!(err["error"].as_str().unwrap().contains("workspace \"vw\""), "{err}");

    d.crash();
    let d = Daemon::start(opts);
    assert_eq!(fork_with(&d, "plain", 1, std::slice::from_ref(&rw_spec)).await.status(), 409, "after a restart too");
    let ws = post_ok(&d, "/v1/workspaces/vw/resume", json!({})).await;
    assert_eq!(ws["volumes"], json!([rw_spec.clone()]));
    let live = ws["live_sandbox_id"].as_str().unwrap().to_string();
    let sb: Value = d.get(&format!("/v1/sandboxes/{live}")).send().await.unwrap().json().await.unwrap();
    assert_eq!(sb["volumes"], json!([rw_spec.clone()]));
    assert_eq!(sh(&d, &live, "cat /work/note && echo three >> /work/note").await["stdout"], "one\ntwo\n");
    let r = d.delete("/v1/workspaces/vw").send().await.unwrap();
    assert_eq!(r.status(), 200);

    // Deleting the workspace frees the volume, and its writes are on disk.
    let last = ids_of(fork_with(&d, "plain", 1, std::slice::from_ref(&rw_spec)).await).await.remove(0);
    assert_eq!(sh(&d, &last, "cat /work/note").await["stdout"], "one\ntwo\nthree\n");
    d.post("/v1/sandboxes/delete", json!({ "all": true })).send().await.unwrap();
}
