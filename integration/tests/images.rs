//! The image store against a real daemon and real VMs: an OCI image layout
//! with two layers and whiteouts, imported, snapshotted and run (the
//! child sees the upper layer, not what it whited out, and exec uses the
//! image's Env, WorkingDir and User); a `docker save` tarball; hostile
//! archives refused with nothing left behind.

mod common;

use common::{fork, post_ok, wait_ready};
use forkd_api::v1 as api;
use forkd_integration::oci::{Entry, Image, busybox_layer, layer, tar_dir};
use forkd_integration::{Daemon, Options};
use serde_json::json;

fn test_image() -> Image {
    let l1 = layer(&[
        Entry::File(
            "etc/passwd".into(),
            b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n".to_vec(),
            0o644,
        ),
        Entry::File("etc/group".into(), b"root:x:0:\napp:x:1000:\n".to_vec(), 0o644),
        Entry::Dir("app", 0o755),
        Entry::File("app/keep.txt".into(), b"kept\n".to_vec(), 0o644),
        Entry::File("app/gone.txt".into(), b"whited out\n".to_vec(), 0o644),
        Entry::Dir("data", 0o755),
        Entry::Dir("data/old", 0o755),
        Entry::File("data/old/x".into(), b"x".to_vec(), 0o644),
    ]);
    let l2 = layer(&[
        Entry::File("app/new.txt".into(), b"from layer two\n".to_vec(), 0o644),
        Entry::File("app/.wh.gone.txt".into(), vec![], 0o644),
        Entry::File("data/.wh..wh..opq".into(), vec![], 0o644),
        Entry::File("data/y".into(), b"y".to_vec(), 0o644),
        Entry::Dir("home", 0o755),
        Entry::OwnedFile("home/app/.profile".into(), b"# app\n".to_vec(), 0o644, 1000, 1000),
    ]);
    Image::new(vec![busybox_layer(), l1, l2], &["GREETING=hello from the image", "PATH=/bin"], "/app", "app")
}

async fn import(d: &Daemon, name: &str, archive: Vec<u8>) -> Result<api::Image, tonic::Status> {
    let mut msgs = vec![];
    for (i, chunk) in archive.chunks(1 << 20).enumerate() {
        msgs.push(api::ImportImageRequest {
            name: if i == 0 { name.to_string() } else { String::new() },
            data: chunk.to_vec(),
            ..Default::default()
        });
    }
    let mut c = api::image_service_client::ImageServiceClient::with_interceptor(
        d.channel().await,
        forkd_integration::Auth(d.bearer()),
    );
    c.import_image(tokio_stream::iter(msgs)).await.map(|r| r.into_inner())
}

async fn sh(d: &Daemon, id: &str, script: &str) -> (i64, String) {
    let v = post_ok(d, &format!("/v1/sandboxes/{id}/exec"), json!({ "args": ["sh", "-c", script] })).await;
    (v["exit_code"].as_i64().unwrap(), v["stdout"].as_str().unwrap().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oci_layout_import_snapshot_and_run() {
    let d = Daemon::start(Options::default());
    let img = test_image();
    let layout = tempfile::tempdir().unwrap();
    img.write_layout(layout.path(), "1");
    let got = import(&d, "test/app:1", tar_dir(layout.path())).await.expect("import");
    assert_eq!(got.digest, img.manifest_digest());
    assert_eq!(got.names, vec!["test/app:1".to_string()]);
    let cfg = got.config.unwrap();
    assert_eq!((cfg.working_dir.as_str(), cfg.user.as_str()), ("/app", "app"));

    // Listed, and by digest too.
    let list = d.get("/v1/images").send().await.unwrap().json::<serde_json::Value>().await.unwrap();
    assert!(list.as_array().unwrap().iter().any(|i| i["digest"] == got.digest), "{list}");

    post_ok(&d, "/v1/snapshots", json!({ "tag": "app", "image": "test/app:1" })).await;
    wait_ready(&d, "app").await;
    let id = fork(&d, "app", 1).await.remove(0);
    assert_eq!(sh(&d, &id, "cat /app/new.txt /app/keep.txt").await, (0, "from layer two\nkept\n".into()));
    assert_eq!(sh(&d, &id, "test -e /app/gone.txt; echo $?").await.1, "1\n");
    assert_eq!(sh(&d, &id, "ls /data").await.1, "y\n");
    // exec runs with the image's Env, WorkingDir and User by default...
    let (_, out) = sh(&d, &id, "echo \"$GREETING|$(pwd)|$(id -u)|$HOME\"").await;
    assert_eq!(out, "hello from the image|/app|1000|/home/app\n");
    // ... and the request can say otherwise.
    let v =
        post_ok(&d, &format!("/v1/sandboxes/{id}/exec"), json!({ "args": ["id", "-u"], "user": "root", "cwd": "/" }))
            .await;
    assert_eq!(v["stdout"], "0\n");

    // An image a snapshot uses cannot be removed.
    let r = d.delete("/v1/images/test%2Fapp:1").send().await.unwrap();
    assert_eq!(r.status(), 409, "{}", r.text().await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_save_import_and_hostile_archives() {
    let d = Daemon::start(Options::default());
    let img = test_image();
    let got = import(&d, "", img.docker_save("saved/app:2")).await.expect("docker save import");
    assert_eq!(got.names, vec!["saved/app:2".to_string()]);
    assert_eq!(got.config.unwrap().env[0], "GREETING=hello from the image");
    // It has no python3: a warm-up eval is refused, saying why.
    assert_eq!(got.runtime, "");
    let r = d
        .post("/v1/snapshots", json!({ "tag": "nopy", "image": "saved/app:2", "warm_eval": "x = 1" }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    assert!(r.text().await.unwrap().contains("has no python3"));
    // Removed again (nothing uses it).
    let r = d.delete("/v1/images/saved%2Fapp:2").send().await.unwrap();
    assert_eq!(r.status(), 200);

    let images_dir = d.data_dir.join("images");
    let outside = tempfile::tempdir().unwrap();
    let target = outside.path().join("pwned");
    let hostile: Vec<(&str, Vec<u8>)> = vec![
        ("dot-dot", layer(&[Entry::RawName(b"../../escaped", b"x".to_vec())])),
        (
            "symlink escape",
            layer(&[
                Entry::Symlink("a".into(), outside.path().display().to_string()),
                Entry::File("a/pwned".into(), b"x".to_vec(), 0o644),
            ]),
        ),
    ];
    for (what, l) in hostile {
        let bad = Image::new(vec![busybox_layer(), l], &[], "/", "");
        let e = import(&d, "bad", bad.docker_save("bad:1")).await.expect_err(what);
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{what}: {e:?}");
        assert!(!target.exists(), "{what} wrote outside the staging dir");
    }
    // A device node is refused.
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Char);
    h.set_device_major(1).unwrap();
    h.set_device_minor(3).unwrap();
    h.set_size(0);
    h.set_mode(0o666);
    b.append_data(&mut h, "dev/null2", std::io::empty()).unwrap();
    let dev = Image::new(vec![b.into_inner().unwrap()], &[], "/", "");
    let e = import(&d, "dev", dev.docker_save("dev:1")).await.expect_err("device");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    // Nothing was kept: no image, no staging left over.
    let left: Vec<_> = std::fs::read_dir(&images_dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != ".staging" && n != "names.json")
        .collect();
    assert!(left.is_empty(), "left in the store: {left:?}");
    let staging = std::fs::read_dir(images_dir.join(".staging")).map(|r| r.flatten().count()).unwrap_or(0);
    assert_eq!(staging, 0, "staging not cleaned");
}

async fn pull(d: &Daemon, reference: &str) -> Result<(api::Image, usize), tonic::Status> {
    let mut c = api::image_service_client::ImageServiceClient::with_interceptor(
        d.channel().await,
        forkd_integration::Auth(d.bearer()),
    );
    let mut s =
        c.pull_image(api::PullImageRequest { reference: reference.into(), name: String::new() }).await?.into_inner();
    let mut layer_events = 0;
    while let Some(ev) = s.message().await? {
        match ev.event {
            Some(api::image_progress::Event::Layer(_)) => layer_events += 1,
            Some(api::image_progress::Event::Image(i)) => return Ok((i, layer_events)),
            _ => {}
        }
    }
    Err(tonic::Status::internal("the pull ended without an image"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_pull_verifies_digests() {
    let reg = forkd_integration::registry::Registry::start().await;
    let d = Daemon::start(Options::default());
    let img = test_image();
    let layout = tempfile::tempdir().unwrap();
    img.write_layout(layout.path(), "1");
    let pushed = reg.push_oci_layout(layout.path(), "1", "team/app");
    let reference = format!("{}/team/app:1", reg.host());
    let (got, layer_events) = pull(&d, &reference).await.expect("pull");
    assert_eq!(got.digest, pushed, "the store's digest is the registry's manifest digest");
    assert_eq!(got.names, vec![reference.clone()]);
    assert_eq!(got.source, "pull");
    assert!(layer_events >= 3, "progress per layer: {layer_events} events");
    // It boots like an imported image.
    post_ok(&d, "/v1/snapshots", json!({ "tag": "pulled", "image": reference })).await;
    wait_ready(&d, "pulled").await;
    let id = fork(&d, "pulled", 1).await.remove(0);
    assert_eq!(sh(&d, &id, "cat /app/new.txt").await.1, "from layer two\n");

    // A corrupted blob in the registry is refused, naming it.
    let other =
        Image::new(vec![busybox_layer(), layer(&[Entry::File("x".into(), b"1".to_vec(), 0o644)])], &[], "/", "");
    let layout2 = tempfile::tempdir().unwrap();
    other.write_layout(layout2.path(), "2");
    reg.push_oci_layout(layout2.path(), "2", "team/other");
    // The registry's own manifest names the blob (a push may recompress).
    let manifest: serde_json::Value = serde_json::from_slice(&reg.raw_manifest("team/other", "2")).unwrap();
    let victim = manifest["layers"][1]["digest"].as_str().unwrap().to_string();
    let blob = reg.blob_path(&victim);
    let mut bytes = std::fs::read(&blob).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&blob, bytes).unwrap();
    let e = pull(&d, &format!("{}/team/other:2", reg.host())).await.expect_err("corrupted blob");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("corrupted"), "{e:?}");
    // No registry there: unavailable, said clearly.
    let e = pull(&d, "127.0.0.1:9/nothing/here:1").await.expect_err("no registry");
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    assert!(e.message().contains("cannot reach registry"), "{e:?}");
}

async fn build(d: &Daemon, req: api::BuildImageRequest) -> Result<(api::Image, Vec<String>), tonic::Status> {
    let mut c = api::image_service_client::ImageServiceClient::with_interceptor(
        d.channel().await,
        forkd_integration::Auth(d.bearer()),
    );
    let mut s = c.build_image(req).await?.into_inner();
    let mut log = vec![];
    while let Some(ev) = s.message().await? {
        match ev.event {
            Some(api::image_progress::Event::Log(l)) => log.push(l),
            Some(api::image_progress::Event::Image(i)) => return Ok((i, log)),
            _ => {}
        }
    }
    Err(tonic::Status::internal("the build ended without an image"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn package_build_gives_pandas_to_the_warm_interpreter() {
    let d = Daemon::start(Options::default());
    let req = api::BuildImageRequest {
        name: "py-pandas".into(),
        from: "python".into(),
        apt: vec!["python3-pandas".into()],
        ..Default::default()
    };
    let t = std::time::Instant::now();
    let (img, log) = build(&d, req.clone()).await.expect("build");
    let first = t.elapsed();
    assert_eq!((img.source.as_str(), img.runtime.as_str()), ("build", "python"), "{log:?}");
    post_ok(&d, "/v1/snapshots", json!({ "tag": "pandas", "image": "py-pandas" })).await;
    wait_ready(&d, "pandas").await;
    let id = fork(&d, "pandas", 1).await.remove(0);
    let v = post_ok(&d, &format!("/v1/sandboxes/{id}/eval"), json!({ "code": "import pandas; pandas.__name__" })).await;
    assert_eq!(v["result"], "'pandas'", "{v}");
    // The same inputs again: answered from the store.
    let t = std::time::Instant::now();
    let (again, log) = build(&d, api::BuildImageRequest { name: "py-pandas-2".into(), ..req }).await.expect("rebuild");
    let second = t.elapsed();
    assert_eq!(again.digest, img.digest);
    assert!(log.iter().any(|l| l.contains("taken from the store")), "{log:?}");
    eprintln!("image build --apt python3-pandas: first {first:?}, same inputs again {second:?}");
    // Bad package names are refused before anything runs.
    let e = build(&d, api::BuildImageRequest { name: "bad".into(), apt: vec!["-oops".into()], ..Default::default() })
        .await
        .expect_err("bad package");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
}
