//! The guest's serial console, bounded. The VMM serves the console on a
//! Unix socket; the daemon copies it into `console.log` and, when that
//! reaches half the cap, moves it to `console.log.1` and starts afresh, so
//! the two never hold more than the cap together however much a guest
//! writes. A guest writing faster than the copy is slowed down (the socket
//! fills), never buffered. Nothing reads a console file whole: `tail` reads
//! a bounded suffix.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Default bytes of console kept per VM (both files together).
pub const DEFAULT_CAP: u64 = 1 << 20;
/// Smallest cap accepted (anything smaller keeps too little to debug).
pub const MIN_CAP: u64 = 16 << 10;

fn rotated(log: &Path) -> PathBuf {
    let mut s = log.as_os_str().to_owned();
    s.push(".1");
    PathBuf::from(s)
}

/// Copies the console served at `socket` into `log` until the VMM closes it.
/// Runs as its own task; it ends with the VMM.
pub fn spawn_pump(socket: PathBuf, log: PathBuf, cap: u64) {
    tokio::spawn(async move {
        if let Err(e) = pump(&socket, &log, cap.max(MIN_CAP)).await {
            tracing::debug!(socket = %socket.display(), "console copy ended: {e}");
        }
    });
}

async fn pump(socket: &Path, log: &Path, cap: u64) -> std::io::Result<()> {
    let mut s = super::connect_when_ready(socket, Duration::from_secs(10)).await?;
    let half = cap / 2;
    let mut out = tokio::fs::OpenOptions::new().create(true).append(true).open(log).await?;
    let mut written = out.metadata().await?.len();
    let mut buf = vec![0u8; 16 << 10];
    loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        let mut chunk = &buf[..n];
        while !chunk.is_empty() {
            if written >= half {
                out.flush().await?;
                tokio::fs::rename(log, rotated(log)).await?;
                out = tokio::fs::OpenOptions::new().create(true).write(true).truncate(true).open(log).await?;
                written = 0;
            }
            let room = (half - written).min(chunk.len() as u64) as usize;
            out.write_all(&chunk[..room]).await?;
            written += room as u64;
            chunk = &chunk[room..];
        }
    }
}

/// The last `max` bytes of the console (across the rotation), as text.
pub fn tail(log: &Path, max: u64) -> String {
    let mut out = Vec::new();
    let read_tail = |p: &Path, want: u64, out: &mut Vec<u8>| -> std::io::Result<()> {
        let mut f = std::fs::File::open(p)?;
        let len = f.metadata()?.len();
        let take = len.min(want);
        f.seek(SeekFrom::Start(len - take))?;
        let mut v = Vec::with_capacity(take as usize);
        f.take(take).read_to_end(&mut v)?;
        out.splice(0..0, v);
        Ok(())
    };
    let _ = read_tail(log, max, &mut out);
    if (out.len() as u64) < max {
        let _ = read_tail(&rotated(log), max - out.len() as u64, &mut out);
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The last `n` lines of `text`.
pub fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_flood_keeps_at_most_the_cap_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("console.sock");
        let log = dir.path().join("console.log");
        let listener = tokio::net::UnixListener::bind(&sock).unwrap();
        let cap = 64 << 10;
        let pump_task = tokio::spawn({
            let (sock, log) = (sock.clone(), log.clone());
            async move { pump(&sock, &log, cap).await }
        });
        let (mut guest, _) = listener.accept().await.unwrap();
        let line = b"the guest says hello again and again\n";
        for _ in 0..20_000 {
            guest.write_all(line).await.unwrap();
        }
        guest.write_all(b"LAST LINE\n").await.unwrap();
        drop(guest);
        pump_task.await.unwrap().unwrap();
        let total = std::fs::metadata(&log).unwrap().len() + std::fs::metadata(rotated(&log)).unwrap().len();
        assert!(total <= cap, "{total} bytes on disk, cap {cap}");
        let t = tail(&log, 4096);
        assert!(t.len() <= 4096);
        assert_eq!(last_lines(&t, 1), "LAST LINE");
    }
}
