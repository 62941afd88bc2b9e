//! Snapshot archives: a snapshot and its chain of ancestors as one
//! `.tar.zst` stream that can leave the host and come back on another.
//!
//! ```text
//! manifest.json                    format, tags, records, file sizes and digests, guest digests
//! snapshots/<root>/state           device + CPU state
//! snapshots/<root>/mem.pages       the root's memory: its non-zero pages only
//! snapshots/<child>/state
//! snapshots/<child>/layer          a diff layer over the entry before it
//! …
//! ```
//!
//! The tar is POSIX ustar holding regular files only (any tar lists and
//! extracts it); it is zstd-compressed with `async-compression` and streamed
//! both ways with bounded buffers, never a whole file in memory. Memory is
//! sparse: `mem.pages` uses the diff-layer encoding over an all-zero parent,
//! so runs of zero pages (holes or written zeros) cost nothing.
//!
//! Reading trusts nothing: the manifest comes first and is validated before
//! any file is written; every later entry must be a regular file the
//! manifest names, once, of exactly the size it states, and what it holds
//! must hash to the digests it states (memory is checked once expanded).
//! Everything lands in a staging directory that the caller renames into the
//! store only after all of it checked out.

pub mod manifest;
pub mod pages;
pub mod read;
pub mod tarball;
pub mod write;

pub use manifest::{FileKind, Manifest};

/// Why an archive was refused or could not be written.
#[derive(Debug, thiserror::Error)]
pub enum PackError {
    /// The archive is malformed or hostile (the client's fault).
    #[error("invalid archive: {0}")]
    Invalid(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl PackError {
    pub fn invalid(msg: impl Into<String>) -> Self {
        PackError::Invalid(msg.into())
    }
}
