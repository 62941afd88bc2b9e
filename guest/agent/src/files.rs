//! File requests. Relative paths are taken relative to HOME (/root), the
//! same directory an exec starts in by default.

use crate::server::{error, io_error};
use crate::{exec::HOME, sys};
use forkd_agent_protocol::v1::{
    AgentError, DirListing, FileData, FileStat, MakeDirRequest, MountRequest, ReadFileRequest, RemoveRequest,
    RenameRequest, WriteFileRequest, agent_error::Kind,
};
use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Largest chunk one ReadFile returns.
pub const MAX_CHUNK: usize = 1 << 20;

pub fn resolve(path: &str) -> Result<PathBuf, AgentError> {
    if path.is_empty() {
        return Err(error(Kind::Invalid, "empty path"));
    }
    if path.contains('\0') {
        return Err(error(Kind::Invalid, "path contains a NUL byte"));
    }
    let p = Path::new(path);
    Ok(if p.is_absolute() { p.to_path_buf() } else { Path::new(HOME).join(p) })
}

pub fn read_file(req: &ReadFileRequest) -> Result<FileData, AgentError> {
    let path = resolve(&req.path)?;
    let shown = path.display().to_string();
    let f = fs::File::open(&path).map_err(|e| io_error(&shown, &e))?;
    let md = f.metadata().map_err(|e| io_error(&shown, &e))?;
    if md.is_dir() {
        return Err(error(Kind::Invalid, format!("{shown}: is a directory")));
    }
    let want = if req.length == 0 { MAX_CHUNK } else { (req.length as usize).min(MAX_CHUNK) };
    let mut data = vec![0u8; want];
    let mut got = 0;
    // Short reads are normal for pipes and /proc files: keep reading until
    // the chunk is full or the file ends.
    while got < want {
        let Some(at) = req.offset.checked_add(got as u64) else { break };
        match f.read_at(&mut data[got..], at) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_error(&shown, &e)),
        }
    }
    data.truncate(got);
    let size = md.len();
    let eof = got < want || (md.is_file() && req.offset.saturating_add(got as u64) >= size);
    Ok(FileData { data, eof, size })
}

/// Name of the staging file for an upload: hidden, next to the target (same
/// filesystem, so the final rename is atomic).
fn staging_path(target: &Path, upload_id: &str) -> Result<PathBuf, AgentError> {
    let name = target.file_name().ok_or_else(|| error(Kind::Invalid, format!("{}: no file name", target.display())))?;
    let id: String = upload_id.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-').take(64).collect();
    let staged = format!(".{}.forkd-upload-{}", name.to_string_lossy(), if id.is_empty() { "0" } else { &id });
    Ok(target.with_file_name(staged))
}

pub fn write_file(req: &WriteFileRequest) -> Result<(), AgentError> {
    let path = resolve(&req.path)?;
    let shown = path.display().to_string();
    if path.is_dir() {
        return Err(error(Kind::Invalid, format!("{shown}: is a directory")));
    }
    let staged = staging_path(&path, &req.upload_id)?;
    let mode = if req.mode & 0o7777 == 0 { 0o644 } else { req.mode & 0o7777 };
    let f = if req.first {
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(|e| io_error(&parent.display().to_string(), &e))?;
        }
        fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(&staged)
    } else {
        fs::OpenOptions::new().write(true).open(&staged)
    };
    let f = f.map_err(|e| {
        if !req.first && e.kind() == io::ErrorKind::NotFound {
            error(Kind::Invalid, format!("{shown}: no upload in progress (the first chunk must set first)"))
        } else {
            io_error(&shown, &e)
        }
    })?;
    let fail = |e: io::Error| {
        let _ = fs::remove_file(&staged);
        io_error(&shown, &e)
    };
    if !req.data.is_empty() {
        f.write_all_at(&req.data, req.offset).map_err(fail)?;
    }
    if req.last {
        f.set_permissions(fs::Permissions::from_mode(mode)).map_err(fail)?;
        f.sync_all().map_err(fail)?;
        fs::rename(&staged, &path).map_err(fail)?;
    }
    Ok(())
}

fn file_stat(path: &Path, md: &fs::Metadata, names: &crate::users::Names) -> FileStat {
    let symlink_target = if md.file_type().is_symlink() {
        fs::read_link(path).map(|t| t.display().to_string()).unwrap_or_default()
    } else {
        String::new()
    };
    FileStat {
        name: path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "/".into()),
        path: path.display().to_string(),
        size: md.len(),
        mode: md.mode(),
        is_dir: md.is_dir(),
        is_symlink: md.file_type().is_symlink(),
        mtime_unix: md.mtime(),
        uid: md.uid(),
        gid: md.gid(),
        owner: names.user(md.uid()),
        group: names.group(md.gid()),
        symlink_target,
    }
}

pub fn stat(path: &str) -> Result<FileStat, AgentError> {
    let p = resolve(path)?;
    let md = fs::symlink_metadata(&p).map_err(|e| io_error(&p.display().to_string(), &e))?;
    Ok(file_stat(&p, &md, &crate::users::Names::load()))
}

pub fn make_dir(req: &MakeDirRequest) -> Result<FileStat, AgentError> {
    let p = resolve(&req.path)?;
    let shown = p.display().to_string();
    if fs::symlink_metadata(&p).is_ok() {
        return Err(error(Kind::Exists, format!("{shown}: already exists")));
    }
    let mode = if req.mode & 0o7777 == 0 { 0o755 } else { req.mode & 0o7777 };
    fs::DirBuilder::new().recursive(true).mode(mode).create(&p).map_err(|e| io_error(&shown, &e))?;
    stat(&shown)
}

pub fn rename(req: &RenameRequest) -> Result<FileStat, AgentError> {
    let (from, to) = (resolve(&req.from)?, resolve(&req.to)?);
    let shown = from.display().to_string();
    if from == Path::new("/") {
        return Err(error(Kind::Permission, "refusing to move /"));
    }
    fs::symlink_metadata(&from).map_err(|e| io_error(&shown, &e))?;
    if let Some(parent) = to.parent() {
        fs::create_dir_all(parent).map_err(|e| io_error(&parent.display().to_string(), &e))?;
    }
    fs::rename(&from, &to).map_err(|e| io_error(&format!("{shown} -> {}", to.display()), &e))?;
    stat(&to.display().to_string())
}

pub fn list_dir(path: &str) -> Result<DirListing, AgentError> {
    let p = resolve(path)?;
    let shown = p.display().to_string();
    let rd = fs::read_dir(&p).map_err(|e| io_error(&shown, &e))?;
    let mut entries = Vec::new();
    let names = crate::users::Names::load();
    for ent in rd {
        let ent = ent.map_err(|e| io_error(&shown, &e))?;
        let ep = ent.path();
        // An entry removed while listing is skipped, not an error.
        if let Ok(md) = fs::symlink_metadata(&ep) {
            entries.push(file_stat(&ep, &md, &names));
        }
    }
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(DirListing { entries })
}

pub fn remove(req: &RemoveRequest) -> Result<(), AgentError> {
    let p = resolve(&req.path)?;
    let shown = p.display().to_string();
    if p == Path::new("/") {
        return Err(error(Kind::Permission, "refusing to remove /"));
    }
    let md = fs::symlink_metadata(&p).map_err(|e| io_error(&shown, &e))?;
    let r = if md.is_dir() {
        if req.recursive { fs::remove_dir_all(&p) } else { fs::remove_dir(&p) }
    } else {
        fs::remove_file(&p)
    };
    r.map_err(|e| io_error(&shown, &e))
}

pub fn mount(req: &MountRequest) -> Result<(), AgentError> {
    if req.device.is_empty() || req.target.is_empty() {
        return Err(error(Kind::Invalid, "mount needs a device and a target"));
    }
    let target = resolve(&req.target)?;
    let shown = target.display().to_string();
    // A child of a snapshot taken after the mount already has it: the mount
    // lives in the restored kernel's memory.
    if is_mount_point(&shown) {
        return Ok(());
    }
    let device = if req.reprobe { reprobe(&req.device)? } else { req.device.clone() };
    // A hot-added disk may take a moment to show up.
    let deadline = Instant::now() + Duration::from_secs(3);
    while !Path::new(&device).exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    fs::create_dir_all(&target).map_err(|e| io_error(&shown, &e))?;
    // A child restored from a snapshot may hold blocks of this disk that its
    // parent's kernel read (partition probe, superblock) before the disk was
    // written by a sibling: drop them so the mount reads the disk as it is.
    flush_block_cache(&device);
    let fstype = if req.fstype.is_empty() { "ext4" } else { &req.fstype };
    let flags = if req.read_only { libc::MS_RDONLY } else { 0 };
    sys::mount(&device, &shown, fstype, flags, "").map_err(|e| io_error(&format!("mount {device} on {shown}"), &e))
}

fn is_mount_point(target: &str) -> bool {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else { return false };
    // Field 5 is the mount point (spaces in it are octal-escaped).
    info.lines().any(|l| l.split(' ').nth(4) == Some(target))
}

/// Unbinds and rebinds the virtio driver of a disk so the kernel probes it
/// afresh, and returns the disk's device path afterwards (the kernel hands
/// the freed name back, but the name is looked up, not assumed).
fn reprobe(device: &str) -> Result<String, AgentError> {
    let name = device.strip_prefix("/dev/").filter(|n| !n.is_empty() && !n.contains('/'));
    let name = name.ok_or_else(|| error(Kind::Invalid, format!("{device}: expected /dev/<disk>")))?;
    let link = format!("/sys/block/{name}/device");
    let virtio = fs::read_link(&link).map_err(|e| io_error(&link, &e))?;
    let virtio = virtio
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| error(Kind::Invalid, format!("{link} names no device")))?
        .to_string();
    let driver = "/sys/bus/virtio/drivers/virtio_blk";
    fs::write(format!("{driver}/unbind"), &virtio).map_err(|e| io_error(&format!("unbind {virtio}"), &e))?;
    fs::write(format!("{driver}/bind"), &virtio).map_err(|e| io_error(&format!("bind {virtio}"), &e))?;
    let block_dir = format!("/sys/bus/virtio/devices/{virtio}/block");
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        if let Some(disk) = fs::read_dir(&block_dir).ok().and_then(|mut d| d.next()).and_then(|e| e.ok()) {
            return Ok(format!("/dev/{}", disk.file_name().to_string_lossy()));
        }
        if Instant::now() >= deadline {
            return Err(error(Kind::Timeout, format!("{device} did not come back after re-probing {virtio}")));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// BLKFLSBUF on a block device: writes back and drops its buffer cache.
fn flush_block_cache(device: &str) {
    use std::os::unix::io::AsRawFd;
    const BLKFLSBUF: libc::c_ulong = 0x1261;
    if let Ok(f) = fs::File::open(device) {
        // SAFETY: BLKFLSBUF takes no argument beyond the fd.
        unsafe {
            libc::ioctl(f.as_raw_fd(), BLKFLSBUF as _, 0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("forkd-agent-test-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    fn wr(path: &str, data: &[u8], offset: u64, first: bool, last: bool) -> Result<(), AgentError> {
        write_file(&WriteFileRequest {
            path: path.into(),
            offset,
            data: data.to_vec(),
            first,
            last,
            mode: 0o600,
            upload_id: "u1".into(),
        })
    }

    #[test]
    fn chunked_write_then_read() {
        let d = tmpdir("rw");
        let f = d.join("sub/out.bin");
        let fs_ = f.to_str().unwrap();
        wr(fs_, b"hello ", 0, true, false).unwrap();
        assert!(!f.exists(), "target appears only after the last chunk");
        wr(fs_, b"world", 6, false, true).unwrap();
        assert_eq!(fs::read(&f).unwrap(), b"hello world");
        assert_eq!(fs::metadata(&f).unwrap().mode() & 0o777, 0o600);
        assert_eq!(fs::read_dir(f.parent().unwrap()).unwrap().count(), 1, "no staging file left");

        let r = read_file(&ReadFileRequest { path: fs_.into(), offset: 6, length: 3 }).unwrap();
        assert_eq!(r.data, b"wor");
        assert!(!r.eof);
        assert_eq!(r.size, 11);
        let r = read_file(&ReadFileRequest { path: fs_.into(), offset: 9, length: 0 }).unwrap();
        assert_eq!(r.data, b"ld");
        assert!(r.eof);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn errors_have_kinds() {
        let d = tmpdir("err");
        let missing = d.join("nope");
        let e =
            read_file(&ReadFileRequest { path: missing.to_str().unwrap().into(), offset: 0, length: 0 }).unwrap_err();
        assert_eq!(e.kind, Kind::NotFound as i32);
        let e = stat(missing.to_str().unwrap()).unwrap_err();
        assert_eq!(e.kind, Kind::NotFound as i32);
        let e = wr(missing.to_str().unwrap(), b"x", 1, false, true).unwrap_err();
        assert_eq!(e.kind, Kind::Invalid as i32);
        fs::create_dir_all(d.join("full/inner")).unwrap();
        let e = remove(&RemoveRequest { path: d.join("full").to_str().unwrap().into(), recursive: false }).unwrap_err();
        assert_eq!(e.kind, Kind::Invalid as i32);
        remove(&RemoveRequest { path: d.join("full").to_str().unwrap().into(), recursive: true }).unwrap();
        assert_eq!(resolve("").unwrap_err().kind, Kind::Invalid as i32);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn lists_and_stats() {
        let d = tmpdir("ls");
        fs::write(d.join("b"), b"12").unwrap();
        fs::create_dir(d.join("a")).unwrap();
        std::os::unix::fs::symlink("b", d.join("c")).unwrap();
        let l = list_dir(d.to_str().unwrap()).unwrap();
        let names: Vec<_> = l.entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["a", "b", "c"]);
        assert!(l.entries[0].is_dir);
        assert_eq!(l.entries[1].size, 2);
        assert!(l.entries[2].is_symlink);
        assert_eq!(resolve("x/y").unwrap(), Path::new("/root/x/y"));
        fs::remove_dir_all(&d).unwrap();
    }
}
