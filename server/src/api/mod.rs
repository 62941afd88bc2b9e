//! gRPC services: thin translation between protobuf and the runtime. Errors
//! are mapped to `tonic::Status` in exactly one place (`status`).

pub mod convert;
pub mod sandbox;
pub mod snapshot;
pub mod status;
pub mod system;
pub mod workspace;

use std::sync::Arc;

use crate::core::Runtime;

/// State shared by every service.
#[derive(Clone)]
pub struct Services {
    pub rt: Arc<Runtime>,
    pub data_dir: String,
}
