//! Applying image layers: each layer tar, bottom first, is unpacked into a
//! staging root by the OCI changeset rules (whiteouts, opaque directories),
//! with every path resolved one component at a time without following a
//! symlink, and every write bounded — the content is hostile.
//!
//! Paths in a layer are relative to the root (a leading `./` or `.`
//! component is dropped); an absolute path, a `..` component, or a parent
//! that is a symlink or not a directory is refused, never normalised. Files
//! are created with `*at` calls relative to a descriptor of their parent
//! directory; an existing non-directory is unlinked first and a file is
//! then created with `O_EXCL | O_NOFOLLOW`, so nothing is ever written
//! through a link. Symlink targets are stored as text and never followed.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::ffi::CString;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::rc::Rc;

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, openat};
use nix::sys::stat::{
    FchmodatFlags, FileStat, Mode, SFlag, UtimensatFlags, fchmod, fchmodat, fstatat, futimens, mkdirat, mknodat,
    utimensat,
};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid, UnlinkatFlags, fchown, fchownat, linkat, symlinkat, unlinkat};
use sha2::{Digest, Sha256};
use tar::EntryType;

use super::{ImageError, ImportLimits, LayerBlob};

/// The deepest path a layer may name.
const MAX_DEPTH: usize = 256;
/// The longest path a layer may name (PATH_MAX).
const MAX_PATH: usize = 4096;
/// The longest name of one path component (ext4's limit).
const NAME_MAX: usize = 255;
/// What the headers of one entry (GNU long names, PAX records) may take of
/// the stream; the tar reader holds them in memory.
pub(super) const META_BUDGET: u64 = 1 << 20;
/// Decompressed stream bytes allowed per entry beyond file content: the
/// header, padding and a typical PAX record.
const PER_ENTRY_OVERHEAD: u64 = 2048;
/// The largest xattr value (the kernel's limit).
const MAX_XATTR_VALUE: usize = 64 << 10;
const WHITEOUT: &[u8] = b".wh.";
const OPAQUE: &[u8] = b".wh..wh..opq";

/// What applying the layers wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplyStats {
    pub layers: usize,
    /// Tar entries read, whiteouts included.
    pub entries: u64,
    /// Bytes of regular-file content written.
    pub bytes: u64,
    pub whiteouts: u64,
}

/// Applies `layers` bottom-up into `root`, an existing (empty) staging
/// directory, as root on the host: modes (setuid, sticky), numeric owners,
/// mtimes, `SCHILY.xattr.*` xattrs and hard links are kept; device nodes
/// and FIFOs only with `limits.allow_devices`.
///
/// Every blob's size is checked against its descriptor before it is read
/// and its sha256 is checked as it streams; the content bytes written and
/// the entries read across all layers are bounded by `limits`, and so is
/// the decompressed stream (content plus 2 KiB an entry), so a layer that
/// inflates past the bound is refused without writing beyond it. Hostile
/// or malformed content is [`ImageError::Invalid`], naming the layer and
/// the entry.
///
/// Nothing outside `root` is touched. On any error `root` holds a partial
/// tree: the caller deletes it (it is a staging directory).
pub fn apply_layers(layers: &[LayerBlob], root: &Path, limits: &ImportLimits) -> Result<ApplyStats, ImageError> {
    let stream_limit = limits.max_bytes.saturating_add(limits.max_entries.saturating_mul(PER_ENTRY_OVERHEAD));
    let mut applier = Applier {
        tree: Tree::open(root)?,
        limits,
        meter: Rc::new(Meter::new(stream_limit)),
        stats: ApplyStats::default(),
        touched: HashSet::new(),
        dir_times: HashMap::new(),
    };
    for (i, layer) in layers.iter().enumerate() {
        applier.touched.clear();
        applier.apply_layer(i, layers.len(), layer)?;
        applier.stats.layers += 1;
    }
    applier.set_dir_times()?;
    Ok(applier.stats)
}

// ---- paths -------------------------------------------------------------------

/// The components of a path inside an archive: `.` components, a leading
/// `./` and empty components are dropped; an absolute path, `..`, NUL or an
/// over-long path is refused. An empty result is the root itself.
pub(super) fn split_path(raw: &[u8]) -> Result<Vec<&[u8]>, String> {
    if raw.is_empty() {
        return Err("empty path".into());
    }
    if raw.len() > MAX_PATH {
        return Err(format!("path longer than {MAX_PATH} bytes"));
    }
    if raw.contains(&0) {
        return Err("NUL in path".into());
    }
    if raw[0] == b'/' {
        return Err("absolute path (paths in a layer are relative to its root)".into());
    }
    let mut out = Vec::new();
    for c in raw.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err("'..' in path".into()),
            c if c.len() > NAME_MAX => return Err(format!("a path component is longer than {NAME_MAX} bytes")),
            c => out.push(c),
        }
    }
    if out.len() > MAX_DEPTH {
        return Err(format!("path deeper than {MAX_DEPTH} components"));
    }
    Ok(out)
}

pub(super) fn show(comps: &[&[u8]]) -> String {
    String::from_utf8_lossy(&comps.join(&b'/')).into_owned()
}

/// A host-side failure of a system call on the staging tree.
pub(super) fn host(what: &str, e: Errno) -> ImageError {
    match e {
        Errno::ENOSPC | Errno::EDQUOT => {
            ImageError::Precondition(format!("{what}: no space left on the staging file system"))
        }
        e => ImageError::io(what.to_string(), io::Error::from(e)),
    }
}

pub(super) fn host_io(what: &str, e: io::Error) -> ImageError {
    match e.raw_os_error().map(Errno::from_raw) {
        Some(errno) => host(what, errno),
        None => ImageError::io(what.to_string(), e),
    }
}

/// Puts `ctx` in front of an error's message.
pub(super) fn within(ctx: &str, e: ImageError) -> ImageError {
    match e {
        ImageError::Invalid(m) => ImageError::Invalid(format!("{ctx}: {m}")),
        ImageError::Precondition(m) => ImageError::Precondition(format!("{ctx}: {m}")),
        ImageError::Io { context, source } => ImageError::Io { context: format!("{ctx}: {context}"), source },
        e => e,
    }
}

const DIR_FLAGS: OFlag = OFlag::O_RDONLY.union(OFlag::O_DIRECTORY).union(OFlag::O_NOFOLLOW).union(OFlag::O_CLOEXEC);

fn is_dir(st: &FileStat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFDIR
}

/// `name` in `dir`, not following a symlink; None when it is not there.
pub(super) fn stat_at(dir: BorrowedFd<'_>, name: &[u8]) -> Result<Option<FileStat>, ImageError> {
    match fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(st)),
        Err(Errno::ENOENT) => Ok(None),
        Err(e) => Err(host("stat", e)),
    }
}

/// The names in directory `dir` (without `.` and `..`).
fn list_dir(dir: BorrowedFd<'_>) -> Result<Vec<Vec<u8>>, ImageError> {
    // A fresh open file description: a listing always starts at the top.
    let fresh = openat(dir, ".", DIR_FLAGS, Mode::empty()).map_err(|e| host("open directory", e))?;
    let mut d = nix::dir::Dir::from_fd(fresh).map_err(|e| host("read directory", e))?;
    let mut names = Vec::new();
    for entry in d.iter() {
        let entry = entry.map_err(|e| host("read directory", e))?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." {
            names.push(name.to_vec());
        }
    }
    Ok(names)
}

/// Removes `name` from `dir`, a directory with everything in it.
fn remove_all(dir: BorrowedFd<'_>, name: &[u8], depth: usize) -> Result<(), ImageError> {
    let Some(st) = stat_at(dir, name)? else { return Ok(()) };
    if is_dir(&st) {
        // Paths are at most MAX_DEPTH deep, so the tree is too.
        if depth > MAX_DEPTH + 1 {
            return Err(ImageError::Invalid("the tree is deeper than any layer path may be".into()));
        }
        let sub = openat(dir, name, DIR_FLAGS, Mode::empty()).map_err(|e| host("open directory", e))?;
        for child in list_dir(sub.as_fd())? {
            remove_all(sub.as_fd(), &child, depth + 1)?;
        }
        unlinkat(dir, name, UnlinkatFlags::RemoveDir).map_err(|e| host("remove directory", e))
    } else {
        unlinkat(dir, name, UnlinkatFlags::NoRemoveDir).map_err(|e| host("remove", e))
    }
}

/// Makes room for a new non-directory `name` in `dir`: whatever is there
/// goes (a directory with its contents).
fn clear(dir: BorrowedFd<'_>, name: &[u8]) -> Result<(), ImageError> {
    match stat_at(dir, name)? {
        None => Ok(()),
        Some(st) if is_dir(&st) => remove_all(dir, name, 0),
        Some(_) => unlinkat(dir, name, UnlinkatFlags::NoRemoveDir).map_err(|e| host("remove", e)),
    }
}

/// A directory tree that is only ever walked without following symlinks.
pub(super) struct Tree {
    root: OwnedFd,
}

impl Tree {
    pub(super) fn open(root: &Path) -> Result<Tree, ImageError> {
        let root_fd = nix::fcntl::open(root, OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())
            .map_err(|e| host(&format!("open {}", root.display()), e))?;
        Ok(Tree { root: root_fd })
    }

    /// The directory `comps` below the root, each component opened with
    /// `O_NOFOLLOW | O_DIRECTORY` from its parent. A missing one is made
    /// (0755) when `create`, else the answer is None. A component that is a
    /// symlink or not a directory is refused.
    pub(super) fn dir(&self, comps: &[&[u8]], create: bool) -> Result<Option<OwnedFd>, ImageError> {
        let mut cur = self.root.try_clone().map_err(|e| host_io("dup", e))?;
        for (i, c) in comps.iter().enumerate() {
            let refuse = || {
                ImageError::Invalid(format!(
                    "{:?} is a symlink or not a directory: nothing is written through it",
                    show(&comps[..=i])
                ))
            };
            let next = match openat(cur.as_fd(), *c, DIR_FLAGS, Mode::empty()) {
                Ok(fd) => fd,
                Err(Errno::ENOENT) if create => {
                    match mkdirat(cur.as_fd(), *c, Mode::from_bits_truncate(0o755)) {
                        Ok(()) | Err(Errno::EEXIST) => {}
                        Err(e) => return Err(host("mkdir", e)),
                    }
                    let fd = openat(cur.as_fd(), *c, DIR_FLAGS, Mode::empty()).map_err(|e| match e {
                        Errno::ELOOP | Errno::ENOTDIR => refuse(),
                        e => host("open directory", e),
                    })?;
                    // Independent of the umask.
                    fchmod(fd.as_fd(), Mode::from_bits_truncate(0o755)).map_err(|e| host("chmod", e))?;
                    fd
                }
                Err(Errno::ENOENT) => return Ok(None),
                Err(Errno::ELOOP | Errno::ENOTDIR) => return Err(refuse()),
                Err(e) => return Err(host("open directory", e)),
            };
            cur = next;
        }
        Ok(Some(cur))
    }
}

// ---- streams -----------------------------------------------------------------

/// Bounds on a decompressed tar stream: the whole (`limit`, across layers)
/// and what the tar reader may take until the next entry (`allowance`).
pub(super) struct Meter {
    allowance: Cell<u64>,
    used: Cell<u64>,
    limit: u64,
    tripped: Cell<Option<&'static str>>,
}

impl Meter {
    pub(super) fn new(limit: u64) -> Meter {
        Meter { allowance: Cell::new(META_BUDGET), used: Cell::new(0), limit, tripped: Cell::new(None) }
    }

    /// Before the next entry's headers are read: the rest of the current
    /// entry (`size`, padded to a block) and the next headers may come.
    pub(super) fn allow_entry(&self, size: u64) {
        self.allowance.set(size.div_ceil(512).saturating_mul(512).saturating_add(META_BUDGET));
    }

    /// Why the stream was cut, if it was.
    pub(super) fn tripped(&self) -> Option<&'static str> {
        self.tripped.get()
    }
}

/// A reader counted against a [`Meter`].
pub(super) struct Metered<R> {
    pub(super) inner: R,
    pub(super) meter: Rc<Meter>,
}

impl<R: Read> Read for Metered<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let m = &self.meter;
        let room = m.limit.saturating_sub(m.used.get());
        let allow = m.allowance.get().min(room);
        if allow == 0 {
            let why = if room == 0 {
                "the decompressed layer is larger than the import's bound"
            } else {
                "an entry's headers (long names, PAX records) are larger than 1 MiB"
            };
            m.tripped.set(Some(why));
            return Err(io::Error::other(why));
        }
        let cap = buf.len().min(usize::try_from(allow).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..cap])?;
        m.allowance.set(m.allowance.get() - n as u64);
        m.used.set(m.used.get() + n as u64);
        Ok(n)
    }
}

#[derive(Default)]
struct HashState {
    hasher: Sha256,
    read: u64,
}

/// The first `size` bytes of a blob file, hashed as they are read.
struct Hashing<'f> {
    file: &'f File,
    size: u64,
    state: Rc<RefCell<HashState>>,
}

impl Read for Hashing<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut st = self.state.borrow_mut();
        let left = self.size - st.read;
        if left == 0 || buf.is_empty() {
            return Ok(0);
        }
        let cap = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = (&mut &*self.file).read(&mut buf[..cap])?;
        st.hasher.update(&buf[..n]);
        st.read += n as u64;
        Ok(n)
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Codec {
    Plain,
    Gzip,
    Zstd,
}

/// How a blob is compressed: as its media type says (checked against its
/// first bytes), or sniffed from them when the type is plain or unknown.
pub(super) fn codec(media_type: &str, head: &[u8]) -> Result<Codec, String> {
    let sniffed = if head.starts_with(&[0x1f, 0x8b]) {
        Some(Codec::Gzip)
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Some(Codec::Zstd)
    } else if head.starts_with(b"\xfd7zXZ\0") {
        return Err("xz-compressed layers are not supported".into());
    } else {
        None
    };
    let mt = media_type.to_ascii_lowercase();
    let declared = if mt.ends_with("+gzip") || mt.ends_with(".gzip") || mt.ends_with(".tar.gz") {
        Some(Codec::Gzip)
    } else if mt.ends_with("+zstd") || mt.ends_with(".zstd") {
        Some(Codec::Zstd)
    } else {
        None
    };
    match (declared, sniffed) {
        (Some(d), Some(s)) if d == s => Ok(d),
        (Some(d), _) => Err(format!("media type {media_type} says {d:?}, but the blob does not start like it")),
        (None, Some(s)) => Ok(s),
        (None, None) => Ok(Codec::Plain),
    }
}

/// `src` decompressed as `codec` says.
pub(super) fn decoder<'a, R: BufRead + 'a>(codec: Codec, src: R) -> io::Result<Box<dyn Read + 'a>> {
    Ok(match codec {
        Codec::Plain => Box::new(src),
        Codec::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(src)),
        Codec::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(src)?),
    })
}

// ---- applying ----------------------------------------------------------------

/// Why walking a layer stopped: its stream could not be read (which the
/// digest check may explain), or the content was refused / the host failed.
enum Stop {
    Stream(io::Error),
    Image(ImageError),
}

impl From<ImageError> for Stop {
    fn from(e: ImageError) -> Self {
        Stop::Image(e)
    }
}

/// The attributes an entry carries.
struct Meta {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: TimeSpec,
    xattrs: Vec<(CString, Vec<u8>)>,
}

impl Meta {
    fn of<R: Read>(entry: &mut tar::Entry<'_, R>) -> Result<Meta, String> {
        let h = entry.header();
        let mode = h.mode().map_err(|e| format!("bad mode: {e}"))? & 0o7777;
        // A numeric field left empty (all NUL or spaces, as some writers
        // do) reads as 0; one with garbage in it is refused.
        let blank = |f: &[u8]| f.iter().all(|b| *b == 0 || *b == b' ');
        let ustar = h.as_old();
        let uid = if blank(&ustar.uid) { Some(0) } else { h.uid().ok().and_then(|u| u32::try_from(u).ok()) };
        let gid = if blank(&ustar.gid) { Some(0) } else { h.gid().ok().and_then(|g| u32::try_from(g).ok()) };
        let secs = if blank(&ustar.mtime) { Some(0) } else { h.mtime().ok().and_then(|t| i64::try_from(t).ok()) };
        let (uid, gid, secs) = (uid.ok_or("bad uid")?, gid.ok_or("bad gid")?, secs.ok_or("bad mtime")?);
        let mut mtime = TimeSpec::new(secs, 0);
        let mut xattrs = Vec::new();
        if let Some(exts) = entry.pax_extensions().map_err(|e| format!("bad PAX header: {e}"))? {
            for ext in exts {
                let ext = ext.map_err(|e| format!("bad PAX record: {e}"))?;
                let key = ext.key_bytes();
                if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                    let value = ext.value_bytes();
                    if name.is_empty() || name.len() > NAME_MAX || !name.contains(&b'.') {
                        return Err(format!("bad xattr name {:?}", String::from_utf8_lossy(name)));
                    }
                    if value.len() > MAX_XATTR_VALUE {
                        return Err(format!("xattr {:?} is over 64 KiB", String::from_utf8_lossy(name)));
                    }
                    let name = CString::new(name).map_err(|_| "NUL in an xattr name")?;
                    xattrs.push((name, value.to_vec()));
                } else if key == b"mtime"
                    && let Some(t) = ext.value().ok().and_then(parse_pax_time)
                {
                    mtime = t;
                }
            }
        }
        Ok(Meta { mode, uid, gid, mtime, xattrs })
    }

    fn perm(&self) -> Mode {
        Mode::from_bits_truncate(self.mode)
    }
}

/// A PAX time: decimal seconds with an optional fraction (`1700000000.5`).
fn parse_pax_time(v: &str) -> Option<TimeSpec> {
    let (int, frac) = v.split_once('.').unwrap_or((v, ""));
    let secs: i64 = int.parse().ok()?;
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let digits: String = frac.chars().chain(std::iter::repeat('0')).take(9).collect();
    let mut nanos: i64 = digits.parse().ok()?;
    if int.starts_with('-') && nanos > 0 {
        // -1.5 is 1.5 s before the epoch: -2 s + 0.5 s.
        return Some(TimeSpec::new(secs - 1, 1_000_000_000 - nanos));
    }
    if nanos >= 1_000_000_000 {
        nanos = 999_999_999;
    }
    Some(TimeSpec::new(secs, nanos))
}

fn xattr_error(name: &CString, e: Errno) -> ImageError {
    let n = name.to_string_lossy();
    match e {
        Errno::EOPNOTSUPP => ImageError::Precondition(format!("the staging file system does not keep xattr {n}")),
        Errno::EPERM | Errno::EINVAL | Errno::ERANGE | Errno::E2BIG | Errno::ENOSPC => {
            ImageError::Invalid(format!("xattr {n} cannot be set: {e}"))
        }
        e => host(&format!("set xattr {n}"), e),
    }
}

fn set_xattrs_fd(fd: BorrowedFd<'_>, xattrs: &[(CString, Vec<u8>)]) -> Result<(), ImageError> {
    for (name, value) in xattrs {
        // SAFETY: a live descriptor, a NUL-terminated name and a pointer and
        // length of a live buffer; the result is checked.
        let rc = unsafe { libc::fsetxattr(fd.as_raw_fd(), name.as_ptr(), value.as_ptr().cast(), value.len(), 0) };
        if rc != 0 {
            return Err(xattr_error(name, Errno::last()));
        }
    }
    Ok(())
}

/// xattrs on `name` in `dir` itself (a symlink or a device: no descriptor
/// of it can carry them). The path goes through the directory's descriptor
/// in /proc, and `lsetxattr` does not follow the last component.
fn set_xattrs_at(dir: BorrowedFd<'_>, name: &[u8], xattrs: &[(CString, Vec<u8>)]) -> Result<(), ImageError> {
    if xattrs.is_empty() {
        return Ok(());
    }
    let mut path = format!("/proc/self/fd/{}/", dir.as_raw_fd()).into_bytes();
    path.extend_from_slice(name);
    let path = CString::new(path).map_err(|_| ImageError::Invalid("NUL in a name".into()))?;
    for (key, value) in xattrs {
        // SAFETY: NUL-terminated path and name, a pointer and length of a
        // live buffer; the result is checked.
        let rc = unsafe { libc::lsetxattr(path.as_ptr(), key.as_ptr(), value.as_ptr().cast(), value.len(), 0) };
        if rc != 0 {
            return Err(xattr_error(key, Errno::last()));
        }
    }
    Ok(())
}

/// Owner, mode and xattrs on an open file or directory (in that order:
/// chown clears setuid bits and file capabilities).
fn set_meta_fd(fd: BorrowedFd<'_>, meta: &Meta) -> Result<(), ImageError> {
    fchown(fd, Some(Uid::from_raw(meta.uid)), Some(Gid::from_raw(meta.gid))).map_err(|e| host("chown", e))?;
    fchmod(fd, meta.perm()).map_err(|e| host("chmod", e))?;
    set_xattrs_fd(fd, &meta.xattrs)
}

struct Applier<'a> {
    tree: Tree,
    limits: &'a ImportLimits,
    meter: Rc<Meter>,
    stats: ApplyStats,
    /// Paths this layer wrote, and their ancestors: its whiteouts spare
    /// them (a whiteout applies to lower layers only).
    touched: HashSet<Vec<u8>>,
    /// Directory mtimes, set once everything is written.
    dir_times: HashMap<Vec<u8>, TimeSpec>,
}

impl Applier<'_> {
    fn apply_layer(&mut self, idx: usize, count: usize, layer: &LayerBlob) -> Result<(), ImageError> {
        let label = format!("layer {} of {count} ({})", idx + 1, layer.digest);
        let bad = |why: String| ImageError::Invalid(format!("{label}: {why}"));
        let want = super::source::sha256_hex(&layer.digest)
            .ok_or_else(|| bad("the digest is not sha256:<64 hex digits>".into()))?;
        let file = File::options()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&layer.path)
            .map_err(|e| within(&label, host_io(&format!("open {}", layer.path.display()), e)))?;
        let meta = file.metadata().map_err(|e| within(&label, host_io("stat", e)))?;
        if !meta.is_file() {
            return Err(bad("the blob is not a regular file".into()));
        }
        if meta.len() != layer.size {
            return Err(bad(format!("the blob is {} bytes but its descriptor says {}", meta.len(), layer.size)));
        }

        let state = Rc::new(RefCell::new(HashState::default()));
        let walked = {
            let raw = Hashing { file: &file, size: layer.size, state: state.clone() };
            let mut buffered = BufReader::with_capacity(1 << 16, raw);
            let head = buffered.fill_buf().map_err(|e| within(&label, host_io("read", e)))?;
            let codec = codec(&layer.media_type, &head[..head.len().min(8)]).map_err(bad)?;
            match decoder(codec, buffered) {
                Ok(stream) => {
                    self.meter.allowance.set(META_BUDGET);
                    let mut archive = tar::Archive::new(Metered { inner: stream, meter: self.meter.clone() });
                    self.walk(&mut archive, &label)
                }
                Err(e) => Err(Stop::Stream(e)),
            }
        };
        let e = match walked {
            Ok(()) => None,
            Err(Stop::Image(e)) => return Err(e),
            Err(Stop::Stream(_)) if self.meter.tripped().is_some() => {
                return Err(bad(self.meter.tripped().unwrap_or_default().to_string()));
            }
            Err(Stop::Stream(e)) => Some(e),
        };
        // The rest of the blob (a tar ends before its padding; a broken
        // stream before its end), so the digest covers all of it.
        let mut rest = Hashing { file: &file, size: layer.size, state: state.clone() };
        io::copy(&mut rest, &mut io::sink()).map_err(|e| within(&label, host_io("read", e)))?;
        let st = state.borrow();
        let got = hex::encode(st.hasher.clone().finalize());
        if st.read != layer.size || got != want {
            return Err(bad(format!("the blob's content is sha256:{got}, not the digest its descriptor names")));
        }
        match e {
            None => Ok(()),
            Some(e) => Err(bad(format!("not a readable layer: {e}"))),
        }
    }

    fn walk<R: Read>(&mut self, archive: &mut tar::Archive<R>, label: &str) -> Result<(), Stop> {
        for entry in archive.entries().map_err(Stop::Stream)? {
            let mut entry = entry.map_err(Stop::Stream)?;
            let stored = entry.header().entry_size().unwrap_or(0);
            self.meter.allow_entry(entry.size().max(stored));
            self.stats.entries += 1;
            if self.stats.entries > self.limits.max_entries {
                return Err(Stop::Image(ImageError::Invalid(format!(
                    "{label}: the image has more than {} entries",
                    self.limits.max_entries
                ))));
            }
            self.entry(&mut entry, label)?;
        }
        Ok(())
    }

    fn entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>, label: &str) -> Result<(), Stop> {
        let raw = entry.path_bytes().into_owned();
        let ctx = format!("{label}: entry {:?}", String::from_utf8_lossy(&raw));
        let bad = |why: String| Stop::Image(ImageError::Invalid(format!("{ctx}: {why}")));
        let kind = entry.header().entry_type();
        if matches!(kind, EntryType::XGlobalHeader | EntryType::XHeader) {
            // Metadata for the archive (a global PAX header): no file.
            return Ok(());
        }
        let comps = split_path(&raw).map_err(bad)?;
        if comps.iter().rev().skip(1).any(|c| c.starts_with(WHITEOUT)) {
            return Err(bad("a whiteout name used as a directory".into()));
        }
        if let Some((name, parent)) = comps.split_last()
            && name.starts_with(WHITEOUT)
        {
            self.stats.whiteouts += 1;
            let done = if *name == OPAQUE {
                self.opaque(parent)
            } else if name.starts_with(b".wh..wh.") {
                // Other `.wh..wh.` names are a union file system's own
                // bookkeeping: nothing to apply.
                Ok(())
            } else {
                let target = &name[WHITEOUT.len()..];
                if target.is_empty() || target == b"." || target == b".." {
                    return Err(bad("a whiteout that names nothing".into()));
                }
                self.whiteout(parent, target)
            };
            return done.map_err(|e| Stop::Image(within(&ctx, e)));
        }

        let meta = Meta::of(entry).map_err(bad)?;
        let Some((name, parent)) = comps.split_last() else {
            // The root itself: only its attributes.
            if kind != EntryType::Directory {
                return Err(bad("the root of a layer must be a directory".into()));
            }
            let root = self.tree.dir(&[], false)?.expect("the root is there");
            set_meta_fd(root.as_fd(), &meta).map_err(|e| Stop::Image(within(&ctx, e)))?;
            self.dir_times.insert(Vec::new(), meta.mtime);
            return Ok(());
        };
        self.touch(&comps);
        let dir = self.tree.dir(parent, true).map_err(|e| Stop::Image(within(&ctx, e)))?.expect("created when missing");
        let dir = dir.as_fd();
        let wrap = |e: ImageError| Stop::Image(within(&ctx, e));
        match kind {
            EntryType::Directory => {
                match stat_at(dir, name).map_err(wrap)? {
                    Some(st) if is_dir(&st) => {}
                    existing => {
                        if existing.is_some() {
                            unlinkat(dir, *name, UnlinkatFlags::NoRemoveDir).map_err(|e| wrap(host("remove", e)))?;
                        }
                        mkdirat(dir, *name, Mode::from_bits_truncate(0o700)).map_err(|e| wrap(host("mkdir", e)))?;
                    }
                }
                let fd = openat(dir, *name, DIR_FLAGS, Mode::empty()).map_err(|e| wrap(host("open directory", e)))?;
                set_meta_fd(fd.as_fd(), &meta).map_err(wrap)?;
                self.dir_times.insert(comps.join(&b'/'), meta.mtime);
            }
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                let size = entry.size();
                let room = self.limits.max_bytes.saturating_sub(self.stats.bytes);
                if size > room {
                    return Err(bad(format!(
                        "{size} bytes would take the image past its bound of {} bytes",
                        self.limits.max_bytes
                    )));
                }
                clear(dir, name).map_err(wrap)?;
                let fd = openat(
                    dir,
                    *name,
                    OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                    Mode::from_bits_truncate(0o600),
                )
                .map_err(|e| wrap(host("create", e)))?;
                let mut out = File::from(fd);
                self.copy_content(entry, &mut out, size, &ctx)?;
                set_meta_fd(out.as_fd(), &meta).map_err(wrap)?;
                futimens(out.as_fd(), &meta.mtime, &meta.mtime).map_err(|e| wrap(host("set times", e)))?;
            }
            EntryType::Symlink => {
                let target = entry.link_name_bytes().map(|t| t.into_owned()).unwrap_or_default();
                if target.is_empty() || target.contains(&0) || target.len() >= MAX_PATH {
                    return Err(bad("a symlink needs a target (no NUL, under 4096 bytes)".into()));
                }
                clear(dir, name).map_err(wrap)?;
                symlinkat(target.as_slice(), dir, *name).map_err(|e| wrap(host("symlink", e)))?;
                self.set_meta_at(dir, name, &meta, false).map_err(wrap)?;
            }
            EntryType::Link => {
                let target = entry.link_name_bytes().map(|t| t.into_owned()).unwrap_or_default();
                let tcomps = split_path(&target).map_err(|why| bad(format!("hard link target: {why}")))?;
                let Some((tname, tparent)) = tcomps.split_last() else {
                    return Err(bad("a hard link to the root".into()));
                };
                if tcomps == comps {
                    return Err(bad("a hard link to itself".into()));
                }
                let tdir = self.tree.dir(tparent, false).map_err(|e| wrap(within("hard link target", e)))?;
                let missing = || bad(format!("hard link target {:?} is not in the tree", show(&tcomps)));
                let tdir = tdir.ok_or_else(missing)?;
                match stat_at(tdir.as_fd(), tname).map_err(wrap)? {
                    None => return Err(missing()),
                    Some(st) if is_dir(&st) => return Err(bad("a hard link to a directory".into())),
                    Some(_) => {}
                }
                clear(dir, name).map_err(wrap)?;
                // Flags 0: a target that is a symlink is linked itself,
                // never followed.
                linkat(tdir.as_fd(), *tname, dir, *name, AtFlags::empty()).map_err(|e| match e {
                    Errno::ENOENT => missing(),
                    Errno::EMLINK => bad("too many hard links to its target".into()),
                    e => wrap(host("link", e)),
                })?;
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                if !self.limits.allow_devices {
                    return Err(bad("device nodes and FIFOs are refused (devices are not allowed)".into()));
                }
                let major = entry.header().device_major().ok().flatten().unwrap_or(0);
                let minor = entry.header().device_minor().ok().flatten().unwrap_or(0);
                let (sflag, dev) = match kind {
                    EntryType::Char => (SFlag::S_IFCHR, libc::makedev(major, minor)),
                    EntryType::Block => (SFlag::S_IFBLK, libc::makedev(major, minor)),
                    _ => (SFlag::S_IFIFO, 0),
                };
                clear(dir, name).map_err(wrap)?;
                mknodat(dir, *name, sflag, Mode::from_bits_truncate(0o600), dev).map_err(|e| wrap(host("mknod", e)))?;
                self.set_meta_at(dir, name, &meta, true).map_err(wrap)?;
            }
            other => {
                return Err(bad(format!("unsupported entry type {:?}", other.as_byte() as char)));
            }
        }
        Ok(())
    }

    /// Exactly `size` bytes of the entry into `out`.
    fn copy_content<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        out: &mut File,
        size: u64,
        ctx: &str,
    ) -> Result<(), Stop> {
        let mut buf = vec![0u8; 1 << 16];
        let mut left = size;
        while left > 0 {
            let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            let n = match entry.read(&mut buf[..want]) {
                Ok(0) => {
                    return Err(Stop::Stream(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("the layer ends inside {ctx}"),
                    )));
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Stop::Stream(e)),
            };
            out.write_all(&buf[..n]).map_err(|e| Stop::Image(within(ctx, host_io("write", e))))?;
            left -= n as u64;
            self.stats.bytes += n as u64;
        }
        Ok(())
    }

    /// Owner, mode (not for symlinks: Linux has none), xattrs and times of
    /// `name` in `dir`, never following it.
    fn set_meta_at(&self, dir: BorrowedFd<'_>, name: &[u8], meta: &Meta, chmod: bool) -> Result<(), ImageError> {
        fchownat(dir, name, Some(Uid::from_raw(meta.uid)), Some(Gid::from_raw(meta.gid)), AtFlags::AT_SYMLINK_NOFOLLOW)
            .map_err(|e| host("chown", e))?;
        if chmod {
            // `name` was just made by mknodat in a directory only this
            // process writes: it is the node, not a link.
            fchmodat(dir, name, meta.perm(), FchmodatFlags::FollowSymlink).map_err(|e| host("chmod", e))?;
        }
        set_xattrs_at(dir, name, &meta.xattrs)?;
        utimensat(dir, name, &meta.mtime, &meta.mtime, UtimensatFlags::NoFollowSymlink)
            .map_err(|e| host("set times", e))
    }

    fn touch(&mut self, comps: &[&[u8]]) {
        let mut key = Vec::new();
        for (i, c) in comps.iter().enumerate() {
            if i > 0 {
                key.push(b'/');
            }
            key.extend_from_slice(c);
            if !self.touched.contains(&key) {
                self.touched.insert(key.clone());
            }
        }
    }

    /// `.wh.NAME`: NAME of the lower layers goes.
    fn whiteout(&self, parent: &[&[u8]], target: &[u8]) -> Result<(), ImageError> {
        let Some(dir) = self.tree.dir(parent, false)? else { return Ok(()) };
        let mut key = parent.join(&b'/');
        if !key.is_empty() {
            key.push(b'/');
        }
        key.extend_from_slice(target);
        self.remove_lower(dir.as_fd(), target, key, 0)
    }

    /// `.wh..wh..opq`: the directory keeps nothing of the lower layers.
    fn opaque(&self, parent: &[&[u8]]) -> Result<(), ImageError> {
        let Some(dir) = self.tree.dir(parent, false)? else { return Ok(()) };
        let base = parent.join(&b'/');
        for child in list_dir(dir.as_fd())? {
            let mut key = base.clone();
            if !key.is_empty() {
                key.push(b'/');
            }
            key.extend_from_slice(&child);
            self.remove_lower(dir.as_fd(), &child, key, 0)?;
        }
        Ok(())
    }

    /// Removes what the lower layers put at `name` in `dir` (`key` is its
    /// path): all of it, except what this layer wrote there — a directory
    /// this layer wrote into keeps this layer's entries only.
    fn remove_lower(&self, dir: BorrowedFd<'_>, name: &[u8], key: Vec<u8>, depth: usize) -> Result<(), ImageError> {
        if !self.touched.contains(&key) {
            return remove_all(dir, name, 0);
        }
        let Some(st) = stat_at(dir, name)? else { return Ok(()) };
        if !is_dir(&st) || depth > MAX_DEPTH {
            return Ok(());
        }
        let sub = openat(dir, name, DIR_FLAGS, Mode::empty()).map_err(|e| host("open directory", e))?;
        for child in list_dir(sub.as_fd())? {
            let mut k = key.clone();
            k.push(b'/');
            k.extend_from_slice(&child);
            self.remove_lower(sub.as_fd(), &child, k, depth + 1)?;
        }
        Ok(())
    }

    /// Directory mtimes last: writing into a directory changes its own.
    fn set_dir_times(&self) -> Result<(), ImageError> {
        for (key, t) in &self.dir_times {
            let comps: Vec<&[u8]> = if key.is_empty() { Vec::new() } else { key.split(|b| *b == b'/').collect() };
            // A directory a later layer removed or replaced is skipped.
            if let Ok(Some(fd)) = self.tree.dir(&comps, false) {
                futimens(fd.as_fd(), t, t).map_err(|e| host("set times", e))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "tests/fixtures.rs"]
pub(super) mod fixtures;

#[cfg(test)]
#[path = "tests/layers.rs"]
mod tests;
