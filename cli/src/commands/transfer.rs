//! `forkd pack` and `forkd unpack`: snapshot archives streamed to and from
//! the daemon (ExportSnapshot / ImportSnapshot), so they work against a
//! daemon on another host. Progress shows bytes and rate on a terminal.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

use forkd_api::names::Tag;
use forkd_api::v1::{DeleteSnapshotRequest, ExportSnapshotRequest, ImportSnapshotRequest};
use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::args::{PackArgs, UnpackArgs};
use crate::client::Conn;
use crate::exit::CliError;
use crate::json;
use crate::output::{emit, emit_json};

/// Bytes per ImportSnapshot message.
const UPLOAD_CHUNK: usize = 256 << 10;

/// A byte counter with rate on a terminal; nothing otherwise.
pub fn bar(label: String, len: Option<u64>) -> Option<ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let (bar, template) = match len {
        Some(n) => (ProgressBar::new(n), "{msg} [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta})"),
        None => (ProgressBar::new_spinner(), "{spinner} {msg} {bytes} ({bytes_per_sec}) [{elapsed}]"),
    };
    bar.set_style(ProgressStyle::with_template(template).expect("static template is valid").progress_chars("=> "));
    bar.set_message(label);
    Some(bar)
}

fn mb_per_s(bytes: u64, secs: f64) -> f64 {
    if secs > 0.0 { bytes as f64 / (1 << 20) as f64 / secs } else { 0.0 }
}

/// What `pack_to` wrote.
pub struct Packed {
    pub bytes: u64,
    pub sha256: String,
    pub secs: f64,
}

/// Notes recorded in an archive's manifest.
#[derive(Default)]
pub struct Notes {
    pub description: String,
    pub base_image: String,
}

/// `./TAG.forkd-snapshot.tar.zst`, the reference's default archive name.
pub fn default_archive(tag: &Tag) -> PathBuf {
    PathBuf::from(format!("{}.forkd-snapshot.tar.zst", tag.as_str()))
}

pub async fn pack(conn: &Conn, args: PackArgs, as_json: bool) -> anyhow::Result<u8> {
    let tag = args.tag.or(args.tag_flag).ok_or_else(|| CliError::usage("name the snapshot: TAG or --tag TAG"))?;
    let output = args.output.unwrap_or_else(|| default_archive(&tag));
    let req = ExportSnapshotRequest {
        tag: tag.to_string(),
        layer_only: args.layer_only,
        flat: args.flat,
        description: args.description.unwrap_or_default(),
        base_image: args.base_image.unwrap_or_default(),
    };
    let p = pack_to(conn, req, &output).await?;
    if as_json {
        emit_json(&serde_json::json!({
            "tag": tag.as_str(),
            "file": output,
            "bytes": p.bytes,
            "sha256": p.sha256,
            "seconds": p.secs,
            "mib_per_s": mb_per_s(p.bytes, p.secs),
        }))?;
    } else {
        emit(&format!(
            "packed {} into {} ({:.1} MiB in {:.1}s, {})\n",
            tag,
            output.display(),
            p.bytes as f64 / (1 << 20) as f64,
            p.secs,
            p.sha256
        ))?;
    }
    Ok(0)
}

/// Streams the export `req` asks for into `output`, written beside its
/// name and renamed once complete: never half a file under the name asked
/// for.
pub async fn pack_to(conn: &Conn, req: ExportSnapshotRequest, output: &Path) -> Result<Packed, CliError> {
    let tag = req.tag.clone();
    let started = Instant::now();
    let mut stream = conn.call(conn.snapshots().export_snapshot(req)).await?;
    let name = output.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "archive".into());
    let partial = output.with_file_name(format!(".{name}.partial.{}", std::process::id()));
    let mut out = tokio::fs::File::create(&partial)
        .await
        .map_err(|e| CliError::usage(format!("cannot write {}: {e}", partial.display())))?;
    let progress = bar(format!("packing {tag}"), None);
    let mut h = Sha256::new();
    let mut bytes = 0u64;
    let result: Result<(), CliError> = async {
        while let Some(chunk) = stream.message().await.map_err(|s| conn.status_error(&s))? {
            h.update(&chunk.data);
            out.write_all(&chunk.data)
                .await
                .map_err(|e| CliError::new(crate::exit::FAILURE, format!("{}: {e}", partial.display())))?;
            bytes += chunk.data.len() as u64;
            if let Some(b) = &progress {
                b.set_position(bytes);
            }
        }
        out.sync_all().await.map_err(|e| CliError::new(crate::exit::FAILURE, format!("{}: {e}", partial.display())))?;
        Ok(())
    }
    .await;
    if let Some(b) = progress {
        b.finish_and_clear();
    }
    if let Err(e) = result {
        let _ = std::fs::remove_file(&partial);
        return Err(e);
    }
    std::fs::rename(&partial, output).map_err(|e| {
        let _ = std::fs::remove_file(&partial);
        CliError::new(crate::exit::FAILURE, format!("rename into {}: {e}", output.display()))
    })?;
    Ok(Packed { bytes, sha256: format!("sha256:{}", hex::encode(h.finalize())), secs: started.elapsed().as_secs_f64() })
}

pub async fn unpack(conn: &Conn, args: UnpackArgs, as_json: bool) -> anyhow::Result<u8> {
    let started = Instant::now();
    let (snap, notes, len) = unpack_file(conn, &args.file, args.as_tag.as_ref(), args.force).await?;
    report_unpacked(&snap, &notes, &args.file.display().to_string(), len, started.elapsed().as_secs_f64(), as_json)
}

/// Prints an unpacked snapshot, with the notes its manifest carried.
pub fn report_unpacked(
    snap: &forkd_api::v1::Snapshot,
    notes: &Notes,
    from: &str,
    len: u64,
    secs: f64,
    as_json: bool,
) -> anyhow::Result<u8> {
    if as_json {
        let mut v = json::snapshot(snap);
        v["archive_bytes"] = len.into();
        v["seconds"] = secs.into();
        v["mib_per_s"] = mb_per_s(len, secs).into();
        v["description"] = notes.description.clone().into();
        v["base_image"] = notes.base_image.clone().into();
        emit_json(&v)?;
    } else {
        let mut text = format!(
            "unpacked {from} as snapshot {} ({:.1} MiB in {:.1}s)\n",
            snap.tag,
            len as f64 / (1 << 20) as f64,
            secs
        );
        for (what, note) in [("description", &notes.description), ("base image", &notes.base_image)] {
            if !note.is_empty() {
                text.push_str(&format!("  {what}: {note}\n"));
            }
        }
        emit(&text)?;
    }
    Ok(0)
}

/// Imports the archive at `file`: its snapshot under `as_tag` when given;
/// with `force`, a snapshot of that tag is deleted first. Answers the
/// snapshot, the manifest's notes and the archive's size.
pub async fn unpack_file(
    conn: &Conn,
    file: &Path,
    as_tag: Option<&Tag>,
    force: bool,
) -> Result<(forkd_api::v1::Snapshot, Notes, u64), CliError> {
    let open = || async {
        tokio::fs::File::open(file).await.map_err(|e| CliError::usage(format!("cannot read {}: {e}", file.display())))
    };
    // The manifest comes first in the archive: read here for its tag and
    // notes (the daemon checks it again, with everything else).
    let manifest = forkd_server::memory::pack::read::open(open().await?)
        .await
        .map_err(|e| CliError::usage(format!("{}: not an archive of `forkd pack`: {e}", file.display())))?
        .manifest;
    let notes = Notes { description: manifest.description, base_image: manifest.base_image };
    let tag = as_tag.cloned().unwrap_or(manifest.tag);
    if force {
        let req = DeleteSnapshotRequest { tag: tag.to_string(), cascade: false, force: false };
        match conn.call(conn.snapshots().delete_snapshot(req)).await {
            Ok(_) => eprintln!("forkd: replaced snapshot {tag} (--force)"),
            Err(e) if e.code == crate::exit::NOT_FOUND => {}
            Err(e) => return Err(e),
        }
    }
    let mut input = open().await?;
    let len = input.metadata().await.map(|m| m.len()).unwrap_or(0);
    let progress = bar(format!("unpacking {}", display_name(file)), Some(len));
    let first_tag = as_tag.map(|t| t.to_string()).unwrap_or_default();
    // The file is read as the daemon takes it (a bounded channel).
    let (tx, rx) = tokio::sync::mpsc::channel::<ImportSnapshotRequest>(4);
    let reader_bar = progress.clone();
    let path = file.to_path_buf();
    let reader = tokio::spawn(async move {
        let mut first = true;
        loop {
            let mut buf = vec![0u8; UPLOAD_CHUNK];
            let n = input.read(&mut buf).await.map_err(|e| format!("{}: {e}", path.display()))?;
            if n == 0 && !first {
                return Ok::<(), String>(());
            }
            buf.truncate(n);
            let msg = ImportSnapshotRequest { tag: if first { first_tag.clone() } else { String::new() }, data: buf };
            first = false;
            if tx.send(msg).await.is_err() {
                return Ok(()); // the call ended; its status says why
            }
            if let Some(b) = &reader_bar {
                b.inc(n as u64);
            }
            if n == 0 {
                return Ok(());
            }
        }
    });
    let result = conn.call(conn.snapshots().import_snapshot(tokio_stream::wrappers::ReceiverStream::new(rx))).await;
    if let Some(b) = progress {
        b.finish_and_clear();
    }
    if let Ok(Err(e)) = reader.await {
        return Err(CliError::usage(e));
    }
    Ok((result?, notes, len))
}

fn display_name(p: &Path) -> String {
    p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| p.display().to_string())
}
