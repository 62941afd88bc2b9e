//! forkd-server: runs untrusted code in microVMs and forks copy-on-write
//! children from warmed snapshots.
//!
//! Layers, outside in: `edge` (one port for gRPC and REST, auth, audit,
//! metrics) → `api` (protobuf ↔ domain) → `core` (runtime, store, ledger)
//! → `vmm` (QEMU backend), `memory` (snapshot files), `agent` (channel to
//! the guest).

pub mod agent;
pub mod api;
pub mod core;
pub mod e2b;
pub mod edge;
pub mod host;
pub mod images;
pub mod memory;
pub mod probe;
pub mod remote;
pub mod vmm;
