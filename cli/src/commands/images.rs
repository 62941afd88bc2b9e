//! The image store: `image ls|inspect|rm|import|pull|build`, `parent build`
//! and `from-image`, and [`obtain`], which finds, imports or pulls the image
//! `from-image` and `run` are given.
//!
//! An import streams its source without holding it in memory: a file (an OCI
//! archive or a `docker save` tarball) as it is, an OCI image layout
//! directory as the tar an OCI archive is, written by a thread into a
//! bounded channel the call reads from. A read error aborts the call rather
//! than ending its stream, so the daemon never takes half an archive for a
//! whole one. Pulls and builds stream progress: a bar per layer, build
//! output line by line.

use std::collections::{HashMap, HashSet};
use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use forkd_api::v1::{
    BuildImageRequest, CreateSnapshotRequest, DeleteImageRequest, DeleteImageResponse, GetImageRequest, Image,
    ImageProgress, ImportImageRequest, LayerProgress, ListImagesRequest, PullImageRequest, image_progress::Event,
};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};

use crate::args::{
    BuildSteps, FromImageArgs, ImageCommand, ImageRefArg, ImageRmArgs, ParentCommand, parse_image_name,
    parse_image_ref, parse_reference,
};
use crate::client::Conn;
use crate::exit::{CliError, FAILURE, NOT_FOUND, USAGE, code_for_error};
use crate::output::{age, emit, emit_json, human_bytes, now_unix, table};

/// Bytes per ImportImage message.
const UPLOAD_CHUNK: usize = 256 << 10;
/// Messages queued between the reading thread and the call.
const UPLOAD_QUEUE: usize = 4;
/// Spinner redraw interval.
const TICK: Duration = Duration::from_millis(100);
/// Hex digits of a digest shown in tables and accepted as a prefix.
const SHORT_DIGEST: usize = 12;
/// Fewest hex digits a bare (no `sha256:`) digest prefix must have.
const MIN_BARE_PREFIX: usize = 4;

pub async fn run(conn: &Conn, cmd: ImageCommand, as_json: bool) -> anyhow::Result<u8> {
    match cmd {
        ImageCommand::Ls => ls(conn, as_json).await,
        ImageCommand::Inspect(a) => inspect(conn, a).await,
        ImageCommand::Rm(a) => rm(conn, a, as_json).await,
        ImageCommand::Import(a) => {
            let opts = ImportOpts { reference: a.reference.unwrap_or_default(), allow_devices: a.allow_devices };
            let name = a.name.as_deref().unwrap_or("");
            let image = import(conn, &a.path, name, &opts).await?;
            show(&image, "imported", name, as_json)
        }
        ImageCommand::Pull(a) => {
            let image = pull(conn, &a.reference, a.name.as_deref().unwrap_or("")).await?;
            show(&image, "pulled", a.name.as_deref().unwrap_or(&a.reference), as_json)
        }
        ImageCommand::Build(a) => {
            let from = match &a.from {
                Some(f) => base_ref(conn, f).await?,
                None => String::new(),
            };
            let image = build(conn, &a.name, &from, &a.steps).await?;
            show(&image, "built", &a.name, as_json)
        }
    }
}

/// The proto's field names; config labels sorted so output is stable.
pub(super) fn image_json(i: &Image) -> Value {
    let c = i.config.clone().unwrap_or_default();
    let labels: std::collections::BTreeMap<_, _> = c.labels.iter().collect();
    json!({
        "digest": i.digest,
        "names": i.names,
        "source": i.source,
        "origin": i.origin,
        "size_bytes": i.size_bytes,
        "created_at_unix": i.created_at_unix,
        "config": {
            "env": c.env,
            "working_dir": c.working_dir,
            "user": c.user,
            "entrypoint": c.entrypoint,
            "cmd": c.cmd,
            "labels": labels,
        },
        "runtime": i.runtime,
        "snapshots": i.snapshots,
    })
}

/// The first hex digits of a digest; "" for none.
fn short_digest(digest: &str) -> String {
    digest.strip_prefix("sha256:").unwrap_or(digest).chars().take(SHORT_DIGEST).collect()
}

/// `team/app:1 (sha256:…, 85.0 MiB, runtime python)`: by `name` when the
/// image has it (the one the user gave), else by its first name.
pub(super) fn describe(i: &Image, name: &str) -> String {
    let name =
        if i.names.iter().any(|n| n == name) { name } else { i.names.first().map_or("(no name)", String::as_str) };
    let mut parts = Vec::new();
    if !i.digest.is_empty() {
        parts.push(i.digest.clone());
    }
    parts.push(human_bytes(i.size_bytes));
    if !i.runtime.is_empty() {
        parts.push(format!("runtime {}", i.runtime));
    }
    format!("{name} ({})", parts.join(", "))
}

/// Prints the image an import, pull or build ended with, by `name`.
fn show(i: &Image, verb: &str, name: &str, as_json: bool) -> anyhow::Result<u8> {
    if as_json {
        emit_json(&image_json(i))?;
    } else {
        emit(&format!("{verb} {}\n", describe(i, name)))?;
    }
    Ok(0)
}

/// What names an image in CreateSnapshot and BuildImage: its digest, or a
/// built-in's name (they have no digest).
pub(super) fn snapshot_ref(i: &Image) -> String {
    if i.digest.is_empty() { i.names.first().cloned().unwrap_or_default() } else { i.digest.clone() }
}

/// Bounds a whole streamed call by --timeout, as `conn.call` bounds one.
pub(super) async fn bounded<T>(
    conn: &Conn,
    fut: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    match conn.deadline() {
        Some(d) => tokio::time::timeout(d, fut).await.map_err(|_| conn.deadline_error(d))?,
        None => fut.await,
    }
}

async fn list(conn: &Conn) -> Result<Vec<Image>, CliError> {
    Ok(conn.call(conn.images().list_images(ListImagesRequest {})).await?.images)
}

async fn ls(conn: &Conn, as_json: bool) -> anyhow::Result<u8> {
    let images = list(conn).await?;
    if as_json {
        emit_json(&Value::Array(images.iter().map(image_json).collect()))?;
        return Ok(0);
    }
    let now = now_unix();
    emit(&table(
        &["NAMES", "DIGEST", "SOURCE", "SIZE", "RUNTIME", "CREATED"],
        images.iter().map(|i| {
            vec![
                // No spaces inside a cell: awk field numbers stay put.
                i.names.join(","),
                short_digest(&i.digest),
                i.source.clone(),
                human_bytes(i.size_bytes),
                i.runtime.clone(),
                age(i.created_at_unix, now),
            ]
        }),
    ))?;
    Ok(0)
}

/// The hex digits a digest prefix gives: `sha256:` and at least one, or
/// bare with at least [`MIN_BARE_PREFIX`].
fn digest_prefix(s: &str) -> Option<&str> {
    let (hex, min) = match s.strip_prefix("sha256:") {
        Some(hex) => (hex, 1),
        None => (s, MIN_BARE_PREFIX),
    };
    let ok = hex.len() >= min && hex.len() <= 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    ok.then_some(hex)
}

/// The one image among `images` whose digest starts with `hex`.
fn by_prefix(images: Vec<Image>, name: &str, hex: &str) -> Result<Option<Image>, CliError> {
    let mut found: Vec<Image> =
        images.into_iter().filter(|i| i.digest.strip_prefix("sha256:").is_some_and(|d| d.starts_with(hex))).collect();
    match found.len() {
        0 => Ok(None),
        1 => Ok(found.pop()),
        n => {
            let which: Vec<String> = found.iter().map(|i| short_digest(&i.digest)).collect();
            Err(CliError::usage(format!("{name:?} matches {n} images ({}): give more digits", which.join(", "))))
        }
    }
}

/// An image of the store by name, digest or unique digest prefix.
pub(super) async fn resolve(conn: &Conn, name: &str) -> anyhow::Result<Image> {
    let not_found = match conn.call(conn.images().get_image(GetImageRequest { name: name.into() })).await {
        Ok(image) => return Ok(image),
        Err(e) if e.code == NOT_FOUND => e,
        Err(e) => return Err(e.into()),
    };
    let Some(hex) = digest_prefix(name) else { return Err(not_found.into()) };
    match by_prefix(list(conn).await?, name, hex)? {
        Some(image) => Ok(image),
        None => Err(not_found.into()),
    }
}

/// A build's base as BuildImage takes it: a digest prefix is looked up.
async fn base_ref(conn: &Conn, from: &str) -> anyhow::Result<String> {
    let full = from.strip_prefix("sha256:").is_some_and(|h| h.len() == 64);
    if from.starts_with("sha256:") && !full { Ok(resolve(conn, from).await?.digest) } else { Ok(from.to_string()) }
}

async fn inspect(conn: &Conn, args: ImageRefArg) -> anyhow::Result<u8> {
    let image = resolve(conn, &args.image).await?;
    emit_json(&image_json(&image))?;
    Ok(0)
}

async fn delete(conn: &Conn, name: &str) -> anyhow::Result<DeleteImageResponse> {
    let req = DeleteImageRequest { name: name.into() };
    let not_found = match conn.call(conn.images().delete_image(req)).await {
        Ok(resp) => return Ok(resp),
        Err(e) if e.code == NOT_FOUND => e,
        Err(e) => return Err(e.into()),
    };
    // A short digest: the image it names, whole.
    let Some(hex) = digest_prefix(name) else { return Err(not_found.into()) };
    let Some(image) = by_prefix(list(conn).await?, name, hex)? else { return Err(not_found.into()) };
    let req = DeleteImageRequest { name: image.digest };
    Ok(conn.call(conn.images().delete_image(req)).await?)
}

async fn rm(conn: &Conn, args: ImageRmArgs, as_json: bool) -> anyhow::Result<u8> {
    // Every image is tried even after a failure, like rm(1); the exit code
    // is the first failure's. The daemon's refusal is shown as it says it.
    let mut first_error: Option<u8> = None;
    let mut results = Vec::new();
    for name in &args.images {
        match delete(conn, name).await {
            Ok(resp) => {
                if !as_json {
                    emit(&removed_line(name, &resp))?;
                }
                results.push(json!({ "name": name, "digest": resp.digest, "removed": resp.removed }));
            }
            Err(e) => {
                eprintln!("forkd: {e:#}");
                first_error.get_or_insert(code_for_error(&e));
            }
        }
    }
    if as_json {
        emit_json(&Value::Array(results))?;
    }
    Ok(first_error.unwrap_or(0))
}

fn removed_line(name: &str, resp: &DeleteImageResponse) -> String {
    match (resp.removed, name == resp.digest) {
        (true, true) => format!("removed {}\n", resp.digest),
        (true, false) => format!("removed {} ({name})\n", resp.digest),
        (false, _) => format!("untagged {name} ({} keeps its other names)\n", resp.digest),
    }
}

/// Options of an import besides the name.
#[derive(Default, Clone)]
pub(super) struct ImportOpts {
    /// Which image of a multi-image archive ("" = the only one).
    pub reference: String,
    pub allow_devices: bool,
}

/// Where the bytes of an import come from.
enum Source {
    /// An OCI image layout directory, sent as a tar of these entries.
    Layout(Vec<LayoutEntry>),
    /// An archive file, sent as it is.
    File(PathBuf),
}

/// A file or directory of an OCI image layout.
#[derive(Debug, PartialEq)]
struct LayoutEntry {
    /// Path in the archive.
    rel: PathBuf,
    abs: PathBuf,
    is_dir: bool,
    size: u64,
}

/// Deepest directory nesting followed in a layout (symlink loops end here).
const MAX_DEPTH: usize = 16;

/// Every entry under an OCI image layout, parents before children, names
/// sorted, so the same layout always makes the same archive.
fn walk_layout(root: &Path) -> Result<Vec<LayoutEntry>, CliError> {
    for required in ["oci-layout", "index.json"] {
        if !root.join(required).is_file() {
            return Err(CliError::usage(format!(
                "{} is a directory but not an OCI image layout (it has no {required}); \
                 give a layout directory, an OCI archive or a `docker save` tarball",
                root.display()
            )));
        }
    }
    let mut out = Vec::new();
    walk(root, Path::new(""), 0, &mut out)?;
    Ok(out)
}

fn walk(root: &Path, rel: &Path, depth: usize, out: &mut Vec<LayoutEntry>) -> Result<(), CliError> {
    let dir = root.join(rel);
    if depth > MAX_DEPTH {
        return Err(CliError::usage(format!("{}: nested too deep (a symlink loop?)", dir.display())));
    }
    let cannot = |p: &Path, e: std::io::Error| CliError::usage(format!("cannot read {}: {e}", p.display()));
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&dir).map_err(|e| cannot(&dir, e))? {
        names.push(entry.map_err(|e| cannot(&dir, e))?.file_name());
    }
    names.sort();
    for name in names {
        let rel = rel.join(&name);
        let abs = root.join(&rel);
        // Symlinks are followed: the archive holds what they point at.
        let meta = std::fs::metadata(&abs).map_err(|e| cannot(&abs, e))?;
        if meta.is_dir() {
            out.push(LayoutEntry { rel: rel.clone(), abs, is_dir: true, size: 0 });
            walk(root, &rel, depth + 1, out)?;
        } else if meta.is_file() {
            out.push(LayoutEntry { rel, abs, is_dir: false, size: meta.len() });
        } else {
            return Err(CliError::usage(format!("{}: neither a file nor a directory", abs.display())));
        }
    }
    Ok(())
}

fn blocks(n: u64) -> u64 {
    n.div_ceil(512) * 512
}

/// About how many bytes the tar of a layout takes: a header and padded data
/// per entry, a long-name header for paths past 100 bytes, the end blocks.
fn tar_size(entries: &[LayoutEntry]) -> u64 {
    let mut n = 1024;
    for e in entries {
        let name = e.rel.as_os_str().len() as u64 + u64::from(e.is_dir);
        if name > 100 {
            n += 512 + blocks(name + 1);
        }
        n += 512 + blocks(e.size);
    }
    n
}

/// Refuses a file that cannot be an image archive, before sending it. A
/// compressed file is left for the daemon to judge.
fn check_archive(path: &Path, len: u64) -> Result<(), CliError> {
    if len == 0 {
        return Err(CliError::usage(format!("{} is empty", path.display())));
    }
    let mut head = Vec::with_capacity(512);
    std::fs::File::open(path)
        .and_then(|f| f.take(512).read_to_end(&mut head))
        .map_err(|e| CliError::usage(format!("cannot read {}: {e}", path.display())))?;
    let tar = head.len() >= 262 && &head[257..262] == b"ustar";
    let compressed = head.starts_with(&[0x1f, 0x8b]) || head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]);
    if tar || compressed {
        Ok(())
    } else {
        Err(CliError::usage(format!(
            "{} is not a tar archive: give an OCI image layout directory, an OCI archive or a `docker save` tarball",
            path.display()
        )))
    }
}

/// Why the reading thread stopped sending.
enum Stop {
    /// The call is over (the receiver went away); its status says why.
    CallEnded,
    /// Reading the source failed.
    Read(String),
}

/// The write end of an upload: buffers into messages and hands each to the
/// call through a bounded channel, so reading goes as fast as the daemon
/// takes the bytes. `Err(())` in the channel aborts the upload.
struct Uploader {
    tx: mpsc::Sender<Result<ImportImageRequest, ()>>,
    /// The first message's fields, until it is sent.
    first: Option<ImportImageRequest>,
    buf: Vec<u8>,
    bar: Option<ProgressBar>,
    closed: bool,
}

impl Uploader {
    fn send(&mut self) -> std::io::Result<()> {
        let data = std::mem::replace(&mut self.buf, Vec::with_capacity(UPLOAD_CHUNK));
        let n = data.len() as u64;
        let mut msg = self.first.take().unwrap_or_default();
        msg.data = data;
        if self.tx.blocking_send(Ok(msg)).is_err() {
            self.closed = true;
            return Err(std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the call ended"));
        }
        if let Some(b) = &self.bar {
            b.inc(n);
        }
        Ok(())
    }

    /// Sends what is buffered (the first message even when empty).
    fn finish(&mut self) -> std::io::Result<()> {
        if !self.buf.is_empty() || self.first.is_some() { self.send() } else { Ok(()) }
    }
}

impl Write for Uploader {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= UPLOAD_CHUNK {
            self.send()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Writes a layout's entries as a tar.
fn write_layout(entries: &[LayoutEntry], out: &mut Uploader) -> Result<(), (PathBuf, std::io::Error)> {
    let mut tar = tar::Builder::new(out);
    // No owners or times of this machine in the archive.
    tar.mode(tar::HeaderMode::Deterministic);
    for e in entries {
        let appended = if e.is_dir {
            tar.append_dir(&e.rel, &e.abs)
        } else {
            std::fs::File::open(&e.abs).and_then(|mut f| tar.append_file(&e.rel, &mut f))
        };
        appended.map_err(|err| (e.abs.clone(), err))?;
    }
    tar.finish().map_err(|err| (PathBuf::from("the archive"), err))
}

/// Sends `source` through `up`. On a read error the channel gets `Err(())`
/// before the sender goes, so the stream never ends cleanly on half the data.
fn produce(source: Source, mut up: Uploader) -> Result<(), Stop> {
    let written = match &source {
        Source::Layout(entries) => write_layout(entries, &mut up),
        Source::File(path) => std::fs::File::open(path)
            .and_then(|mut f| std::io::copy(&mut f, &mut up))
            .map(drop)
            .map_err(|e| (path.clone(), e)),
    };
    let result = written.and_then(|()| up.finish().map_err(|e| (PathBuf::from("the archive"), e)));
    match result {
        Ok(()) => Ok(()),
        Err(_) if up.closed => Err(Stop::CallEnded),
        Err((path, e)) => {
            let _ = up.tx.blocking_send(Err(()));
            Err(Stop::Read(format!("reading {}: {e}", path.display())))
        }
    }
}

/// A byte counter for an upload on a terminal; nothing otherwise.
fn upload_bar(label: String, len: u64) -> Option<ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta})")
            .expect("static template is valid")
            .progress_chars("=> "),
    );
    bar.set_message(label);
    Some(bar)
}

fn spinner_style() -> ProgressStyle {
    ProgressStyle::with_template("{spinner} {msg} [{elapsed}]").expect("static template is valid")
}

/// Imports the layout directory or archive file at `path` into the store.
pub(super) async fn import(conn: &Conn, path: &Path, name: &str, opts: &ImportOpts) -> anyhow::Result<Image> {
    let meta = std::fs::metadata(path).map_err(|e| CliError::usage(format!("cannot read {}: {e}", path.display())))?;
    let (source, len) = if meta.is_dir() {
        let entries = walk_layout(path)?;
        let len = tar_size(&entries);
        (Source::Layout(entries), len)
    } else if meta.is_file() {
        check_archive(path, meta.len())?;
        (Source::File(path.to_path_buf()), meta.len())
    } else {
        return Err(CliError::usage(format!("{}: neither a file nor a directory", path.display())).into());
    };
    let label = format!("importing {}", path.display());
    let bar = upload_bar(label.clone(), len);
    let first = ImportImageRequest {
        name: name.to_string(),
        r#ref: opts.reference.clone(),
        allow_devices: opts.allow_devices,
        data: Vec::new(),
    };
    let (tx, rx) = mpsc::channel(UPLOAD_QUEUE);
    let up =
        Uploader { tx, first: Some(first), buf: Vec::with_capacity(UPLOAD_CHUNK), bar: bar.clone(), closed: false };
    // A thread of its own rather than spawn_blocking: the runtime's shutdown
    // never waits for it.
    let (done_tx, mut done_rx) = oneshot::channel();
    std::thread::Builder::new()
        .name("import".into())
        .spawn(move || {
            let _ = done_tx.send(produce(source, up));
        })
        .map_err(|e| CliError::new(FAILURE, format!("cannot start the reader: {e}")))?;

    // Ends when the reader does; on Err(()) it never ends, and the call is
    // dropped (reset) below.
    let requests = futures::stream::unfold(rx, |mut rx| async move {
        match rx.recv().await {
            Some(Ok(msg)) => Some((msg, rx)),
            Some(Err(())) => std::future::pending().await,
            None => None,
        }
    });
    let result = bounded(conn, async {
        let mut client = conn.images();
        let call = client.import_image(requests);
        tokio::pin!(call);
        let mut reading = true;
        loop {
            tokio::select! {
                r = &mut call => {
                    return r.map(tonic::Response::into_inner).map_err(|s| anyhow::Error::from(conn.status_error(&s)));
                }
                stop = &mut done_rx, if reading => {
                    reading = false;
                    match stop {
                        Ok(Ok(())) => {
                            if let Some(b) = &bar {
                                b.set_style(spinner_style());
                                b.set_message(format!("{label}: the daemon is unpacking the layers"));
                                b.enable_steady_tick(TICK);
                            }
                        }
                        Ok(Err(Stop::Read(message))) => return Err(CliError::new(FAILURE, message).into()),
                        // The call's own status tells why it ended.
                        Ok(Err(Stop::CallEnded)) | Err(_) => {}
                    }
                }
            }
        }
    })
    .await;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    result
}

/// Shows the progress of a pull or build on stderr: on a terminal a
/// spinner with a bar per layer under it and log lines printed above;
/// otherwise plain lines (a finished layer, each log line).
struct Watch {
    multi: Option<MultiProgress>,
    spinner: Option<ProgressBar>,
    layers: HashMap<String, ProgressBar>,
    finished: HashSet<String>,
}

impl Watch {
    fn start(label: String) -> Self {
        if !std::io::stderr().is_terminal() {
            eprintln!("{label}");
            return Self { multi: None, spinner: None, layers: HashMap::new(), finished: HashSet::new() };
        }
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
        let spinner = multi.add(ProgressBar::new_spinner());
        spinner.set_style(spinner_style());
        spinner.set_message(label);
        spinner.enable_steady_tick(TICK);
        Self { multi: Some(multi), spinner: Some(spinner), layers: HashMap::new(), finished: HashSet::new() }
    }

    fn layer(&mut self, p: &LayerProgress) {
        let short = short_digest(&p.digest);
        let Some(multi) = &self.multi else {
            if p.total > 0 && p.done >= p.total && self.finished.insert(p.digest.clone()) {
                eprintln!("  layer {short}: {} done", human_bytes(p.total));
            }
            return;
        };
        let bar = self.layers.entry(p.digest.clone()).or_insert_with(|| {
            let bar = multi.add(ProgressBar::new(p.total));
            bar.set_style(
                ProgressStyle::with_template("  {prefix} [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec})")
                    .expect("static template is valid")
                    .progress_chars("=> "),
            );
            bar.set_prefix(short);
            bar
        });
        if p.total > 0 {
            bar.set_length(p.total);
        }
        bar.set_position(p.done);
        if p.total > 0 && p.done >= p.total && !bar.is_finished() {
            bar.finish();
        }
    }

    fn log(&self, line: &str) {
        let line = clean_line(line);
        match &self.multi {
            Some(multi) => {
                let _ = multi.println(format!("\x1b[2m  {line}\x1b[0m"));
            }
            None => eprintln!("  {line}"),
        }
    }

    fn finish(self) {
        for bar in self.layers.values() {
            bar.finish_and_clear();
        }
        if let Some(s) = &self.spinner {
            s.finish_and_clear();
        }
        if let Some(m) = &self.multi {
            let _ = m.clear();
        }
    }
}

/// A line of guest output fit for our terminal: the last carriage-return
/// segment (what a progress meter ends on), without escape sequences or
/// control characters.
fn clean_line(raw: &str) -> String {
    let raw = raw.trim_end_matches(['\r', '\n']);
    let raw = raw.rsplit('\r').find(|s| !s.is_empty()).unwrap_or("");
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        match c {
            '\x1b' => {
                // A CSI sequence runs to its final byte; other escapes lose
                // only the ESC.
                let mut rest = chars.clone();
                if rest.next() == Some('[') {
                    chars = rest;
                    for c in chars.by_ref() {
                        if ('\x40'..='\x7e').contains(&c) {
                            break;
                        }
                    }
                }
            }
            '\t' => out.push(' '),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

/// Follows a pull's or build's events to the image they end with.
async fn follow(
    conn: &Conn,
    mut events: tonic::Streaming<ImageProgress>,
    watch: &mut Watch,
    what: &str,
) -> anyhow::Result<Image> {
    loop {
        let Some(msg) = events.message().await.map_err(|s| conn.status_error(&s))? else {
            return Err(CliError::new(FAILURE, format!("the daemon ended the {what} without an image")).into());
        };
        match msg.event {
            Some(Event::Layer(p)) => watch.layer(&p),
            Some(Event::Log(line)) => watch.log(&line),
            Some(Event::Image(image)) => return Ok(image),
            None => {}
        }
    }
}

/// Pulls `reference` into the store, named `name` ("" = the reference).
pub(super) async fn pull(conn: &Conn, reference: &str, name: &str) -> anyhow::Result<Image> {
    let req = PullImageRequest { reference: reference.into(), name: name.into() };
    let mut watch = Watch::start(format!("pulling {reference}"));
    let result = bounded(conn, async {
        let events = conn.call(conn.images().pull_image(req)).await?;
        follow(conn, events, &mut watch, "pull").await
    })
    .await;
    watch.finish();
    result
}

/// Builds `name` from `from` ("" = python) with `steps`.
pub(super) async fn build(conn: &Conn, name: &str, from: &str, steps: &BuildSteps) -> anyhow::Result<Image> {
    let req = BuildImageRequest {
        name: name.into(),
        from: from.into(),
        apt: steps.apt.clone(),
        pip: steps.pip.clone(),
        run: steps.run.clone(),
    };
    let base = if from.is_empty() { "python" } else { from };
    let mut watch = Watch::start(format!("building {name} from {base}"));
    let result = bounded(conn, async {
        let events = conn.call(conn.images().build_image(req)).await?;
        follow(conn, events, &mut watch, "build").await
    })
    .await;
    watch.finish();
    result
}

/// A name for a build nobody named: `<prefix>-` and 12 hex digits of its
/// inputs, so the same build gets the same name.
pub(super) fn build_name(prefix: &str, from: &str, steps: &BuildSteps) -> String {
    let mut h = Sha256::new();
    h.update(from.as_bytes());
    for (kind, items) in [("apt", &steps.apt), ("pip", &steps.pip), ("run", &steps.run)] {
        for item in items {
            h.update(format!("\n{kind} {item}").as_bytes());
        }
    }
    format!("{prefix}-{}", &hex::encode(h.finalize())[..SHORT_DIGEST])
}

/// How [`obtain`] got its image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Found {
    Store,
    Imported,
    Pulled,
}

impl Found {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Found::Store => "in the store",
            Found::Imported => "imported",
            Found::Pulled => "pulled",
        }
    }
}

/// Whether `s` reads as a file path rather than an image reference.
fn looks_like_path(s: &str) -> bool {
    s.starts_with(['/', '.', '~']) || s.ends_with(".tar") || s.ends_with(".tar.gz")
}

/// The image `spec` names: an image of the store (name or digest) as it is,
/// an existing local path imported, anything else pulled.
pub(super) async fn obtain(conn: &Conn, spec: &str, opts: &ImportOpts) -> anyhow::Result<(Image, Found)> {
    if parse_image_ref(spec).is_ok() {
        match resolve(conn, spec).await {
            Ok(image) => return Ok((image, Found::Store)),
            Err(e) if code_for_error(&e) == NOT_FOUND => {}
            Err(e) => return Err(e),
        }
    }
    let path = Path::new(spec);
    if path.exists() {
        return Ok((import(conn, path, "", opts).await?, Found::Imported));
    }
    if looks_like_path(spec) || parse_reference(spec).is_err() {
        return Err(CliError::usage(format!(
            "{spec:?} is no image of the store (see `forkd image ls`) and no file or directory to import"
        ))
        .into());
    }
    Ok((pull(conn, spec, "").await?, Found::Pulled))
}

pub async fn from_image(conn: &Conn, args: FromImageArgs, as_json: bool) -> anyhow::Result<u8> {
    let (image, found) = obtain(conn, &args.image, &ImportOpts::default()).await?;
    eprintln!("image {}, {}", describe(&image, &args.image), found.as_str());
    let req = CreateSnapshotRequest {
        tag: args.tag.to_string(),
        image: snapshot_ref(&image),
        vcpus: args.vcpus.unwrap_or(0),
        mem_mib: args.mem_mib.unwrap_or(0),
        // Polled instead, as `forkd snapshot` does.
        wait: Some(false),
        ..Default::default()
    };
    let snap = conn.call(conn.snapshots().create_snapshot(req)).await?;
    super::snapshots::settle_and_show(conn, snap, &format!("snapshot {}", args.tag), as_json).await
}

pub async fn parent(conn: &Conn, cmd: ParentCommand, as_json: bool) -> anyhow::Result<u8> {
    let ParentCommand::Build(args) = cmd;
    if let Some(mib) = args.size_mib {
        eprintln!(
            "forkd: --size-mib {mib} ignored: images are sized to their contents, and each child writes to an overlay of its own"
        );
    }
    // `-o FILE` names the image after the file: the image itself stays in
    // the daemon's store, where `forkd snapshot --rootfs NAME.ext4` finds it.
    let named = match &args.output {
        Some(file) => {
            let stem = file.file_stem().and_then(|s| s.to_str()).unwrap_or_default();
            let name = parse_image_name(stem)
                .map_err(|e| CliError::new(USAGE, format!("-o {}: the image name {e}", file.display())))?;
            eprintln!(
                "forkd: -o {}: the image is kept in the daemon's store as {name} (forkd snapshot --rootfs {name}.ext4)",
                file.display()
            );
            Some(name)
        }
        None => args.name.clone(),
    };
    let path = Path::new(&args.image);
    let import_only = args.reference.is_some() || args.allow_devices;
    if import_only && !path.exists() {
        return Err(CliError::usage(format!(
            "--ref and --allow-devices are for importing a file or directory, and {:?} is neither",
            args.image
        ))
        .into());
    }
    let opts = ImportOpts { reference: args.reference.clone().unwrap_or_default(), allow_devices: args.allow_devices };
    let steps = args.steps();
    if let Some(from) = &args.from {
        // `image build NAME --from BASE`.
        let name = parse_image_name(&args.image).map_err(|e| CliError::new(USAGE, format!("the image name {e}")))?;
        if import_only {
            return Err(CliError::usage("--ref and --allow-devices do not go with --from").into());
        }
        let from = base_ref(conn, from).await?;
        return show(&build(conn, &name, &from, &steps).await?, "built", &name, as_json);
    }
    if !steps.is_empty() {
        let (base, found) = obtain(conn, &args.image, &opts).await?;
        if found != Found::Store {
            eprintln!("base {}, {}", describe(&base, &args.image), found.as_str());
        }
        let from = snapshot_ref(&base);
        let name = named.clone().unwrap_or_else(|| build_name("parent", &from, &steps));
        return show(&build(conn, &name, &from, &steps).await?, "built", &name, as_json);
    }
    let name = named.as_deref().unwrap_or("");
    if path.exists() {
        return show(&import(conn, path, name, &opts).await?, "imported", name, as_json);
    }
    let reference = parse_reference(&args.image).map_err(CliError::usage)?;
    if looks_like_path(&reference) {
        return Err(CliError::usage(format!("{reference}: no such file or directory")).into());
    }
    show(&pull(conn, &reference, name).await?, "pulled", if name.is_empty() { &reference } else { name }, as_json)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(digest: &str) -> Image {
        Image { digest: digest.into(), names: vec![format!("n-{digest}")], ..Default::default() }
    }

    #[test]
    fn digests_shorten_and_prefixes_resolve() {
        let a = format!("sha256:{}", "ab12".repeat(16));
        let b = format!("sha256:{}", "ab34".repeat(16));
        assert_eq!(short_digest(&a), "ab12ab12ab12");
        assert_eq!(short_digest(""), "");
        assert_eq!(digest_prefix("sha256:ab"), Some("ab"));
        assert_eq!(digest_prefix("ab12"), Some("ab12"));
        assert_eq!(digest_prefix("ab1"), None, "too short without sha256:");
        assert_eq!(digest_prefix("python"), None);
        assert_eq!(digest_prefix("sha256:AB"), None);
        let images = || vec![image(&a), image(&b), image("")];
        assert_eq!(by_prefix(images(), "ab12", "ab12").unwrap().unwrap().digest, a);
        assert!(by_prefix(images(), "ff", "ff").unwrap().is_none());
        let e = by_prefix(images(), "sha256:ab", "ab").unwrap_err();
        assert_eq!(e.code, USAGE);
        assert!(e.message.contains("matches 2 images"), "{}", e.message);
    }

    #[test]
    fn json_has_every_field() {
        let mut i = image("sha256:00");
        i.size_bytes = 1 << 40;
        i.config = Some(forkd_api::v1::ImageConfig {
            env: vec!["A=1".into()],
            labels: [("b".into(), "2".into()), ("a".into(), "1".into())].into(),
            ..Default::default()
        });
        let v = image_json(&i);
        assert_eq!(v.as_object().unwrap().len(), 9, "a field of forkd.v1.Image is missing");
        assert_eq!(v["config"].as_object().unwrap().len(), 6);
        assert_eq!(v["size_bytes"].as_u64(), Some(1 << 40));
        assert_eq!(serde_json::to_string(&v["config"]["labels"]).unwrap(), r#"{"a":"1","b":"2"}"#);
        assert!(image_json(&Image::default())["config"]["env"].is_array());
    }

    #[test]
    fn descriptions_and_refs() {
        let mut i = image("sha256:00");
        i.runtime = "python".into();
        i.size_bytes = 2048;
        assert_eq!(describe(&i, ""), "n-sha256:00 (sha256:00, 2.0 KiB, runtime python)");
        assert_eq!(snapshot_ref(&i), "sha256:00");
        let builtin = Image { names: vec!["python".into()], source: "builtin".into(), ..Default::default() };
        assert_eq!(snapshot_ref(&builtin), "python");
        assert_eq!(describe(&Image::default(), ""), "(no name) (0 B)");
        let two = Image { names: vec!["a:1".into(), "b:2".into()], ..Default::default() };
        assert_eq!(describe(&two, "b:2"), "b:2 (0 B)");
        assert_eq!(describe(&two, "c:3"), "a:1 (0 B)");
        let untagged = DeleteImageResponse { digest: "sha256:00".into(), removed: false };
        assert_eq!(removed_line("a:1", &untagged), "untagged a:1 (sha256:00 keeps its other names)\n");
        let gone = DeleteImageResponse { digest: "sha256:00".into(), removed: true };
        assert_eq!(removed_line("a:1", &gone), "removed sha256:00 (a:1)\n");
        assert_eq!(removed_line("sha256:00", &gone), "removed sha256:00\n");
    }

    #[test]
    fn build_names_follow_the_inputs() {
        let steps = BuildSteps { apt: vec!["curl".into()], ..Default::default() };
        let a = build_name("parent", "python", &steps);
        assert!(a.starts_with("parent-") && a.len() == "parent-".len() + 12, "{a}");
        assert_eq!(a, build_name("parent", "python", &steps));
        assert_ne!(a, build_name("parent", "minimal", &steps));
        let pip = BuildSteps { pip: vec!["curl".into()], ..Default::default() };
        assert_ne!(a, build_name("parent", "python", &pip), "apt and pip differ");
        assert!(parse_image_name(&a).is_ok());
    }

    #[test]
    fn log_lines_are_cleaned() {
        assert_eq!(clean_line("plain\n"), "plain");
        assert_eq!(clean_line(" 10%\r 50%\r100%\r\n"), "100%");
        assert_eq!(clean_line("\x1b[1;32mgreen\x1b[0m text"), "green text");
        assert_eq!(clean_line("a\x07b\tc\x1b]x"), "ab c]x");
        assert_eq!(clean_line(""), "");
    }

    #[test]
    fn paths_and_references() {
        for p in ["/srv/app", "./app", "../x.tar", "~/x", "app.tar", "img.tar.gz"] {
            assert!(looks_like_path(p), "{p}");
        }
        for r in ["python", "localhost:5000/team/app:1", "docker.io/library/python:3.12-slim"] {
            assert!(!looks_like_path(r), "{r}");
        }
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("forkd-cli-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Runs `produce` on a thread and collects what it sent.
    fn upload(source: Source) -> (Result<(), Stop>, Vec<ImportImageRequest>, bool) {
        let (tx, mut rx) = mpsc::channel(UPLOAD_QUEUE);
        let first = ImportImageRequest { name: "n".into(), ..Default::default() };
        let up = Uploader { tx, first: Some(first), buf: Vec::new(), bar: None, closed: false };
        let thread = std::thread::spawn(move || produce(source, up));
        let mut msgs = Vec::new();
        let mut aborted = false;
        while let Some(m) = rx.blocking_recv() {
            match m {
                Ok(m) => msgs.push(m),
                Err(()) => aborted = true,
            }
        }
        (thread.join().unwrap(), msgs, aborted)
    }

    #[test]
    fn a_layout_streams_as_a_tar_of_its_entries() {
        let dir = temp_dir("layout");
        std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        std::fs::write(dir.join("index.json"), b"{}").unwrap();
        std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
        let big = vec![7u8; UPLOAD_CHUNK * 2 + 5];
        std::fs::write(dir.join("blobs/sha256").join("b".repeat(64)), &big).unwrap();
        std::fs::write(dir.join("blobs/sha256").join("a".repeat(64)), b"small").unwrap();

        let entries = walk_layout(&dir).unwrap();
        let names: Vec<String> = entries.iter().map(|e| e.rel.display().to_string()).collect();
        let a = format!("blobs/sha256/{}", "a".repeat(64));
        let b = format!("blobs/sha256/{}", "b".repeat(64));
        assert_eq!(names, vec!["blobs", "blobs/sha256", a.as_str(), b.as_str(), "index.json", "oci-layout"]);
        let estimate = tar_size(&entries);

        let (result, msgs, aborted) = upload(Source::Layout(entries));
        assert!(result.is_ok() && !aborted);
        assert!(msgs.len() >= 3, "sent in chunks: {}", msgs.len());
        assert_eq!(msgs[0].name, "n");
        assert!(msgs[1..].iter().all(|m| m.name.is_empty()), "only the first message names the image");
        let bytes: Vec<u8> = msgs.iter().flat_map(|m| m.data.iter().copied()).collect();
        assert_eq!(bytes.len() as u64, estimate, "the estimate is exact for short names");

        let mut archive = tar::Archive::new(&bytes[..]);
        let mut seen = Vec::new();
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            let path = entry.path().unwrap().display().to_string();
            let mut data = Vec::new();
            entry.read_to_end(&mut data).unwrap();
            if path == b {
                assert_eq!(data, big);
            }
            // Nothing of this machine's owners in the archive.
            assert_eq!((entry.header().uid().unwrap(), entry.header().gid().unwrap()), (0, 0));
            seen.push(path.trim_end_matches('/').to_string());
        }
        assert_eq!(seen, names);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_read_error_aborts_instead_of_ending_the_stream() {
        let dir = temp_dir("unreadable");
        let entries = vec![LayoutEntry { rel: "gone".into(), abs: dir.join("gone"), is_dir: false, size: 1 }];
        let (result, _, aborted) = upload(Source::Layout(entries));
        assert!(matches!(result, Err(Stop::Read(m)) if m.contains("gone")));
        assert!(aborted, "the stream is aborted, not ended");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn sources_are_checked_before_sending() {
        let dir = temp_dir("sources");
        let e = walk_layout(&dir).unwrap_err();
        assert_eq!(e.code, USAGE);
        assert!(e.message.contains("not an OCI image layout"), "{}", e.message);
        let text = dir.join("notes.txt");
        std::fs::write(&text, "hello").unwrap();
        assert!(check_archive(&text, 5).unwrap_err().message.contains("not a tar archive"));
        assert!(check_archive(&text, 0).unwrap_err().message.contains("is empty"));
        let mut tar = tar::Builder::new(Vec::new());
        tar.append_data(&mut tar::Header::new_ustar(), "x", &b""[..]).unwrap();
        let archive = dir.join("a.tar");
        std::fs::write(&archive, tar.into_inner().unwrap()).unwrap();
        check_archive(&archive, 1024).unwrap();
        let gz = dir.join("a.tar.gz");
        std::fs::write(&gz, [0x1f, 0x8b, 8, 0]).unwrap();
        check_archive(&gz, 4).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
