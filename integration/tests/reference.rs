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

    // The reference's snapshot request: kernel + rootfs + rw + tap + boot_wait_secs.
    let (s, v) = call(
        &d,
        post.clone(),
        "/v1/snapshots",
        json!({ "tag": "ref", "kernel": kernel, "rootfs": rootfs, "rw": true, "tap": "forkd-tap0",
                "boot_wait_secs": 2, "wait": true }),
    )
    .await;
    assert_eq!(s, 201, "created (and waited for): {v}");
    assert_eq!(v["status"], "ready", "{v}");
    assert!(v["warning"].as_str().unwrap().contains("tap \"forkd-tap0\" ignored"), "{v}");
    assert!(v["warm_ms"].as_f64().unwrap() >= 2000.0, "boot_wait_secs is a least warm-up: {v}");
    assert_eq!(v["dir"], d.data_dir.join("snapshots/ref").display().to_string().as_str(), "{v}");
    assert_eq!(v["bootable"], true);
    assert!(v["vmstate_bytes"].as_u64().unwrap() > 0, "{v}");
    let info: Value = d.get("/v1/snapshots/ref/info").send().await.unwrap().json().await.unwrap();
    assert!(info["vmstate_bytes"].as_u64().unwrap() > 0 && info["pause_ms"].is_u64(), "{info}");

    // What has no meaning here is refused, naming the field and the way out.
    for (body, status, field, hint) in [
        (json!({ "tag": "k2", "kernel": "/boot/vmlinuz-other", "rootfs": rootfs }), 409, "kernel", "omit `kernel`"),
        (json!({ "tag": "k3", "rootfs": rootfs, "rw": false }), 400, "rw", "omit `rw`"),
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
