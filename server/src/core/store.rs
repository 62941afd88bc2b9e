//! Durable state: snapshots, sandboxes, workspaces and the resource ledger in
//! SQLite (WAL mode). Every change is one transaction, so a crash at any
//! moment leaves either the old or the new record, never a torn one.
//!
//! Records are stored as JSON documents next to the few columns that queries
//! need (status, parent, owner), which keeps schema changes cheap while the
//! columns stay indexable.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

use forkd_api::names::{SandboxId, Tag, WorkspaceName};
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};

use super::{Error, Result};
use crate::vmm::VmSpec;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotStatus {
    Writing,
    Ready,
    Failed,
    Deleting,
}

impl SnapshotStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Writing => "writing",
            Self::Ready => "ready",
            Self::Failed => "failed",
            Self::Deleting => "deleting",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotRecord {
    pub tag: Tag,
    pub status: SnapshotStatus,
    #[serde(default)]
    pub status_reason: String,
    pub image: String,
    pub vcpus: u32,
    pub mem_mib: u32,
    /// "base", "full" or "diff".
    pub kind: String,
    #[serde(default)]
    pub parent_tag: Option<Tag>,
    pub created_at_unix: i64,
    #[serde(default)]
    pub memory_digest: String,
    #[serde(default)]
    pub state_digest: String,
    #[serde(default)]
    pub parent_memory_digest: String,
    #[serde(default)]
    pub branched_from: String,
    #[serde(default)]
    pub pause_ms: f64,
    #[serde(default)]
    pub dirty_bytes: u64,
    /// Branches: milliseconds spent writing the captured memory.
    #[serde(default)]
    pub diff_ms: f64,
    pub backend: String,
    pub accel: String,
    #[serde(default)]
    pub volumes: Vec<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub warm_ms: f64,
    #[serde(default)]
    pub runtime: String,
    #[serde(default)]
    pub physical_size_bytes: u64,
    /// The VM configuration children must be restored with, identical to
    /// the one the snapshot was taken from.
    #[serde(default)]
    pub vm: Option<VmSpec>,
    /// The principal it belongs to ("" = written before owners existed:
    /// admins only).
    #[serde(default)]
    pub owner: String,
    /// Marked by an admin: every tenant may see it and fork from it.
    #[serde(default)]
    pub shared: bool,
}

impl SnapshotRecord {
    /// Bytes of its guest memory.
    pub fn mem_bytes(&self) -> u64 {
        self.mem_mib as u64 * (1 << 20)
    }

    /// The VM configuration its children are restored with.
    pub fn vm_spec(&self) -> Result<crate::vmm::VmSpec> {
        self.vm
            .clone()
            .ok_or_else(|| Error::FailedPrecondition(format!("snapshot {:?} has no VM configuration", self.tag)))
    }
}

/// Limits and settings a sandbox is created with.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct SandboxSettings {
    pub memory_limit_mib: u32,
    pub cpu_quota: f64,
    pub pids_limit: u32,
    pub network: String,
    pub allow: Vec<String>,
    pub volumes: Vec<String>,
    pub labels: BTreeMap<String, String>,
    pub ttl_secs: u32,
    pub idle_timeout_secs: u32,
}

impl SandboxSettings {
    /// Checks the lifecycle fields; limits are checked where they are applied.
    pub fn validate_lifecycle(&self) -> Result<()> {
        const DAY: u32 = 30 * 24 * 3600;
        if self.ttl_secs > DAY {
            return Err(Error::invalid("ttl_secs", format!("{} exceeds {DAY} (30 days)", self.ttl_secs)));
        }
        if self.idle_timeout_secs > DAY {
            return Err(Error::invalid(
                "idle_timeout_secs",
                format!("{} exceeds {DAY} (30 days)", self.idle_timeout_secs),
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SandboxRecord {
    pub id: SandboxId,
    pub snapshot_tag: Tag,
    pub pid: u32,
    /// Process start time (clock ticks since boot, /proc/PID/stat field 22):
    /// with the pid it identifies the VMM even after pid reuse.
    pub pid_start: u64,
    pub created_at_unix: i64,
    pub status: super::state::SandboxStatus,
    #[serde(default)]
    pub status_reason: String,
    pub hostname: String,
    pub settings: SandboxSettings,
    #[serde(default)]
    pub workspace: String,
    #[serde(default)]
    pub spawn_ms: f64,
    pub workdir: String,
    pub backend: String,
    pub accel: String,
    /// When the TTL ends (0 = never); renewable.
    #[serde(default)]
    pub expires_at_unix: i64,
    /// The sandbox's network, when it has one of its own.
    #[serde(default)]
    pub net: Option<crate::host::net::SandboxNet>,
    /// Its disks when they differ from its snapshot's (volumes of its own
    /// plugged into slots); empty = the snapshot's.
    #[serde(default)]
    pub drives: Vec<crate::vmm::Drive>,
    /// The principal it belongs to ("" = admins only).
    #[serde(default)]
    pub owner: String,
    /// Branches taken from it.
    #[serde(default)]
    pub branch_count: u32,
    /// Where its spawn's time went.
    #[serde(default)]
    pub spawn_phases: SpawnPhases,
}

/// A spawn's phases, cumulative ms from the request (see the proto).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct SpawnPhases {
    pub prepared_ms: f64,
    pub restored_ms: f64,
    pub resumed_ms: f64,
    pub reinit_ms: f64,
    pub pooled: bool,
    #[serde(default)]
    pub guest_steps: GuestSteps,
}

/// Ms each re-init step took in the guest, as the guest reported them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct GuestSteps {
    pub clock_ms: f64,
    pub entropy_ms: f64,
    pub hostname_ms: f64,
    pub reseed_ms: f64,
    pub network_ms: f64,
    pub pids_ms: f64,
}

impl GuestSteps {
    /// Reads the agent's step timings. Guest-reported: only the known
    /// names are kept and each is capped at `cap_ms`.
    pub fn from_micros(steps: &std::collections::HashMap<String, u32>, cap_ms: f64) -> GuestSteps {
        let ms = |name: &str| steps.get(name).map(|&us| (us as f64 / 1000.0).min(cap_ms)).unwrap_or(0.0);
        GuestSteps {
            clock_ms: ms("clock"),
            entropy_ms: ms("entropy"),
            hostname_ms: ms("hostname"),
            reseed_ms: ms("reseed"),
            network_ms: ms("network"),
            pids_ms: ms("pids"),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkspaceRecord {
    pub name: WorkspaceName,
    pub status: super::state::WorkspaceStatus,
    #[serde(default)]
    pub status_reason: String,
    #[serde(default)]
    pub live_sandbox_id: String,
    pub source_snapshot_tag: Tag,
    #[serde(default)]
    pub state_tag: String,
    pub settings: SandboxSettings,
    pub created_at_unix: i64,
    pub updated_at_unix: i64,
    #[serde(default)]
    pub suspended_at_unix: i64,
    /// Seconds of TTL already spent running (a suspended workspace spends none).
    #[serde(default)]
    pub ttl_used_secs: u64,
    /// Counts suspends, so every state snapshot gets a fresh tag.
    #[serde(default)]
    pub generation: u64,
    /// The principal it belongs to ("" = admins only).
    #[serde(default)]
    pub owner: String,
    /// What its TTL running out does.
    #[serde(default)]
    pub on_expiry: super::state::ExpiryAction,
    /// Free-form key/value pairs its creator attached (E2B metadata).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
    /// Environment every process started through the E2B API gets.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Its source snapshot was made for it and goes with the last
    /// workspace that owns it.
    #[serde(default)]
    pub owns_source: bool,
}

/// One host resource forkd owns: recorded before it is created, removed after
/// it is gone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerEntry {
    pub kind: String,
    pub key: String,
    pub owner: String,
}

pub struct Store {
    conn: Mutex<Connection>,
}

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS snapshots (
    tag TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    parent_tag TEXT,
    created_at INTEGER NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS snapshots_parent ON snapshots(parent_tag);
CREATE TABLE IF NOT EXISTS sandboxes (
    id TEXT PRIMARY KEY,
    snapshot_tag TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS sandboxes_tag ON sandboxes(snapshot_tag);
CREATE TABLE IF NOT EXISTS workspaces (
    name TEXT PRIMARY KEY,
    data TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS ledger (
    kind TEXT NOT NULL,
    key TEXT NOT NULL,
    owner TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (kind, key)
);
CREATE INDEX IF NOT EXISTS ledger_owner ON ledger(owner);
"#;

fn to_json<T: Serialize>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| Error::internal("encode record", e))
}

/// Records of a listing; a row that does not decode (a damaged or edited
/// store: names are validated on the way in) is left out and logged, so
/// one bad row never stops the daemon from starting.
fn decode_rows<T: for<'de> Deserialize<'de>>(rows: impl Iterator<Item = rusqlite::Result<String>>) -> Vec<T> {
    let mut out = vec![];
    for row in rows {
        match row.map_err(Error::from).and_then(|d| from_json(&d)) {
            Ok(r) => out.push(r),
            Err(e) => tracing::warn!("state store: skipping a record that does not decode: {e}"),
        }
    }
    out
}

fn from_json<T: for<'de> Deserialize<'de>>(s: &str) -> Result<T> {
    serde_json::from_str(s).map_err(|e| Error::internal("decode record", e))
}

impl Store {
    /// Opens (creating if needed) the store at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        Ok(Self { conn: Mutex::new(conn) })
    }

    fn with<T>(&self, f: impl FnOnce(&mut Connection) -> Result<T>) -> Result<T> {
        // A write may wait on the disk (and on the busy timeout): off the executor.
        super::blocking::run(|| {
            let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut conn)
        })
    }

    // ---- snapshots ----

    /// Inserts a new snapshot; ALREADY_EXISTS if the tag is taken.
    pub fn insert_snapshot(&self, rec: &SnapshotRecord) -> Result<()> {
        let data = to_json(rec)?;
        self.with(|c| {
            let n = c.execute(
                "INSERT OR IGNORE INTO snapshots (tag, status, parent_tag, created_at, data) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![rec.tag.as_str(), rec.status.as_str(), rec.parent_tag.as_ref().map(|t| t.as_str()), rec.created_at_unix, data],
            )?;
            if n == 0 {
                return Err(Error::AlreadyExists(format!("snapshot {:?} already exists", rec.tag)));
            }
            Ok(())
        })
    }

    pub fn update_snapshot(&self, rec: &SnapshotRecord) -> Result<()> {
        let data = to_json(rec)?;
        self.with(|c| {
            c.execute(
                "UPDATE snapshots SET status = ?2, parent_tag = ?3, data = ?4 WHERE tag = ?1",
                params![rec.tag.as_str(), rec.status.as_str(), rec.parent_tag.as_ref().map(|t| t.as_str()), data],
            )?;
            Ok(())
        })
    }

    pub fn get_snapshot(&self, tag: &str) -> Result<Option<SnapshotRecord>> {
        self.with(|c| {
            let data: Option<String> =
                c.query_row("SELECT data FROM snapshots WHERE tag = ?1", [tag], |r| r.get(0)).optional()?;
            data.map(|d| from_json(&d)).transpose()
        })
    }

    pub fn list_snapshots(&self) -> Result<Vec<SnapshotRecord>> {
        self.with(|c| {
            let mut stmt = c.prepare("SELECT data FROM snapshots ORDER BY created_at, tag")?;
            let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
            Ok(decode_rows(rows))
        })
    }

    pub fn snapshot_children(&self, tag: &str) -> Result<Vec<String>> {
        self.with(|c| {
            let mut stmt = c.prepare("SELECT tag FROM snapshots WHERE parent_tag = ?1 ORDER BY created_at, tag")?;
            let rows = stmt.query_map([tag], |r| r.get::<_, String>(0))?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
    }

    pub fn delete_snapshot(&self, tag: &str) -> Result<()> {
        self.with(|c| {
            c.execute("DELETE FROM snapshots WHERE tag = ?1", [tag])?;
            Ok(())
        })
    }

    // ---- sandboxes ----

    pub fn put_sandbox(&self, rec: &SandboxRecord) -> Result<()> {
        let data = to_json(rec)?;
        self.with(|c| {
            c.execute(
                "INSERT INTO sandboxes (id, snapshot_tag, status, created_at, data) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT(id) DO UPDATE SET status = excluded.status, data = excluded.data",
                params![rec.id.as_str(), rec.snapshot_tag.as_str(), rec.status.as_str(), rec.created_at_unix, data],
            )?;
            Ok(())
        })
    }

    pub fn list_sandboxes(&self) -> Result<Vec<SandboxRecord>> {
        self.with(|c| {
            let mut stmt = c.prepare("SELECT data FROM sandboxes ORDER BY created_at, id")?;
            let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
            Ok(decode_rows(rows))
        })
    }

    pub fn delete_sandbox(&self, id: &str) -> Result<()> {
        self.with(|c| {
            c.execute("DELETE FROM sandboxes WHERE id = ?1", [id])?;
            Ok(())
        })
    }

    // ---- workspaces ----

    pub fn insert_workspace(&self, rec: &WorkspaceRecord) -> Result<()> {
        let data = to_json(rec)?;
        self.with(|c| {
            let n = c.execute(
                "INSERT OR IGNORE INTO workspaces (name, data) VALUES (?1, ?2)",
                params![rec.name.as_str(), data],
            )?;
            if n == 0 {
                return Err(Error::AlreadyExists(format!("workspace {:?} already exists", rec.name)));
            }
            Ok(())
        })
    }

    pub fn update_workspace(&self, rec: &WorkspaceRecord) -> Result<()> {
        let data = to_json(rec)?;
        self.with(|c| {
            c.execute("UPDATE workspaces SET data = ?2 WHERE name = ?1", params![rec.name.as_str(), data])?;
            Ok(())
        })
    }

    pub fn get_workspace(&self, name: &str) -> Result<Option<WorkspaceRecord>> {
        self.with(|c| {
            let data: Option<String> =
                c.query_row("SELECT data FROM workspaces WHERE name = ?1", [name], |r| r.get(0)).optional()?;
            data.map(|d| from_json(&d)).transpose()
        })
    }

    pub fn list_workspaces(&self) -> Result<Vec<WorkspaceRecord>> {
        self.with(|c| {
            let mut stmt = c.prepare("SELECT data FROM workspaces ORDER BY name")?;
            let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
            Ok(decode_rows(rows))
        })
    }

    pub fn delete_workspace(&self, name: &str) -> Result<()> {
        self.with(|c| {
            c.execute("DELETE FROM workspaces WHERE name = ?1", [name])?;
            Ok(())
        })
    }

    // ---- ledger ----

    /// Records a resource before it is created.
    pub fn ledger_add(&self, kind: &str, key: &str, owner: &str) -> Result<()> {
        self.with(|c| {
            c.execute(
                "INSERT OR REPLACE INTO ledger (kind, key, owner, created_at) VALUES (?1, ?2, ?3, ?4)",
                params![kind, key, owner, super::now_unix()],
            )?;
            Ok(())
        })
    }

    /// Forgets a resource after it is gone.
    pub fn ledger_remove(&self, kind: &str, key: &str) -> Result<()> {
        self.with(|c| {
            c.execute("DELETE FROM ledger WHERE kind = ?1 AND key = ?2", [kind, key])?;
            Ok(())
        })
    }

    pub fn ledger_entries(&self) -> Result<Vec<LedgerEntry>> {
        self.with(|c| {
            let mut stmt = c.prepare("SELECT kind, key, owner FROM ledger ORDER BY created_at")?;
            let rows = stmt.query_map([], |r| Ok(LedgerEntry { kind: r.get(0)?, key: r.get(1)?, owner: r.get(2)? }))?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(tag: &str, parent: Option<&str>) -> SnapshotRecord {
        SnapshotRecord {
            tag: Tag::parse(tag).unwrap(),
            status: SnapshotStatus::Writing,
            status_reason: String::new(),
            image: "python".into(),
            vcpus: 1,
            mem_mib: 256,
            kind: "base".into(),
            parent_tag: parent.map(|p| Tag::parse(p).unwrap()),
            created_at_unix: 1,
            memory_digest: String::new(),
            state_digest: String::new(),
            parent_memory_digest: String::new(),
            branched_from: String::new(),
            pause_ms: 0.0,
            dirty_bytes: 0,
            diff_ms: 0.0,
            backend: "qemu".into(),
            accel: "tcg".into(),
            volumes: vec![],
            labels: Default::default(),
            warm_ms: 0.0,
            runtime: "python".into(),
            physical_size_bytes: 0,
            vm: None,
            owner: "a".into(),
            shared: false,
        }
    }

    #[test]
    fn records_from_before_owners_load_as_admin_only() {
        // A record written by an earlier version has no owner or shared key.
        let mut v = serde_json::to_value(snap("old", None)).unwrap();
        v.as_object_mut().unwrap().remove("owner");
        v.as_object_mut().unwrap().remove("shared");
        let r: SnapshotRecord = serde_json::from_value(v).unwrap();
        assert_eq!((r.owner.as_str(), r.shared), ("", false));
        assert!(!crate::core::tenants::Principal::admin().owner().is_empty());
    }

    #[test]
    fn a_record_with_a_bad_name_is_skipped_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.db")).unwrap();
        store.insert_snapshot(&snap("good", None)).unwrap();
        let bad = serde_json::to_string(&snap("good", None)).unwrap().replace("\"good\"", "\"../evil\"");
        store
            .with(|c| {
                c.execute(
                    "INSERT INTO snapshots (tag, status, parent_tag, created_at, data) VALUES ('x', 'ready', NULL, 2, ?1)",
                    [bad],
                )?;
                Ok(())
            })
            .unwrap();
        let tags: Vec<String> = store.list_snapshots().unwrap().into_iter().map(|r| r.tag.to_string()).collect();
        assert_eq!(tags, vec!["good"]);
    }

    #[test]
    fn snapshots_insert_get_children_delete() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.db")).unwrap();
        store.insert_snapshot(&snap("a", None)).unwrap();
        store.insert_snapshot(&snap("b", Some("a"))).unwrap();
        assert!(matches!(store.insert_snapshot(&snap("a", None)), Err(Error::AlreadyExists(_))));
        assert_eq!(store.snapshot_children("a").unwrap(), vec!["b".to_string()]);
        let mut a = store.get_snapshot("a").unwrap().unwrap();
        a.status = SnapshotStatus::Ready;
        store.update_snapshot(&a).unwrap();
        assert_eq!(store.get_snapshot("a").unwrap().unwrap().status, SnapshotStatus::Ready);
        store.delete_snapshot("b").unwrap();
        assert!(store.get_snapshot("b").unwrap().is_none());
        assert_eq!(store.list_snapshots().unwrap().len(), 1);
    }

    #[test]
    fn state_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        {
            let store = Store::open(&path).unwrap();
            store.insert_snapshot(&snap("keep", None)).unwrap();
            store.ledger_add("workdir", "/x", "sb-1").unwrap();
        }
        let store = Store::open(&path).unwrap();
        assert!(store.get_snapshot("keep").unwrap().is_some());
        assert_eq!(store.ledger_entries().unwrap().len(), 1);
        store.ledger_remove("workdir", "/x").unwrap();
        assert!(store.ledger_entries().unwrap().is_empty());
    }
}
