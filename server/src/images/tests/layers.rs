//! Tests of applying layers: whiteouts, kept attributes, and hostile
//! content (escapes, links, devices, bombs, bounds, bad digests).

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::PathBuf;

use tar::EntryType;

use super::fixtures::*;
use super::*;

struct Fixture {
    _tmp: tempfile::TempDir,
    base: PathBuf,
    root: PathBuf,
    blobs: PathBuf,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().to_path_buf();
    let root = base.join("staging/root");
    std::fs::create_dir_all(&root).unwrap();
    Fixture { blobs: base.join("blobs"), root, base, _tmp: tmp }
}

impl Fixture {
    fn layer(&self, tar: Vec<u8>) -> LayerBlob {
        layer_blob(&self.blobs, &tar, OCI_LAYER)
    }

    fn apply(&self, layers: &[LayerBlob]) -> Result<ApplyStats, ImageError> {
        apply_layers(layers, &self.root, &ImportLimits::default())
    }

    fn apply_with(&self, layers: &[LayerBlob], limits: &ImportLimits) -> Result<ApplyStats, ImageError> {
        apply_layers(layers, &self.root, limits)
    }
}

fn invalid(r: Result<ApplyStats, ImageError>, want: &str) -> String {
    match r {
        Err(ImageError::Invalid(m)) => {
            assert!(m.contains(want), "{m:?} should mention {want:?}");
            m
        }
        other => panic!("expected Invalid({want}), got {other:?}"),
    }
}

#[test]
fn whiteouts_remove_lower_files_and_opaque_dirs_empty_them() {
    let f = fixture();
    let lower = Tar::new()
        .dir("etc/", 0o755)
        .file("etc/a", b"one")
        .file("etc/keep", b"k")
        .file("gone", b"g")
        .dir("gonedir/", 0o755)
        .file("gonedir/x", b"x")
        .dir("opq/", 0o755)
        .file("opq/old", b"o")
        .dir("opq/sub/", 0o755)
        .file("opq/sub/deep", b"d")
        .bytes();
    // The opaque marker comes after this layer's own entries in the
    // directory: they stay, all lower content goes (sub-directories too).
    let upper = Tar::new()
        .file("etc/.wh.a", b"")
        .file(".wh.gone", b"")
        .file("./.wh.gonedir", b"")
        .file(".wh.never-there", b"")
        .dir("opq/", 0o755)
        .file("opq/new", b"n")
        .dir("opq/sub/", 0o755)
        .file("opq/sub/fresh", b"f")
        .file("opq/.wh..wh..opq", b"")
        .bytes();
    let stats = f.apply(&[f.layer(lower), f.layer(upper)]).unwrap();
    assert_eq!(
        listing(&f.root),
        map(&[
            ("etc", "dir"),
            ("etc/keep", "file:k"),
            ("opq", "dir"),
            ("opq/new", "file:n"),
            ("opq/sub", "dir"),
            ("opq/sub/fresh", "file:f"),
        ])
    );
    assert_eq!(stats.layers, 2);
    assert_eq!(stats.whiteouts, 5);
    assert_eq!(stats.entries, 19);
}

#[test]
fn a_whiteout_spares_what_its_own_layer_writes() {
    let f = fixture();
    let lower = Tar::new().dir("d/", 0o755).file("d/old", b"o").file("f", b"lower").bytes();
    // `.wh.d` after this layer's d/new: lower d/old goes, d/new stays; `.wh.f`
    // before f: this layer's f is written after.
    let upper = Tar::new().file("d/new", b"n").file("d/.wh..wh..opq", b"").file(".wh.f", b"").file("f", b"upper");
    let upper = upper.file(".wh.d", b"").bytes();
    f.apply(&[f.layer(lower), f.layer(upper)]).unwrap();
    assert_eq!(listing(&f.root), map(&[("d", "dir"), ("d/new", "file:n"), ("f", "file:upper")]));
}

#[test]
fn entries_replace_other_kinds_without_following_links() {
    let f = fixture();
    let outside = f.base.join("outside");
    std::fs::create_dir(&outside).unwrap();
    let lower = Tar::new()
        .dir("x/", 0o755)
        .file("x/child", b"c")
        .symlink("s", outside.to_str().unwrap())
        .file("y", b"file")
        .bytes();
    let upper = Tar::new().file("x", b"now a file").dir("s/", 0o750).file("s/inside", b"i").dir("y/", 0o755).bytes();
    f.apply(&[f.layer(lower), f.layer(upper)]).unwrap();
    assert_eq!(listing(&f.root), map(&[("s", "dir"), ("s/inside", "file:i"), ("x", "file:now a file"), ("y", "dir")]));
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0, "nothing written through the old symlink");
}

#[test]
fn absolute_paths_and_dotdot_are_refused() {
    let f = fixture();
    for (path, why) in [
        ("/etc/passwd", "absolute"),
        ("../escape", "'..'"),
        ("a/../../escape", "'..'"),
        ("a/../b", "'..'"),
        ("./../escape", "'..'"),
    ] {
        let layer = f.layer(Tar::new().dir("a/", 0o755).file(path, b"x").bytes());
        let m = invalid(f.apply(&[layer]), why);
        assert!(m.contains(path), "{m:?} names the entry");
        assert!(m.contains("layer 1 of 1"), "{m:?} names the layer");
    }
    assert!(!f.base.join("escape").exists() && !f.base.join("staging/escape").exists());
}

#[test]
fn a_symlink_in_the_tree_is_never_followed() {
    let f = fixture();
    let outside = f.base.join("x-outside");
    std::fs::create_dir(&outside).unwrap();
    let target = outside.to_str().unwrap().to_string();

    // In one layer: a -> /…/x-outside, then a/evil.
    let layer = f.layer(Tar::new().symlink("a", &target).file("a/evil", b"pwned").bytes());
    invalid(f.apply(&[layer]), "symlink or not a directory");
    assert!(!outside.join("evil").exists());

    // Across layers, and through a relative link.
    let lower = f.layer(Tar::new().symlink("b", &target).symlink("up", "../../..").bytes());
    for path in ["b/evil", "up/evil", "b/sub/evil"] {
        let upper = f.layer(Tar::new().file(path, b"pwned").bytes());
        invalid(f.apply(&[lower.clone(), upper]), "symlink or not a directory");
    }
    let upper = f.layer(Tar::new().dir("b/sub/", 0o755).bytes());
    invalid(f.apply(&[lower.clone(), upper]), "symlink or not a directory");
    // A whiteout through a link is refused too.
    let upper = f.layer(Tar::new().file("b/.wh.victim", b"").bytes());
    std::fs::write(outside.join("victim"), b"v").unwrap();
    invalid(f.apply(&[lower.clone(), upper]), "symlink or not a directory");
    assert!(outside.join("victim").exists());
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 1, "only the victim, untouched");
    assert!(!f.base.join("evil").exists());
}

#[test]
fn hard_links_stay_inside_the_tree() {
    let f = fixture();
    let outside = f.base.join("x-outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("passwd"), b"secret").unwrap();
    let target = outside.to_str().unwrap();

    let layer = f.layer(Tar::new().hardlink("x", "../../etc/passwd").bytes());
    invalid(f.apply(&[layer]), "'..'");
    let layer = f.layer(Tar::new().hardlink("x", "/etc/passwd").bytes());
    invalid(f.apply(&[layer]), "absolute");
    let layer = f.layer(Tar::new().symlink("a", target).hardlink("x", "a/passwd").bytes());
    invalid(f.apply(&[layer]), "symlink or not a directory");
    let layer = f.layer(Tar::new().hardlink("x", "missing").bytes());
    invalid(f.apply(&[layer]), "not in the tree");
    assert_eq!(std::fs::metadata(outside.join("passwd")).unwrap().nlink(), 1);

    // A link to a symlink links the symlink itself.
    let layer = f.layer(Tar::new().symlink("l", target).hardlink("h", "l").bytes());
    f.apply(&[layer]).unwrap();
    let h = std::fs::symlink_metadata(f.root.join("h")).unwrap();
    assert!(h.file_type().is_symlink());
    assert_eq!(h.ino(), std::fs::symlink_metadata(f.root.join("l")).unwrap().ino());
}

#[test]
fn devices_need_permission() {
    let f = fixture();
    let tar = Tar::new()
        .dir("dev/", 0o755)
        .device("dev/null", EntryType::Char, 1, 3)
        .device("run/fifo", EntryType::Fifo, 0, 0)
        .bytes();
    let layer = f.layer(tar);
    invalid(f.apply(std::slice::from_ref(&layer)), "device nodes and FIFOs are refused");
    let only_fifo = f.layer(Tar::new().device("p", EntryType::Fifo, 0, 0).bytes());
    invalid(f.apply(&[only_fifo]), "refused");

    let root2 = f.base.join("staging/root2");
    std::fs::create_dir_all(&root2).unwrap();
    let limits = ImportLimits { allow_devices: true, ..ImportLimits::default() };
    apply_layers(&[layer], &root2, &limits).unwrap();
    let null = std::fs::symlink_metadata(root2.join("dev/null")).unwrap();
    assert!(null.file_type().is_char_device());
    assert_eq!(null.rdev(), libc::makedev(1, 3));
    assert_eq!(null.mode() & 0o7777, 0o666);
    assert!(std::fs::symlink_metadata(root2.join("run/fifo")).unwrap().file_type().is_fifo());
}

#[test]
fn a_blob_larger_than_its_descriptor_is_refused_before_it_is_read() {
    let f = fixture();
    let bomb = zero_file_gzip("zeros", 100 << 20);
    assert!(bomb.len() < 200 << 10, "100 MB of zeros is a small gzip: {}", bomb.len());
    let mut layer = layer_blob(&f.blobs, &bomb, OCI_LAYER_GZIP);
    layer.size = 4096;
    invalid(f.apply(&[layer]), "descriptor says 4096");
    assert!(listing(&f.root).is_empty());
}

#[test]
fn a_layer_over_max_bytes_stops_at_the_bound() {
    let f = fixture();
    let limits = ImportLimits { max_bytes: 1 << 20, ..ImportLimits::default() };
    let bomb = layer_blob(&f.blobs, &zero_file_gzip("zeros", 100 << 20), OCI_LAYER_GZIP);
    invalid(f.apply_with(&[bomb], &limits), "past its bound of 1048576 bytes");
    assert_eq!(content_bytes(&f.root), 0, "the file is refused before it is written");

    // Over several files: the one that passes the bound is not written.
    let chunk = vec![7u8; 400 << 10];
    let tar = Tar::new().file("a", &chunk).file("b", &chunk).file("c", &chunk).file("d", &chunk).bytes();
    let layer = layer_blob(&f.blobs, &zstd(&tar), OCI_LAYER_ZSTD);
    invalid(f.apply_with(&[layer], &limits), "\"c\"");
    assert_eq!(content_bytes(&f.root), 800 << 10);
    assert!(content_bytes(&f.root) <= limits.max_bytes);
}

#[test]
fn the_decompressed_stream_is_bounded_too() {
    let f = fixture();
    // A directory whose header claims 50 MB of data: no content is written,
    // but the stream is read; the bound (content + 2 KiB an entry) stops it.
    let mut h = Tar::header(EntryType::Directory, b"bogus/", 0o755, 50 << 20);
    h.set_cksum();
    let mut tar = h.as_bytes().to_vec();
    tar.extend(std::iter::repeat_n(0u8, (50 << 20) + 1024));
    let layer = layer_blob(&f.blobs, &zstd(&tar), OCI_LAYER_ZSTD);
    let limits = ImportLimits { max_bytes: 1 << 20, max_entries: 100, allow_devices: false };
    invalid(f.apply_with(&[layer], &limits), "larger than the import's bound");

    // Headers: a PAX record of 2 MiB is cut at 1 MiB, not read into memory.
    let big = vec![b'x'; 2 << 20];
    let tar = Tar::new().pax(&[("comment", &big)]).file("f", b"x").bytes();
    invalid(f.apply(&[layer_blob(&f.blobs, &zstd(&tar), OCI_LAYER_ZSTD)]), "headers");

    // Entries.
    let mut tar = Tar::new();
    for i in 0..10 {
        tar = tar.file(&format!("f{i}"), b"");
    }
    let limits = ImportLimits { max_entries: 5, ..ImportLimits::default() };
    invalid(f.apply_with(&[f.layer(tar.bytes())], &limits), "more than 5 entries");
}

#[test]
fn digests_are_checked() {
    let f = fixture();
    let tar = Tar::new().file("f", b"content").bytes();
    let mut layer = f.layer(tar.clone());
    layer.digest = format!("sha256:{}", sha(b"something else"));
    invalid(f.apply(std::slice::from_ref(&layer)), "not the digest its descriptor names");
    layer.digest = "md5:abc".into();
    invalid(f.apply(&[layer]), "not sha256");
    // Corrupt compressed data of the right size is refused by its digest.
    let gz = gzip(&tar);
    let mut layer = layer_blob(&f.blobs, &gz, OCI_LAYER_GZIP);
    let mut bad = gz.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0xff;
    std::fs::write(&layer.path, &bad).unwrap();
    invalid(f.apply(std::slice::from_ref(&layer)), "not the digest");
    layer.size += 1;
    invalid(f.apply(&[layer]), "descriptor says");
}

#[test]
fn compression_follows_the_media_type_or_the_magic() {
    let f = fixture();
    let tar = Tar::new().file("z", b"zstd").bytes();
    // Docker's plain type, zstd content: sniffed.
    let z = layer_blob(&f.blobs, &zstd(&tar), "application/vnd.docker.image.rootfs.diff.tar");
    let g = layer_blob(&f.blobs, &gzip(&Tar::new().file("g", b"gzip").bytes()), "application/octet-stream");
    f.apply(&[z, g]).unwrap();
    assert_eq!(listing(&f.root), map(&[("g", "file:gzip"), ("z", "file:zstd")]));
    let lying = layer_blob(&f.blobs, &tar, OCI_LAYER_GZIP);
    invalid(f.apply(&[lying]), "does not start like it");
}

#[test]
fn modes_owners_times_xattrs_and_hard_links_are_kept() {
    let f = fixture();
    let tree = kept_attributes_tree(&f.blobs, &f.root);
    check_kept_attributes(&tree);
}

#[test]
fn long_names_and_pax_records_are_read() {
    let f = fixture();
    let deep = format!("{}/{}", "d".repeat(120), "f".repeat(130));
    let mut b = tar::Builder::new(Vec::new());
    // GNU long name records (the tar crate writes them past 100 bytes).
    let mut h = Tar::header(EntryType::Regular, b"", 0o644, 4);
    b.append_data(&mut h, &deep, &b"long"[..]).unwrap();
    let mut link = Tar::header(EntryType::Symlink, b"", 0o777, 0);
    b.append_link(&mut link, "l", format!("/{}", "t".repeat(200))).unwrap();
    // A PAX path and mtime override the header's.
    b.append_pax_extensions([("path", &b"pax/named"[..]), ("mtime", &b"1234567890.5"[..])]).unwrap();
    let mut h = Tar::header(EntryType::Regular, b"ignored", 0o600, 3);
    h.set_cksum();
    b.append(&h, &b"pax"[..]).unwrap();
    f.apply(&[f.layer(b.into_inner().unwrap())]).unwrap();
    assert_eq!(std::fs::read(f.root.join(&deep)).unwrap(), b"long");
    assert_eq!(std::fs::read_link(f.root.join("l")).unwrap().to_str().unwrap().len(), 201);
    let pax = std::fs::metadata(f.root.join("pax/named")).unwrap();
    assert_eq!((pax.mtime(), pax.mtime_nsec()), (1_234_567_890, 500_000_000));
    assert!(!f.root.join("ignored").exists());
}
