//! Snapshot archives between two daemons with their own data dirs (two
//! hosts): `forkd pack` on one, `forkd unpack` on the other, then forks
//! there see the same state; a chain of three, a flat image and a lone
//! layer all round-trip; hostile archives are refused with 400 and leave
//! nothing behind.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{branch, cli_output, fork, sh, wait_ready};
use forkd_integration::{Daemon, Options};
use futures::StreamExt;
use serde_json::{Value, json};

async fn snapshot(d: &Daemon, tag: &str) -> Option<Value> {
    let r = d.get(&format!("/v1/snapshots/{tag}")).send().await.unwrap();
    if r.status() != 200 {
        return None;
    }
    Some(r.json().await.unwrap())
}

fn sh_ok(script: &str) {
    let out = Command::new("sh").arg("-c").arg(script).output().unwrap();
    assert!(out.status.success(), "{script}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Every file under `dir` (relative paths), to show nothing was left.
fn files_under(dir: &Path) -> Vec<String> {
    let mut out = vec![];
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p.strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    out
}

async fn import_raw(d: &Daemon, archive: &Path, tag: &str) -> (u16, Value) {
    let body = std::fs::read(archive).unwrap();
    let r = d
        .http()
        .post(format!("{}/v1/snapshots/import?tag={tag}", d.http_url()))
        .header("content-type", "application/octet-stream")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_travel_between_hosts_in_archives() {
    let a = Daemon::start(Options::default());
    let b = Daemon::start(Options::default());
    let work = tempfile::Builder::new().prefix("forkd-transfer-").tempdir_in("/tmp").unwrap();
    let file = |n: &str| work.path().join(n).display().to_string();

    // On A: m ← b1 ← b2, each branch a diff with a file of its own.
    let r = a.post("/v1/snapshots", json!({ "tag": "m", "image": "minimal" })).send().await.unwrap();
    assert_eq!(r.status(), 202);
    wait_ready(&a, "m").await;
    let c1 = fork(&a, "m", 1).await.remove(0);
    assert_eq!(
        sh(&a, &c1, "echo one > /root/one; dd if=/dev/urandom of=/root/r1 bs=1M count=4 2>/dev/null; sync").await["exit_code"],
        0
    );
    branch(&a, &c1, "b1", "diff").await;
    let c2 = fork(&a, "b1", 1).await.remove(0);
    assert_eq!(sh(&a, &c2, "echo two > /root/two; sync").await["exit_code"], 0);
    let b2 = branch(&a, &c2, "b2", "diff").await;
    assert_eq!(b2["parent_tag"], "b1");

    // pack b2 (the chain of three) with the CLI, --json reports the file.
    let (code, out, err) = cli_output(&a, &["--json", "pack", "b2", "-o", &file("b2.tar.zst")]);
    assert_eq!(code, 0, "{out} {err}");
    let packed: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(packed["bytes"].as_u64().unwrap(), std::fs::metadata(file("b2.tar.zst")).unwrap().len());
    assert!(packed["sha256"].as_str().unwrap().starts_with("sha256:"));
    assert!(files_under(work.path()).iter().all(|f| !f.contains(".partial")), "no partial file left");
    // Any tar lists it: the manifest first, then state and memory of each.
    let list = Command::new("sh").arg("-c").arg(format!("zstd -dc {} | tar -t", file("b2.tar.zst"))).output().unwrap();
    let names: Vec<String> = String::from_utf8_lossy(&list.stdout).lines().map(String::from).collect();
    assert_eq!(
        names,
        [
            "manifest.json",
            "snapshots/m/state",
            "snapshots/m/mem.pages",
            "snapshots/b1/state",
            "snapshots/b1/layer",
            "snapshots/b2/state",
            "snapshots/b2/layer"
        ]
    );
    // Sparse: 256 MiB guests, a few MiB written; the archive is far smaller.
    assert!(packed["bytes"].as_u64().unwrap() < 64 << 20, "{packed}");

    // unpack on B: the whole chain appears, digests equal A's.
    let (code, out, err) = cli_output(&b, &["--json", "unpack", &file("b2.tar.zst")]);
    assert_eq!(code, 0, "{out} {err}");
    for tag in ["m", "b1", "b2"] {
        let (sa, sb) = (snapshot(&a, tag).await.unwrap(), snapshot(&b, tag).await.unwrap());
        for k in ["memory_digest", "state_digest", "kind", "parent_tag", "mem_mib"] {
            assert_eq!(sa[k], sb[k], "{tag}.{k}");
        }
        assert_eq!(sb["status"], "ready");
    }
    let on_b = fork(&b, "b2", 1).await.remove(0);
    let got = sh(&b, &on_b, "cat /root/one /root/two; sha256sum /root/r1 | cut -c1-16").await;
    let want = sh(&a, &c2, "cat /root/one /root/two; sha256sum /root/r1 | cut -c1-16").await;
    assert_eq!(got["stdout"], want["stdout"], "a fork on B sees A's state");
    assert_eq!(sh(&b, &on_b, "hostname").await["stdout"], format!("{on_b}\n"), "its own identity");

    // The same tag again is a conflict (exit 4); --as imports it beside.
    let (code, _, err) = cli_output(&b, &["unpack", &file("b2.tar.zst")]);
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("already exists"), "{err}");
    let (code, out, err) = cli_output(&b, &["--json", "unpack", &file("b2.tar.zst"), "--as", "b2again"]);
    assert_eq!(code, 0, "{out} {err}");
    let again: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(again["tag"], "b2again");
    assert_eq!(again["parent_tag"], "b1", "ancestors B has are reused");

    // --flat: one flat image.
    let (code, _, err) = cli_output(&a, &["pack", "b2", "--flat", "-o", &file("flat.tar.zst")]);
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = cli_output(&b, &["--json", "unpack", &file("flat.tar.zst"), "--as", "b2flat"]);
    assert_eq!(code, 0, "{out} {err}");
    let flat: Value = serde_json::from_str(&out).unwrap();
    assert!(flat["parent_tag"].as_str().unwrap_or("").is_empty(), "{flat}");
    assert_eq!(flat["kind"], "full", "{flat}");
    let on_flat = fork(&b, "b2flat", 1).await.remove(0);
    assert_eq!(sh(&b, &on_flat, "cat /root/one /root/two").await["stdout"], "one\ntwo\n");

    // --layer-only: B has b1 already, so b2's layer alone suffices …
    let (code, _, err) = cli_output(&a, &["pack", "b2", "--layer-only", "-o", &file("layer.tar.zst")]);
    assert_eq!(code, 0, "{err}");
    assert!(
        std::fs::metadata(file("layer.tar.zst")).unwrap().len() < std::fs::metadata(file("b2.tar.zst")).unwrap().len()
    );
    let (code, out, err) = cli_output(&b, &["--json", "unpack", &file("layer.tar.zst"), "--as", "b2layer"]);
    assert_eq!(code, 0, "{out} {err}");
    let on_layer = fork(&b, "b2layer", 1).await.remove(0);
    assert_eq!(sh(&b, &on_layer, "cat /root/two").await["stdout"], "two\n");
    // … and a host without b1 refuses it, naming the parent.
    let c = Daemon::start(Options::default());
    let (code, _, err) = cli_output(&c, &["unpack", &file("layer.tar.zst")]);
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("\"b1\""), "{err}");

    // Export over REST, raw: the same bytes the CLI wrote.
    let r = a
        .http()
        .get(format!("{}/v1/snapshots/b2/export", a.http_url()))
        .header("accept", "application/octet-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body = r.bytes().await.unwrap();
    assert_eq!(&body[..], &std::fs::read(file("b2.tar.zst")).unwrap()[..], "archives are deterministic");

    hostile_archives_are_refused(&c, work.path(), &file("b2.tar.zst")).await;
}

/// Each hostile variant of a good archive is refused with 400 and leaves
/// nothing: no snapshot, nothing in staging, nothing written outside.
async fn hostile_archives_are_refused(d: &Daemon, work: &Path, good: &str) {
    let src = work.join("src");
    std::fs::create_dir_all(&src).unwrap();
    sh_ok(&format!("zstd -dc {good} | tar -x -C {}", src.display()));
    let outside = work.join("outside");
    let tar = |name: &str, members: &str| -> PathBuf {
        let out = work.join(format!("{name}.tar.zst"));
        sh_ok(&format!("cd {} && tar --format=gnu -P -c {members} | zstd -q -f -o {}", src.display(), out.display()));
        out
    };
    let all = "manifest.json snapshots/m/state snapshots/m/mem.pages snapshots/b1/state snapshots/b1/layer snapshots/b2/state snapshots/b2/layer";
    let before = files_under(&d.data_dir.join("snapshots")).len();

    let mut cases: Vec<(&str, PathBuf, &str)> = vec![];
    // An absolute path and a path with `..` (tar -P keeps both as given).
    sh_ok(&format!("echo x > {}", outside.display()));
    cases.push(("absolute", tar("absolute", &format!("manifest.json {}", outside.display())), "absolute"));
    cases.push((
        "dotdot",
        tar("dotdot", "--hard-dereference manifest.json snapshots/../manifest.json"),
        "relative path",
    ));
    // A symbolic link, a hard link and a device in place of a file.
    sh_ok(&format!(
        "cd {} && mkdir -p evil && ln -sf /etc/shadow evil/link && ln -f manifest.json evil/hard && mknod evil/dev c 1 3",
        src.display()
    ));
    cases.push(("symlink", tar("symlink", "manifest.json evil/link"), "symbolic link"));
    cases.push(("hardlink", tar("hardlink", "manifest.json evil/hard"), "hard link"));
    cases.push(("device", tar("device", "manifest.json evil/dev"), "device"));
    // The same entry twice, an entry the manifest does not name.
    cases.push((
        "duplicate",
        tar("duplicate", "--hard-dereference manifest.json snapshots/m/state snapshots/m/state"),
        "twice",
    ));
    sh_ok(&format!("cd {} && echo extra > evil.txt", src.display()));
    cases.push(("extra", tar("extra", &format!("{all} evil.txt")), "not in the manifest"));
    cases.push(("missing", tar("missing", "manifest.json snapshots/m/state"), "missing"));
    // A state file one byte longer than the manifest says (a bomb that
    // claims more than it declared), and one with a byte flipped.
    let state = src.join("snapshots/m/state");
    let good_state = std::fs::read(&state).unwrap();
    let mut longer = good_state.clone();
    longer.push(0);
    std::fs::write(&state, &longer).unwrap();
    cases.push(("longer", tar("longer", all), "the manifest says"));
    let mut flipped = good_state.clone();
    flipped[100] ^= 0xff;
    std::fs::write(&state, &flipped).unwrap();
    cases.push(("flipped", tar("flipped", all), "digest"));
    std::fs::write(&state, &good_state).unwrap();
    // Memory that does not expand to its digest.
    let pages = src.join("snapshots/m/mem.pages");
    let good_pages = std::fs::read(&pages).unwrap();
    let mut bad_pages = good_pages.clone();
    let last = bad_pages.len() - 1;
    bad_pages[last] ^= 0xff;
    std::fs::write(&pages, &bad_pages).unwrap();
    cases.push(("memory", tar("memory", all), "memory of snapshot"));
    // A page index that points outside the memory.
    let mut outside_pages = good_pages.clone();
    outside_pages[20..28].copy_from_slice(&(1u64 << 40).to_le_bytes());
    std::fs::write(&pages, &outside_pages).unwrap();
    cases.push(("page-index", tar("page-index", all), "page"));
    std::fs::write(&pages, &good_pages).unwrap();
    // Not an archive at all, and a truncated one.
    let junk = work.join("junk.tar.zst");
    std::fs::write(&junk, b"definitely not zstd").unwrap();
    cases.push(("junk", junk, "zstd"));
    let cut = work.join("cut.tar.zst");
    let whole = std::fs::read(good).unwrap();
    std::fs::write(&cut, &whole[..whole.len() / 2]).unwrap();
    cases.push(("truncated", cut, "ends"));

    for (name, archive, says) in &cases {
        let (status, body) = import_raw(d, archive, &format!("h-{name}")).await;
        assert_eq!(status, 400, "{name}: {body}");
        let msg = body["message"].as_str().or(body["error"].as_str()).unwrap_or_default().to_string();
        assert!(body.to_string().contains(says), "{name}: {says:?} not in {msg} / {body}");
        let staging = files_under(&d.data_dir.join("staging"));
        assert!(staging.iter().all(|f| f.starts_with("volume-slot")), "{name}: staging holds {staging:?}");
        assert_eq!(files_under(&d.data_dir.join("snapshots")).len(), before, "{name}: snapshots changed");
        assert_eq!(std::fs::read_to_string(&outside).unwrap(), "x\n", "{name}: a file outside was written");
    }
    // A client that goes away half-way through its upload leaves nothing
    // either: the import's staging dir and ledger row go with it.
    let half = whole[..whole.len() / 2].to_vec();
    let body = futures::stream::once(async move { Ok::<_, std::io::Error>(half) }).chain(futures::stream::pending());
    let upload = d
        .http()
        .post(format!("{}/v1/snapshots/import?tag=h-cut", d.http_url()))
        .header("content-type", "application/octet-stream")
        .body(reqwest::Body::wrap_stream(body))
        .send();
    assert!(tokio::time::timeout(std::time::Duration::from_secs(3), upload).await.is_err(), "still waiting");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let in_staging = || {
        files_under(&d.data_dir.join("staging")).len()
            + common::ledger(&d.data_dir).iter().filter(|(k, _, _)| k == "staging").count()
    };
    while in_staging() > 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert_eq!(in_staging(), 0, "an abandoned upload left staging behind: {:?}", common::ledger(&d.data_dir));

    let r = d.get("/v1/snapshots").send().await.unwrap();
    let v: Value = r.json().await.unwrap();
    assert!(v.to_string().find("h-").is_none(), "no hostile archive became a snapshot: {v}");
}
