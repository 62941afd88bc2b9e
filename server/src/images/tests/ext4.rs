//! Tests of writing a staged tree as ext4: what the image holds is read
//! back with debugfs.

use std::process::Command;

use super::super::layers::fixtures::{MTIME, check_kept_attributes, kept_attributes_tree};
use super::*;

/// `debugfs -R <request> <image>`'s output; None when debugfs is missing.
fn debugfs(image: &Path, request: &str) -> Option<String> {
    let tool = find_tool("debugfs")?;
    let out = Command::new(tool).arg("-R").arg(request).arg(image).output().unwrap();
    assert!(out.status.success(), "debugfs {request}: {}", String::from_utf8_lossy(&out.stderr));
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The value after `key` in debugfs's stat output (`Mode:  04755` → `04755`).
fn field<'a>(stat: &'a str, key: &str) -> &'a str {
    let at = stat.find(key).unwrap_or_else(|| panic!("{key} in {stat}")) + key.len();
    stat[at..].split_whitespace().next().unwrap()
}

#[test]
fn the_image_keeps_owners_modes_links_and_xattrs() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    std::fs::create_dir(&root).unwrap();
    kept_attributes_tree(&tmp.path().join("blobs"), &root);
    check_kept_attributes(&root);
    let out = tmp.path().join("image/rootfs.ext4");
    std::fs::create_dir(out.parent().unwrap()).unwrap();
    std::fs::write(&out, b"an older image").unwrap();

    let size = make_ext4(&root, &out).unwrap();
    assert_eq!(size, std::fs::metadata(&out).unwrap().len());
    assert_eq!(size % (4 << 20), 0);
    assert!(size >= 32 << 20);
    let left: Vec<_> = std::fs::read_dir(out.parent().unwrap()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left, vec![std::ffi::OsString::from("rootfs.ext4")], "no temporary file is left");

    let Some(su) = debugfs(&out, "stat /bin/su") else {
        eprintln!("debugfs is not installed: the image's content is not checked");
        return;
    };
    assert_eq!(field(&su, "Mode:"), "04755");
    assert_eq!(field(&su, "User:"), "0");
    let wall = debugfs(&out, "stat /bin/wall").unwrap();
    assert_eq!((field(&wall, "Mode:"), field(&wall, "Group:")), ("02755", "5"));
    let tmpdir = debugfs(&out, "stat /tmp").unwrap();
    assert_eq!(field(&tmpdir, "Mode:"), "01777");
    let f = debugfs(&out, "stat /home/u/f").unwrap();
    assert_eq!((field(&f, "User:"), field(&f, "Group:"), field(&f, "Mode:")), ("1000", "1001", "0640"));
    assert_eq!(field(&f, "Links:"), "2");
    let g = debugfs(&out, "stat /home/u/g").unwrap();
    assert_eq!(field(&g, "Inode:"), field(&f, "Inode:"), "a hard link is one inode");
    let home = debugfs(&out, "stat /home/u").unwrap();
    assert_eq!((field(&home, "User:"), field(&home, "Mode:")), ("1000", "0750"));
    assert!(f.contains("mtime: 0x5f5e1000"), "mtime 1600000000 kept: {f}");
    assert!(f.contains("user.forkd (3) = \"yes\"") && f.contains("trusted.note (1) = \"t\""), "xattrs: {f}");
    let lib = debugfs(&out, "stat /lib").unwrap();
    assert!(lib.contains("Type: symlink") && lib.contains("Fast link dest: \"usr/lib\""), "{lib}");
    let root_stat = debugfs(&out, "stat /").unwrap();
    assert_eq!((field(&root_stat, "User:"), field(&root_stat, "Group:")), ("0", "0"));
    let bin = debugfs(&out, "stat /bin").unwrap();
    assert!(bin.contains(&format!("mtime: {:#x}", MTIME)), "{bin}");
}

#[test]
fn the_size_follows_the_tree() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    std::fs::create_dir(&root).unwrap();
    // 40 MiB of content in 2000 files.
    for i in 0..2000 {
        std::fs::write(root.join(format!("f{i}")), vec![1u8; 20 << 10]).unwrap();
    }
    let usage = measure(&root).unwrap();
    assert_eq!(usage.inodes, 2001);
    // 5 blocks a file, and the root directory's own.
    assert!((2000 * 5 + 1..2000 * 5 + 64).contains(&usage.blocks), "{usage:?}");
    let size = make_ext4(&root, &tmp.path().join("big.ext4")).unwrap();
    assert!(size > 40 << 20 && size < 120 << 20, "{size}");
    // A file that is not a directory is not a tree.
    let e = make_ext4(&root.join("f1"), &tmp.path().join("x.ext4")).unwrap_err();
    assert!(matches!(e, ImageError::Invalid(_)), "{e:?}");
}

#[test]
fn no_mke2fs_is_a_precondition() {
    assert!(find_tool("forkd-no-such-tool").is_none());
    assert!(find_tool("sh").is_some());
    let e = tool("forkd-no-such-tool").unwrap_err();
    assert!(matches!(&e, ImageError::Precondition(m) if m.contains("forkd-no-such-tool")), "{e:?}");
}

#[test]
fn an_image_unpacks_to_its_tree() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    std::fs::create_dir(&root).unwrap();
    kept_attributes_tree(&tmp.path().join("blobs"), &root);
    let image = tmp.path().join("rootfs.ext4");
    make_ext4(&root, &image).unwrap();
    if find_tool("debugfs").is_none() {
        eprintln!("debugfs is not installed: unpacking is not checked");
        return;
    }
    let back = tmp.path().join("back");
    unpack_ext4(&image, &back).unwrap();
    let want = super::super::layers::fixtures::listing(&root);
    assert_eq!(super::super::layers::fixtures::listing(&back), want);
    let f = std::fs::symlink_metadata(back.join("home/u/f")).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!((f.uid(), f.gid(), f.mode() & 0o777, f.mtime()), (1000, 1001, 0o640, 1_600_000_000));
    let e = unpack_ext4(&tmp.path().join("missing.ext4"), &tmp.path().join("back2")).unwrap_err();
    assert!(matches!(e, ImageError::Io { .. }), "{e:?}");
}
