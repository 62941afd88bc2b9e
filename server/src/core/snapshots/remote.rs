//! Push and pull: a snapshot's chain to and from the configured remote
//! (see `crate::remote` for the layout). A push uploads the blobs the
//! remote lacks, then the tag's manifest. A pull reads the manifest, keeps
//! the ancestors this host already has, downloads the rest into a staging
//! dir and hands it to the same checks and placement as an import: every
//! snapshot it carries becomes visible, or none.
//!
//! A fork of a tag that is not here pulls it first when the daemon pulls
//! missing snapshots (the default with a remote); forks of the same missing
//! tag at once share one pull.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use forkd_api::names::Tag;
use futures::{StreamExt, TryStreamExt};

use super::transfer::{ExportMode, ready_with_memory};
use crate::core::runtime::Runtime;
use crate::core::store::SnapshotRecord;
use crate::core::{Error, Result};
use crate::memory::pack::Manifest;
use crate::memory::pack::manifest::Requires;
use crate::remote::{Remote, RemoteError, RemoteTag};

/// Blobs uploaded or downloaded at once by one push or pull.
const BLOBS_IN_FLIGHT: usize = 4;
/// Most tags a listing returns.
pub const MAX_LISTED: usize = 10_000;

impl From<RemoteError> for Error {
    fn from(e: RemoteError) -> Self {
        match e {
            RemoteError::Config(m) => Error::FailedPrecondition(format!("remote {m}")),
            RemoteError::Invalid(m) => Error::FailedPrecondition(format!("the remote holds {m}")),
            RemoteError::Store(e) => Error::Unavailable(format!("remote: {e}")),
            RemoteError::Transfer(m) => Error::Unavailable(format!("remote: {m}")),
            RemoteError::Io(e) => Error::internal("remote transfer", e),
        }
    }
}

/// What a push did.
#[derive(Debug, Clone, Default)]
pub struct PushReport {
    pub url: String,
    /// Blobs uploaded, and the compressed bytes they took.
    pub uploaded_blobs: u32,
    pub uploaded_bytes: u64,
    /// Blobs the remote already had.
    pub present_blobs: u32,
    /// Bytes of the snapshot's files (uncompressed, sparse memory).
    pub total_bytes: u64,
    /// Whether the tag's manifest was written (false: it was already there).
    pub manifest_written: bool,
    pub seconds: f64,
}

/// Pulls in progress, by tag: a second fork of the same missing tag waits
/// for the first pull instead of starting another.
#[derive(Default)]
pub struct PullFlights(Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>);

impl PullFlights {
    fn join(&self, tag: &Tag) -> Arc<tokio::sync::Mutex<()>> {
        self.0.lock().expect("pull flights").entry(tag.to_string()).or_default().clone()
    }
    fn leave(&self, tag: &Tag) {
        self.0.lock().expect("pull flights").remove(tag.as_str());
    }
}

impl Runtime {
    /// The configured remote (FAILED_PRECONDITION without one).
    pub fn remote(&self) -> Result<&Arc<Remote>> {
        self.config
            .remote
            .as_ref()
            .ok_or_else(|| Error::FailedPrecondition("this daemon has no remote: start it with --remote URL".into()))
    }

    /// Pushes `tag` and its chain of ancestors.
    pub async fn push_snapshot(self: &Arc<Self>, tag: &Tag) -> Result<PushReport> {
        let remote = self.remote()?.clone();
        let started = Instant::now();
        let plan = self.export_plan(tag, ExportMode::Chain).await?;
        let manifest = serde_json::to_vec_pretty(&plan.manifest).map_err(|e| Error::internal("manifest", e))?;
        let mut report = PushReport { url: remote.url().to_string(), ..Default::default() };
        let entries: Vec<_> = plan.manifest.files().cloned().collect();
        report.total_bytes = entries.iter().map(|e| e.size).sum();
        let uploads = futures::stream::iter(entries.into_iter().zip(plan.sources).map(|(entry, source)| {
            let remote = remote.clone();
            async move {
                if remote.has_blob(&entry.sha256).await? {
                    return Ok::<_, Error>(None);
                }
                Ok(Some(remote.put_blob(&entry.sha256, source.body).await?))
            }
        }))
        .buffer_unordered(BLOBS_IN_FLIGHT);
        let results: Vec<Option<u64>> = uploads.try_collect().await?;
        for r in results {
            match r {
                Some(bytes) => {
                    report.uploaded_blobs += 1;
                    report.uploaded_bytes += bytes;
                }
                None => report.present_blobs += 1,
            }
        }
        // Last: a manifest is never seen before every blob it names.
        report.manifest_written = remote.put_manifest(tag, manifest).await?;
        report.seconds = started.elapsed().as_secs_f64();
        self.events.emit_ws("snapshot_pushed", "", "", tag.as_str(), "", "");
        Ok(report)
    }

    /// Pulls `tag` (and whatever of its chain this host lacks), owned by
    /// `owner`. A tag this host already has with the remote's contents is
    /// returned as it is.
    pub async fn pull_snapshot(self: &Arc<Self>, tag: &Tag, owner: String) -> Result<SnapshotRecord> {
        let remote = self.remote()?.clone();
        let bytes = remote
            .get_manifest(tag)
            .await?
            .ok_or_else(|| Error::NotFound(format!("snapshot {:?} is not in remote {}", tag.as_str(), remote.url())))?;
        let manifest = Manifest::parse(&bytes).map_err(|e| Error::FailedPrecondition(format!("remote {tag}: {e}")))?;
        if &manifest.tag != tag {
            return Err(Error::FailedPrecondition(format!(
                "the remote's manifest for {:?} describes {:?}",
                tag.as_str(),
                manifest.tag.as_str()
            )));
        }
        let top = &manifest.snapshots.last().expect("validated").record;
        if let Some(have) = self.store.get_snapshot(tag.as_str())? {
            if ready_with_memory(&have, &top.memory_digest) {
                return Ok(have);
            }
            return Err(Error::AlreadyExists(format!(
                "snapshot {:?} already exists here with other contents than the remote's",
                tag.as_str()
            )));
        }
        let manifest = self.trim_present(manifest)?;
        let outside_parent = self.check_import(&manifest, None)?;
        let result = self
            .in_staging("pull", |staging| async move {
                // Owned per download: a stream of futures borrowing the
                // manifest would not be Send for the runtime-owned pull.
                let files: Vec<_> = manifest.files_with_records().map(|(f, r)| (f.clone(), r.clone())).collect();
                futures::stream::iter(files.into_iter().map(|(f, rec)| {
                    let (remote, dir) = (remote.clone(), staging.clone());
                    async move { remote.get_blob(&f, &rec, &dir).await }
                }))
                .buffer_unordered(BLOBS_IN_FLIGHT)
                .try_collect::<Vec<()>>()
                .await?;
                self.finish_import(manifest, &staging, outside_parent, None, owner).await
            })
            .await;
        if result.is_ok() {
            self.events.emit_ws("snapshot_pulled", "", "", tag.as_str(), "", "");
        }
        result
    }

    /// The manifest without the leading ancestors this host already has
    /// (same tag, same memory): the rest becomes layers over the last of
    /// them, and only the rest is downloaded.
    fn trim_present(&self, mut m: Manifest) -> Result<Manifest> {
        let n = m.snapshots.len();
        let mut keep_from = 0;
        while keep_from + 1 < n {
            let r = &m.snapshots[keep_from].record;
            match self.store.get_snapshot(r.tag.as_str())? {
                Some(have) if ready_with_memory(&have, &r.memory_digest) => {
                    keep_from += 1;
                }
                _ => break,
            }
        }
        if keep_from > 0 {
            let last = &m.snapshots[keep_from - 1].record;
            m.requires = Some(Requires { tag: last.tag.clone(), memory_digest: last.memory_digest.clone() });
            m.snapshots.drain(..keep_from);
            m.validate().map_err(|e| Error::FailedPrecondition(format!("remote {}: {e}", m.tag)))?;
        }
        Ok(m)
    }

    /// Before a fork: pulls `tag` when it is not here, a remote is
    /// configured and the daemon (or the request) pulls missing snapshots.
    /// A tag the remote does not have either is left to the fork's own
    /// NOT_FOUND.
    pub async fn pull_if_missing(self: &Arc<Self>, tag: &Tag, owner: String, asked: Option<bool>) -> Result<()> {
        if !asked.unwrap_or(self.config.pull_missing) || self.config.remote.is_none() {
            return Ok(());
        }
        if self.store.get_snapshot(tag.as_str())?.is_some() {
            return Ok(());
        }
        let flight = self.pulls.join(tag);
        let _one = flight.lock().await;
        if self.store.get_snapshot(tag.as_str())?.is_some() {
            return Ok(()); // another fork's pull brought it
        }
        let rt = self.clone();
        let t = tag.clone();
        let result =
            crate::core::operations::owned("pull", async move { rt.pull_snapshot(&t, owner).await }, None).await;
        self.pulls.leave(tag);
        match result {
            Ok(_) | Err(Error::NotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The tags the remote holds.
    pub async fn remote_tags(&self) -> Result<Vec<RemoteTag>> {
        Ok(self.remote()?.list_tags(MAX_LISTED).await?)
    }
}
