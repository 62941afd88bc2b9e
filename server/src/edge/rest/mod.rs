//! The REST `/v1` surface: requests are matched against routes derived from
//! the protos' HTTP annotations, turned into protobuf with the descriptor
//! set, and sent through the very same gRPC services. Responses come back as
//! JSON with proto field names; server-streaming RPCs as NDJSON.

pub mod codes;
pub mod grpc_frames;
pub mod routes;
pub mod success;
pub mod transcode;

pub use transcode::Transcoder;
