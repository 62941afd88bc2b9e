//! forkd's public API as Rust: the gRPC code generated from `proto/`, the
//! encoded descriptor set (for server reflection and REST transcoding), and the
//! validated names that every path on the host is built from.

pub mod codes;
pub mod names;

/// `forkd.v1`: messages and the tonic clients and servers of every service.
/// (Streams such as `ImageProgress` end with a large message after many
/// small ones; boxing would only make the generated code harder to use.)
#[allow(clippy::large_enum_variant)]
pub mod v1 {
    tonic::include_proto!("forkd.v1");
}

/// `google.api`: the HTTP annotation messages.
pub mod google_api {
    tonic::include_proto!("google.api");
}

/// E2B's envd messages (`process`, `filesystem`), served by forkd's E2B
/// compatibility layer.
pub mod e2b {
    pub mod process {
        tonic::include_proto!("process");
    }
    /// (A watch event with its entry is larger than the other variants;
    /// the generated code is used as generated.)
    #[allow(clippy::large_enum_variant)]
    pub mod filesystem {
        tonic::include_proto!("filesystem");
    }
    /// Encoded `FileDescriptorSet` of the envd protos, for their JSON encoding.
    pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/e2b_descriptor.bin"));
}

/// Encoded `FileDescriptorSet` of every forkd proto and its imports.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/forkd_descriptor.bin"));

/// The fully qualified names of the public services.
pub const SERVICES: &[&str] = &[
    "forkd.v1.SnapshotService",
    "forkd.v1.SandboxService",
    "forkd.v1.WorkspaceService",
    "forkd.v1.SystemService",
    "forkd.v1.ImageService",
];

/// Version of this build, reported by `/version` and `forkd version`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
