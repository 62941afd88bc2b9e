//! The runtime: snapshots, sandboxes and their lifecycle, the durable state
//! store and the resource ledger. Everything here speaks domain types; the
//! `api` layer translates to and from protobuf.

pub mod branch;
pub mod error;
pub mod events;
pub mod ids;
pub mod lifecycle;
pub mod limits;
pub mod network;
pub mod reconcile;
pub mod runtime;
pub mod sandboxes;
pub mod snapshots;
pub mod store;
pub mod volumes;
pub mod workspaces;

pub use error::{Error, Result};
pub use runtime::Runtime;

/// Seconds since the Unix epoch.
pub fn now_unix() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}
