//! The runtime: snapshots, sandboxes and their lifecycle, the durable state
//! store and the resource ledger. Everything here speaks domain types; the
//! `api` layer translates to and from protobuf.

pub mod blocking;
pub mod error;
pub mod events;
pub mod ids;
pub mod leases;
pub mod lifecycle;
pub mod limits;
pub mod network;
pub mod operations;
pub mod pool;
pub mod ports;
pub mod reconcile;
pub mod runtime;
pub mod sandboxes;
pub mod snapshots;
pub mod state;
pub mod store;
pub mod tenants;
pub mod volumes;
pub mod workspaces;

pub use error::{Error, Result};
pub use runtime::Runtime;
/// Branching lives with the snapshots it makes.
pub use snapshots::branch;

/// Seconds since the Unix epoch.
pub fn now_unix() -> i64 {
    now_unix_ms() / 1000
}

/// Milliseconds since the Unix epoch.
pub fn now_unix_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// The Unix second at which a TTL of `ttl_secs` started now runs out
/// (0 = never). Rounded up, so a sandbox always gets at least its full TTL:
/// rounding down would let a 3 s TTL end after barely 2 s.
pub fn deadline_unix(ttl_secs: u32) -> i64 {
    if ttl_secs == 0 {
        return 0;
    }
    (now_unix_ms() + 999) / 1000 + ttl_secs as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deadline_never_cuts_a_ttl_short() {
        for ttl in [1u32, 3, 60] {
            let before = now_unix_ms();
            let deadline = deadline_unix(ttl);
            assert!(deadline * 1000 >= before + ttl as i64 * 1000, "ttl {ttl}: deadline {deadline} from {before} ms");
            assert!(deadline * 1000 < now_unix_ms() + (ttl as i64 + 1) * 1000 + 1000);
        }
        assert_eq!(deadline_unix(0), 0, "0 means no TTL");
    }
}
