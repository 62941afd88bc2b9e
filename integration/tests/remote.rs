//! Snapshots through an object store, between daemons with their own data
//! dirs (two hosts): against a real S3 API server (moto, installed by
//! scripts/setup-s3.sh) and against a `file://` remote. A branch pushed on
//! one node is forked on another, which pulls it on the fork; a re-push
//! uploads nothing; pulls cut off mid-transfer (the store gone, the daemon
//! killed) leave nothing visible and succeed when retried; a remote that
//! holds corrupt or hostile files is refused.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{bake, branch, cli_output, eval, fork, fork_with, leaks, sh, wait_ready};
use forkd_integration::s3::{CutProxy, S3Server};
use forkd_integration::{Daemon, Options, TEST_TOKEN};
use serde_json::{Value, json};

const TENANT: &str = "q7Ww2eR5tY8uI1oP4aS6dF9gH3jK0lZx";

fn remote_opts(remote: &str, env: Vec<(String, String)>) -> Options {
    Options { extra_args: vec!["--remote".into(), remote.into()], env, ..Default::default() }
}

fn cli_json(d: &Daemon, args: &[&str]) -> Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let (code, out, err) = cli_output(d, &all);
    assert_eq!(code, 0, "forkd {args:?}: {out} {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("forkd {args:?}: {e}: {out}"))
}

async fn snapshot(d: &Daemon, tag: &str) -> (u16, Value) {
    let r = d.get(&format!("/v1/snapshots/{tag}")).send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

async fn post(d: &Daemon, path: &str, body: Value) -> (u16, Value) {
    let r = d.post(path, body).send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

/// Waits until a pull's staging dir holds a memory file being written.
async fn pull_in_flight(data_dir: &Path) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let staging = data_dir.join("staging");
        for e in std::fs::read_dir(&staging).into_iter().flatten().flatten() {
            if e.file_name().to_string_lossy().starts_with("pull.") && e.path().join("snapshots/py/mem").exists() {
                return;
            }
        }
        assert!(Instant::now() < deadline, "no pull reached its memory file");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Nothing of `tags` is visible on `d`, and its data dir holds nothing
/// half-done (staging, ledger rows, VMMs).
async fn nothing_visible(d: &Daemon, tags: &[&str]) {
    for t in tags {
        let (status, v) = snapshot(d, t).await;
        assert_eq!(status, 404, "{t} is visible: {v}");
    }
    let l = leaks(&d.data_dir, &Default::default());
    let l: Vec<_> = l.into_iter().filter(|x| !x.starts_with("cgroup")).collect();
    assert!(l.is_empty(), "left behind: {l:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_branch_pushed_on_one_node_forks_on_another_through_s3() {
    let _serial = common::serial().await;
    let s3 = S3Server::start("forkd").await;
    let proxy = CutProxy::start(s3.addr).await;
    let remote = "s3://forkd/nodes";
    let a = Daemon::start(remote_opts(remote, S3Server::env(s3.addr)));
    let b = Daemon::start(remote_opts(remote, S3Server::env(s3.addr)));

    // Node A: bake python, write a file and set a variable in a child,
    // branch it, push the branch.
    bake(&a, "py").await;
    let child = fork(&a, "py", 1).await.remove(0);
    assert_eq!(sh(&a, &child, "echo travelled > /root/note; sync").await["exit_code"], 0);
    eval(&a, &child, "marker = 41").await;
    branch(&a, &child, "pyb", "diff").await;
    let first = cli_json(&a, &["push", "pyb"]);
    assert_eq!(first["uploaded_blobs"], 4, "py's state and memory, pyb's state and layer: {first}");
    assert_eq!(first["present_blobs"], 0, "{first}");
    assert_eq!(first["manifest_written"], true, "{first}");
    assert!(first["uploaded_bytes"].as_u64().unwrap() > 0);
    let objects = s3.objects("forkd").await;
    let keys: Vec<_> = objects.iter().map(|o| o.0.as_str()).collect();
    assert_eq!(keys.len(), 5, "{keys:?}");
    assert!(keys.contains(&"nodes/tags/pyb.json"), "{keys:?}");
    assert_eq!(keys.iter().filter(|k| k.starts_with("nodes/blobs/sha256/")).count(), 4, "{keys:?}");
    assert!(objects.iter().any(|o| o.1 > 8 << 20), "python's memory goes up in parts (multipart): {objects:?}");

    // A second push uploads nothing: the same objects, not rewritten.
    let again = cli_json(&a, &["push", "pyb"]);
    assert_eq!(again["uploaded_blobs"], 0, "{again}");
    assert_eq!(again["uploaded_bytes"], 0, "{again}");
    assert_eq!(again["present_blobs"], 4, "{again}");
    assert_eq!(again["manifest_written"], false, "{again}");
    assert_eq!(s3.objects("forkd").await, objects, "a re-push changed the bucket");

    // Node B forks the tag it does not have: the fork pulls it first.
    let listed = cli_json(&b, &["remote", "ls"]);
    assert_eq!(listed["snapshots"][0]["tag"], "pyb", "{listed}");
    assert_eq!(snapshot(&b, "pyb").await.0, 404);
    let t = Instant::now();
    let kids = fork(&b, "pyb", 2).await;
    let remote_fork = t.elapsed();
    for k in &kids {
        assert_eq!(sh(&b, k, "cat /root/note").await["stdout"], "travelled\n");
        assert_eq!(eval(&b, k, "marker + 1").await, "42");
        assert_eq!(sh(&b, k, "hostname").await["stdout"], format!("{k}\n"), "its own identity");
    }
    for tag in ["py", "pyb"] {
        let ((_, sa), (status, sb)) = (snapshot(&a, tag).await, snapshot(&b, tag).await);
        assert_eq!(status, 200, "{tag} on B: {sb}");
        for k in ["memory_digest", "state_digest", "kind", "parent_tag"] {
            assert_eq!(sa[k], sb[k], "{tag}.{k}");
        }
    }
    let t = Instant::now();
    fork(&b, "pyb", 2).await;
    eprintln!("fork of 2 on node B: {remote_fork:?} with the pull, {:?} once local", t.elapsed());

    // Node C reaches the store through a proxy that the test cuts.
    let c_dir = tempfile::Builder::new().prefix("forkd-remote-c-").tempdir_in("/tmp").unwrap();
    let c_opts =
        || Options { data_dir: Some(c_dir.path().to_path_buf()), ..remote_opts(remote, S3Server::env(proxy.addr)) };
    let mut c = Daemon::start(c_opts());

    // The store goes away mid-pull: the pull fails, nothing is visible.
    let (http, url, bearer) = (c.http(), format!("{}/v1/snapshots/pull", c.http_url()), c.bearer());
    let pull = move || {
        let (http, url, bearer) = (http.clone(), url.clone(), bearer.clone());
        tokio::spawn(async move {
            let mut rb = http.post(url).json(&json!({ "tag": "pyb" }));
            if let Some(t) = bearer {
                rb = rb.header("authorization", t);
            }
            match rb.send().await {
                Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
                Err(e) => (0, e.to_string()),
            }
        })
    };
    let running = pull();
    pull_in_flight(&c.data_dir).await;
    proxy.cut();
    let (status, body) = running.await.unwrap();
    assert_eq!(status, 503, "a pull whose store went away: {body}");
    nothing_visible(&c, &["py", "pyb"]).await;
    proxy.restore();

    // The daemon dies mid-pull: after a restart nothing is visible.
    let running = pull();
    pull_in_flight(&c.data_dir).await;
    c.crash();
    let _ = running.await;
    let c = Daemon::start(c_opts());
    nothing_visible(&c, &["py", "pyb"]).await;

    // The retry succeeds.
    let pulled = cli_json(&c, &["pull", "pyb"]);
    assert_eq!(pulled["tag"], "pyb");
    assert_eq!(pulled["parent_tag"], "py");
    let k = fork(&c, "pyb", 1).await.remove(0);
    assert_eq!(sh(&c, &k, "cat /root/note").await["stdout"], "travelled\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_remotes_share_pulls_refuse_corruption_and_stay_the_operators() {
    let _serial = common::serial().await;
    let work = tempfile::Builder::new().prefix("forkd-remote-").tempdir_in("/tmp").unwrap();
    let dir = work.path().join("remote");
    let remote = format!("file://{}", dir.display());
    let tokens = work.path().join("tokens.toml");
    std::fs::write(&tokens, format!("[[tokens]]\nname = \"team-a\"\nrole = \"tenant\"\ntoken = \"{TENANT}\"\n"))
        .unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tokens, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let mut a_opts = remote_opts(&remote, vec![]);
    a_opts.token = Some(TEST_TOKEN.into());
    a_opts.extra_args.extend(["--tokens-file".into(), tokens.display().to_string()]);
    let a = Daemon::start(a_opts);
    let b = Daemon::start(remote_opts(&remote, vec![]));

    let (status, _) = post(&a, "/v1/snapshots", json!({ "tag": "m", "image": "minimal" })).await;
    assert_eq!(status, 202);
    wait_ready(&a, "m").await;
    let child = fork(&a, "m", 1).await.remove(0);
    assert_eq!(sh(&a, &child, "echo layered > /root/l; sync").await["exit_code"], 0);
    branch(&a, &child, "m2", "diff").await;

    // Clients never choose where the daemon writes; tenants do not push.
    let (status, v) = post(&a, "/v1/snapshots/m/push", json!({ "remote": "file:///etc/forkd-x" })).await;
    assert_eq!((status, v["code"].as_str()), (400, Some("INVALID_ARGUMENT")), "{v}");
    assert!(!Path::new("/etc/forkd-x").exists());
    let as_tenant =
        |path: &str| a.anon().post(format!("{}{path}", a.http_url())).bearer_auth(TENANT).json(&json!({})).send();
    assert_eq!(as_tenant("/v1/snapshots/m/push").await.unwrap().status(), 404, "not the tenant's to see");
    let (status, v) = post(&a, "/v1/snapshots/m/share", json!({ "shared": true })).await;
    assert_eq!(status, 200, "{v}");
    let r = as_tenant("/v1/snapshots/m/push").await.unwrap();
    assert_eq!(r.status(), 403, "a remote's tags are every node's: admins push");
    let (status, v) = post(&a, "/v1/snapshots/m/push", json!({})).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["uploaded_blobs"], 2, "{v}");
    let (status, v) = post(&a, "/v1/snapshots/m2/push", json!({})).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!((v["uploaded_blobs"].as_u64(), v["present_blobs"].as_u64()), (Some(2), Some(2)), "only m2's own: {v}");

    // Forks that must not pull do not.
    let r = d_post_status(&b, "/v1/sandboxes", json!({ "snapshot_tag": "m", "pull_missing": false })).await;
    assert_eq!(r, 404);
    // Three forks of the missing tag at once share one pull.
    let (x, y, z) = tokio::join!(
        fork_with(&b, "m", 1, json!({})),
        fork_with(&b, "m", 1, json!({})),
        fork_with(&b, "m", 1, json!({}))
    );
    assert_eq!(x.len() + y.len() + z.len(), 3);
    // m is here now: pulling m2 fetches only its layer, over the m B has.
    let m2 = cli_json(&b, &["pull", "m2"]);
    assert_eq!(m2["parent_tag"], "m", "{m2}");
    let k = fork(&b, "m2", 1).await.remove(0);
    assert_eq!(sh(&b, &k, "cat /root/l").await["stdout"], "layered\n");
    let (code, _, err) = cli_output(&b, &["pull", "nowhere"]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("not in remote"), "{err}");

    // A remote holding a corrupt blob or a hostile manifest is refused, and
    // the daemon that tried holds nothing of it.
    let c = Daemon::start(remote_opts(&remote, vec![]));
    let m2_manifest: Value = serde_json::from_slice(&std::fs::read(dir.join("tags/m2.json")).unwrap()).unwrap();
    let layer = m2_manifest["snapshots"][1]["files"][1]["sha256"].as_str().unwrap().trim_start_matches("sha256:");
    let blob = dir.join("blobs/sha256").join(layer);
    let good = std::fs::read(&blob).unwrap();
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("head -c 4096 /dev/urandom | zstd -q -c > {}", blob.display()))
        .status()
        .unwrap();
    assert!(out.success());
    let (status, v) = post(&c, "/v1/snapshots/pull", json!({ "tag": "m2" })).await;
    assert_eq!((status, v["code"].as_str()), (409, Some("FAILED_PRECONDITION")), "{v}");
    assert!(v["error"].as_str().unwrap().contains(layer), "names the blob: {v}");
    nothing_visible(&c, &["m", "m2"]).await;
    std::fs::write(&blob, good).unwrap();

    let mut evil = m2_manifest.clone();
    evil["tag"] = json!("evil");
    evil["snapshots"][1]["record"]["tag"] = json!("evil");
    evil["snapshots"][1]["files"][0]["path"] = json!("../../etc/evil");
    std::fs::write(dir.join("tags/evil.json"), serde_json::to_vec(&evil).unwrap()).unwrap();
    std::fs::write(dir.join("tags/junk.json"), b"{ not json").unwrap();
    std::fs::write(dir.join("tags/other.json"), serde_json::to_vec(&m2_manifest).unwrap()).unwrap();
    for tag in ["evil", "junk", "other"] {
        let (status, v) = post(&c, "/v1/snapshots/pull", json!({ "tag": tag })).await;
        assert_eq!((status, v["code"].as_str()), (409, Some("FAILED_PRECONDITION")), "{tag}: {v}");
        nothing_visible(&c, &["m", "m2", tag]).await;
    }
    assert!(!Path::new("/etc/evil").exists());

    // The good manifest still pulls on C.
    let (status, v) = post(&c, "/v1/snapshots/pull", json!({ "tag": "m2" })).await;
    assert_eq!(status, 200, "{v}");
}

async fn d_post_status(d: &Daemon, path: &str, body: Value) -> u16 {
    d.post(path, body).send().await.unwrap().status().as_u16()
}
