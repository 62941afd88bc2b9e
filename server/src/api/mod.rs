//! gRPC services: thin translation between protobuf and the runtime. Errors
//! are mapped to `tonic::Status` in exactly one place (`status`).

pub mod access;
pub mod convert;
pub mod guest_files;
pub mod image;
pub mod metrics;
pub mod ports;
pub mod process;
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
    /// Whether clients must present a token (shown by `GetVersion`).
    pub auth: AuthMode,
}

/// How the daemon authenticates its clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMode {
    Token,
    /// `--no-auth`: loopback only.
    Off,
}

impl AuthMode {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMode::Token => "token",
            AuthMode::Off => "off",
        }
    }
}

impl Services {
    /// Runs an operation that changes the host as a task the runtime owns
    /// (core::operations): a client that goes away abandons its wait only.
    pub(crate) async fn owned<T, F, Fut>(&self, what: &'static str, f: F) -> Result<T, crate::core::Error>
    where
        F: FnOnce(Arc<Runtime>) -> Fut,
        Fut: std::future::Future<Output = Result<T, crate::core::Error>> + Send + 'static,
        T: Send + 'static,
    {
        crate::core::operations::owned(what, f(self.rt.clone()), None).await
    }
}
