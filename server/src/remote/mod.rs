//! Snapshots in an object store (S3, GCS, Azure Blob, a directory, a WebDAV
//! server), through `object_store`. Every node of a cluster that points at
//! the same remote can fork every snapshot pushed to it.
//!
//! ```text
//! <prefix>/blobs/sha256/<hex>      one file of a snapshot, zstd-compressed;
//!                                  named by the digest the manifest states for it
//! <prefix>/tags/<tag>.json         the snapshot archive manifest of <tag> (its chain)
//! ```
//!
//! Blobs are content-addressed, so a branch pushed after its parent uploads
//! only its own layer and state, two tags that share files share blobs, and
//! a re-push uploads nothing. A tag's manifest is written last, after every
//! blob it names is in place; each object appears whole or not at all
//! (a single PUT, or a multipart upload completed at the end). A pull
//! verifies every size and digest before anything becomes visible.
//!
//! The daemon's operator chooses the remote (`--remote`); clients never
//! name a URL of their own, so no request can make the daemon reach an
//! address or a host path it was not configured with.

pub mod blob;
pub mod open;

use std::sync::Arc;

use forkd_api::names::Tag;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};

use crate::memory::pack::manifest::{MAX_MANIFEST_BYTES, is_digest};

/// Why a remote operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// The remote URL or its settings are unusable.
    #[error("remote {0}")]
    Config(String),
    /// What the remote holds is malformed or hostile.
    #[error("the remote holds {0}")]
    Invalid(String),
    #[error("object store: {0}")]
    Store(#[from] object_store::Error),
    /// A download broke off (after the store client's retries).
    #[error("object store: {0}")]
    Transfer(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// A configured remote.
pub struct Remote {
    /// Rooted at the URL's prefix: keys are `blobs/…` and `tags/…`.
    store: Arc<dyn ObjectStore>,
    url: String,
}

/// A tag the remote holds.
#[derive(Debug, Clone)]
pub struct RemoteTag {
    pub tag: Tag,
    pub manifest_bytes: u64,
    pub pushed_unix: i64,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote").field("url", &self.url).finish()
    }
}

impl Remote {
    pub fn url(&self) -> &str {
        &self.url
    }

    fn blob_key(sha256: &str) -> Result<Path, RemoteError> {
        match sha256.strip_prefix("sha256:") {
            Some(hex) if is_digest(sha256) => Ok(Path::from(format!("blobs/sha256/{}", hex.to_ascii_lowercase()))),
            _ => Err(RemoteError::Invalid(format!("a blob name {sha256:?} that is no sha256 digest"))),
        }
    }

    fn tag_key(tag: &Tag) -> Path {
        // Tags are validated names: no '/', no "..", nothing a key must escape.
        Path::from(format!("tags/{}.json", tag.as_str()))
    }

    /// Whether the blob named by `sha256` is there.
    pub async fn has_blob(&self, sha256: &str) -> Result<bool, RemoteError> {
        match self.store.head(&Self::blob_key(sha256)?).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// The manifest of `tag`, if the remote has one (at most
    /// MAX_MANIFEST_BYTES; not parsed here).
    pub async fn get_manifest(&self, tag: &Tag) -> Result<Option<Vec<u8>>, RemoteError> {
        let got = match self.store.get(&Self::tag_key(tag)).await {
            Ok(g) => g,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        if got.meta.size > MAX_MANIFEST_BYTES {
            return Err(RemoteError::Invalid(format!(
                "a manifest for {:?} of {} bytes (at most {MAX_MANIFEST_BYTES})",
                tag.as_str(),
                got.meta.size
            )));
        }
        let mut out = Vec::with_capacity(got.meta.size as usize);
        let mut s = got.into_stream();
        while let Some(chunk) = s.try_next().await? {
            if out.len() + chunk.len() > MAX_MANIFEST_BYTES as usize {
                return Err(RemoteError::Invalid(format!(
                    "a manifest for {:?} over {MAX_MANIFEST_BYTES} bytes",
                    tag.as_str()
                )));
            }
            out.extend_from_slice(&chunk);
        }
        Ok(Some(out))
    }

    /// Writes the manifest of `tag` unless the remote already holds exactly
    /// these bytes. Returns whether it wrote.
    pub async fn put_manifest(&self, tag: &Tag, bytes: Vec<u8>) -> Result<bool, RemoteError> {
        if self.get_manifest(tag).await?.as_deref() == Some(bytes.as_slice()) {
            return Ok(false);
        }
        self.store.put(&Self::tag_key(tag), bytes.into()).await?;
        Ok(true)
    }

    /// Every tag the remote holds (at most `limit`), by name.
    pub async fn list_tags(&self, limit: usize) -> Result<Vec<RemoteTag>, RemoteError> {
        let mut out = vec![];
        let mut s = self.store.list(Some(&Path::from("tags")));
        while let Some(meta) = s.next().await {
            let meta = meta?;
            let Some(name) = meta.location.filename().and_then(|f| f.strip_suffix(".json")) else { continue };
            // Anything that is not a valid tag is not ours: left out.
            let Ok(tag) = Tag::parse(name) else { continue };
            out.push(RemoteTag { tag, manifest_bytes: meta.size, pushed_unix: meta.last_modified.timestamp() });
            if out.len() >= limit {
                break;
            }
        }
        out.sort_by(|a, b| a.tag.as_str().cmp(b.tag.as_str()));
        Ok(out)
    }
}
