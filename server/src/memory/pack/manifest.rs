//! The manifest at the head of an archive, and the checks that make it safe
//! to act on: the chain is well-formed, every file it names has the one path
//! it may have, and no size can be larger than the memory it describes.

use serde::{Deserialize, Serialize};

use forkd_api::names::Tag;

use super::PackError;
use crate::core::store::SnapshotRecord;
use crate::memory::dirty::PAGE;
use crate::memory::layer;

pub const FORMAT: &str = "forkd-snapshot-archive/1";
pub const MANIFEST_PATH: &str = "manifest.json";
/// Largest manifest read (it is parsed in memory).
pub const MAX_MANIFEST_BYTES: u64 = 1 << 20;
/// Most snapshots one archive may hold.
pub const MAX_SNAPSHOTS: usize = 64;
/// Largest device-state file accepted.
pub const MAX_STATE_BYTES: u64 = 256 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileKind {
    /// Device + CPU state; `sha256` is its own digest.
    State,
    /// A diff layer over the entry before it; `sha256` is its own digest
    /// (a diff snapshot's memory digest).
    Layer,
    /// The non-zero pages of a flat memory; `sha256` is the digest of the
    /// memory they expand to.
    Pages,
}

impl FileKind {
    pub fn file_name(self) -> &'static str {
        match self {
            FileKind::State => "state",
            FileKind::Layer => "layer",
            FileKind::Pages => "mem.pages",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub path: String,
    pub kind: FileKind,
    /// Bytes of the entry in the archive.
    pub size: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotEntry {
    pub record: SnapshotRecord,
    pub files: Vec<FileEntry>,
}

/// Digests of the guest assets the snapshots were made with: a restore
/// needs the very same kernel, initramfs and image.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestDigests {
    pub kernel: String,
    pub initramfs: String,
    pub image: String,
}

/// A snapshot outside the archive that its first entry is a layer over
/// (a layer-only archive).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Requires {
    pub tag: Tag,
    pub memory_digest: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    /// The snapshot the archive is for: the last entry.
    pub tag: Tag,
    /// Root first; each later entry is a child of the one before it.
    pub snapshots: Vec<SnapshotEntry>,
    pub guest: GuestDigests,
    #[serde(default)]
    pub requires: Option<Requires>,
    /// What the packer said the snapshot is, for whoever unpacks it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// The upstream image the snapshot was made from, as the packer named it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub base_image: String,
}

/// Longest manifest note (description, base image), in bytes.
pub const MAX_NOTE: usize = 1024;

/// Why `note` cannot go into a manifest, if it cannot: notes are one line
/// of at most [`MAX_NOTE`] bytes, since unpackers print them.
pub fn note_error(note: &str) -> Option<String> {
    if note.len() > MAX_NOTE {
        Some(format!("{} bytes (at most {MAX_NOTE})", note.len()))
    } else if note.chars().any(char::is_control) {
        Some("control characters (one line of text only)".into())
    } else {
        None
    }
}

/// Whether `d` is a "sha256:" digest of 64 hex digits.
pub fn is_digest(d: &str) -> bool {
    d.strip_prefix("sha256:").is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

impl Manifest {
    /// Parses and validates a manifest read from an archive.
    pub fn parse(bytes: &[u8]) -> Result<Self, PackError> {
        let m: Manifest =
            serde_json::from_slice(bytes).map_err(|e| PackError::invalid(format!("manifest.json: {e}")))?;
        m.validate()?;
        Ok(m)
    }

    /// Every rule an archive's manifest must follow.
    pub fn validate(&self) -> Result<(), PackError> {
        let bad = |m: String| Err(PackError::invalid(format!("manifest: {m}")));
        if self.format != FORMAT {
            return bad(format!("format {:?} is not {FORMAT:?}", self.format));
        }
        if self.snapshots.is_empty() || self.snapshots.len() > MAX_SNAPSHOTS {
            return bad(format!("{} snapshots (1..={MAX_SNAPSHOTS} allowed)", self.snapshots.len()));
        }
        for (what, note) in [("description", &self.description), ("base_image", &self.base_image)] {
            if let Some(e) = note_error(note) {
                return bad(format!("{what} has {e}"));
            }
        }
        for d in [&self.guest.kernel, &self.guest.initramfs, &self.guest.image] {
            if !is_digest(d) {
                return bad(format!("guest digest {d:?} is not a sha256 digest"));
            }
        }
        let image = &self.snapshots[0].record.image;
        let mut seen = std::collections::HashSet::new();
        for (i, e) in self.snapshots.iter().enumerate() {
            let r = &e.record;
            let tag = r.tag.as_str();
            if !seen.insert(tag) {
                return bad(format!("snapshot {tag:?} appears twice"));
            }
            if &r.image != image {
                return bad(format!("snapshot {tag:?} runs image {:?}, not {image:?} like the rest", r.image));
            }
            if !(64..=65536).contains(&r.mem_mib) || !(1..=64).contains(&r.vcpus) {
                return bad(format!("snapshot {tag:?} has {} MiB and {} vCPUs", r.mem_mib, r.vcpus));
            }
            if !is_digest(&r.memory_digest) || !is_digest(&r.state_digest) {
                return bad(format!("snapshot {tag:?} lacks memory or state digests"));
            }
            if r.vm.is_none() {
                return bad(format!("snapshot {tag:?} has no VM configuration"));
            }
            // The chain: a layer is over the entry before it (or, first, over
            // the snapshot the archive requires); anything else is flat.
            let over =
                if i == 0 { self.requires.as_ref().map(|q| &q.tag) } else { Some(&self.snapshots[i - 1].record.tag) };
            let layered = r.kind == "diff" && over.is_some();
            if layered && r.parent_tag.as_ref() != over {
                return bad(format!("snapshot {tag:?} is a layer whose parent is not the entry before it"));
            }
            if i > 0 && !layered {
                return bad(format!("snapshot {tag:?} follows another but is not a layer over it"));
            }
            if !layered && r.parent_tag.is_some() {
                return bad(format!("snapshot {tag:?} is flat but names a parent"));
            }
            let mem_pages = r.mem_bytes() / PAGE;
            let want = [FileKind::State, if layered { FileKind::Layer } else { FileKind::Pages }];
            if e.files.len() != want.len() {
                return bad(format!("snapshot {tag:?} must have exactly {} files", want.len()));
            }
            for (f, kind) in e.files.iter().zip(want) {
                let path = format!("snapshots/{tag}/{}", kind.file_name());
                if f.kind != kind || f.path != path {
                    return bad(format!("snapshot {tag:?}: expected {path:?}, found {:?}", f.path));
                }
                if !is_digest(&f.sha256) {
                    return bad(format!("{path:?} has no sha256 digest"));
                }
                match kind {
                    FileKind::State if f.size > MAX_STATE_BYTES || f.sha256 != r.state_digest => {
                        return bad(format!("{path:?}: size over {MAX_STATE_BYTES} or digest unlike the record"));
                    }
                    // A flat snapshot's memory digest is that of its flat
                    // memory; a diff's is that of its layer.
                    FileKind::Pages | FileKind::Layer if f.sha256 != r.memory_digest => {
                        return bad(format!("{path:?}: digest unlike the record's memory digest"));
                    }
                    FileKind::Pages | FileKind::Layer => {
                        // A whole number of pages, no more than the memory has.
                        let body = f.size.checked_sub(layer::encoded_len(0));
                        let fits = body.is_some_and(|b| b % (8 + PAGE) == 0 && b / (8 + PAGE) <= mem_pages);
                        if !fits {
                            return bad(format!(
                                "{path:?}: {} bytes is not a page set of a {} MiB memory",
                                f.size, r.mem_mib
                            ));
                        }
                    }
                    FileKind::State => {}
                }
            }
        }
        if self.snapshots.last().map(|e| &e.record.tag) != Some(&self.tag) {
            return bad(format!("the last snapshot is not {:?}", self.tag.as_str()));
        }
        Ok(())
    }

    /// Every file entry, in archive order.
    pub fn files(&self) -> impl Iterator<Item = &FileEntry> {
        self.files_with_records().map(|(f, _)| f)
    }

    /// Every file entry with the record of the snapshot it belongs to.
    pub fn files_with_records(&self) -> impl Iterator<Item = (&FileEntry, &SnapshotRecord)> {
        self.snapshots.iter().flat_map(|e| e.files.iter().map(move |f| (f, &e.record)))
    }

    /// Bytes the archive's files hold (before compression).
    pub fn total_bytes(&self) -> u64 {
        self.files().map(|f| f.size).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_are_one_bounded_line() {
        assert_eq!(note_error(""), None);
        assert_eq!(note_error("python:3.12-slim — warmed numpy"), None);
        assert!(note_error("two\nlines").unwrap().contains("control"));
        assert!(note_error("\u{1b}[31mred").unwrap().contains("control"));
        assert_eq!(note_error(&"x".repeat(MAX_NOTE)), None);
        assert!(note_error(&"x".repeat(MAX_NOTE + 1)).unwrap().contains("at most 1024"));
    }
}
