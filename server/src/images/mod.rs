//! Images: root file systems with their OCI-style configuration, kept in a
//! content-addressed store under the data directory, and every way to get
//! one in without Docker — an OCI image layout, an OCI archive or a
//! `docker save` tarball (`source`, `layers`), a registry (`registry`), or
//! a package build (`build`). `ext4` turns a staged tree into the file the
//! guest boots from.

pub mod build;
pub mod ext4;
pub mod layers;
pub mod manage;
pub mod registry;
pub mod source;
pub mod store;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// What an image says about how to run things in it (the subset of the
/// OCI image config that forkd uses).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ImageConfig {
    /// `KEY=value` entries, in order.
    pub env: Vec<String>,
    pub working_dir: String,
    /// `user`, `uid`, `user:group` or `uid:gid`; "" = root.
    pub user: String,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub labels: BTreeMap<String, String>,
}

/// One layer blob of an image, on local disk, as its manifest describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerBlob {
    pub path: std::path::PathBuf,
    /// e.g. `application/vnd.oci.image.layer.v1.tar+gzip`; a `docker save`
    /// layer is `application/vnd.docker.image.rootfs.diff.tar` (or
    /// compressed, which is then sniffed from its first bytes).
    pub media_type: String,
    /// `sha256:<hex>` of the blob as stored (compressed).
    pub digest: String,
    /// Size of the blob as the manifest declares it.
    pub size: u64,
}

/// An image found in an OCI layout, OCI archive or `docker save` tarball.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceImage {
    /// `sha256:<hex>` of the manifest (for `docker save`: of its config blob).
    pub digest: String,
    pub config: ImageConfig,
    /// Bottom layer first.
    pub layers: Vec<LayerBlob>,
    /// The reference the source names the image by, if any (an OCI
    /// `org.opencontainers.image.ref.name` annotation or a `RepoTags` entry).
    pub ref_name: Option<String>,
}

/// Bounds on what an import may write: the content is hostile.
#[derive(Debug, Clone)]
pub struct ImportLimits {
    /// Total bytes of file content written across all layers.
    pub max_bytes: u64,
    /// Total tar entries across all layers.
    pub max_entries: u64,
    /// Character/block device nodes and FIFOs are refused unless set.
    pub allow_devices: bool,
}

impl Default for ImportLimits {
    fn default() -> Self {
        ImportLimits { max_bytes: 16 << 30, max_entries: 2_000_000, allow_devices: false }
    }
}

/// Why an image could not be read, pulled, built or stored.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The input is malformed or hostile (a bad path, an escape, a size or
    /// digest that does not match, a device without permission): 400.
    #[error("{0}")]
    Invalid(String),
    /// Something named is not there (an image, a tag in a layout): 404.
    #[error("{0}")]
    NotFound(String),
    /// The host lacks something (a tool, space) or the source is
    /// unreachable: 409 / 503 as the variant says.
    #[error("{0}")]
    Precondition(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl ImageError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        ImageError::Io { context: context.into(), source }
    }
}

impl From<ImageError> for crate::core::Error {
    fn from(e: ImageError) -> Self {
        use crate::core::Error;
        match e {
            ImageError::Invalid(m) => Error::InvalidArgument(m),
            ImageError::NotFound(m) => Error::NotFound(m),
            ImageError::Precondition(m) => Error::FailedPrecondition(m),
            ImageError::Unavailable(m) => Error::Unavailable(m),
            ImageError::Io { context, source } => Error::internal(&context, source),
        }
    }
}
