//! Requests written the way the reference forkd's users write them (its
//! documented REST fields), replayed against a real daemon with real VMs:
//! each is taken with its nearest meaning here, or refused with an error
//! that names the field and what to do instead; the reference's response
//! fields are there next to ours.

mod common;

use common::*;
use forkd_integration::{Daemon, Options, guest_dir};
use serde_json::{Value, json};

async fn call(d: &Daemon, method: reqwest::Method, path: &str, body: Value) -> (u16, Value) {
    let r = d.http().request(method, format!("{}{path}", d.http_url())).json(&body).send().await.unwrap();
    let s = r.status().as_u16();
    let text = r.text().await.unwrap();
    (s, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reference_requests_work_or_say_what_to_do() {
    let _serial = serial().await;
    let d = Daemon::start(Options::default());
    let post = reqwest::Method::POST;
    let kernel = guest_dir().join("vmlinux").display().to_string();
    let rootfs = guest_dir().join("images/minimal.ext4").display().to_string();

    // The reference's snapshot request: kernel + rootfs + rw + tap + boot_wait_secs
    // (rw false is what its MCP server sends by default).
    let (s, v) = call(
        &d,
        post.clone(),
        "/v1/snapshots",
        json!({ "tag": "ref", "kernel": kernel, "rootfs": rootfs, "rw": false, "tap": "forkd-tap0",
                "boot_wait_secs": 2 }),
    )
    .await;
    assert_eq!(s, 201, "created and, in the reference's form, waited for: {v}");
    assert_eq!(v["status"], "ready", "{v}");
    let warning = v["warning"].as_str().unwrap();
    assert!(warning.contains("tap \"forkd-tap0\" ignored") && warning.contains("rw false has no effect"), "{v}");
    assert!(v["warm_ms"].as_f64().unwrap() >= 2000.0, "boot_wait_secs is a least warm-up: {v}");
    assert_eq!(v["dir"], d.data_dir.join("snapshots/ref").display().to_string().as_str(), "{v}");
    assert_eq!(v["bootable"], true);
    assert!(v["vmstate_bytes"].as_u64().unwrap() > 0, "{v}");
    let info: Value = d.get("/v1/snapshots/ref/info").send().await.unwrap().json().await.unwrap();
    assert!(info["vmstate_bytes"].as_u64().unwrap() > 0 && info["pause_ms"].is_u64(), "{info}");

    // What has no meaning here is refused, naming the field and the way out.
    for (body, status, field, hint) in [
        (json!({ "tag": "k2", "kernel": "/boot/vmlinuz-other", "rootfs": rootfs }), 409, "kernel", "omit `kernel`"),
        (json!({ "tag": "k4", "rootfs": rootfs, "image": "python" }), 400, "rootfs", "different images"),
        (json!({ "tag": "k5", "rootfs": "/etc/passwd" }), 400, "rootfs", "image store"),
    ] {
        let (s, v) = call(&d, post.clone(), "/v1/snapshots", body.clone()).await;
        assert_eq!(s, status, "{body}: {v}");
        let msg = v["error"].as_str().unwrap();
        assert!(msg.contains(field) && msg.contains(hint), "{body}: {msg}");
        assert_eq!(
            d.get(&format!("/v1/snapshots/{}", body["tag"].as_str().unwrap())).send().await.unwrap().status(),
            404
        );
    }

    // Spawn: per_child_netns alone is a private namespace per child without egress.
    let (s, v) =
        call(&d, post.clone(), "/v1/sandboxes", json!({ "snapshot_tag": "ref", "n": 1, "per_child_netns": true }))
            .await;
    assert_eq!(s, 201, "{v}");
    let child = &v[0];
    let child_ns = child["netns"].as_str().unwrap().to_string();
    assert_eq!(child["network"], "nat", "{child}");
    assert!(child["netns"].as_str().unwrap().starts_with("forkd-"), "{child}");
    assert!(child["guest_addr"].as_str().unwrap().starts_with("198.18."), "{child}");
    assert_eq!(child["allow"], json!([]), "no egress: {child}");
    for (field, hint) in [("live_fork", "branch the running sandbox"), ("hugepages", "huge")] {
        let (s, v) = call(&d, post.clone(), "/v1/sandboxes", json!({ "snapshot_tag": "ref", field: true })).await;
        assert_eq!(s, 409, "{field}: {v}");
        assert_eq!(v["code"], "FAILED_PRECONDITION", "{field}: {v}");
        assert!(v["error"].as_str().unwrap().contains(hint), "{field}: {v}");
    }

    // Branch: live + parent_tag, not waited for; the snapshot becomes ready.
    let id = fork(&d, "ref", 1).await.remove(0);
    let (s, v) = call(
        &d,
        post.clone(),
        &format!("/v1/sandboxes/{id}/branch"),
        json!({ "tag": "b-live", "live": true, "parent_tag": "ref", "wait": false }),
    )
    .await;
    assert_eq!(s, 202, "accepted: the layer is still being written: {v}");
    assert_eq!(v["kind"], "diff", "a live branch is forkd's lowest-pause (diff) branch: {v}");
    assert!(v["pause_ms"].is_u64(), "pause_ms is a whole number of ms: {v}");
    wait_ready(&d, "b-live").await;
    let b: Value = d.get("/v1/snapshots/b-live").send().await.unwrap().json().await.unwrap();
    assert!(b["diff_ms"].as_f64().unwrap() > 0.0 && b["diff_logical_bytes"].as_u64().unwrap() == 256 << 20, "{b}");
    assert_eq!(b["diff_physical_bytes"], b["dirty_bytes"]);
    let src: Value = d.get(&format!("/v1/sandboxes/{id}")).send().await.unwrap().json().await.unwrap();
    assert_eq!((src["has_branched"].as_bool(), src["branch_count"].as_u64()), (Some(true), Some(1)), "{src}");
    let listed = list(&d).await.into_iter().find(|s| s["id"] == id.as_str()).unwrap();
    assert_eq!(listed["branch_count"], 1, "listings carry the count too: {listed}");
    let (s, v) = call(&d, post.clone(), &format!("/v1/sandboxes/{id}/branch"), json!({ "mode": "live" })).await;
    assert_eq!(s, 201, "mode \"live\" as well: {v}");
    let (s, v) =
        call(&d, post.clone(), &format!("/v1/sandboxes/{id}/branch"), json!({ "tag": "b2", "parent_tag": "other" }))
            .await;
    assert_eq!(s, 409, "{v}");
    assert!(v["error"].as_str().unwrap().contains("was forked from \"ref\""), "{v}");
    // The reference's `diff` and `measure_diff`: diff false is a full branch,
    // measure_diff a full branch with the diff figures every branch has.
    let branch = format!("/v1/sandboxes/{id}/branch");
    let (s, v) = call(&d, post.clone(), &branch, json!({ "tag": "b-flat", "diff": false })).await;
    assert_eq!((s, v["kind"].as_str()), (201, Some("full")), "{v}");
    let (s, v) = call(&d, post.clone(), &branch, json!({ "tag": "b-measured", "measure_diff": true })).await;
    assert_eq!((s, v["tag"].as_str(), v["kind"].as_str()), (201, Some("b-measured"), Some("full")), "{v}");
    assert!(v["diff_physical_bytes"].as_u64().unwrap() > 0, "{v}");
    let (s, v) = call(&d, post.clone(), &branch, json!({ "mode": "measure" })).await;
    assert_eq!((s, v["tag"].as_str()), (201, Some("")), "forkd's measure without a branch: {v}");
    assert!(v["dirty_bytes"].as_u64().unwrap() > 0, "{v}");
    for (body, field) in [
        (json!({ "diff": true, "mode": "full" }), "diff"),
        (json!({ "mode": "diff", "measure_diff": true }), "measure_diff"),
        (json!({ "diff": true, "measure_diff": true }), "measure_diff"),
        (json!({ "live": true, "measure_diff": true }), "measure_diff"),
    ] {
        let (s, v) = call(&d, post.clone(), &branch, body.clone()).await;
        assert_eq!(s, 400, "{body}: {v}");
        assert!(v["error"].as_str().unwrap().contains(field), "{body}: {v}");
    }
    let (s, v) = call(&d, post.clone(), &format!("/v1/sandboxes/{id}/ping"), json!({})).await;
    assert_eq!((s, v["pong"].as_bool(), v["ok"].as_bool()), (200, Some(true), Some(true)), "{v}");

    // Workspaces: per_child_netns on create; suspend's diff says what it does here.
    let (s, v) = call(
        &d,
        post.clone(),
        "/v1/workspaces",
        json!({ "name": "w", "snapshot_tag": "ref", "per_child_netns": true }),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["network"], "nat", "{v}");
    let (s, v) = call(&d, post.clone(), "/v1/workspaces/w/suspend", json!({ "diff": true })).await;
    assert_eq!(s, 409, "{v}");
    assert!(v["error"].as_str().unwrap().contains("flat snapshot"), "{v}");
    let (s, v) = call(&d, post.clone(), "/v1/workspaces/w/suspend", json!({ "diff": false })).await;
    assert_eq!(s, 200, "{v}");

    // The CLI's reference forms of the snapshot verb.
    let (code, out, err) = cli_output(
        &d,
        &[
            "snapshot",
            "--tag",
            "cli-ref",
            "--rootfs",
            &rootfs,
            "--kernel",
            &kernel,
            "--mem-size-mib",
            "192",
            "--boot-wait-secs",
            "1",
            "--json",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let snap: Value = serde_json::from_str(&out).unwrap();
    assert_eq!((snap["status"].as_str(), snap["mem_mib"].as_u64()), (Some("ready"), Some(192)), "{snap}");

    // `spawn --n N --settle-secs S`: fork, settle, report the alive count, shut down.
    let before = list(&d).await.len();
    let (code, out, err) = cli_output(&d, &["spawn", "--tag", "ref", "--n", "2", "--settle-secs", "1"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("alive after 1 s: 2/2 (shut down)"), "{out}");
    assert_eq!(list(&d).await.len(), before, "the children were shut down");
    let (code, out, err) =
        cli_output(&d, &["spawn", "--tag", "ref", "--n", "1", "--settle-secs", "0", "--keep-workdir", "--json"]);
    assert_eq!(code, 0, "{err}");
    let kept: Value = serde_json::from_str(&out).unwrap();
    assert_eq!((kept["alive"].as_u64(), kept["kept"].as_bool()), (Some(1), Some(true)), "{kept}");
    assert_eq!(list(&d).await.len(), before + 1, "--keep-workdir leaves the child running");

    // `quickstart --yes -n 2`: preflight, bake what is missing, fork, each child speaks, kill.
    let (code, out, err) = cli_output(&d, &["quickstart", "--yes", "-n", "2", "--tag", "qs"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("bake a warmed python snapshot") && out.contains("forked 2 in"), "{out}");
    assert!(out.contains("2/2 answered"), "{out}");
    let (code, out, _) = cli_output(&d, &["quickstart", "--yes", "-n", "1", "--tag", "qs"]);
    assert_eq!(code, 0);
    assert!(!out.contains("Missing:"), "nothing left to set up the second time: {out}");

    // `wp-bench`: the write-protect copy probe, with writes racing the copy.
    let (code, out, err) = cli_output(&d, &["wp-bench", "--region-mib", "8", "--dirty-pages", "200", "--json"]);
    assert_eq!(code, 0, "{err}");
    let wp: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(wp["consistent"], true, "{wp}");
    assert_eq!(wp["pages"], 2048);
    assert_eq!(
        wp["pages_captured_by_fault"].as_u64().unwrap() + wp["pages_captured_by_bulk"].as_u64().unwrap(),
        2048,
        "{wp}"
    );

    // Status codes: a delete is 204 without a body (200 with it on request);
    // deleting a sandbox that is not there is 404.
    let kept_id = kept["ids"][0].as_str().unwrap().to_string();
    let r = d.http().delete(format!("{}/v1/sandboxes/{kept_id}", d.http_url())).send().await.unwrap();
    assert_eq!(r.status(), 204);
    assert!(r.text().await.unwrap().is_empty());
    let r = d.http().delete(format!("{}/v1/sandboxes/{kept_id}", d.http_url())).send().await.unwrap();
    assert_eq!(r.status(), 404, "already gone");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["code"], "NOT_FOUND", "{v}");

    // Networks are host resources: leave none behind for the tests after this one.
    let r = d.delete("/v1/workspaces/w").send().await.unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let (s, v) = call(&d, post, "/v1/sandboxes/delete", json!({ "all": true })).await;
    assert_eq!(s, 200, "{v}");
    let leaks = settled_leaks(&d.data_dir, &Default::default(), std::time::Duration::from_secs(20)).await;
    assert!(leaks.iter().all(|l| !l.contains(&child_ns)), "{leaks:?}");
}

/// Runs the CLI against `d` in `dir`: (exit code, stdout, stderr).
fn cli_in(d: &Daemon, dir: &std::path::Path, args: &[&str]) -> (i32, String, String) {
    let out = d.cli().current_dir(dir).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reference_cli_forms_for_images_runs_and_archives() {
    let _serial = serial().await;
    let s3 = forkd_integration::s3::S3Server::start("hub").await;
    let d = Daemon::start(Options::default());
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    let kernel = guest_dir().join("vmlinux").display().to_string();

    // `parent build IMAGE -o FILE --size-mib N`: the image is named after the
    // file, and `snapshot --rootfs ./FILE` finds it.
    let (code, out, err) = cli_in(
        &d,
        dir,
        &["parent", "build", "minimal", "--run", "echo built > /marker", "-o", "tools.ext4", "--size-mib", "1536"],
    );
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(err.contains("--size-mib 1536 ignored") && err.contains("kept in the daemon's store as tools"), "{err}");
    let (code, out, err) =
        cli_in(&d, dir, &["snapshot", "--tag", "tools", "--rootfs", "./tools.ext4", "--boot-wait-secs", "0", "--json"]);
    assert_eq!(code, 0, "{out}\n{err}");
    let snap: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(snap["status"], "ready", "{snap}");
    let ids = fork(&d, "tools", 1).await;
    let v = post_ok(&d, &format!("/v1/sandboxes/{}/exec", ids[0]), json!({ "args": ["cat", "/marker"] })).await;
    assert_eq!(v["stdout"], "built\n", "the snapshot runs the image built: {v}");
    // A bare NAME.ext4 is also one of the daemon's own images (archives
    // carry snapshots of those: the importing host has the same image).
    let (code, out, err) =
        cli_in(&d, dir, &["snapshot", "--tag", "mini", "--rootfs", "minimal.ext4", "--boot-wait-secs", "0"]);
    assert_eq!(code, 0, "{out}\n{err}");

    // `run --image I --extra P --kernel K --tap T --cache D -- CMD`.
    let (code, out, err) = cli_in(
        &d,
        dir,
        &[
            "run",
            "--image",
            "python",
            "--kernel",
            &kernel,
            "--tap",
            "forkd-tap0",
            "--cache",
            "/var/cache/x",
            "--",
            "python3",
            "-c",
            "print(6*7)",
        ],
    );
    assert_eq!((code, out.as_str()), (0, "42\n"), "{err}");
    assert!(err.contains("--tap forkd-tap0 ignored") && err.contains("--cache /var/cache/x ignored"), "{err}");
    let (code, _, err) =
        cli_in(&d, dir, &["run", "--image", "python", "--kernel", "/boot/vmlinuz-other", "--", "true"]);
    assert_eq!(code, 4, "another kernel is refused (409): {err}");
    assert!(err.contains("kernel"), "{err}");

    // `pack --tag T [--out F] --description D --base-image B`; the default name.
    let (code, _, err) = cli_in(
        &d,
        dir,
        &["pack", "--tag", "mini", "--description", "tools for tests", "--base-image", "debian:bookworm"],
    );
    assert_eq!(code, 0, "{err}");
    let archive = dir.join("mini.forkd-snapshot.tar.zst");
    assert!(archive.is_file(), "the reference's default archive name");
    let (code, _, err) = cli_in(&d, dir, &["pack", "--tag", "mini", "--out", "t2.tar.zst"]);
    assert_eq!(code, 0, "{err}");
    assert!(dir.join("t2.tar.zst").is_file());
    let (code, _, err) = cli_in(&d, dir, &["pack", "--tag", "mini", "--description", "two\nlines"]);
    assert_eq!(code, 2, "a note is one line: {err}");

    // `unpack FILE --tag T [--force]`.
    let (code, out, err) = cli_in(&d, dir, &["unpack", "mini.forkd-snapshot.tar.zst", "--tag", "mini2"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("description: tools for tests") && out.contains("base image: debian:bookworm"), "{out}");
    let (code, _, err) = cli_in(&d, dir, &["unpack", "mini.forkd-snapshot.tar.zst", "--tag", "mini2"]);
    assert_eq!(code, 4, "the tag exists: {err}");
    let (code, _, err) = cli_in(&d, dir, &["unpack", "mini.forkd-snapshot.tar.zst", "--tag", "mini2", "--force"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("replaced snapshot mini2"), "{err}");

    // `push --tag T URL`: one HTTP PUT to a presigned upload URL; `pull URL`
    // from a presigned download URL; `pull OWNER/NAME --hub H` from a static
    // web server.
    let put = s3.presign("put_object", "hub", "team/mini.forkd-snapshot.tar.zst");
    let get = s3.presign("get_object", "hub", "team/mini.forkd-snapshot.tar.zst");
    let (code, out, err) = cli_in(&d, dir, &["push", "--tag", "mini", &put, "--description", "from the hub", "--json"]);
    assert_eq!(code, 0, "{err}");
    let pushed: Value = serde_json::from_str(&out).unwrap();
    assert!(pushed["bytes"].as_u64().unwrap() > 0 && pushed["http_status"] == 200, "{pushed}");
    assert!(!pushed["url"].as_str().unwrap().contains("Signature"), "the URL's credentials are not shown: {pushed}");
    let (code, out, err) = cli_in(&d, dir, &["pull", &get, "--tag", "mini3"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("as snapshot mini3") && out.contains("description: from the hub"), "{out}");
    let unsigned = format!("http://{}/hub/team/mini.forkd-snapshot.tar.zst", s3.addr);
    let (code, _, err) = cli_in(&d, dir, &["pull", &unsigned, "--tag", "mini4"]);
    assert_eq!(code, 5, "the store refuses an unsigned download (403): {err}");
    assert!(err.contains("HTTP 403"), "{err}");
    let site = dir.join("site");
    std::fs::create_dir_all(site.join("team")).unwrap();
    std::fs::copy(&archive, site.join("team/mini.forkd-snapshot.tar.zst")).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut web = std::process::Command::new("python3")
        .args(["-m", "http.server", "--bind", "127.0.0.1", &port.to_string(), "--directory"])
        .arg(&site)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let hub = format!("http://127.0.0.1:{port}");
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let (code, out, err) =
        cli_in(&d, dir, &["pull", "team/mini", "--hub", &hub, "--tag", "mini3", "--force", "--json"]);
    assert_eq!(code, 0, "{err}");
    let pulled: Value = serde_json::from_str(&out).unwrap();
    assert_eq!((pulled["tag"].as_str(), pulled["description"].as_str()), (Some("mini3"), Some("tools for tests")));
    let (code, _, err) = cli_in(&d, dir, &["pull", &format!("{hub}/team/missing.tar.zst")]);
    assert_eq!(code, 3, "a missing archive is not found: {err}");
    let _ = web.kill();
    let _ = web.wait();
    let (code, _, err) = cli_in(&d, dir, &["pull", "team/mini", "--tag", "mini4"]);
    assert_eq!(code, 2, "no default hub: {err}");
    assert!(err.contains("--hub"), "{err}");
    let (code, _, err) = cli_in(&d, dir, &["push", "mini", "ftp://example/x"]);
    assert_eq!(code, 2, "{err}");
    for tag in ["mini2", "mini3"] {
        let r = d.get(&format!("/v1/snapshots/{tag}")).send().await.unwrap();
        assert_eq!(r.status(), 200, "{tag}");
    }
    // A fork of the pulled snapshot runs.
    let ids = fork(&d, "mini3", 1).await;
    let v = post_ok(&d, &format!("/v1/sandboxes/{}/exec", ids[0]), json!({ "args": ["echo", "pulled"] })).await;
    assert_eq!(v["stdout"], "pulled\n", "{v}");

    // `from-image REF --tag T`.
    let (code, out, err) = cli_in(&d, dir, &["from-image", "tools", "--tag", "fi", "--json"]);
    assert_eq!(code, 0, "{out}\n{err}");
    let (s, v) = call(&d, reqwest::Method::POST, "/v1/sandboxes/delete", json!({ "all": true })).await;
    assert_eq!(s, 200, "{v}");
    let leftovers: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("forkd-push-") || n.starts_with("forkd-pull-"))
        .collect();
    assert!(leftovers.is_empty(), "temporary archives are removed: {leftovers:?}");
}
