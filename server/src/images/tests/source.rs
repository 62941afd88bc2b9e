//! Tests of reading image sources: OCI layouts and archives, `docker save`
//! tarballs, multi-arch indexes, config parsing, and refusals.

use std::path::{Path, PathBuf};

use serde_json::json;

use super::super::layers::{apply_layers, fixtures::*};
use super::*;
use crate::images::ImportLimits;

struct Dirs {
    _tmp: tempfile::TempDir,
    base: PathBuf,
}

fn dirs() -> Dirs {
    let tmp = tempfile::tempdir().unwrap();
    Dirs { base: tmp.path().to_path_buf(), _tmp: tmp }
}

impl Dirs {
    fn p(&self, rel: &str) -> PathBuf {
        self.base.join(rel)
    }

    /// Applies `src` into a fresh root; answers its listing.
    fn apply(&self, src: &SourceImage, root: &str) -> std::collections::BTreeMap<String, String> {
        let root = self.p(root);
        std::fs::create_dir_all(&root).unwrap();
        apply_layers(&src.layers, &root, &ImportLimits::default()).unwrap();
        listing(&root)
    }
}

fn layer(tar: Vec<u8>) -> (&'static str, Vec<u8>, Vec<u8>) {
    (OCI_LAYER_GZIP, gzip(&tar), tar)
}

fn expect_err(r: Result<SourceImage, ImageError>) -> ImageError {
    match r {
        Ok(src) => panic!("expected an error, got {src:?}"),
        Err(e) => e,
    }
}

fn invalid(r: Result<SourceImage, ImageError>, want: &str) {
    match expect_err(r) {
        ImageError::Invalid(m) => assert!(m.contains(want), "{m:?} should mention {want:?}"),
        e => panic!("expected Invalid({want}), got {e:?}"),
    }
}

fn wanted_config() -> ImageConfig {
    ImageConfig {
        env: vec!["PATH=/usr/local/bin:/usr/bin:/bin".into(), "APP=forkd".into()],
        working_dir: "/srv/app".into(),
        user: "1000:1000".into(),
        entrypoint: vec!["/bin/sh".into(), "-c".into()],
        cmd: vec!["echo hello".into()],
        labels: [("org.example.team".to_string(), "images".to_string())].into(),
    }
}

fn two_layers() -> Vec<(&'static str, Vec<u8>, Vec<u8>)> {
    let lower = Tar::new()
        .dir("etc/", 0o755)
        .file("etc/a", b"one")
        .file("etc/keep", b"k")
        .dir("var/cache/", 0o755)
        .file("var/cache/old", b"o")
        .bytes();
    let upper = Tar::new()
        .file("etc/.wh.a", b"")
        .dir("var/cache/", 0o755)
        .file("var/cache/.wh..wh..opq", b"")
        .file("var/cache/new", b"n")
        .bytes();
    vec![layer(lower), (OCI_LAYER, upper.clone(), upper)]
}

fn two_layers_tree() -> std::collections::BTreeMap<String, String> {
    map(&[("etc", "dir"), ("etc/keep", "file:k"), ("var", "dir"), ("var/cache", "dir"), ("var/cache/new", "file:n")])
}

#[test]
fn an_oci_layout_with_two_layers_and_whiteouts() {
    let d = dirs();
    let oci = Oci::new(&d.p("layout"));
    let manifest = oci.image("amd64", &two_layers());
    oci.index(vec![with_ref(manifest.clone(), "v1")]);

    let src = read_source(&d.p("layout"), &d.p("scratch")).unwrap();
    assert_eq!(src.digest, manifest["digest"].as_str().unwrap());
    assert_eq!(src.ref_name.as_deref(), Some("v1"));
    assert_eq!(src.config, wanted_config());
    assert_eq!(src.layers.len(), 2);
    assert_eq!(src.layers[0].media_type, OCI_LAYER_GZIP);
    assert!(src.layers[0].path.starts_with(d.p("layout/blobs/sha256")));
    assert!(!d.p("scratch").exists(), "a directory is read in place");
    assert_eq!(d.apply(&src, "root"), two_layers_tree());

    // By name; an unknown name is NotFound.
    let src = read_source_ref(&d.p("layout"), &d.p("scratch"), Some("v1")).unwrap();
    assert_eq!(src.digest, manifest["digest"].as_str().unwrap());
    let e = expect_err(read_source_ref(&d.p("layout"), &d.p("scratch"), Some("v2")));
    assert!(matches!(&e, ImageError::NotFound(m) if m.contains("v1")), "{e:?}");
}

#[test]
fn an_oci_archive_picks_the_named_image() {
    let d = dirs();
    let oci = Oci::new(&d.p("layout"));
    let a = oci.image("amd64", &[layer(Tar::new().file("which", b"a").bytes())]);
    let b = oci.image("amd64", &[layer(Tar::new().file("which", b"b").bytes())]);
    oci.index(vec![with_ref(a, "a"), with_ref(b.clone(), "example.com/team/b:2")]);
    let archive = d.p("image.tar");
    std::fs::write(&archive, tar_dir(&d.p("layout"))).unwrap();

    invalid(read_source(&archive, &d.p("scratch0")), "name the one to import");
    let src = read_source_ref(&archive, &d.p("scratch1"), Some("example.com/team/b:2")).unwrap();
    assert_eq!(src.digest, b["digest"].as_str().unwrap());
    assert_eq!(src.ref_name.as_deref(), Some("example.com/team/b:2"));
    assert!(src.layers[0].path.starts_with(d.p("scratch1")), "the archive was unpacked into scratch");
    assert_eq!(d.apply(&src, "root1"), map(&[("which", "file:b")]));

    // A compressed archive (`… | gzip`) reads the same.
    let gz = d.p("image.tar.gz");
    std::fs::write(&gz, gzip(&tar_dir(&d.p("layout")))).unwrap();
    let src = read_source_ref(&gz, &d.p("scratch2"), Some("a")).unwrap();
    assert_eq!(d.apply(&src, "root2"), map(&[("which", "file:a")]));
}

#[test]
fn a_multi_arch_index_gives_linux_amd64() {
    let d = dirs();
    let oci = Oci::new(&d.p("layout"));
    let arm = oci.image("arm64", &[layer(Tar::new().file("arch", b"arm64").bytes())]);
    let amd = oci.image("amd64", &[layer(Tar::new().file("arch", b"amd64").bytes())]);
    let mut attestation =
        with_platform(oci.blob(super::super::layers::fixtures::OCI_MANIFEST, b"{}"), "unknown", "unknown");
    attestation["annotations"] = json!({"vnd.docker.reference.type": "attestation-manifest"});
    let nested = oci.nested_index(vec![
        with_platform(arm.clone(), "linux", "arm64"),
        attestation,
        with_platform(amd.clone(), "linux", "amd64"),
    ]);
    oci.index(vec![with_ref(nested, "latest")]);
    let src = read_source(&d.p("layout"), &d.p("scratch")).unwrap();
    assert_eq!(src.digest, amd["digest"].as_str().unwrap());
    assert_eq!(src.ref_name.as_deref(), Some("latest"));
    assert_eq!(d.apply(&src, "root"), map(&[("arch", "file:amd64")]));

    // Platforms listed in index.json itself.
    oci.index(vec![with_platform(arm.clone(), "linux", "arm64"), with_platform(amd.clone(), "linux", "amd64")]);
    let src = read_source(&d.p("layout"), &d.p("scratch")).unwrap();
    assert_eq!(src.digest, amd["digest"].as_str().unwrap());

    // No amd64 at all, or an amd64 entry whose config says otherwise.
    let only_arm = oci.nested_index(vec![with_platform(arm.clone(), "linux", "arm64")]);
    oci.index(vec![only_arm]);
    invalid(read_source(&d.p("layout"), &d.p("scratch")), "no linux/amd64 image (it has: linux/arm64)");
    oci.index(vec![arm]);
    invalid(read_source(&d.p("layout"), &d.p("scratch")), "the image is for linux/arm64");
}

#[test]
fn docker_save_with_repo_tags() {
    let d = dirs();
    let save = d.p("save");
    let base = Tar::new().dir("app/", 0o755).file("app/one", b"1").file("app/gone", b"x").bytes();
    let top = Tar::new().file("app/.wh.gone", b"").file("app/two", b"2").bytes();
    let mut images = vec![];
    for (tags, layers) in [(vec!["app:1", "app:latest"], vec![&base, &top]), (vec!["other:2"], vec![&base])] {
        let tars: Vec<&[u8]> = layers.iter().map(|l| l.as_slice()).collect();
        let config = config_json("amd64", &tars);
        let config_name = format!("{}.json", sha(&config));
        std::fs::create_dir_all(&save).unwrap();
        std::fs::write(save.join(&config_name), &config).unwrap();
        let mut paths = vec![];
        for l in layers {
            // The legacy layout: <id>/layer.tar, <id>/VERSION, <id>/json.
            let id = sha(format!("{}{}", sha(l), tags[0]).as_bytes());
            let dir = save.join(&id);
            std::fs::create_dir_all(&dir).unwrap();
            if tags[0] == "other:2" {
                // A layer the archive already has is a symlink to it.
                let first = paths_of_first(l);
                std::os::unix::fs::symlink(format!("../{first}"), dir.join("layer.tar")).unwrap();
            } else {
                std::fs::write(dir.join("layer.tar"), l).unwrap();
            }
            std::fs::write(dir.join("VERSION"), b"1.0").unwrap();
            std::fs::write(dir.join("json"), b"{}").unwrap();
            paths.push(format!("{id}/layer.tar"));
        }
        images.push(json!({"Config": config_name, "RepoTags": tags, "Layers": paths}));
    }
    std::fs::write(save.join("manifest.json"), serde_json::to_vec(&images).unwrap()).unwrap();
    let archive = d.p("docker.tar");
    std::fs::write(&archive, tar_dir(&save)).unwrap();

    invalid(read_source(&archive, &d.p("s0")), "app:1, app:latest, other:2");
    let src = read_source_ref(&archive, &d.p("s1"), Some("app:1")).unwrap();
    assert_eq!(src.ref_name.as_deref(), Some("app:1"));
    assert_eq!(src.config, wanted_config());
    let config = std::fs::read_dir(&save)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .find(|n| n.ends_with(".json") && std::fs::read(save.join(n)).unwrap() == config_json("amd64", &[&base, &top]))
        .unwrap();
    assert_eq!(src.digest, format!("sha256:{}", config.trim_end_matches(".json")));
    assert_eq!(src.layers[1].digest, format!("sha256:{}", sha(&top)));
    assert_eq!(src.layers[1].media_type, "application/vnd.docker.image.rootfs.diff.tar");
    assert_eq!(d.apply(&src, "r1"), map(&[("app", "dir"), ("app/one", "file:1"), ("app/two", "file:2")]));
    // `app` means app:latest; the symlinked layer of other:2 resolves.
    let src = read_source_ref(&archive, &d.p("s2"), Some("app")).unwrap();
    assert_eq!(src.layers.len(), 2);
    let src = read_source_ref(&archive, &d.p("s3"), Some("other:2")).unwrap();
    assert_eq!(d.apply(&src, "r3"), map(&[("app", "dir"), ("app/gone", "file:x"), ("app/one", "file:1")]));
    let e = expect_err(read_source_ref(&archive, &d.p("s4"), Some("nope:1")));
    assert!(matches!(e, ImageError::NotFound(_)), "{e:?}");

    // A layer whose content is not the config's diff_id.
    let first = paths_of_first(&base);
    std::fs::write(save.join(&first), Tar::new().file("other", b"!").bytes()).unwrap();
    std::fs::write(&archive, tar_dir(&save)).unwrap();
    invalid(read_source_ref(&archive, &d.p("s5"), Some("app:1")), "diff_id");
}

/// The `<id>/layer.tar` of the first image holding `layer`.
fn paths_of_first(layer: &[u8]) -> String {
    let id = sha(format!("{}{}", sha(layer), "app:1").as_bytes());
    format!("{id}/layer.tar")
}

#[test]
fn blobs_are_verified_by_size_then_digest() {
    let d = dirs();
    let oci = Oci::new(&d.p("layout"));
    let tar = Tar::new().file("f", b"content").bytes();
    let manifest = oci.image("amd64", &[layer(tar.clone())]);
    oci.index(vec![manifest.clone()]);
    let src = read_source(&d.p("layout"), &d.p("scratch")).unwrap();
    let blob = src.layers[0].path.clone();

    // Same size, other content.
    let good = std::fs::read(&blob).unwrap();
    let mut bad = good.clone();
    bad[10] ^= 1;
    std::fs::write(&blob, &bad).unwrap();
    invalid(read_source(&d.p("layout"), &d.p("scratch")), "not the digest that names it");
    // Larger than its descriptor.
    let mut longer = good.clone();
    longer.extend_from_slice(&[0; 100]);
    std::fs::write(&blob, &longer).unwrap();
    invalid(read_source(&d.p("layout"), &d.p("scratch")), "descriptor says");
    std::fs::write(&blob, &good).unwrap();

    // A descriptor whose size is not the manifest's.
    let mut lying = manifest.clone();
    lying["size"] = json!(manifest["size"].as_u64().unwrap() - 1);
    oci.index(vec![lying]);
    invalid(read_source(&d.p("layout"), &d.p("scratch")), "descriptor says");
    // A missing blob, a digest of another algorithm.
    let mut missing = manifest.clone();
    missing["digest"] = json!(format!("sha256:{}", sha(b"nothing")));
    oci.index(vec![missing]);
    invalid(read_source(&d.p("layout"), &d.p("scratch")), "not in the layout");
    let mut sha512 = manifest.clone();
    sha512["digest"] = json!(format!("sha512:{}", "ab".repeat(64)));
    oci.index(vec![sha512]);
    invalid(read_source(&d.p("layout"), &d.p("scratch")), "only sha256");
    // A blob that is a symlink is not followed.
    oci.index(vec![manifest.clone()]);
    std::fs::remove_file(&blob).unwrap();
    let elsewhere = d.p("elsewhere");
    std::fs::write(&elsewhere, &good).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &blob).unwrap();
    invalid(read_source(&d.p("layout"), &d.p("scratch")), "symlink");
}

#[test]
fn hostile_archive_members_are_refused() {
    let d = dirs();
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (Tar::new().file("../evil", b"x").bytes(), "'..'"),
        (Tar::new().file("/tmp/evil", b"x").bytes(), "absolute"),
        (Tar::new().file("a/../../evil", b"x").bytes(), "'..'"),
        (Tar::new().device("null", tar::EntryType::Char, 1, 3).bytes(), "only files, directories and links"),
    ];
    for (i, (tar, want)) in cases.into_iter().enumerate() {
        let archive = d.p(&format!("a{i}.tar"));
        std::fs::write(&archive, tar).unwrap();
        let scratch = d.p(&format!("work/s{i}"));
        invalid(read_source(&archive, &scratch), want);
    }
    assert!(!d.p("evil").exists() && !d.p("work/evil").exists() && !Path::new("/evil").exists());
    // Links are never made on disk: a member "through" one lands inside.
    let archive = d.p("link.tar");
    std::fs::write(&archive, Tar::new().symlink("blobs", "/").file("blobs/evil", b"x").bytes()).unwrap();
    invalid(read_source(&archive, &d.p("work/link")), "neither an OCI image layout");
    assert!(std::fs::symlink_metadata(d.p("work/link/blobs")).unwrap().is_dir());
    assert!(d.p("work/link/blobs/evil").is_file());
    // Neither a layout nor a docker archive.
    let archive = d.p("plain.tar");
    std::fs::write(&archive, Tar::new().file("hello", b"x").bytes()).unwrap();
    invalid(read_source(&archive, &d.p("work/plain")), "neither an OCI image layout");
    let e = expect_err(read_source(&d.p("absent.tar"), &d.p("work/absent")));
    assert!(matches!(e, ImageError::NotFound(_)), "{e:?}");
}

#[test]
fn a_config_with_nulls_and_nothing_to_run() {
    let image: ImageJson =
        serde_json::from_slice(br#"{"config": {"Env": null, "Cmd": null, "Labels": null}}"#).unwrap();
    assert_eq!(image_config(&image).unwrap(), ImageConfig::default());
    let image: ImageJson = serde_json::from_slice(br#"{"architecture": "amd64", "os": "linux"}"#).unwrap();
    assert_eq!(image_config(&image).unwrap(), ImageConfig::default());
    let image: ImageJson = serde_json::from_slice(br#"{"os": "windows"}"#).unwrap();
    assert!(matches!(image_config(&image), Err(ImageError::Invalid(_))));
}
