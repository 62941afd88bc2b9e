//! `forkd pack` and `forkd unpack`: snapshot archives streamed to and from
//! the daemon (ExportSnapshot / ImportSnapshot), so they work against a
//! daemon on another host. Progress shows bytes and rate on a terminal.

use std::io::IsTerminal;
use std::path::Path;
use std::time::Instant;

use forkd_api::v1::{ExportSnapshotRequest, ImportSnapshotRequest};
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
fn bar(label: String, len: Option<u64>) -> Option<ProgressBar> {
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

pub async fn pack(conn: &Conn, args: PackArgs, as_json: bool) -> anyhow::Result<u8> {
    let req = ExportSnapshotRequest { tag: args.tag.to_string(), layer_only: args.layer_only, flat: args.flat };
    let started = Instant::now();
    let mut stream = conn.call(conn.snapshots().export_snapshot(req)).await?;
    // Written beside its name and renamed once complete: never half a file
    // under the name asked for.
    let name = args.output.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "archive".into());
    let partial = args.output.with_file_name(format!(".{name}.partial.{}", std::process::id()));
    let mut out = tokio::fs::File::create(&partial)
        .await
        .map_err(|e| CliError::usage(format!("cannot write {}: {e}", partial.display())))?;
    let progress = bar(format!("packing {}", args.tag), None);
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
        return Err(e.into());
    }
    std::fs::rename(&partial, &args.output).map_err(|e| {
        let _ = std::fs::remove_file(&partial);
        CliError::new(crate::exit::FAILURE, format!("rename into {}: {e}", args.output.display()))
    })?;
    let secs = started.elapsed().as_secs_f64();
    let sha256 = format!("sha256:{}", hex::encode(h.finalize()));
    if as_json {
        emit_json(&serde_json::json!({
            "tag": args.tag.as_str(),
            "file": args.output,
            "bytes": bytes,
            "sha256": sha256,
            "seconds": secs,
            "mib_per_s": mb_per_s(bytes, secs),
        }))?;
    } else {
        emit(&format!(
            "packed {} into {} ({:.1} MiB in {:.1}s, {})\n",
            args.tag,
            args.output.display(),
            bytes as f64 / (1 << 20) as f64,
            secs,
            sha256
        ))?;
    }
    Ok(0)
}

pub async fn unpack(conn: &Conn, args: UnpackArgs, as_json: bool) -> anyhow::Result<u8> {
    let mut file = tokio::fs::File::open(&args.file)
        .await
        .map_err(|e| CliError::usage(format!("cannot read {}: {e}", args.file.display())))?;
    let len = file.metadata().await.map(|m| m.len()).unwrap_or(0);
    let started = Instant::now();
    let progress = bar(format!("unpacking {}", display_name(&args.file)), Some(len));
    let tag = args.as_tag.as_ref().map(|t| t.to_string()).unwrap_or_default();
    // The file is read as the daemon takes it (a bounded channel).
    let (tx, rx) = tokio::sync::mpsc::channel::<ImportSnapshotRequest>(4);
    let reader_bar = progress.clone();
    let path = args.file.clone();
    let reader = tokio::spawn(async move {
        let mut first = true;
        loop {
            let mut buf = vec![0u8; UPLOAD_CHUNK];
            let n = file.read(&mut buf).await.map_err(|e| format!("{}: {e}", path.display()))?;
            if n == 0 && !first {
                return Ok::<(), String>(());
            }
            buf.truncate(n);
            let msg = ImportSnapshotRequest { tag: if first { tag.clone() } else { String::new() }, data: buf };
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
        return Err(CliError::usage(e).into());
    }
    let snap = result?;
    let secs = started.elapsed().as_secs_f64();
    if as_json {
        let mut v = json::snapshot(&snap);
        v["archive_bytes"] = len.into();
        v["seconds"] = secs.into();
        v["mib_per_s"] = mb_per_s(len, secs).into();
        emit_json(&v)?;
    } else {
        emit(&format!(
            "unpacked {} as snapshot {} ({:.1} MiB in {:.1}s)\n",
            args.file.display(),
            snap.tag,
            len as f64 / (1 << 20) as f64,
            secs
        ))?;
    }
    Ok(0)
}

fn display_name(p: &Path) -> String {
    p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| p.display().to_string())
}
